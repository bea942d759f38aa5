//! The near-duplicate index (`syncd_coordinator::near_duplicates`) against the exact rule
//! (`syncd_proto::dedup::NearDuplicateIndex`), on the real PostgreSQL with 1024-dim embeddings,
//! and a whole factory's near-duplicate decisions across a coordinator restart.

use anyhow::{Context, Result};
use serde_json::Value;
use sqlx::migrate::Migrator;
use std::collections::HashMap;
use std::time::Duration;
use syncd_coordinator::db::MIGRATOR;
use syncd_coordinator::near_duplicates;
use syncd_proto::dedup::{signature, sketch_bound, NearDuplicateIndex, Signature};
use syncd_proto::GroupId;
use syncd_tests::env::TestEnv;
use syncd_tests::factory::{assert_exactly_once, Factory};
use syncd_tests::synthetic::{SyntheticRun, UnitVectors};

const DIMENSION: usize = 1024;

fn shares_a_band(a: &Signature, b: &Signature) -> bool {
    a.buckets.iter().zip(&b.buckets).any(|(x, y)| x == y)
}

#[test]
fn signatures_find_pairs_at_the_threshold_and_almost_never_unrelated_ones() {
    let mut vectors = UnitVectors::new(42);
    let salt = 0xfeed_u128;
    let pairs = 300;
    let (mut found, mut collisions) = (0, 0);
    for _ in 0..pairs {
        let base = vectors.unit(DIMENSION);
        let near = vectors.at_cosine(&base, 0.98);
        let unrelated = vectors.unit(DIMENSION);
        let key = signature(salt, &base);
        found += usize::from(shares_a_band(&key, &signature(salt, &near)));
        collisions += usize::from(shares_a_band(&key, &signature(salt, &unrelated)));
    }
    // Expected misses: 300 × 2.3e-5; expected collisions: 300 × 40 / 2^22.
    assert_eq!(found, pairs, "every pair at the threshold shares a band");
    assert_eq!(collisions, 0, "no unrelated pair does");
}

#[test]
fn sketches_keep_every_pair_at_the_threshold_and_rule_out_images_of_one_kind() {
    let mut vectors = UnitVectors::new(43);
    let bound = sketch_bound(0.98);
    let sketch = |embedding: &[f32]| signature(0, embedding).sketch;
    let (mut most_at_threshold, mut fewest_of_one_kind) = (0, u32::MAX);
    for _ in 0..1000 {
        let base = vectors.unit(DIMENSION);
        let at_threshold = vectors.at_cosine(&base, 0.98);
        let of_one_kind = vectors.at_cosine(&base, 0.6);
        let base = sketch(&base);
        most_at_threshold = most_at_threshold.max(base.disagreements(&sketch(&at_threshold)));
        fewest_of_one_kind = fewest_of_one_kind.min(base.disagreements(&sketch(&of_one_kind)));
    }
    // About 56 bits at 0.98 and 260 at 0.6 on average, the bound about 100.
    assert!(
        most_at_threshold <= bound && bound < fewest_of_one_kind,
        "at the threshold at most {most_at_threshold}, bound {bound}, at 0.6 at least {fewest_of_one_kind}"
    );
}

/// A sequence of candidate groups: fresh ones, and near copies of earlier ones at cosines on
/// both sides of the default threshold 0.98 (each image of the copy at that cosine from the
/// same image of the original).
fn candidates(count: usize) -> Vec<Vec<Vec<f32>>> {
    let mut vectors = UnitVectors::new(7);
    let cosines = [0.9, 0.96, 0.975, 0.979, 0.981, 0.985, 0.995, 0.9999];
    let mut groups: Vec<Vec<Vec<f32>>> = Vec::new();
    for index in 0..count {
        let group = if index % 3 == 2 {
            let original = &groups[(index * 7919) % groups.len()];
            let cosine = cosines[index % cosines.len()];
            original
                .iter()
                .map(|image| vectors.at_cosine(image, cosine))
                .collect()
        } else {
            (0..3).map(|_| vectors.unit(DIMENSION)).collect()
        };
        groups.push(group);
    }
    groups
}

/// Decides every candidate in turn with the index and with the exact rule, accepting those that
/// are no near duplicate; returns how many were, and how many accepted groups the checks' sketches
/// ruled out (met through a bucket, or by the scan, and never compared), and how many near
/// duplicates were of a group not yet written. The candidates go
/// `per_transaction` at a time, as the results consumer applies a batch of reports: the groups a
/// transaction accepts are kept unwritten, for its later checks to compare in memory, and added
/// together at its end.
async fn decide_both_ways(
    pool: &sqlx::PgPool,
    run: &mut SyntheticRun,
    candidates: &[Vec<Vec<f32>>],
    threshold: f32,
    per_transaction: usize,
) -> Result<(usize, usize, usize)> {
    let ids = run.add_groups(pool, candidates.len()).await?;
    let mut exact = NearDuplicateIndex::new(threshold);
    let (mut duplicates, mut ruled_out, mut of_unwritten) = (0, 0, 0);
    let candidates: Vec<_> = ids.iter().zip(candidates).collect();
    for transaction in candidates.chunks(per_transaction) {
        let mut tx = pool.begin().await?;
        let mut unwritten = Vec::new();
        let signatures: Vec<_> = transaction
            .iter()
            .map(|(_, embeddings)| near_duplicates::Signatures::of(run.id, embeddings))
            .collect();
        // A batch reads the index for all its candidates first, as the results consumer does,
        // in three statements at most; its checks then read nothing.
        let (mut indexed, mut reads) = Default::default();
        if per_transaction > 1 {
            let batch: Vec<_> = signatures
                .iter()
                .map(|signatures| near_duplicates::Candidate {
                    run: run.id,
                    signatures,
                    threshold,
                })
                .collect();
            near_duplicates::prefetch(&mut tx, &batch, &mut indexed, &mut reads).await?;
            assert!(reads.statements() <= 3, "{} statements", reads.statements());
        }
        for (&(id, embeddings), signatures) in transaction.iter().zip(signatures) {
            let read_before = reads.statements();
            let check = near_duplicates::find(
                &mut tx,
                run.id,
                embeddings,
                &signatures,
                threshold,
                &mut indexed,
                &mut reads,
                &unwritten,
            )
            .await?;
            if per_transaction > 1 {
                assert_eq!(reads.statements(), read_before, "group {id} read again");
            }
            let expected = exact.is_near_duplicate(embeddings);
            assert_eq!(
                check
                    .duplicate_of
                    .map(|(group, similarity)| (group, similarity.to_bits())),
                expected.map(|(group, similarity)| (group, similarity.to_bits())),
                "group {id} at threshold {threshold}"
            );
            ruled_out += check.sketched - check.compared;
            if let Some((original, _)) = expected {
                duplicates += 1;
                of_unwritten += usize::from(unwritten.iter().any(|u| u.group == original));
            } else {
                unwritten.extend(near_duplicates::AcceptedGroup::new(
                    run.id,
                    *id,
                    embeddings.clone(),
                    signatures,
                ));
                exact.insert(*id, embeddings.clone())?;
            }
        }
        near_duplicates::add_many(&mut tx, &unwritten).await?;
        tx.commit().await?;
    }
    Ok((duplicates, ruled_out, of_unwritten))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_index_decides_as_the_exact_rule_and_keeps_its_decisions_across_connections(
) -> Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.migrated_pool().await?;
    let candidates = candidates(240);

    // Signatures, at the default threshold; a full scan below the signatures' floor; and each
    // way with a transaction's accepted groups written at its end.
    for (name, threshold, per_transaction) in [
        ("signatures", 0.98, 1),
        ("scan", 0.95, 1),
        ("signatures, in batches", 0.98, 16),
        ("scan, in batches", 0.95, 16),
    ] {
        let mut run = SyntheticRun::create(&pool, name).await?;
        let (duplicates, ruled_out, of_unwritten) =
            decide_both_ways(&pool, &mut run, &candidates, threshold, per_transaction).await?;
        assert_eq!(
            of_unwritten > 0,
            per_transaction > 1,
            "{name}: a transaction's own accepted groups are met ({of_unwritten})"
        );
        let copies_at_or_above = (0..candidates.len()).filter(|index| index % 3 == 2).count();
        assert!(
            duplicates > 20 && duplicates < copies_at_or_above,
            "the sequence has near duplicates and copies below the threshold ({duplicates})"
        );
        // Copies at cosine 0.9 share a bucket with their original three times in four, and the
        // scan meets every accepted group: the sketches rule most of those out.
        assert!(ruled_out > 0, "{name}: the sketches ruled nothing out");
    }

    // The index lives in the database: a fresh pool (a restarted coordinator) answers the same.
    let restarted = env.migrated_pool().await?;
    let run: (uuid::Uuid,) = sqlx::query_as("SELECT id FROM runs WHERE name = 'signatures'")
        .fetch_one(&restarted)
        .await?;
    let run = syncd_proto::RunId(run.0);
    let mut exact = NearDuplicateIndex::new(0.98);
    let accepted: Vec<(uuid::Uuid, i16, Vec<f32>)> = sqlx::query_as(
        "SELECT group_id, image, embedding FROM near_duplicate_images WHERE run_id = $1
         ORDER BY group_id, image",
    )
    .bind(run.0)
    .fetch_all(&restarted)
    .await?;
    for chunk in accepted.chunk_by(|a, b| a.0 == b.0) {
        exact.insert(
            GroupId(chunk[0].0),
            chunk.iter().map(|row| row.2.clone()).collect(),
        )?;
    }
    let check_every_candidate = || async {
        let mut checks = Vec::new();
        for embeddings in &candidates {
            let mut conn = restarted.acquire().await?;
            let signatures = near_duplicates::Signatures::of(run, embeddings);
            let check = near_duplicates::find(
                &mut conn,
                run,
                embeddings,
                &signatures,
                0.98,
                &mut near_duplicates::IndexedRuns::default(),
                &mut near_duplicates::IndexReads::default(),
                &[],
            )
            .await?;
            assert_eq!(check.duplicate_of, exact.is_near_duplicate(embeddings));
            checks.push(check);
        }
        anyhow::Ok(checks)
    };
    check_every_candidate().await?;

    // Images indexed before sketches were kept have none: their groups are compared whatever the
    // sketches would say, and decide the same.
    sqlx::query("UPDATE near_duplicate_images SET sketch = NULL WHERE run_id = $1")
        .bind(run.0)
        .execute(&restarted)
        .await?;
    for check in check_every_candidate().await? {
        assert_eq!(check.compared, check.sketched, "{check:?}");
    }
    env.cleanup().await
}

/// A database written before groups kept their embeddings as `real[]`: the migration converts
/// the JSON embeddings bit for bit (and keeps none of a group whose images' embeddings differ in
/// length), and a run decided before the index existed is indexed from them by its first check,
/// which then decides every candidate as the exact rule does.
#[tokio::test(flavor = "multi_thread")]
async fn json_embeddings_are_converted_and_index_a_run_decided_before_the_index() -> Result<()> {
    const EMBEDDINGS_AS_REALS: i64 = 20261203000000;
    let env = TestEnv::new().await?;
    let old = env.pool().await?;
    Migrator {
        migrations: MIGRATOR
            .migrations
            .iter()
            .filter(|migration| migration.version < EMBEDDINGS_AS_REALS)
            .cloned()
            .collect(),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
    .run(&old)
    .await?;

    // Decided as the coordinator did then: the candidates that are no near duplicate of a group
    // accepted before them are accepted, with their embeddings as JSON.
    let candidates = candidates(90);
    let mut run = SyntheticRun::create(&old, "json").await?;
    let ids = run.add_groups(&old, candidates.len() + 1).await?;
    let accept = |group: GroupId, embeddings: Value| {
        sqlx::query(
            "UPDATE groups SET decision = 'accepted', decided_at = clock_timestamp(),
                 embeddings = $2
             WHERE id = $1",
        )
        .bind(group.0)
        .bind(embeddings)
        .execute(&old)
    };
    let mut exact = NearDuplicateIndex::new(0.98);
    let mut accepted = HashMap::new();
    for (id, embeddings) in ids.iter().zip(&candidates) {
        if exact.is_near_duplicate(embeddings).is_none() {
            accept(*id, serde_json::to_value(embeddings)?).await?;
            exact.insert(*id, embeddings.clone())?;
            accepted.insert(*id, embeddings.clone());
        }
    }
    let mixed_lengths = ids[candidates.len()];
    accept(mixed_lengths, serde_json::json!([[1.0, 0.0], [1.0]])).await?;
    sqlx::query("INSERT INTO near_duplicate_backfills (run_id) VALUES ($1)")
        .bind(run.id.0)
        .execute(&old)
        .await?;
    old.close().await;

    let pool = env.migrated_pool().await?;
    let mut conn = pool.acquire().await?;
    let stored: HashMap<GroupId, Vec<Vec<f32>>> =
        syncd_coordinator::db::groups::accepted_embeddings_of_run(&mut conn, run.id)
            .await?
            .into_iter()
            .collect();
    let bits = |embeddings: &[Vec<f32>]| -> Vec<Vec<u32>> {
        embeddings
            .iter()
            .map(|image| image.iter().map(|value| value.to_bits()).collect())
            .collect()
    };
    assert_eq!(stored.len(), accepted.len() + 1);
    for (group, embeddings) in &accepted {
        assert_eq!(bits(&stored[group]), bits(embeddings), "group {group}");
    }
    assert!(stored[&mixed_lengths].is_empty());

    // Read ahead for all the candidates as a batch of reports is: the backfill comes first, so
    // the reads see the groups it indexes, and the checks then read nothing more.
    let signatures: Vec<_> = candidates
        .iter()
        .map(|embeddings| near_duplicates::Signatures::of(run.id, embeddings))
        .collect();
    let batch: Vec<_> = signatures
        .iter()
        .map(|signatures| near_duplicates::Candidate {
            run: run.id,
            signatures,
            threshold: 0.98,
        })
        .collect();
    let (mut indexed, mut reads) = Default::default();
    near_duplicates::prefetch(&mut conn, &batch, &mut indexed, &mut reads).await?;
    let read_ahead = reads.statements();
    for (embeddings, signatures) in candidates.iter().zip(&signatures) {
        let check = near_duplicates::find(
            &mut conn,
            run.id,
            embeddings,
            signatures,
            0.98,
            &mut indexed,
            &mut reads,
            &[],
        )
        .await?;
        assert_eq!(check.duplicate_of, exact.is_near_duplicate(embeddings));
    }
    assert_eq!(
        reads.statements(),
        read_ahead,
        "the checks read nothing more"
    );
    let (backfills,): (i64,) = sqlx::query_as("SELECT count(*) FROM near_duplicate_backfills")
        .fetch_one(&pool)
        .await?;
    assert_eq!(backfills, 0, "the run was indexed once");
    drop(conn);
    env.cleanup().await
}

/// Replays a finished run's decisions with the exact rule, in the order they were made: every
/// group that passed the filter is a near duplicate exactly when the exact rule over the groups
/// accepted before it says so, and of the same group.
async fn assert_decisions_follow_the_exact_rule(pool: &sqlx::PgPool) -> Result<usize> {
    // Id, decision, reason, and the embeddings' values and length.
    type Decided = (uuid::Uuid, String, Option<String>, Vec<f32>, i32);
    let decided: Vec<Decided> = sqlx::query_as(
        "SELECT id, decision, reason,
                ARRAY(SELECT value FROM unnest(embeddings) WITH ORDINALITY AS e (value, position)
                      ORDER BY position),
                array_length(embeddings, 2)
         FROM groups
         WHERE decision IN ('accepted', 'near_duplicate') ORDER BY decided_at, id",
    )
    .fetch_all(pool)
    .await?;
    let mut exact = NearDuplicateIndex::default();
    let mut duplicates = 0;
    for (id, decision, reason, values, dimension) in decided {
        let embeddings: Vec<Vec<f32>> = values
            .chunks(usize::try_from(dimension)?)
            .map(<[f32]>::to_vec)
            .collect();
        match exact.is_near_duplicate(&embeddings) {
            Some((original, _)) => {
                duplicates += 1;
                assert_eq!(decision, "near_duplicate", "group {id}");
                let reason = reason.context("a near duplicate's reason")?;
                assert!(
                    reason.contains(&format!("near duplicate of group {original}")),
                    "group {id}: {reason}"
                );
            }
            None => {
                assert_eq!(decision, "accepted", "group {id}");
                exact.insert(GroupId(id), embeddings)?;
            }
        }
    }
    Ok(duplicates)
}

#[tokio::test(flavor = "multi_thread")]
async fn near_duplicate_decisions_follow_the_exact_rule_across_a_coordinator_restart() -> Result<()>
{
    let mut factory = Factory::start(0, 0).await?;
    for name in ["worker-0", "worker-1"] {
        factory.start_worker_env(
            name,
            200,
            &["generate", "score"],
            &[("SYNCD_TEST_EMBEDDING_CLASSES", "3")],
        )?;
    }
    // Every group passes the filter, so the decisions are the near-duplicate rule's alone.
    factory.create_run_with(
        "repeats",
        16,
        "[filter]\nmin_aesthetic = -1000.0\nmin_similarity = -1.0\nmax_similarity = 1.0\n\
         [dataset]\nsamples_per_shard = 4\n",
    )?;
    let pool = factory.env.pool().await?;
    wait_for_decisions(&pool, 5).await?;
    factory.kill_and_restart_coordinator()?;
    factory
        .wait_until_completed("repeats", Duration::from_secs(180))
        .await?;
    assert_exactly_once(&pool).await?;
    let duplicates = assert_decisions_follow_the_exact_rule(&pool).await?;
    let (accepted,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM groups WHERE decision = 'accepted'")
            .fetch_one(&pool)
            .await?;
    assert!(
        (1..=3).contains(&accepted),
        "one group per class at most: {accepted}"
    );
    assert_eq!(duplicates as i64 + accepted, 16);
    factory.finish().await
}

async fn wait_for_decisions(pool: &sqlx::PgPool, count: i64) -> Result<()> {
    syncd_tests::processes::wait_for(
        &format!("{count} decided groups"),
        Duration::from_secs(90),
        || async {
            let (decided,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM groups WHERE decision <> 'pending'")
                    .fetch_one(pool)
                    .await?;
            Ok((decided >= count).then_some(()))
        },
    )
    .await
}
