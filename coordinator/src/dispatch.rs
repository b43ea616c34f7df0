//! [`GrpcDispatch`]: the [`Dispatch`] the training loop uses for a distributed run. It
//! submits each step to the machine and waits for the commit; everything between (the
//! first generation, a lost member, the abort and the rerun on a new generation, a
//! joiner's state transfer) happens in the machine and the service while it waits, so the
//! loop sees a step either committed or the run failed.

use crate::machine::Event;
use crate::run::Dispatch;
use crate::shared::{Shared, StateBlob};
use anyhow::{bail, Context, Result};
use gpo_core::model::Gpo;
use gpo_core::sampler::EpisodeSpec;
use gpo_proto::v1 as pb;
use gpo_worker::{wire, Replica};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Timings of one distributed step.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepTimes {
    /// Wall seconds at the coordinator, from submission to commit.
    pub step_s: f64,
    /// Slowest member's gradient seconds.
    pub compute_s: f64,
    /// Slowest member's all-reduce seconds.
    pub reduce_s: f64,
    /// Slowest member's optimizer seconds.
    pub optim_s: f64,
}

/// The [`Dispatch`] that runs steps on remote workers.
pub struct GrpcDispatch {
    shared: Arc<Shared>,
    mirror: Option<Replica>,
    timings: Vec<StepTimes>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A replica's state as the wire carries it.
pub(crate) fn state_of(r: &Replica) -> Result<StateBlob> {
    let flat = r.flat_params()?;
    let adam = r.adam();
    Ok(StateBlob {
        step: r.applied_step(),
        sha: wire::params_sha256(&flat),
        state: pb::ReplicaState {
            params: wire::f32_bytes(&flat),
            adam_m: wire::f32_bytes(&adam.m),
            adam_v: wire::f32_bytes(&adam.v),
            adam_t: adam.t,
        },
    })
}

impl GrpcDispatch {
    pub(crate) fn new(shared: Arc<Shared>, mirror: Option<Replica>) -> GrpcDispatch {
        if let Some(m) = &mirror {
            match state_of(m) {
                Ok(blob) => {
                    let mut core = shared.lock();
                    core.machine.set_committed_digest(blob.sha.clone());
                    core.state = Some(blob);
                }
                Err(e) => tracing::error!("cannot read the mirror's state: {e:#}"),
            }
        }
        GrpcDispatch {
            shared,
            mirror,
            timings: Vec::new(),
        }
    }

    /// Waits until the first generation has formed and set up its collective (the
    /// benchmark times steps apart from registration).
    pub fn form_membership(&mut self) -> Result<()> {
        let sh = self.shared.clone();
        let mut core = sh.lock();
        loop {
            let g = core.machine.generation();
            if core.machine.phase() == crate::machine::Phase::Running
                && core.setups.contains_key(&g)
            {
                return Ok(());
            }
            if core.machine.phase().over() {
                bail!("{}", core.machine.error().unwrap_or("the run ended"));
            }
            core = sh.wait(core, Duration::from_millis(50));
        }
    }

    /// Per-step timings so far.
    pub fn timings(&self) -> &[StepTimes] {
        &self.timings
    }

    /// Runs one step: submits it to the machine and waits until it is committed (through
    /// any number of recoveries) or the run fails. Returns the batch loss.
    pub fn run_step(
        &mut self,
        step: u64,
        total_steps: u64,
        episodes: &[EpisodeSpec],
        sync: bool,
    ) -> Result<f64> {
        let sh = self.shared.clone();
        let started = Instant::now();
        gpo_ops::logs::context::set_step(step);
        let mut core = sh.lock();
        core.episodes = episodes.to_vec();
        core.total_steps = total_steps;
        core.target_slots = self.mirror.as_ref().map_or(0, |m| {
            gpo_core::grad::StepSize::of(m.features(), episodes).target_slots as u64
        });
        core.results.clear();
        core.commits.retain(|c| c.step > step);
        sh.handle(
            &mut core,
            Event::Submit {
                step,
                episodes: episodes.len(),
                want_state: sync,
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let commit = loop {
            if let Some(pos) = core.commits.iter().position(|c| c.step == step) {
                break core.commits.remove(pos).expect("position is valid");
            }
            if let Some(to) = core.rewind.take() {
                let blob = core.state.clone().filter(|s| s.step == to);
                drop(core);
                if let Some(mirror) = self.mirror.as_mut() {
                    let blob = blob.context("no state to go back to")?;
                    load_state(mirror, &blob, sh.info.param_count)?;
                }
                return Err(crate::run::Rewound { to }.into());
            }
            if core.machine.phase().over() {
                bail!(
                    "{}",
                    core.machine
                        .error()
                        .unwrap_or("the run ended before this step")
                );
            }
            core = sh.wait(core, Duration::from_millis(100));
        };
        let step_s = started.elapsed().as_secs_f64();
        sh.opts
            .metrics
            .steps
            .observe(gpo_ops::metrics::Phase::Dispatch, step_s);
        let results = &commit.results;
        let max = |f: fn(&pb::StepResult) -> f64| results.iter().map(f).fold(0.0, f64::max);
        let t = StepTimes {
            step_s,
            compute_s: max(|r| r.compute_s),
            reduce_s: max(|r| r.reduce_s),
            optim_s: max(|r| r.optim_s),
        };
        self.timings.push(t);
        core.recent.push_back(pb::StepTiming {
            step,
            step_s,
            compute_s: t.compute_s,
            reduce_s: t.reduce_s,
            loss: commit.loss,
        });
        while core.recent.len() > 20 {
            core.recent.pop_front();
        }
        let state = core.state.clone().filter(|s| s.step == step);
        drop(core);
        if sync && sh.opts.fake_compute_ms == 0 {
            let blob = state.context("rank 0 sent no state")?;
            let mirror = self
                .mirror
                .as_mut()
                .context("the coordinator has no mirror replica")?;
            load_state(mirror, &blob, sh.info.param_count)?;
        }
        Ok(commit.loss)
    }
}

/// Loads a wire state into a replica after checking it against its checksum.
pub(crate) fn load_state(r: &mut Replica, blob: &StateBlob, n: usize) -> Result<()> {
    let (p, adam) =
        wire::state_from_pb(&blob.state, n, r.adam().cfg).map_err(anyhow::Error::msg)?;
    if wire::params_sha256(&p) != blob.sha {
        bail!(
            "step {}'s state does not match its checksum {}",
            blob.step,
            blob.sha
        );
    }
    r.set_state(blob.step, &p, adam)
}

impl Dispatch for GrpcDispatch {
    fn step(
        &mut self,
        step: u64,
        total_steps: u64,
        episodes: &[EpisodeSpec],
        sync: bool,
    ) -> Result<f64> {
        self.run_step(step, total_steps, episodes, sync)
    }

    fn model(&self) -> &Gpo {
        self.mirror
            .as_ref()
            .expect("a distributed training run has a mirror replica")
            .model()
    }

    fn checkpoint(
        &self,
        step: u64,
        config: serde_json::Value,
    ) -> Result<gpo_core::checkpoint::Checkpoint> {
        self.mirror
            .as_ref()
            .context("the coordinator has no mirror replica")?
            .checkpoint(step, config)
    }

    fn recoveries(&self) -> Vec<serde_json::Value> {
        let core = self.shared.lock();
        core.machine
            .recoveries()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "step": r.step,
                    "reason": r.reason,
                    "detect_s": r.detect_ms as f64 / 1000.0,
                    "recover_s": r.recover_ms.map(|x| x as f64 / 1000.0),
                    "steps_recomputed": r.steps_recomputed,
                })
            })
            .collect()
    }

    fn stats(&self) -> Option<serde_json::Value> {
        let t = &self.timings;
        let core = self.shared.lock();
        let m = &core.machine;
        let workers: Vec<serde_json::Value> = m
            .members()
            .iter()
            .enumerate()
            .map(|(rank, id)| {
                let name = m.workers().get(id).map_or("", |w| w.name.as_str());
                serde_json::json!({"rank": rank, "worker_id": id, "name": name})
            })
            .collect();
        let generations: Vec<serde_json::Value> = m
            .history()
            .iter()
            .map(|g| {
                serde_json::json!({
                    "generation": g.generation,
                    "at_s": g.at as f64 / 1000.0,
                    "members": g.members,
                    "reason": g.reason,
                })
            })
            .collect();
        let c = m.counters();
        let overhead: Vec<f64> = t
            .iter()
            .map(|s| (s.step_s - s.compute_s - s.optim_s).max(0.0))
            .collect();
        Some(serde_json::json!({
            "run_id": self.shared.run_id,
            "world_size": m.members().len(),
            "generation": m.generation(),
            "generations": generations,
            "collective": self.shared.opts.collective,
            "workers": workers,
            "counters": {
                "registrations": c.registrations,
                "joins": c.joins,
                "fenced_messages": c.fenced_messages,
                "aborted_steps": c.aborted,
                "recoveries": c.recoveries,
            },
            "median_step_s": median(t.iter().map(|s| s.step_s).collect()),
            "median_compute_s": median(t.iter().map(|s| s.compute_s).collect()),
            "median_reduce_s": median(t.iter().map(|s| s.reduce_s).collect()),
            "median_optim_s": median(t.iter().map(|s| s.optim_s).collect()),
            "median_overhead_s": median(overhead),
        }))
    }
}
