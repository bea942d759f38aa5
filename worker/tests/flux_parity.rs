//! Parity of the FLUX transformer, Masked Shared Attention, warping and the FLUX pipeline with
//! the Python reference (diffusers, and the SynCD reference behaviour re-implemented with its
//! dense additive mask), on the tiny random models of `scripts/fixtures/make_flux_fixtures.py`.
//! CPU, float32.

mod common;

use common::max_abs_diff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use syncd_models::flux::FluxTransformer;
use syncd_models::weights::{read_all, write_all};
use syncd_worker::commands::flux_parity;
use syncd_worker::pipelines::denoise::{
    denoise, CfgPasses, PromptEmbeddings, SamplingPlan, SamplingResult, Sharing, TrueCfg,
};
use syncd_worker::pipelines::sampler::SchedulerConfig;
use syncd_worker::pipelines::warping::Correspondences;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux")
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    read_all(&fixtures().join(name)).unwrap()
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    common::assert_close(what, actual, expected, TOLERANCE);
}

fn output(outputs: &[(String, Tensor)], name: &str) -> Tensor {
    outputs
        .iter()
        .find(|(key, _)| key == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .1
        .shallow_clone()
}

fn check_transformer(model: &str, io: &str) {
    let data = fixture(io);
    let outputs = flux_parity::transformer(&fixtures().join(model), &data, Device::Cpu).unwrap();
    assert_close(
        &format!("{model} on {io}"),
        &output(&outputs, "sample"),
        &data["sample"],
    );
}

#[test]
fn dev_transformer_from_diffusers_folder_matches() {
    check_transformer("tiny-dev", "transformer_dev.safetensors");
}

#[test]
fn dev_transformer_from_bfl_file_matches() {
    check_transformer(
        "tiny-dev-bfl/flux1-tiny.safetensors",
        "transformer_dev.safetensors",
    );
}

#[test]
fn depth_transformer_from_diffusers_folder_matches() {
    check_transformer("tiny-depth", "transformer_depth.safetensors");
}

#[test]
fn depth_transformer_from_bfl_file_matches() {
    check_transformer(
        "tiny-depth-bfl/flux1-tiny.safetensors",
        "transformer_depth.safetensors",
    );
}

fn check_msa(io: &str) {
    let data = fixture(io);
    let outputs = flux_parity::msa(&fixtures().join("tiny-dev"), &data, Device::Cpu).unwrap();
    assert_close(
        &format!("msa {io} sample"),
        &output(&outputs, "sample"),
        &data["sample"],
    );
    assert_close(
        &format!("msa {io} attention_sum"),
        &output(&outputs, "attention_sum"),
        &data["attention_sum"],
    );
}

#[test]
fn masked_shared_attention_matches_dense_mask_reference() {
    check_msa("msa_masked.safetensors");
}

#[test]
fn first_step_shared_attention_is_unmasked_like_the_reference() {
    check_msa("msa_unmasked.safetensors");
}

#[test]
fn shared_attention_changes_the_output() {
    // Guards against a group silently running as independent images.
    let data = fixture("msa_masked.safetensors");
    let plain = flux_parity::transformer(&fixtures().join("tiny-dev"), &data, Device::Cpu).unwrap();
    assert!(max_abs_diff(&output(&plain, "sample"), &data["sample"]) > 1e-3);
}

fn check_warp(io: &str) {
    let data = fixture(io);
    let outputs = flux_parity::warp(Path::new(""), &data, Device::Cpu).unwrap();
    assert_eq!(output(&outputs, "warping_disabled").int64_value(&[]), 0);
    let warped = output(&outputs, "latents");
    assert_close(&format!("warp {io}"), &warped, &data["warped"]);
    assert!(
        max_abs_diff(&warped, &data["latents"]) > 1e-2,
        "warping changed nothing"
    );
}

#[test]
fn warping_matches_reference_before_erosion() {
    check_warp("warp_early.safetensors");
}

#[test]
fn warping_matches_reference_with_erosion() {
    check_warp("warp_eroded.safetensors");
}

#[test]
fn out_of_grid_correspondence_disables_warping() {
    let data = fixture("warp_out_of_range.safetensors");
    let outputs = flux_parity::warp(Path::new(""), &data, Device::Cpu).unwrap();
    assert_eq!(output(&outputs, "warping_disabled").int64_value(&[]), 1);
    assert!(output(&outputs, "latents").equal(&data["latents"]));
}

#[test]
fn misshapen_bfl_weight_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-dev-bfl");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = read_all(&source.join("flux1-tiny.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    for (name, tensor) in &mut tensors {
        if name == "double_blocks.0.img_attn.qkv.weight" {
            *tensor = tensor.narrow(0, 0, 80);
        }
    }
    let file = dir.path().join("flux1-tiny.safetensors");
    write_all(&file, &tensors).unwrap();
    let error = flux_parity::load_transformer(&file, Device::Cpu)
        .err()
        .expect("must fail");
    let message = format!("{error:#}");
    assert!(
        message.contains("double_blocks.0.img_attn.qkv.weight")
            && message.contains("transformer_blocks.0.attn.to_v.weight"),
        "{message}"
    );
}

#[test]
fn truncated_shard_is_rejected_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-dev")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let shard = dir
        .path()
        .join("diffusion_pytorch_model-00002-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let error = flux_parity::load_transformer(dir.path(), Device::Cpu)
        .err()
        .expect("must fail");
    let message = format!("{error:#}");
    assert!(
        message.contains("00002-of-00004") && message.contains("truncated"),
        "{message}"
    );
}

fn transformer(name: &str) -> FluxTransformer {
    FluxTransformer::from_diffusers_dir(&fixtures().join(name), Device::Cpu, Kind::Float).unwrap()
}

fn embeddings(data: &HashMap<String, Tensor>, prefix: &str) -> PromptEmbeddings {
    PromptEmbeddings {
        t5: data[&format!("{prefix}encoder_hidden_states")].shallow_clone(),
        pooled: data[&format!("{prefix}pooled_projections")].shallow_clone(),
    }
}

/// Runs the group loop from the fixture's initial `latents` with FLUX.1-dev's scheduler.
fn denoise_fixture(
    model: &FluxTransformer,
    data: &HashMap<String, Tensor>,
    plan: &SamplingPlan,
) -> SamplingResult {
    denoise(
        model,
        &SchedulerConfig::default(),
        data["latents"].shallow_clone(),
        plan,
    )
    .unwrap()
}

#[test]
fn deformable_group_loop_matches_reference() {
    let data = fixture("group_deformable.safetensors");
    let model = transformer("tiny-dev");
    let spans: Vec<i64> = Vec::try_from(data["spans"].flatten(0, -1)).unwrap();
    let embeddings = embeddings(&data, "");
    let plan = SamplingPlan {
        embeddings: &embeddings,
        negative: None,
        cfg_passes: CfgPasses::Batched,
        steps: data["steps"].int64_value(&[]) as usize,
        guidance: data["guidance"].double_value(&[]),
        control: None,
        sharing: Some(Sharing::FromAttention {
            spans: spans.chunks(2).map(|pair| (pair[0], pair[1])).collect(),
        }),
        warping: None,
        grid: (4, 4),
    };
    let result = denoise_fixture(&model, &data, &plan);
    assert_close(
        "deformable group latents",
        &result.latents,
        &data["latents_out"],
    );
    assert!(result.object_masks.unwrap().equal(&data["object_masks"]));
}

/// The rigid recipe (depth control, true CFG from step 1, masks, warping) with both ways of
/// running the guidance passes.
#[test]
fn rigid_group_loop_matches_reference() {
    let data = fixture("group_rigid.safetensors");
    let model = transformer("tiny-depth");
    let counts: Vec<i64> = Vec::try_from(&data["counts"]).unwrap();
    let correspondences = Correspondences::new(
        data["correspondences"].shallow_clone(),
        counts.try_into().unwrap(),
    )
    .unwrap();
    let positive = embeddings(&data, "");
    let negative = embeddings(&data, "negative_");
    let cfg = TrueCfg {
        negative_prompt: String::new(),
        scale: data["true_cfg_scale"].double_value(&[]),
        from_step: data["cfg_from_step"].int64_value(&[]) as usize,
    };
    for cfg_passes in [CfgPasses::Batched, CfgPasses::Separate] {
        let plan = SamplingPlan {
            embeddings: &positive,
            negative: Some((&negative, &cfg)),
            cfg_passes,
            steps: data["steps"].int64_value(&[]) as usize,
            guidance: data["guidance"].double_value(&[]),
            control: Some(&data["control_latents"]),
            sharing: Some(Sharing::Masks(data["masks"].shallow_clone())),
            warping: Some(&correspondences),
            grid: (4, 4),
        };
        let result = denoise_fixture(&model, &data, &plan);
        assert_close(
            &format!("rigid group latents ({cfg_passes:?} guidance passes)"),
            &result.latents,
            &data["latents_out"],
        );
    }
}

#[test]
fn whole_pipeline_folder_matches_diffusers_flux_pipeline() {
    let data = fixture("pipeline.safetensors");
    let folder = fixtures().join("../tiny-flux-pipeline");
    let outputs = flux_parity::pipeline(&folder, &data, Device::Cpu).unwrap();
    assert_close(
        "pipeline latents",
        &output(&outputs, "latents_out"),
        &data["latents_out"],
    );
    assert_close("pipeline image", &output(&outputs, "image"), &data["image"]);
}

#[test]
fn pipeline_tokenizers_give_the_reference_token_ids() {
    let data = fixture("pipeline.safetensors");
    let pipeline = syncd_worker::pipelines::flux::FluxPipeline::load(
        &fixtures().join("../tiny-flux-pipeline"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let prompts = [
        "a photo of a cat sitting on the ground".to_string(),
        "a red chair in a bright living room".to_string(),
    ];
    let tokens = pipeline.text.tokenize(&prompts).unwrap();
    assert!(tokens.t5.equal(&data["t5_input_ids"]));
    assert!(tokens.clip.equal(&data["clip_input_ids"]));
}
