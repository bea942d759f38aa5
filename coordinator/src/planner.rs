//! What happens next: turning a run's configuration into objects and jobs, and each finished
//! job into the next stage of its object.
//!
//! ```text
//! object ── prompt (unless ready-made) ──► prior (rigid only) ──► generate (per group) ──► score
//! ```
//!
//! **Architecture invariant:** every function here runs inside the caller's transaction, so a
//! job's result and the jobs it causes are committed together or not at all.

use crate::input::{Family, PlannedObject};
use crate::jobs::{self, JobRow, NewJob};
use crate::run_config::RunConfig;
use crate::state::{ObjectState, RunState};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sqlx::{PgConnection, Row};
use syncd_infra::storage::Storage;
use syncd_proto::messages::{
    GenerateJob, GenerateOutput, JobOutput, JobPayload, ObjectSpec, PriorJob, PriorTriplet,
    PromptJob, PromptOutput, ScoreJob,
};
use syncd_proto::{keys, GroupId, ObjectId, RunId};

/// The suffix of every rigid prompt (reference, section C).
const RIGID_PROMPT_SUFFIX: &str = "a natural image with the object on the ground.";

/// Creates a run with its objects and first jobs. Rigid assets are uploaded to S3 first, so that
/// workers find them under the run's key layout.
pub async fn create_run(
    conn: &mut PgConnection,
    storage: &Storage,
    config: &RunConfig,
    objects: Vec<PlannedObject>,
) -> Result<RunId> {
    let run = RunId::new_random();
    let exists: Option<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM runs WHERE name = $1")
        .bind(&config.name)
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_some() {
        bail!("a run named {:?} exists already", config.name);
    }
    sqlx::query(
        "INSERT INTO runs (id, name, state, config, seed) VALUES ($1, $2, 'active', $3, $4)",
    )
    .bind(run.0)
    .bind(&config.name)
    .bind(serde_json::to_value(config)?)
    .bind(config.seed as i64)
    .execute(&mut *conn)
    .await
    .context("inserting the run")?;

    for (ordinal, planned) in objects.into_iter().enumerate() {
        let object = ObjectId::new_random();
        let spec = match &planned.family {
            Family::Rigid {
                uid,
                caption,
                asset_path,
            } => {
                let key = keys::asset(run, uid);
                let bytes = tokio::fs::read(asset_path)
                    .await
                    .with_context(|| format!("reading asset {}", asset_path.display()))?;
                storage.put(&key, bytes, "model/gltf-binary").await?;
                ObjectSpec::Rigid {
                    uid: uid.clone(),
                    caption: caption.clone(),
                    asset_key: key,
                }
            }
            Family::Deformable {
                category,
                description,
            } => ObjectSpec::Deformable {
                category: category.clone(),
                description: description.clone(),
            },
        };
        sqlx::query(
            "INSERT INTO objects (id, run_id, ordinal, spec, state, backgrounds, descriptions)
             VALUES ($1, $2, $3, $4, 'active', $5, $6)",
        )
        .bind(object.0)
        .bind(run.0)
        .bind(ordinal as i32)
        .bind(serde_json::to_value(&spec)?)
        .bind(
            planned
                .backgrounds
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?,
        )
        .bind(
            planned
                .descriptions
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?,
        )
        .execute(&mut *conn)
        .await
        .context("inserting an object")?;

        let context = ObjectContext {
            run,
            object,
            spec,
            backgrounds: planned.backgrounds.unwrap_or_default(),
            descriptions: planned.descriptions.unwrap_or_default(),
        };
        if context.backgrounds.is_empty() {
            let payload = JobPayload::Prompt(PromptJob {
                object: context.spec.clone(),
                backgrounds: config.prompts.backgrounds,
                descriptions: config.prompts.descriptions,
            });
            jobs::insert(conn, new_job(config, &context, None, payload)).await?;
        } else {
            after_prompts(conn, config, &context).await?;
        }
    }
    Ok(run)
}

/// What the planner knows about an object.
struct ObjectContext {
    run: RunId,
    object: ObjectId,
    spec: ObjectSpec,
    backgrounds: Vec<String>,
    descriptions: Vec<String>,
}

fn new_job(
    config: &RunConfig,
    context: &ObjectContext,
    group: Option<GroupId>,
    payload: JobPayload,
) -> NewJob {
    NewJob {
        run_id: context.run,
        object_id: context.object,
        group_id: group,
        payload,
        max_attempts: config.jobs.max_attempts,
        attempt_timeout_secs: config.jobs.attempt_timeout_secs,
    }
}

async fn load_object(
    conn: &mut PgConnection,
    run: RunId,
    object: ObjectId,
) -> Result<ObjectContext> {
    let row = sqlx::query("SELECT spec, backgrounds, descriptions FROM objects WHERE id = $1")
        .bind(object.0)
        .fetch_one(&mut *conn)
        .await
        .context("reading an object")?;
    let list = |column: &str| -> Result<Vec<String>> {
        let value: Option<serde_json::Value> = row.try_get(column)?;
        Ok(value
            .map(serde_json::from_value)
            .transpose()?
            .unwrap_or_default())
    };
    Ok(ObjectContext {
        run,
        object,
        spec: serde_json::from_value(row.try_get("spec")?)?,
        backgrounds: list("backgrounds")?,
        descriptions: list("descriptions")?,
    })
}

pub async fn load_run_config(conn: &mut PgConnection, run: RunId) -> Result<(RunConfig, RunState)> {
    let row = sqlx::query("SELECT config, state FROM runs WHERE id = $1")
        .bind(run.0)
        .fetch_one(&mut *conn)
        .await
        .with_context(|| format!("reading run {run}"))?;
    let state: String = row.try_get("state")?;
    Ok((
        serde_json::from_value(row.try_get("config")?)?,
        state.parse()?,
    ))
}

/// The prompts are known: rigid objects go to the 3D prior, deformable ones to generation.
async fn after_prompts(
    conn: &mut PgConnection,
    config: &RunConfig,
    context: &ObjectContext,
) -> Result<()> {
    match &context.spec {
        ObjectSpec::Rigid { uid, asset_key, .. } => {
            let payload = JobPayload::Prior(PriorJob {
                uid: uid.clone(),
                asset_key: asset_key.clone(),
                views: config.prior.views,
                max_triplets: config.prior.max_triplets,
                resolution: config.generation.rigid.resolution,
                seed: GroupId::derive(context.object, u32::MAX).seed(config.seed),
            });
            jobs::insert(conn, new_job(config, context, None, payload)).await?;
            Ok(())
        }
        ObjectSpec::Deformable { .. } => {
            let groups = config.generation.groups_per_object;
            create_groups(conn, config, context, (0..groups).map(|_| None).collect()).await
        }
    }
}

/// The prompt of each image of a group: distinct backgrounds picked by the group's seed, so the
/// choice is reproducible.
pub fn compose_prompts(
    spec: &ObjectSpec,
    backgrounds: &[String],
    descriptions: &[String],
    group_index: u32,
    seed: u64,
    images: u32,
) -> Vec<String> {
    let mut order: Vec<usize> = (0..backgrounds.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    (0..images as usize)
        .map(|image| {
            let background = backgrounds[order[image % order.len()]].trim_end_matches('.');
            match spec {
                ObjectSpec::Rigid { .. } => format!("{background} {RIGID_PROMPT_SUFFIX}"),
                ObjectSpec::Deformable { description, .. } => {
                    let description = descriptions
                        .get(group_index as usize % descriptions.len().max(1))
                        .unwrap_or(description);
                    format!(
                        "{background}. {}. wide angle shot",
                        description.trim_end_matches('.')
                    )
                }
            }
        })
        .collect()
}

async fn create_groups(
    conn: &mut PgConnection,
    config: &RunConfig,
    context: &ObjectContext,
    priors: Vec<Option<PriorTriplet>>,
) -> Result<()> {
    if context.backgrounds.is_empty() {
        bail!("object {} has no background prompts", context.object);
    }
    let (family, subject_word) = match &context.spec {
        ObjectSpec::Rigid { .. } => (&config.generation.rigid, String::new()),
        ObjectSpec::Deformable { category, .. } => {
            (&config.generation.deformable, category.to_lowercase())
        }
    };
    for (index, prior) in priors.into_iter().enumerate() {
        let index = index as u32;
        let group = GroupId::derive(context.object, index);
        let seed = group.seed(config.seed);
        let prompts = compose_prompts(
            &context.spec,
            &context.backgrounds,
            &context.descriptions,
            index,
            seed,
            config.generation.images_per_group,
        );
        sqlx::query(
            "INSERT INTO groups (id, run_id, object_id, group_index, seed, prompts, prior)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(group.0)
        .bind(context.run.0)
        .bind(context.object.0)
        .bind(index as i32)
        .bind(seed as i64)
        .bind(serde_json::to_value(&prompts)?)
        .bind(prior.as_ref().map(serde_json::to_value).transpose()?)
        .execute(&mut *conn)
        .await
        .context("inserting a group")?;
        let payload = JobPayload::Generate(GenerateJob {
            group_id: group,
            object: context.spec.clone(),
            prompts,
            subject_word: subject_word.clone(),
            seed,
            width: family.resolution,
            height: family.resolution,
            steps: family.steps,
            guidance: family.guidance,
            prior,
            true_cfg: family.true_cfg.clone(),
        });
        jobs::insert(conn, new_job(config, context, Some(group), payload)).await?;
    }
    Ok(())
}

/// A job succeeded: store what it produced and plan the next stage. A scoring job's output comes
/// with the filter decision the caller made on it.
pub async fn on_success(
    conn: &mut PgConnection,
    config: &RunConfig,
    job: &JobRow,
    output: &JobOutput,
    decision: Option<&GroupDecision>,
) -> Result<()> {
    match output {
        JobOutput::Prompt(PromptOutput {
            backgrounds,
            descriptions,
        }) => {
            let mut context = load_object(conn, job.run_id, job.object_id).await?;
            if let ObjectSpec::Deformable { description, .. } = &mut context.spec {
                if description.is_empty() {
                    if let Some(first) = descriptions.first() {
                        description.clone_from(first);
                    }
                }
            }
            sqlx::query("UPDATE objects SET backgrounds = $2, descriptions = $3, spec = $4, updated_at = now() WHERE id = $1")
                .bind(job.object_id.0)
                .bind(serde_json::to_value(backgrounds)?)
                .bind(serde_json::to_value(descriptions)?)
                .bind(serde_json::to_value(&context.spec)?)
                .execute(&mut *conn)
                .await?;
            context.backgrounds.clone_from(backgrounds);
            context.descriptions.clone_from(descriptions);
            if backgrounds.is_empty() {
                let reason = "the prompt stage returned no backgrounds";
                return finish_object(conn, job.object_id, ObjectState::Failed, Some(reason)).await;
            }
            after_prompts(conn, config, &context).await?;
        }
        JobOutput::Prior(prior) => {
            let context = load_object(conn, job.run_id, job.object_id).await?;
            if prior.triplets.is_empty() {
                let reason = "no view triplet with enough overlap";
                return finish_object(conn, job.object_id, ObjectState::Skipped, Some(reason))
                    .await;
            }
            let priors = prior
                .triplets
                .iter()
                .take(config.generation.groups_per_object as usize)
                .cloned()
                .map(Some)
                .collect();
            create_groups(conn, config, &context, priors).await?;
        }
        JobOutput::Generate(GenerateOutput {
            image_keys,
            mask_keys,
        }) => {
            let group = job.group_id.context("a generation job without a group")?;
            if image_keys.len() != mask_keys.len() || image_keys.len() < 2 {
                bail!(
                    "generation output has {} images and {} masks",
                    image_keys.len(),
                    mask_keys.len()
                );
            }
            sqlx::query("UPDATE groups SET image_keys = $2, mask_keys = $3 WHERE id = $1")
                .bind(group.0)
                .bind(serde_json::to_value(image_keys)?)
                .bind(serde_json::to_value(mask_keys)?)
                .execute(&mut *conn)
                .await?;
            let context = load_object(conn, job.run_id, job.object_id).await?;
            let payload = JobPayload::Score(ScoreJob {
                group_id: group,
                image_keys: image_keys.clone(),
                mask_keys: mask_keys.clone(),
            });
            jobs::insert(conn, new_job(config, &context, Some(group), payload)).await?;
        }
        JobOutput::Score(scores) => {
            let group = job.group_id.context("a scoring job without a group")?;
            let decision = decision.context("a scoring result without a filter decision")?;
            sqlx::query(
                "UPDATE groups SET aesthetic = $2, pairs = $3, embeddings = $4, decision = $5,
                     valid_images = $6, reason = $7, decided_at = now()
                 WHERE id = $1",
            )
            .bind(group.0)
            .bind(serde_json::to_value(&scores.aesthetic)?)
            .bind(serde_json::to_value(&scores.pairs)?)
            .bind(serde_json::to_value(&scores.embeddings)?)
            .bind(decision.label)
            .bind(serde_json::to_value(&decision.valid_images)?)
            .bind(&decision.reason)
            .execute(&mut *conn)
            .await?;
            finish_object_if_decided(conn, job.object_id).await?;
        }
    }
    Ok(())
}

/// The decision on a scored group, as stored.
#[derive(Clone, Debug)]
pub struct GroupDecision {
    /// `accepted`, `rejected` or `near_duplicate`.
    pub label: &'static str,
    pub valid_images: Vec<u32>,
    pub reason: String,
}

/// A job failed for good: its group (or, before groups exist, its object) ends.
pub async fn on_failure(
    conn: &mut PgConnection,
    job: &JobRow,
    error: &str,
    permanent: bool,
) -> Result<()> {
    match job.group_id {
        Some(group) => {
            sqlx::query("UPDATE groups SET decision = 'failed', reason = $2, decided_at = now() WHERE id = $1 AND decision = 'pending'")
                .bind(group.0)
                .bind(format!("{} job failed: {error}", job.kind))
                .execute(&mut *conn)
                .await?;
            finish_object_if_decided(conn, job.object_id).await
        }
        None => {
            let state = if permanent {
                ObjectState::Skipped
            } else {
                ObjectState::Failed
            };
            let reason = format!("{} job failed: {error}", job.kind);
            finish_object(conn, job.object_id, state, Some(&reason)).await
        }
    }
}

async fn finish_object(
    conn: &mut PgConnection,
    object: ObjectId,
    state: ObjectState,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query("UPDATE objects SET state = $2, error = COALESCE($3, error), updated_at = now() WHERE id = $1 AND state = 'active'")
        .bind(object.0)
        .bind(state.as_str())
        .bind(error)
        .execute(conn)
        .await
        .context("finishing an object")?;
    Ok(())
}

/// An object is done once every one of its groups is decided.
async fn finish_object_if_decided(conn: &mut PgConnection, object: ObjectId) -> Result<()> {
    let (pending,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM groups WHERE object_id = $1 AND decision = 'pending'")
            .bind(object.0)
            .fetch_one(&mut *conn)
            .await?;
    if pending == 0 {
        finish_object(conn, object, ObjectState::Done, None).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_reference_templates_and_are_reproducible() {
        let deformable = ObjectSpec::Deformable {
            category: "Cat".into(),
            description: "a fluffy orange tabby".into(),
        };
        let backgrounds: Vec<String> = ["on a sofa.", "in a garden", "on a roof"]
            .map(String::from)
            .to_vec();
        let prompts = compose_prompts(&deformable, &backgrounds, &[], 0, 7, 3);
        assert_eq!(
            prompts,
            compose_prompts(&deformable, &backgrounds, &[], 0, 7, 3)
        );
        assert_eq!(prompts.len(), 3);
        let mut distinct = prompts.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "each image gets its own background");
        assert!(prompts.contains(&"on a sofa. a fluffy orange tabby. wide angle shot".to_string()));

        let rigid = ObjectSpec::Rigid {
            uid: "u".into(),
            caption: "a chair".into(),
            asset_key: "k".into(),
        };
        let prompts = compose_prompts(&rigid, &backgrounds[..1], &[], 0, 7, 3);
        assert_eq!(
            prompts[0],
            "on a sofa a natural image with the object on the ground."
        );
    }
}
