//! The admin CLI as people and scripts use it on a live factory: following a run with
//! `syncd run watch`, paging through jobs with `syncd jobs list`, exit statuses that tell "not
//! found", "invalid input" and "service unreachable" apart, and read-only commands that need
//! nothing but the database. The real coordinator and CLI, `syncd-test-worker`, and the real
//! PostgreSQL, RabbitMQ and Garage of this machine.

use anyhow::{Context, Result};
use serde_json::Value;
use std::time::Duration;
use syncd_tests::factory::Factory;
use syncd_tests::processes::cli_output;

/// Runs the CLI with `config`, returning its exit status, stdout and stderr.
fn syncd(config: &std::path::Path, args: &[&str]) -> Result<(i32, String, String)> {
    let output = cli_output(config, args)?;
    Ok((
        output
            .status
            .code()
            .context("the CLI was killed by a signal")?,
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_watched_to_its_end_and_its_jobs_listed_page_by_page() -> Result<()> {
    let factory = Factory::start(2, 400).await?;
    factory.create_run("watched", 12)?;
    // Followed from the start, with JSON lines; the watch ends by itself when the run does.
    let config = factory.coordinator_config.clone();
    let watch = tokio::task::spawn_blocking(move || {
        syncd(
            &config,
            &["run", "watch", "watched", "--json", "--interval", "0.3"],
        )
    });
    let (status, stdout, stderr) = tokio::time::timeout(Duration::from_secs(180), watch)
        .await
        .context("the watch did not end with its run")???;
    assert_eq!(status, 0, "{stderr}");
    let updates: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("each line is JSON: {stdout}"))?;
    assert!(
        updates.len() >= 3,
        "a few updates while the run ran: {stdout}"
    );
    let generate = |update: &Value| update["stages"][2].clone();
    let last = updates.last().context("a last update")?;
    assert_eq!(last["state"], "completed");
    assert_eq!(last["dataset_state"], "written");
    // Twelve deformable objects, one group each: every group generated and scored.
    for stage in [2, 3] {
        assert_eq!(last["stages"][stage]["total"], 12, "{last}");
        assert_eq!(last["stages"][stage]["succeeded"], 12, "{last}");
    }
    assert_eq!(last["stages"][4]["stage"], "pack");
    assert_eq!(last["stages"][4]["succeeded"], 1);
    let decided: i64 = ["accepted", "rejected", "near_duplicate"]
        .iter()
        .map(|decision| last["groups"][decision].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(decided, 12, "{last}");
    // Progress only moves forwards, and the run was seen in progress.
    let generated: Vec<i64> = updates
        .iter()
        .map(|update| generate(update)["succeeded"].as_i64().unwrap_or(-1))
        .collect();
    assert!(
        generated.windows(2).all(|pair| pair[0] <= pair[1]),
        "{generated:?}"
    );
    assert!(
        generated[0] < 12,
        "the first update came before the end: {generated:?}"
    );
    assert!(
        updates.iter().any(|update| update["pace"][2]["per_minute"]
            .as_f64()
            .is_some_and(|rate| rate > 0.0)),
        "some update measured generation's pace: {stdout}"
    );

    // Watching an ended run prints one frame and exits at once.
    let (status, frame, _) = syncd(&factory.coordinator_config, &["run", "watch", "watched"])?;
    assert_eq!(status, 0);
    assert!(frame.contains("watched"), "{frame}");
    let generate_line = frame
        .lines()
        .find(|line| line.trim_start().starts_with("generate"))
        .with_context(|| format!("a generate bar: {frame}"))?;
    assert!(
        generate_line.contains(&format!("[{}]", "#".repeat(30))),
        "{generate_line}"
    );
    assert!(generate_line.contains("12/12"), "{generate_line}");
    assert!(frame.contains("workers:"), "{frame}");

    // Paging through the generation jobs: every job once, in creation order.
    let pool = factory.env.pool().await?;
    let expected: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT id FROM jobs WHERE kind = 'generate' ORDER BY created_at, id")
            .fetch_all(&pool)
            .await?;
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["jobs", "list", "--run", "watched", "--kind", "generate"];
        args.extend(["--state", "succeeded", "--limit", "3"]);
        if let Some(after) = &after {
            args.extend(["--after", after.as_str()]);
        }
        let page = factory.cli_json(&args)?;
        let jobs = page["jobs"].as_array().context("jobs")?;
        assert!(jobs.len() <= 3);
        for job in jobs {
            assert_eq!(job["kind"], "generate");
            assert_eq!(job["state"], "succeeded");
            listed.push(job["id"].as_str().context("an id")?.parse::<uuid::Uuid>()?);
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    let expected: Vec<uuid::Uuid> = expected.into_iter().map(|(id,)| id).collect();
    assert_eq!(listed, expected);
    let text = factory.cli(&["jobs", "list", "--run", "watched", "--limit", "2"])?;
    assert!(
        text.lines()
            .last()
            .is_some_and(|line| line.starts_with("more: --after ")),
        "{text}"
    );
    let none = factory.cli(&["jobs", "list", "--run", "watched", "--state", "failed"])?;
    assert_eq!(none.trim(), "no jobs");
    factory.finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_statuses_tell_failures_apart_and_reading_needs_only_the_database() -> Result<()> {
    let factory = Factory::start(0, 0).await?;
    factory.create_run("stopped", 2)?;
    let config = &factory.coordinator_config;

    // Not found: 3.
    for args in [
        vec!["run", "status", "no-such-run"],
        vec!["run", "watch", "no-such-run"],
        vec!["job", "show", "6f1c2a52-8f3e-4a59-9d51-0c3f4d1b2a10"],
        vec![
            "jobs",
            "list",
            "--after",
            "6f1c2a52-8f3e-4a59-9d51-0c3f4d1b2a10",
        ],
    ] {
        let (status, _, stderr) = syncd(config, &args)?;
        assert_eq!(status, 3, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: no "), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }

    // Invalid input: 2, from the command line and from a run file alike.
    let (status, _, stderr) = syncd(config, &["jobs", "list", "--state", "exploded"])?;
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("unknown job state"), "{stderr}");
    let broken = factory
        .env
        .write("broken-run.toml", "name = \"broken\"\nseed = \"seven\"\n")?;
    let (status, _, stderr) = syncd(config, &["run", "create", &broken.to_string_lossy()])?;
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.starts_with("error: invalid run file"), "{stderr}");

    // A cancelled run: its watch ends with status 1 and says why.
    factory.cli(&["run", "cancel", "stopped"])?;
    let (status, frame, stderr) = syncd(config, &["run", "watch", "stopped"])?;
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("run stopped was cancelled"), "{stderr}");
    assert!(frame.contains("cancelled"), "{frame}");

    // Reading needs the database alone: no broker or S3 settings at hand.
    let database_only = factory.env.write(
        "database-only.toml",
        &format!("[database]\nurl = \"{}\"\n", factory.env.database_url),
    )?;
    for args in [
        vec!["run", "status", "stopped"],
        vec!["run", "list"],
        vec!["jobs", "list", "--run", "stopped"],
        vec!["workers"],
        vec!["dead-letters"],
    ] {
        let (status, _, stderr) = syncd(&database_only, &args)?;
        assert_eq!(status, 0, "{args:?}: {stderr}");
    }
    let run_file = factory.env.path("run.toml");
    let (status, _, stderr) = syncd(
        &database_only,
        &["run", "create", &run_file.to_string_lossy()],
    )?;
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("broker") || stderr.contains("storage"),
        "{stderr}"
    );

    // PostgreSQL unreachable: 4.
    let address = syncd_tests::processes::free_address()?;
    let unreachable = factory.env.write(
        "unreachable.toml",
        &format!("[database]\nurl = \"postgres://syncd@{address}/syncd\"\n"),
    )?;
    let (status, _, stderr) = syncd(&unreachable, &["run", "list"])?;
    assert_eq!(status, 4, "{stderr}");
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    factory.finish().await
}
