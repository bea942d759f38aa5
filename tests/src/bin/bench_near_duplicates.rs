//! `syncd-bench-near-duplicates`: the cost of one near-duplicate check as a run grows, on the real
//! PostgreSQL of this machine, with 1024-dim embeddings (DINOv2-L's size).
//!
//! It fills a synthetic run (its own database, dropped at the end) with accepted groups of three
//! random unit vectors through `near_duplicates::add_many`, and at each size checks candidates, a
//! fifth of them near copies of accepted groups (cosine 0.99), two ways side by side:
//!
//! - **index**: `near_duplicates::find`, what the coordinator runs in a report's transaction;
//! - **scan**: the exact rule over every accepted group held in memory, as the coordinator did
//!   before the index (without its reload from the database on a restart).
//!
//! It prints, per size, the median and 99th percentile of each, the index's cost relative to the
//! smallest size, the index's speed-up over the scan, and how many accepted groups each check
//! met: those sharing a bucket with the candidate (whose sketches it read) and those it compared
//! exactly (whose embeddings it read); and checks that both ways decided alike.
//!
//! It then checks the same candidates `--report-batch` to a transaction, as the results consumer
//! applies a batch of reports, two ways side by side: each check reading the index itself, and
//! the batch's reads made at once first (`near_duplicates::prefetch`, which the consumer does),
//! and prints the mean time per check of each and their ratio.
//!
//! Random vectors in 1024 dimensions are nearly orthogonal, so they share almost no bucket, the
//! most favourable case for the index. Real embeddings are not: objects of one category look
//! alike. `--categories K` draws each group from one of K categories instead, its images at
//! cosine `--category-similarity` (0.6 by default) to every image of another group of the same
//! category, so that the groups a check meets, and their growth with the run, can be seen for
//! such data.
//!
//! ```sh
//! . scripts/env.sh && set -a && . ~/.cache/syncd/services.env && set +a
//! cargo run --release -p syncd-tests --bin syncd-bench-near-duplicates -- --sizes 1000,10000,100000
//! cargo run --release -p syncd-tests --bin syncd-bench-near-duplicates -- --categories 16
//! ```

use anyhow::{bail, Result};
use clap::Parser;
use std::time::{Duration, Instant};
use syncd_coordinator::near_duplicates;
use syncd_proto::dedup::{signature_miss_probability, NearDuplicateIndex};
use syncd_proto::GroupId;
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
    /// Categories the groups are drawn from (0: every image an independent random vector).
    #[arg(long, default_value_t = 0)]
    categories: usize,
    /// The cosine between images of two different groups of one category.
    #[arg(long, default_value_t = 0.6)]
    category_similarity: f32,
    /// Checks per transaction in the batched comparison.
    #[arg(long, default_value_t = 64)]
    report_batch: usize,
}

/// Where the bench's groups come from: independent random images, or images around their
/// category's centre.
struct Groups {
    vectors: UnitVectors,
    /// Each category's centre, with every image of the category at `to_centre` from it.
    centres: Vec<Vec<f32>>,
    to_centre: f32,
    drawn: usize,
}

impl Groups {
    fn new(categories: usize, similarity: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&similarity) {
            bail!("--category-similarity must be in [0, 1)");
        }
        let mut vectors = UnitVectors::new(2026);
        let centres = (0..categories).map(|_| vectors.unit(DIMENSION)).collect();
        // Two images at cosine c to one centre, their other parts nearly orthogonal in 1024
        // dimensions, are at cosine c² to each other.
        Ok(Self {
            vectors,
            centres,
            to_centre: similarity.sqrt(),
            drawn: 0,
        })
    }

    /// A new group of three images, from the categories in turn.
    fn next(&mut self) -> Vec<Vec<f32>> {
        self.drawn += 1;
        match self.centres.get(self.drawn % self.centres.len().max(1)) {
            Some(centre) => (0..3)
                .map(|_| self.vectors.at_cosine(centre, self.to_centre))
                .collect(),
            None => (0..3).map(|_| self.vectors.unit(DIMENSION)).collect(),
        }
    }

    /// A near copy of `group`: each image at cosine 0.99 to the original's.
    fn near_copy(&mut self, group: &[Vec<f32>]) -> Vec<Vec<f32>> {
        group
            .iter()
            .map(|image| self.vectors.at_cosine(image, 0.99))
            .collect()
    }
}

const DIMENSION: usize = 1024;
const THRESHOLD: f32 = 0.98;

struct Row {
    size: usize,
    fill_per_group: Duration,
    index: (Duration, Duration),
    scan: (Duration, Duration),
    sketched: (usize, usize),
    compared: (usize, usize),
    /// Mean time per check in batches: each check reading for itself, and the reads made at once.
    batched: (Duration, Duration),
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
    let mut groups = Groups::new(args.categories, args.category_similarity)?;
    let mut exact = NearDuplicateIndex::new(THRESHOLD);
    let mut accepted: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let fill_started = Instant::now();
        let added = size - accepted.len();
        while accepted.len() < size {
            let count = args.batch.min(size - accepted.len());
            let ids = run.add_groups(&pool, count).await?;
            let mut batch = Vec::new();
            for id in ids {
                let group = groups.next();
                let signatures = near_duplicates::Signatures::of(run.id, &group);
                batch.extend(near_duplicates::AcceptedGroup::new(
                    run.id,
                    id,
                    group.clone(),
                    signatures,
                ));
                exact.insert(id, group.clone())?;
                accepted.push(group);
            }
            let mut tx = pool.begin().await?;
            near_duplicates::add_many(&mut tx, &batch).await?;
            tx.commit().await?;
        }
        let fill_per_group = fill_started.elapsed() / added.max(1) as u32;
        sqlx::query("ANALYZE near_duplicate_images, near_duplicate_buckets")
            .execute(&pool)
            .await?;

        let mut index_times = Vec::with_capacity(args.checks);
        let mut scan_times = Vec::with_capacity(args.checks);
        let mut sketched = Vec::with_capacity(args.checks);
        let mut compared = Vec::with_capacity(args.checks);
        let mut candidates = Vec::with_capacity(args.checks);
        let mut decisions = Vec::with_capacity(args.checks);
        for check in 0..args.checks {
            let candidate = if check % 5 == 0 {
                groups.near_copy(&accepted[(check * 7919) % accepted.len()])
            } else {
                groups.next()
            };
            let started = Instant::now();
            let mut conn = pool.acquire().await?;
            let signatures = near_duplicates::Signatures::of(run.id, &candidate);
            let indexed = near_duplicates::find(
                &mut conn,
                run.id,
                &candidate,
                &signatures,
                THRESHOLD,
                &mut near_duplicates::IndexedRuns::default(),
                &mut near_duplicates::IndexReads::default(),
                &[],
            )
            .await?;
            index_times.push(started.elapsed());
            sketched.push(indexed.sketched);
            compared.push(indexed.compared);
            let indexed = indexed.duplicate_of;
            drop(conn);
            let started = Instant::now();
            let scanned = exact.is_near_duplicate(&candidate);
            scan_times.push(started.elapsed());
            if indexed.map(|found| found.0) != scanned.map(|found| found.0) {
                bail!(
                    "the index and the scan disagree at {size} groups: {indexed:?} vs {scanned:?}"
                );
            }
            candidates.push(candidate);
            decisions.push(indexed);
        }
        let mut batched = [Duration::ZERO; 2];
        for (way, read_at_once) in [false, true].into_iter().enumerate() {
            let (took, found) =
                check_in_batches(&pool, &run, &candidates, args.report_batch, read_at_once).await?;
            if found != decisions {
                bail!("checks in batches decided otherwise at {size} groups");
            }
            batched[way] = took / candidates.len() as u32;
        }
        let row = Row {
            size,
            fill_per_group,
            index: percentiles(&mut index_times),
            scan: percentiles(&mut scan_times),
            sketched: percentiles(&mut sketched),
            compared: percentiles(&mut compared),
            batched: (batched[0], batched[1]),
        };
        println!(
            "{:>8} groups: index p50 {:>8.2} ms p99 {:>8.2} ms, sharing a bucket p50 {} p99 {}, compared p50 {} p99 {} | scan p50 {:>9.2} ms p99 {:>9.2} ms | add {:.2} ms/group",
            row.size,
            ms(row.index.0),
            ms(row.index.1),
            row.sketched.0,
            row.sketched.1,
            row.compared.0,
            row.compared.1,
            ms(row.scan.0),
            ms(row.scan.1),
            ms(row.fill_per_group)
        );
        rows.push(row);
    }

    let first = &rows[0];
    let drawn_from = match args.categories {
        0 => "independent random images".to_string(),
        categories => format!(
            "{categories} categories, cosine {} between groups of one category",
            args.category_similarity
        ),
    };
    println!("\nnear-duplicate check, {DIMENSION}-dim embeddings, 3 images per group, {drawn_from}, threshold {THRESHOLD}, {} checks per size (a fifth of them near copies)", args.checks);
    println!("| accepted groups | index p50 | index p99 | index p50 vs {} | groups sharing a bucket p50 / p99 | groups compared p50 / p99 | scan p50 | scan p50 vs {} | index speed-up (p50) |", first.size, first.size);
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2}× | {} / {} | {} / {} | {:.2} ms | {:.2}× | {:.1}× |",
            row.size,
            ms(row.index.0),
            ms(row.index.1),
            ms(row.index.0) / ms(first.index.0),
            row.sketched.0,
            row.sketched.1,
            row.compared.0,
            row.compared.1,
            ms(row.scan.0),
            ms(row.scan.0) / ms(first.scan.0),
            ms(row.scan.0) / ms(row.index.0)
        );
    }
    println!(
        "a pair at the threshold is missed with probability {:.1e}; every check above decided as the scan",
        signature_miss_probability(f64::from(THRESHOLD))
    );
    println!(
        "\nthe same checks, {} to a transaction (mean per check)",
        args.report_batch
    );
    println!("| accepted groups | each check reading | a batch's reads at once | speed-up |");
    println!("| ---: | ---: | ---: | ---: |");
    for row in &rows {
        let (alone, at_once) = row.batched;
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2}× |",
            row.size,
            ms(alone),
            ms(at_once),
            ms(alone) / ms(at_once)
        );
    }
    pool.close().await;
    env.drop_database().await?;
    env.cleanup().await
}

/// Checks `candidates` `batch` to a transaction (rolled back: a check writes nothing), each
/// check reading the index itself or, with `read_at_once`, the batch's reads made first.
/// Returns the time taken and each check's finding.
async fn check_in_batches(
    pool: &sqlx::PgPool,
    run: &SyntheticRun,
    candidates: &[Vec<Vec<f32>>],
    batch: usize,
    read_at_once: bool,
) -> Result<(Duration, Vec<Option<(GroupId, f32)>>)> {
    let started = Instant::now();
    let mut found = Vec::with_capacity(candidates.len());
    for transaction in candidates.chunks(batch.max(1)) {
        let mut tx = pool.begin().await?;
        let signatures: Vec<_> = transaction
            .iter()
            .map(|candidate| near_duplicates::Signatures::of(run.id, candidate))
            .collect();
        let (mut indexed, mut shared) = Default::default();
        if read_at_once {
            let batch: Vec<_> = signatures
                .iter()
                .map(|signatures| near_duplicates::Candidate {
                    run: run.id,
                    signatures,
                    threshold: THRESHOLD,
                })
                .collect();
            near_duplicates::prefetch(&mut tx, &batch, &mut indexed, &mut shared).await?;
        }
        for (candidate, signatures) in transaction.iter().zip(&signatures) {
            let mut own = near_duplicates::IndexReads::default();
            let reads = if read_at_once { &mut shared } else { &mut own };
            let check = near_duplicates::find(
                &mut tx,
                run.id,
                candidate,
                signatures,
                THRESHOLD,
                &mut indexed,
                reads,
                &[],
            )
            .await?;
            found.push(check.duplicate_of);
        }
        tx.rollback().await?;
    }
    Ok((started.elapsed(), found))
}

/// The median and the 99th percentile.
fn percentiles<T: Ord + Copy>(values: &mut [T]) -> (T, T) {
    values.sort();
    let at = |quantile: f64| values[((values.len() - 1) as f64 * quantile).round() as usize];
    (at(0.5), at(0.99))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
