//! The training loop of a run: episodes out, gradients applied, evaluation on schedule,
//! the best checkpoint kept, and a summary at the end.

use crate::config::{RunConfig, Selection};
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_core::data::Survey;
use gpo_core::eval::{evaluate, EvalReport};
use gpo_core::features::PointFeatures;
use gpo_core::io::checkpoint;
use gpo_core::model::Gpo;
use gpo_core::sampler::{
    common_questions, eval_episodes, evaluable_groups, group_split, step_episodes,
    validation_split, EpisodeSpec,
};
use gpo_worker::{Collective, Local, Replica};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where a step's episodes go and where the current model can be read back. The
/// single-process [`InProcess`] and the gRPC [`crate::dispatch::GrpcDispatch`] share the loop
/// of [`train`] through it.
pub trait Dispatch {
    /// Runs one data-parallel step over all of `episodes`; returns the batch loss. When
    /// `sync` is true the caller reads [`Dispatch::model`] or [`Dispatch::checkpoint`] next,
    /// so they must reflect this step.
    fn step(
        &mut self,
        step: u64,
        total_steps: u64,
        episodes: &[EpisodeSpec],
        sync: bool,
    ) -> Result<f64>;
    /// The current model (identical on every replica), as of the last `sync` step.
    fn model(&self) -> &Gpo;
    /// A checkpoint of the current state.
    fn checkpoint(
        &self,
        step: u64,
        config: serde_json::Value,
    ) -> Result<gpo_core::checkpoint::Checkpoint>;
    /// Timings worth keeping in `summary.json` (the distributed dispatch's), if any.
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
    /// The recoveries from failures so far (`summary.json`'s `recoveries`).
    fn recoveries(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
}

/// One replica in this process: the single-process trainer.
pub struct InProcess {
    /// The replica.
    pub replica: Replica,
    comm: Local,
}

impl InProcess {
    /// Wraps a replica.
    pub fn new(replica: Replica) -> Self {
        InProcess {
            replica,
            comm: Local,
        }
    }
}

impl Dispatch for InProcess {
    fn step(
        &mut self,
        step: u64,
        total_steps: u64,
        episodes: &[EpisodeSpec],
        _sync: bool,
    ) -> Result<f64> {
        let n = episodes.len();
        let comm: &mut dyn Collective = &mut self.comm;
        Ok(self
            .replica
            .step(episodes, n, step, total_steps, comm)?
            .loss_share)
    }
    fn model(&self) -> &Gpo {
        self.replica.model()
    }
    fn checkpoint(
        &self,
        step: u64,
        config: serde_json::Value,
    ) -> Result<gpo_core::checkpoint::Checkpoint> {
        self.replica.checkpoint(step, config)
    }
}

/// Progress events for a front end (progress bar, logs).
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// A step finished.
    Step { step: u64, loss: f64, seconds: f64 },
    /// An evaluation finished.
    Eval {
        step: u64,
        report: EvalReport,
        best: bool,
    },
}

/// The error a dispatch returns when the run went back to step `to` (no live worker
/// held the committed state; the dispatch holds `to`'s): the loop continues from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewound {
    /// The step the run is back at.
    pub to: u64,
}

impl std::fmt::Display for Rewound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the run went back to step {}", self.to)
    }
}

impl std::error::Error for Rewound {}

impl Progress {
    /// Forgets everything after step `to` (its steps run again, identically).
    pub fn truncate(&mut self, to: u64) {
        self.step = to;
        self.loss_history.retain(|(s, _)| *s <= to);
        self.eval_history.retain(|e| e.step <= to);
        self.step_times.truncate(self.loss_history.len());
    }
}

/// One evaluation in the run's history.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EvalPoint {
    /// Step evaluated after (0 = before training).
    pub step: u64,
    /// GPO's alignment on the held-out test groups.
    pub gpo: f64,
    /// GPO's alignment on the validation groups (`selection = "validation"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<f64>,
}

/// The training loop's own state at a step: what a resumed run needs, beyond the
/// parameters and optimizer state, to continue as if it had never stopped. Saved in every
/// resume point's metadata.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Progress {
    /// The step this progress is at.
    pub step: u64,
    /// Mean training loss per step.
    pub loss_history: Vec<(u64, f64)>,
    /// Every evaluation.
    pub eval_history: Vec<EvalPoint>,
    /// Step of the best checkpoint so far (`best.safetensors`).
    pub best_step: Option<u64>,
    /// Seconds per step so far.
    pub step_times: Vec<f64>,
    /// The data the run trains on ([`gpo_worker::wire::data_fingerprint`]).
    pub data_fingerprint: String,
    /// Recoveries of earlier coordinators of this run.
    #[serde(default)]
    pub recoveries: Vec<serde_json::Value>,
}

/// How the loop keeps resume points and stops early.
#[derive(Debug, Clone, Default)]
pub struct LoopOptions {
    /// Also write a resume point every this many steps (0: only at evaluations, at a stop
    /// and at the end).
    pub checkpoint_every: u64,
    /// Resume points kept in `out/checkpoints/` (the newest; at least 1).
    pub keep_checkpoints: usize,
    /// Set (by a signal handler) to stop: the next step brings the state back, a resume
    /// point is written, and the loop returns a summary with `stopped_at`.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Continue from this progress; the dispatch already holds the state of its step.
    pub resume: Option<Progress>,
}

/// The run's summary, written to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The alignment metric (`wasserstein`, `jensen_shannon`, `accuracy`).
    pub metric: gpo_core::data::MetricKind,
    /// Alignment per method on the held-out test groups (GPO: the selected checkpoint's).
    pub methods: BTreeMap<String, f64>,
    /// How the checkpoint was selected (`validation` or `test`).
    pub selection: Selection,
    /// Alignment per method on the validation groups at the selected checkpoint
    /// (`selection = "validation"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<BTreeMap<String, f64>>,
    /// Steps run.
    pub steps: u64,
    /// Step of the selected checkpoint.
    pub best_step: u64,
    /// Meta-training group names.
    pub train_groups: Vec<String>,
    /// Validation group names (carved from the meta-training groups; they do not train).
    pub validation_groups: Vec<String>,
    /// Held-out test group names (those evaluated).
    pub test_groups: Vec<String>,
    /// Groups left out of training or evaluation, and why.
    pub plan_notes: Vec<String>,
    /// Test (group, question) pairs whose question no training group answered, where
    /// `train_mean` falls back to uniform.
    pub no_train_answer_pairs: usize,
    /// Path of the best checkpoint.
    pub checkpoint: PathBuf,
    /// GPO's alignment per held-out group at the best checkpoint.
    pub per_group: BTreeMap<String, f64>,
    /// (group, question) pairs scored.
    pub eval_pairs: usize,
    /// Mean training loss per logged step.
    pub loss_history: Vec<(u64, f64)>,
    /// Every evaluation.
    pub eval_history: Vec<EvalPoint>,
    /// Median seconds per step.
    pub median_step_s: f64,
    /// The configuration that ran.
    pub config: RunConfig,
    /// Dataset name.
    pub dataset: String,
    /// Workers and step timings of a distributed run (absent for a single-process run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distributed: Option<serde_json::Value>,
    /// One entry per failure recovered from: step, reason, `detect_s`, `recover_s`,
    /// `steps_recomputed`.
    pub recoveries: Vec<serde_json::Value>,
    /// The step the run was stopped at (SIGTERM) before its end; resume with `--resume`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<u64>,
    /// The step this run resumed from, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
}

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

impl RunPlan {
    /// Plans a run over a survey.
    pub fn new(cfg: &RunConfig, s: &Survey) -> Result<Self> {
        let mut notes = Vec::new();
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

/// Trains GPO on `survey` and writes `out/best.safetensors`, `out/last.safetensors`,
/// resume points in `out/checkpoints/`, and `out/summary.json`.
pub fn train(
    cfg: &RunConfig,
    survey: Arc<Survey>,
    features: Arc<PointFeatures>,
    dispatch: &mut dyn Dispatch,
    out: &Path,
    on_event: &mut dyn FnMut(RunEvent),
) -> Result<Summary> {
    train_with(
        cfg,
        survey,
        features,
        dispatch,
        out,
        &LoopOptions::default(),
        on_event,
    )
}

/// The folder of a run's resume points.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// [`train`] with resume points, a stop flag and resume.
pub fn train_with(
    cfg: &RunConfig,
    survey: Arc<Survey>,
    features: Arc<PointFeatures>,
    dispatch: &mut dyn Dispatch,
    out: &Path,
    opts: &LoopOptions,
    on_event: &mut dyn FnMut(RunEvent),
) -> Result<Summary> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let plan = RunPlan::new(cfg, &survey)?;
    let device = Device::Cpu;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    let config_json = serde_json::to_value(cfg)?;
    let best_path = out.join("best.safetensors");
    let ckpt_dir = checkpoints_dir(out);
    let fingerprint = gpo_worker::wire::data_fingerprint(&survey, &features);

    let mut progress = match &opts.resume {
        Some(p) => {
            if !p.data_fingerprint.is_empty() && p.data_fingerprint != fingerprint {
                anyhow::bail!(
                    "cannot resume: the run trained on data with fingerprint {}, this data's is {fingerprint}",
                    p.data_fingerprint
                );
            }
            p.clone()
        }
        None => Progress {
            data_fingerprint: fingerprint.clone(),
            ..Default::default()
        },
    };
    let resumed_from = opts.resume.as_ref().map(|p| p.step);
    let mut best: Option<(u64, PlanScores)> = None;
    if progress.best_step.is_some() {
        // The best checkpoint's report, re-scored (evaluation is deterministic). Its own
        // step counts: it may be newer than the resume point, if the run died between
        // writing the two; replaying that step then finds it equal, not better.
        let c = checkpoint::load(&best_path).map_err(anyhow::Error::msg)?;
        let b = c.step;
        let model = Gpo::new(cfg.model.clone(), cfg.seed, &device)?;
        let flat: Vec<f32> = c
            .params
            .iter()
            .flat_map(|p| p.data.iter().copied())
            .collect();
        model.params.set_flat(&flat)?;
        let scores = plan.evaluate(&model, &survey, &features, &device)?;
        best = Some((b, scores));
    }
    let mut evaluate_now =
        |step: u64, d: &dyn Dispatch, hist: &mut Vec<EvalPoint>| -> Result<(bool, EvalReport)> {
            let scores = plan.evaluate(d.model(), &survey, &features, &device)?;
            hist.push(EvalPoint {
                step,
                gpo: scores.test.methods["gpo"],
                validation: scores.validation.as_ref().map(|v| v.methods["gpo"]),
            });
            let score = scores.selection_score();
            let improved = best
                .as_ref()
                .is_none_or(|(_, b)| score > b.selection_score());
            let report = scores.test.clone();
            if improved {
                checkpoint::save(&best_path, &d.checkpoint(step, config_json.clone())?)
                    .map_err(anyhow::Error::msg)?;
                best = Some((step, scores));
            }
            Ok((improved, report))
        };
    let save_point = |d: &dyn Dispatch, p: &Progress| -> Result<()> {
        let mut c = d.checkpoint(p.step, config_json.clone())?;
        c.progress = Some(serde_json::to_value(p)?);
        let path = ckpt_dir.join(checkpoint::resume_point_name(p.step));
        checkpoint::save(&path, &c).map_err(anyhow::Error::msg)?;
        checkpoint::prune(&ckpt_dir, opts.keep_checkpoints.max(1))
            .with_context(|| format!("pruning {}", ckpt_dir.display()))
    };

    if resumed_from.is_none() {
        let (b, report) = evaluate_now(0, dispatch, &mut progress.eval_history)?;
        if b {
            progress.best_step = Some(0);
        }
        on_event(RunEvent::Eval {
            step: 0,
            report,
            best: b,
        });
    }
    let stop_requested = || {
        opts.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    let mut stopped_at = None;
    let mut step = progress.step;
    while step < cfg.steps {
        step += 1;
        let eps = plan.episodes(cfg, &survey, step)?;
        let t = Instant::now();
        let stop = stop_requested();
        let eval_due = step % cfg.eval_every == 0 || step == cfg.steps;
        let every = opts.checkpoint_every;
        let point_due = eval_due || stop || (every > 0 && step % every == 0);
        let loss = match dispatch.step(step, cfg.steps, &eps, point_due) {
            Ok(l) => l,
            Err(e) => match e.downcast_ref::<Rewound>() {
                Some(r) => {
                    tracing::warn!("{r}; steps {}..={step} run again", r.to + 1);
                    progress.truncate(r.to);
                    step = r.to;
                    continue;
                }
                None => return Err(e.context(format!("step {step}"))),
            },
        };
        if !loss.is_finite() {
            anyhow::bail!("step {step}: the loss is {loss}; lower `adam.lr` or check the embeddings for extreme values");
        }
        let secs = t.elapsed().as_secs_f64();
        progress.step = step;
        progress.step_times.push(secs);
        progress.loss_history.push((step, loss));
        on_event(RunEvent::Step {
            step,
            loss,
            seconds: secs,
        });
        if eval_due {
            let (b, report) = evaluate_now(step, dispatch, &mut progress.eval_history)?;
            if b {
                progress.best_step = Some(step);
            }
            on_event(RunEvent::Eval {
                step,
                report,
                best: b,
            });
        }
        if point_due {
            save_point(dispatch, &progress)?;
        }
        if stop && step < cfg.steps {
            stopped_at = Some(step);
            break;
        }
    }
    if stopped_at.is_none() {
        checkpoint::save(
            &out.join("last.safetensors"),
            &dispatch.checkpoint(cfg.steps, config_json)?,
        )
        .map_err(anyhow::Error::msg)?;
    }
    let (best_step, best_scores) = best.context("no evaluation ran")?;
    let best_report = &best_scores.test;
    let mut times = progress.step_times.clone();
    times.sort_by(f64::total_cmp);
    let names = |v: &[usize]| {
        v.iter()
            .map(|&g| survey.groups[g].name.clone())
            .collect::<Vec<_>>()
    };
    let mut recoveries = progress.recoveries.clone();
    recoveries.extend(dispatch.recoveries());
    let summary = Summary {
        metric: survey.metric,
        methods: best_report.methods.clone(),
        selection: plan.selection,
        validation: best_scores.validation.as_ref().map(|v| v.methods.clone()),
        steps: progress.step,
        best_step,
        train_groups: names(&plan.train),
        validation_groups: names(&plan.validation),
        test_groups: names(&plan.test),
        plan_notes: plan.notes.clone(),
        no_train_answer_pairs: best_report.no_train_answer,
        checkpoint: best_path,
        per_group: best_report.per_group.clone(),
        eval_pairs: best_report.pairs,
        loss_history: progress.loss_history,
        eval_history: progress.eval_history,
        median_step_s: times.get(times.len() / 2).copied().unwrap_or(0.0),
        config: cfg.clone(),
        dataset: survey.name.clone(),
        distributed: dispatch.stats(),
        recoveries,
        stopped_at,
        resumed_from,
    };
    let json = serde_json::to_vec_pretty(&summary)?;
    checkpoint::write_atomic(&out.join("summary.json"), &json).context("writing summary.json")?;
    Ok(summary)
}

/// Reads a resume point: the run configuration, the progress, and the state for the
/// replicas. `dir` is a run's output folder. A corrupt newest point falls back to the one
/// before, with the reason among the returned warnings.
pub fn load_resume(
    dir: &Path,
) -> Result<(
    RunConfig,
    Progress,
    gpo_core::checkpoint::Checkpoint,
    Vec<String>,
)> {
    let (c, path, warnings) =
        checkpoint::load_newest(&checkpoints_dir(dir)).map_err(anyhow::Error::msg)?;
    let cfg: RunConfig = serde_json::from_value(c.config.clone()).with_context(|| {
        format!(
            "{}: metadata `config` is not a run configuration",
            path.display()
        )
    })?;
    let progress: Progress = serde_json::from_value(
        c.progress
            .clone()
            .with_context(|| format!("{}: not a resume point (no progress)", path.display()))?,
    )
    .with_context(|| format!("{}: metadata `progress`", path.display()))?;
    if c.adam.is_none() {
        anyhow::bail!(
            "{}: a resume point needs the optimizer state",
            path.display()
        );
    }
    Ok((cfg, progress, c, warnings))
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
