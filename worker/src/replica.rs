//! A replica: the GPO module, its Adam state, and the data it reads episodes from.
//!
//! The module's parameters, Adam's state and the gradient the collective reduces are
//! always on the host, in one flat buffer each. Where the gradient is computed is the
//! replica's *compute* module: by default the host module itself on the fused CPU ops; with
//! a CUDA device ([`Replica::new`] with `Device::Cuda`, `--device cuda`), a copy of the
//! module on that device on the composite ops in f32, whose parameters are refreshed from
//! the host before each gradient and whose gradient comes back to the host
//! ([`Replica::set_compute`]). The same composite path runs on the CPU too, which is how it
//! is tested without a GPU.

use crate::collective::Collective;
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_core::checkpoint::{Checkpoint, NamedArray};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_core::grad::{default_threads, episodes_gradient};
use gpo_core::model::{Gpo, GpoConfig, OpPath};
use gpo_core::optim::{cosine_lr, Adam, AdamConfig, GradValue};
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
    /// The module on the host: what Adam updates, evaluations read and checkpoints hold.
    model: Gpo,
    /// The module gradients are computed with when it is not `model` itself: a copy on
    /// `device` (a GPU), or on the CPU on another op path. Its parameters are refreshed from
    /// `model` before each gradient.
    compute: Option<Gpo>,
    adam: Adam,
    survey: Arc<Survey>,
    features: Arc<PointFeatures>,
    /// The device gradients are computed on.
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
    /// `device` is where gradients are computed: the CPU (fused ops), or a GPU (composite
    /// ops, f32); parameters and optimizer state stay on the host either way.
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
        let model = Gpo::new(cfg, seed, &Device::Cpu)?;
        let adam_state = Adam::new(model.params.count(), adam);
        let mut r = Replica {
            model,
            compute: None,
            adam: adam_state,
            survey,
            features,
            device: Device::Cpu,
            threads: default_threads(),
            shard_groups: 1,
            step: 0,
            prev_params: Vec::new(),
            spare_adam: Adam::new(0, adam),
            spare_params: Vec::new(),
            can_roll_back: false,
            target_slots: None,
        };
        let path = if device.is_cpu() {
            OpPath::Fused
        } else {
            OpPath::Composite
        };
        r.set_compute(&device, path)?;
        Ok(r)
    }

    /// Computes gradients on `device` with the ops of `path` from now on: the host module
    /// itself for the CPU and the fused ops, else a copy of it there. The fused ops exist on
    /// the CPU only. The result is the same step to float rounding (the composite and fused
    /// paths agree to the tolerance `tests::the_composite_path_trains_like_the_fused_one`
    /// states), not bitwise.
    pub fn set_compute(&mut self, device: &Device, path: OpPath) -> Result<()> {
        if path == OpPath::Fused && !device.is_cpu() {
            anyhow::bail!("the fused ops run on the CPU only; use the composite path on a GPU");
        }
        self.compute = if device.is_cpu() && path == OpPath::Fused {
            None
        } else {
            let mut m = Gpo::new(self.model.cfg.clone(), 0, device)
                .context("placing the module on the compute device")?;
            m.path = path;
            Some(m)
        };
        self.device = device.clone();
        Ok(())
    }

    /// The device gradients are computed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The module gradients are computed with, its parameters made the host module's.
    fn compute_model(&self) -> Result<&Gpo> {
        match &self.compute {
            None => Ok(&self.model),
            Some(m) => {
                m.params
                    .set_flat(&self.model.params.flat()?)
                    .context("copying the parameters to the compute device")?;
                Ok(m)
            }
        }
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
        let model = self.compute_model()?;
        if let Some(target_slots) = self.target_slots {
            let size = gpo_core::grad::StepSize {
                groups: batch_groups,
                target_slots,
            };
            return Ok(gpo_core::grad::step_gradient(
                model,
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
            model,
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
    pub fn apply<G: GradValue>(&mut self, grad: &[G], step: u64, total_steps: u64) -> Result<()> {
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
        // Adam rounds each summed value to f32 as it reads it (`GradValue`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Local;
    use gpo_core::sampler::{step_episodes, SamplerConfig};
    use gpo_core::synth::{generate, SynthConfig};

    /// A synthetic run at small widths: (survey, features, config, training groups).
    fn data() -> (Arc<Survey>, Arc<PointFeatures>, GpoConfig) {
        let out = generate(&SynthConfig {
            n_questions: 30,
            n_groups: 8,
            dim: 16,
            ..Default::default()
        });
        let meta = out.store_meta();
        let table: std::collections::HashMap<_, _> = out.embeddings.iter().cloned().collect();
        let f = PointFeatures::build(&out.survey, 16, |q, k| {
            table
                .get(&meta.key(&out.template.render(q, k)))
                .map(|v| v.as_slice())
        })
        .unwrap();
        let cfg = GpoConfig {
            dim_x: 16,
            d_model: 32,
            dim_feedforward: 64,
            num_layers: 2,
            ..Default::default()
        };
        (Arc::new(out.survey), Arc::new(f), cfg)
    }

    fn replica(path: OpPath) -> Replica {
        let (s, f, cfg) = data();
        let mut r = Replica::new(cfg, AdamConfig::default(), 11, s, f, Device::Cpu).unwrap();
        r.set_compute(&Device::Cpu, path).unwrap();
        r.set_shard_groups(2);
        r
    }

    fn episodes(r: &Replica, step: u64) -> Vec<EpisodeSpec> {
        let train: Vec<usize> = (0..r.survey().groups.len()).collect();
        let cfg = SamplerConfig {
            min_ctx: 3,
            max_ctx: 10,
            min_tgt: 3,
            max_tgt: 10,
            batch_groups: None,
        };
        step_episodes(r.survey(), 5, step, &train, None, &cfg).unwrap()
    }

    /// max |a - b| over max |b| (at least 1e-3): the relative gap the tolerance bounds.
    fn gap(a: &[f64], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0f64, |s, x| s.max(x.abs())).max(1e-3);
        a.iter().zip(b).fold(0f64, |s, (x, y)| s.max((x - y).abs())) / scale
    }

    /// The relative tolerance of the composite path against the fused one, in f32, on the
    /// CPU: the largest gradient difference at most 1e-5 of the largest gradient, the loss
    /// within 1e-6 of itself. Measured: about 9e-8 and 1.5e-8; parameters 0.1 % away move
    /// the gradient by 2.8e-3 of its largest value, which the test also checks, so that it
    /// can fail.
    const GRAD_TOL: f64 = 1e-5;
    const LOSS_TOL: f64 = 1e-6;

    /// The code path `--device cuda` takes (a compute module on the composite ops, its
    /// parameters copied from the host module, its gradient copied back), run on the CPU:
    /// the same loss and gradient as the fused ops to GRAD_TOL/LOSS_TOL, step after step.
    #[test]
    fn the_composite_path_trains_like_the_fused_one() {
        let mut fused = replica(OpPath::Fused);
        let mut comp = replica(OpPath::Composite);
        assert!(comp.compute.is_some() && fused.compute.is_none());
        let (mut worst, mut worst_loss) = (0f64, 0f64);
        for step in 1..=3u64 {
            let eps = episodes(&fused, step);
            let n = eps.len();
            let (lf, gf) = fused.gradient(&eps, n).unwrap();
            let (lc, gc) = comp.gradient(&eps, n).unwrap();
            assert!(
                (lf - lc).abs() <= LOSS_TOL * lf.abs().max(1.0),
                "step {step}: loss fused {lf}, composite {lc}"
            );
            let g = gap(&gc, &gf);
            assert!(
                g <= GRAD_TOL,
                "step {step}: gradients differ by {g} of the largest"
            );
            worst = worst.max(g);
            worst_loss = worst_loss.max((lf - lc).abs() / lf.abs().max(1.0));
            fused.step(&eps, n, step, 3, &mut Local).unwrap();
            comp.step(&eps, n, step, 3, &mut Local).unwrap();
        }
        // The steps moved both replicas alike. Adam's first steps move every parameter by
        // about the learning rate whatever its gradient's size, so a gradient entry near zero
        // whose sign the rounding flips can end up to 2·lr apart. Bound: no parameter more
        // than lr/2 apart, and at most 0.1 % of them more than lr/100 (measured: one of
        // 23074 at 0.056·lr with gemm's AVX2 kernels on an AMD EPYC; two at 0.128·lr with
        // its AVX-512 kernels on an Intel Xeon).
        let (pf, pc) = (fused.flat_params().unwrap(), comp.flat_params().unwrap());
        let lr = fused.adam().cfg.lr as f32;
        let far = pf
            .iter()
            .zip(&pc)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let apart = pf
            .iter()
            .zip(&pc)
            .filter(|(a, b)| (*a - *b).abs() > 1e-2 * lr)
            .count();
        eprintln!(
            "measured: parameters at most {far:e} apart (lr {lr:e}), {apart} of {} over lr/100",
            pf.len()
        );
        assert!(
            far <= 0.5 * lr && apart * 1000 <= pf.len(),
            "after 3 steps parameters differ by up to {far} (lr {lr}); {apart} of {} over lr/100",
            pf.len()
        );

        // The check can fail: parameters 0.1 % away (each scaled by 1.001) give a gradient
        // farther from this one than the tolerance allows, so the agreement above is not
        // vacuous.
        let eps = episodes(&fused, 4);
        let n = eps.len();
        let (_, before) = comp.gradient(&eps, n).unwrap();
        let moved: Vec<f32> = comp
            .flat_params()
            .unwrap()
            .iter()
            .map(|x| x * 1.001)
            .collect();
        let adam = comp.adam().clone();
        comp.set_state(3, &moved, adam).unwrap();
        let (_, after) = comp.gradient(&eps, n).unwrap();
        let moved_gap = gap(&after, &before);
        eprintln!("measured: worst step gaps {worst:e} (gradient), {worst_loss:e} (loss); 0.1 % moved parameters {moved_gap:e}");
        assert!(
            moved_gap > 10.0 * GRAD_TOL,
            "parameters 0.1 % away changed the gradient by only {moved_gap}"
        );
    }

    #[test]
    fn the_host_module_stays_on_the_cpu_whatever_computes() {
        let mut r = replica(OpPath::Composite);
        // The host module is on the CPU whatever computes: evaluations and checkpoints
        // read it.
        assert!(r.model().params.entries()[0].1.device().is_cpu());
        assert!(r.device().is_cpu());
        r.set_compute(&Device::Cpu, OpPath::Fused).unwrap();
        assert!(r.compute.is_none());
    }
}
