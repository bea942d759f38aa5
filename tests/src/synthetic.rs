//! Synthetic data for tests and benchmarks of the coordinator's database code without a factory
//! around it: a run with one object and pending groups, written straight into the database with
//! only the columns every row needs, and deterministic unit vectors shaped like DINOv2
//! embeddings.

use anyhow::{Context, Result};
use sqlx::PgPool;
use syncd_proto::{GroupId, ObjectId, RunId};
use uuid::Uuid;

/// A run of synthetic groups.
pub struct SyntheticRun {
    pub id: RunId,
    object: Uuid,
    groups: i32,
}

impl SyntheticRun {
    /// An active run named `name` with one object and no groups. Its stored configuration is
    /// every default (no input), so that reports on its jobs apply.
    pub async fn create(pool: &PgPool, name: &str) -> Result<Self> {
        let (id, object) = (Uuid::new_v4(), Uuid::new_v4());
        let config = serde_json::json!({ "name": name, "input": {} });
        sqlx::query(
            "INSERT INTO runs (id, name, state, config, seed) VALUES ($1, $2, 'active', $3, 0)",
        )
        .bind(id)
        .bind(name)
        .bind(config)
        .execute(pool)
        .await
        .context("inserting a synthetic run")?;
        sqlx::query(
            "INSERT INTO objects (id, run_id, ordinal, spec, state)
             VALUES ($1, $2, 0, '{}', 'active')",
        )
        .bind(object)
        .bind(id)
        .execute(pool)
        .await
        .context("inserting a synthetic object")?;
        Ok(Self {
            id: RunId(id),
            object,
            groups: 0,
        })
    }

    /// The run's one object.
    pub fn object(&self) -> ObjectId {
        ObjectId(self.object)
    }

    /// Adds `count` pending groups to the run; returns their ids in order.
    pub async fn add_groups(&mut self, pool: &PgPool, count: usize) -> Result<Vec<GroupId>> {
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
        let first = self.groups;
        self.groups += i32::try_from(count)?;
        let indexes: Vec<i32> = (first..self.groups).collect();
        sqlx::query(
            "INSERT INTO groups (id, run_id, object_id, group_index, seed, prompts)
             SELECT id, $2, $3, group_index, 0, '[]'
             FROM UNNEST($1::uuid[], $4::int[]) AS new (id, group_index)",
        )
        .bind(&ids)
        .bind(self.id.0)
        .bind(self.object)
        .bind(&indexes)
        .execute(pool)
        .await
        .context("inserting synthetic groups")?;
        Ok(ids.into_iter().map(GroupId).collect())
    }
}

/// Deterministic pseudo-random unit vectors: random directions in high dimensions, like the
/// embeddings of unrelated images, and vectors at an exact cosine from another.
pub struct UnitVectors {
    state: u64,
}

impl UnitVectors {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn uniform(&mut self) -> f32 {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Close enough to a standard normal for random directions: the sum of six uniforms.
    fn gaussian(&mut self) -> f32 {
        (0..6).map(|_| self.uniform()).sum::<f32>() - 3.0
    }

    /// A random unit vector of `dimension`.
    pub fn unit(&mut self, dimension: usize) -> Vec<f32> {
        let vector: Vec<f32> = (0..dimension).map(|_| self.gaussian()).collect();
        normalised(vector)
    }

    /// A random unit vector at exactly `cosine` (up to rounding) from the unit vector `base`.
    pub fn at_cosine(&mut self, base: &[f32], cosine: f32) -> Vec<f32> {
        let other = self.unit(base.len());
        let along: f32 = other.iter().zip(base).map(|(o, b)| o * b).sum();
        let orthogonal = normalised(other.iter().zip(base).map(|(o, b)| o - along * b).collect());
        let sine = (1.0 - cosine * cosine).max(0.0).sqrt();
        base.iter()
            .zip(&orthogonal)
            .map(|(b, o)| cosine * b + sine * o)
            .collect()
    }
}

fn normalised(vector: Vec<f32>) -> Vec<f32> {
    let length = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    vector.into_iter().map(|v| v / length).collect()
}
