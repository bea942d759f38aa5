//! The CLIP text encoder (transformers' `CLIPTextModel`), FLUX's pooled-prompt encoder: CLIP
//! ViT-L/14's text tower, of which FLUX uses `pooler_output`.
//!
//! Reference: transformers `models/clip/modeling_clip.py`. Token + learned position
//! embeddings, pre-LN causal transformer layers (`quick_gelu` MLP for OpenAI's weights), a final
//! layer norm; the pooled output is the final hidden state at the end-of-text token.
//!
//! Variables are named as transformers 5 saves them (`embeddings.token_embedding.weight`,
//! `encoder.layers.{i}...`, `final_layer_norm`); the files earlier versions wrote, including the
//! real FLUX `text_encoder/`, put everything under `text_model.`, and load too.

use crate::layers::{Activation, Embedding, LayerNorm, Linear};
use crate::loading::{empty_var_store, fill_var_store};
use crate::weights::{Checkpoint, Source};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// The fields of a transformers `CLIPTextConfig` the encoder needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Selects the pooling rule: see [`ClipTextModel::forward`].
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// CLIP ViT-L/14's text tower as in `black-forest-labs/FLUX.1-dev/text_encoder/config.json`.
    pub fn vit_large_patch14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// Reads a `CLIPTextConfig` file, or the `text_config` of a full `CLIPConfig`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if let Some(text_config) = value.get_mut("text_config") {
            value = text_config.take();
        }
        serde_json::from_value(value)
            .with_context(|| format!("{} is not a CLIP text config", path.display()))
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl Attention {
    fn new(path: &nn::Path, config: &ClipTextConfig) -> Self {
        let dim = config.hidden_size;
        Self {
            q_proj: Linear::new(&(path / "q_proj"), dim, dim, true),
            k_proj: Linear::new(&(path / "k_proj"), dim, dim, true),
            v_proj: Linear::new(&(path / "v_proj"), dim, dim, true),
            out_proj: Linear::new(&(path / "out_proj"), dim, dim, true),
            heads: config.num_attention_heads,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (batch, length, dim) = xs.size3().expect("CLIP activations are 3-D");
        let head_dim = dim / self.heads;
        let split = |linear: &Linear| {
            linear
                .forward(xs)
                .view([batch, length, self.heads, head_dim])
                .transpose(1, 2)
        };
        // Causal: each token sees itself and the tokens before it.
        let attended = Tensor::scaled_dot_product_attention(
            &split(&self.q_proj),
            &split(&self.k_proj),
            &split(&self.v_proj),
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.out_proj
            .forward(&attended.transpose(1, 2).reshape([batch, length, dim]))
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(path: &nn::Path, config: &ClipTextConfig, activation: Activation) -> Self {
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        Self {
            layer_norm1: LayerNorm::new(&(path / "layer_norm1"), dim, eps),
            self_attn: Attention::new(&(path / "self_attn"), config),
            layer_norm2: LayerNorm::new(&(path / "layer_norm2"), dim, eps),
            fc1: Linear::new(&(path / "mlp" / "fc1"), dim, config.intermediate_size, true),
            fc2: Linear::new(&(path / "mlp" / "fc2"), config.intermediate_size, dim, true),
            activation,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs));
        let mlp = self.fc2.forward(
            &self
                .activation
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&xs))),
        );
        xs + mlp
    }
}

/// The two outputs FLUX reads.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// `(B, L, hidden)`, after the final layer norm.
    pub last_hidden_state: Tensor,
    /// `(B, hidden)`: `last_hidden_state` at each sequence's end-of-text token.
    pub pooler_output: Tensor,
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
    kind: Kind,
    device: Device,
    /// Owns the weights the layers above hold references to.
    _vs: VarStore,
}

impl ClipTextModel {
    /// Loads a transformers folder (`text_encoder/` in a FLUX pipeline).
    pub fn load_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        Self::load(&checkpoint, config, device, kind)
            .with_context(|| format!("loading the CLIP text encoder from {}", dir.display()))
    }

    pub fn load(
        checkpoint: &Checkpoint,
        config: ClipTextConfig,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let activation = Activation::from_hf_name(&config.hidden_act)
            .with_context(|| format!("hidden_act {:?}", config.hidden_act))?;
        let mut vs = empty_var_store(device, kind);
        let (token_embedding, position_embedding, layers, final_layer_norm) = {
            let root = vs.root();
            let embeddings = &root / "embeddings";
            (
                Embedding::new(
                    &(&embeddings / "token_embedding"),
                    config.vocab_size,
                    config.hidden_size,
                ),
                Embedding::new(
                    &(&embeddings / "position_embedding"),
                    config.max_position_embeddings,
                    config.hidden_size,
                ),
                (0..config.num_hidden_layers)
                    .map(|i| {
                        EncoderLayer::new(&(&root / "encoder" / "layers" / i), &config, activation)
                    })
                    .collect(),
                LayerNorm::new(
                    &(&root / "final_layer_norm"),
                    config.hidden_size,
                    config.layer_norm_eps,
                ),
            )
        };
        let prefix = if checkpoint.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let map = |name: &str| Source::whole(format!("{prefix}{name}"));
        fill_var_store(&mut vs, checkpoint, &map)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config,
            kind,
            device,
            _vs: vs,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Changes the pooling rule's end token (see [`Self::forward`]).
    pub fn set_eos_token_id(&mut self, eos_token_id: i64) {
        self.config.eos_token_id = eos_token_id;
    }

    /// Encodes token ids `(B, L)`, `L <= max_position_embeddings`, with no padding mask (as
    /// FLUX calls it: padding is after the end token, and the mask is causal).
    ///
    /// Pooling follows transformers 5: with `eos_token_id == 2` (configs older than
    /// transformers PR #24773, FLUX's included) the end token is found as the largest id in the
    /// sequence (`<|endoftext|>` is the last id of the vocabulary); otherwise as the first
    /// position holding `eos_token_id` (position 0 if there is none).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let _guard = tch::no_grad_guard();
        let (batch, length) = match input_ids.size().as_slice() {
            &[batch, length] => (batch, length),
            other => bail!("CLIP input_ids has shape {other:?}, expected (batch, length)"),
        };
        let max_length = self.config.max_position_embeddings;
        if length == 0 || length > max_length {
            bail!("CLIP input of {length} tokens (the model takes 1 to {max_length})");
        }
        let input_ids = input_ids.to_device(self.device).to_kind(Kind::Int64);
        let (min, max) = (
            input_ids.min().int64_value(&[]),
            input_ids.max().int64_value(&[]),
        );
        if min < 0 || max >= self.config.vocab_size {
            bail!(
                "CLIP input_ids hold ids in {min}..={max}, outside the vocabulary of {}",
                self.config.vocab_size
            );
        }
        let positions = Tensor::arange(length, (Kind::Int64, self.device));
        let mut hidden =
            self.token_embedding.forward(&input_ids) + self.position_embedding.forward(&positions);
        for layer in &self.layers {
            hidden = layer.forward(&hidden);
        }
        let last_hidden_state = self.final_layer_norm.forward(&hidden);

        let end_positions = if self.config.eos_token_id == 2 {
            input_ids.to_kind(Kind::Int).argmax(-1, false)
        } else {
            input_ids
                .eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(batch, (Kind::Int64, self.device));
        let pooler_output = last_hidden_state.index(&[Some(rows), Some(end_positions)]);
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
        })
    }
}
