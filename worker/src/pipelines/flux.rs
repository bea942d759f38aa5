//! FLUX generation of image groups: text (and depth) conditioning, the flow-matching loop with
//! embedded guidance, optional true classifier-free guidance, Masked Shared Attention with given
//! or attention-derived masks, depth-based warping, and decoding.
//!
//! [`generate_group`] is what the worker's generation job calls; the denoising loop itself is
//! [`super::denoise`].

use super::denoise::{denoise, CfgPasses, PromptEmbeddings, SamplingPlan, Sharing, TrueCfg};
use super::folder::{FluxPipelineFolder, T5_MAX_LENGTH};
use super::masks::{rigid_token_masks, CategoryWord, FALLBACK_WORD_SPAN};
use super::noise::NoiseSource;
use super::sampler::{pack_latents, unpack_latents, SchedulerConfig};
use super::warping::Correspondences;
use anyhow::{bail, ensure, Context, Result};
use image::{GrayImage, RgbImage};
use std::path::Path;
use syncd_models::clip_text::ClipTextModel;
use syncd_models::flux::FluxTransformer;
use syncd_models::t5::T5Encoder;
use syncd_models::tokenizer::PromptTokenizer;
use syncd_models::vae::AutoencoderKl;
use tch::{Device, Kind, Tensor};

/// Token ids of a batch of prompts for both text encoders.
pub struct PromptTokens {
    /// [B, max_sequence_length] int64, padded.
    pub t5: Tensor,
    /// [B, 77] int64, padded.
    pub clip: Tensor,
}

/// A loaded FLUX pipeline.
pub struct FluxPipeline {
    /// FLUX.1-dev (text-to-image) or, in a Depth-dev-only pipeline, FLUX.1-Depth-dev.
    pub transformer: FluxTransformer,
    pub scheduler: SchedulerConfig,
    /// FLUX.1-Depth-dev beside FLUX.1-dev: the two share text encoders and VAE, so one pipeline
    /// holds both transformers and keeps one copy of the rest (T5-XXL alone is 9.5 GB in bf16).
    /// Requests with depth images run on it.
    pub depth_model: Option<DepthModel>,
    pub text: FluxTextEncoders,
    /// The 16-channel AutoencoderKL, used in the scaled latents the transformer works in.
    pub vae: AutoencoderKl,
}

/// A depth-controlled transformer with the scheduler settings of its own pipeline.
pub struct DepthModel {
    pub transformer: FluxTransformer,
    pub scheduler: SchedulerConfig,
}

impl FluxPipeline {
    /// Loads a diffusers FLUX pipeline folder (`FLUX.1-dev` or `FLUX.1-Depth-dev`, or a Hugging
    /// Face cache repository of one) with every model in `kind` on `device`.
    pub fn load(folder: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with_text(folder, device, kind, TextEncoderPlacement::on(device))
    }

    /// [`Self::load`] with the text encoders where `text` says (the CPU, to save GPU memory).
    pub fn load_with_text(
        folder: &Path,
        device: Device,
        kind: Kind,
        text: TextEncoderPlacement,
    ) -> Result<Self> {
        let folder = FluxPipelineFolder::open(folder)?;
        let transformer =
            FluxTransformer::from_diffusers_dir(&folder.transformer_dir, device, kind)?;
        let text = FluxTextEncoders::load(&folder, text, device, kind)?;
        let vae = folder.load_vae(device, kind)?;
        Ok(Self {
            transformer,
            scheduler: folder.scheduler,
            depth_model: None,
            text,
            vae,
        })
    }

    /// Adds FLUX.1-Depth-dev for requests with depth images. `path` is its whole pipeline folder
    /// (its transformer and scheduler are used), its diffusers `transformer/` folder, or its BFL
    /// single file (both keep this pipeline's scheduler).
    pub fn add_depth_model(&mut self, path: &Path, device: Device, kind: Kind) -> Result<()> {
        let (transformer, scheduler) = if path.join("model_index.json").exists() {
            let folder = FluxPipelineFolder::open(path)?;
            (
                FluxTransformer::from_diffusers_dir(&folder.transformer_dir, device, kind)?,
                folder.scheduler,
            )
        } else {
            (
                FluxTransformer::load_path(path, device, kind)?,
                self.scheduler.clone(),
            )
        };
        ensure!(
            transformer.config.takes_control_latents(),
            "{} is not a depth-controlled FLUX transformer ({} input channels)",
            path.display(),
            transformer.config.in_channels
        );
        self.depth_model = Some(DepthModel {
            transformer,
            scheduler,
        });
        Ok(())
    }

    /// Whether requests with depth images can run (a Depth-dev transformer is loaded).
    pub fn takes_depth(&self) -> bool {
        self.depth_model.is_some() || self.transformer.config.takes_control_latents()
    }

    /// Whether requests without depth images can run (the main transformer is not Depth-dev).
    pub fn takes_text_only(&self) -> bool {
        !self.transformer.config.takes_control_latents()
    }

    /// The transformer and scheduler a request runs on: the depth model for requests with depth
    /// images when there is one, the main transformer otherwise.
    fn denoiser(&self, with_depth: bool) -> (&FluxTransformer, &SchedulerConfig) {
        match (&self.depth_model, with_depth) {
            (Some(depth), true) => (&depth.transformer, &depth.scheduler),
            _ => (&self.transformer, &self.scheduler),
        }
    }

    /// Plain text-to-image from given packed initial latents, as diffusers' `FluxPipeline` runs
    /// it (no sharing, no control): returns the final packed latents and the images
    /// [B, 3, H, W] in [0, 1]. The `flux-pipeline` parity arm runs this.
    pub fn text_to_image(
        &self,
        tokens: &PromptTokens,
        latents: Tensor,
        steps: usize,
        guidance: f64,
        height: i64,
        width: i64,
    ) -> Result<(Tensor, Tensor)> {
        let _guard = tch::no_grad_guard();
        let downscale = self.vae.config().downsample_factor();
        let grid = (height / (downscale * 2), width / (downscale * 2));
        let embeddings = self.text.encode_tokens(tokens)?;
        let plan = SamplingPlan {
            embeddings: &embeddings,
            negative: None,
            cfg_passes: CfgPasses::Batched,
            steps,
            guidance,
            control: None,
            sharing: None,
            warping: None,
            grid,
        };
        let latents = latents
            .to_device(self.device())
            .to_kind(self.transformer.kind());
        let result = denoise(&self.transformer, &self.scheduler, latents, &plan)?;
        let images = self.decode(&result.latents, height, width)?;
        Ok((result.latents, images))
    }
}

/// Where FLUX's text encoders run, and how many prompts' embeddings they keep.
#[derive(Clone, Copy, Debug)]
pub struct TextEncoderPlacement {
    /// The CPU keeps T5-XXL and CLIP (about 10 GB in bf16) off the GPU; a prompt then takes
    /// seconds of CPU time instead of milliseconds of GPU time.
    pub device: Device,
    /// Prompts whose embeddings are kept. T5's are 512 tokens x 4096 (4 MiB in bf16) each.
    pub cache_entries: usize,
}

impl TextEncoderPlacement {
    /// Beside the transformer, with a cache that always holds a run's negative prompt and a
    /// group's own prompts.
    pub fn on(device: Device) -> Self {
        Self {
            device,
            cache_entries: 64,
        }
    }
}

/// The embeddings of one prompt: T5's [1, T, D] and CLIP's pooled [1, D].
type CachedPrompt = (Tensor, Tensor);

/// FLUX's two text encoders with their tokenizers: T5 gives the token embeddings, CLIP-L the
/// pooled embedding.
///
/// Each prompt is encoded once: embeddings are cached by prompt text (least recently used
/// evicted), so the negative prompt of true CFG, the same for every group of a run, costs one
/// encoding per worker rather than three per group.
pub struct FluxTextEncoders {
    t5: T5Encoder,
    clip: ClipTextModel,
    t5_tokenizer: PromptTokenizer,
    clip_tokenizer: PromptTokenizer,
    /// Where the embeddings go: the transformer's device.
    output: Device,
    cache: parking_lot::Mutex<lru::LruCache<String, CachedPrompt>>,
}

impl FluxTextEncoders {
    pub fn load(
        folder: &FluxPipelineFolder,
        placement: TextEncoderPlacement,
        output: Device,
        kind: Kind,
    ) -> Result<Self> {
        let capacity = std::num::NonZeroUsize::new(placement.cache_entries.max(1))
            .expect("at least one entry");
        Ok(Self {
            t5: folder.load_t5(placement.device, kind)?,
            clip: folder.load_clip_text(placement.device, kind)?,
            t5_tokenizer: folder.t5_tokenizer(T5_MAX_LENGTH)?,
            clip_tokenizer: folder.clip_tokenizer()?,
            output,
            cache: parking_lot::Mutex::new(lru::LruCache::new(capacity)),
        })
    }

    /// The prompts' token ids, padded as FLUX pads them.
    pub fn tokenize(&self, prompts: &[String]) -> Result<PromptTokens> {
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        Ok(PromptTokens {
            t5: self
                .t5_tokenizer
                .encode_to_tensor(&prompts, self.t5.device())?,
            clip: self
                .clip_tokenizer
                .encode_to_tensor(&prompts, self.t5.device())?,
        })
    }

    /// diffusers' `encode_prompt`: T5 without an attention mask (FLUX attends to the padding
    /// too), CLIP's pooled output.
    pub fn encode_tokens(&self, tokens: &PromptTokens) -> Result<PromptEmbeddings> {
        Ok(PromptEmbeddings {
            t5: self.t5.forward(&tokens.t5, None)?.to_device(self.output),
            pooled: self
                .clip
                .forward(&tokens.clip)?
                .pooler_output
                .to_device(self.output),
        })
    }

    /// The prompts' embeddings on the transformer's device, encoding (in one batch) only the
    /// prompts not in the cache. T5 runs without an attention mask, so a prompt's embedding does
    /// not depend on the others in its batch.
    pub fn encode(&self, prompts: &[String]) -> Result<PromptEmbeddings> {
        let mut cache = self.cache.lock();
        let mut missing: Vec<String> = Vec::new();
        for prompt in prompts {
            if !cache.contains(prompt) && !missing.contains(prompt) {
                missing.push(prompt.clone());
            }
        }
        let mut encoded = Vec::with_capacity(missing.len());
        if !missing.is_empty() {
            let fresh = self.encode_tokens(&self.tokenize(&missing)?)?;
            for (row, prompt) in missing.iter().enumerate() {
                let row = row as i64;
                let entry = (
                    fresh.t5.narrow(0, row, 1).to_device(self.output),
                    fresh.pooled.narrow(0, row, 1).to_device(self.output),
                );
                encoded.push((prompt.clone(), entry));
            }
        }
        // Looked up (or just encoded) before any insertion can evict one of this batch's own.
        let rows: Vec<CachedPrompt> = prompts
            .iter()
            .map(|prompt| {
                let (t5, pooled) = match encoded.iter().find(|(fresh, _)| fresh == prompt) {
                    Some((_, entry)) => entry,
                    None => cache.get(prompt).expect("present: it was not missing"),
                };
                (t5.shallow_clone(), pooled.shallow_clone())
            })
            .collect();
        for (prompt, entry) in encoded {
            cache.put(prompt, entry);
        }
        let (t5, pooled): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().unzip();
        Ok(PromptEmbeddings {
            t5: Tensor::cat(&t5, 0),
            pooled: Tensor::cat(&pooled, 0),
        })
    }

    /// How many prompts' embeddings are cached.
    pub fn cached_prompts(&self) -> usize {
        self.cache.lock().len()
    }

    /// The byte range of `prompt` that each T5 token the model sees covers (to find a word's
    /// tokens in); special tokens cover none.
    pub fn t5_prompt_offsets(&self, prompt: &str) -> Result<Vec<(usize, usize)>> {
        self.t5_tokenizer.prompt_offsets(prompt)
    }
}

/// Where Masked Shared Attention takes its foreground masks from.
pub enum SubjectMasks {
    /// Rigid objects: one render alpha per image at image resolution (non-zero = object).
    Given(Vec<GrayImage>),
    /// Deformable objects: the model's attention to this category word (e.g. "Cat").
    FromAttention { category: String },
}

/// One group to generate: N images of the same object.
pub struct GroupRequest {
    /// One prompt per image.
    pub prompts: Vec<String>,
    /// Depth control images (Depth-dev only), one per image at the output size, already
    /// preprocessed (inverse depth, min-max normalised, three channels).
    pub depth: Option<Vec<RgbImage>>,
    pub masks: SubjectMasks,
    /// Pixel correspondences for depth-based warping (groups of 3, rigid only).
    pub correspondences: Option<Correspondences>,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    /// Embedded guidance scale (3.5 deformable, 10 rigid).
    pub guidance: f64,
    pub true_cfg: Option<TrueCfg>,
}

/// The generated images and the object masks at image resolution (0 or 255): the given alpha
/// for rigid objects, the final attention-derived (Otsu) mask for deformable ones.
pub struct GroupImages {
    pub images: Vec<RgbImage>,
    pub masks: Vec<GrayImage>,
}

impl FluxPipeline {
    fn device(&self) -> Device {
        self.transformer.device()
    }

    /// Packed latents -> images [B, 3, H, W] in [0, 1] (diffusers' `output_type="pt"`).
    pub fn decode(&self, latents: &Tensor, height: i64, width: i64) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let downscale = self.vae.config().downsample_factor();
        let latent_h = 2 * (height / (downscale * 2));
        let latent_w = 2 * (width / (downscale * 2));
        let images = one_image_at_a_time(&unpack_latents(latents, latent_h, latent_w), |one| {
            self.vae.decode_from_latents(one)
        })?;
        Ok((images / 2.0 + 0.5).clamp(0.0, 1.0))
    }

    /// Depth control images -> packed control latents [N, h*w, 64]. diffusers' Depth pipeline
    /// samples the VAE posterior; its spread is negligible for the FLUX VAE and the mean keeps
    /// the control deterministic.
    fn control_latents(&self, depth: &[RgbImage], kind: Kind) -> Result<Tensor> {
        let images = Tensor::stack(&depth.iter().map(rgb_to_tensor).collect::<Vec<_>>(), 0)
            .to_device(self.device());
        let latents =
            one_image_at_a_time(&(images * 2.0 - 1.0), |one| self.vae.encode_to_latents(one))?;
        Ok(pack_latents(&latents).to_kind(kind))
    }
}

/// The VAE over a batch, one image at a time ("slicing"): at 1024x1024 its activations are
/// gigabytes per image, and a GPU gains nothing from decoding three at once.
fn one_image_at_a_time(batch: &Tensor, run: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let parts = batch
        .split(1, 0)
        .iter()
        .map(run)
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0))
}

/// An RGB image -> [3, H, W] float32 in [0, 1].
fn rgb_to_tensor(image: &RgbImage) -> Tensor {
    let (width, height) = image.dimensions();
    Tensor::from_slice(image.as_raw())
        .reshape([height as i64, width as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0
}

/// [3, H, W] in [0, 1] -> an RGB image (rounded like diffusers' `numpy_to_pil`).
fn tensor_to_rgb(image: &Tensor) -> Result<RgbImage> {
    let size = image.size();
    let bytes: Vec<u8> = Vec::try_from(
        (image.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous()
            .flatten(0, -1),
    )?;
    RgbImage::from_raw(size[2] as u32, size[1] as u32, bytes).context("image buffer size")
}

/// Token masks [N, h*w] -> grey images at `width` x `height` (nearest, 0 or 255).
fn token_masks_to_images(
    masks: &Tensor,
    grid: (i64, i64),
    width: u32,
    height: u32,
) -> Result<Vec<GrayImage>> {
    let count = masks.size()[0];
    let upsampled = masks
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .reshape([count, 1, grid.0, grid.1])
        .upsample_nearest2d([height as i64, width as i64], None, None)
        .gt(0.5)
        .to_kind(Kind::Uint8)
        * 255;
    (0..count)
        .map(|image| {
            let bytes: Vec<u8> = Vec::try_from(upsampled.get(image).flatten(0, -1))?;
            GrayImage::from_raw(width, height, bytes).context("mask buffer size")
        })
        .collect()
}

/// Generates one group of images that show the same object (SynCD stage C).
pub fn generate_group(pipeline: &FluxPipeline, request: &GroupRequest) -> Result<GroupImages> {
    let _guard = tch::no_grad_guard();
    let count = request.prompts.len();
    ensure!(count >= 2, "a group needs at least 2 prompts, got {count}");
    ensure!(
        request.width.is_multiple_of(16)
            && request.height.is_multiple_of(16)
            && request.width > 0
            && request.height > 0,
        "image size {}x{} must be a positive multiple of 16",
        request.width,
        request.height
    );
    let device = pipeline.device();
    let (transformer, scheduler) = pipeline.denoiser(request.depth.is_some());
    let kind = transformer.kind();
    let config = &transformer.config;
    let downscale = pipeline.vae.config().downsample_factor();
    let grid = (
        request.height as i64 / (downscale * 2),
        request.width as i64 / (downscale * 2),
    );

    let embeddings = pipeline
        .text
        .encode(&request.prompts)
        .context("encoding the prompts")?;
    let negative = match &request.true_cfg {
        Some(cfg) => Some(
            pipeline
                .text
                .encode(&vec![cfg.negative_prompt.clone(); count])
                .context("encoding the negative prompt")?,
        ),
        None => None,
    };

    let mut noise = NoiseSource::new(request.seed);
    let latent_shape = [
        count as i64,
        config.latent_channels(),
        2 * grid.0,
        2 * grid.1,
    ];
    let latents = pack_latents(&noise.sample(&latent_shape, device, kind)?);

    let control = match (&request.depth, config.takes_control_latents()) {
        (Some(depth), true) => {
            ensure!(
                depth.len() == count,
                "{} depth images for {count} prompts",
                depth.len()
            );
            for image in depth {
                ensure!(
                    image.dimensions() == (request.width, request.height),
                    "depth image is {:?}, the output size is {}x{}",
                    image.dimensions(),
                    request.width,
                    request.height
                );
            }
            Some(pipeline.control_latents(depth, kind)?)
        }
        (None, false) => None,
        (Some(_), false) => {
            bail!("depth images given, but the transformer takes no control latents")
        }
        (None, true) => bail!("this transformer (Depth-dev) needs depth control images"),
    };

    let (sharing, given_masks) = match &request.masks {
        SubjectMasks::Given(alphas) => {
            ensure!(
                alphas.len() == count,
                "{} masks for {count} prompts",
                alphas.len()
            );
            let mut planes = Vec::with_capacity(count);
            for alpha in alphas {
                ensure!(
                    alpha.dimensions() == (request.width, request.height),
                    "mask is {:?}, the output size is {}x{}",
                    alpha.dimensions(),
                    request.width,
                    request.height
                );
                planes.push(
                    Tensor::from_slice(alpha.as_raw())
                        .reshape([request.height as i64, request.width as i64]),
                );
            }
            let masks = rigid_token_masks(&Tensor::stack(&planes, 0), grid.0, grid.1)?;
            let images = alphas
                .iter()
                .map(|alpha| {
                    let mut binary = alpha.clone();
                    binary
                        .pixels_mut()
                        .for_each(|pixel| pixel.0[0] = if pixel.0[0] > 0 { 255 } else { 0 });
                    binary
                })
                .collect();
            (Sharing::Masks(masks.to_device(device)), Some(images))
        }
        SubjectMasks::FromAttention { category } => {
            let word = CategoryWord::new(category);
            let spans = request
                .prompts
                .iter()
                .map(|prompt| {
                    let offsets = pipeline.text.t5_prompt_offsets(prompt)?;
                    Ok(word.token_span(prompt, &offsets).unwrap_or_else(|| {
                        tracing::warn!(
                            category,
                            prompt,
                            "the category word is not in the prompt's T5 tokens: this image's \
                             masks come from the fixed token span [2, 3)"
                        );
                        FALLBACK_WORD_SPAN
                    }))
                })
                .collect::<Result<Vec<_>>>()?;
            (Sharing::FromAttention { spans }, None)
        }
    };

    let plan = SamplingPlan {
        embeddings: &embeddings,
        negative: negative.as_ref().zip(request.true_cfg.as_ref()),
        cfg_passes: CfgPasses::Batched,
        steps: request.steps,
        guidance: request.guidance,
        control: control.as_ref(),
        sharing: Some(sharing),
        warping: request.correspondences.as_ref(),
        grid,
    };
    let result = denoise(transformer, scheduler, latents, &plan)?;
    let images = pipeline.decode(&result.latents, request.height as i64, request.width as i64)?;
    let images = (0..count as i64)
        .map(|image| tensor_to_rgb(&images.get(image)))
        .collect::<Result<Vec<_>>>()?;
    let masks = match (given_masks, result.object_masks) {
        (Some(masks), _) => masks,
        (None, Some(object)) => {
            token_masks_to_images(&object, grid, request.width, request.height)?
        }
        (None, None) => bail!("no masks were derived (no sampling step ran)"),
    };
    Ok(GroupImages { images, masks })
}
