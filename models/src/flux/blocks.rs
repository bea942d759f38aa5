//! The two block kinds of the FLUX transformer, mirroring diffusers' `FluxTransformerBlock`
//! (double-stream: separate text and image weights, one joint attention) and
//! `FluxSingleTransformerBlock` (single-stream: one joint sequence, attention and MLP in
//! parallel).

use super::attention::{FluxAttention, Rope};
use super::layers::{layer_norm_no_affine, modulate, FeedForward, Linear};
use super::msa::GroupAttention;
use tch::{nn, Tensor};

/// The adaLN modulation vectors: `Linear(SiLU(temb))` split into `count` chunks of `dim`.
fn modulation(linear: &Linear, temb: &Tensor, count: i64) -> Vec<Tensor> {
    linear.forward(&temb.silu()).chunk(count, 1)
}

/// diffusers' `FluxTransformerBlock` (BFL `DoubleStreamBlock`).
pub struct DoubleStreamBlock {
    /// `norm1.linear` (BFL `img_mod.lin`): shift, scale, gate for attention and MLP.
    pub norm1: Linear,
    /// `norm1_context.linear` (BFL `txt_mod.lin`).
    pub norm1_context: Linear,
    pub attn: FluxAttention,
    pub ff: FeedForward,
    pub ff_context: FeedForward,
}

impl DoubleStreamBlock {
    pub fn new(path: nn::Path, dim: i64, heads: i64, head_dim: i64, mlp_hidden: i64) -> Self {
        Self {
            norm1: Linear::new(&(&path / "norm1" / "linear"), dim, 6 * dim, true),
            norm1_context: Linear::new(&(&path / "norm1_context" / "linear"), dim, 6 * dim, true),
            attn: FluxAttention::new(&path / "attn", dim, heads, head_dim, true),
            ff: FeedForward::new(&path / "ff", dim, mlp_hidden),
            ff_context: FeedForward::new(&path / "ff_context", dim, mlp_hidden),
        }
    }

    /// Returns the updated `(text, image)` streams.
    pub fn forward(
        &self,
        image: &Tensor,
        text: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        shared: Option<&GroupAttention>,
    ) -> (Tensor, Tensor) {
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp]: [Tensor; 6] =
            modulation(&self.norm1, temb, 6)
                .try_into()
                .expect("six modulation chunks");
        let [c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp]: [Tensor;
            6] = modulation(&self.norm1_context, temb, 6)
            .try_into()
            .expect("six modulation chunks");
        let text_len = text.size()[1];
        let image_len = image.size()[1];

        let norm_image = modulate(&layer_norm_no_affine(image), &shift_msa, &scale_msa);
        let norm_text = modulate(&layer_norm_no_affine(text), &c_shift_msa, &c_scale_msa);
        let qkv = self.attn.project(&norm_image, Some(&norm_text), text_len);
        let attention = self.attn.attend(&qkv, rope, shared);
        let text_attention = attention.narrow(1, 0, text_len);
        let image_attention = attention.narrow(1, text_len, image_len);
        let image_attention = self
            .attn
            .to_out
            .as_ref()
            .expect("double-stream attention has an output projection")
            .forward(&image_attention);
        let text_attention = self
            .attn
            .context
            .as_ref()
            .expect("double-stream attention has text projections")
            .to_add_out
            .forward(&text_attention);

        let image = image + gate_msa.unsqueeze(1) * image_attention;
        let norm_image = modulate(&layer_norm_no_affine(&image), &shift_mlp, &scale_mlp);
        let image = &image + gate_mlp.unsqueeze(1) * self.ff.forward(&norm_image);

        let text = text + c_gate_msa.unsqueeze(1) * text_attention;
        let norm_text = modulate(&layer_norm_no_affine(&text), &c_shift_mlp, &c_scale_mlp);
        let text = &text + c_gate_mlp.unsqueeze(1) * self.ff_context.forward(&norm_text);
        (text, image)
    }
}

/// diffusers' `FluxSingleTransformerBlock` (BFL `SingleStreamBlock`).
pub struct SingleStreamBlock {
    /// `norm.linear` (BFL `modulation.lin`): shift, scale, gate.
    pub norm: Linear,
    pub attn: FluxAttention,
    /// MLP input projection (BFL: the last part of `linear1`).
    pub proj_mlp: Linear,
    /// Output projection of `[attention, gelu(mlp)]` (BFL `linear2`).
    pub proj_out: Linear,
}

impl SingleStreamBlock {
    pub fn new(path: nn::Path, dim: i64, heads: i64, head_dim: i64, mlp_hidden: i64) -> Self {
        Self {
            norm: Linear::new(&(&path / "norm" / "linear"), dim, 3 * dim, true),
            attn: FluxAttention::new(&path / "attn", dim, heads, head_dim, false),
            proj_mlp: Linear::new(&(&path / "proj_mlp"), dim, mlp_hidden, true),
            proj_out: Linear::new(&(&path / "proj_out"), dim + mlp_hidden, dim, true),
        }
    }

    /// `joint` is the `[text, image]` sequence; returns it updated.
    pub fn forward(
        &self,
        joint: &Tensor,
        text_len: i64,
        temb: &Tensor,
        rope: &Rope,
        shared: Option<&GroupAttention>,
    ) -> Tensor {
        let [shift, scale, gate]: [Tensor; 3] = modulation(&self.norm, temb, 3)
            .try_into()
            .expect("three modulation chunks");
        let normed = modulate(&layer_norm_no_affine(joint), &shift, &scale);
        let mlp = self.proj_mlp.forward(&normed).gelu("tanh");
        let qkv = self.attn.project(&normed, None, text_len);
        let attention = self.attn.attend(&qkv, rope, shared);
        let update = self.proj_out.forward(&Tensor::cat(&[attention, mlp], 2));
        joint + gate.unsqueeze(1) * update
    }
}
