//! The checks of the GPO step on the GPU (`gpo_step_cuda_vs_cpu`, `step_time_8_groups`,
//! `step_time_64_groups`): one gradient against the CPU's within the stated tolerance, and
//! whole replica steps timed. Its own module because both build the same replica and
//! episodes at the official shape, which no other check needs.

use super::{Outcome, GPU_GRAD_TOL, GPU_LOSS_TOL};
use anyhow::{bail, Result};
use candle_core::Device;
use gpo_core::model::GpoConfig;
use gpo_core::optim::AdamConfig;
use gpo_core::sampler::{step_episodes, EpisodeSpec, SamplerConfig};
use gpo_worker::{Local, Replica};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// The benchmark's survey (684 questions, shared pool) with `groups` groups at `dim_x`,
/// a replica on `dev`, and the episodes of step `step`.
fn replica_on(dev: &Device, groups: usize, dim_x: usize) -> Result<(Replica, Vec<usize>)> {
    let (survey, features) = crate::cmd::bench_step::random_survey(groups, dim_x, 7);
    let pool: Vec<usize> = (0..survey.questions.len()).collect();
    let mut r = Replica::new(
        GpoConfig::official(dim_x),
        AdamConfig::default(),
        7,
        Arc::new(survey),
        Arc::new(features),
        dev.clone(),
    )?;
    // The run configuration's default shard size (RunConfig::shard_groups).
    r.set_shard_groups(4);
    Ok((r, pool))
}

fn episodes(r: &Replica, pool: &[usize], step: u64) -> Result<Vec<EpisodeSpec>> {
    let groups: Vec<usize> = (0..r.survey().groups.len()).collect();
    step_episodes(
        r.survey(),
        7,
        step,
        &groups,
        Some(pool),
        &SamplerConfig::default(),
    )
    .map_err(anyhow::Error::msg)
}

/// One gradient of the same batch on the CPU (fused) and on `dev` (composite, f32).
pub(super) fn gpo_step(dev: &Device) -> Result<Outcome> {
    if dev.is_cpu() {
        bail!("the device is the CPU: nothing to compare");
    }
    let (cpu, pool) = replica_on(&Device::Cpu, 8, 4096)?;
    let (gpu, _) = replica_on(dev, 8, 4096)?;
    let eps = episodes(&cpu, &pool, 1)?;
    let n = eps.len();
    let t = Instant::now();
    let (lc, gc) = cpu.gradient(&eps, n)?;
    let cpu_s = t.elapsed().as_secs_f64();
    gpu.gradient(&eps, n)?; // warm-up
    let t = Instant::now();
    let (lg, gg) = gpu.gradient(&eps, n)?;
    let gpu_s = t.elapsed().as_secs_f64();
    let max_grad = gc.iter().fold(0f64, |s, x| s.max(x.abs()));
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        if (a - b).abs() > worst {
            worst = (a - b).abs();
            at = i;
        }
    }
    let rel = worst / max_grad.max(1e-30);
    let loss_rel = (lg - lc).abs() / lc.abs().max(1e-30);
    let v = json!({
        "shape": {"groups": n, "dim_x": 4096, "module": "official (d_model 128, 6 layers)", "shard_groups": 4},
        "loss_cpu": lc,
        "loss_gpu": lg,
        "loss_rel_diff": loss_rel,
        "max_abs_grad_diff": worst,
        "max_abs_grad_diff_at": at,
        "max_abs_grad_cpu": max_grad,
        "max_grad_diff_rel": rel,
        "params": gc.len(),
        "tolerance": {"loss_rel": GPU_LOSS_TOL, "grad_rel_to_max": GPU_GRAD_TOL},
        "cpu_ops": "fused, f32", "gpu_ops": "composite, f32",
        "gemm_reduced_precision_f32": candle_core::cuda::gemm_reduced_precision_f32(),
        "cpu_gradient_s": cpu_s,
        "gpu_gradient_s": gpu_s,
    });
    let verdict = if loss_rel <= GPU_LOSS_TOL && rel <= GPU_GRAD_TOL {
        Ok(())
    } else {
        Err(format!(
            "out of tolerance: loss {loss_rel:e} (max {GPU_LOSS_TOL:e}), gradient {rel:e} of the largest (max {GPU_GRAD_TOL:e})"
        ))
    };
    Ok((v, verdict))
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whole replica steps (gradient, a world of one, Adam) at `groups` groups, d_x 4096, on
/// `dev`; with `cpu_too`, one CPU step of the same shape for the ratio.
pub(super) fn step_time(
    dev: &Device,
    groups: usize,
    reps: usize,
    cpu_too: bool,
) -> Result<Outcome> {
    let (mut r, pool) = replica_on(dev, groups, 4096)?;
    let total = reps as u64 + 1;
    let mut ms = Vec::new();
    let mut compute = Vec::new();
    let mut optim = Vec::new();
    for step in 1..=total {
        let eps = episodes(&r, &pool, step)?;
        let n = eps.len();
        let t = Instant::now();
        let o = r.step(&eps, n, step, total, &mut Local)?;
        if step > 1 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            compute.push(o.compute_s * 1e3);
            optim.push(o.optim_s * 1e3);
        }
    }
    let mut v = json!({
        "groups": groups,
        "dim_x": 4096,
        "module": "official (d_model 128, 6 layers)",
        "reps": reps,
        "step_ms_median": median(ms.clone()),
        "step_ms_all": ms,
        "gradient_ms_median": median(compute),
        "adam_ms_median": median(optim),
        "includes": "parameters to the device, gradient (composite ops, f32), gradient to the host, Adam on the host",
    });
    if cpu_too {
        let (mut c, _) = replica_on(&Device::Cpu, groups, 4096)?;
        let eps = episodes(&c, &pool, 1)?;
        let n = eps.len();
        let t = Instant::now();
        c.step(&eps, n, 1, 1, &mut Local)?;
        v["cpu_step_ms"] = json!(t.elapsed().as_secs_f64() * 1e3);
        v["cpu_threads"] = json!(gpo_core::grad::default_threads());
    }
    Ok((v, Ok(())))
}
