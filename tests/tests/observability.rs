//! What operators watch, on live data: a factory (the real coordinator, test workers, RabbitMQ
//! with its Prometheus plugin) scraped by a real Prometheus with the deployment's alert rules;
//! every query of the shipped Grafana dashboard must return data, every alert rule must evaluate
//! cleanly, and the alerts for what went wrong must be raised. The same run exports its spans to
//! an OTLP receiver: one trace follows each group from its dispatch through the worker and back.
//!
//! The run is made to have every outcome the dashboard shows: groups accepted and rejected, a
//! job retried and then failed (`SYNCD_TEST_FAIL_ON`), a job dead-lettered by a worker crashing
//! on it (`SYNCD_TEST_CRASH_ON`, delivery limit 1), and so a worker lost.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use syncd_tests::env::TestEnv;
use syncd_tests::factory::{Factory, FILTER_ONLY_DARK_FAILS_ON_LOOKS};
use syncd_tests::otlp::{OtlpReceiver, ReceivedSpan};
use syncd_tests::processes::free_address;
use syncd_tests::prometheus::{Prometheus, ScrapeJob};
use syncd_tests::shipped::repository;

/// Panels that need hardware this machine lacks: dcgm-exporter reads NVIDIA GPUs.
const NEEDS_A_GPU: &str = "DCGM_";

#[tokio::test(flavor = "multi_thread")]
async fn dashboards_and_alerts_have_live_data_and_one_trace_follows_each_group() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let coordinator_metrics = free_address()?;
    let mut env = TestEnv::new().await?;
    env.delivery_limit = Some(1);
    let mut coordinator_env = vec![("SYNCD_METRICS__LISTEN", coordinator_metrics.as_str())];
    coordinator_env.extend(otel);
    let mut factory = Factory::start_in(env, &coordinator_env).await?;
    let worker_metrics = [free_address()?, free_address()?, free_address()?];
    let mut prometheus = Prometheus::start(
        &factory.env,
        &[
            ScrapeJob::new(
                "syncd-coordinator",
                std::slice::from_ref(&coordinator_metrics),
            ),
            ScrapeJob::new("syncd-worker", &worker_metrics),
            ScrapeJob {
                path: "/metrics/detailed".into(),
                // What deploy/prometheus.yml asks RabbitMQ for.
                params: vec![(
                    "family".into(),
                    vec!["queue_coarse_metrics".into(), "queue_consumer_count".into()],
                )],
                ..ScrapeJob::new("rabbitmq", &["127.0.0.1:15692".to_string()])
            },
        ],
        &repository().join("deploy/prometheus/alerts.yml"),
    )?;

    // Prometheus must have the counters at 0 before anything happens: a counter's first sample
    // is no increase.
    prometheus.wait_until_ready().await?;
    wait_for_scrape(&prometheus, "syncd-coordinator").await?;
    // The factory's runs allow 3 attempts: object 2 fails twice (retried), then for good.
    // Both decisions are made whatever the groups' ids: object 3's images are painted black.
    factory.create_run_with("observed", 8, FILTER_ONLY_DARK_FAILS_ON_LOOKS)?;
    // First workers that crash on object 1, announcing every second so that they are soon
    // missed.
    // Every worker fails object 2 on every attempt (retried, then failed), whoever takes it.
    let worker = |metrics: &str, marker: (&'static str, &'static str)| {
        let mut variables = vec![
            ("SYNCD_METRICS__LISTEN", metrics.to_string()),
            ("SYNCD_WORKER__ANNOUNCE_SECS", "1".to_string()),
            ("SYNCD_TEST_FAIL_ON", "markings number 2".to_string()),
            ("SYNCD_TEST_DARK_ON", "markings number 3".to_string()),
            (marker.0, marker.1.to_string()),
        ];
        variables.extend(otel.map(|(key, value)| (key, value.to_string())));
        variables
    };
    // The broker dead-letters a message returned more often than the limit: the second of two
    // crashing workers taking it does it.
    for (name, metrics) in [
        ("crashing-0", &worker_metrics[0]),
        ("crashing-1", &worker_metrics[2]),
    ] {
        let crashing = worker(metrics, ("SYNCD_TEST_CRASH_ON", "markings number 1"));
        // Slow on every other job, so that they crash early and make few spans: an aborted
        // process never sends its last ones.
        factory.start_worker_env(name, 1000, &["generate", "score"], &borrowed(&crashing))?;
    }
    factory
        .wait_for_dead_letters()
        .await
        .with_context(|| factory.logs())?;
    // Then one that does the rest.
    let steady = worker(
        &worker_metrics[1],
        ("SYNCD_WORKER__SHUTDOWN_GRACE_SECS", "30"),
    );
    factory.start_worker_env("steady", 0, &["generate", "score"], &borrowed(&steady))?;
    let status = factory
        .wait_until_completed("observed", Duration::from_secs(120))
        .await?;
    let groups = &status["groups"];
    assert!(
        groups["accepted"].as_i64() > Some(0) && groups["rejected"].as_i64() > Some(0),
        "the run needs both decisions: {status}"
    );
    assert!(groups["failed"].as_i64() >= Some(2), "{status}");

    every_panel_has_data(&prometheus).await?;
    alert_rules_evaluate_and_fire(&prometheus).await?;

    // Stopping the processes flushes their last spans.
    let pool = factory.env.pool().await?;
    for worker in &mut factory.workers {
        if worker.is_running() {
            worker.terminate(Duration::from_secs(20))?;
        }
    }
    if let Some(coordinator) = &mut factory.coordinator {
        coordinator.terminate(Duration::from_secs(20))?;
    }
    one_trace_per_group(&pool, &receiver).await?;
    factory.finish().await
}

async fn wait_for_scrape(prometheus: &Prometheus, job: &str) -> Result<()> {
    let query = format!("up{{job={job:?}}} == 1");
    syncd_tests::processes::wait_for(
        &format!("Prometheus to scrape {job}"),
        Duration::from_secs(60),
        || async { Ok((!prometheus.query(&query).await?.is_empty()).then_some(())) },
    )
    .await
}

fn borrowed<'a>(variables: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    variables
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .collect()
}

/// Every query of every panel of the shipped dashboard, with Grafana's variables as a user who
/// picked "All" would have them.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = repository().join("deploy/grafana/dashboards/syncd.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = panels.pop() {
        // Collapsed rows hold their panels.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or_default().to_string();
                queries.push((title, grafana_variables(expr)));
            }
        }
    }
    assert!(queries.len() > 10, "{queries:?}");
    Ok(queries)
}

/// `$__range` (the dashboard's time range) as 10 minutes, `$__rate_interval` as one minute, and
/// every template variable (`$run`, `${kind}`) as "all", `.*`.
fn grafana_variables(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("${__range}", "10m")
        .replace("$__range", "10m")
        .replace("$__interval", "15s");
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
            }
        } else {
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
        }
        out.push_str(".*");
    }
    out
}

/// Polls until every panel's query returns at least one series (rates need two scrapes), or
/// fails naming the empty ones.
async fn every_panel_has_data(prometheus: &Prometheus) -> Result<()> {
    let queries = dashboard_queries()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut empty = Vec::new();
        for (title, query) in &queries {
            if query.contains(NEEDS_A_GPU) {
                continue;
            }
            if prometheus.query(query).await?.is_empty() {
                empty.push(format!("{title}: {query}"));
            }
        }
        if empty.is_empty() {
            let checked = queries
                .iter()
                .filter(|(_, query)| !query.contains(NEEDS_A_GPU))
                .count();
            eprintln!("{checked} dashboard queries returned data");
            return Ok(());
        }
        if Instant::now() > deadline {
            let targets = prometheus.targets().await?;
            anyhow::bail!(
                "dashboard queries without data:\n{}\ntargets: {targets:#?}\n{}",
                empty.join("\n"),
                prometheus.process.log_text()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Every rule of `deploy/prometheus/alerts.yml` loads and evaluates without error, and the
/// alerts for a dead letter and a lost worker are raised (pending until their `for` passes).
async fn alert_rules_evaluate_and_fire(prometheus: &Prometheus) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rules: Vec<Value> = prometheus
            .rule_groups()
            .await?
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let unhealthy: Vec<&Value> = rules.iter().filter(|rule| rule["health"] != "ok").collect();
        let active: BTreeSet<&str> = rules
            .iter()
            .filter(|rule| rule["state"] == "pending" || rule["state"] == "firing")
            .filter_map(|rule| rule["name"].as_str())
            .collect();
        let wanted = ["SyncdDeadLettersRising", "SyncdWorkerLost"];
        if !rules.is_empty()
            && unhealthy.is_empty()
            && wanted.iter().all(|name| active.contains(name))
        {
            assert!(rules.len() >= 3, "{rules:#?}");
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "alert rules: {} loaded, unhealthy {unhealthy:#?}, active {active:?} (wanted \
                 {wanted:?})\n{}",
                rules.len(),
                prometheus.process.log_text()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Each generated group's trace (kept in `groups.traceparent`) holds its dispatches, the worker's
/// job spans and S3 uploads in them, and the coordinator applying the reports. Checked for the
/// groups the steady worker made: the crashing workers were aborted before sending their spans.
async fn one_trace_per_group(pool: &sqlx::PgPool, receiver: &OtlpReceiver) -> Result<()> {
    let groups: Vec<(uuid::Uuid, Option<String>, String)> = sqlx::query_as(
        "SELECT id, traceparent, decision FROM groups g WHERE image_keys IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.group_id = g.id
                           AND j.worker IS DISTINCT FROM 'steady')",
    )
    .fetch_all(pool)
    .await?;
    assert!(groups.len() >= 4, "{groups:?}");
    for (group, traceparent, decision) in &groups {
        let traceparent = traceparent
            .as_deref()
            .with_context(|| format!("group {group} kept no trace context"))?;
        let trace_id = traceparent.split('-').nth(1).context("traceparent")?;
        let trace = receiver.trace(trace_id);
        let named = |service: &str, name: &str| -> Vec<&ReceivedSpan> {
            trace
                .iter()
                .filter(|span| span.service == service && span.name == name)
                .collect()
        };
        let context = || format!("group {group} ({decision}), trace {trace_id}: {trace:#?}");
        let dispatches = named("syncd-coordinator", "dispatch");
        let kinds: BTreeSet<&str> = dispatches
            .iter()
            .filter_map(|span| span.attributes.get("kind").map(String::as_str))
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from(["generate", "score"]),
            "{}",
            context()
        );
        let jobs = named("syncd-test-worker", "job");
        assert!(jobs.len() >= 2, "{}", context());
        // Each worker span hangs from a dispatch of the coordinator: the context crossed
        // RabbitMQ.
        let dispatch_ids: BTreeSet<&str> = dispatches
            .iter()
            .map(|span| span.span_id.as_str())
            .collect();
        assert!(
            jobs.iter()
                .all(|job| dispatch_ids.contains(job.parent_span_id.as_str())),
            "{}",
            context()
        );
        let job_ids: BTreeSet<&str> = jobs.iter().map(|span| span.span_id.as_str()).collect();
        let uploads = named("syncd-test-worker", "s3 put");
        assert!(
            uploads.len() >= 6
                && uploads
                    .iter()
                    .all(|upload| job_ids.contains(upload.parent_span_id.as_str())),
            "three images and three masks, in the generation job's span: {}",
            context()
        );
        let applied = named("syncd-coordinator", "apply report");
        assert!(
            applied.len() >= 4
                && applied
                    .iter()
                    .all(|span| job_ids.contains(span.parent_span_id.as_str())),
            "started and succeeded, of both jobs, applied in their traces: {}",
            context()
        );
    }
    Ok(())
}
