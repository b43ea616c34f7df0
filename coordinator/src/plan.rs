//! A run's plan, derived from its seed: the group split (meta-training, validation, held-out
//! test), the episode pools, the evaluation episodes, and how the reported checkpoint is
//! selected. Pure: no I/O.

use crate::config::{RunConfig, Selection};
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_core::data::Survey;
use gpo_core::eval::{evaluate, EvalReport};
use gpo_core::features::PointFeatures;
use gpo_core::model::Gpo;
use gpo_core::sampler::{
    common_questions, eval_episodes, evaluable_groups, group_split, step_episodes,
    validation_split, EpisodeSpec,
};

/// The group split and episode pools of a run, derived from its seed.
pub struct RunPlan {
    /// Meta-training groups (without the validation groups).
    pub train: Vec<usize>,
    /// Validation groups, carved by seed from the meta-training groups that answered more
    /// than `eval_context` questions (`selection = "validation"`; empty otherwise).
    pub validation: Vec<usize>,
    /// Held-out test groups that are evaluated.
    pub test: Vec<usize>,
    /// Shared question pool for training (OpinionQA-style data), else `None`.
    pub train_pool: Option<Vec<usize>>,
    /// Evaluation episodes of the test groups.
    pub eval: Vec<EpisodeSpec>,
    /// Evaluation episodes of the validation groups.
    pub validation_eval: Vec<EpisodeSpec>,
    /// How the reported checkpoint is selected.
    pub selection: Selection,
    /// Groups left out, and why (also logged as warnings).
    pub notes: Vec<String>,
}

/// The scores of one evaluation: the test groups', and the validation groups' when the run
/// selects on them.
#[derive(Debug, Clone)]
pub struct PlanScores {
    /// Held-out test groups.
    pub test: EvalReport,
    /// Validation groups.
    pub validation: Option<EvalReport>,
}

impl PlanScores {
    /// GPO's score that selects the checkpoint.
    pub fn selection_score(&self) -> f64 {
        self.validation.as_ref().unwrap_or(&self.test).methods["gpo"]
    }
}

/// Evaluation episodes for `groups` with `n_ctx` context questions each: groups that
/// answered no more than `n_ctx` questions are skipped with a note (`role` names them in
/// it); the shared pool (OpinionQA-style data) is over the groups kept.
fn plan_eval(
    s: &Survey,
    seed: u64,
    groups: &[usize],
    n_ctx: usize,
    role: &str,
    notes: &mut Vec<String>,
) -> Result<(Vec<usize>, Vec<EpisodeSpec>)> {
    let (keep, skipped) = evaluable_groups(s, groups, n_ctx);
    for (g, n) in skipped {
        notes.push(format!(
            "{role} group `{}` answered {n} questions, not more than the evaluation's {n_ctx} context questions; skipped from evaluation (lower `eval_context`, or leave such groups out with `min_questions`)",
            s.groups[g].name
        ));
    }
    if keep.is_empty() {
        anyhow::bail!(
            "no {role} group answered more than the evaluation's {n_ctx} context questions; lower `eval_context`"
        );
    }
    let pool = s
        .metric
        .shares_questions()
        .then(|| common_questions(s, &keep));
    let eps = eval_episodes(s, seed, &keep, pool.as_deref(), n_ctx)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("planning the {role} evaluation"))?;
    Ok((keep, eps))
}

/// The run's features as its replicas and evaluations read them: `f` with the population
/// prior of the run's meta-training groups when the model variant reads it, else `f` itself.
pub fn run_features(cfg: &RunConfig, s: &Survey, f: PointFeatures) -> Result<PointFeatures> {
    if !cfg.model.variant.reads_prior() {
        return Ok(f);
    }
    let (train, _, _) = split_groups(cfg, s, &mut Vec::new())?;
    Ok(f.with_prior(s, &train))
}

/// (meta-training, validation, test) groups of a run; groups left out are noted in `notes`.
fn split_groups(
    cfg: &RunConfig,
    s: &Survey,
    notes: &mut Vec<String>,
) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    // `min_questions`: groups that answered too little take no part.
    let kept: Vec<usize> = (0..s.groups.len())
            .filter(|&g| {
                let n = s.answered(g).len();
                let ok = n >= cfg.min_questions;
                if !ok {
                    notes.push(format!(
                        "group `{}` answered {n} questions, fewer than `min_questions` = {}; left out of the run",
                        s.groups[g].name, cfg.min_questions
                    ));
                }
                ok
            })
            .collect();
    let (train, test) =
        group_split(kept.len(), cfg.group_split, cfg.seed).map_err(anyhow::Error::msg)?;
    let (train, test): (Vec<usize>, Vec<usize>) = (
        train.iter().map(|&i| kept[i]).collect(),
        test.iter().map(|&i| kept[i]).collect(),
    );
    let (train, validation) = match cfg.selection {
        Selection::Test => (train, Vec::new()),
        Selection::Validation => {
            // Only groups that can be evaluated can validate; the others still train.
            let (able, thin) = evaluable_groups(s, &train, cfg.eval_context);
            let (mut rest, val) = validation_split(&able, cfg.validation_split, cfg.seed)
                    .map_err(anyhow::Error::msg)
                    .context("carving the validation groups (`validation_split`) from the meta-training groups that answered more than `eval_context` questions")?;
            rest.extend(thin.iter().map(|&(g, _)| g));
            rest.sort_unstable();
            (rest, val)
        }
    };
    Ok((train, validation, test))
}

impl RunPlan {
    /// Plans a run over a survey.
    pub fn new(cfg: &RunConfig, s: &Survey) -> Result<Self> {
        let mut notes = Vec::new();
        let (train, validation, test) = split_groups(cfg, s, &mut notes)?;
        let shares = s.metric.shares_questions();
        let train_pool = shares.then(|| common_questions(s, &train));
        let (test, eval) = plan_eval(s, cfg.seed, &test, cfg.eval_context, "test", &mut notes)?;
        let (validation, validation_eval) = if validation.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            plan_eval(
                s,
                cfg.seed,
                &validation,
                cfg.eval_context,
                "validation",
                &mut notes,
            )?
        };
        for n in &notes {
            tracing::warn!("{n}");
        }
        Ok(RunPlan {
            train,
            validation,
            test,
            train_pool,
            eval,
            validation_eval,
            selection: cfg.selection,
            notes,
        })
    }

    /// Episodes of one step.
    pub fn episodes(&self, cfg: &RunConfig, s: &Survey, step: u64) -> Result<Vec<EpisodeSpec>> {
        step_episodes(
            s,
            cfg.seed,
            step,
            &self.train,
            self.train_pool.as_deref(),
            &cfg.sampler,
        )
        .map_err(anyhow::Error::msg)
    }

    /// Scores `model` on the test groups, and on the validation groups when the run selects
    /// on them.
    pub fn evaluate(
        &self,
        model: &Gpo,
        s: &Survey,
        f: &PointFeatures,
        device: &Device,
    ) -> Result<PlanScores> {
        let test = evaluate(model, s, f, &self.train, &self.eval, device)?;
        let validation = if self.validation_eval.is_empty() {
            None
        } else {
            Some(evaluate(
                model,
                s,
                f,
                &self.train,
                &self.validation_eval,
                device,
            )?)
        };
        Ok(PlanScores { test, validation })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpo_core::data::MetricKind;
    use gpo_core::synth::{generate, SynthConfig};

    fn survey(metric: MetricKind) -> Survey {
        let mut s = generate(&SynthConfig {
            n_questions: 30,
            n_groups: 10,
            dim: 4,
            ..Default::default()
        })
        .survey
        .clone();
        s.metric = metric;
        s
    }

    fn cfg(selection: Selection) -> RunConfig {
        RunConfig {
            group_split: 0.6,
            eval_context: 5,
            selection,
            ..Default::default()
        }
    }

    #[test]
    fn validation_groups_are_carved_from_training_and_evaluated() {
        let s = survey(MetricKind::Wasserstein);
        let p = RunPlan::new(&cfg(Selection::Validation), &s).unwrap();
        assert_eq!((p.train.len(), p.validation.len(), p.test.len()), (5, 1, 4));
        assert!(p
            .validation
            .iter()
            .all(|g| !p.train.contains(g) && !p.test.contains(g)));
        assert_eq!(p.validation_eval.len(), 1);
        assert_eq!(p.validation_eval[0].group, p.validation[0]);
        // The paper's way: no validation, every meta-training group trains.
        let t = RunPlan::new(&cfg(Selection::Test), &s).unwrap();
        assert_eq!((t.train.len(), t.validation.len()), (6, 0));
        assert_eq!(t.test, p.test);
        let mut all = p.train.clone();
        all.extend(&p.validation);
        all.sort_unstable();
        assert_eq!(all, t.train);
    }

    /// GlobalOpinionQA-style data where a held-out country answered fewer questions than
    /// the evaluation's context: skipped with a note, not a refused run; `min_questions`
    /// leaves such groups out of the run altogether.
    #[test]
    fn a_held_out_group_with_few_answers_is_skipped_with_a_note() {
        let mut s = survey(MetricKind::JensenShannon);
        let c = cfg(Selection::Test);
        let test = RunPlan::new(&c, &s).unwrap().test;
        let poor = test[1];
        for q in 4..30 {
            s.answers[poor][q] = None;
        }
        let p = RunPlan::new(&c, &s).unwrap();
        assert!(!p.test.contains(&poor));
        assert_eq!(p.eval.len(), test.len() - 1);
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
        let name = &s.groups[poor].name;
        assert!(
            p.notes[0].contains(&format!("`{name}` answered 4 questions")),
            "{:?}",
            p.notes
        );
        let m = RunConfig {
            min_questions: 10,
            ..c.clone()
        };
        let p = RunPlan::new(&m, &s).unwrap();
        assert!(p.notes[0].contains("left out of the run"), "{:?}", p.notes);
        assert!(!p.test.contains(&poor) && !p.train.contains(&poor));
        // Nobody answered enough: an error that says what to change.
        let e = RunPlan::new(
            &RunConfig {
                eval_context: 40,
                ..c
            },
            &s,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("eval_context"), "{e}");
    }
}
