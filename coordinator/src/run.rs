//! The training loop of a run: episodes out, gradients applied, evaluation on schedule,
//! the best checkpoint kept, and a summary at the end.

use crate::config::RunConfig;
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_core::data::Survey;
use gpo_core::eval::{evaluate, EvalReport};
use gpo_core::features::PointFeatures;
use gpo_core::io::checkpoint;
use gpo_core::model::Gpo;
use gpo_core::sampler::{common_questions, eval_episodes, group_split, step_episodes, EpisodeSpec};
use gpo_worker::{Collective, Local, Replica};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where a step's episodes go and where the current model can be read back. The
/// single-process [`InProcess`] and the gRPC [`crate::server::GrpcDispatch`] share the loop
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

/// One evaluation in the run's history.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    /// Step evaluated after (0 = before training).
    pub step: u64,
    /// GPO's alignment.
    pub gpo: f64,
}

/// The run's summary, written to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The alignment metric (`wasserstein`, `jensen_shannon`, `accuracy`).
    pub metric: gpo_core::data::MetricKind,
    /// Alignment per method on the held-out groups (GPO: the best checkpoint's).
    pub methods: BTreeMap<String, f64>,
    /// Steps run.
    pub steps: u64,
    /// Step of the best checkpoint.
    pub best_step: u64,
    /// Meta-training group names.
    pub train_groups: Vec<String>,
    /// Held-out group names.
    pub test_groups: Vec<String>,
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
}

/// The group split and episode pools of a run, derived from its seed.
pub struct RunPlan {
    /// Meta-training groups.
    pub train: Vec<usize>,
    /// Held-out groups.
    pub test: Vec<usize>,
    /// Shared question pool for training (OpinionQA-style data), else `None`.
    pub train_pool: Option<Vec<usize>>,
    /// Evaluation episodes.
    pub eval: Vec<EpisodeSpec>,
}

impl RunPlan {
    /// Plans a run over a survey.
    pub fn new(cfg: &RunConfig, s: &Survey) -> Result<Self> {
        let (train, test) =
            group_split(s.groups.len(), cfg.group_split, cfg.seed).map_err(anyhow::Error::msg)?;
        let shares = s.metric.shares_questions();
        let train_pool = shares.then(|| common_questions(s, &train));
        let test_pool = shares.then(|| common_questions(s, &test));
        let eval = eval_episodes(s, cfg.seed, &test, test_pool.as_deref(), cfg.eval_context)
            .map_err(anyhow::Error::msg)
            .context("planning the evaluation")?;
        Ok(RunPlan {
            train,
            test,
            train_pool,
            eval,
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
}

/// Trains GPO on `survey` and writes `out/best.safetensors`, `out/last.safetensors` and
/// `out/summary.json`.
pub fn train(
    cfg: &RunConfig,
    survey: Arc<Survey>,
    features: Arc<PointFeatures>,
    dispatch: &mut dyn Dispatch,
    out: &Path,
    on_event: &mut dyn FnMut(RunEvent),
) -> Result<Summary> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let plan = RunPlan::new(cfg, &survey)?;
    let device = Device::Cpu;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    let config_json = serde_json::to_value(cfg)?;
    let best_path = out.join("best.safetensors");

    let mut eval_history = Vec::new();
    let mut best: Option<(u64, EvalReport)> = None;
    let mut evaluate_now =
        |step: u64, d: &dyn Dispatch, hist: &mut Vec<EvalPoint>| -> Result<(bool, EvalReport)> {
            let report = evaluate(
                d.model(),
                &survey,
                &features,
                &plan.train,
                &plan.eval,
                &device,
            )?;
            let gpo = report.methods["gpo"];
            hist.push(EvalPoint { step, gpo });
            let improved = best.as_ref().is_none_or(|(_, b)| gpo > b.methods["gpo"]);
            if improved {
                checkpoint::save(&best_path, &d.checkpoint(step, config_json.clone())?)
                    .map_err(anyhow::Error::msg)?;
                best = Some((step, report.clone()));
            }
            Ok((improved, report))
        };

    let (b, report) = evaluate_now(0, dispatch, &mut eval_history)?;
    on_event(RunEvent::Eval {
        step: 0,
        report,
        best: b,
    });
    let mut loss_history = Vec::new();
    let mut times = Vec::with_capacity(cfg.steps as usize);
    for step in 1..=cfg.steps {
        let eps = plan.episodes(cfg, &survey, step)?;
        let t = Instant::now();
        let eval_due = step % cfg.eval_every == 0 || step == cfg.steps;
        let loss = dispatch
            .step(step, cfg.steps, &eps, eval_due)
            .with_context(|| format!("step {step}"))?;
        if !loss.is_finite() {
            anyhow::bail!("step {step}: the loss is {loss}; lower `adam.lr` or check the embeddings for extreme values");
        }
        let secs = t.elapsed().as_secs_f64();
        times.push(secs);
        loss_history.push((step, loss));
        on_event(RunEvent::Step {
            step,
            loss,
            seconds: secs,
        });
        if eval_due {
            let (b, report) = evaluate_now(step, dispatch, &mut eval_history)?;
            on_event(RunEvent::Eval {
                step,
                report,
                best: b,
            });
        }
    }
    checkpoint::save(
        &out.join("last.safetensors"),
        &dispatch.checkpoint(cfg.steps, config_json)?,
    )
    .map_err(anyhow::Error::msg)?;
    let (best_step, best_report) = best.context("no evaluation ran")?;
    times.sort_by(f64::total_cmp);
    let names = |v: &[usize]| {
        v.iter()
            .map(|&g| survey.groups[g].name.clone())
            .collect::<Vec<_>>()
    };
    let summary = Summary {
        metric: survey.metric,
        methods: best_report.methods.clone(),
        steps: cfg.steps,
        best_step,
        train_groups: names(&plan.train),
        test_groups: names(&plan.test),
        checkpoint: best_path,
        per_group: best_report.per_group.clone(),
        eval_pairs: best_report.pairs,
        loss_history,
        eval_history,
        median_step_s: times.get(times.len() / 2).copied().unwrap_or(0.0),
        config: cfg.clone(),
        dataset: survey.name.clone(),
        distributed: dispatch.stats(),
    };
    let json = serde_json::to_vec_pretty(&summary)?;
    checkpoint::write_atomic(&out.join("summary.json"), &json).context("writing summary.json")?;
    Ok(summary)
}
