//! The near-duplicate index of every run's accepted groups, in PostgreSQL. Owns
//! `near_duplicate_images`, `near_duplicate_buckets` and `near_duplicate_backfills`.
//!
//! The rule is [`NearDuplicateIndex`]'s: a candidate nearly duplicates the accepted group whose
//! images are most similar to its own (maximum DINOv2 cosine over all pairs), when that reaches
//! the run's threshold. Holding every accepted group in memory and comparing with each one made a
//! check grow with the run and a restart reload every embedding; here each accepted image is a
//! row with its embedding and its [`Sketch`], its [`signature`] 40 rows of bucket keys under a
//! B-tree, and a check reads only the groups sharing a bucket with one of the candidate's images
//! (120 key lookups), then their sketches, and applies the exact rule to those of them with an
//! image within [`sketch_bound`] of one of the candidate's (all their images).
//!
//! - **Never a false near-duplicate:** the similarity is computed exactly.
//! - **Rarely a missed one:** a pair of images at cosine `c` is missed with probability
//!   [`signature_miss_probability`]`(c)`: 2.3e-5 at the default threshold 0.98, 7e-4 at 0.97,
//!   under 1e-9 above 0.995; the sketches add [`SKETCH_MISS_PROBABILITY`] (1e-9). A group has
//!   three images and usually several close pairs, so a repeated group is missed more rarely
//!   still. A threshold below [`SIGNATURE_MIN_THRESHOLD`] would miss too often, so such runs
//!   read the sketches of every accepted group of the run instead of the buckets' groups:
//!   growing with the run.
//! - **Few embeddings read:** groups of one category share buckets often (at cosine 0.6, one
//!   image pair in 55 shares a band), so the groups sharing a bucket grow with the category; their
//!   sketches are read (140 bytes an image), and only the groups that pass them have their
//!   embeddings (4 KB an image) read and compared. Images indexed before sketches were kept have
//!   none, and their groups are always compared.
//! - **Transactional:** the check and the insert of an accepted group run in the report's
//!   transaction, so a decision and the index never disagree, and with one leading coordinator
//!   (`crate::leadership`) checks are serial.

use anyhow::{Context, Result};
use sqlx::PgConnection;
use std::collections::HashSet;
use syncd_proto::dedup::{signature, sketch_bound, NearDuplicateIndex, Sketch};
use syncd_proto::{GroupId, RunId};
use uuid::Uuid;

/// The lowest threshold the signatures serve (see the module documentation).
pub const SIGNATURE_MIN_THRESHOLD: f32 = 0.97;

/// The signatures of a group's images in `run`: every image's bucket keys, in order, and every
/// image's sketch. Computed once per scored group and passed to both [`find`] and [`add`].
pub struct Signatures {
    pub buckets: Vec<i64>,
    pub sketches: Vec<Sketch>,
}

impl Signatures {
    pub fn of(run: RunId, embeddings: &[Vec<f32>]) -> Self {
        let (buckets, sketches): (Vec<_>, Vec<_>) = embeddings
            .iter()
            .map(|embedding| {
                let signature = signature(run.0.as_u128(), embedding);
                (signature.buckets, signature.sketch)
            })
            .unzip();
        Self {
            buckets: buckets.concat(),
            sketches,
        }
    }
}

/// The runs a caller knows to have no accepted group left out of the index (decided before the
/// index existed: see [`index_earlier_groups`]), so that its checks look that up once per run
/// rather than once each. None can become unindexed: only the migration that created the
/// index listed runs to backfill.
#[derive(Default)]
pub struct IndexedRuns(HashSet<RunId>);

/// What one near-duplicate check found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Check {
    /// The accepted group the candidate nearly duplicates, and their similarity.
    pub duplicate_of: Option<(GroupId, f32)>,
    /// How many accepted groups shared a bucket with the candidate (below the signatures'
    /// threshold: every accepted group of the run), whose sketches were read.
    pub sketched: usize,
    /// How many of them passed the sketches and had their embeddings read and compared.
    pub compared: usize,
}

/// Checks a candidate with `embeddings` (and their [`Signatures`]) against the accepted groups
/// of `run` at `threshold`.
pub async fn find(
    conn: &mut PgConnection,
    run: RunId,
    embeddings: &[Vec<f32>],
    signatures: &Signatures,
    threshold: f32,
    indexed: &mut IndexedRuns,
) -> Result<Check> {
    if !indexed.0.contains(&run) {
        index_earlier_groups(conn, run).await?;
        indexed.0.insert(run);
    }
    let sketches = if threshold >= SIGNATURE_MIN_THRESHOLD {
        // Separate statements, so that each has one sensible plan whatever the tables'
        // statistics say: a join let the planner scan every image and probe the buckets once per
        // image.
        let groups = sqlx::query_scalar!(
            "SELECT DISTINCT group_id FROM near_duplicate_buckets WHERE bucket = ANY($1)",
            &signatures.buckets
        )
        .fetch_all(&mut *conn)
        .await
        .context("looking up similar accepted groups")?;
        if groups.is_empty() {
            return Ok(Check {
                duplicate_of: None,
                sketched: 0,
                compared: 0,
            });
        }
        sqlx::query!(
            "SELECT group_id, sketch FROM near_duplicate_images
             WHERE group_id = ANY($2) AND run_id = $1",
            run.0,
            &groups
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading the sketches of similar accepted groups")?
        .into_iter()
        .map(|row| (row.group_id, row.sketch))
        .collect::<Vec<_>>()
    } else {
        sqlx::query!(
            "SELECT group_id, sketch FROM near_duplicate_images WHERE run_id = $1",
            run.0
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading the sketches of the run's accepted groups")?
        .into_iter()
        .map(|row| (row.group_id, row.sketch))
        .collect()
    };
    let bound = sketch_bound(threshold);
    let mut sketched = HashSet::new();
    let mut close = HashSet::new();
    for (group, sketch) in sketches {
        sketched.insert(group);
        // An image without a sketch (indexed before sketches were kept) cannot be ruled out.
        let within_bound = sketch
            .as_deref()
            .and_then(Sketch::from_bytes)
            .is_none_or(|sketch| {
                signatures
                    .sketches
                    .iter()
                    .any(|candidate| candidate.disagreements(&sketch) <= bound)
            });
        if within_bound {
            close.insert(group);
        }
    }
    let close: Vec<Uuid> = close.into_iter().collect();
    let rows = if close.is_empty() {
        Vec::new()
    } else {
        sqlx::query!(
            "SELECT group_id, embedding FROM near_duplicate_images
             WHERE group_id = ANY($2) AND run_id = $1
             ORDER BY group_id, image",
            run.0,
            &close
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading similar accepted groups")?
    };
    let mut similar = NearDuplicateIndex::new(threshold);
    for group in rows.chunk_by(|a, b| a.group_id == b.group_id) {
        let images = group.iter().map(|row| row.embedding.clone()).collect();
        if let Err(error) = similar.insert(GroupId(group[0].group_id), images) {
            tracing::warn!(%error, "stored embeddings left out of a near-duplicate check");
        }
    }
    Ok(Check {
        duplicate_of: similar.is_near_duplicate(embeddings),
        sketched: sketched.len(),
        compared: similar.len(),
    })
}

/// Takes a group out of the index (an accepted group that could not enter the dataset after
/// all). Its bucket rows stay: a lookup reaches groups only through their images.
pub async fn remove(conn: &mut PgConnection, group: GroupId) -> Result<()> {
    sqlx::query!(
        "DELETE FROM near_duplicate_images WHERE group_id = $1",
        group.0
    )
    .execute(conn)
    .await
    .context("removing a group from the near-duplicate index")?;
    Ok(())
}

/// Adds an accepted group of `run`, with its [`Signatures`], to the index. Embeddings the exact
/// rule could not compare (none, mixed dimensions, zero or non-finite vectors) are left out with
/// a warning, as they would hide or fake duplicates for the rest of the run.
pub async fn add(
    conn: &mut PgConnection,
    run: RunId,
    group: GroupId,
    embeddings: &[Vec<f32>],
    signatures: &Signatures,
) -> Result<()> {
    if let Err(error) = NearDuplicateIndex::default().insert(group, embeddings.to_vec()) {
        tracing::warn!(%error, %group, "embeddings left out of the near-duplicate index");
        return Ok(());
    }
    // One statement for the images and the buckets: the embeddings travel as one flat array
    // (`insert` above checked they share a dimension) and each image takes its slice.
    let images = i32::try_from(embeddings.len()).context("more images than a group holds")?;
    let dimension = i32::try_from(embeddings[0].len()).context("an embedding too long")?;
    let flat: Vec<f32> = embeddings.concat();
    let sketches: Vec<Vec<u8>> = signatures
        .sketches
        .iter()
        .map(|sketch| sketch.0.to_vec())
        .collect();
    sqlx::query!(
        "WITH images AS (
             INSERT INTO near_duplicate_images (group_id, image, run_id, embedding, sketch)
             SELECT $1, (image - 1)::int2, $2, ($3::real[])[((image - 1) * $4 + 1):(image * $4)],
                    ($7::bytea[])[image]
             FROM generate_series(1, $5::int4) AS image
             ON CONFLICT (group_id, image)
                 DO UPDATE SET embedding = EXCLUDED.embedding, sketch = EXCLUDED.sketch)
         INSERT INTO near_duplicate_buckets (bucket, group_id)
         SELECT DISTINCT bucket, $1::uuid FROM UNNEST($6::int8[]) AS new (bucket)
         ON CONFLICT DO NOTHING",
        group.0,
        run.0,
        &flat,
        dimension,
        images,
        &signatures.buckets,
        &sketches
    )
    .execute(&mut *conn)
    .await
    .context("adding an accepted group to the near-duplicate index")?;
    Ok(())
}

/// Indexes the accepted groups of `run` decided before the index existed, once (the migration
/// that created the index listed such runs in `near_duplicate_backfills`).
async fn index_earlier_groups(conn: &mut PgConnection, run: RunId) -> Result<()> {
    let pending = sqlx::query_scalar!(
        "SELECT run_id FROM near_duplicate_backfills WHERE run_id = $1 FOR UPDATE",
        run.0
    )
    .fetch_optional(&mut *conn)
    .await
    .context("reading the index's backfills")?;
    if pending.is_none() {
        return Ok(());
    }
    let groups = crate::db::groups::accepted_embeddings_of_run(&mut *conn, run).await?;
    tracing::info!(%run, groups = groups.len(), "indexing the run's earlier accepted groups");
    for (group, embeddings) in groups {
        add(
            conn,
            run,
            group,
            &embeddings,
            &Signatures::of(run, &embeddings),
        )
        .await?;
    }
    sqlx::query!(
        "DELETE FROM near_duplicate_backfills WHERE run_id = $1",
        run.0
    )
    .execute(&mut *conn)
    .await
    .context("recording a backfill done")?;
    Ok(())
}
