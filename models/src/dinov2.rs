//! DINOv2 (Oquab et al. 2023, <https://arxiv.org/abs/2304.07193>) and its register variant
//! (Darcet et al. 2023, <https://arxiv.org/abs/2309.16588>): the image encoder whose normed CLS
//! embedding measures how alike the object crops of a group are.
//!
//! Computes what transformers' `Dinov2Model` / `Dinov2WithRegistersModel` compute (5.24): a
//! patch convolution, a CLS token, learned position embeddings resampled bicubically to the input
//! grid (antialiased for the register variant, as there), the register tokens inserted after CLS,
//! pre-LayerNorm blocks with LayerScale and a GELU MLP (SwiGLU for giant), a final LayerNorm;
//! `pooler_output` is the normed CLS token.
//!
//! Two checkpoint layouts load into it: the Hugging Face folder (`config.json` + safetensors,
//! `embeddings.*` / `encoder.layer.{i}.*` / `layernorm.*` as `save_pretrained` writes them, with an
//! optional `dinov2.` prefix), which names the variables here, and the original torch.hub state
//! dict (`cls_token`, `pos_embed`, `blocks.{i}.attn.qkv`, `ls1.gamma`, `mlp.w12`, `norm`, ...),
//! mapped onto it through a [`KeyMap`] that slices the fused `qkv`. A hub checkpoint may come
//! with a `config.json`; without one its configuration is read off the tensor shapes.

use crate::layers::{Activation, Conv2d, LayerNorm, Linear};
use crate::loading::empty_var_store;
use crate::vit::{resample_position_table, SelfAttention};
use crate::weights::{Checkpoint, Source};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// The architecture hyper-parameters, named as in transformers' `Dinov2Config` /
/// `Dinov2WithRegistersConfig` (`config.json`), with their defaults.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct Dinov2Config {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub mlp_ratio: f64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// The side of the images the position table was trained for (518 for the released models).
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub use_swiglu_ffn: bool,
    /// `dinov2` or `dinov2_with_registers`: decides whether there are register tokens.
    pub model_type: String,
    /// Only read for `dinov2_with_registers`.
    pub num_register_tokens: i64,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            use_swiglu_ffn: false,
            model_type: "dinov2".into(),
            num_register_tokens: 4,
        }
    }
}

impl Dinov2Config {
    fn released(hidden_size: i64, num_hidden_layers: i64, num_attention_heads: i64) -> Self {
        Self {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            image_size: 518,
            ..Self::default()
        }
    }

    /// `facebook/dinov2-small` (ViT-S/14).
    pub fn small() -> Self {
        Self::released(384, 12, 6)
    }

    /// `facebook/dinov2-base` (ViT-B/14).
    pub fn base() -> Self {
        Self::released(768, 12, 12)
    }

    /// `facebook/dinov2-large` (ViT-L/14).
    pub fn large() -> Self {
        Self::released(1024, 24, 16)
    }

    /// `facebook/dinov2-giant` (ViT-g/14): the only size with the SwiGLU feed-forward.
    pub fn giant() -> Self {
        Self {
            use_swiglu_ffn: true,
            ..Self::released(1536, 40, 24)
        }
    }

    /// The same size with the 4 register tokens (`facebook/dinov2-with-registers-*`, the hub's
    /// `dinov2_vit*14_reg`).
    pub fn with_registers(self) -> Self {
        Self {
            model_type: "dinov2_with_registers".into(),
            num_register_tokens: 4,
            ..self
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a DINOv2 config", path.display()))?;
        config
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    /// The number of register tokens (0 without registers).
    pub fn registers(&self) -> i64 {
        if self.model_type == "dinov2_with_registers" {
            self.num_register_tokens
        } else {
            0
        }
    }

    /// The MLP hidden width as transformers computes it: `int(hidden * mlp_ratio)`, and for
    /// SwiGLU two thirds of that rounded up to a multiple of 8.
    pub fn mlp_hidden(&self) -> i64 {
        let plain = (self.hidden_size as f64 * self.mlp_ratio) as i64;
        if self.use_swiglu_ffn {
            ((plain as f64 * 2.0 / 3.0) as i64 + 7) / 8 * 8
        } else {
            plain
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.hidden_size > 0 && self.num_attention_heads > 0,
            "hidden_size and num_attention_heads must be positive"
        );
        ensure!(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(self.patch_size > 0, "patch_size must be positive");
        ensure!(
            matches!(self.model_type.as_str(), "dinov2" | "dinov2_with_registers"),
            "model_type {:?} is neither dinov2 nor dinov2_with_registers",
            self.model_type
        );
        Activation::from_hf_name(&self.hidden_act)?;
        Ok(())
    }

    /// Reads the configuration of a torch.hub checkpoint off its tensor shapes. The hub files
    /// carry no head count: all released sizes use 64-dimensional heads.
    pub fn infer_from_hub_checkpoint(checkpoint: &Checkpoint) -> Result<Self> {
        let shape = |name: &str| {
            checkpoint
                .shape(name)
                .map(<[i64]>::to_vec)
                .with_context(|| format!("the hub checkpoint has no tensor {name}"))
        };
        let patch = shape("patch_embed.proj.weight")?;
        ensure!(
            patch.len() == 4,
            "patch_embed.proj.weight is not a convolution: {patch:?}"
        );
        let hidden_size = patch[0];
        ensure!(
            hidden_size % 64 == 0,
            "cannot infer the head count of a hub checkpoint of width {hidden_size} (released \
             sizes use 64-wide heads): put a config.json beside it"
        );
        let patch_size = patch[2];
        let positions = shape("pos_embed")?[1] - 1;
        let side = (positions as f64).sqrt() as i64;
        let layers = (0..)
            .take_while(|i| checkpoint.contains(&format!("blocks.{i}.norm1.weight")))
            .count() as i64;
        ensure!(layers > 0, "the hub checkpoint has no blocks.0");
        let registers = checkpoint.shape("register_tokens").map(|s| s[1]);
        let config = Self {
            hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: hidden_size / 64,
            image_size: side * patch_size,
            patch_size,
            num_channels: patch[1],
            use_swiglu_ffn: checkpoint.contains("blocks.0.mlp.w12.weight"),
            model_type: if registers.is_some() {
                "dinov2_with_registers".into()
            } else {
                "dinov2".into()
            },
            num_register_tokens: registers.unwrap_or(0),
            ..Self::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// Which key layout a checkpoint uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dinov2Layout {
    /// transformers' names, possibly under a prefix such as `dinov2.`.
    HuggingFace { prefix: String },
    /// The original torch.hub state dict.
    Hub,
}

impl Dinov2Layout {
    pub fn detect(checkpoint: &Checkpoint) -> Result<Self> {
        if checkpoint.contains("cls_token") && checkpoint.contains("pos_embed") {
            return Ok(Self::Hub);
        }
        for prefix in ["", "dinov2."] {
            if checkpoint.contains(&format!("{prefix}embeddings.cls_token")) {
                return Ok(Self::HuggingFace {
                    prefix: prefix.into(),
                });
            }
        }
        bail!(
            "not a DINOv2 checkpoint: no embeddings.cls_token (Hugging Face layout) nor cls_token + \
             pos_embed (torch.hub layout)"
        )
    }

    /// Where a variable of [`Dinov2`] (named after the Hugging Face layout) is in a checkpoint of
    /// this layout.
    pub fn source(&self, name: &str, hidden_size: i64) -> Source {
        match self {
            Self::HuggingFace { prefix } => Source::whole(format!("{prefix}{name}")),
            Self::Hub => hub_source(name, hidden_size),
        }
    }
}

fn hub_source(name: &str, hidden_size: i64) -> Source {
    let renamed = match name {
        "embeddings.cls_token" => "cls_token".to_string(),
        "embeddings.position_embeddings" => "pos_embed".to_string(),
        "embeddings.register_tokens" => "register_tokens".to_string(),
        _ => {
            if let Some(rest) = name.strip_prefix("embeddings.patch_embeddings.projection.") {
                format!("patch_embed.proj.{rest}")
            } else if let Some(rest) = name.strip_prefix("layernorm.") {
                format!("norm.{rest}")
            } else if let Some(rest) = name.strip_prefix("encoder.layer.") {
                let (index, field) = rest.split_once('.').unwrap_or((rest, ""));
                let block = format!("blocks.{index}");
                for (part, offset) in [("query", 0), ("key", 1), ("value", 2)] {
                    if let Some(tail) = field.strip_prefix(&format!("attention.attention.{part}."))
                    {
                        return Source::slice(
                            format!("{block}.attn.qkv.{tail}"),
                            0,
                            offset * hidden_size,
                            hidden_size,
                        );
                    }
                }
                let field = match field {
                    "layer_scale1.lambda1" => "ls1.gamma".to_string(),
                    "layer_scale2.lambda1" => "ls2.gamma".to_string(),
                    other => other
                        .replace("attention.output.dense.", "attn.proj.")
                        .replace("mlp.weights_in.", "mlp.w12.")
                        .replace("mlp.weights_out.", "mlp.w3."),
                };
                format!("{block}.{field}")
            } else {
                name.to_string()
            }
        }
    };
    Source::whole(renamed)
}

/// The feed-forward of a block: `fc1 -> act -> fc2`, or SwiGLU with the fused `weights_in`
/// (gate and up projections stacked, gate first, as the checkpoints store them).
#[derive(Debug)]
enum FeedForward {
    Mlp {
        fc1: Linear,
        fc2: Linear,
        activation: Activation,
    },
    SwiGlu {
        weights_in: Linear,
        weights_out: Linear,
    },
}

impl FeedForward {
    fn new(vs: nn::Path<'_>, config: &Dinov2Config) -> Result<Self> {
        let (dim, hidden) = (config.hidden_size, config.mlp_hidden());
        Ok(if config.use_swiglu_ffn {
            Self::SwiGlu {
                weights_in: Linear::new(&(&vs / "weights_in"), dim, 2 * hidden, true),
                weights_out: Linear::new(&(&vs / "weights_out"), hidden, dim, true),
            }
        } else {
            Self::Mlp {
                fc1: Linear::new(&(&vs / "fc1"), dim, hidden, true),
                fc2: Linear::new(&(&vs / "fc2"), hidden, dim, true),
                activation: Activation::from_hf_name(&config.hidden_act)?,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Mlp {
                fc1,
                fc2,
                activation,
            } => fc2.forward(&activation.forward(&fc1.forward(x))),
            Self::SwiGlu {
                weights_in,
                weights_out,
            } => {
                let fused = weights_in.forward(x);
                let halves = fused.chunk(2, -1);
                weights_out.forward(&(halves[0].silu() * &halves[1]))
            }
        }
    }
}

/// One pre-LayerNorm block with LayerScale (`Dinov2Layer`).
#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attention: SelfAttention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: FeedForward,
    layer_scale2: Tensor,
}

impl Block {
    fn new(vs: nn::Path<'_>, config: &Dinov2Config) -> Result<Self> {
        let dim = config.hidden_size;
        let eps = config.layer_norm_eps;
        let attention = &vs / "attention";
        Ok(Self {
            norm1: LayerNorm::new(&(&vs / "norm1"), dim, eps),
            attention: SelfAttention::new(
                [
                    &attention / "attention" / "query",
                    &attention / "attention" / "key",
                    &attention / "attention" / "value",
                    &attention / "output" / "dense",
                ],
                dim,
                config.num_attention_heads,
            ),
            layer_scale1: (&vs / "layer_scale1").ones("lambda1", &[dim]),
            norm2: LayerNorm::new(&(&vs / "norm2"), dim, eps),
            mlp: FeedForward::new(&vs / "mlp", config)?,
            layer_scale2: (&vs / "layer_scale2").ones("lambda1", &[dim]),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let attended = self.attention.forward(&self.norm1.forward(x))?;
        let x = x + attended * &self.layer_scale1;
        let fed = self.mlp.forward(&self.norm2.forward(&x));
        Ok(&x + fed * &self.layer_scale2)
    }
}

/// What [`Dinov2::forward`] returns, named as `BaseModelOutputWithPooling`.
pub struct Dinov2Output {
    /// `[batch, 1 + registers + patches, hidden]`, after the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// The normed CLS token, `[batch, hidden]`.
    pub pooler_output: Tensor,
}

/// A loaded DINOv2 model. Holds its own [`nn::VarStore`].
pub struct Dinov2 {
    config: Dinov2Config,
    _vs: nn::VarStore,
    patch_embedding: Conv2d,
    cls_token: Tensor,
    position_embeddings: Tensor,
    register_tokens: Option<Tensor>,
    blocks: Vec<Block>,
    layernorm: LayerNorm,
    kind: Kind,
}

impl std::fmt::Debug for Dinov2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dinov2")
            .field("config", &self.config)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Dinov2 {
    /// Loads a model from a folder (`config.json` + safetensors, either layout) or from a single
    /// hub-layout safetensors file, onto `device` in `kind` (`Float` or `BFloat16`).
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (checkpoint, config_file) = if path.is_dir() {
            let config = path.join("config.json");
            (
                Checkpoint::open_dir(path)?,
                config.exists().then_some(config),
            )
        } else {
            (Checkpoint::open_file(path)?, None)
        };
        let layout = Dinov2Layout::detect(&checkpoint)
            .with_context(|| format!("loading DINOv2 from {}", path.display()))?;
        let config = match (&config_file, &layout) {
            (Some(file), _) => Dinov2Config::from_json_file(file)?,
            (None, Dinov2Layout::Hub) => Dinov2Config::infer_from_hub_checkpoint(&checkpoint)
                .with_context(|| format!("reading the configuration of {}", path.display()))?,
            (None, Dinov2Layout::HuggingFace { .. }) => {
                bail!(
                    "{} has Hugging Face weights but no config.json",
                    path.display()
                )
            }
        };
        Self::from_checkpoint(&checkpoint, &layout, config, device, kind)
            .with_context(|| format!("loading DINOv2 from {}", path.display()))
    }

    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        layout: &Dinov2Layout,
        config: Dinov2Config,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        config.validate()?;
        let mut vs = empty_var_store(device, kind);
        let root = vs.root();
        let dim = config.hidden_size;
        let embeddings = &root / "embeddings";
        let patch_embedding = Conv2d::new(
            &(&embeddings / "patch_embeddings" / "projection"),
            config.num_channels,
            dim,
            config.patch_size,
            config.patch_size,
            0,
        );
        let side = config.image_size / config.patch_size;
        let cls_token = embeddings.zeros("cls_token", &[1, 1, dim]);
        let position_embeddings =
            embeddings.zeros("position_embeddings", &[1, side * side + 1, dim]);
        let register_tokens = (config.registers() > 0)
            .then(|| embeddings.zeros("register_tokens", &[1, config.registers(), dim]));
        let blocks = (0..config.num_hidden_layers)
            .map(|i| Block::new(&root / "encoder" / "layer" / i, &config))
            .collect::<Result<Vec<_>>>()?;
        let layernorm = LayerNorm::new(&(&root / "layernorm"), dim, config.layer_norm_eps);
        checkpoint.load_into(&mut vs, &|name| layout.source(name, dim))?;
        Ok(Self {
            config,
            _vs: vs,
            patch_embedding,
            cls_token,
            position_embeddings,
            register_tokens,
            blocks,
            layernorm,
            kind,
        })
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The position embeddings for an input of `height x width` pixels, as transformers'
    /// `interpolate_pos_encoding` gives them: the table itself when the patch count matches and
    /// the input is square, else the patch part resampled bicubically to the input grid.
    fn position_embeddings_for(&self, height: i64, width: i64) -> Result<Tensor> {
        let patch = self.config.patch_size;
        let (grid_height, grid_width) = (height / patch, width / patch);
        let positions = self.position_embeddings.size()[1] - 1;
        if grid_height * grid_width == positions && height == width {
            return Ok(self.position_embeddings.shallow_clone());
        }
        let class_position = self.position_embeddings.narrow(1, 0, 1);
        let patch_positions = self.position_embeddings.narrow(1, 1, positions);
        // Only the register variant antialiases (transformers' Dinov2WithRegistersEmbeddings).
        let antialias = self.register_tokens.is_some();
        let resampled =
            resample_position_table(&patch_positions, grid_height, grid_width, antialias)?;
        Ok(Tensor::cat(&[class_position, resampled], 1))
    }

    /// `pixel_values`: `[batch, channels, height, width]`, any height and width of at least one
    /// patch (pixels past the last whole patch are ignored, as by the patch convolution).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Dinov2Output> {
        let size = pixel_values.size();
        let patch = self.config.patch_size;
        ensure!(
            size.len() == 4 && size[1] == self.config.num_channels,
            "DINOv2 expects pixel_values of shape [batch, {}, height, width], got {size:?}",
            self.config.num_channels
        );
        ensure!(
            size[2] >= patch && size[3] >= patch,
            "the input {}x{} is smaller than one {patch}x{patch} patch",
            size[2],
            size[3]
        );
        let batch = size[0];
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_kind(self.kind))
            .flatten(2, -1)
            .transpose(1, 2);
        let cls = self.cls_token.expand([batch, -1, -1], false);
        let mut x =
            Tensor::cat(&[cls, patches], 1) + self.position_embeddings_for(size[2], size[3])?;
        if let Some(registers) = &self.register_tokens {
            let tokens = x.size()[1];
            x = Tensor::cat(
                &[
                    x.narrow(1, 0, 1),
                    registers.expand([batch, -1, -1], false),
                    x.narrow(1, 1, tokens - 1),
                ],
                1,
            );
        }
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let last_hidden_state = self.layernorm.forward(&x);
        let pooler_output = last_hidden_state.select(1, 0);
        Ok(Dinov2Output {
            last_hidden_state,
            pooler_output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_configurations() {
        let large = Dinov2Config::large().with_registers();
        assert_eq!(large.registers(), 4);
        assert_eq!(large.hidden_size / large.num_attention_heads, 64);
        assert_eq!(large.mlp_hidden(), 4096);
        assert_eq!(Dinov2Config::small().registers(), 0);
        // Giant's SwiGLU: int(1536 * 4) = 6144, two thirds 4096, already a multiple of 8.
        assert_eq!(Dinov2Config::giant().mlp_hidden(), 4096);
        assert_eq!(Dinov2Config::base().image_size, 518);
    }

    #[test]
    fn swiglu_width_rounds_like_transformers() {
        // int(32 * 4) = 128; int(128 * 2 / 3) = 85; rounded up to a multiple of 8: 88.
        let tiny = Dinov2Config {
            hidden_size: 32,
            use_swiglu_ffn: true,
            ..Dinov2Config::default()
        };
        assert_eq!(tiny.mlp_hidden(), 88);
    }

    #[test]
    fn hub_names_map_onto_the_hugging_face_names() {
        let hub = Dinov2Layout::Hub;
        assert_eq!(
            hub.source("embeddings.cls_token", 8),
            Source::whole("cls_token")
        );
        assert_eq!(
            hub.source("embeddings.patch_embeddings.projection.weight", 8),
            Source::whole("patch_embed.proj.weight")
        );
        assert_eq!(
            hub.source("encoder.layer.3.attention.attention.key.bias", 8),
            Source::slice("blocks.3.attn.qkv.bias", 0, 8, 8)
        );
        assert_eq!(
            hub.source("encoder.layer.11.attention.output.dense.weight", 8),
            Source::whole("blocks.11.attn.proj.weight")
        );
        assert_eq!(
            hub.source("encoder.layer.0.layer_scale2.lambda1", 8),
            Source::whole("blocks.0.ls2.gamma")
        );
        assert_eq!(
            hub.source("encoder.layer.0.mlp.weights_in.weight", 8),
            Source::whole("blocks.0.mlp.w12.weight")
        );
        assert_eq!(hub.source("layernorm.bias", 8), Source::whole("norm.bias"));
        let prefixed = Dinov2Layout::HuggingFace {
            prefix: "dinov2.".into(),
        };
        assert_eq!(
            prefixed.source("layernorm.bias", 8),
            Source::whole("dinov2.layernorm.bias")
        );
    }

    #[test]
    fn bad_configurations_are_rejected() {
        let odd_heads = Dinov2Config {
            num_attention_heads: 5,
            ..Dinov2Config::default()
        };
        assert!(odd_heads.validate().is_err());
        let unknown = Dinov2Config {
            model_type: "vit".into(),
            ..Dinov2Config::default()
        };
        assert!(unknown.validate().is_err());
    }
}
