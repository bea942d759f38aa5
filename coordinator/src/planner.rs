//! What happens next: turning a run's configuration into objects and jobs, and each finished
//! job into the next stage of its object.
//!
//! ```text
//! object ── prompt (unless ready-made) ──► prior (rigid only) ──► generate (per group) ──► score
//! ```
//!
//! **Architecture invariant:** every function here runs inside the caller's transaction, so a
//! job's result and the jobs it causes are committed together or not at all.

use crate::db::groups::{self, Verdict};
use crate::db::jobs::{self, JobRow, NewJob};
use crate::db::{objects, runs};
use crate::input::{Asset, Family, PlannedObject};
use crate::regenerations;
use crate::results::LaterWrites;
use crate::run_config::RunConfig;
use crate::state::ObjectState;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sqlx::PgConnection;
use std::collections::HashSet;
use std::path::PathBuf;
use syncd_proto::dataset::ImagePrompt;
use syncd_proto::lineage::{GenerationSettings, Provenance};
use syncd_proto::messages::{
    CaptionRequests, GenerateJob, GenerateOutput, JobOutput, JobPayload, ObjectSpec, PriorJob,
    PriorTriplet, PromptJob, PromptOutput, ScoreJob,
};
use syncd_proto::{keys, GroupId, ObjectId, RunId};

/// The suffix of every rigid prompt (reference, section C).
const RIGID_PROMPT_SUFFIX: &str = "a natural image with the object on the ground.";

/// Creates run `run` with its objects and first jobs. The rigid objects' assets must already be
/// in S3 under `keys::asset(run, uid)` (see [`asset_uploads`]): nothing here waits on anything
/// but the database, so a run of 100K objects is planned in memory and written with a few
/// statements per table.
pub async fn create_run(
    conn: &mut PgConnection,
    run: RunId,
    config: &RunConfig,
    objects: Vec<PlannedObject>,
) -> Result<()> {
    if runs::by_name(&mut *conn, &config.name).await?.is_some() {
        bail!("a run named {:?} exists already", config.name);
    }
    runs::insert(conn, run, config).await?;

    let mut rows = NewRows::default();
    // Deformable categories whose prompt job exists: one job asks for a whole category.
    let mut categories_asked = HashSet::new();
    for (ordinal, planned) in objects.into_iter().enumerate() {
        let object = ObjectId::new_random();
        let spec = match &planned.family {
            Family::Rigid {
                uid,
                caption,
                asset,
            } => ObjectSpec::Rigid {
                uid: uid.clone(),
                caption: caption.clone(),
                asset_key: match asset {
                    Asset::File(_) => keys::asset(run, uid),
                    Asset::Stored(key) => key.clone(),
                },
            },
            Family::Deformable {
                category,
                description,
            } => ObjectSpec::Deformable {
                category: category.clone(),
                description: description.clone(),
            },
        };
        let descriptions = match &spec {
            ObjectSpec::Deformable { description, .. } if !description.is_empty() => {
                Some(vec![description.clone()])
            }
            _ => None,
        };
        rows.objects.push(objects::NewObject {
            id: object,
            ordinal: i32::try_from(ordinal).context("too many objects")?,
            spec: serde_json::to_value(&spec)?,
            backgrounds: planned
                .backgrounds
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?,
            descriptions: descriptions
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?,
        });

        let context = ObjectContext {
            run,
            object,
            spec,
            backgrounds: planned.backgrounds.unwrap_or_default(),
        };
        if !context.backgrounds.is_empty() {
            after_prompts(&mut rows, config, &context)?;
            continue;
        }
        let payload = match &context.spec {
            ObjectSpec::Rigid { .. } => PromptJob {
                object: context.spec.clone(),
                backgrounds: CaptionRequests {
                    requests: 1,
                    per_request: config.prompts.rigid_backgrounds,
                    at_least: config
                        .generation
                        .images_per_group
                        .min(config.prompts.rigid_backgrounds),
                },
                descriptions: CaptionRequests::NONE,
            },
            ObjectSpec::Deformable { category, .. } => {
                // The category's first object carries its prompt job; the others wait for it.
                if !categories_asked.insert(category.clone()) {
                    continue;
                }
                let requests = |at_least| CaptionRequests {
                    requests: config.prompts.category_requests,
                    per_request: config.prompts.captions_per_request,
                    at_least,
                };
                PromptJob {
                    object: ObjectSpec::Deformable {
                        category: category.clone(),
                        description: String::new(),
                    },
                    backgrounds: requests(config.generation.images_per_group),
                    descriptions: requests(1),
                }
            }
        };
        let payload = JobPayload::Prompt(payload);
        rows.jobs
            .push(new_job(config, context.key(), None, payload));
    }
    rows.write(conn, run).await
}

/// The uploads a new run needs before [`create_run`]: each rigid object's asset file and the key
/// it goes to.
pub fn asset_uploads(run: RunId, objects: &[PlannedObject]) -> Vec<(PathBuf, String)> {
    objects
        .iter()
        .filter_map(|planned| match &planned.family {
            Family::Rigid {
                uid,
                asset: Asset::File(path),
                ..
            } => Some((path.clone(), keys::asset(run, uid))),
            Family::Rigid {
                asset: Asset::Stored(_),
                ..
            } => None,
            Family::Deformable { .. } => None,
        })
        .collect()
}

/// Rows planned but not written yet. Planning is pure; [`NewRows::write`] writes the rows with
/// one statement per table for every few thousand rows, objects before groups before jobs.
#[derive(Default)]
struct NewRows {
    objects: Vec<objects::NewObject>,
    groups: Vec<groups::NewGroup>,
    jobs: Vec<NewJob>,
}

impl NewRows {
    async fn write(self, conn: &mut PgConnection, run: RunId) -> Result<()> {
        objects::insert_many(conn, run, self.objects).await?;
        groups::insert_many(conn, run, self.groups).await?;
        jobs::insert_many(conn, self.jobs).await?;
        Ok(())
    }
}

/// What the planner knows about an object.
struct ObjectContext {
    run: RunId,
    object: ObjectId,
    spec: ObjectSpec,
    /// The background captions the object's groups draw from.
    backgrounds: Vec<String>,
}

impl ObjectContext {
    /// The run and object a job of this object belongs to.
    fn key(&self) -> (RunId, ObjectId) {
        (self.run, self.object)
    }
}

fn new_job(
    config: &RunConfig,
    (run, object): (RunId, ObjectId),
    group: Option<GroupId>,
    payload: JobPayload,
) -> NewJob {
    NewJob {
        run_id: run,
        object_id: object,
        group_id: group,
        payload,
        max_attempts: config.jobs.max_attempts,
        lease_secs: config.jobs.lease_secs,
    }
}

async fn load_object(
    conn: &mut PgConnection,
    run: RunId,
    object: ObjectId,
) -> Result<ObjectContext> {
    let (spec, backgrounds) = objects::spec_and_backgrounds(conn, object).await?;
    Ok(ObjectContext {
        run,
        object,
        spec: serde_json::from_value(spec)?,
        backgrounds: backgrounds
            .map(serde_json::from_value)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// The deformable category a prompt job asks for, if it is a category's job.
fn prompt_category(job: &JobRow) -> Option<&str> {
    match &job.payload {
        JobPayload::Prompt(PromptJob {
            object: ObjectSpec::Deformable { category, .. },
            ..
        }) => Some(category),
        _ => None,
    }
}

/// The objects whose fate a job decides: its own, and for a deformable category's prompt job
/// every object of the category still waiting for prompts (in ordinal order, in any state
/// among `states`).
pub async fn objects_of_job(
    conn: &mut PgConnection,
    job: &JobRow,
    states: &[ObjectState],
) -> Result<Vec<(ObjectId, ObjectSpec)>> {
    let rows = match prompt_category(job) {
        Some(category) => {
            objects::of_category_awaiting_prompts(conn, job.run_id, category, states).await?
        }
        None => objects::in_states(conn, job.object_id, states).await?,
    };
    rows.into_iter()
        .map(|(object, spec)| Ok((object, serde_json::from_value(spec)?)))
        .collect()
}

/// What each object of a deformable category gets from the category's captions.
#[derive(Clone, Debug, PartialEq)]
pub struct CategoryShare {
    pub description: String,
    pub backgrounds: Vec<String>,
}

/// Deals a category's captions out to its `objects` objects, like cards: object k gets
/// description k (round the list again when there are more objects than descriptions) and the
/// next `backgrounds_each` backgrounds of the pool after those of object k-1, so every caption
/// is used about equally often and an object's own backgrounds are distinct whenever the pool
/// holds that many. Deterministic: the same captions give the same shares.
pub fn share_category_captions(
    backgrounds: &[String],
    descriptions: &[String],
    objects: usize,
    backgrounds_each: usize,
) -> Vec<CategoryShare> {
    if backgrounds.is_empty() || descriptions.is_empty() {
        return Vec::new();
    }
    let each = backgrounds_each.clamp(1, backgrounds.len());
    (0..objects)
        .map(|k| CategoryShare {
            description: descriptions[k % descriptions.len()].clone(),
            backgrounds: (0..each)
                .map(|j| backgrounds[(k * each + j) % backgrounds.len()].clone())
                .collect(),
        })
        .collect()
}

/// The prompts are known: rigid objects go to the 3D prior, deformable ones to generation.
fn after_prompts(rows: &mut NewRows, config: &RunConfig, context: &ObjectContext) -> Result<()> {
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
            rows.jobs
                .push(new_job(config, context.key(), None, payload));
            Ok(())
        }
        ObjectSpec::Deformable { .. } => {
            let groups = config.generation.deformable.groups_per_object;
            create_groups(rows, config, context, (0..groups).map(|_| None).collect())
        }
    }
}

/// The prompt of each image of a group, with the parts it is made of: distinct backgrounds
/// picked by the group's seed, so the choice is reproducible, and for deformable objects the
/// object's description (reference templates, section C).
pub fn compose_prompts(
    spec: &ObjectSpec,
    backgrounds: &[String],
    seed: u64,
    images: u32,
) -> Vec<ImagePrompt> {
    let mut order: Vec<usize> = (0..backgrounds.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    (0..images as usize)
        .map(|image| {
            let background = backgrounds[order[image % order.len()]].clone();
            let bare = background.trim_end_matches('.');
            match spec {
                ObjectSpec::Rigid { .. } => ImagePrompt {
                    prompt: format!("{bare} {RIGID_PROMPT_SUFFIX}"),
                    background,
                    description: None,
                },
                ObjectSpec::Deformable { description, .. } => ImagePrompt {
                    prompt: format!(
                        "{bare}. {}. wide angle shot",
                        description.trim_end_matches('.')
                    ),
                    background,
                    description: Some(description.clone()),
                },
            }
        })
        .collect()
}

fn create_groups(
    rows: &mut NewRows,
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
        let image_prompts = compose_prompts(
            &context.spec,
            &context.backgrounds,
            seed,
            config.generation.images_per_group,
        );
        let prompts: Vec<String> = image_prompts.iter().map(|p| p.prompt.clone()).collect();
        let generate = GenerateJob {
            group_id: group,
            object: context.spec.clone(),
            prompts: prompts.clone(),
            subject_word: subject_word.clone(),
            seed,
            width: family.resolution,
            height: family.resolution,
            steps: family.steps,
            guidance: family.guidance,
            prior: prior.clone(),
            true_cfg: family.true_cfg_enabled(),
            regeneration: None,
        };
        rows.groups.push(groups::NewGroup {
            id: group,
            object: context.object,
            index: index as i32,
            seed: seed as i64,
            prompts: serde_json::to_value(&prompts)?,
            image_prompts: serde_json::to_value(&image_prompts)?,
            prior: prior.as_ref().map(serde_json::to_value).transpose()?,
            generation: serde_json::to_value(GenerationSettings::of(&generate))?,
        });
        let payload = JobPayload::Generate(generate);
        rows.jobs
            .push(new_job(config, context.key(), Some(group), payload));
    }
    Ok(())
}

/// A job succeeded: store what it produced (and what produced it) and plan the next stage. A
/// scoring job's output comes with the filter decision the caller made on it. With `later`, the
/// writes that no later report of the caller's batch reads (a generation's images and its
/// scoring job, a group's decision, an object ended by its last group's decision) are left there
/// to be made with the batch's; without, everything is written now.
pub async fn on_success(
    conn: &mut PgConnection,
    config: &RunConfig,
    job: &JobRow,
    output: &JobOutput,
    provenance: Option<&Provenance>,
    verdict: Option<&Verdict>,
    later: Option<&mut LaterWrites>,
) -> Result<()> {
    match output {
        JobOutput::Prompt(output) => on_prompts(conn, config, job, output).await?,
        JobOutput::Prior(prior) => {
            let context = load_object(conn, job.run_id, job.object_id).await?;
            if prior.triplets.is_empty() {
                let reason = "no view triplet with enough overlap";
                return objects::finish(conn, job.object_id, ObjectState::Skipped, Some(reason))
                    .await;
            }
            let priors = prior
                .triplets
                .iter()
                .take(config.generation.rigid.groups_per_object as usize)
                .cloned()
                .map(Some)
                .collect();
            let mut rows = NewRows::default();
            create_groups(&mut rows, config, &context, priors)?;
            rows.write(conn, job.run_id).await?;
        }
        JobOutput::Generate(output) => {
            let group = job.group_id.context("a generation job without a group")?;
            let GenerateOutput {
                image_keys,
                mask_keys,
            } = output;
            if image_keys.len() != mask_keys.len() || image_keys.len() < 2 {
                bail!(
                    "generation output has {} images and {} masks",
                    image_keys.len(),
                    mask_keys.len()
                );
            }
            // Fencing: only the awaited attempt's own files are recorded, so a late attempt
            // (its lease lost, its worker frozen and woken) can never change what is scored.
            let regeneration = job.regeneration();
            let attempt_prefix =
                keys::generation_attempt_prefix(job.run_id, group, regeneration, job.attempts);
            if let Some(key) = image_keys
                .iter()
                .chain(mask_keys)
                .find(|key| !key.starts_with(&attempt_prefix))
            {
                bail!(
                    "generation output {key} lies outside attempt {}'s prefix {attempt_prefix}",
                    job.attempts
                );
            }
            if let Some(number) = regeneration {
                // A regeneration changes nothing about the group: it is compared, not scored.
                return regenerations::record_output(conn, group, number, output, provenance).await;
            }
            let images = groups::GroupImages {
                group,
                image_keys: serde_json::to_value(image_keys)?,
                mask_keys: serde_json::to_value(mask_keys)?,
                generated_by: provenance.map(serde_json::to_value).transpose()?,
            };
            let payload = JobPayload::Score(ScoreJob {
                group_id: group,
                image_keys: image_keys.clone(),
                mask_keys: mask_keys.clone(),
                aesthetic_head: config.scoring.aesthetic_head,
            });
            // The scoring job needs the object's identity only, not its spec and prompts.
            let object = (job.run_id, job.object_id);
            let scoring = new_job(config, object, Some(group), payload);
            match later {
                Some(later) => later.scoring(images, scoring),
                None => {
                    groups::set_images(conn, images).await?;
                    jobs::insert(conn, scoring).await?;
                }
            }
        }
        JobOutput::Score(scores) => {
            let group = job.group_id.context("a scoring job without a group")?;
            let verdict = verdict.context("a scoring result without a filter decision")?;
            let scored_by = provenance.map(serde_json::to_value).transpose()?;
            let decision = groups::ScoredGroup::new(group, scores, verdict, scored_by)?;
            match later {
                Some(later) => later.group_decided(decision, job.object_id),
                None => {
                    groups::decide_many(conn, &[decision]).await?;
                    finish_objects_if_decided(conn, &[job.object_id]).await?;
                }
            }
        }
    }
    Ok(())
}

/// A prompt job succeeded: a rigid object gets its backgrounds; a deformable category's
/// captions are dealt out to every object of the category waiting for them.
async fn on_prompts(
    conn: &mut PgConnection,
    config: &RunConfig,
    job: &JobRow,
    output: &PromptOutput,
) -> Result<()> {
    let waiting = objects_of_job(conn, job, &[ObjectState::Active]).await?;
    let shares = match prompt_category(job) {
        None if output.backgrounds.is_empty() => Vec::new(),
        None => waiting
            .iter()
            .map(|_| CategoryShare {
                description: String::new(),
                backgrounds: output.backgrounds.clone(),
            })
            .collect(),
        Some(_) => share_category_captions(
            &output.backgrounds,
            &output.descriptions,
            waiting.len(),
            (config.generation.images_per_group * config.generation.deformable.groups_per_object)
                as usize,
        ),
    };
    if shares.len() < waiting.len() {
        let reason = if output.backgrounds.is_empty() {
            "the prompt stage returned no backgrounds"
        } else {
            "the prompt stage returned no descriptions"
        };
        for (object, _) in &waiting {
            objects::finish(conn, *object, ObjectState::Failed, Some(reason)).await?;
        }
        return Ok(());
    }
    let mut rows = NewRows::default();
    for ((object, mut spec), share) in waiting.into_iter().zip(shares) {
        let mut descriptions = None;
        if let ObjectSpec::Deformable { description, .. } = &mut spec {
            description.clone_from(&share.description);
            descriptions = Some(vec![share.description]);
        }
        objects::set_prompts(
            conn,
            object,
            serde_json::to_value(&share.backgrounds)?,
            descriptions.map(serde_json::to_value).transpose()?,
            serde_json::to_value(&spec)?,
        )
        .await?;
        let context = ObjectContext {
            run: job.run_id,
            object,
            spec,
            backgrounds: share.backgrounds,
        };
        after_prompts(&mut rows, config, &context)?;
    }
    rows.write(conn, job.run_id).await
}

/// A job failed for good: its group (or, before groups exist, its object) ends.
pub async fn on_failure(
    conn: &mut PgConnection,
    job: &JobRow,
    error: &str,
    permanent: bool,
) -> Result<()> {
    if job.regeneration().is_some() {
        // The group keeps its images and decision; `syncd group regenerate` reports the failure.
        return Ok(());
    }
    match job.group_id {
        Some(group) => {
            let reason = format!("{} job failed: {error}", job.kind);
            groups::fail_pending(conn, group, &reason).await?;
            finish_objects_if_decided(conn, &[job.object_id]).await
        }
        None => {
            let state = if permanent {
                ObjectState::Skipped
            } else {
                ObjectState::Failed
            };
            let reason = format!("{} job failed: {error}", job.kind);
            for (object, _) in objects_of_job(conn, job, &[ObjectState::Active]).await? {
                objects::finish(conn, object, state, Some(&reason)).await?;
            }
            Ok(())
        }
    }
}

/// Each of `objects` is done once every one of its groups is decided.
pub async fn finish_objects_if_decided(
    conn: &mut PgConnection,
    objects: &[ObjectId],
) -> Result<()> {
    if objects.is_empty() {
        return Ok(());
    }
    let undecided: HashSet<ObjectId> = groups::objects_undecided(&mut *conn, objects)
        .await?
        .into_iter()
        .collect();
    let decided: Vec<ObjectId> = objects
        .iter()
        .filter(|object| !undecided.contains(object))
        .copied()
        .collect();
    objects::finish_many(conn, &decided, ObjectState::Done, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_reference_templates_and_are_reproducible() {
        let deformable = ObjectSpec::Deformable {
            category: "Cat".into(),
            description: "a fluffy orange tabby.".into(),
        };
        let backgrounds: Vec<String> = ["on a sofa.", "in a garden", "on a roof"]
            .map(String::from)
            .to_vec();
        let prompts = compose_prompts(&deformable, &backgrounds, 7, 3);
        assert_eq!(prompts, compose_prompts(&deformable, &backgrounds, 7, 3));
        assert_eq!(prompts.len(), 3);
        let mut distinct: Vec<&str> = prompts.iter().map(|p| p.background.as_str()).collect();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "each image gets its own background");
        let sofa = prompts
            .iter()
            .find(|p| p.background == "on a sofa.")
            .unwrap();
        assert_eq!(
            sofa.prompt,
            "on a sofa. a fluffy orange tabby. wide angle shot"
        );
        assert_eq!(sofa.description.as_deref(), Some("a fluffy orange tabby."));

        let rigid = ObjectSpec::Rigid {
            uid: "u".into(),
            caption: "a chair".into(),
            asset_key: "k".into(),
        };
        let prompts = compose_prompts(&rigid, &backgrounds[..1], 7, 3);
        assert_eq!(
            prompts[0].prompt,
            "on a sofa a natural image with the object on the ground."
        );
        assert_eq!(prompts[0].description, None);
    }

    fn captions(prefix: &str, count: usize) -> Vec<String> {
        (0..count).map(|i| format!("{prefix} {i}")).collect()
    }

    #[test]
    fn category_captions_are_dealt_evenly_and_deterministically() {
        let backgrounds = captions("background", 10);
        let descriptions = captions("description", 4);
        let shares = share_category_captions(&backgrounds, &descriptions, 6, 3);
        assert_eq!(
            shares,
            share_category_captions(&backgrounds, &descriptions, 6, 3)
        );
        assert_eq!(shares.len(), 6);
        // Distinct descriptions while there are enough, then round again.
        let dealt: Vec<&str> = shares.iter().map(|s| s.description.as_str()).collect();
        assert_eq!(
            dealt,
            [
                "description 0",
                "description 1",
                "description 2",
                "description 3",
                "description 0",
                "description 1"
            ]
        );
        // Backgrounds follow on from one object to the next, distinct within an object.
        assert_eq!(shares[0].backgrounds, &backgrounds[0..3]);
        assert_eq!(shares[1].backgrounds, &backgrounds[3..6]);
        assert_eq!(
            shares[3].backgrounds,
            ["background 9", "background 0", "background 1"]
        );
        for share in &shares {
            let mut own = share.backgrounds.clone();
            own.dedup();
            assert_eq!(own.len(), 3);
        }
        // Every background used equally often over the 18 dealt.
        let mut uses = std::collections::BTreeMap::<&str, usize>::new();
        for share in &shares {
            for background in &share.backgrounds {
                *uses.entry(background.as_str()).or_default() += 1;
            }
        }
        assert!(uses.values().all(|&n| n == 1 || n == 2), "{uses:?}");
    }

    #[test]
    fn a_small_pool_is_shared_whole_and_an_empty_one_gives_nothing() {
        let shares = share_category_captions(&captions("b", 2), &captions("d", 1), 2, 3);
        assert_eq!(shares[0].backgrounds, ["b 0", "b 1"]);
        assert_eq!(shares[1].backgrounds, ["b 0", "b 1"]);
        assert!(share_category_captions(&[], &captions("d", 1), 2, 3).is_empty());
        assert!(share_category_captions(&captions("b", 2), &[], 2, 3).is_empty());
    }
}
