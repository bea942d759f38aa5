//! The FLUX.1 rectified-flow transformer (diffusers `FluxTransformer2DModel`).
//!
//! Variables are named after the diffusers checkpoint keys; the original BFL single-file layout
//! loads through [`super::bfl_keys`]. [`FluxTransformer::forward`] takes the arguments of the
//! diffusers forward and returns its `sample`; passing a [`GroupAttention`] runs the group with
//! Masked Shared Attention in every block.

use super::attention::Rope;
use super::bfl_keys::BflKeys;
use super::blocks::{DoubleStreamBlock, SingleStreamBlock};
use super::config::{Config, MLP_RATIO, TIMESTEP_EMBEDDING_DIM};
use super::embeddings::{image_ids, rope_tables, timestep_embedding};
use super::layers::{layer_norm_no_affine, modulate, Linear, Mlp};
use super::msa::{GroupAttention, SharedKeys};
use crate::loading::empty_var_store;
use crate::weights::{same_names, Checkpoint};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The diffusers forward arguments. Shapes: `hidden_states` [B, h*w, in_channels],
/// `encoder_hidden_states` [B, T, joint_attention_dim], `pooled_projections`
/// [B, pooled_projection_dim], `timestep` [B] in [0, 1], `guidance` [B] (guidance-distilled
/// models only), `img_ids` [h*w, 3], `txt_ids` [T, 3].
pub struct FluxInputs<'a> {
    pub hidden_states: &'a Tensor,
    pub encoder_hidden_states: &'a Tensor,
    pub pooled_projections: &'a Tensor,
    pub timestep: &'a Tensor,
    pub guidance: Option<&'a Tensor>,
    pub img_ids: &'a Tensor,
    pub txt_ids: &'a Tensor,
}

/// `time_text_embed`: timestep (+ guidance) + pooled text conditioning vector.
struct TimeTextEmbedding {
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
}

pub struct FluxTransformer {
    pub config: Config,
    var_store: VarStore,
    time_text_embed: TimeTextEmbedding,
    context_embedder: Linear,
    x_embedder: Linear,
    transformer_blocks: Vec<DoubleStreamBlock>,
    single_transformer_blocks: Vec<SingleStreamBlock>,
    /// `norm_out.linear`: (scale, shift) of the final adaLN.
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    /// Builds the model with zero weights of `kind` on `device`, ready to load into (or to be
    /// filled with random values for benchmarks).
    pub fn zeros(config: Config, device: Device, kind: Kind) -> Result<Self> {
        config.validate()?;
        let mut var_store = empty_var_store(device, kind);
        let root = var_store.root();
        let dim = config.inner_dim();
        let heads = config.num_attention_heads;
        let head_dim = config.attention_head_dim;
        let mlp_hidden = dim * MLP_RATIO;
        let embed = &root / "time_text_embed";
        let time_text_embed = TimeTextEmbedding {
            timestep_embedder: Mlp::new(&embed / "timestep_embedder", TIMESTEP_EMBEDDING_DIM, dim),
            guidance_embedder: config
                .guidance_embeds
                .then(|| Mlp::new(&embed / "guidance_embedder", TIMESTEP_EMBEDDING_DIM, dim)),
            text_embedder: Mlp::new(&embed / "text_embedder", config.pooled_projection_dim, dim),
        };
        let transformer_blocks = (0..config.num_layers)
            .map(|i| {
                DoubleStreamBlock::new(
                    &root / "transformer_blocks" / i,
                    dim,
                    heads,
                    head_dim,
                    mlp_hidden,
                )
            })
            .collect();
        let single_transformer_blocks = (0..config.num_single_layers)
            .map(|i| {
                SingleStreamBlock::new(
                    &root / "single_transformer_blocks" / i,
                    dim,
                    heads,
                    head_dim,
                    mlp_hidden,
                )
            })
            .collect();
        let context_embedder = Linear::new(
            &(&root / "context_embedder"),
            config.joint_attention_dim,
            dim,
            true,
        );
        let x_embedder = Linear::new(&(&root / "x_embedder"), config.in_channels, dim, true);
        let norm_out = Linear::new(&(&root / "norm_out" / "linear"), dim, 2 * dim, true);
        let proj_out = Linear::new(&(&root / "proj_out"), dim, config.output_channels(), true);
        // Inference only: no gradient bookkeeping on any weight.
        var_store.freeze();
        Ok(Self {
            config,
            var_store,
            time_text_embed,
            context_embedder,
            x_embedder,
            transformer_blocks,
            single_transformer_blocks,
            norm_out,
            proj_out,
        })
    }

    /// Loads a diffusers `transformer/` folder: `config.json` plus (sharded) safetensors.
    pub fn from_diffusers_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        let mut model = Self::zeros(config, device, kind)?;
        model
            .load_weights(&checkpoint)
            .with_context(|| format!("loading FLUX transformer from {}", dir.display()))?;
        Ok(model)
    }

    /// Loads an original BFL single-file checkpoint (`flux1-dev.safetensors`); the file holds no
    /// configuration, so it is given (e.g. [`Config::dev`] or [`Config::depth_dev`]).
    pub fn from_single_file(
        file: &Path,
        config: Config,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open_file(file)?;
        let mut model = Self::zeros(config, device, kind)?;
        model
            .load_weights(&checkpoint)
            .with_context(|| format!("loading FLUX transformer from {}", file.display()))?;
        Ok(model)
    }

    /// Loads either layout: a folder is read as diffusers (`config.json` + safetensors), a file
    /// as a BFL single file, configured by a `config.json` beside it if there is one, else as
    /// FLUX.1-dev or FLUX.1-Depth-dev by the width of its `img_in` weight.
    pub fn load_path(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        if path.is_dir() {
            return Self::from_diffusers_dir(path, device, kind);
        }
        let sibling_config = path.with_file_name("config.json");
        let config = if sibling_config.exists() {
            Config::from_file(&sibling_config)?
        } else {
            let checkpoint = Checkpoint::open_file(path)?;
            let in_channels = checkpoint
                .shape("img_in.weight")
                .and_then(|shape| shape.get(1).copied())
                .with_context(|| {
                    format!(
                        "{} has no img_in.weight: not a BFL FLUX checkpoint",
                        path.display()
                    )
                })?;
            if in_channels == Config::depth_dev().in_channels {
                Config::depth_dev()
            } else {
                Config::dev()
            }
        };
        Self::from_single_file(path, config, device, kind)
    }

    /// Copies the weights in, detecting the layout (diffusers or BFL) from the key names.
    pub fn load_weights(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        match BflKeys::detect(checkpoint, &self.config) {
            Some(keys) => checkpoint.load_into(&mut self.var_store, &|name| keys.source(name)),
            None => checkpoint.load_into(&mut self.var_store, &same_names),
        }
    }

    pub fn var_store(&self) -> &VarStore {
        &self.var_store
    }

    pub fn device(&self) -> Device {
        self.var_store.device()
    }

    pub fn kind(&self) -> Kind {
        self.var_store.kind()
    }

    /// The tokens a group of `group_size` images on a `rows` x `columns` token grid shares in
    /// attention (see [`SharedKeys::new`]), on this model's device.
    pub fn shared_keys(
        &self,
        group_size: i64,
        foreground: Option<&Tensor>,
        (rows, columns): (i64, i64),
    ) -> Result<SharedKeys> {
        let device = self.device();
        let foreground = foreground.map(|mask| mask.to_device(device));
        SharedKeys::new(
            group_size,
            foreground.as_ref(),
            &image_ids(rows, columns, device),
            rows,
            &self.config.axes_dims_rope,
        )
    }

    /// Runs the transformer; with `group`, the batch is whole groups of images, each sharing
    /// attention within itself.
    pub fn forward(&self, inputs: &FluxInputs, group: Option<&GroupAttention>) -> Result<Tensor> {
        self.check_inputs(inputs)?;
        let kind = self.kind();
        let hidden_states = inputs.hidden_states.to_kind(kind);
        let image_len = hidden_states.size()[1];
        let text_len = inputs.encoder_hidden_states.size()[1];
        let pooled = inputs.pooled_projections.to_kind(kind);

        let mut image = self.x_embedder.forward(&hidden_states);
        let temb = self.conditioning(inputs, &pooled)?;
        let mut text = self
            .context_embedder
            .forward(&inputs.encoder_hidden_states.to_kind(kind));

        let ids = Tensor::cat(
            &[
                inputs.txt_ids.to_kind(Kind::Float),
                inputs.img_ids.to_kind(Kind::Float),
            ],
            0,
        );
        let (cos, sin) = rope_tables(&ids, &self.config.axes_dims_rope);
        let rope = Rope { cos, sin };
        if let Some(group) = group {
            group.check(hidden_states.size()[0], text_len)?;
        }
        for block in &self.transformer_blocks {
            (text, image) = block.forward(&image, &text, &temb, &rope, group);
        }
        let mut joint = Tensor::cat(&[text, image], 1);
        for block in &self.single_transformer_blocks {
            joint = block.forward(&joint, text_len, &temb, &rope, group);
        }
        let image = joint.narrow(1, text_len, image_len);

        let [scale, shift]: [Tensor; 2] = self
            .norm_out
            .forward(&temb.silu())
            .chunk(2, 1)
            .try_into()
            .expect("two final modulation chunks");
        let image = modulate(&layer_norm_no_affine(&image), &shift, &scale);
        Ok(self.proj_out.forward(&image))
    }

    /// `time_text_embed(timestep * 1000, guidance * 1000, pooled)`; like diffusers, the times are
    /// first rounded to the model dtype.
    fn conditioning(&self, inputs: &FluxInputs, pooled: &Tensor) -> Result<Tensor> {
        let kind = self.kind();
        let embed = &self.time_text_embed;
        let timestep = inputs.timestep.to_kind(kind) * 1000.0;
        let mut temb = embed
            .timestep_embedder
            .forward(&timestep_embedding(&timestep).to_kind(kind));
        match (&embed.guidance_embedder, inputs.guidance) {
            (Some(embedder), Some(guidance)) => {
                let guidance = guidance.to_kind(kind) * 1000.0;
                temb += embedder.forward(&timestep_embedding(&guidance).to_kind(kind));
            }
            (Some(_), None) => {
                bail!("this FLUX model embeds guidance: the guidance input is required")
            }
            (None, Some(_)) => {
                bail!("this FLUX model has no guidance embedding but guidance was given")
            }
            (None, None) => {}
        }
        Ok(temb + embed.text_embedder.forward(pooled))
    }

    fn check_inputs(&self, inputs: &FluxInputs) -> Result<()> {
        let config = &self.config;
        let hidden = inputs.hidden_states.size();
        let text = inputs.encoder_hidden_states.size();
        let pooled = inputs.pooled_projections.size();
        if hidden.len() != 3 || hidden[2] != config.in_channels {
            bail!(
                "hidden_states has shape {hidden:?}, expected [batch, tokens, {}]",
                config.in_channels
            );
        }
        let batch = hidden[0];
        if text.len() != 3 || text[0] != batch || text[2] != config.joint_attention_dim {
            bail!(
                "encoder_hidden_states has shape {text:?}, expected [{batch}, tokens, {}]",
                config.joint_attention_dim
            );
        }
        if pooled != [batch, config.pooled_projection_dim] {
            bail!(
                "pooled_projections has shape {pooled:?}, expected [{batch}, {}]",
                config.pooled_projection_dim
            );
        }
        if inputs.timestep.size() != [batch] {
            bail!(
                "timestep has shape {:?}, expected [{batch}]",
                inputs.timestep.size()
            );
        }
        if let Some(guidance) = inputs.guidance {
            if guidance.size() != [batch] {
                bail!(
                    "guidance has shape {:?}, expected [{batch}]",
                    guidance.size()
                );
            }
        }
        if inputs.img_ids.size() != [hidden[1], 3] {
            bail!(
                "img_ids has shape {:?}, expected [{}, 3]",
                inputs.img_ids.size(),
                hidden[1]
            );
        }
        if inputs.txt_ids.size() != [text[1], 3] {
            bail!(
                "txt_ids has shape {:?}, expected [{}, 3]",
                inputs.txt_ids.size(),
                text[1]
            );
        }
        Ok(())
    }

    /// Fills every weight with `N(0, std)` in place, on the model's device (benchmarks).
    pub fn randomize(&mut self, std: f64) {
        let _guard = tch::no_grad_guard();
        for (_, mut variable) in self.var_store.variables() {
            let _ = variable.normal_(0.0, std);
        }
    }

    /// The number of weights.
    pub fn parameter_count(&self) -> i64 {
        self.var_store
            .variables()
            .values()
            .map(|tensor| tensor.numel() as i64)
            .sum()
    }
}
