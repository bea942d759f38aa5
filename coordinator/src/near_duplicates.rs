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
//!   (`crate::leadership`) checks are serial. A batch of reports reads the index for
//!   all its checks at once ([`prefetch`], three statements rather than up to three a check)
//!   and adds its accepted groups together at its end ([`add_many`]); its later checks meet
//!   them in memory (`unwritten` in [`find`]).

use anyhow::{Context, Result};
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};
use syncd_proto::dedup::{check_embeddings, signature, sketch_bound, NearDuplicateIndex, Sketch};
use syncd_proto::{GroupId, RunId};
use uuid::Uuid;

/// The lowest threshold the signatures serve (see the module documentation).
pub const SIGNATURE_MIN_THRESHOLD: f32 = 0.97;

/// How many groups a backfill adds a statement: about 12 KB of embeddings each.
const BACKFILL_CHUNK: usize = 256;

/// The signatures of a group's images in `run`: every image's bucket keys, in order, and every
/// image's sketch. Computed once per scored group, for [`find`] and then [`add_many`].
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

impl IndexedRuns {
    /// Makes the backfill of `run` if it still has one, unless this run is known complete.
    async fn ensure(&mut self, conn: &mut PgConnection, run: RunId) -> Result<()> {
        if !self.0.contains(&run) {
            index_earlier_groups(conn, run).await?;
            self.0.insert(run);
        }
        Ok(())
    }
}

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

/// What one batch's checks have read of the index, so that none reads twice what another read:
/// [`prefetch`] reads, in three statements, all that the checks of a batch's candidates will,
/// and [`find`] then reads only what it lacks. It holds only while the index does not change
/// under it, so it serves a transaction that writes its accepted groups at its end
/// ([`add_many`]; its checks meet them in memory meanwhile), each run's backfill made before
/// the run's first read ([`IndexedRuns`]). A transaction that writes as it goes gives each
/// check a new one.
#[derive(Default)]
pub struct IndexReads {
    /// Each bucket read, with the groups having an image under it.
    buckets: HashMap<i64, Vec<Uuid>>,
    /// Each group whose sketches were read: its run and its images' sketches (`None`: indexed
    /// before sketches were kept); `None` for a group met in a bucket but no longer indexed.
    sketches: HashMap<Uuid, Option<IndexedSketches>>,
    /// The runs all of whose groups' sketches are in `sketches` (read for checks below the
    /// signatures' threshold).
    whole_runs: HashSet<RunId>,
    /// Each group whose embeddings were read, in image order; empty for one no longer indexed.
    embeddings: HashMap<Uuid, Vec<Vec<f32>>>,
    /// The statements made so far.
    statements: usize,
}

impl IndexReads {
    /// How many statements these reads took.
    pub fn statements(&self) -> usize {
        self.statements
    }

    /// The accepted groups of `run` a check of a candidate with `signatures` meets, reading
    /// what is not read yet: those sharing a bucket with the candidate, or every group of the
    /// run below the signatures' threshold.
    async fn groups_met(
        &mut self,
        conn: &mut PgConnection,
        run: RunId,
        signatures: &Signatures,
        threshold: f32,
    ) -> Result<Vec<Uuid>> {
        if threshold < SIGNATURE_MIN_THRESHOLD {
            self.read_whole_run(conn, run).await?;
            return Ok(self.groups_of(run, self.sketches.keys()));
        }
        self.read_buckets(conn, &signatures.buckets).await?;
        let groups: HashSet<&Uuid> = signatures
            .buckets
            .iter()
            .flat_map(|bucket| &self.buckets[bucket])
            .collect();
        let groups: Vec<Uuid> = groups.into_iter().copied().collect();
        self.read_sketches(conn, &groups).await?;
        Ok(self.groups_of(run, groups.iter()))
    }

    /// Those of `groups` (read) that are of `run`, in order of id, for a reproducible check.
    fn groups_of<'a>(&self, run: RunId, groups: impl Iterator<Item = &'a Uuid>) -> Vec<Uuid> {
        let mut of_run: Vec<Uuid> = groups
            .filter(|group| {
                self.sketches[*group]
                    .as_ref()
                    .is_some_and(|group| group.run == run)
            })
            .copied()
            .collect();
        of_run.sort_unstable();
        of_run
    }

    /// Which of `groups` (of one run, their sketches read) have an image within `bound` of one
    /// of the candidate's `sketches`, or without a sketch, which cannot be ruled out.
    fn close_to(&self, groups: &[Uuid], sketches: &[Sketch], bound: u32) -> Vec<Uuid> {
        let within_bound =
            |image: &Option<Sketch>| image.is_none_or(|image| within(sketches, &image, bound));
        groups
            .iter()
            .filter(|group| {
                self.sketches[*group]
                    .as_ref()
                    .is_some_and(|group| group.images.iter().any(within_bound))
            })
            .copied()
            .collect()
    }

    /// Reads which groups have an image under each of `buckets` not read yet.
    async fn read_buckets(&mut self, conn: &mut PgConnection, buckets: &[i64]) -> Result<()> {
        let unread = unread(buckets, &self.buckets);
        if unread.is_empty() {
            return Ok(());
        }
        // Separate statements for buckets, sketches and embeddings, so that each has one
        // sensible plan whatever the tables' statistics say: a join let the planner scan every
        // image and probe the buckets once per image.
        let rows = sqlx::query!(
            "SELECT bucket, group_id FROM near_duplicate_buckets WHERE bucket = ANY($1)",
            &unread
        )
        .fetch_all(&mut *conn)
        .await
        .context("looking up similar accepted groups")?;
        self.statements += 1;
        for bucket in unread {
            self.buckets.entry(bucket).or_default();
        }
        for row in rows {
            self.buckets
                .entry(row.bucket)
                .or_default()
                .push(row.group_id);
        }
        Ok(())
    }

    /// Reads the sketches of those of `groups` not read yet.
    async fn read_sketches(&mut self, conn: &mut PgConnection, groups: &[Uuid]) -> Result<()> {
        let unread = unread(groups, &self.sketches);
        if unread.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query!(
            "SELECT group_id, run_id, sketch FROM near_duplicate_images
             WHERE group_id = ANY($1) ORDER BY group_id, image",
            &unread
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading the sketches of similar accepted groups")?;
        self.statements += 1;
        for group in unread {
            // A group met through a bucket but no longer indexed (`remove`) has no images.
            self.sketches.insert(group, None);
        }
        for row in rows {
            let sketch = row.sketch.as_deref().and_then(Sketch::from_bytes);
            self.sketches
                .entry(row.group_id)
                .or_default()
                .get_or_insert_with(|| IndexedSketches {
                    run: RunId(row.run_id),
                    images: Vec::new(),
                })
                .images
                .push(sketch);
        }
        Ok(())
    }

    /// Reads the sketches of every accepted group of `run`, once.
    async fn read_whole_run(&mut self, conn: &mut PgConnection, run: RunId) -> Result<()> {
        if self.whole_runs.contains(&run) {
            return Ok(());
        }
        let rows = sqlx::query!(
            "SELECT group_id, sketch FROM near_duplicate_images WHERE run_id = $1
             ORDER BY group_id, image",
            run.0
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading the sketches of the run's accepted groups")?;
        self.statements += 1;
        self.whole_runs.insert(run);
        for group in rows.chunk_by(|a, b| a.group_id == b.group_id) {
            let images = group
                .iter()
                .map(|row| row.sketch.as_deref().and_then(Sketch::from_bytes))
                .collect();
            let sketches = IndexedSketches { run, images };
            self.sketches.insert(group[0].group_id, Some(sketches));
        }
        Ok(())
    }

    /// Reads the embeddings of those of `groups` not read yet.
    async fn read_embeddings(&mut self, conn: &mut PgConnection, groups: &[Uuid]) -> Result<()> {
        let unread = unread(groups, &self.embeddings);
        if unread.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query!(
            "SELECT group_id, embedding FROM near_duplicate_images
             WHERE group_id = ANY($1) ORDER BY group_id, image",
            &unread
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading similar accepted groups")?;
        self.statements += 1;
        for group in unread {
            self.embeddings.entry(group).or_default();
        }
        for row in rows {
            self.embeddings
                .entry(row.group_id)
                .or_default()
                .push(row.embedding);
        }
        Ok(())
    }
}

/// Whether `image` comes within `bound` disagreeing bits of one of a candidate's `sketches`.
fn within(sketches: &[Sketch], image: &Sketch, bound: u32) -> bool {
    sketches
        .iter()
        .any(|candidate| candidate.disagreements(image) <= bound)
}

/// Those of `keys` not in `read`, each once.
fn unread<K: Copy + Eq + std::hash::Hash, V>(keys: &[K], read: &HashMap<K, V>) -> Vec<K> {
    let unread: HashSet<K> = keys
        .iter()
        .filter(|key| !read.contains_key(key))
        .copied()
        .collect();
    unread.into_iter().collect()
}

/// An indexed group's run and its images' sketches, as [`IndexReads`] keeps them.
struct IndexedSketches {
    run: RunId,
    /// `None` for an image indexed before sketches were kept.
    images: Vec<Option<Sketch>>,
}

/// A candidate of a batch's checks, for [`prefetch`]: its run, [`Signatures`] and threshold.
pub struct Candidate<'a> {
    pub run: RunId,
    pub signatures: &'a Signatures,
    pub threshold: f32,
}

/// Reads into `reads` at once everything the checks of `candidates` will read of the index,
/// each run's backfill made first: the buckets of all, then the sketches of the groups met,
/// then the embeddings of those close to a candidate of their run. [`find`] then reads nothing
/// for them.
pub async fn prefetch(
    conn: &mut PgConnection,
    candidates: &[Candidate<'_>],
    indexed: &mut IndexedRuns,
    reads: &mut IndexReads,
) -> Result<()> {
    for candidate in candidates {
        indexed.ensure(conn, candidate.run).await?;
    }
    let buckets: Vec<i64> = candidates
        .iter()
        .filter(|candidate| candidate.threshold >= SIGNATURE_MIN_THRESHOLD)
        .flat_map(|candidate| candidate.signatures.buckets.iter().copied())
        .collect();
    reads.read_buckets(conn, &buckets).await?;
    let met: HashSet<Uuid> = buckets
        .iter()
        .flat_map(|bucket| reads.buckets[bucket].iter().copied())
        .collect();
    reads
        .read_sketches(conn, &met.into_iter().collect::<Vec<_>>())
        .await?;
    // Every group met is read now, so this reads only the whole runs of checks below the
    // signatures' threshold.
    let mut close = HashSet::new();
    for candidate in candidates {
        let met = reads
            .groups_met(
                conn,
                candidate.run,
                candidate.signatures,
                candidate.threshold,
            )
            .await?;
        let bound = sketch_bound(candidate.threshold);
        close.extend(reads.close_to(&met, &candidate.signatures.sketches, bound));
    }
    reads
        .read_embeddings(conn, &close.into_iter().collect::<Vec<_>>())
        .await
}

/// Checks a candidate with `embeddings` (and their [`Signatures`]) against the accepted groups
/// of `run` at `threshold`: those in the index, read through `reads`, and those of `unwritten`
/// (accepted by the same transaction and kept for one [`add_many`] at its end).
#[allow(clippy::too_many_arguments)]
pub async fn find(
    conn: &mut PgConnection,
    run: RunId,
    embeddings: &[Vec<f32>],
    signatures: &Signatures,
    threshold: f32,
    indexed: &mut IndexedRuns,
    reads: &mut IndexReads,
    unwritten: &[AcceptedGroup],
) -> Result<Check> {
    indexed.ensure(conn, run).await?;
    let met = reads.groups_met(conn, run, signatures, threshold).await?;
    let bound = sketch_bound(threshold);
    let close = reads.close_to(&met, &signatures.sketches, bound);
    reads.read_embeddings(conn, &close).await?;
    let mut similar = NearDuplicateIndex::new(threshold);
    let mut sketched: HashSet<Uuid> = met.iter().copied().collect();
    for group in close {
        let images = reads.embeddings[&group].clone();
        // A group no longer indexed has no images left to compare.
        if images.is_empty() {
            continue;
        }
        if let Err(error) = similar.insert(GroupId(group), images) {
            tracing::warn!(%error, "stored embeddings left out of a near-duplicate check");
        }
    }
    // The transaction's own accepted groups, not yet written, pass the same sketches.
    for accepted in unwritten.iter().filter(|accepted| accepted.run == run) {
        sketched.insert(accepted.group.0);
        let mut images = accepted.signatures.sketches.iter();
        if images.any(|image| within(&signatures.sketches, image, bound)) {
            if let Err(error) = similar.insert(accepted.group, accepted.embeddings.clone()) {
                tracing::warn!(%error, "accepted embeddings left out of a near-duplicate check");
            }
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

/// An accepted group of `run` to add to the index, with its embeddings and their
/// [`Signatures`].
pub struct AcceptedGroup {
    pub run: RunId,
    pub group: GroupId,
    pub embeddings: Vec<Vec<f32>>,
    pub signatures: Signatures,
}

impl AcceptedGroup {
    /// `None`, with a warning, for embeddings the exact rule could not compare (none, mixed
    /// dimensions, zero or non-finite vectors): in the index they would hide or fake duplicates
    /// for the rest of the run.
    pub fn new(
        run: RunId,
        group: GroupId,
        embeddings: Vec<Vec<f32>>,
        signatures: Signatures,
    ) -> Option<Self> {
        if let Err(error) = check_embeddings(group, &embeddings, None) {
            tracing::warn!(%error, %group, "embeddings left out of the near-duplicate index");
            return None;
        }
        Some(Self {
            run,
            group,
            embeddings,
            signatures,
        })
    }
}

/// Adds accepted groups to the index, in one statement. A group given twice is added once, as
/// given last.
pub async fn add_many(conn: &mut PgConnection, accepted: &[AcceptedGroup]) -> Result<()> {
    let mut seen = HashSet::new();
    let mut latest: Vec<&AcceptedGroup> = accepted
        .iter()
        .rev()
        .filter(|accepted| seen.insert(accepted.group))
        .collect();
    latest.reverse();
    if latest.is_empty() {
        return Ok(());
    }
    // The embeddings travel as one flat array, each group with its first value, its first
    // sketch, its images' dimension (`AcceptedGroup::new` checked they share one) and its
    // number of images; the bucket keys as a second flat array beside their groups.
    let (mut groups, mut runs) = (Vec::new(), Vec::new());
    let (mut starts, mut first_sketches, mut dimensions, mut images) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut values, mut sketches) = (Vec::new(), Vec::new());
    let (mut buckets, mut bucket_groups) = (Vec::new(), Vec::new());
    for accepted in latest {
        groups.push(accepted.group.0);
        runs.push(accepted.run.0);
        starts.push(i32::try_from(values.len()).context("too many embeddings at once")?);
        first_sketches.push(i32::try_from(sketches.len()).context("too many images at once")?);
        dimensions.push(i32::try_from(accepted.embeddings[0].len()).context("a long embedding")?);
        images.push(i32::try_from(accepted.embeddings.len()).context("a group of many images")?);
        for embedding in &accepted.embeddings {
            values.extend_from_slice(embedding);
        }
        sketches.extend(accepted.signatures.sketches.iter().map(|s| s.0.to_vec()));
        buckets.extend_from_slice(&accepted.signatures.buckets);
        bucket_groups.extend(std::iter::repeat_n(
            accepted.group.0,
            accepted.signatures.buckets.len(),
        ));
    }
    sqlx::query!(
        "WITH images AS (
             INSERT INTO near_duplicate_images (group_id, image, run_id, embedding, sketch)
             SELECT g.id, (image - 1)::int2, g.run_id,
                    ($3::real[])[g.start + (image - 1) * g.dimension + 1
                                 : g.start + image * g.dimension],
                    ($4::bytea[])[g.first_sketch + image]
             FROM UNNEST($1::uuid[], $2::uuid[], $5::int4[], $6::int4[], $7::int4[], $8::int4[])
                      AS g (id, run_id, start, first_sketch, dimension, images)
                  CROSS JOIN LATERAL generate_series(1, g.images) AS image
             ON CONFLICT (group_id, image)
                 DO UPDATE SET embedding = EXCLUDED.embedding, sketch = EXCLUDED.sketch)
         INSERT INTO near_duplicate_buckets (bucket, group_id)
         SELECT DISTINCT bucket, group_id FROM UNNEST($9::int8[], $10::uuid[])
             AS new (bucket, group_id)
         ON CONFLICT DO NOTHING",
        &groups,
        &runs,
        &values,
        &sketches,
        &starts,
        &first_sketches,
        &dimensions,
        &images,
        &buckets,
        &bucket_groups
    )
    .execute(&mut *conn)
    .await
    .context("adding accepted groups to the near-duplicate index")?;
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
    let accepted: Vec<AcceptedGroup> = groups
        .into_iter()
        .filter_map(|(group, embeddings)| {
            let signatures = Signatures::of(run, &embeddings);
            AcceptedGroup::new(run, group, embeddings, signatures)
        })
        .collect();
    for some in accepted.chunks(BACKFILL_CHUNK) {
        add_many(conn, some).await?;
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
