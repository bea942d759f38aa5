//! Parity of the scoring models, preprocessing and scoring job with the Python reference
//! (transformers 5.24, torchvision-backend image processors), on the tiny random configurations
//! and images that `scripts/fixtures/make_scoring_fixtures.py` writes to
//! `tests/fixtures/scoring/`. CPU, float32. Run with `--nocapture` to see the errors reached.

mod common;

use common::max_abs_diff;
use image::{GrayImage, RgbImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use syncd_models::aesthetic::{convert_pickle, AestheticHead, AestheticHeadKind};
use syncd_models::clip_vision::ClipVision;
use syncd_models::dinov2::Dinov2;
use syncd_models::weights::{read_all, write_all};
use syncd_worker::commands::{parity, parity_scoring};
use syncd_worker::scoring::crop::object_crop_box;
use syncd_worker::scoring::preprocess::{image_tensor, Preprocess};
use syncd_worker::scoring::{decode_image, decode_mask, Scorer, ScorerConfig};
use tch::{Device, Kind, Tensor};

/// The bound the task sets for float32 parity.
const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scoring")
}

fn case(name: &str) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let dir = fixtures().join("cases");
    let inputs = read_all(&dir.join(format!("{name}.inputs.safetensors"))).unwrap();
    let outputs = read_all(&dir.join(format!("{name}.outputs.safetensors"))).unwrap();
    (inputs, outputs)
}

fn check(label: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    common::assert_close(label, ours, reference, TOLERANCE)
}

/// Runs every DINOv2 case of `cases_prefix` through the model in `model_dir`.
fn check_dinov2(model_dir: &str, cases_prefix: &str) {
    let _no_grad = tch::no_grad_guard();
    let model = Dinov2::load(&fixtures().join(model_dir), Device::Cpu, Kind::Float).unwrap();
    for size in ["native", "small", "large"] {
        let (inputs, outputs) = case(&format!("{cases_prefix}_{size}"));
        let ours = model.forward(&inputs["pixel_values"]).unwrap();
        let label = format!("{model_dir} {size}");
        check(
            &format!("{label} pooler_output"),
            &ours.pooler_output,
            &outputs["pooler_output"],
        );
        check(
            &format!("{label} last_hidden_state"),
            &ours.last_hidden_state,
            &outputs["last_hidden_state"],
        );
    }
}

#[test]
fn dinov2_matches_transformers() {
    check_dinov2("dinov2", "dinov2");
}

#[test]
fn dinov2_swiglu_matches_transformers() {
    check_dinov2("dinov2_swiglu", "dinov2_swiglu");
}

#[test]
fn dinov2_with_registers_matches_transformers() {
    check_dinov2("dinov2_reg", "dinov2_reg");
}

#[test]
fn dinov2_hub_layout_loads_the_same_weights() {
    // The hub-named state dicts are renamed copies of the Hugging Face weights (fused qkv,
    // ls1.gamma, mlp.w12, ...): they must give the Hugging Face model's outputs.
    check_dinov2("dinov2_hub_reg", "dinov2_reg");
    check_dinov2("dinov2_hub_swiglu", "dinov2_swiglu");
}

#[test]
fn dinov2_hub_file_without_config_infers_its_shape() {
    use syncd_models::dinov2::Dinov2Config;
    use syncd_models::weights::Checkpoint;
    // Without config.json the configuration is read off the tensor shapes, with 64-wide heads
    // as in every released size: a ViT of width 128 (2 heads), patch 14, 2x2 positions (image
    // 28), 2 blocks, registers and SwiGLU.
    let dir = tempfile::tempdir().unwrap();
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let file = dir.path().join("hub.safetensors");
    write_all(
        &file,
        &[
            ("cls_token".into(), zeros(&[1, 1, 128])),
            ("pos_embed".into(), zeros(&[1, 5, 128])),
            ("register_tokens".into(), zeros(&[1, 4, 128])),
            ("patch_embed.proj.weight".into(), zeros(&[128, 3, 14, 14])),
            ("blocks.0.norm1.weight".into(), zeros(&[128])),
            ("blocks.1.norm1.weight".into(), zeros(&[128])),
            ("blocks.0.mlp.w12.weight".into(), zeros(&[2 * 344, 128])),
        ],
    )
    .unwrap();
    let config =
        Dinov2Config::infer_from_hub_checkpoint(&Checkpoint::open_file(&file).unwrap()).unwrap();
    assert_eq!(
        (
            config.hidden_size,
            config.num_attention_heads,
            config.num_hidden_layers
        ),
        (128, 2, 2)
    );
    assert_eq!((config.patch_size, config.image_size), (14, 28));
    assert_eq!(config.registers(), 4);
    assert!(config.use_swiglu_ffn);
    // The tiny fixture's width 32 has no 64-wide heads: that needs its config.json.
    let tiny = fixtures().join("dinov2_hub_reg/model.safetensors");
    let error = Dinov2Config::infer_from_hub_checkpoint(&Checkpoint::open_file(&tiny).unwrap())
        .unwrap_err();
    assert!(
        format!("{error}").contains("put a config.json beside it"),
        "{error}"
    );
}

#[test]
fn clip_vision_matches_transformers() {
    let _no_grad = tch::no_grad_guard();
    let model =
        ClipVision::load(&fixtures().join("clip_vision"), Device::Cpu, Kind::Float).unwrap();
    let (inputs, outputs) = case("clip_vision");
    let ours = model.forward(&inputs["pixel_values"]).unwrap();
    check("clip_vision image_embeds", &ours, &outputs["image_embeds"]);
    let wrong_size = Tensor::zeros([1, 3, 28, 28], (Kind::Float, Device::Cpu));
    let error = model.forward(&wrong_size).unwrap_err();
    assert!(format!("{error}").contains("[batch, 3, 30, 30]"), "{error}");
}

#[test]
fn aesthetic_heads_convert_from_pickles_and_match() {
    let _no_grad = tch::no_grad_guard();
    let dir = tempfile::tempdir().unwrap();
    for (kind, expected) in [
        ("linear", AestheticHeadKind::Linear),
        ("mlp", AestheticHeadKind::Mlp),
    ] {
        let pth = fixtures().join(format!("aesthetic_{kind}.pth"));
        let head_dir = dir.path().join(kind);
        std::fs::create_dir(&head_dir).unwrap();
        let converted = head_dir.join("head.safetensors");
        assert_eq!(convert_pickle(&pth, &converted).unwrap(), expected);
        let head = AestheticHead::load(&converted, Some(expected), Device::Cpu).unwrap();
        assert_eq!(head.input_dim(), 16);
        let (inputs, outputs) = case(&format!("aesthetic_{kind}"));
        let scores = head.forward(&inputs["embeds"]).unwrap();
        check(
            &format!("aesthetic {kind} scores"),
            &scores,
            &outputs["scores"],
        );
        // The parity command's arm reads the same folder and recognises the kind itself.
        let through_parity = parity_scoring::aesthetic(&head_dir, &inputs, Device::Cpu).unwrap();
        assert_eq!(through_parity[0].0, "scores");
        check(
            &format!("parity aesthetic {kind}"),
            &through_parity[0].1,
            &outputs["scores"],
        );
        let other = match expected {
            AestheticHeadKind::Linear => AestheticHeadKind::Mlp,
            AestheticHeadKind::Mlp => AestheticHeadKind::Linear,
        };
        let error = AestheticHead::load(&converted, Some(other), Device::Cpu).unwrap_err();
        assert!(
            format!("{error:#}").contains("the configuration asks for"),
            "{error:#}"
        );
    }
}

#[test]
fn parity_command_writes_reference_named_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.safetensors");
    let inputs = fixtures().join("cases/dinov2_reg_small.inputs.safetensors");
    parity::run(
        parity::ParityModel::Dinov2,
        &fixtures().join("dinov2_reg"),
        &inputs,
        &output,
        Device::Cpu,
    )
    .unwrap();
    let ours = read_all(&output).unwrap();
    let (_, reference) = case("dinov2_reg_small");
    check(
        "parity dinov2 pooler_output",
        &ours["pooler_output"],
        &reference["pooler_output"],
    );

    let output = dir.path().join("clip.safetensors");
    parity::run(
        parity::ParityModel::ClipVision,
        &fixtures().join("clip_vision"),
        &fixtures().join("cases/clip_vision.inputs.safetensors"),
        &output,
        Device::Cpu,
    )
    .unwrap();
    let (_, reference) = case("clip_vision");
    check(
        "parity clip-vision image_embeds",
        &read_all(&output).unwrap()["image_embeds"],
        &reference["image_embeds"],
    );
}

/// The fixture images in the order of the reference files, decoded as the reference decoded
/// them (PNG; for the JPEG, PIL's decoded pixels kept as PNG).
fn reference_images() -> Vec<(String, RgbImage)> {
    [
        "odd_317x211.png",
        "photo_640x480.pil-decoded.png",
        "tall_199x257.png",
    ]
    .iter()
    .map(|name| {
        let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
        (name.to_string(), decode_image(&bytes).unwrap())
    })
    .collect()
}

#[test]
fn preprocessing_matches_the_default_image_processors() {
    let images = reference_images();
    for (name, preprocess) in [
        ("dinov2", Preprocess::dinov2()),
        ("clip", Preprocess::clip()),
    ] {
        let reference = &read_all(&fixtures().join(format!("preprocess/{name}.safetensors")))
            .unwrap()["pixel_values"];
        for (index, (file, image)) in images.iter().enumerate() {
            let ours = preprocess.pixel_values(&image_tensor(image)).unwrap();
            let error = max_abs_diff(&ours, &reference.get(index as i64));
            println!("{name} preprocessing of {file}: max abs error {error:.3e}");
            assert!(error < 1e-6, "{name} {file}: {error:e}");
        }
        // The whole batch at once, with two images of one size (resized in one call), gives
        // each image's own values.
        let mut tensors: Vec<Tensor> = images
            .iter()
            .map(|(_, image)| image_tensor(image))
            .collect();
        tensors.push(tensors[0].flip([2]));
        let batch = preprocess.batch(&tensors, Device::Cpu).unwrap();
        assert_eq!(batch.size()[0], tensors.len() as i64);
        for (index, image) in tensors.iter().enumerate() {
            let alone = preprocess.pixel_values(image).unwrap();
            assert!(
                batch.get(index as i64).equal(&alone),
                "{name}: image {index} differs when preprocessed in a batch"
            );
        }
    }
}

#[test]
fn jpeg_decoding_is_close_to_pil() {
    // The preprocessing comparison above feeds PIL's decoded pixels; this measures how far the
    // Rust JPEG decoder is from them on the same file (different IDCT and chroma upsampling).
    let dir = fixtures().join("images");
    let ours = decode_image(&std::fs::read(dir.join("photo_640x480.jpg")).unwrap()).unwrap();
    let pil =
        decode_image(&std::fs::read(dir.join("photo_640x480.pil-decoded.png")).unwrap()).unwrap();
    assert_eq!(ours.dimensions(), pil.dimensions());
    let differences: Vec<i32> = ours
        .as_raw()
        .iter()
        .zip(pil.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .collect();
    let max = differences.iter().max().copied().unwrap_or(0);
    let mean = differences.iter().sum::<i32>() as f64 / differences.len() as f64;
    println!("JPEG decoding vs PIL: max {max} levels, mean {mean:.4}");
    assert!(max <= 8 && mean < 0.5, "max {max}, mean {mean}");
}

#[derive(serde::Deserialize)]
struct ScoreReference {
    images: Vec<String>,
    masks: Vec<String>,
    crop_boxes: Vec<[u32; 4]>,
    dinov2_resize: i64,
    dinov2_crop: i64,
    clip_size: i64,
    aesthetic: HashMap<String, Vec<f32>>,
    pairs: Vec<syncd_proto::messages::PairSimilarity>,
    embeddings: Vec<Vec<f32>>,
}

fn score_reference() -> ScoreReference {
    let text = std::fs::read_to_string(fixtures().join("score_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load_group(reference: &ScoreReference) -> (Vec<RgbImage>, Vec<GrayImage>) {
    let dir = fixtures().join("images");
    let read = |name: &String| std::fs::read(dir.join(name)).unwrap();
    let images = reference
        .images
        .iter()
        .map(|n| decode_image(&read(n)).unwrap())
        .collect();
    let masks = reference
        .masks
        .iter()
        .map(|n| decode_mask(&read(n)).unwrap())
        .collect();
    (images, masks)
}

/// A scorer over the tiny fixture models; the head is converted into `dir`.
fn tiny_scorer_config(
    dir: &Path,
    kind: AestheticHeadKind,
    reference: &ScoreReference,
) -> ScorerConfig {
    let name = match kind {
        AestheticHeadKind::Linear => "linear",
        AestheticHeadKind::Mlp => "mlp",
    };
    let head = dir.join(format!("{name}.safetensors"));
    if !head.exists() {
        convert_pickle(&fixtures().join(format!("aesthetic_{name}.pth")), &head).unwrap();
    }
    let mut dinov2_preprocess = Preprocess::dinov2();
    dinov2_preprocess.resize_shortest_edge = reference.dinov2_resize;
    dinov2_preprocess.crop = reference.dinov2_crop;
    let mut clip_preprocess = Preprocess::clip();
    clip_preprocess.resize_shortest_edge = reference.clip_size;
    clip_preprocess.crop = reference.clip_size;
    ScorerConfig {
        dinov2_dir: fixtures().join("dinov2_reg"),
        clip_dir: fixtures().join("clip_vision"),
        aesthetic_head: head,
        aesthetic_head_kind: kind,
        device: Some("cpu".into()),
        dtype: Some("fp32".into()),
        batch_size: 2,
        dinov2_preprocess,
        clip_preprocess,
    }
}

#[test]
fn scoring_a_group_matches_the_python_reference() {
    let reference = score_reference();
    let (images, masks) = load_group(&reference);
    for (mask, expected) in masks.iter().zip(&reference.crop_boxes) {
        let crop = object_crop_box(mask);
        assert_eq!(
            [
                crop.left,
                crop.top,
                crop.left + crop.width,
                crop.top + crop.height
            ],
            *expected
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for (kind, name) in [
        (AestheticHeadKind::Linear, "linear"),
        (AestheticHeadKind::Mlp, "mlp"),
    ] {
        let scorer = Scorer::load(&tiny_scorer_config(dir.path(), kind, &reference)).unwrap();
        let output = scorer.score_group(&images, &masks).unwrap();
        let aesthetic = Tensor::from_slice(&output.aesthetic);
        check(
            &format!("score_group aesthetic ({name} head)"),
            &aesthetic,
            &Tensor::from_slice(&reference.aesthetic[name]),
        );
        let ours: Vec<f32> = output.pairs.iter().map(|p| p.similarity).collect();
        let theirs: Vec<f32> = reference.pairs.iter().map(|p| p.similarity).collect();
        let order = |pairs: &[syncd_proto::messages::PairSimilarity]| {
            pairs.iter().map(|p| (p.a, p.b)).collect::<Vec<_>>()
        };
        assert_eq!(order(&output.pairs), order(&reference.pairs));
        check(
            "score_group pair similarities",
            &Tensor::from_slice(&ours),
            &Tensor::from_slice(&theirs),
        );
        let flat = |rows: &[Vec<f32>]| Tensor::from_slice(&rows.concat());
        check(
            "score_group embeddings",
            &flat(&output.embeddings),
            &flat(&reference.embeddings),
        );
    }
}

#[test]
fn scoring_in_bf16_stays_close_to_fp32() {
    let reference = score_reference();
    let (images, masks) = load_group(&reference);
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_scorer_config(dir.path(), AestheticHeadKind::Mlp, &reference);
    config.dtype = Some("bf16".into());
    config.batch_size = 3;
    let output = Scorer::load(&config)
        .unwrap()
        .score_group(&images, &masks)
        .unwrap();
    let aesthetic_error = output
        .aesthetic
        .iter()
        .zip(&reference.aesthetic["mlp"])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let similarity_error = output
        .pairs
        .iter()
        .zip(&reference.pairs)
        .map(|(a, b)| (a.similarity - b.similarity).abs())
        .fold(0f32, f32::max);
    println!("bf16 vs fp32 reference: aesthetic {aesthetic_error:.3e}, similarity {similarity_error:.3e}");
    assert!(aesthetic_error < 0.05 && similarity_error < 0.05);
}

#[test]
fn empty_and_full_masks_crop_the_whole_image() {
    let reference = score_reference();
    let (images, _) = load_group(&reference);
    let dir = tempfile::tempdir().unwrap();
    let scorer = Scorer::load(&tiny_scorer_config(
        dir.path(),
        AestheticHeadKind::Linear,
        &reference,
    ))
    .unwrap();
    let image = &images[0];
    let (width, height) = image.dimensions();
    let empty = GrayImage::new(width, height);
    let full = GrayImage::from_pixel(width, height, image::Luma([255]));
    let output = scorer
        .score_group(&[image.clone(), image.clone()], &[empty, full])
        .unwrap();
    // Both crops are the whole image, so the embeddings agree and the pair is (nearly) 1.
    assert_eq!(output.pairs.len(), 1);
    assert!(
        (output.pairs[0].similarity - 1.0).abs() < 1e-5,
        "{:?}",
        output.pairs
    );
    assert!(output.embeddings.iter().flatten().all(|v| v.is_finite()));
    // A group of one image is scored and has no pairs.
    let single = scorer
        .score_group(
            std::slice::from_ref(image),
            &[GrayImage::new(width, height)],
        )
        .unwrap();
    assert_eq!(single.aesthetic.len(), 1);
    assert!(single.pairs.is_empty());
}

#[test]
fn bad_groups_are_errors() {
    let reference = score_reference();
    let (images, masks) = load_group(&reference);
    let dir = tempfile::tempdir().unwrap();
    let scorer = Scorer::load(&tiny_scorer_config(
        dir.path(),
        AestheticHeadKind::Linear,
        &reference,
    ))
    .unwrap();
    let error = scorer.score_group(&images, &masks[..2]).unwrap_err();
    assert!(
        format!("{error:#}").contains("3 images but 2 masks"),
        "{error:#}"
    );
    let swapped = [masks[1].clone(), masks[0].clone(), masks[2].clone()];
    let error = scorer.score_group(&images, &swapped).unwrap_err();
    assert!(
        format!("{error:#}").contains("mask 0 is 640x480 but its image is 317x211"),
        "{error:#}"
    );
    assert!(scorer.score_group(&[], &[]).is_err());
    let error = decode_image(b"\x89PNG\r\n\x1a\nnot really").unwrap_err();
    assert!(
        format!("{error:#}").contains("cannot decode image"),
        "{error:#}"
    );
}

#[test]
fn wrongly_shaped_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // DINOv2 with one LayerNorm weight a column too wide.
    let model_dir = dir.path().join("dinov2");
    std::fs::create_dir(&model_dir).unwrap();
    std::fs::copy(
        fixtures().join("dinov2/config.json"),
        model_dir.join("config.json"),
    )
    .unwrap();
    let mut tensors: Vec<(String, Tensor)> = read_all(&fixtures().join("dinov2/model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    for (name, tensor) in tensors.iter_mut() {
        if name == "layernorm.weight" {
            *tensor = Tensor::ones([33], (Kind::Float, Device::Cpu));
        }
    }
    write_all(&model_dir.join("model.safetensors"), &tensors).unwrap();
    let error = Dinov2::load(&model_dir, Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        format!("{error:#}").contains("weight layernorm.weight has shape [33]"),
        "{error:#}"
    );

    // An MLP head whose second layer does not chain onto the first.
    let head = dir.path().join("mlp.safetensors");
    convert_pickle(&fixtures().join("aesthetic_mlp.pth"), &head).unwrap();
    let mut tensors: Vec<(String, Tensor)> = read_all(&head).unwrap().into_iter().collect();
    for (name, tensor) in tensors.iter_mut() {
        if name == "layers.2.weight" {
            *tensor = Tensor::zeros([128, 1000], (Kind::Float, Device::Cpu));
        }
    }
    let broken = dir.path().join("broken.safetensors");
    write_all(&broken, &tensors).unwrap();
    let error = AestheticHead::load(&broken, None, Device::Cpu).unwrap_err();
    assert!(
        format!("{error:#}").contains("layers.2.weight has shape [128, 1000]"),
        "{error:#}"
    );

    // A head whose input width is not the CLIP projection width.
    let reference = score_reference();
    let mut config = tiny_scorer_config(dir.path(), AestheticHeadKind::Linear, &reference);
    let wide = dir.path().join("wide.safetensors");
    write_all(
        &wide,
        &[
            (
                "weight".into(),
                Tensor::zeros([1, 768], (Kind::Float, Device::Cpu)),
            ),
            (
                "bias".into(),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            ),
        ],
    )
    .unwrap();
    config.aesthetic_head = wide;
    let error = Scorer::load(&config).unwrap_err();
    assert!(
        format!("{error:#}").contains("takes 768-dimensional embeddings"),
        "{error:#}"
    );

    // A pickle that is not a head at all.
    let not_a_head = dir.path().join("not_a_head.pth");
    std::fs::write(&not_a_head, b"not a pickle").unwrap();
    let error = convert_pickle(&not_a_head, &dir.path().join("x.safetensors")).unwrap_err();
    assert!(
        format!("{error:#}").contains("as a PyTorch state dict"),
        "{error:#}"
    );
}

/// A run that pins the aesthetic head its threshold is meant for is refused by a worker loaded
/// with the other head, before anything is downloaded, naming both heads.
#[tokio::test]
async fn a_scoring_job_for_another_aesthetic_head_is_refused() {
    use syncd_proto::messages::{
        AestheticHead as WireHead, FailureKind, JobMessage, JobPayload, ScoreJob, WIRE_VERSION,
    };
    use syncd_worker::jobs::ScoreRunner;
    use syncd_worker::runner::{JobContext, JobRunner};

    let reference = score_reference();
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_scorer_config(dir.path(), AestheticHeadKind::Mlp, &reference);
    let setup = syncd_worker::runner::ModelSetup {
        device: "cpu".into(),
        dtype: "fp32".into(),
        models: Vec::new(),
    };
    let runner = ScoreRunner::new(Scorer::load(&config).unwrap(), setup).unwrap();
    // A store nobody listens on: the refusal must come before any download.
    let storage = syncd_infra::storage::Storage::new(&syncd_infra::storage::StorageConfig {
        endpoint: Some("http://127.0.0.1:9".into()),
        region: "garage".into(),
        bucket: "none".into(),
        access_key_id: "none".into(),
        secret_access_key: "none".to_string().into(),
    });
    let context = JobContext {
        storage,
        worker: "test".into(),
    };
    let job = JobMessage {
        version: WIRE_VERSION,
        job_id: syncd_proto::JobId::new_random(),
        attempt: 1,
        heartbeat_secs: 10,
        run_id: syncd_proto::RunId::new_random(),
        object_id: syncd_proto::ObjectId::new_random(),
        payload: JobPayload::Score(ScoreJob {
            group_id: syncd_proto::GroupId::new_random(),
            image_keys: vec!["a.png".into(), "b.png".into()],
            mask_keys: vec!["a.mask.png".into(), "b.mask.png".into()],
            aesthetic_head: Some(WireHead::Linear),
        }),
    };
    let error = runner.run(&job, &context).await.unwrap_err();
    assert_eq!(error.failure, FailureKind::Permanent);
    let message = format!("{:#}", error.error);
    assert!(message.contains("linear aesthetic head"), "{message}");
    assert!(message.contains("the mlp head"), "{message}");
}
