//! What a run would create, without creating it (`syncd run plan RUN.toml`): its objects, jobs
//! per kind, groups and images, the LLM requests of its prompt stage and an estimate of its GPU
//! time. A pure function of the run file and its inputs, so a plan needs no database; measured
//! per-group times of an earlier run can replace the configured ones.
//!
//! The counts follow the planner (`planner.rs`) exactly: one prompt job per rigid asset without
//! ready-made prompts and one per deformable category, one prior job per rigid asset, one
//! generation and one scoring job per group. A rigid asset's group count is an upper bound: the
//! 3D prior may find fewer view triplets with enough overlap than the run asks for.

use crate::input::{Family, RunInputs};
use crate::run_config::RunConfig;
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything `syncd run plan` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunPlan {
    pub name: String,
    pub objects: ObjectCounts,
    /// Deformable categories asked of the LLM, with their object counts.
    pub categories: BTreeMap<String, CategoryPlan>,
    pub groups: GroupCounts,
    /// Images generated, at most (`images_per_group` per group).
    pub images_at_most: u64,
    pub jobs: JobCounts,
    pub llm: LlmRequests,
    pub gpu: GpuEstimate,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ObjectCounts {
    pub rigid: u64,
    pub deformable: u64,
    /// Objects whose prompts come with the input (no LLM).
    pub ready_made: u64,
    /// Rigid objects of the input whose asset file is missing: left out of this plan (creating
    /// the run refuses them).
    pub missing_assets: u64,
    /// The first few of them, to look for.
    pub missing_examples: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoryPlan {
    pub objects: u64,
    /// Distinct descriptions the category can get at most (requests x captions per request);
    /// with more objects than that, descriptions are dealt round again.
    pub descriptions_at_most: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GroupCounts {
    /// `groups_per_object` per rigid asset: an upper bound, as the prior may find fewer view
    /// triplets.
    pub rigid_at_most: u64,
    pub deformable: u64,
    pub total_at_most: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct JobCounts {
    pub prompt: u64,
    pub prior: u64,
    pub generate_at_most: u64,
    pub score_at_most: u64,
}

/// Requests the prompt stage sends, as the reference sends them. More are sent only where the
/// answers hold fewer usable captions than a list needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LlmRequests {
    /// One per rigid asset without ready-made prompts.
    pub rigid: u64,
    /// Per category: `category_requests` for backgrounds and as many for descriptions.
    pub deformable: u64,
    pub total: u64,
    /// Captions asked for in all these requests.
    pub captions_asked: u64,
}

/// GPU time: generation and scoring of every group, at the given seconds per group.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuEstimate {
    pub rigid_group_seconds: f64,
    pub deformable_group_seconds: f64,
    pub score_group_seconds: f64,
    /// Where the seconds come from: the run file's `[estimate]`, or a measured run.
    pub source: String,
    pub hours: f64,
}

/// Seconds per group measured on an earlier run, per family where it had any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeasuredSeconds {
    pub run: String,
    pub rigid_group: Option<f64>,
    pub deformable_group: Option<f64>,
    pub score_group: Option<f64>,
}

/// The plan of a run file over its read inputs.
pub fn plan_run(
    config: &RunConfig,
    inputs: &RunInputs,
    measured: Option<&MeasuredSeconds>,
) -> RunPlan {
    let generation = &config.generation;
    let mut objects = ObjectCounts {
        missing_assets: inputs.missing_assets.len() as u64,
        missing_examples: inputs.missing_assets.iter().take(5).cloned().collect(),
        ..Default::default()
    };
    let mut categories = BTreeMap::<String, CategoryPlan>::new();
    let mut jobs = JobCounts::default();
    let mut llm = LlmRequests::default();
    let per_category_descriptions = u64::from(config.prompts.category_requests)
        * u64::from(config.prompts.captions_per_request);
    for object in &inputs.objects {
        let ready_made = object.backgrounds.is_some();
        objects.ready_made += u64::from(ready_made);
        match &object.family {
            Family::Rigid { .. } => {
                objects.rigid += 1;
                jobs.prior += 1;
                if !ready_made {
                    jobs.prompt += 1;
                    llm.rigid += 1;
                    llm.captions_asked += u64::from(config.prompts.rigid_backgrounds);
                }
            }
            Family::Deformable { category, .. } => {
                objects.deformable += 1;
                if ready_made {
                    continue;
                }
                let entry = categories
                    .entry(category.clone())
                    .or_insert_with(|| CategoryPlan {
                        objects: 0,
                        descriptions_at_most: per_category_descriptions,
                    });
                if entry.objects == 0 {
                    jobs.prompt += 1;
                    llm.deformable += 2 * u64::from(config.prompts.category_requests);
                    llm.captions_asked += 2 * per_category_descriptions;
                }
                entry.objects += 1;
            }
        }
    }
    llm.total = llm.rigid + llm.deformable;

    let rigid_at_most = objects.rigid * u64::from(generation.rigid.groups_per_object);
    let deformable = objects.deformable * u64::from(generation.deformable.groups_per_object);
    let groups = GroupCounts {
        rigid_at_most,
        deformable,
        total_at_most: rigid_at_most + deformable,
    };
    jobs.generate_at_most = groups.total_at_most;
    jobs.score_at_most = groups.total_at_most;

    let configured = &config.estimate;
    let (rigid_s, deformable_s, score_s, source) = match measured {
        Some(measured) => {
            let mut configured_for = Vec::new();
            let mut pick = |value: Option<f64>, fallback: f64, what: &str| {
                value.unwrap_or_else(|| {
                    configured_for.push(what.to_string());
                    fallback
                })
            };
            let rigid = pick(
                measured.rigid_group,
                configured.rigid_group_seconds,
                "rigid",
            );
            let deformable = pick(
                measured.deformable_group,
                configured.deformable_group_seconds,
                "deformable",
            );
            let score = pick(
                measured.score_group,
                configured.score_group_seconds,
                "scoring",
            );
            let mut source = format!("measured on run {}", measured.run);
            if !configured_for.is_empty() {
                source.push_str(&format!(
                    " ([estimate] for {}, which it had none of)",
                    configured_for.join(", ")
                ));
            }
            (rigid, deformable, score, source)
        }
        None => (
            configured.rigid_group_seconds,
            configured.deformable_group_seconds,
            configured.score_group_seconds,
            "the run file's [estimate]".to_string(),
        ),
    };
    let seconds = groups.rigid_at_most as f64 * (rigid_s + score_s)
        + groups.deformable as f64 * (deformable_s + score_s);
    RunPlan {
        name: config.name.clone(),
        objects,
        categories,
        images_at_most: groups.total_at_most * u64::from(generation.images_per_group),
        groups,
        jobs,
        llm,
        gpu: GpuEstimate {
            rigid_group_seconds: rigid_s,
            deformable_group_seconds: deformable_s,
            score_group_seconds: score_s,
            source,
            hours: seconds / 3600.0,
        },
    }
}

impl RunPlan {
    /// The plan in words, for the terminal.
    pub fn to_text(&self, config: &RunConfig) -> String {
        let generation = &config.generation;
        let prompts = &config.prompts;
        let mut lines = vec![format!("plan of run {:?} (nothing created)", self.name)];
        let objects = &self.objects;
        lines.push(format!(
            "objects       {} rigid, {} deformable in {} categories ({} with ready-made prompts)",
            objects.rigid,
            objects.deformable,
            self.categories.len(),
            objects.ready_made
        ));
        if objects.missing_assets > 0 {
            lines.push(format!(
                "  missing     {} rigid asset(s) not found in {} (left out here; `run create` refuses them): {}",
                objects.missing_assets,
                config
                    .input
                    .assets_dir
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                objects.missing_examples.join(", ")
            ));
        }
        lines.push(format!(
            "groups        up to {} rigid ({} per asset, fewer where the 3D prior finds fewer view triplets) + {} deformable ({} per object) = up to {}",
            self.groups.rigid_at_most,
            generation.rigid.groups_per_object,
            self.groups.deformable,
            generation.deformable.groups_per_object,
            self.groups.total_at_most
        ));
        lines.push(format!(
            "images        up to {} ({} per group)",
            self.images_at_most, generation.images_per_group
        ));
        lines.push(format!(
            "jobs          prompt {}, prior {}, generate up to {}, score up to {}",
            self.jobs.prompt, self.jobs.prior, self.jobs.generate_at_most, self.jobs.score_at_most
        ));
        lines.push(format!(
            "llm requests  {}: {} rigid (1 x {} captions per asset) + {} deformable ({} categories x {} requests x 2 lists x {} captions); {} captions asked; more only where answers fall short",
            self.llm.total,
            self.llm.rigid,
            prompts.rigid_backgrounds,
            self.llm.deformable,
            self.categories.len(),
            prompts.category_requests,
            prompts.captions_per_request,
            self.llm.captions_asked
        ));
        for (category, plan) in &self.categories {
            let reuse = if plan.objects > plan.descriptions_at_most {
                format!(
                    ", each description serving about {} objects",
                    plan.objects.div_ceil(plan.descriptions_at_most.max(1))
                )
            } else {
                String::new()
            };
            lines.push(format!(
                "  {category:<11} {} objects, at most {} distinct descriptions{reuse}",
                plan.objects, plan.descriptions_at_most
            ));
        }
        let gpu = &self.gpu;
        lines.push(format!(
            "gpu time      about {:.0} GPU-hours: {} rigid groups x {} s + {} deformable x {} s, scoring {} s per group ({})",
            gpu.hours,
            self.groups.rigid_at_most,
            gpu.rigid_group_seconds,
            self.groups.deformable,
            gpu.deformable_group_seconds,
            gpu.score_group_seconds,
            gpu.source
        ));
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::PlannedObject;

    fn config(text: &str) -> RunConfig {
        RunConfig::from_toml(&format!("name = \"p\"\n{text}")).unwrap()
    }

    fn rigid(uid: &str, ready_made: bool) -> PlannedObject {
        PlannedObject {
            family: Family::Rigid {
                uid: uid.into(),
                caption: "a chair".into(),
                asset: crate::input::Asset::File("x.glb".into()),
            },
            backgrounds: ready_made.then(|| vec!["in a room".into()]),
        }
    }

    fn deformable(category: &str) -> PlannedObject {
        PlannedObject {
            family: Family::Deformable {
                category: category.into(),
                description: String::new(),
            },
            backgrounds: None,
        }
    }

    #[test]
    fn counts_follow_the_planner() {
        let config = config("[input]\n[estimate]\nrigid_group_seconds = 10.0\ndeformable_group_seconds = 30.0\nscore_group_seconds = 0.0\n");
        let mut objects = vec![rigid("a", false), rigid("b", false), rigid("c", true)];
        objects.extend((0..3).map(|_| deformable("Cat")));
        objects.extend((0..2).map(|_| deformable("Dog")));
        let inputs = RunInputs {
            objects,
            missing_assets: vec!["gone".into()],
        };
        let plan = plan_run(&config, &inputs, None);
        assert_eq!(plan.objects.rigid, 3);
        assert_eq!(plan.objects.deformable, 5);
        assert_eq!(plan.objects.ready_made, 1);
        assert_eq!(plan.objects.missing_assets, 1);
        // Two rigid prompt jobs (one asset is ready-made) and one per category.
        assert_eq!(plan.jobs.prompt, 4);
        assert_eq!(plan.jobs.prior, 3);
        assert_eq!(plan.groups.rigid_at_most, 6);
        assert_eq!(plan.groups.deformable, 5);
        assert_eq!(plan.jobs.generate_at_most, 11);
        assert_eq!(plan.images_at_most, 33);
        assert_eq!(plan.llm.rigid, 2);
        assert_eq!(plan.llm.deformable, 2 * 2 * 6);
        assert_eq!(plan.llm.captions_asked, 2 * 10 + 2 * 2 * 6 * 25);
        assert_eq!(plan.categories["Cat"].objects, 3);
        assert_eq!(plan.categories["Cat"].descriptions_at_most, 150);
        assert!((plan.gpu.hours - (6.0 * 10.0 + 5.0 * 30.0) / 3600.0).abs() < 1e-12);
        let text = plan.to_text(&config);
        assert!(text.contains("up to 6 rigid"), "{text}");
        assert!(text.contains("1 rigid asset(s) not found"), "{text}");
    }

    #[test]
    fn measured_seconds_replace_the_configured_ones_where_there_are_any() {
        let config = config("[input]\n");
        let inputs = RunInputs {
            objects: vec![rigid("a", false), deformable("Fox")],
            missing_assets: Vec::new(),
        };
        let measured = MeasuredSeconds {
            run: "pilot".into(),
            rigid_group: Some(12.0),
            deformable_group: None,
            score_group: Some(0.5),
        };
        let plan = plan_run(&config, &inputs, Some(&measured));
        assert_eq!(plan.gpu.rigid_group_seconds, 12.0);
        assert_eq!(plan.gpu.deformable_group_seconds, 29.0);
        assert!(plan.gpu.source.contains("pilot"));
        assert!(plan.gpu.source.contains("deformable"));
        let expected = (2.0 * 12.5 + 29.5) / 3600.0;
        assert!((plan.gpu.hours - expected).abs() < 1e-12);
    }
}
