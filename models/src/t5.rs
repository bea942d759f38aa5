//! The T5 encoder (transformers' `T5EncoderModel`), FLUX's long-prompt text encoder: T5 v1.1
//! XXL, of which FLUX uses `last_hidden_state` for 512 tokens.
//!
//! Reference: transformers `models/t5/modeling_t5.py`. Pre-norm blocks with T5's RMS norm (no
//! mean, no bias, statistics in fp32), attention without the `1/sqrt(d)` scaling and with a
//! learned relative position bias that only the first block owns and every block reuses,
//! gated-GELU feed-forward (`gelu_new`) in v1.1, dense ReLU in the original T5.
//!
//! Variables are named after the transformers checkpoint (`shared.weight`,
//! `encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...). Checkpoints that store the
//! embedding only as `encoder.embed_tokens.weight` load too.

use crate::layers::{Activation, Embedding, Linear, T5LayerNorm};
use crate::loading::{empty_var_store, fill_var_store, read_json};
use crate::weights::{Checkpoint, Source};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// The fields of a transformers `T5Config` the encoder needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: i64,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (v1.1: `gelu_new` gate) or `"relu"` (original T5); `"gated-"` selects the
    /// gated feed-forward, the rest names the activation.
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> i64 {
    32
}
fn default_max_distance() -> i64 {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_feed_forward_proj() -> String {
    "relu".into()
}

impl T5Config {
    /// T5 v1.1 XXL as shipped in `black-forest-labs/FLUX.1-dev/text_encoder_2/config.json`.
    pub fn v1_1_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    /// Whether the feed-forward is gated, and its activation, following `T5Config.__init__`
    /// (which maps `"gated-gelu"` to `gelu_new`).
    pub fn feed_forward(&self) -> Result<(bool, Activation)> {
        let (gated, name) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(name) => (true, name),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let name = if name == "gelu" && gated {
            "gelu_new"
        } else {
            name
        };
        let activation = Activation::from_hf_name(name)
            .with_context(|| format!("feed_forward_proj {:?}", self.feed_forward_proj))?;
        Ok((gated, activation))
    }
}

#[derive(Debug)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: i64,
    head_dim: i64,
}

impl SelfAttention {
    fn new(path: &nn::Path, config: &T5Config) -> Self {
        let inner = config.num_heads * config.d_kv;
        Self {
            q: Linear::new(&(path / "q"), config.d_model, inner, false),
            k: Linear::new(&(path / "k"), config.d_model, inner, false),
            v: Linear::new(&(path / "v"), config.d_model, inner, false),
            o: Linear::new(&(path / "o"), inner, config.d_model, false),
            heads: config.num_heads,
            head_dim: config.d_kv,
        }
    }

    /// `bias`: `(1 or B, heads, L, L)`, the position bias plus the padding mask, added to the
    /// unscaled attention logits.
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Tensor {
        let (batch, length, _) = xs.size3().expect("T5 activations are 3-D");
        let split = |linear: &Linear| {
            linear
                .forward(xs)
                .view([batch, length, self.heads, self.head_dim])
                .transpose(1, 2)
        };
        let attended = Tensor::scaled_dot_product_attention(
            &split(&self.q),
            &split(&self.k),
            &split(&self.v),
            Some(bias),
            0.0,
            false,
            1.0, // T5 does not scale the logits.
            false,
        );
        self.o.forward(&attended.transpose(1, 2).reshape([
            batch,
            length,
            self.heads * self.head_dim,
        ]))
    }
}

#[derive(Debug)]
struct FeedForward {
    /// `wi_0` (gated) or `wi` (dense): the activated projection.
    wi: Linear,
    /// `wi_1`: the linear gate of the gated variant.
    gate: Option<Linear>,
    wo: Linear,
    activation: Activation,
}

impl FeedForward {
    fn new(path: &nn::Path, config: &T5Config) -> Result<Self> {
        let (gated, activation) = config.feed_forward()?;
        let (d_model, d_ff) = (config.d_model, config.d_ff);
        Ok(Self {
            wi: Linear::new(
                &(path / if gated { "wi_0" } else { "wi" }),
                d_model,
                d_ff,
                false,
            ),
            gate: gated.then(|| Linear::new(&(path / "wi_1"), d_model, d_ff, false)),
            wo: Linear::new(&(path / "wo"), d_ff, d_model, false),
            activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = self.activation.forward(&self.wi.forward(xs));
        if let Some(gate) = &self.gate {
            hidden *= gate.forward(xs);
        }
        self.wo.forward(&hidden)
    }
}

#[derive(Debug)]
struct Block {
    attention_norm: T5LayerNorm,
    attention: SelfAttention,
    feed_forward_norm: T5LayerNorm,
    feed_forward: FeedForward,
}

impl Block {
    fn new(path: &nn::Path, config: &T5Config) -> Result<Self> {
        let eps = config.layer_norm_epsilon;
        let attention_layer = path / "layer" / 0;
        let feed_forward_layer = path / "layer" / 1;
        Ok(Self {
            attention_norm: T5LayerNorm::new(
                &(&attention_layer / "layer_norm"),
                config.d_model,
                eps,
            ),
            attention: SelfAttention::new(&(&attention_layer / "SelfAttention"), config),
            feed_forward_norm: T5LayerNorm::new(
                &(&feed_forward_layer / "layer_norm"),
                config.d_model,
                eps,
            ),
            feed_forward: FeedForward::new(&(&feed_forward_layer / "DenseReluDense"), config)?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Tensor {
        let xs = xs
            + self
                .attention
                .forward(&self.attention_norm.forward(xs), bias);
        &xs + self
            .feed_forward
            .forward(&self.feed_forward_norm.forward(&xs))
    }
}

/// The T5 encoder stack with its token embedding.
#[derive(Debug)]
pub struct T5Encoder {
    shared: Embedding,
    /// `(num_buckets, heads)`: the first block's relative position bias table.
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
    config: T5Config,
    kind: Kind,
    device: Device,
    /// Owns the weights the layers above hold references to.
    _vs: VarStore,
}

impl T5Encoder {
    /// Loads a transformers folder (`text_encoder_2/` in a FLUX pipeline: `config.json` +
    /// safetensors, sharded or not).
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config: T5Config = read_json(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        Self::load(&checkpoint, config, device, kind)
            .with_context(|| format!("loading the T5 encoder from {}", dir.display()))
    }

    pub fn load(
        checkpoint: &Checkpoint,
        config: T5Config,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let mut vs = empty_var_store(device, kind);
        let (shared, relative_attention_bias, blocks, final_layer_norm) = {
            let root = vs.root();
            let encoder = &root / "encoder";
            let blocks = (0..config.num_layers)
                .map(|i| Block::new(&(&encoder / "block" / i), &config))
                .collect::<Result<Vec<_>>>()?;
            let relative_attention_bias = (&encoder
                / "block"
                / 0
                / "layer"
                / 0
                / "SelfAttention"
                / "relative_attention_bias")
                .var(
                    "weight",
                    &[config.relative_attention_num_buckets, config.num_heads],
                    nn::Init::Const(0.),
                );
            (
                Embedding::new(&(&root / "shared"), config.vocab_size, config.d_model),
                relative_attention_bias,
                blocks,
                T5LayerNorm::new(
                    &(&encoder / "final_layer_norm"),
                    config.d_model,
                    config.layer_norm_epsilon,
                ),
            )
        };
        // transformers ties `encoder.embed_tokens` to `shared`; files written by some versions
        // keep only one of the two names.
        let embedding_name = if checkpoint.contains("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let map = |name: &str| match name {
            "shared.weight" => Source::whole(embedding_name),
            other => Source::whole(other),
        };
        fill_var_store(&mut vs, checkpoint, &map)?;
        Ok(Self {
            shared,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            config,
            kind,
            device,
            _vs: vs,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// `last_hidden_state` `(B, L, d_model)` for token ids `(B, L)`. `attention_mask` `(B, L)`
    /// (1 = token, 0 = padding) keeps padding out of the keys; FLUX passes none and lets every
    /// token see the padding.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let (batch, length) = match input_ids.size().as_slice() {
            &[batch, length] => (batch, length),
            other => bail!("T5 input_ids has shape {other:?}, expected (batch, length)"),
        };
        let input_ids = input_ids.to_device(self.device).to_kind(Kind::Int64);
        let vocab = self.config.vocab_size;
        if length > 0 {
            let (min, max) = (
                input_ids.min().int64_value(&[]),
                input_ids.max().int64_value(&[]),
            );
            if min < 0 || max >= vocab {
                bail!("T5 input_ids hold ids in {min}..={max}, outside the vocabulary of {vocab}");
            }
        }
        let mut bias = self.position_bias(length);
        if let Some(mask) = attention_mask {
            if mask.size() != [batch, length] {
                bail!(
                    "T5 attention_mask has shape {:?}, expected [{batch}, {length}]",
                    mask.size()
                );
            }
            let keep = mask
                .to_device(self.device)
                .ne(0)
                .view([batch, 1, 1, length]);
            // As transformers' sdpa path: blocked keys get the dtype's minimum instead of the bias.
            let minimum = match self.kind {
                Kind::BFloat16 => -3.3895313892515355e38,
                Kind::Half => -65504.0,
                _ => f64::from(f32::MIN),
            };
            bias = bias.where_scalarother(&keep, minimum);
        }
        let mut hidden = self.shared.forward(&input_ids);
        for block in &self.blocks {
            hidden = block.forward(&hidden, &bias);
        }
        Ok(self.final_layer_norm.forward(&hidden))
    }

    /// `(1, heads, L, L)`: the learned bias of each query-key offset, through T5's buckets.
    fn position_bias(&self, length: i64) -> Tensor {
        let options = (Kind::Int64, self.device);
        let positions = Tensor::arange(length, options);
        let relative = positions.unsqueeze(0) - positions.unsqueeze(1); // key - query
        let buckets = relative_position_buckets(
            &relative,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        );
        Tensor::embedding(&self.relative_attention_bias, &buckets, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }
}

/// T5's bidirectional bucketing of `key - query` offsets (Mesh TensorFlow's): half the buckets
/// per direction, exact for offsets below a quarter of the buckets, logarithmic up to
/// `max_distance`, then saturated. The same tensor ops as transformers, so the rounding of the
/// logarithm matches.
fn relative_position_buckets(relative: &Tensor, num_buckets: i64, max_distance: i64) -> Tensor {
    let half = num_buckets / 2;
    let direction = relative.gt(0).to_kind(Kind::Int64) * half;
    let distance = relative.abs();
    let max_exact = half / 2;
    let is_small = distance.lt(max_exact);
    let scale = (max_distance as f64 / max_exact as f64).ln();
    let large = ((distance.to_kind(Kind::Float) / max_exact as f64).log() / scale
        * (half - max_exact) as f64)
        .to_kind(Kind::Int64)
        + max_exact;
    let large = large.clamp_max(half - 1);
    direction + distance.where_self(&is_small, &large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_reference_values() {
        // transformers T5Attention._relative_position_bucket(torch.tensor([...]), True, 32, 128)
        let offsets = [
            -200i64, -128, -64, -20, -8, -7, -1, 0, 1, 7, 8, 20, 64, 128, 200,
        ];
        let expected = [15i64, 15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 26, 30, 31, 31];
        let buckets = relative_position_buckets(&Tensor::from_slice(&offsets), 32, 128);
        assert_eq!(Vec::<i64>::try_from(&buckets).unwrap(), expected);
    }

    #[test]
    fn feed_forward_kinds_follow_the_config() {
        assert_eq!(
            T5Config::v1_1_xxl().feed_forward().unwrap(),
            (true, Activation::GeluTanh)
        );
        let relu = T5Config {
            feed_forward_proj: "relu".into(),
            ..T5Config::v1_1_xxl()
        };
        assert_eq!(relu.feed_forward().unwrap(), (false, Activation::Relu));
        let unknown = T5Config {
            feed_forward_proj: "gated-mish".into(),
            ..T5Config::v1_1_xxl()
        };
        assert!(unknown.feed_forward().is_err());
    }
}
