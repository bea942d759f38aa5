//! Creating runs with `syncd run create`: a large run written in batches, every row as the
//! planner plans it, a creation that fails after some assets were uploaded leaving nothing
//! behind, and assets referenced where they already are in the bucket. Real PostgreSQL and Garage; no coordinator is needed.

use anyhow::{Context, Result};
use serde_json::Value;
use std::time::Instant;
use syncd_coordinator::planner;
use syncd_proto::messages::ObjectSpec;
use syncd_proto::{GroupId, ObjectId};
use syncd_tests::env::TestEnv;
use syncd_tests::processes::{cli, cli_output};

/// Objects of the large run: 12,000 unless `SYNCD_TEST_RUN_CREATION_OBJECTS` says otherwise
/// (100000 measures creation at the paper's scale; the time is printed, never asserted).
fn objects() -> usize {
    std::env::var("SYNCD_TEST_RUN_CREATION_OBJECTS")
        .ok()
        .and_then(|objects| objects.parse().ok())
        .unwrap_or(12_000)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_run_is_written_in_batches_as_the_planner_plans_it() -> Result<()> {
    let objects = objects();
    let env = TestEnv::new().await?;
    let config = env.write_coordinator_config()?;
    let categories = ["Cat", "Dog", "Fox"];
    let lines: Vec<String> = (0..objects)
        .map(|index| {
            serde_json::json!({
                "type": "deformable",
                "category": categories[index % categories.len()],
                "description": format!("an animal with markings number {index}"),
                "backgrounds": ["on a wooden table", "in a sunny garden", "on a snowy street", "by a lake"],
            })
            .to_string()
        })
        .collect();
    env.write("objects.jsonl", &lines.join("\n"))?;
    let run_file = env.write(
        "run.toml",
        "name = \"large\"\nseed = 11\n[input]\nobjects_file = \"objects.jsonl\"\n\
         [generation.deformable]\ngroups_per_object = 2\n",
    )?;
    let started = Instant::now();
    let created: Value = serde_json::from_str(&cli(
        &config,
        &["--json", "run", "create", &run_file.to_string_lossy()],
    )?)?;
    println!(
        "created a run of {objects} objects in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(created["state"], "active");

    let pool = env.pool().await?;
    let (stored, ordinals, groups, jobs, created_events): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM objects), (SELECT count(DISTINCT ordinal) FROM objects),
                    (SELECT count(*) FROM groups),
                    (SELECT count(*) FROM jobs WHERE kind = 'generate' AND state = 'pending'),
                    (SELECT count(*) FROM job_events WHERE to_state = 'pending' AND detail = 'created')",
        )
        .fetch_one(&pool)
        .await?;
    let per_object = 2; // generation.deformable.groups_per_object in the run file
    assert_eq!((stored, ordinals), (objects as i64, objects as i64));
    assert_eq!(groups, (objects * per_object) as i64);
    assert_eq!(jobs, groups, "one generation job per group, nothing else");
    assert_eq!(created_events, jobs, "every job has its created event");

    // Every group is what the planner plans for its object: derived id, seed and prompts.
    let rows: Vec<(uuid::Uuid, uuid::Uuid, i32, i64, Value, Value, Value)> = sqlx::query_as(
        "SELECT g.id, g.object_id, g.group_index, g.seed, g.prompts, o.spec, o.backgrounds
         FROM groups g JOIN objects o ON o.id = g.object_id
         WHERE o.ordinal % 997 = 0",
    )
    .fetch_all(&pool)
    .await?;
    assert!(rows.len() >= 2 * (objects / 997));
    for (group, object, index, seed, prompts, spec, backgrounds) in rows {
        let expected = GroupId::derive(ObjectId(object), index as u32);
        assert_eq!(group, expected.0);
        assert_eq!(seed as u64, expected.seed(11));
        let spec: ObjectSpec = serde_json::from_value(spec)?;
        let backgrounds: Vec<String> = serde_json::from_value(backgrounds)?;
        let composed: Vec<String> = planner::compose_prompts(&spec, &backgrounds, seed as u64, 3)
            .into_iter()
            .map(|prompt| prompt.prompt)
            .collect();
        assert_eq!(prompts, serde_json::to_value(composed)?);
    }
    let (job_group, payload_group): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE (payload->>'group_id')::uuid = group_id) FROM jobs",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(job_group, payload_group, "each job is its group's");
    env.cleanup().await
}

/// An objects-file line for a rigid object with ready-made backgrounds.
fn rigid(uid: &str) -> String {
    serde_json::json!({
        "type": "rigid", "uid": uid, "caption": "a wooden chair",
        "backgrounds": ["on a kitchen table", "on a grassy lawn", "on a stone floor"],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_creation_that_fails_midway_leaves_no_run_and_no_uploaded_asset() -> Result<()> {
    let env = TestEnv::new().await?;
    let config = env.write_coordinator_config()?;
    let assets = env.dir.path().join("assets");
    std::fs::create_dir(&assets)?;
    let mut lines = Vec::new();
    for index in 0..24 {
        let uid = format!("asset{index:02}");
        std::fs::write(
            assets.join(format!("{uid}.glb")),
            format!("glTF bytes {index}"),
        )?;
        lines.push(rigid(&uid));
    }
    // A file the kernel refuses to read (EIO), as a failing disk would: it passes the input
    // checks and fails while the other assets are being uploaded.
    std::os::unix::fs::symlink("/proc/self/mem", assets.join("unreadable.glb"))?;
    lines.insert(12, rigid("unreadable"));
    env.write("objects.jsonl", &lines.join("\n"))?;
    let run_file = env.write(
        "run.toml",
        &format!(
            "name = \"broken\"\nseed = 1\n[input]\nobjects_file = \"objects.jsonl\"\nassets_dir = \"{}\"\n",
            assets.display()
        ),
    )?;
    let output = cli_output(&config, &["run", "create", &run_file.to_string_lossy()])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("unreadable.glb"), "{stderr}");

    let pool = env.pool().await?;
    let (runs,): (i64,) = sqlx::query_as("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await?;
    assert_eq!(runs, 0);
    let left = env.storage().list("runs/").await?;
    assert!(left.is_empty(), "uploaded assets left behind: {left:?}");

    // Without the unreadable asset the same run is created, with every asset in place.
    std::fs::remove_file(assets.join("unreadable.glb"))?;
    lines.remove(12);
    env.write("objects.jsonl", &lines.join("\n"))?;
    let created: Value = serde_json::from_str(&cli(
        &config,
        &["--json", "run", "create", &run_file.to_string_lossy()],
    )?)?;
    let run = created["id"].as_str().context("run id")?;
    let stored = env.storage().list(&format!("runs/{run}/")).await?;
    assert_eq!(stored.len(), 24, "{stored:?}");
    // A second run of that name is refused before anything is uploaded.
    let again = cli_output(&config, &["run", "create", &run_file.to_string_lossy()])?;
    assert!(!again.status.success());
    assert_eq!(env.storage().list("runs/").await?.len(), 24);
    env.cleanup().await
}

#[tokio::test(flavor = "multi_thread")]
async fn assets_already_in_the_bucket_are_referenced_where_they_are() -> Result<()> {
    let env = TestEnv::new().await?;
    let config = env.write_coordinator_config()?;
    let storage = env.storage();
    let uids: Vec<String> = (0..5).map(|index| format!("chair{index}")).collect();
    for uid in &uids {
        storage
            .put(
                &format!("library/glbs/{uid}.glb"),
                format!("glTF {uid}"),
                "model/gltf-binary",
            )
            .await?;
    }
    let csv: Vec<String> = uids.iter().map(|uid| format!("{uid},a chair")).collect();
    env.write("cap3d.csv", &csv.join("\n"))?;
    let run_file = |name: &str, bucket: &str| {
        env.write(
            &format!("{name}.toml"),
            &format!(
                "name = \"{name}\"\nseed = 3\n[input]\nrigid_csv = \"cap3d.csv\"\n\
                 assets_dir = \"s3://{bucket}/library/glbs\"\n"
            ),
        )
    };

    let created: Value = serde_json::from_str(&cli(
        &config,
        &[
            "--json",
            "run",
            "create",
            &run_file("in-place", &env.bucket)?.to_string_lossy(),
        ],
    )?)?;
    assert_eq!(created["state"], "active");
    let pool = env.pool().await?;
    let keys: Vec<(String,)> =
        sqlx::query_as("SELECT spec->>'asset_key' FROM objects ORDER BY ordinal")
            .fetch_all(&pool)
            .await?;
    let expected: Vec<String> = uids
        .iter()
        .map(|uid| format!("library/glbs/{uid}.glb"))
        .collect();
    assert_eq!(
        keys.into_iter().map(|(key,)| key).collect::<Vec<_>>(),
        expected
    );
    // The jobs carry those keys on (the prior stage reads the assets where they are), and
    // nothing was copied into the run.
    let (referring,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE payload->'object'->>'asset_key' LIKE 'library/glbs/%'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(referring, 5);
    assert!(storage.list("runs/").await?.is_empty());

    // An asset missing from the prefix is named with its line, and nothing is created.
    env.write("cap3d.csv", &format!("{}\nchair9,a chair", csv.join("\n")))?;
    let output = cli_output(
        &config,
        &[
            "run",
            "create",
            &run_file("missing", &env.bucket)?.to_string_lossy(),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cap3d.csv:6")
            && stderr.contains(&format!("s3://{}/library/glbs/chair9.glb", env.bucket)),
        "{stderr}"
    );
    // Workers read assets from the working bucket only: another bucket is refused, saying so.
    let output = cli_output(
        &config,
        &[
            "run",
            "create",
            &run_file("elsewhere", "another-bucket")?.to_string_lossy(),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("outside the working bucket"), "{stderr}");
    let (runs,): (i64,) = sqlx::query_as("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await?;
    assert_eq!(runs, 1);
    env.cleanup().await
}
