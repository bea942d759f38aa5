//! Parity of FLUX's VAE and text encoders (and their tokenizers) with the reference Python
//! implementations, on the tiny random models and reference outputs that
//! `scripts/fixtures/make_encoder_fixtures.py` wrote under `tests/fixtures/`: CPU, fp32,
//! max abs error within 1e-4. Also: both VAE checkpoint layouts, the legacy CLIP layout, bf16
//! loading, the pipeline folder, the `parity` command, and clear errors on bad weight files.

mod common;

use common::assert_close;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use syncd_models::clip_text::ClipTextModel;
use syncd_models::t5::T5Encoder;
use syncd_models::tokenizer::PromptTokenizer;
use syncd_models::vae::{AutoencoderKl, VaeConfig};
use syncd_models::weights::read_all;
use syncd_worker::pipelines::folder::{FluxPipelineFolder, T5_MAX_LENGTH};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

fn pipeline_dir() -> PathBuf {
    fixtures().join("tiny-flux-pipeline")
}

fn encoders_dir() -> PathBuf {
    fixtures().join("encoders")
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    read_all(&encoders_dir().join(name)).unwrap()
}

fn tiny_vae_config() -> VaeConfig {
    VaeConfig::from_file(&pipeline_dir().join("vae").join("config.json")).unwrap()
}

// --- VAE --------------------------------------------------------------------------------

fn check_vae(vae: &AutoencoderKl, layout: &str) {
    let encode_inputs = tensors("vae_encode_inputs.safetensors");
    let encode_outputs = tensors("vae_encode_outputs.safetensors");
    let sample = &encode_inputs["sample"];
    let mean = vae.encode(sample).unwrap();
    assert_close(
        &format!("vae encode ({layout})"),
        &mean,
        &encode_outputs["latent_dist_mean"],
        TOLERANCE,
    );
    let latents = vae.encode_to_latents(sample).unwrap();
    assert_close(
        &format!("vae encode_to_latents ({layout})"),
        &latents,
        &encode_outputs["latents"],
        TOLERANCE,
    );

    let decode_inputs = tensors("vae_decode_inputs.safetensors");
    let decode_outputs = tensors("vae_decode_outputs.safetensors");
    let z = &decode_inputs["z"];
    let decoded = vae.decode(z).unwrap();
    assert_close(
        &format!("vae decode ({layout})"),
        &decoded,
        &decode_outputs["sample"],
        TOLERANCE,
    );
    let from_latents = vae.decode_from_latents(z).unwrap();
    assert_close(
        &format!("vae decode_from_latents ({layout})"),
        &from_latents,
        &decode_outputs["from_latents"],
        TOLERANCE,
    );
}

#[test]
fn vae_from_the_diffusers_folder_matches_diffusers() {
    let vae =
        AutoencoderKl::load_diffusers_dir(&pipeline_dir().join("vae"), Device::Cpu, Kind::Float)
            .unwrap();
    assert_eq!(vae.config().scaling_factor, 0.3611);
    assert_eq!(vae.config().shift(), 0.1159);
    check_vae(&vae, "diffusers folder");
}

#[test]
fn vae_from_the_bfl_single_file_matches_diffusers() {
    let vae = AutoencoderKl::load_bfl_file(
        &encoders_dir().join("ae.safetensors"),
        tiny_vae_config(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    check_vae(&vae, "BFL single file");
}

#[test]
fn vae_rejects_inputs_of_the_wrong_shape() {
    let vae =
        AutoencoderKl::load_diffusers_dir(&pipeline_dir().join("vae"), Device::Cpu, Kind::Float)
            .unwrap();
    let error = vae
        .encode(&Tensor::zeros([1, 3, 20, 24], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("not a multiple of 8"),
        "{error:#}"
    );
    let error = vae
        .decode(&Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("expected (B, 16, H, W)"),
        "{error:#}"
    );
}

// --- T5 ---------------------------------------------------------------------------------

#[test]
fn t5_matches_transformers_on_padded_prompts() {
    let t5 = T5Encoder::load_dir(
        &pipeline_dir().join("text_encoder_2"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let inputs = tensors("t5_inputs.safetensors");
    let expected = tensors("t5_outputs.safetensors");
    assert_eq!(inputs["input_ids"].size(), [6, 512]);
    let hidden = t5.forward(&inputs["input_ids"], None).unwrap();
    assert_close(
        "t5 (512 tokens, no mask)",
        &hidden,
        &expected["last_hidden_state"],
        TOLERANCE,
    );
}

#[test]
fn t5_matches_transformers_with_an_attention_mask() {
    let t5 = T5Encoder::load_dir(
        &pipeline_dir().join("text_encoder_2"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let inputs = tensors("t5_masked_inputs.safetensors");
    let expected = tensors("t5_masked_outputs.safetensors");
    let hidden = t5
        .forward(&inputs["input_ids"], Some(&inputs["attention_mask"]))
        .unwrap();
    assert_close(
        "t5 (16 tokens, masked)",
        &hidden,
        &expected["last_hidden_state"],
        TOLERANCE,
    );
}

#[test]
fn t5_rejects_ids_outside_the_vocabulary() {
    let t5 = T5Encoder::load_dir(
        &pipeline_dir().join("text_encoder_2"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let error = t5
        .forward(&Tensor::from_slice(&[5i64, 100_000]).view([1, 2]), None)
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("outside the vocabulary"),
        "{error:#}"
    );
}

// --- CLIP -------------------------------------------------------------------------------

#[test]
fn clip_text_matches_transformers_with_argmax_pooling() {
    let clip = ClipTextModel::load_dir(
        &pipeline_dir().join("text_encoder"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(clip.config().eos_token_id, 2);
    let inputs = tensors("clip_text_inputs.safetensors");
    let expected = tensors("clip_text_outputs.safetensors");
    let output = clip.forward(&inputs["input_ids"]).unwrap();
    assert_close(
        "clip last_hidden_state",
        &output.last_hidden_state,
        &expected["last_hidden_state"],
        TOLERANCE,
    );
    assert_close(
        "clip pooler_output",
        &output.pooler_output,
        &expected["pooler_output"],
        TOLERANCE,
    );
}

#[test]
fn clip_text_matches_transformers_with_eos_token_pooling() {
    #[derive(serde::Deserialize)]
    struct EosRule {
        eos_token_id: i64,
    }
    let rule: EosRule = serde_json::from_str(
        &std::fs::read_to_string(encoders_dir().join("clip_text_eos_rule.json")).unwrap(),
    )
    .unwrap();
    let mut clip = ClipTextModel::load_dir(
        &pipeline_dir().join("text_encoder"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    clip.set_eos_token_id(rule.eos_token_id);
    let inputs = tensors("clip_text_eos_rule_inputs.safetensors");
    let expected = tensors("clip_text_eos_rule_outputs.safetensors");
    let output = clip.forward(&inputs["input_ids"]).unwrap();
    assert_close(
        "clip pooler_output (eos rule)",
        &output.pooler_output,
        &expected["pooler_output"],
        TOLERANCE,
    );
}

#[test]
fn clip_text_loads_the_text_model_prefixed_layout() {
    let clip = ClipTextModel::load_dir(
        &encoders_dir().join("clip_text_legacy"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let inputs = tensors("clip_text_inputs.safetensors");
    let expected = tensors("clip_text_outputs.safetensors");
    let output = clip.forward(&inputs["input_ids"]).unwrap();
    assert_close(
        "clip pooler_output (text_model. layout)",
        &output.pooler_output,
        &expected["pooler_output"],
        TOLERANCE,
    );
}

// --- bf16 -------------------------------------------------------------------------------

/// bf16 keeps about 3 significant digits; through a few layers the outputs stay within a few
/// percent of the fp32 reference.
fn assert_bf16_close(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.kind(), Kind::BFloat16, "{what} did not run in bf16");
    let scale = expected.abs().max().double_value(&[]);
    assert_close(what, actual, expected, 0.05 * scale.max(1.0));
}

#[test]
fn models_load_and_run_in_bf16() {
    let kind = Kind::BFloat16;
    let vae =
        AutoencoderKl::load_diffusers_dir(&pipeline_dir().join("vae"), Device::Cpu, kind).unwrap();
    let decoded = vae
        .decode(&tensors("vae_decode_inputs.safetensors")["z"])
        .unwrap();
    assert_bf16_close(
        "vae decode bf16",
        &decoded,
        &tensors("vae_decode_outputs.safetensors")["sample"],
    );

    let t5 =
        T5Encoder::load_dir(&pipeline_dir().join("text_encoder_2"), Device::Cpu, kind).unwrap();
    let hidden = t5
        .forward(&tensors("t5_masked_inputs.safetensors")["input_ids"], None)
        .unwrap();
    let reference = T5Encoder::load_dir(
        &pipeline_dir().join("text_encoder_2"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
    .forward(&tensors("t5_masked_inputs.safetensors")["input_ids"], None)
    .unwrap();
    assert_bf16_close("t5 bf16", &hidden, &reference);

    let clip =
        ClipTextModel::load_dir(&pipeline_dir().join("text_encoder"), Device::Cpu, kind).unwrap();
    let output = clip
        .forward(&tensors("clip_text_inputs.safetensors")["input_ids"])
        .unwrap();
    assert_bf16_close(
        "clip bf16",
        &output.pooler_output,
        &tensors("clip_text_outputs.safetensors")["pooler_output"],
    );
}

// --- tokenizers -------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct TokenizationFixture {
    prompts: Vec<String>,
    clip_max_length_77: Vec<Vec<i64>>,
    t5_max_length_512: Vec<Vec<i64>>,
    t5_max_length_16: Vec<Vec<i64>>,
    t5_max_length_16_attention_mask: Vec<Vec<i64>>,
}

fn tokenization() -> TokenizationFixture {
    serde_json::from_str(
        &std::fs::read_to_string(encoders_dir().join("tokenization.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn clip_tokenizer_matches_transformers() {
    let fixture = tokenization();
    let prompts: Vec<&str> = fixture.prompts.iter().map(String::as_str).collect();
    let tokenizer = PromptTokenizer::from_dir(&pipeline_dir().join("tokenizer"), None).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    assert_eq!(
        tokenizer.encode(&prompts).unwrap().ids,
        fixture.clip_max_length_77
    );
}

#[test]
fn clip_tokenizer_from_vocab_and_merges_matches_transformers() {
    // The real FLUX tokenizer/ folder: vocab.json + merges.txt, no tokenizer.json.
    let fixture = tokenization();
    let prompts: Vec<&str> = fixture.prompts.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(
            pipeline_dir().join("tokenizer").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    let tokenizer = PromptTokenizer::from_dir(dir.path(), None).unwrap();
    assert_eq!(
        tokenizer.encode(&prompts).unwrap().ids,
        fixture.clip_max_length_77
    );
}

#[test]
fn t5_tokenizer_matches_transformers() {
    let fixture = tokenization();
    let prompts: Vec<&str> = fixture.prompts.iter().map(String::as_str).collect();
    let tokenizer =
        PromptTokenizer::from_dir(&pipeline_dir().join("tokenizer_2"), Some(T5_MAX_LENGTH))
            .unwrap();
    assert_eq!(
        tokenizer.encode(&prompts).unwrap().ids,
        fixture.t5_max_length_512
    );
    let short = PromptTokenizer::from_dir(&pipeline_dir().join("tokenizer_2"), Some(16)).unwrap();
    let encoded = short.encode(&prompts).unwrap();
    assert_eq!(encoded.ids, fixture.t5_max_length_16);
    assert_eq!(
        encoded.attention_mask,
        fixture.t5_max_length_16_attention_mask
    );
}

#[test]
fn tokenizer_folders_without_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let error = PromptTokenizer::from_dir(dir.path(), Some(8)).unwrap_err();
    assert!(
        format!("{error:#}").contains("no tokenizer.json"),
        "{error:#}"
    );
}

// --- pipeline folder and end to end -----------------------------------------------------

#[test]
fn pipeline_folder_opens_and_loads_its_components() {
    let folder = FluxPipelineFolder::open(&pipeline_dir()).unwrap();
    assert_eq!(folder.model_index.class_name, "FluxPipeline");
    assert_eq!(
        folder.model_index.component_class("transformer"),
        Some("FluxTransformer2DModel")
    );
    assert!(folder
        .transformer_dir
        .join("diffusion_pytorch_model.safetensors.index.json")
        .exists());
    let scheduler = &folder.scheduler;
    assert!(scheduler.use_dynamic_shifting);
    assert_eq!(
        (scheduler.base_image_seq_len, scheduler.max_image_seq_len),
        (256, 4096)
    );
    assert_eq!((scheduler.base_shift, scheduler.max_shift), (0.5, 1.15));

    // Prompt -> ids -> embeddings, as the pipeline will do it, against the Python references.
    let fixture = tokenization();
    let prompts: Vec<&str> = fixture.prompts.iter().map(String::as_str).collect();
    let clip_ids = folder
        .clip_tokenizer()
        .unwrap()
        .encode_to_tensor(&prompts, Device::Cpu)
        .unwrap();
    let clip = folder.load_clip_text(Device::Cpu, Kind::Float).unwrap();
    let pooled = clip.forward(&clip_ids).unwrap().pooler_output;
    assert_close(
        "pipeline clip pooled",
        &pooled,
        &tensors("clip_text_outputs.safetensors")["pooler_output"],
        TOLERANCE,
    );
    let t5_ids = folder
        .t5_tokenizer(T5_MAX_LENGTH)
        .unwrap()
        .encode_to_tensor(&prompts, Device::Cpu)
        .unwrap();
    let t5 = folder.load_t5(Device::Cpu, Kind::Float).unwrap();
    let hidden = t5.forward(&t5_ids, None).unwrap();
    assert_close(
        "pipeline t5",
        &hidden,
        &tensors("t5_outputs.safetensors")["last_hidden_state"],
        TOLERANCE,
    );
    folder.load_vae(Device::Cpu, Kind::Float).unwrap();
}

#[test]
fn pipeline_folder_errors_name_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let error = FluxPipelineFolder::open(dir.path()).unwrap_err();
    assert!(
        format!("{error:#}").contains("no model_index.json"),
        "{error:#}"
    );
    std::fs::copy(
        pipeline_dir().join("model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    let error = FluxPipelineFolder::open(dir.path()).unwrap_err();
    assert!(
        format!("{error:#}").contains("has no transformer/ folder"),
        "{error:#}"
    );
}

#[test]
fn pipeline_folder_resolves_a_hugging_face_cache_repository() {
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join("refs")).unwrap();
    std::fs::write(repo.path().join("refs").join("main"), "abc123\n").unwrap();
    std::fs::create_dir_all(repo.path().join("snapshots")).unwrap();
    let error = FluxPipelineFolder::open(repo.path()).unwrap_err();
    assert!(
        format!("{error:#}").contains("names snapshot abc123"),
        "{error:#}"
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(pipeline_dir(), repo.path().join("snapshots").join("abc123"))
            .unwrap();
        let folder = FluxPipelineFolder::open(repo.path()).unwrap();
        assert!(folder.root.ends_with("snapshots/abc123"));
    }
}

#[test]
fn parity_command_runs_the_vae_encoder() {
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("out.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_syncd-worker"))
        .args(["parity", "vae-encode", "--model"])
        .arg(pipeline_dir().join("vae"))
        .arg("--inputs")
        .arg(encoders_dir().join("vae_encode_inputs.safetensors"))
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let written = read_all(&output).unwrap();
    let expected = tensors("vae_encode_outputs.safetensors");
    assert_close(
        "parity command vae-encode",
        &written["latent_dist_mean"],
        &expected["latent_dist_mean"],
        TOLERANCE,
    );
}

// --- bad weight files -------------------------------------------------------------------

/// A copy of the tiny VAE folder whose weights file `edit` rewrites.
fn vae_copy_with(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(pipeline_dir().join("vae").join(file), dir.path().join(file)).unwrap();
    }
    edit(&dir.path().join("diffusion_pytorch_model.safetensors"));
    dir
}

fn load_error(dir: &Path) -> String {
    format!(
        "{:#}",
        AutoencoderKl::load_diffusers_dir(dir, Device::Cpu, Kind::Float).unwrap_err()
    )
}

#[test]
fn truncated_weights_give_a_clear_error() {
    let dir = vae_copy_with(|path| {
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
    });
    let error = load_error(dir.path());
    assert!(
        error.contains("truncated or corrupt")
            && error.contains("diffusion_pytorch_model.safetensors"),
        "{error}"
    );
}

#[test]
fn corrupt_weights_give_a_clear_error() {
    let dir = vae_copy_with(|path| {
        std::fs::write(path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap()
    });
    let error = load_error(dir.path());
    assert!(error.contains("truncated or corrupt"), "{error}");
}

/// Rewrites a weights file with `edit` applied to its tensors.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut named: Vec<(String, Tensor)> = read_all(path).unwrap().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut named);
    Tensor::write_safetensors(&named, path).unwrap();
}

#[test]
fn mismatched_weights_name_the_tensor() {
    let name = "decoder.up_blocks.1.resnets.0.conv1.weight";
    let dir = vae_copy_with(|path| {
        rewrite(path, |named| {
            let entry = named.iter_mut().find(|(n, _)| n == name).unwrap();
            entry.1 = Tensor::zeros([16, 16, 1, 1], (Kind::Float, Device::Cpu));
        })
    });
    let error = load_error(dir.path());
    assert!(
        error.contains(&format!("weight {name} has shape [16, 16, 1, 1]")),
        "{error}"
    );
}

#[test]
fn missing_weights_name_the_tensor() {
    let name = "encoder.mid_block.attentions.0.to_k.bias";
    let dir = vae_copy_with(|path| rewrite(path, |named| named.retain(|(n, _)| n != name)));
    let error = load_error(dir.path());
    assert!(
        error.contains(&format!("tensor {name} is missing")),
        "{error}"
    );
}

#[test]
fn a_bfl_file_with_a_wrong_config_names_the_tensor() {
    let config = VaeConfig {
        block_out_channels: vec![8, 16, 16, 32],
        ..tiny_vae_config()
    };
    let error = AutoencoderKl::load_bfl_file(
        &encoders_dir().join("ae.safetensors"),
        config,
        Device::Cpu,
        Kind::Float,
    )
    .unwrap_err();
    let error = format!("{error:#}");
    assert!(
        error.contains("ae.safetensors") && error.contains("has shape"),
        "{error}"
    );
}

#[test]
fn a_t5_config_that_does_not_fit_the_weights_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        std::fs::read_to_string(pipeline_dir().join("text_encoder_2").join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"d_ff\": 64", "\"d_ff\": 48"),
    )
    .unwrap();
    std::fs::copy(
        pipeline_dir()
            .join("text_encoder_2")
            .join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let error = format!(
        "{:#}",
        T5Encoder::load_dir(dir.path(), Device::Cpu, Kind::Float).unwrap_err()
    );
    assert!(
        error.contains("DenseReluDense.wi_0.weight has shape [64, 32]"),
        "{error}"
    );
}
