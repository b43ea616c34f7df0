//! What makes a run resumable: the loop's [`Progress`] saved in every resume point, the
//! loop's options (resume points, the stop flag, resume), reading the newest resume point
//! back, and [`Rewound`], which a dispatch returns when the run went back to an earlier step.

use crate::config::RunConfig;
use anyhow::{Context, Result};
use gpo_core::io::checkpoint;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::run::EvalPoint;

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
    /// The embedder id of the run's embedding store, recorded with the data fingerprint in
    /// every checkpoint (empty: unknown).
    pub embedder: String,
    /// The run's data flags, recorded in every checkpoint (empty: the synthetic survey).
    pub data_paths: gpo_core::checkpoint::DataPaths,
}

/// The folder of a run's resume points.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
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
