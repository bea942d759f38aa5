//! Speed of the tiny FLUX transformer forward (the parity fixture model), plain and as a
//! Masked-Shared-Attention group, on the CPU. Prints one JSON line of median seconds per forward;
//! `scripts/bench/flux_transformer_ratio.sh` runs it beside `scripts/bench/flux_reference.py`
//! (diffusers on the same weights, inputs and thread count) and prints the ratios.
//!
//! `cargo bench -p syncd-worker --bench flux_transformer -- --threads 1 --iterations 200`

use std::path::Path;
use std::time::Instant;
use syncd_models::flux::msa::SharedKeys;
use syncd_models::flux::{FluxInputs, FluxTransformer, GroupAttention};
use syncd_models::weights::read_all;
use tch::{Device, Kind, Tensor};

fn argument(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn median_seconds(iterations: usize, mut run: impl FnMut()) -> f64 {
    for _ in 0..iterations.div_ceil(10) {
        run();
    }
    let mut times: Vec<f64> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn forward(
    model: &FluxTransformer,
    data: &std::collections::HashMap<String, Tensor>,
    group: Option<&GroupAttention>,
) -> Tensor {
    model
        .forward(
            &FluxInputs {
                hidden_states: &data["hidden_states"],
                encoder_hidden_states: &data["encoder_hidden_states"],
                pooled_projections: &data["pooled_projections"],
                timestep: &data["timestep"],
                guidance: Some(&data["guidance"]),
                img_ids: &data["img_ids"],
                txt_ids: &data["txt_ids"],
            },
            group,
        )
        .expect("forward")
}

fn main() {
    let threads = argument("--threads", 1);
    let iterations = argument("--iterations", 200);
    tch::set_num_threads(threads as i32);
    let _guard = tch::no_grad_guard();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux");
    let model =
        FluxTransformer::from_diffusers_dir(&fixtures.join("tiny-dev"), Device::Cpu, Kind::Float)
            .expect("tiny model");
    let plain = read_all(&fixtures.join("transformer_dev.safetensors")).expect("inputs");
    let group = read_all(&fixtures.join("msa_masked.safetensors")).expect("group inputs");
    let plain_seconds = median_seconds(iterations, || {
        let _ = forward(&model, &plain, None);
    });
    let rows = group["img_ids"].select(1, 1).max().int64_value(&[]) + 1;
    let msa_seconds = median_seconds(iterations, || {
        // The shared keys are part of each timed forward, as the reference builds its dense
        // mask in each.
        let keys = SharedKeys::new(
            3,
            Some(&group["masks"]),
            &group["img_ids"],
            rows,
            &model.config.axes_dims_rope,
        )
        .expect("shared keys");
        let attention = GroupAttention {
            keys: &keys,
            capture: None,
        };
        let _ = forward(&model, &group, Some(&attention));
    });
    println!(
        "{}",
        serde_json::json!({
            "implementation": "syncd-worker",
            "threads": threads,
            "iterations": iterations,
            "forward_seconds": plain_seconds,
            "msa_forward_seconds": msa_seconds,
        })
    );
}
