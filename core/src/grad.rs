//! The gradient of a set of episodes, in fixed shards.
//!
//! The episodes are cut into shards of `shard_groups`; each shard gets its own
//! single-threaded graph (candle's CPU matmul parallelizes poorly at GPO's small shapes:
//! two threads were slower than one), shards run in parallel on rayon's pool, and their f32
//! gradients are summed in f64. A sum of a few f32 values in f64 is exact unless their
//! exponents span more than 29 bits, so the result does not depend on how shards are spread
//! over threads or replicas: runs with any world size take the same steps. Each shard's loss
//! is weighted by its share of the batch, so the sum is the gradient of the batch mean.

use crate::data::Survey;
use crate::features::{assemble, PointFeatures};
use crate::model::Gpo;
use crate::optim::flat_grads;
use crate::sampler::EpisodeSpec;
use candle_core::{Device, Result};
use rayon::prelude::*;

/// (loss share, flat gradient in f64) of `episodes`, each weighted by `1 / batch_groups`,
/// computed in shards of `shard_groups` episodes, in parallel when `parallel`.
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
    let shard = |eps: &[EpisodeSpec]| -> Result<(f64, Vec<f32>)> {
        let batch = assemble(s, f, eps, device)?;
        let weight = eps.len() as f64 / batch_groups as f64;
        let loss = (model.loss(&batch)? * weight)?;
        let grads = loss.backward()?;
        Ok((
            loss.to_scalar::<f32>()? as f64,
            flat_grads(&model.params, &grads)?,
        ))
    };
    let shards: Vec<&[EpisodeSpec]> = episodes.chunks(shard_groups.max(1)).collect();
    // Shards run on rayon's pool, where candle's own parallel loops also run: plain
    // threads would queue behind each other on a one-thread pool.
    let results: Vec<Result<(f64, Vec<f32>)>> = if parallel && shards.len() > 1 && device.is_cpu() {
        shards.par_iter().map(|e| shard(e)).collect()
    } else {
        shards.iter().map(|e| shard(e)).collect()
    };
    let mut loss = 0.0;
    let mut grad = vec![0f64; model.params.count()];
    for r in results {
        let (l, g) = r?;
        loss += l;
        for (a, b) in grad.iter_mut().zip(&g) {
            *a += *b as f64;
        }
    }
    Ok((loss, grad))
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

    #[test]
    fn sharded_gradient_equals_unsharded() {
        let out = generate(&SynthConfig {
            n_questions: 30,
            n_groups: 5,
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
            d_model: 16,
            dim_feedforward: 16,
            num_layers: 2,
            ..Default::default()
        };
        let m = Gpo::new(cfg, 0, &Device::Cpu).unwrap();
        let cfgs = SamplerConfig {
            min_ctx: 5,
            max_ctx: 10,
            min_tgt: 5,
            max_tgt: 10,
            batch_groups: None,
        };
        let eps = step_episodes(
            &out.survey,
            1,
            1,
            &[0, 1, 2, 3, 4],
            Some(&(0..30).collect::<Vec<_>>()),
            &cfgs,
        )
        .unwrap();
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
}
