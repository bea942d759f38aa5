//! `syncd-scoring-bench`: scoring throughput (images per second) of the Rust scorer, for the side
//! by side comparison with the Python reference that `scripts/bench/scoring_bench.sh` runs.
//!
//! Loads the models once, reads the benchmark images (`NAME.png` + `NAME.mask.png`, written by
//! `scripts/bench/scoring_reference.py make-images`; decoding is not timed), and for each batch
//! size scores all images as one group `--repeats` times after one warm-up pass. Prints one JSON
//! line per batch size, with the first scores so that the wrapper can check that both
//! implementations computed the same thing.
//!
//! A prebuilt binary runs where there is no cargo: it needs only the libtorch it was linked
//! against (`LD_LIBRARY_PATH` pointing at the `torch/lib` folder of a matching torch install).

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;
use syncd_models::aesthetic::AestheticHeadKind;
use syncd_worker::scoring::preprocess::Preprocess;
use syncd_worker::scoring::{decode_image, decode_mask, Scorer, ScorerConfig};

#[derive(Parser)]
#[command(
    name = "syncd-scoring-bench",
    about = "Scoring throughput of the Rust scorer"
)]
struct Args {
    /// DINOv2 folder (or hub checkpoint).
    #[arg(long)]
    dinov2: PathBuf,
    /// CLIP vision folder.
    #[arg(long)]
    clip: PathBuf,
    /// Converted aesthetic head (safetensors).
    #[arg(long)]
    head: PathBuf,
    /// `linear` or `mlp`.
    #[arg(long, default_value = "mlp")]
    head_kind: AestheticHeadKind,
    /// Folder of NAME.png images with NAME.mask.png masks.
    #[arg(long)]
    images: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// Comma-separated batch sizes.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batch_sizes: Vec<usize>,
    /// libtorch intra-op threads (the reference is given the same number).
    #[arg(long)]
    threads: Option<i32>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// DINOv2 preprocessing: shortest edge and crop.
    #[arg(long, default_value_t = 256)]
    dinov2_resize: i64,
    #[arg(long, default_value_t = 224)]
    dinov2_crop: i64,
    /// CLIP preprocessing: shortest edge and crop (the tower's image size).
    #[arg(long, default_value_t = 224)]
    clip_size: i64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let (images, masks) = read_images(&args.images)?;
    let mut dinov2_preprocess = Preprocess::dinov2();
    dinov2_preprocess.resize_shortest_edge = args.dinov2_resize;
    dinov2_preprocess.crop = args.dinov2_crop;
    let mut clip_preprocess = Preprocess::clip();
    clip_preprocess.resize_shortest_edge = args.clip_size;
    clip_preprocess.crop = args.clip_size;
    let config = ScorerConfig {
        dinov2_dir: args.dinov2.clone(),
        clip_dir: args.clip.clone(),
        aesthetic_head: args.head.clone(),
        aesthetic_head_kind: args.head_kind,
        device: Some(args.device.clone()),
        dtype: Some(args.dtype.clone()),
        batch_size: 1,
        dinov2_preprocess,
        clip_preprocess,
    };
    let loading = Instant::now();
    let mut scorer = Scorer::load(&config)?;
    eprintln!("models loaded in {:.1} s", loading.elapsed().as_secs_f64());
    for &batch_size in &args.batch_sizes {
        scorer.set_batch_size(batch_size)?;
        let warm_up = scorer.score_group(&images, &masks)?;
        let start = Instant::now();
        for _ in 0..args.repeats {
            scorer.score_group(&images, &masks)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let scored = images.len() * args.repeats;
        let line = serde_json::json!({
            "impl": "rust",
            "device": args.device,
            "dtype": args.dtype,
            "threads": tch::get_num_threads(),
            "batch_size": batch_size,
            "images": scored,
            "seconds": seconds,
            "images_per_second": scored as f64 / seconds,
            "aesthetic_head": warm_up.aesthetic.iter().take(4).collect::<Vec<_>>(),
            "similarity_head": warm_up.pairs.iter().take(4).map(|p| p.similarity).collect::<Vec<_>>(),
        });
        println!("{line}");
    }
    Ok(())
}

fn read_images(dir: &std::path::Path) -> Result<(Vec<image::RgbImage>, Vec<image::GrayImage>)> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".png") && !name.ends_with(".mask.png")
        })
        .collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "no .png images in {}", dir.display());
    let mut images = Vec::new();
    let mut masks = Vec::new();
    for path in names {
        let mask_path = path.with_extension("mask.png");
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        images.push(decode_image(&read(&path)?).with_context(|| path.display().to_string())?);
        masks.push(
            decode_mask(&read(&mask_path)?).with_context(|| mask_path.display().to_string())?,
        );
    }
    Ok((images, masks))
}
