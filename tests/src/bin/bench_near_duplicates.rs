//! `syncd-bench-near-duplicates`: the cost of one near-duplicate check as a run grows, on the real
//! PostgreSQL of this machine, with 1024-dim embeddings (DINOv2-L's size).
//!
//! It fills a synthetic run (its own database, dropped at the end) with accepted groups of three
//! random unit vectors through `near_duplicates::add`, and at each size checks candidates, a
//! fifth of them near copies of accepted groups (cosine 0.99), two ways side by side:
//!
//! - **index**: `near_duplicates::find`, what the coordinator runs in a report's transaction;
//! - **scan**: the exact rule over every accepted group held in memory, as the coordinator did
//!   before the index (without its reload from the database on a restart).
//!
//! It prints, per size, the median and 99th percentile of each, the index's cost relative to the
//! smallest size, and the index's speed-up over the scan; and checks that both decided alike.
//!
//! ```sh
//! . scripts/env.sh && set -a && . ~/.cache/syncd/services.env && set +a
//! cargo run --release -p syncd-tests --bin syncd-bench-near-duplicates -- --sizes 1000,10000,100000
//! ```

use anyhow::{bail, Result};
use clap::Parser;
use std::time::{Duration, Instant};
use syncd_coordinator::near_duplicates;
use syncd_proto::dedup::{signature_miss_probability, NearDuplicateIndex};
use syncd_tests::env::TestEnv;
use syncd_tests::synthetic::{SyntheticRun, UnitVectors};

#[derive(Parser)]
struct Args {
    /// Accepted groups at which to measure, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// Checks per size.
    #[arg(long, default_value_t = 200)]
    checks: usize,
    /// Groups added per transaction while filling.
    #[arg(long, default_value_t = 500)]
    batch: usize,
}

const DIMENSION: usize = 1024;
const THRESHOLD: f32 = 0.98;

struct Row {
    size: usize,
    fill_per_group: Duration,
    index: (Duration, Duration),
    scan: (Duration, Duration),
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty() || args.sizes.windows(2).any(|pair| pair[0] >= pair[1]) {
        bail!("--sizes must be ascending");
    }
    let env = TestEnv::new().await?;
    let pool = env.migrated_pool().await?;
    let mut run = SyntheticRun::create(&pool, "near-duplicate-bench").await?;
    let mut vectors = UnitVectors::new(2026);
    let mut exact = NearDuplicateIndex::new(THRESHOLD);
    let mut accepted: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let fill_started = Instant::now();
        let added = size - accepted.len();
        while accepted.len() < size {
            let count = args.batch.min(size - accepted.len());
            let ids = run.add_groups(&pool, count).await?;
            let mut tx = pool.begin().await?;
            for id in ids {
                let group: Vec<Vec<f32>> = (0..3).map(|_| vectors.unit(DIMENSION)).collect();
                let buckets = near_duplicates::buckets(run.id, &group);
                near_duplicates::add(&mut tx, run.id, id, &group, &buckets).await?;
                exact.insert(id, group.clone())?;
                accepted.push(group);
            }
            tx.commit().await?;
        }
        let fill_per_group = fill_started.elapsed() / added.max(1) as u32;
        sqlx::query("ANALYZE near_duplicate_images, near_duplicate_buckets")
            .execute(&pool)
            .await?;

        let mut index_times = Vec::with_capacity(args.checks);
        let mut scan_times = Vec::with_capacity(args.checks);
        for check in 0..args.checks {
            let candidate: Vec<Vec<f32>> = if check % 5 == 0 {
                let original = &accepted[(check * 7919) % accepted.len()];
                original
                    .iter()
                    .map(|image| vectors.at_cosine(image, 0.99))
                    .collect()
            } else {
                (0..3).map(|_| vectors.unit(DIMENSION)).collect()
            };
            let started = Instant::now();
            let mut conn = pool.acquire().await?;
            let buckets = near_duplicates::buckets(run.id, &candidate);
            let indexed =
                near_duplicates::find(&mut conn, run.id, &candidate, &buckets, THRESHOLD).await?;
            index_times.push(started.elapsed());
            drop(conn);
            let started = Instant::now();
            let scanned = exact.is_near_duplicate(&candidate);
            scan_times.push(started.elapsed());
            if indexed.map(|found| found.0) != scanned.map(|found| found.0) {
                bail!(
                    "the index and the scan disagree at {size} groups: {indexed:?} vs {scanned:?}"
                );
            }
        }
        let row = Row {
            size,
            fill_per_group,
            index: percentiles(&mut index_times),
            scan: percentiles(&mut scan_times),
        };
        println!(
            "{:>8} groups: index p50 {:>8.2} ms p99 {:>8.2} ms | scan p50 {:>9.2} ms p99 {:>9.2} ms | add {:.2} ms/group",
            row.size,
            ms(row.index.0),
            ms(row.index.1),
            ms(row.scan.0),
            ms(row.scan.1),
            ms(row.fill_per_group)
        );
        rows.push(row);
    }

    let first = &rows[0];
    println!("\nnear-duplicate check, {DIMENSION}-dim embeddings, 3 images per group, threshold {THRESHOLD}, {} checks per size (a fifth of them near copies)", args.checks);
    println!("| accepted groups | index p50 | index p99 | index p50 vs {} | scan p50 | scan p50 vs {} | index speed-up (p50) |", first.size, first.size);
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2}× | {:.2} ms | {:.2}× | {:.1}× |",
            row.size,
            ms(row.index.0),
            ms(row.index.1),
            ms(row.index.0) / ms(first.index.0),
            ms(row.scan.0),
            ms(row.scan.0) / ms(first.scan.0),
            ms(row.scan.0) / ms(row.index.0)
        );
    }
    println!(
        "a pair at the threshold is missed with probability {:.1e}; every check above decided as the scan",
        signature_miss_probability(f64::from(THRESHOLD))
    );
    pool.close().await;
    env.drop_database().await?;
    env.cleanup().await
}

/// The median and the 99th percentile.
fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at = |quantile: f64| times[((times.len() - 1) as f64 * quantile).round() as usize];
    (at(0.5), at(0.99))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
