//! A replica: the GPO module, its Adam state, and the data it reads episodes from.

use crate::collective::Collective;
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_core::checkpoint::{Checkpoint, NamedArray};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_core::grad::{default_threads, episodes_gradient};
use gpo_core::model::{Gpo, GpoConfig};
use gpo_core::optim::{cosine_lr, Adam, AdamConfig};
use gpo_core::sampler::EpisodeSpec;
use std::sync::Arc;
use std::time::Instant;

/// What one step did on this replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// This replica's share of the batch loss (its episodes' summed loss / batch groups).
    pub loss_share: f64,
    /// Seconds spent computing the gradient.
    pub compute_s: f64,
    /// Seconds spent in the all-reduce.
    pub reduce_s: f64,
    /// Seconds spent in the optimizer step.
    pub optim_s: f64,
}

/// One GPO replica.
pub struct Replica {
    model: Gpo,
    adam: Adam,
    survey: Arc<Survey>,
    features: Arc<PointFeatures>,
    device: Device,
    threads: usize,
    shard_groups: usize,
    /// The step whose state this replica holds (0: as built from the seed).
    step: u64,
    /// The state before the last step, kept so that a step the run throws away can be
    /// undone: the parameters and Adam's previous buffers (the update is out of place).
    prev_params: Vec<f32>,
    spare_adam: Adam,
    spare_params: Vec<f32>,
    can_roll_back: bool,
    /// The padded target width of the whole step, when the coordinator names it.
    target_slots: Option<usize>,
}

impl Replica {
    /// A fresh replica; every replica built from the same seed and config is identical.
    pub fn new(
        cfg: GpoConfig,
        adam: AdamConfig,
        seed: u64,
        survey: Arc<Survey>,
        features: Arc<PointFeatures>,
        device: Device,
    ) -> Result<Self> {
        if features.dim != cfg.dim_x {
            anyhow::bail!(
                "embeddings have width {} but the model expects dim_x {}",
                features.dim,
                cfg.dim_x
            );
        }
        let model = Gpo::new(cfg, seed, &device)?;
        let adam_state = Adam::new(model.params.count(), adam);
        Ok(Replica {
            model,
            adam: adam_state,
            survey,
            features,
            device,
            threads: default_threads(),
            shard_groups: 1,
            step: 0,
            prev_params: Vec::new(),
            spare_adam: Adam::new(0, adam),
            spare_params: Vec::new(),
            can_roll_back: false,
            target_slots: None,
        })
    }

    /// Sets the number of CPU threads the gradient is sharded over (results agree to float
    /// rounding whatever the count; a fixed count is bitwise reproducible).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Sets the gradient shard size in episodes (see [`Replica::gradient`]). Every replica
    /// of a run, and the single-process trainer, must use the same size for runs of any
    /// world size to agree.
    pub fn set_shard_groups(&mut self, n: usize) {
        self.shard_groups = n.max(1);
    }

    /// The module (for evaluation and checkpoints).
    pub fn model(&self) -> &Gpo {
        &self.model
    }

    /// The optimizer state.
    pub fn adam(&self) -> &Adam {
        &self.adam
    }

    /// The survey episodes are read from.
    pub fn survey(&self) -> &Arc<Survey> {
        &self.survey
    }

    /// The parameters as one flat buffer in `state_dict` order.
    pub fn flat_params(&self) -> Result<Vec<f32>> {
        Ok(self.model.params.flat()?)
    }

    /// The step whose state the replica holds (0: as built from the seed).
    pub fn applied_step(&self) -> u64 {
        self.step
    }

    /// Undoes the last step (the run threw it away): the parameters and optimizer state
    /// go back to what they were before it, bitwise.
    pub fn roll_back(&mut self) -> Result<()> {
        if !self.can_roll_back {
            anyhow::bail!(
                "cannot roll back: the replica holds step {}'s state and no earlier one",
                self.step
            );
        }
        self.model.params.set_flat(&self.prev_params)?;
        std::mem::swap(&mut self.adam, &mut self.spare_adam);
        self.step -= 1;
        self.can_roll_back = false;
        Ok(())
    }

    /// Replaces the parameters and optimizer state with those of `step` (a coordinator's
    /// mirror of its workers, a transferred state, or a resumed run). Buffers must have the
    /// module's parameter count.
    pub fn set_state(&mut self, step: u64, params: &[f32], adam: Adam) -> Result<()> {
        let n = self.model.params.count();
        if params.len() != n || adam.m.len() != n || adam.v.len() != n {
            anyhow::bail!(
                "replica state has {} parameters and moments of {} and {}, the module has {n}",
                params.len(),
                adam.m.len(),
                adam.v.len()
            );
        }
        self.model.params.set_flat(params)?;
        self.adam = adam;
        self.step = step;
        self.can_roll_back = false;
        Ok(())
    }

    /// Computes the gradient of `episodes`, weighted so that summing it over every replica
    /// of a step whose batch holds `batch_groups` groups gives the full-batch gradient.
    /// Returns (loss share, gradient in f64).
    ///
    /// The episodes are cut into fixed shards of `shard_groups` (the coordinator hands each
    /// worker whole shards), each shard's f32 gradient is computed on its own, and the
    /// shards are summed in f64. A sum of a few f32 values in f64 is exact unless their
    /// exponents span more than 29 bits, so the all-reduced sum, rounded to f32 once, is
    /// the same whichever way the shards are spread over replicas and threads: runs with
    /// any world size take the same steps.
    pub fn gradient(
        &self,
        episodes: &[EpisodeSpec],
        batch_groups: usize,
    ) -> Result<(f64, Vec<f64>)> {
        if let Some(target_slots) = self.target_slots {
            let size = gpo_core::grad::StepSize {
                groups: batch_groups,
                target_slots,
            };
            return Ok(gpo_core::grad::step_gradient(
                &self.model,
                &self.survey,
                &self.features,
                episodes,
                size,
                self.shard_groups,
                self.threads > 1,
                &self.device,
            )?);
        }
        Ok(episodes_gradient(
            &self.model,
            &self.survey,
            &self.features,
            episodes,
            batch_groups,
            self.shard_groups,
            self.threads > 1,
            &self.device,
        )?)
    }

    /// Sets the padded target width (Nt_max) of the next steps' whole batch, as the
    /// coordinator names it for a worker that holds only part of a step (`None`: inferred,
    /// which needs episodes that share their questions).
    pub fn set_target_slots(&mut self, n: Option<usize>) {
        self.target_slots = n;
    }

    /// The point features episodes are read from.
    pub fn features(&self) -> &Arc<PointFeatures> {
        &self.features
    }

    /// Applies an all-reduced gradient with Adam at the cosine-scheduled rate of `step`
    /// (1-based) out of `total_steps`.
    ///
    /// The update is written out of place, so the state before it stays available to
    /// [`Replica::roll_back`] at no extra copy.
    pub fn apply(&mut self, grad: &[f32], step: u64, total_steps: u64) -> Result<()> {
        let lr = cosine_lr(self.adam.cfg.lr, step, total_steps);
        let flat = self.model.params.flat()?;
        self.adam.step_into(
            &flat,
            grad,
            lr,
            &mut self.spare_params,
            &mut self.spare_adam,
        );
        self.model.params.set_flat(&self.spare_params)?;
        std::mem::swap(&mut self.adam, &mut self.spare_adam);
        self.prev_params = flat;
        self.step = step;
        self.can_roll_back = true;
        Ok(())
    }

    /// One data-parallel step: local gradient, all-reduce, optimizer step.
    pub fn step(
        &mut self,
        episodes: &[EpisodeSpec],
        batch_groups: usize,
        step: u64,
        total_steps: u64,
        comm: &mut dyn Collective,
    ) -> Result<StepOutcome> {
        let t0 = Instant::now();
        let (loss_share, mut grad) = self
            .gradient(episodes, batch_groups)
            .context("computing the gradient")?;
        let t1 = Instant::now();
        comm.all_reduce_sum(&mut grad)
            .context("all-reducing the gradient")?;
        let t2 = Instant::now();
        let grad: Vec<f32> = grad.iter().map(|&g| g as f32).collect();
        self.apply(&grad, step, total_steps)?;
        Ok(StepOutcome {
            loss_share,
            compute_s: (t1 - t0).as_secs_f64(),
            reduce_s: (t2 - t1).as_secs_f64(),
            optim_s: t2.elapsed().as_secs_f64(),
        })
    }

    /// A checkpoint of this replica's parameters and optimizer state.
    pub fn checkpoint(&self, step: u64, config: serde_json::Value) -> Result<Checkpoint> {
        let params = self
            .model
            .params
            .entries()
            .iter()
            .map(|(n, v)| {
                Ok(NamedArray {
                    name: n.clone(),
                    shape: v.dims().to_vec(),
                    data: v.flatten_all()?.to_vec1::<f32>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Checkpoint {
            params,
            adam: Some(self.adam.clone()),
            step,
            config,
            progress: None,
            data: None,
        })
    }
}
