//! The training loop of a run: episodes out, gradients applied, evaluation on schedule,
//! the best checkpoint kept, and a summary at the end.

use crate::config::{RunConfig, Selection};
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_core::data::Survey;
use gpo_core::eval::EvalReport;
use gpo_core::features::PointFeatures;
use gpo_core::io::checkpoint;
use gpo_core::model::Gpo;
use gpo_core::sampler::EpisodeSpec;
use gpo_worker::{Collective, Local, Replica};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub use crate::plan::{PlanScores, RunPlan};
pub use crate::resume::{checkpoints_dir, load_resume, LoopOptions, Progress, Rewound};

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
        /// GPO's alignment on the validation groups (`selection = "validation"`).
        validation: Option<f64>,
    },
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
    if cfg.model.variant.reads_prior() {
        let mut want = plan.train.clone();
        want.sort_unstable();
        if features.prior.as_ref().map(|p| p.groups()) != Some(want.as_slice()) {
            anyhow::bail!(
                "the `{}` variant reads the population prior of the run's meta-training groups, and the features given carry {} (build them with `plan::run_features`)",
                cfg.model.variant.name(),
                if features.prior.is_some() { "another's" } else { "none" }
            );
        }
    }
    let device = Device::Cpu;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    let config_json = serde_json::to_value(cfg)?;
    let best_path = out.join("best.safetensors");
    let ckpt_dir = checkpoints_dir(out);
    let fingerprint = gpo_worker::wire::data_fingerprint(&survey, &features);
    // Every checkpoint names the data it was trained on, so `gpo eval` can tell.
    let identity = gpo_core::checkpoint::DataIdentity {
        fingerprint: fingerprint.clone(),
        embedder: opts.embedder.clone(),
        paths: opts.data_paths.clone(),
    };
    let stamped = |mut c: gpo_core::checkpoint::Checkpoint| {
        c.data = Some(identity.clone());
        c
    };

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
                checkpoint::save(
                    &best_path,
                    &stamped(d.checkpoint(step, config_json.clone())?),
                )
                .map_err(anyhow::Error::msg)?;
                best = Some((step, scores));
            }
            Ok((improved, report))
        };
    let save_point = |d: &dyn Dispatch, p: &Progress| -> Result<()> {
        let mut c = stamped(d.checkpoint(p.step, config_json.clone())?);
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
            validation: progress.eval_history.last().and_then(|p| p.validation),
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
                validation: progress.eval_history.last().and_then(|p| p.validation),
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
            &stamped(dispatch.checkpoint(cfg.steps, config_json)?),
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
