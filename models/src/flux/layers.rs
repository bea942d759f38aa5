//! The few parameterised layers the FLUX transformer is made of, named like their PyTorch
//! counterparts so that variable paths equal the diffusers checkpoint keys.
//!
//! Variables are created as zeros in the store's dtype on the store's device (as in
//! [`crate::layers`], whose `Linear` these build on): loading a checkpoint overwrites them
//! one at a time, so nothing is initialised twice and no copy of the model ever exists in another
//! dtype or on another device.

pub use crate::layers::{Linear, RmsNorm};
use tch::nn;
use tch::Tensor;

/// LayerNorm without affine parameters (eps 1e-6), as every FLUX modulation uses.
pub fn layer_norm_no_affine(xs: &Tensor) -> Tensor {
    let dim = *xs
        .size()
        .last()
        .expect("layer norm input has a last dimension");
    xs.layer_norm([dim], None::<&Tensor>, None::<&Tensor>, 1e-6, true)
}

/// `(1 + scale) * x + shift`, with per-sample `scale`/`shift` [B, D] broadcast over tokens.
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    xs * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// diffusers' `FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")`:
/// `net.0.proj` (Linear dim -> 4 dim, GELU tanh) and `net.2` (Linear 4 dim -> dim).
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

impl FeedForward {
    pub fn new(path: nn::Path, dim: i64, hidden: i64) -> Self {
        Self {
            proj_in: Linear::new(&(&path / "net" / "0" / "proj"), dim, hidden, true),
            proj_out: Linear::new(&(&path / "net" / "2"), hidden, dim, true),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.proj_out
            .forward(&self.proj_in.forward(xs).gelu("tanh"))
    }
}

/// An MLP `linear_1 -> SiLU -> linear_2` (diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection`; BFL's `MLPEmbedder` with `in_layer`/`out_layer`).
pub struct Mlp {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Mlp {
    pub fn new(path: nn::Path, in_features: i64, hidden: i64) -> Self {
        Self {
            linear_1: Linear::new(&(&path / "linear_1"), in_features, hidden, true),
            linear_2: Linear::new(&(&path / "linear_2"), hidden, hidden, true),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}
