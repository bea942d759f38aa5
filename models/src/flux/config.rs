//! The FLUX transformer's hyper-parameters, read from a diffusers `transformer/config.json`.
//!
//! Field names are the diffusers `FluxTransformer2DModel` constructor arguments, so the same
//! file configures the released checkpoints and the tiny random ones the parity tests use.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// RoPE base of every released FLUX.1 model (`FluxPosEmbed(theta=10000)` in diffusers).
pub const ROPE_THETA: f64 = 10_000.0;
/// Width of the sinusoidal timestep / guidance embedding fed to the time MLPs.
pub const TIMESTEP_EMBEDDING_DIM: i64 = 256;
/// Feed-forward width relative to the hidden size (diffusers hard-codes 4).
pub const MLP_RATIO: i64 = 4;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    #[serde(default = "one")]
    pub patch_size: i64,
    /// Channels of one packed image token: 64, or 128 for Depth-dev (latents + depth latents).
    pub in_channels: i64,
    #[serde(default)]
    pub out_channels: Option<i64>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: i64,
    pub num_attention_heads: i64,
    /// Width of the T5 token embeddings.
    pub joint_attention_dim: i64,
    /// Width of the pooled CLIP embedding.
    pub pooled_projection_dim: i64,
    /// Whether the model embeds the guidance scale (dev: yes, schnell: no).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE dimensions per position axis (text/index, row, column); they sum to the head dim.
    pub axes_dims_rope: Vec<i64>,
}

fn one() -> i64 {
    1
}

impl Config {
    /// FLUX.1-dev, as in `black-forest-labs/FLUX.1-dev/transformer/config.json`.
    pub fn dev() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }

    /// FLUX.1-Depth-dev: FLUX.1-dev with the packed depth latents concatenated to the image
    /// tokens (64 + 64 input channels) and the usual 64 output channels.
    pub fn depth_dev() -> Self {
        Self {
            in_channels: 128,
            out_channels: Some(64),
            ..Self::dev()
        }
    }

    /// Reads and checks a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read transformer config {}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a FLUX transformer config", path.display()))?;
        config
            .validate()
            .with_context(|| format!("transformer config {}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch_size != 1 {
            bail!(
                "patch_size {} is not supported (FLUX uses 1)",
                self.patch_size
            );
        }
        let rope_dims: i64 = self.axes_dims_rope.iter().sum();
        if self.axes_dims_rope.len() != 3 || rope_dims != self.attention_head_dim {
            bail!(
                "axes_dims_rope {:?} must be three axes summing to attention_head_dim {}",
                self.axes_dims_rope,
                self.attention_head_dim
            );
        }
        if self.axes_dims_rope.iter().any(|dim| dim % 2 != 0) {
            bail!("axes_dims_rope {:?} must be even", self.axes_dims_rope);
        }
        Ok(())
    }

    /// Hidden width of both streams.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of the predicted velocity per token.
    pub fn output_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Latent channels of the VAE the model works with (packed 2x2 into each token); the depth
    /// model's input holds the image latents and the control latents side by side.
    pub fn latent_channels(&self) -> i64 {
        self.output_channels() / 4
    }

    /// Whether the model takes channel-concatenated control latents (Depth-dev).
    pub fn takes_control_latents(&self) -> bool {
        self.in_channels > self.output_channels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_are_consistent() {
        Config::dev().validate().unwrap();
        Config::depth_dev().validate().unwrap();
        assert_eq!(Config::dev().inner_dim(), 3072);
        assert!(Config::depth_dev().takes_control_latents());
        assert!(!Config::dev().takes_control_latents());
        assert_eq!(Config::depth_dev().latent_channels(), 16);
    }

    #[test]
    fn reads_diffusers_config_with_extra_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1",
                "attention_head_dim": 16, "axes_dims_rope": [4, 4, 8], "guidance_embeds": true,
                "in_channels": 64, "joint_attention_dim": 32, "num_attention_heads": 2,
                "num_layers": 1, "num_single_layers": 1, "out_channels": null, "patch_size": 1,
                "pooled_projection_dim": 32}"#,
        )
        .unwrap();
        let config = Config::from_file(&path).unwrap();
        assert_eq!(config.inner_dim(), 32);
        assert_eq!(config.output_channels(), 64);
        std::fs::write(&path, r#"{"in_channels": 64}"#).unwrap();
        let error = Config::from_file(&path).unwrap_err();
        assert!(
            format!("{error:#}").contains("not a FLUX transformer config"),
            "{error:#}"
        );
    }
}
