//! The standard layers (linear, convolution, normalisations, embedding, activations) every model
//! is built from, with Hugging Face variable names (`weight`, `bias`).
//!
//! They differ from `tch::nn`'s in one way: variables start as zeros instead of a random init.
//! Every variable is overwritten by the checkpoint right after construction, so random init is
//! pure waste (for T5-XXL, seconds of RNG work and a second buffer per tensor).

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

const ZEROS: Init = Init::Const(0.);

/// `y = x W^T + b`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(path: &Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        Self {
            weight: path.var("weight", &[out_dim, in_dim], ZEROS),
            bias: bias.then(|| path.var("bias", &[out_dim], ZEROS)),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
    }
}

/// A 2-D convolution with a square kernel and symmetric padding.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(
        path: &Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        Self {
            weight: path.var(
                "weight",
                &[out_channels, in_channels, kernel, kernel],
                ZEROS,
            ),
            bias: Some(path.var("bias", &[out_channels], ZEROS)),
            stride,
            padding,
        }
    }

    /// A convolution without a bias and without padding (a ViT's patch embedding).
    pub fn without_bias(
        path: &Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
    ) -> Self {
        Self {
            weight: path.var(
                "weight",
                &[out_channels, in_channels, kernel, kernel],
                ZEROS,
            ),
            bias: None,
            stride,
            padding: 0,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// Group normalisation over `(N, C, ...)` with a learned affine transform.
#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(path: &Path, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[channels], ZEROS),
            bias: path.var("bias", &[channels], ZEROS),
            groups,
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// Layer normalisation over the last dimension with a learned affine transform.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(path: &Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[dim], ZEROS),
            bias: path.var("bias", &[dim], ZEROS),
            dim,
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// A lookup table of `count` vectors of size `dim`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(path: &Path, count: i64, dim: i64) -> Self {
        Self {
            weight: path.var("weight", &[count, dim], ZEROS),
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// The activations the encoders' configs name, by their Hugging Face `ACT2FN` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation of GELU.
    GeluTanh,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_hf_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::Gelu,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => anyhow::bail!("unsupported activation {other:?}"),
        })
    }

    pub fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Self::GeluTanh => xs.gelu("tanh"),
            Self::Gelu => xs.gelu("none"),
            Self::QuickGelu => xs * (xs * 1.702).sigmoid(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

/// `torch.nn.RMSNorm` over the last dimension with a learned scale (FLUX's per-head Q/K norms):
/// libtorch's fused kernel, scaling before rounding back to the input's dtype.
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(path: Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[dim], ZEROS),
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let dim = *xs
            .size()
            .last()
            .expect("rms norm input has a last dimension");
        xs.rms_norm([dim], Some(&self.weight), self.eps)
    }
}

/// T5's layer norm (transformers' `T5LayerNorm`): `weight * x / sqrt(mean(x^2) + eps)`, the
/// statistics in fp32 and the normalised values rounded to the weight's dtype before scaling.
#[derive(Debug)]
pub struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    pub fn new(path: &Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[dim], ZEROS),
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let variance = xs
            .to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float);
        // As in transformers: normalise in fp32, round to the weight's dtype, then scale.
        let normed = (xs * (variance + self.eps).rsqrt()).to_kind(self.weight.kind());
        &self.weight * normed
    }
}
