//! The FLUX VAE: diffusers' `AutoencoderKL` with 16 latent channels.
//!
//! Reference: diffusers `models/autoencoders/autoencoder_kl.py` and `vae.py` (`Encoder`,
//! `Decoder`, `UNetMidBlock2D`, `ResnetBlock2D`, `Downsample2D`, `Upsample2D`); the original
//! implementation is black-forest-labs/flux `src/flux/modules/autoencoder.py`.
//!
//! Variables are named after the diffusers `vae/` folder. The BFL single file (`ae.safetensors`)
//! is loaded through a [`KeyMap`](crate::weights::KeyMap): its levels are `down.{i}` /
//! `up.{i}` (decoder levels numbered from the lowest resolution, the reverse of diffusers'
//! `up_blocks`), its mid-block attention is `attn_1.{norm,q,k,v,proj_out}` stored as 1x1
//! convolutions, its shortcuts are `nin_shortcut`.
//!
//! The pipeline works with *latents* `(mean - shift) * scale` ([`AutoencoderKl::encode_to_latents`])
//! and decodes them back with [`AutoencoderKl::decode_from_latents`].

use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::loading::{empty_var_store, fill_var_store, read_json};
use crate::weights::{same_names, Checkpoint, Source};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// Every norm in the VAE uses this epsilon (diffusers passes `resnet_eps=1e-6` throughout).
const NORM_EPS: f64 = 1e-6;

/// The fields of a diffusers `AutoencoderKL` `config.json` this implementation reads; defaults
/// are diffusers' constructor defaults.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VaeConfig {
    #[serde(default = "default_rgb")]
    pub in_channels: i64,
    #[serde(default = "default_rgb")]
    pub out_channels: i64,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: i64,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: i64,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// `null` in Stable Diffusion configs: no shift.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
}

fn default_rgb() -> i64 {
    3
}
fn default_block_out_channels() -> Vec<i64> {
    vec![64]
}
fn default_layers_per_block() -> i64 {
    1
}
fn default_latent_channels() -> i64 {
    4
}
fn default_norm_num_groups() -> i64 {
    32
}
fn default_true() -> bool {
    true
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_act_fn() -> String {
    "silu".into()
}

impl VaeConfig {
    /// FLUX.1's VAE (`black-forest-labs/FLUX.1-dev/vae/config.json`), also the configuration of
    /// the BFL `ae.safetensors` file, which carries no config of its own.
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            act_fn: "silu".into(),
            down_block_types: None,
            up_block_types: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config
            .validate()
            .with_context(|| format!("unsupported VAE config {}", path.display()))?;
        Ok(config)
    }

    /// Rejects configurations of other VAE architectures instead of computing nonsense.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.block_out_channels.is_empty(),
            "block_out_channels is empty"
        );
        ensure!(
            self.act_fn == "silu",
            "act_fn {:?} (only silu is implemented)",
            self.act_fn
        );
        for (field, types, expected) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(types) = types {
                ensure!(
                    types.len() == self.block_out_channels.len()
                        && types.iter().all(|t| t == expected),
                    "{field} {types:?} (expected {expected} for each of the {} levels)",
                    self.block_out_channels.len()
                );
            }
        }
        for &channels in &self.block_out_channels {
            ensure!(
                channels % self.norm_num_groups == 0,
                "block_out_channels {:?} not divisible by norm_num_groups {}",
                self.block_out_channels,
                self.norm_num_groups
            );
        }
        Ok(())
    }

    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }

    /// How many times the image side is divided: 8 for FLUX.
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `ResnetBlock2D` without time embedding: GroupNorm-SiLU-Conv twice, plus a 1x1 shortcut when
/// the channel count changes.
#[derive(Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(path: &nn::Path, in_channels: i64, out_channels: i64, groups: i64) -> Self {
        Self {
            norm1: GroupNorm::new(&(path / "norm1"), groups, in_channels, NORM_EPS),
            conv1: Conv2d::new(&(path / "conv1"), in_channels, out_channels, 3, 1, 1),
            norm2: GroupNorm::new(&(path / "norm2"), groups, out_channels, NORM_EPS),
            conv2: Conv2d::new(&(path / "conv2"), out_channels, out_channels, 3, 1, 1),
            conv_shortcut: (in_channels != out_channels).then(|| {
                Conv2d::new(
                    &(path / "conv_shortcut"),
                    in_channels,
                    out_channels,
                    1,
                    1,
                    0,
                )
            }),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let hidden = self.conv1.forward(&self.norm1.forward(xs).silu());
        let hidden = self.conv2.forward(&self.norm2.forward(&hidden).silu());
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(xs) + hidden,
            None => xs + hidden,
        }
    }
}

/// The single-head self-attention of the mid block, over all `H * W` positions, with a residual.
#[derive(Debug)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(path: &nn::Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: GroupNorm::new(&(path / "group_norm"), groups, channels, NORM_EPS),
            to_q: Linear::new(&(path / "to_q"), channels, channels, true),
            to_k: Linear::new(&(path / "to_k"), channels, channels, true),
            to_v: Linear::new(&(path / "to_v"), channels, channels, true),
            to_out: Linear::new(&(path / "to_out" / 0), channels, channels, true),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (batch, channels, height, width) = xs.size4().expect("VAE activations are 4-D");
        // (B, C, H, W) -> (B, 1 head, H*W, C)
        let tokens = self
            .group_norm
            .forward(xs)
            .view([batch, channels, height * width])
            .transpose(1, 2);
        let heads = |linear: &Linear| linear.forward(&tokens).unsqueeze(1);
        let attended = Tensor::scaled_dot_product_attention(
            &heads(&self.to_q),
            &heads(&self.to_k),
            &heads(&self.to_v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .squeeze_dim(1);
        let out = self
            .to_out
            .forward(&attended)
            .transpose(1, 2)
            .reshape([batch, channels, height, width]);
        out + xs
    }
}

/// `UNetMidBlock2D`: resnet, attention (optional), resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<MidAttention>,
}

impl MidBlock {
    fn new(path: &nn::Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        let resnets = path / "resnets";
        Self {
            resnets: [
                ResnetBlock::new(&(&resnets / 0), channels, channels, groups),
                ResnetBlock::new(&(&resnets / 1), channels, channels, groups),
            ],
            attention: add_attention
                .then(|| MidAttention::new(&(path / "attentions" / 0), channels, groups)),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = self.resnets[0].forward(xs);
        if let Some(attention) = &self.attention {
            hidden = attention.forward(&hidden);
        }
        self.resnets[1].forward(&hidden)
    }
}

/// One encoder level: resnets, then (except at the last level) a stride-2 convolution.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden);
        }
        match &self.downsample {
            // Asymmetric padding (right and bottom only), as in the original LDM code.
            Some(conv) => conv.forward(&hidden.constant_pad_nd([0, 1, 0, 1])),
            None => hidden,
        }
    }
}

/// One decoder level: resnets, then (except at the last level) nearest 2x upsampling + conv.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = xs.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden);
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, height, width) = hidden.size4().expect("VAE activations are 4-D");
                conv.forward(&hidden.upsample_nearest2d([height * 2, width * 2], 2.0, 2.0))
            }
            None => hidden,
        }
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(path: &nn::Path, config: &VaeConfig) -> Self {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let levels = channels.len();
        let mut down_blocks = Vec::with_capacity(levels);
        let mut in_channels = channels[0];
        for (level, &out_channels) in channels.iter().enumerate() {
            let block = path / "down_blocks" / level;
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let resnet_in = if j == 0 { in_channels } else { out_channels };
                    ResnetBlock::new(&(&block / "resnets" / j), resnet_in, out_channels, groups)
                })
                .collect();
            let downsample = (level + 1 < levels).then(|| {
                Conv2d::new(
                    &(&block / "downsamplers" / 0 / "conv"),
                    out_channels,
                    out_channels,
                    3,
                    2,
                    0,
                )
            });
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            in_channels = out_channels;
        }
        let top = channels[levels - 1];
        Self {
            conv_in: Conv2d::new(
                &(path / "conv_in"),
                config.in_channels,
                channels[0],
                3,
                1,
                1,
            ),
            down_blocks,
            mid_block: MidBlock::new(
                &(path / "mid_block"),
                top,
                groups,
                config.mid_block_add_attention,
            ),
            conv_norm_out: GroupNorm::new(&(path / "conv_norm_out"), groups, top, NORM_EPS),
            // Mean and log-variance.
            conv_out: Conv2d::new(
                &(path / "conv_out"),
                top,
                2 * config.latent_channels,
                3,
                1,
                1,
            ),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = self.conv_in.forward(xs);
        for block in &self.down_blocks {
            hidden = block.forward(&hidden);
        }
        let hidden = self.mid_block.forward(&hidden);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&hidden).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(path: &nn::Path, config: &VaeConfig) -> Self {
        let reversed: Vec<i64> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let levels = reversed.len();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut in_channels = reversed[0];
        for (level, &out_channels) in reversed.iter().enumerate() {
            let block = path / "up_blocks" / level;
            // The decoder has one resnet more per level than the encoder.
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let resnet_in = if j == 0 { in_channels } else { out_channels };
                    ResnetBlock::new(&(&block / "resnets" / j), resnet_in, out_channels, groups)
                })
                .collect();
            let upsample = (level + 1 < levels).then(|| {
                Conv2d::new(
                    &(&block / "upsamplers" / 0 / "conv"),
                    out_channels,
                    out_channels,
                    3,
                    1,
                    1,
                )
            });
            up_blocks.push(UpBlock { resnets, upsample });
            in_channels = out_channels;
        }
        let bottom = reversed[levels - 1];
        Self {
            conv_in: Conv2d::new(
                &(path / "conv_in"),
                config.latent_channels,
                reversed[0],
                3,
                1,
                1,
            ),
            mid_block: MidBlock::new(
                &(path / "mid_block"),
                reversed[0],
                groups,
                config.mid_block_add_attention,
            ),
            up_blocks,
            conv_norm_out: GroupNorm::new(&(path / "conv_norm_out"), groups, bottom, NORM_EPS),
            conv_out: Conv2d::new(&(path / "conv_out"), bottom, config.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut hidden = self.mid_block.forward(&self.conv_in.forward(xs));
        for block in &self.up_blocks {
            hidden = block.forward(&hidden);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&hidden).silu())
    }
}

/// The VAE, its weights and its configuration.
#[derive(Debug)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    kind: Kind,
    device: Device,
    /// Owns the weights the layers above hold references to.
    _vs: VarStore,
}

impl AutoencoderKl {
    /// Loads a diffusers `vae/` folder (`config.json` + safetensors).
    pub fn load_diffusers_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        Self::load(&checkpoint, config, false, device, kind)
            .with_context(|| format!("loading the VAE from {}", dir.display()))
    }

    /// Loads an original BFL single file (`ae.safetensors`), which has no config: pass
    /// [`VaeConfig::flux`] for the real one.
    pub fn load_bfl_file(
        path: &Path,
        config: VaeConfig,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        config.validate()?;
        let checkpoint = Checkpoint::open_file(path)?;
        Self::load(&checkpoint, config, true, device, kind)
            .with_context(|| format!("loading the BFL VAE file {}", path.display()))
    }

    /// Loads a diffusers folder, or a BFL single file with the FLUX configuration.
    pub fn load_path(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        if path.is_dir() {
            Self::load_diffusers_dir(path, device, kind)
        } else {
            Self::load_bfl_file(path, VaeConfig::flux(), device, kind)
        }
    }

    fn load(
        checkpoint: &Checkpoint,
        config: VaeConfig,
        bfl_layout: bool,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let mut vs = empty_var_store(device, kind);
        let latent = config.latent_channels;
        let (encoder, decoder, quant_conv, post_quant_conv) = {
            let root = vs.root();
            (
                Encoder::new(&(&root / "encoder"), &config),
                Decoder::new(&(&root / "decoder"), &config),
                config
                    .use_quant_conv
                    .then(|| Conv2d::new(&(&root / "quant_conv"), 2 * latent, 2 * latent, 1, 1, 0)),
                config
                    .use_post_quant_conv
                    .then(|| Conv2d::new(&(&root / "post_quant_conv"), latent, latent, 1, 1, 0)),
            )
        };
        if bfl_layout {
            let levels = config.block_out_channels.len();
            let map = |name: &str| Source::whole(bfl_name(name, levels));
            fill_var_store(&mut vs, checkpoint, &map)?;
        } else {
            fill_var_store(&mut vs, checkpoint, &same_names)?;
        }
        Ok(Self {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            config,
            kind,
            device,
            _vs: vs,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The mean of the latent distribution (`encode(sample).latent_dist.mean`) for images in
    /// `[-1, 1]`, shape `(B, 3, H, W)` -> `(B, latent_channels, H / 8, W / 8)`.
    pub fn encode(&self, sample: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.check_input(sample, self.config.in_channels, "sample")?;
        let factor = self.config.downsample_factor();
        let (_, _, height, width) = sample.size4()?;
        if height % factor != 0 || width % factor != 0 {
            bail!("VAE input of {height}x{width} is not a multiple of {factor}");
        }
        let mut moments = self
            .encoder
            .forward(&sample.to_device(self.device).to_kind(self.kind));
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments);
        }
        Ok(moments.narrow(1, 0, self.config.latent_channels))
    }

    /// Decodes `z` (`decode(z).sample`): `(B, latent_channels, h, w)` -> `(B, 3, 8h, 8w)`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.check_input(z, self.config.latent_channels, "z")?;
        let mut z = z.to_device(self.device).to_kind(self.kind);
        if let Some(conv) = &self.post_quant_conv {
            z = conv.forward(&z);
        }
        Ok(self.decoder.forward(&z))
    }

    /// The latents the FLUX transformer works in: `(mean - shift_factor) * scaling_factor`.
    pub fn encode_to_latents(&self, sample: &Tensor) -> Result<Tensor> {
        Ok((self.encode(sample)? - self.config.shift()) * self.config.scaling_factor)
    }

    /// Images from transformer latents: `decode(latents / scaling_factor + shift_factor)`.
    pub fn decode_from_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&(latents / self.config.scaling_factor + self.config.shift()))
    }

    fn check_input(&self, xs: &Tensor, channels: i64, name: &str) -> Result<()> {
        match xs.size().as_slice() {
            [_, c, _, _] if *c == channels => Ok(()),
            other => bail!("VAE input {name} has shape {other:?}, expected (B, {channels}, H, W)"),
        }
    }
}

/// The BFL `ae.safetensors` name of a diffusers VAE variable (the inverse of diffusers'
/// `convert_ldm_vae_checkpoint`). `levels` is the number of resolution levels.
fn bfl_name(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out: Vec<String> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        match (parts[i], parts.get(i + 1), parts.get(i + 2)) {
            ("conv_norm_out", _, _) => out.push("norm_out".into()),
            ("conv_shortcut", _, _) => out.push("nin_shortcut".into()),
            ("mid_block", Some(&"resnets"), Some(index)) => {
                out.push("mid".into());
                out.push(format!(
                    "block_{}",
                    index.parse::<usize>().map_or(0, |n| n + 1)
                ));
                i += 2;
            }
            ("mid_block", Some(&"attentions"), Some(_)) => {
                out.push("mid".into());
                out.push("attn_1".into());
                i += 2;
            }
            ("down_blocks", Some(level), _) => {
                out.push("down".into());
                out.push(level.to_string());
                i += 1;
            }
            ("up_blocks", Some(level), _) => {
                // diffusers numbers decoder levels from the top, BFL from the bottom.
                let level = level
                    .parse::<usize>()
                    .map_or(0, |n| levels.saturating_sub(n + 1));
                out.push("up".into());
                out.push(level.to_string());
                i += 1;
            }
            ("resnets", _, _) => out.push("block".into()),
            ("downsamplers", Some(_), _) => {
                out.push("downsample".into());
                i += 1;
            }
            ("upsamplers", Some(_), _) => {
                out.push("upsample".into());
                i += 1;
            }
            ("group_norm", _, _) => out.push("norm".into()),
            ("to_q", _, _) => out.push("q".into()),
            ("to_k", _, _) => out.push("k".into()),
            ("to_v", _, _) => out.push("v".into()),
            ("to_out", Some(_), _) => {
                out.push("proj_out".into());
                i += 1;
            }
            (part, _, _) => out.push(part.into()),
        }
        i += 1;
    }
    out.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_diffusers_names_to_bfl_names() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                "encoder.down.2.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.weight",
                "encoder.mid.attn_1.norm.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_q.weight",
                "decoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.bias",
                "decoder.mid.attn_1.proj_out.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                "decoder.up.0.block.0.nin_shortcut.bias",
            ),
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
        ];
        for (diffusers, bfl) in cases {
            assert_eq!(bfl_name(diffusers, 4), bfl, "{diffusers}");
        }
    }

    #[test]
    fn flux_config_matches_the_released_one() {
        let config = VaeConfig::flux();
        config.validate().unwrap();
        assert_eq!(config.downsample_factor(), 8);
        let parsed: VaeConfig = serde_json::from_str(
            r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null, "latents_std": null,
                "layers_per_block": 2, "mid_block_add_attention": true, "norm_num_groups": 32, "out_channels": 3,
                "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "use_post_quant_conv": false, "use_quant_conv": false}"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            VaeConfig {
                down_block_types: parsed.down_block_types.clone(),
                up_block_types: parsed.up_block_types.clone(),
                ..config
            }
        );
        parsed.validate().unwrap();
    }

    #[test]
    fn rejects_other_block_types() {
        let config = VaeConfig {
            down_block_types: Some(vec!["CrossAttnDownBlock2D".into(); 4]),
            ..VaeConfig::flux()
        };
        assert!(format!("{:#}", config.validate().unwrap_err()).contains("DownEncoderBlock2D"));
    }
}
