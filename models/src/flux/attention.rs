//! FLUX's joint attention: the projections of one block and the attention over the joint
//! `[text, image]` sequence, either per image (plain) or shared across a group of images
//! ([`super::msa`]).
//!
//! Attention runs through `scaled_dot_product_attention` without a mask, so libtorch can pick
//! its fused (flash / memory-efficient) kernels.

use super::embeddings::apply_rope;
use super::layers::{Linear, RmsNorm};
use super::msa::GroupAttention;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tch::{nn, Tensor};

/// Q/K RMSNorm epsilon of every FLUX attention.
const QK_NORM_EPS: f64 = 1e-6;

/// Rotary tables of one forward pass: the single-image positions of the joint sequence.
pub struct Rope {
    /// [txt + img, head_dim] float32.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Queries, keys and values of a joint `[text, image]` sequence, [B, S, heads, head_dim],
/// after the Q/K norms and before the rotary embedding (shared attention needs the image keys
/// unrotated, to rotate them at the positions they take in another image's key sequence).
pub struct JointQkv {
    pub query: Tensor,
    pub key: Tensor,
    pub value: Tensor,
    pub text_len: i64,
}

/// The projections for the text stream of a double-stream block (`add_*` in diffusers).
pub struct ContextProjections {
    pub add_q_proj: Linear,
    pub add_k_proj: Linear,
    pub add_v_proj: Linear,
    pub norm_added_q: RmsNorm,
    pub norm_added_k: RmsNorm,
    pub to_add_out: Linear,
}

/// diffusers' `FluxAttention`: image (or joint, in single-stream blocks) projections, optional
/// text projections (double-stream blocks) and the output projection (double-stream only;
/// single-stream blocks project attention and MLP together).
pub struct FluxAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
    pub to_out: Option<Linear>,
    pub context: Option<ContextProjections>,
    heads: i64,
    head_dim: i64,
}

impl FluxAttention {
    /// `with_context`: a double-stream attention with text projections and output projections.
    pub fn new(path: nn::Path, dim: i64, heads: i64, head_dim: i64, with_context: bool) -> Self {
        let inner = heads * head_dim;
        let context = with_context.then(|| ContextProjections {
            add_q_proj: Linear::new(&(&path / "add_q_proj"), dim, inner, true),
            add_k_proj: Linear::new(&(&path / "add_k_proj"), dim, inner, true),
            add_v_proj: Linear::new(&(&path / "add_v_proj"), dim, inner, true),
            norm_added_q: RmsNorm::new(&path / "norm_added_q", head_dim, QK_NORM_EPS),
            norm_added_k: RmsNorm::new(&path / "norm_added_k", head_dim, QK_NORM_EPS),
            to_add_out: Linear::new(&(&path / "to_add_out"), inner, dim, true),
        });
        Self {
            to_q: Linear::new(&(&path / "to_q"), dim, inner, true),
            to_k: Linear::new(&(&path / "to_k"), dim, inner, true),
            to_v: Linear::new(&(&path / "to_v"), dim, inner, true),
            norm_q: RmsNorm::new(&path / "norm_q", head_dim, QK_NORM_EPS),
            norm_k: RmsNorm::new(&path / "norm_k", head_dim, QK_NORM_EPS),
            to_out: with_context.then(|| Linear::new(&(&path / "to_out" / "0"), inner, dim, true)),
            context,
            heads,
            head_dim,
        }
    }

    fn split_heads(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        xs.reshape([size[0], size[1], self.heads, self.head_dim])
    }

    /// Projects `hidden` (image tokens, or the joint sequence in single-stream blocks) and, in
    /// double-stream blocks, `context` (text tokens) into one joint `[text, image]` sequence.
    pub fn project(&self, hidden: &Tensor, context: Option<&Tensor>, text_len: i64) -> JointQkv {
        let query = self
            .norm_q
            .forward(&self.split_heads(&self.to_q.forward(hidden)));
        let key = self
            .norm_k
            .forward(&self.split_heads(&self.to_k.forward(hidden)));
        let value = self.split_heads(&self.to_v.forward(hidden));
        let (query, key, value) = match (&self.context, context) {
            (Some(projections), Some(context)) => {
                let context_query = projections
                    .norm_added_q
                    .forward(&self.split_heads(&projections.add_q_proj.forward(context)));
                let context_key = projections
                    .norm_added_k
                    .forward(&self.split_heads(&projections.add_k_proj.forward(context)));
                let context_value = self.split_heads(&projections.add_v_proj.forward(context));
                (
                    Tensor::cat(&[context_query, query], 1),
                    Tensor::cat(&[context_key, key], 1),
                    Tensor::cat(&[context_value, value], 1),
                )
            }
            _ => (query, key, value),
        };
        JointQkv {
            query,
            key,
            value,
            text_len,
        }
    }

    /// Attention over the joint sequence: [B, S, heads * head_dim].
    pub fn attend(&self, qkv: &JointQkv, rope: &Rope, shared: Option<&GroupAttention>) -> Tensor {
        match shared {
            Some(group) => group.attend(qkv, rope),
            None => {
                let query = apply_rope(&qkv.query, &rope.cos, &rope.sin);
                let key = apply_rope(&qkv.key, &rope.cos, &rope.sin);
                sdpa(&query, &key, &qkv.value)
            }
        }
    }
}

/// Unmasked scaled-dot-product attention on [B, S, H, D] tensors, returning [B, Sq, H * D].
pub fn sdpa(query: &Tensor, key: &Tensor, value: &Tensor) -> Tensor {
    let (query, key, value) = (
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
    );
    if KERNEL_AUDIT_ON.load(Ordering::Relaxed) {
        record_kernel(&query, &key, &value);
    }
    let output = Tensor::scaled_dot_product_attention(
        &query,
        &key,
        &value,
        None::<&Tensor>,
        0.0,
        false,
        None,
        false,
    );
    let size = output.size();
    output
        .transpose(1, 2)
        .reshape([size[0], size[2], size[1] * size[3]])
}

/// libtorch's attention kernels, indexed by its `SDPBackend` value.
const SDP_BACKENDS: [&str; 5] = ["math", "flash", "efficient", "cudnn", "overrideable"];

static KERNEL_AUDIT_ON: AtomicBool = AtomicBool::new(false);
static KERNEL_AUDIT: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Starts counting which kernel libtorch picks for each FLUX attention call, asked with the
/// call's own tensors (their dtype, shapes and strides decide it). While on, each call costs a
/// host-side check of the tensors' metadata: no device work and no synchronisation.
pub fn start_kernel_audit() {
    KERNEL_AUDIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    KERNEL_AUDIT_ON.store(true, Ordering::Relaxed);
}

/// Stops the audit and returns the calls per kernel (`math` is the unfused fallback that
/// materialises every score).
pub fn finish_kernel_audit() -> BTreeMap<&'static str, u64> {
    KERNEL_AUDIT_ON.store(false, Ordering::Relaxed);
    std::mem::take(&mut *KERNEL_AUDIT.lock().unwrap_or_else(|e| e.into_inner()))
}

fn record_kernel(query: &Tensor, key: &Tensor, value: &Tensor) {
    let choice = Tensor::f_internal_fused_sdp_choice(
        query,
        key,
        value,
        None::<&Tensor>,
        0.0,
        false,
        None,
        false,
    );
    let name = match choice {
        Ok(index) => usize::try_from(index)
            .ok()
            .and_then(|index| SDP_BACKENDS.get(index).copied())
            .unwrap_or("none"),
        Err(_) => "none",
    };
    *KERNEL_AUDIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name)
        .or_default() += 1;
}
