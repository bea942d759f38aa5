//! The group generation entry point end to end on the tiny FLUX transformers, with simple
//! deterministic stand-ins for the text encoders and the VAE (their own parity is tested with
//! their models): the seed reproduces a group bit for bit, masks come back at image size, and
//! inconsistent requests fail with clear errors.

use anyhow::Result;
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;
use syncd_worker::models::flux::FluxTransformer;
use syncd_worker::models::weights::read_all;
use syncd_worker::pipelines::denoise::{PromptEmbeddings, TrueCfg};
use syncd_worker::pipelines::flux::{
    generate_group, FluxPipeline, GroupRequest, LatentCodec, PromptTokens, SubjectMasks,
    TextConditioning,
};
use syncd_worker::pipelines::sampler::SchedulerConfig;
use syncd_worker::pipelines::warping::Correspondences;
use tch::{Device, Kind, Tensor};

const TEXT_LEN: i64 = 8;

/// Words -> ids by a fixed hash; ids -> embeddings by a fixed random table.
struct HashedText {
    table: Tensor,
}

fn word_id(word: &str) -> u32 {
    1 + word.bytes().fold(7u32, |hash, byte| {
        hash.wrapping_mul(31).wrapping_add(byte.into())
    }) % 99
}

impl TextConditioning for HashedText {
    fn tokenize(&self, prompts: &[String]) -> Result<PromptTokens> {
        let rows: Vec<Tensor> = prompts
            .iter()
            .map(|prompt| {
                let mut ids: Vec<i64> = self
                    .t5_prompt_ids(prompt)
                    .unwrap()
                    .into_iter()
                    .map(i64::from)
                    .collect();
                ids.resize(TEXT_LEN as usize, 0);
                Tensor::from_slice(&ids)
            })
            .collect();
        let ids = Tensor::stack(&rows, 0);
        Ok(PromptTokens {
            t5: ids.shallow_clone(),
            clip: ids,
        })
    }

    fn encode_tokens(&self, tokens: &PromptTokens) -> Result<PromptEmbeddings> {
        let t5 = self
            .table
            .index_select(0, &tokens.t5.flatten(0, -1))
            .reshape([-1, TEXT_LEN, 32]);
        let pooled = t5.mean_dim(1, false, Kind::Float);
        Ok(PromptEmbeddings { t5, pooled })
    }

    fn t5_word_ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.split_whitespace().map(word_id).collect())
    }

    fn t5_prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.t5_word_ids(prompt)?;
        ids.truncate(TEXT_LEN as usize);
        Ok(ids)
    }
}

/// 8x average pooling into 16 channels and back.
struct PoolingCodec;

impl LatentCodec for PoolingCodec {
    fn downscale(&self) -> i64 {
        8
    }

    fn encode_to_latents(&self, images: &Tensor) -> Result<Tensor> {
        let pooled = images.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None::<i64>);
        Ok(pooled.repeat([1, 6, 1, 1]).narrow(1, 0, 16))
    }

    fn decode_from_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let size = latents.size();
        Ok(latents
            .narrow(1, 0, 3)
            .upsample_nearest2d([size[2] * 8, size[3] * 8], None, None)
            .tanh())
    }
}

fn pipeline(transformer: &str) -> FluxPipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flux")
        .join(transformer);
    let transformer = FluxTransformer::from_diffusers_dir(&dir, Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(0);
    FluxPipeline {
        transformer,
        text: Box::new(HashedText {
            table: Tensor::randn([100, 32], (Kind::Float, Device::Cpu)),
        }),
        vae: Box::new(PoolingCodec),
        scheduler: SchedulerConfig::default(),
    }
}

fn deformable(seed: u64) -> GroupRequest {
    GroupRequest {
        prompts: vec![
            "a cat sitting on the ground".into(),
            "a photo of a Cat in a garden".into(),
            "the cat plays with a ball".into(),
        ],
        depth: None,
        masks: SubjectMasks::FromAttention {
            category: "cat".into(),
        },
        correspondences: None,
        seed,
        width: 64,
        height: 64,
        steps: 3,
        guidance: 3.5,
        true_cfg: None,
    }
}

#[test]
fn deformable_groups_regenerate_bit_for_bit_from_their_seed() {
    let pipeline = pipeline("tiny-dev");
    let first = generate_group(&pipeline, &deformable(7)).unwrap();
    let again = generate_group(&pipeline, &deformable(7)).unwrap();
    let other = generate_group(&pipeline, &deformable(8)).unwrap();
    assert_eq!((first.images.len(), first.masks.len()), (3, 3));
    assert_eq!(first.images[0].dimensions(), (64, 64));
    assert_eq!(first.masks[0].dimensions(), (64, 64));
    assert!(first.images == again.images && first.masks == again.masks);
    assert!(first.images != other.images);
    assert!(first.masks.iter().all(|mask| mask
        .pixels()
        .all(|pixel| pixel.0[0] == 0 || pixel.0[0] == 255)));
}

fn rigid(seed: u64) -> GroupRequest {
    let fixture = read_all(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux/warp_early.safetensors"),
    )
    .unwrap();
    let counts: Vec<i64> = Vec::try_from(&fixture["counts"]).unwrap();
    let mut alpha = GrayImage::new(64, 64);
    for y in 10..40 {
        for x in 20..50 {
            alpha.put_pixel(x, y, Luma([200]));
        }
    }
    let depth = RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    GroupRequest {
        prompts: vec![
            "a red chair".into(),
            "a red chair in a room".into(),
            "a red chair outside".into(),
        ],
        depth: Some(vec![depth; 3]),
        masks: SubjectMasks::Given(vec![alpha; 3]),
        correspondences: Some(
            Correspondences::new(
                fixture["correspondences"].shallow_clone(),
                counts.try_into().unwrap(),
            )
            .unwrap(),
        ),
        seed,
        width: 64,
        height: 64,
        steps: 3,
        guidance: 10.0,
        true_cfg: Some(TrueCfg {
            negative_prompt: "3d render, cartoon, low resolution, illustration, blurry".into(),
            scale: 2.5,
            from_step: 1,
        }),
    }
}

#[test]
fn rigid_groups_with_depth_masks_warping_and_cfg_are_reproducible() {
    let pipeline = pipeline("tiny-depth");
    let first = generate_group(&pipeline, &rigid(3)).unwrap();
    let again = generate_group(&pipeline, &rigid(3)).unwrap();
    assert!(first.images == again.images);
    assert_eq!(first.masks[0].get_pixel(25, 15).0[0], 255);
    assert_eq!(first.masks[0].get_pixel(5, 5).0[0], 0);
}

#[test]
fn inconsistent_requests_fail_clearly() {
    let dev = pipeline("tiny-dev");
    let error = generate_group(&dev, &rigid(3))
        .err()
        .expect("depth on a dev model must fail");
    assert!(
        format!("{error:#}").contains("takes no control latents"),
        "{error:#}"
    );

    let depth = pipeline("tiny-depth");
    let error = generate_group(&depth, &deformable(1))
        .err()
        .expect("a depth model needs depth");
    assert!(
        format!("{error:#}").contains("needs depth control images"),
        "{error:#}"
    );

    let mut odd = deformable(1);
    odd.width = 60;
    let error = generate_group(&dev, &odd)
        .err()
        .expect("size must be a multiple of 16");
    assert!(format!("{error:#}").contains("multiple of 16"), "{error:#}");
}
