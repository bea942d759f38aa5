//! The CLIP vision tower with its visual projection (Radford et al. 2021,
//! <https://arxiv.org/abs/2103.00020>): the image embedding the LAION aesthetic heads score.
//!
//! Computes what transformers' `CLIPVisionModelWithProjection` computes (5.24): a patch
//! convolution without bias, a class embedding, learned position embeddings for the configured
//! image size (no resampling: like transformers by default, another input size is an error), the
//! pre-LayerNorm (`pre_layrnorm`, sic), pre-LayerNorm blocks with a `quick_gelu` MLP for OpenAI's
//! checkpoints, `post_layernorm` on the class token, and `visual_projection` without bias:
//! `image_embeds`, not normalised (scoring L2-normalises it).
//!
//! Loads the Hugging Face folder of either a `CLIPVisionModelWithProjection` or a whole
//! `CLIPModel` such as `openai/clip-vit-large-patch14` (its `config.json` nests the vision
//! configuration under `vision_config`; the text tower's weights are left unread).

use crate::layers::{Activation, Conv2d, LayerNorm, Linear};
use crate::loading::empty_var_store;
use crate::vit::SelfAttention;
use crate::weights::{same_names, Checkpoint};
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// The vision hyper-parameters, named as in transformers' `CLIPVisionConfig`, with its defaults.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// `openai/clip-vit-large-patch14`, the tower the LAION aesthetic heads were trained on.
    pub fn vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Self::default()
        }
    }

    /// Reads a `CLIPVisionConfig` file, or the `vision_config` of a `CLIPConfig` file, whose
    /// projection size is then the top-level `projection_dim` (the `CLIPModel`'s
    /// `visual_projection` is built from it).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let config = match value.get("vision_config") {
            Some(vision) => {
                let mut config: Self = serde_json::from_value(vision.clone())
                    .with_context(|| format!("bad vision_config in {}", path.display()))?;
                config.projection_dim = value
                    .get("projection_dim")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(512);
                config
            }
            None => serde_json::from_value(value)
                .with_context(|| format!("{} is not a CLIP vision config", path.display()))?,
        };
        config
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.hidden_size > 0
                && self.num_attention_heads > 0
                && self.hidden_size % self.num_attention_heads == 0,
            "hidden_size {} is not a positive multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.patch_size > 0 && self.image_size % self.patch_size == 0,
            "image_size {} is not a multiple of patch_size {}",
            self.image_size,
            self.patch_size
        );
        Activation::from_hf_name(&self.hidden_act)?;
        Ok(())
    }
}

/// One encoder layer (`CLIPEncoderLayer`).
#[derive(Debug)]
struct Layer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Layer {
    fn new(vs: nn::Path<'_>, config: &ClipVisionConfig) -> Result<Self> {
        let eps = config.layer_norm_eps;
        let dim = config.hidden_size;
        let attn = &vs / "self_attn";
        Ok(Self {
            layer_norm1: LayerNorm::new(&(&vs / "layer_norm1"), dim, eps),
            self_attn: SelfAttention::new(
                [
                    &attn / "q_proj",
                    &attn / "k_proj",
                    &attn / "v_proj",
                    &attn / "out_proj",
                ],
                dim,
                config.num_attention_heads,
            ),
            layer_norm2: LayerNorm::new(&(&vs / "layer_norm2"), dim, eps),
            fc1: Linear::new(&(&vs / "mlp" / "fc1"), dim, config.intermediate_size, true),
            fc2: Linear::new(&(&vs / "mlp" / "fc2"), config.intermediate_size, dim, true),
            activation: Activation::from_hf_name(&config.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x))?;
        let hidden = self
            .activation
            .forward(&self.fc1.forward(&self.layer_norm2.forward(&x)));
        Ok(&x + self.fc2.forward(&hidden))
    }
}

/// A loaded CLIP vision tower with projection. Holds its own [`nn::VarStore`].
pub struct ClipVision {
    config: ClipVisionConfig,
    _vs: nn::VarStore,
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<Layer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    kind: Kind,
}

impl std::fmt::Debug for ClipVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipVision")
            .field("config", &self.config)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl ClipVision {
    /// Loads a Hugging Face folder (`config.json` + safetensors) onto `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = ClipVisionConfig::from_json_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        Self::from_checkpoint(&checkpoint, config, device, kind)
            .with_context(|| format!("loading the CLIP vision tower from {}", dir.display()))
    }

    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: ClipVisionConfig,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        config.validate()?;
        let mut vs = empty_var_store(device, kind);
        let root = vs.root();
        let vision = &root / "vision_model";
        let embeddings = &vision / "embeddings";
        let dim = config.hidden_size;
        let eps = config.layer_norm_eps;
        let patch_embedding = Conv2d::without_bias(
            &(&embeddings / "patch_embedding"),
            config.num_channels,
            dim,
            config.patch_size,
            config.patch_size,
        );
        let side = config.image_size / config.patch_size;
        let class_embedding = embeddings.zeros("class_embedding", &[dim]);
        let position_embedding =
            (&embeddings / "position_embedding").zeros("weight", &[side * side + 1, dim]);
        let pre_layrnorm = LayerNorm::new(&(&vision / "pre_layrnorm"), dim, eps);
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(&vision / "encoder" / "layers" / i, &config))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(&(&vision / "post_layernorm"), dim, eps);
        let visual_projection = Linear::new(
            &(&root / "visual_projection"),
            dim,
            config.projection_dim,
            false,
        );
        checkpoint.load_into(&mut vs, &same_names)?;
        Ok(Self {
            config,
            _vs: vs,
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            visual_projection,
            kind,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values`: `[batch, channels, image_size, image_size]`. Returns `image_embeds`,
    /// `[batch, projection_dim]`, not normalised.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let size = pixel_values.size();
        let (channels, side) = (self.config.num_channels, self.config.image_size);
        ensure!(
            size.len() == 4 && size[1] == channels && size[2] == side && size[3] == side,
            "the CLIP vision tower expects pixel_values of shape [batch, {channels}, {side}, {side}], \
             got {size:?}"
        );
        let batch = size[0];
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_kind(self.kind))
            .flatten(2, -1)
            .transpose(1, 2);
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([batch, 1, -1], false);
        let embeddings = Tensor::cat(&[class, patches], 1) + self.position_embedding.unsqueeze(0);
        let mut x = self.pre_layrnorm.forward(&embeddings);
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let pooled = self.post_layernorm.forward(&x.select(1, 0));
        Ok(self.visual_projection.forward(&pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_whole_clip_model_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"model_type": "clip", "projection_dim": 768,
                "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14}}"#,
        )
        .unwrap();
        let config = ClipVisionConfig::from_json_file(&path).unwrap();
        assert_eq!(config, ClipVisionConfig::vit_large_patch14());
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"image_size": 30, "patch_size": 4}"#).unwrap();
        let error = ClipVisionConfig::from_json_file(&path).unwrap_err();
        assert!(
            format!("{error:#}").contains("not a multiple of patch_size"),
            "{error:#}"
        );
    }
}
