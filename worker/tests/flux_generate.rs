//! The group generation entry point end to end on the tiny random FLUX pipeline folder (the
//! transformers, VAE, text encoders and tokenizers each match diffusers in `flux_parity.rs` and
//! `encoders_parity.rs`): the seed reproduces a group bit for bit, masks come back at image size,
//! the category word is found through the real T5 tokenizer, and inconsistent requests fail with
//! clear errors.

use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};
use syncd_models::weights::read_all;
use syncd_worker::pipelines::denoise::TrueCfg;
use syncd_worker::pipelines::flux::{generate_group, FluxPipeline, GroupRequest, SubjectMasks};
use syncd_worker::pipelines::masks::CategoryWord;
use syncd_worker::pipelines::warping::Correspondences;
use tch::{Device, Kind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny FLUX.1-dev pipeline folder (random weights, real architecture and tokenizers).
fn dev_pipeline() -> FluxPipeline {
    FluxPipeline::load(
        &fixtures().join("tiny-flux-pipeline"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

/// The dev pipeline with the tiny Depth-dev transformer (128 input channels) beside it, sharing
/// text encoders and VAE as a worker holding both models does.
fn dev_and_depth_pipeline() -> FluxPipeline {
    let mut pipeline = dev_pipeline();
    pipeline
        .add_depth_model(
            &fixtures().join("flux/tiny-depth"),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
    pipeline
}

/// A pipeline whose only transformer is Depth-dev.
fn depth_only_pipeline() -> FluxPipeline {
    let mut pipeline = dev_pipeline();
    pipeline.transformer = syncd_models::flux::FluxTransformer::from_diffusers_dir(
        &fixtures().join("flux/tiny-depth"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    pipeline
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
fn each_prompt_is_encoded_once_and_cached_embeddings_equal_fresh_ones() {
    let pipeline = dev_pipeline();
    let prompts: Vec<String> = ["a cat on a mat", "a dog in the snow", "a cat on a mat"]
        .map(String::from)
        .to_vec();
    let fresh = pipeline
        .text
        .encode_tokens(&pipeline.text.tokenize(&prompts).unwrap())
        .unwrap();
    let first = pipeline.text.encode(&prompts).unwrap();
    assert_eq!(
        pipeline.text.cached_prompts(),
        2,
        "the repeated prompt once"
    );
    let gap = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    assert!(gap(&first.t5, &fresh.t5) < 1e-6);
    assert!(gap(&first.pooled, &fresh.pooled) < 1e-6);
    // All from the cache: the very same numbers.
    let again = pipeline.text.encode(&prompts[1..]).unwrap();
    assert_eq!(pipeline.text.cached_prompts(), 2);
    assert!(again.t5.equal(&first.t5.narrow(0, 1, 2)));
    assert!(again.pooled.equal(&first.pooled.narrow(0, 1, 2)));
}

#[test]
fn deformable_groups_regenerate_bit_for_bit_from_their_seed() {
    let pipeline = dev_pipeline();
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
    let fixture = read_all(&fixtures().join("flux/warp_early.safetensors")).unwrap();
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
    let pipeline = dev_and_depth_pipeline();
    let first = generate_group(&pipeline, &rigid(3)).unwrap();
    let again = generate_group(&pipeline, &rigid(3)).unwrap();
    assert!(first.images == again.images);
    assert_eq!(first.masks[0].get_pixel(25, 15).0[0], 255);
    assert_eq!(first.masks[0].get_pixel(5, 5).0[0], 0);
    // The same pipeline runs text-only requests on its dev transformer, as before the depth
    // model was added.
    let deformable_group = generate_group(&pipeline, &deformable(7)).unwrap();
    assert!(
        deformable_group.images
            == generate_group(&dev_pipeline(), &deformable(7))
                .unwrap()
                .images
    );
}

#[test]
fn only_a_depth_controlled_transformer_is_taken_as_the_depth_model() {
    let mut pipeline = dev_pipeline();
    let error = pipeline
        .add_depth_model(&fixtures().join("flux/tiny-dev"), Device::Cpu, Kind::Float)
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("not a depth-controlled"),
        "{error:#}"
    );
    assert!(!pipeline.takes_depth() && pipeline.takes_text_only());
}

#[test]
fn inconsistent_requests_fail_clearly() {
    let dev = dev_pipeline();
    let error = generate_group(&dev, &rigid(3))
        .err()
        .expect("depth on a dev model must fail");
    assert!(
        format!("{error:#}").contains("takes no control latents"),
        "{error:#}"
    );

    let depth = depth_only_pipeline();
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

#[test]
fn the_category_word_is_found_through_the_t5_tokens_in_plurals_any_case_and_pieces() {
    let pipeline = dev_pipeline();
    // (category, prompt, the word the span must spell)
    let cases = [
        ("Cat", "a photo of two cats sitting on the ground", "cats"),
        ("cat", "a Cat in a garden", "Cat"),
        ("Woodpecker", "three woodpeckers on a tree", "woodpeckers"),
    ];
    for (category, prompt, spelled) in cases {
        let offsets = pipeline.text.t5_prompt_offsets(prompt).unwrap();
        let (start, end) = CategoryWord::new(category)
            .token_span(prompt, &offsets)
            .unwrap_or_else(|| panic!("{category} not found in {prompt:?}"));
        let (start, end) = (start as usize, end as usize);
        // The span's tokens cover exactly the word's characters (T5 pieces may carry the space
        // before it).
        let covered = prompt[offsets[start].0..offsets[end - 1].1].trim_start();
        assert_eq!(covered, spelled, "{category} in {prompt:?}: {offsets:?}");
        if spelled != "Cat" {
            assert!(
                end - start >= 2,
                "{spelled} should be several T5 tokens here"
            );
        }
    }
    // Not named at all: no span (the pipeline then warns and uses the fixed span).
    let prompt = "a teapot on a table";
    let offsets = pipeline.text.t5_prompt_offsets(prompt).unwrap();
    assert_eq!(CategoryWord::new("Cat").token_span(prompt, &offsets), None);
    // The end-of-sequence token covers nothing.
    assert_eq!(offsets.last(), Some(&(0, 0)));
}
