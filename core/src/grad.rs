//! The gradient of a set of episodes, in fixed shards.
//!
//! The episodes are cut into shards of `shard_groups`; each shard gets its own
//! single-threaded graph (candle's CPU matmul parallelizes poorly at GPO's small shapes:
//! two threads were slower than one), shards run in parallel on rayon's pool, and their f32
//! gradients are summed in f64. A sum of a few f32 values in f64 is exact unless their
//! exponents span more than 29 bits, so the result does not depend on how shards are spread
//! over threads or replicas: runs with any world size take the same steps. When every
//! episode answers the same questions, the shards read one shared embedder x-part
//! ([`tape::XPart`]) instead of each computing it, and the sum runs in pieces on every core:
//! both bitwise as before.
//!
//! The loss is the official one: the mean over the step's groups × padded target slots
//! (G × Nt_max, Nt_max the most target points of any episode of the *whole step*). Each
//! shard divides its summed NLL by that one number ([`StepSize`]), so the shards' losses add
//! up to the whole step's loss and no shard's graph depends on which others it is with.
//!
//! Shards of equal work do not finish together; once fewer run than there are threads,
//! the ones still running cut their ops for the idle threads
//! ([`crate::model::balance`]), bit for bit the same values.

use crate::data::Survey;
use crate::features::{assemble, PointFeatures};
use crate::model::balance::Balance;
use crate::model::{tape, Gpo};
use crate::optim::flat_grads;
use crate::sampler::EpisodeSpec;
use candle_core::{Device, Result};
use rayon::prelude::*;

/// The size of a whole step's batch, which every shard's loss is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSize {
    /// Episodes (groups) in the step, G.
    pub groups: usize,
    /// Target points of the step's longest episode, Nt_max (the padded target width).
    pub target_slots: usize,
}

impl StepSize {
    /// The size of a step made of exactly `episodes`.
    pub fn of(f: &PointFeatures, episodes: &[EpisodeSpec]) -> Self {
        StepSize {
            groups: episodes.len(),
            target_slots: episodes
                .iter()
                .map(|e| f.points(&e.target))
                .max()
                .unwrap_or(0),
        }
    }

    /// The size of a step of `batch_groups` episodes of which `episodes` are a part, when
    /// only that part is known (a worker's share of a distributed step). Nt_max is known
    /// exactly when `episodes` is the whole step, or when the step shares its questions
    /// (OpinionQA-style data: every episode of a step has the same targets, so the same
    /// width). Otherwise the other episodes' widths are unknown and this is an error rather
    /// than a guess that would make the result depend on the world size.
    pub fn infer(
        s: &Survey,
        f: &PointFeatures,
        episodes: &[EpisodeSpec],
        batch_groups: usize,
    ) -> std::result::Result<Self, String> {
        if episodes.len() > batch_groups {
            return Err(format!(
                "{} episodes given for a step of {batch_groups}",
                episodes.len()
            ));
        }
        if episodes.len() == batch_groups {
            return Ok(Self::of(f, episodes));
        }
        let shared = s.metric.shares_questions()
            && episodes
                .iter()
                .all(|e| e.target == episodes[0].target && e.context == episodes[0].context);
        if shared && !episodes.is_empty() {
            return Ok(StepSize {
                groups: batch_groups,
                target_slots: f.points(&episodes[0].target),
            });
        }
        Err(format!(
            "this share ({} of {batch_groups} episodes) of a step whose groups answer different \
             questions cannot know the step's padded target width, which the official loss \
             divides by; pass the whole step's `StepSize` (grad::step_gradient)",
            episodes.len()
        ))
    }

    /// G × Nt_max: what the summed NLL is divided by.
    pub fn denominator(&self) -> f64 {
        (self.groups * self.target_slots).max(1) as f64
    }
}

/// (loss share, flat gradient in f64) of `episodes`, part of a step of `batch_groups`
/// episodes: [`step_gradient`] with the step's size inferred by [`StepSize::infer`].
#[allow(clippy::too_many_arguments)]
pub fn episodes_gradient(
    model: &Gpo,
    s: &Survey,
    f: &PointFeatures,
    episodes: &[EpisodeSpec],
    batch_groups: usize,
    shard_groups: usize,
    parallel: bool,
    device: &Device,
) -> Result<(f64, Vec<f64>)> {
    let size = StepSize::infer(s, f, episodes, batch_groups).map_err(candle_core::Error::msg)?;
    step_gradient(model, s, f, episodes, size, shard_groups, parallel, device)
}

/// (loss share, flat gradient in f64) of `episodes`, part of a step of size `step`,
/// computed in shards of `shard_groups` episodes, in parallel when `parallel`. Summed over
/// every part of the step this is the official loss of the whole step and its gradient.
#[allow(clippy::too_many_arguments)]
pub fn step_gradient(
    model: &Gpo,
    s: &Survey,
    f: &PointFeatures,
    episodes: &[EpisodeSpec],
    step: StepSize,
    shard_groups: usize,
    parallel: bool,
    device: &Device,
) -> Result<(f64, Vec<f64>)> {
    let denom = step.denominator();
    let shards: Vec<&[EpisodeSpec]> = episodes.chunks(shard_groups.max(1)).collect();
    let parallel = parallel && shards.len() > 1 && device.is_cpu();
    // Shards that all answer the same questions share the embedder's first-layer x-part:
    // computed once here, from shard 0's batch (kept for shard 0), instead of once a shard.
    let mut first = None;
    let mut xpart = None;
    if shards.len() > 1 && shares_points(episodes) {
        let b0 = assemble(s, f, shards[0], device)?;
        if tape::applies(model, &b0) && b0.xc.dims()[0] == 1 {
            xpart = Some(tape::XPart::of(model, &b0, parallel)?);
        }
        first = Some(b0);
    }
    let first = std::sync::Mutex::new(first);
    // Once fewer shards run than there are threads, the last ones cut their ops for the
    // idle threads ([`balance`]): the same values, sooner.
    let balance = Balance::new(shards.len(), rayon::current_num_threads());
    let shard = |i: usize, eps: &[EpisodeSpec]| -> Result<(f64, Vec<f32>)> {
        let kept = if i == 0 {
            first
                .lock()
                .map_err(|_| candle_core::Error::msg("a shard panicked"))?
                .take()
        } else {
            None
        };
        let batch = match kept {
            Some(b) => b,
            None => assemble(s, f, eps, device)?,
        };
        if tape::applies(model, &batch) {
            let (loss, grad) = tape::loss_and_grad_with(model, &batch, denom, xpart.as_ref())?;
            return Ok((loss as f64, grad));
        }
        let loss = model.loss_over(&batch, denom)?;
        let grads = loss.backward()?;
        Ok((
            loss.to_scalar::<f32>()? as f64,
            flat_grads(&model.params, &grads)?,
        ))
    };
    // Shards run on rayon's pool, where candle's own parallel loops also run: plain
    // threads would queue behind each other on a one-thread pool.
    let results: Vec<Result<(f64, Vec<f32>)>> = if parallel {
        shards
            .par_iter()
            .enumerate()
            .map(|(i, e)| balance.run(|| shard(i, e)))
            .collect()
    } else {
        shards
            .iter()
            .enumerate()
            .map(|(i, e)| shard(i, e))
            .collect()
    };
    let mut loss = 0.0;
    let mut parts = Vec::with_capacity(results.len());
    for r in results {
        let (l, g) = r?;
        loss += l;
        parts.push(g);
    }
    // Each value is the sum of the shards' in shard order, whichever thread adds it up.
    const PIECE: usize = 1 << 14;
    let mut grad = vec![0f64; model.params.count()];
    let add = |(k, out): (usize, &mut [f64])| {
        for g in &parts {
            for (a, b) in out.iter_mut().zip(&g[k * PIECE..]) {
                *a += *b as f64;
            }
        }
    };
    if parallel {
        grad.par_chunks_mut(PIECE).enumerate().for_each(add);
    } else {
        grad.chunks_mut(PIECE).enumerate().for_each(add);
    }
    Ok((loss, grad))
}

/// Whether every episode of a step answers the same context and target questions (an
/// OpinionQA-style step): its shards then share the embedder's x-part ([`tape::XPart`]).
pub fn shares_points(episodes: &[EpisodeSpec]) -> bool {
    episodes
        .iter()
        .all(|e| e.context == episodes[0].context && e.target == episodes[0].target)
}

/// Threads to shard over by default: the machine's cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sizes rayon's pool to the cores (shards run there), then tells candle's matmul to stay
/// single-threaded (it reads `RAYON_NUM_THREADS` at every call), so shards do not
/// oversubscribe the cores. Leaves a user's explicit setting alone. Call once at startup,
/// before any other thread exists.
pub fn shard_threads_not_kernels() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // An error means the pool already exists; candle then just sees one thread.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(default_threads())
            .build_global();
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GpoConfig;
    use crate::sampler::{step_episodes, SamplerConfig};
    use crate::synth::{generate, SynthConfig};

    fn setup(n_groups: usize) -> (crate::synth::SynthOutput, PointFeatures, Gpo) {
        setup_width(n_groups, 16, 0)
    }

    /// [`setup`] with a module of width (and feed-forward width) `d_model`, seeded `seed`.
    fn setup_width(
        n_groups: usize,
        d_model: usize,
        seed: u64,
    ) -> (crate::synth::SynthOutput, PointFeatures, Gpo) {
        let out = generate(&SynthConfig {
            n_questions: 30,
            n_groups,
            dim: 8,
            ..Default::default()
        });
        let meta = out.store_meta();
        let table: std::collections::HashMap<_, _> = out.embeddings.iter().cloned().collect();
        let f = PointFeatures::build(&out.survey, 8, |q, k| {
            table
                .get(&meta.key(&out.template.render(q, k)))
                .map(|v| v.as_slice())
        })
        .unwrap();
        let cfg = GpoConfig {
            dim_x: 8,
            d_model,
            dim_feedforward: d_model,
            num_layers: 2,
            ..Default::default()
        };
        (out, f, Gpo::new(cfg, seed, &Device::Cpu).unwrap())
    }

    /// Six episodes with their own questions and different target widths (GlobalOpinionQA-
    /// style steps, which are padded).
    fn unshared_episodes(s: &Survey) -> Vec<EpisodeSpec> {
        let cfg = SamplerConfig {
            min_ctx: 3,
            max_ctx: 8,
            min_tgt: 2,
            max_tgt: 9,
            batch_groups: None,
        };
        (0..6)
            .map(|i| crate::sampler::episode(s, 4, 2, i, i, None, &cfg).unwrap())
            .collect()
    }

    /// The official reduction across shards and workers: shards of an unshared step, cut
    /// as 1, 2 or 3 workers would get them, sum to bitwise the same gradient, and that is
    /// the loss and gradient of the whole step as one padded batch (mean over G × Nt_max).
    #[test]
    fn step_loss_is_the_official_mean_whatever_the_world_size() {
        let (out, f, m) = setup(6);
        let eps = unshared_episodes(&out.survey);
        let size = StepSize::of(&f, &eps);
        let widths: Vec<usize> = eps.iter().map(|e| f.points(&e.target)).collect();
        assert!(
            widths.iter().any(|&w| w != size.target_slots),
            "the test needs padding: widths {widths:?}"
        );
        // The whole step as one batch, the official way.
        let batch = assemble(&out.survey, &f, &eps, &Device::Cpu).unwrap();
        assert_eq!(batch.nt, size.target_slots);
        let whole = m.loss(&batch).unwrap();
        let want = whole.to_scalar::<f32>().unwrap() as f64;
        let want_grad = flat_grads(&m.params, &whole.backward().unwrap()).unwrap();

        let run = |cuts: &[usize]| -> (f64, Vec<f64>) {
            let mut loss = 0.0;
            let mut grad = vec![0f64; m.params.count()];
            for w in cuts.windows(2) {
                let (l, g) = step_gradient(
                    &m,
                    &out.survey,
                    &f,
                    &eps[w[0]..w[1]],
                    size,
                    2,
                    false,
                    &Device::Cpu,
                )
                .unwrap();
                loss += l;
                for (a, b) in grad.iter_mut().zip(&g) {
                    *a += b;
                }
            }
            (loss, grad)
        };
        let (l1, g1) = run(&[0, 6]);
        let (l2, g2) = run(&[0, 4, 6]);
        let (l3, g3) = run(&[0, 2, 4, 6]);
        assert_eq!(g1, g2, "2 workers differ from 1");
        assert_eq!(g1, g3, "3 workers differ from 1");
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs() && (l1 - l3).abs() <= 1e-6 * l1.abs());
        assert!(
            (l1 - want).abs() <= 1e-5 * want.abs(),
            "sharded step loss {l1}, whole-batch official loss {want}"
        );
        let scale = want_grad.iter().fold(0f32, |s, x| s.max(x.abs())) as f64;
        let worst = g1
            .iter()
            .zip(&want_grad)
            .fold(0f64, |s, (a, b)| s.max((a - *b as f64).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "gradient differs by {worst} (scale {scale})"
        );
        // A shard that divided by its own width instead would not add up.
        let own = StepSize::of(&f, &eps[..2]);
        assert_ne!(own.target_slots, size.target_slots);
    }

    #[test]
    fn a_partial_unshared_step_needs_the_step_size() {
        let (mut out, f, m) = setup(6);
        let eps = unshared_episodes(&out.survey);
        // The whole step: inferred exactly.
        assert_eq!(
            StepSize::infer(&out.survey, &f, &eps, 6).unwrap(),
            StepSize::of(&f, &eps)
        );
        // A worker's part of a step over groups with their own questions: refused.
        out.survey.metric = crate::data::MetricKind::JensenShannon;
        let e = episodes_gradient(&m, &out.survey, &f, &eps[..2], 6, 2, false, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("padded target width"), "{e}");
        // A part of a step that shares its questions: every episode has the same width.
        out.survey.metric = crate::data::MetricKind::Wasserstein;
        let shared: Vec<EpisodeSpec> = (0..3)
            .map(|g| EpisodeSpec {
                group: g,
                ..eps[0].clone()
            })
            .collect();
        assert_eq!(
            StepSize::infer(&out.survey, &f, &shared[..1], 3).unwrap(),
            StepSize {
                groups: 3,
                target_slots: f.points(&eps[0].target)
            }
        );
    }

    /// One step of `groups` episodes sharing their questions (OpinionQA-style), drawn from
    /// the 30-question synthetic survey of [`setup`].
    fn shared_step(s: &Survey, groups: usize, seed: u64, step: u64) -> Vec<EpisodeSpec> {
        let cfg = SamplerConfig {
            min_ctx: 5,
            max_ctx: 10,
            min_tgt: 5,
            max_tgt: 10,
            batch_groups: None,
        };
        let ids: Vec<usize> = (0..groups).collect();
        step_episodes(
            s,
            seed,
            step,
            &ids,
            Some(&(0..30).collect::<Vec<_>>()),
            &cfg,
        )
        .unwrap()
    }

    #[test]
    fn sharded_gradient_equals_unsharded() {
        let (out, f, m) = setup(5);
        let eps = shared_step(&out.survey, 5, 1, 1);
        let (l1, g1) =
            episodes_gradient(&m, &out.survey, &f, &eps, 5, 5, false, &Device::Cpu).unwrap();
        let (l3, g3) =
            episodes_gradient(&m, &out.survey, &f, &eps, 5, 2, true, &Device::Cpu).unwrap();
        assert!((l1 - l3).abs() < 1e-4 * l1.abs());
        let scale = g1.iter().fold(0f64, |s, x| s.max(x.abs()));
        let worst = g1
            .iter()
            .zip(&g3)
            .fold(0f64, |s, (a, b)| s.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "sharded gradient differs by {worst} (scale {scale})"
        );
    }

    /// Shards of a step whose groups share their questions read the embedder's x-part
    /// computed once ([`tape::XPart`]): the step's loss and gradient are bitwise those of
    /// each shard computing it on its own, summed the same way (in order, in f64), whether
    /// the sum runs in parallel pieces or not.
    #[test]
    fn shards_sharing_their_points_share_the_x_part_bitwise() {
        // Wide enough that the shards' gradients are summed in several pieces.
        let (out, f, m) = setup_width(6, 64, 1);
        assert!(m.params.count() > 2 << 14, "{}", m.params.count());
        let eps = shared_step(&out.survey, 6, 2, 3);
        assert!(shares_points(&eps));
        let size = StepSize::of(&f, &eps);
        for (shard_groups, parallel) in [(2, true), (4, false), (1, true)] {
            let (loss, grad) = step_gradient(
                &m,
                &out.survey,
                &f,
                &eps,
                size,
                shard_groups,
                parallel,
                &Device::Cpu,
            )
            .unwrap();
            let (mut want_l, mut want_g) = (0f64, vec![0f64; m.params.count()]);
            for part in eps.chunks(shard_groups) {
                let b = assemble(&out.survey, &f, part, &Device::Cpu).unwrap();
                let (l, g) = tape::loss_and_grad(&m, &b, size.denominator()).unwrap();
                want_l += l as f64;
                for (a, v) in want_g.iter_mut().zip(&g) {
                    *a += *v as f64;
                }
            }
            assert_eq!(loss.to_bits(), want_l.to_bits(), "shards of {shard_groups}");
            assert!(
                grad.iter()
                    .zip(&want_g)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "shards of {shard_groups}: the gradients differ"
            );
        }
    }
}
