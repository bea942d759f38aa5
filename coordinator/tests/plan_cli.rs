//! `syncd run plan` on the shipped SynCD recipe, through the real binary: with a 1,000-asset
//! Cap3D file it plans up to two rigid groups per asset plus the recipe's deformable objects,
//! and the reference's LLM request counts. A plan needs no database (none is configured here).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/recipes/syncd.toml")
}

/// A Cap3D-style CSV of `assets` rows and, beside it, a folder with their `.glb` files.
fn cap3d_inputs(dir: &Path, assets: usize) -> (PathBuf, PathBuf) {
    let glbs = dir.join("glbs");
    std::fs::create_dir_all(&glbs).unwrap();
    let mut csv = String::new();
    for index in 0..assets {
        let uid = format!("{:032x}", 0x5eed_0000_u64 + index as u64);
        csv.push_str(&format!("{uid},\"a wooden chair, model {index}\"\n"));
        std::fs::write(glbs.join(format!("{uid}.glb")), b"glTF").unwrap();
    }
    let csv_path = dir.join("cap3d.csv");
    std::fs::write(&csv_path, csv).unwrap();
    (csv_path, glbs)
}

fn run_plan(csv: &Path, glbs: &Path, json: bool) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_syncd"));
    command
        .args(["run", "plan"])
        .arg(recipe())
        .arg("--rigid-csv")
        .arg(csv)
        .arg("--assets-dir")
        .arg(glbs)
        .env_remove("SYNCD_CONFIG");
    if json {
        command.arg("--json");
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "syncd run plan failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_recipe_with_a_thousand_assets_plans_the_reference_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, glbs) = cap3d_inputs(dir.path(), 1000);
    let plan: Value = serde_json::from_str(&run_plan(&csv, &glbs, true)).unwrap();
    let deformable = 16 * 2400;
    assert_eq!(plan["objects"]["rigid"], 1000);
    assert_eq!(plan["objects"]["deformable"], deformable);
    assert_eq!(plan["objects"]["missing_assets"], 0);
    assert_eq!(plan["categories"].as_object().unwrap().len(), 16);
    assert_eq!(plan["categories"]["Woodpecker"]["objects"], 2400);
    assert_eq!(
        plan["categories"]["Woodpecker"]["descriptions_at_most"],
        150
    );
    // Two groups per asset, at most: the prior may find fewer triplets.
    assert_eq!(plan["groups"]["rigid_at_most"], 2000);
    assert_eq!(plan["groups"]["deformable"], deformable);
    assert_eq!(plan["groups"]["total_at_most"], 2000 + deformable);
    assert_eq!(plan["images_at_most"], 3 * (2000 + deformable));
    // One prompt job per asset and per category; one prior job per asset.
    assert_eq!(plan["jobs"]["prompt"], 1000 + 16);
    assert_eq!(plan["jobs"]["prior"], 1000);
    assert_eq!(plan["jobs"]["generate_at_most"], 2000 + deformable);
    assert_eq!(plan["jobs"]["score_at_most"], 2000 + deformable);
    // The reference's requests: 1 x 10 per asset; 6 x 25 per category for each of two lists.
    assert_eq!(plan["llm"]["rigid"], 1000);
    assert_eq!(plan["llm"]["deformable"], 16 * 6 * 2);
    assert_eq!(plan["llm"]["total"], 1000 + 192);
    assert_eq!(plan["llm"]["captions_asked"], 1000 * 10 + 16 * 2 * 150);
    // GPU time at the recipe's per-group seconds.
    let hours = plan["gpu"]["hours"].as_f64().unwrap();
    let expected = (2000.0 * (9.0 + 0.001) + deformable as f64 * (29.0 + 0.001)) / 3600.0;
    assert!((hours - expected).abs() < 1e-6, "{hours} vs {expected}");

    let text = run_plan(&csv, &glbs, false);
    assert!(text.contains("up to 2000 rigid"), "{text}");
    assert!(
        text.contains("fewer where the 3D prior finds fewer view triplets"),
        "{text}"
    );
    assert!(text.contains("llm requests  1192"), "{text}");
    assert!(
        text.contains("each description serving about 16 objects"),
        "{text}"
    );
}

#[test]
fn missing_assets_are_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, glbs) = cap3d_inputs(dir.path(), 20);
    let uid = format!("{:032x}", 0x5eed_0000_u64 + 7);
    std::fs::remove_file(glbs.join(format!("{uid}.glb"))).unwrap();
    let plan: Value = serde_json::from_str(&run_plan(&csv, &glbs, true)).unwrap();
    assert_eq!(plan["objects"]["rigid"], 19);
    assert_eq!(plan["objects"]["missing_assets"], 1);
    assert_eq!(plan["objects"]["missing_examples"][0], uid.as_str());
    assert_eq!(plan["groups"]["rigid_at_most"], 38);
    let text = run_plan(&csv, &glbs, false);
    assert!(text.contains("1 rigid asset(s) not found"), "{text}");
    assert!(text.contains(&uid), "{text}");
}

#[test]
fn a_run_file_that_does_not_parse_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "name = \"x\"\n[input]\n[generation.rigid]\nstepz = 3\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["run", "plan"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: invalid run file"), "{stderr}");
    assert!(stderr.contains("stepz"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
