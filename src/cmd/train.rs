//! `gpo train`: meta-trains GPO and prints the alignment table — in this process, or with
//! `--workers N` through a coordinator and N worker processes on loopback.

use crate::inputs::{self, DataArgs};
use anyhow::{Context, Result};
use candle_core::Device;
use gpo_coordinator::run::{load_resume, train_with, LoopOptions, Progress as RunProgress};
use gpo_coordinator::{InProcess, RunConfig, RunEvent, Summary};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_worker::Replica;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The collectives a distributed run can use.
const COLLECTIVES: [&str; 2] = ["tcp-ring", "nccl"];

/// Flags of `gpo train`. Precedence: flag, then environment variable, then `--config`
/// TOML, then defaults.
#[derive(Debug, clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub embed: crate::embedding::EmbedFlags,
    /// TOML file with a run configuration (see `examples/train.toml`).
    #[arg(long, env = "GPO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, env = "GPO_STEPS")]
    pub steps: Option<u64>,
    /// Run seed (split, initialization, episodes; also the synthetic survey's seed).
    #[arg(long, env = "GPO_SEED")]
    pub seed: Option<u64>,
    /// Fraction of groups for meta-training, e.g. 0.4, 0.6, 0.8.
    #[arg(long, env = "GPO_GROUP_SPLIT")]
    pub group_split: Option<f64>,
    /// Evaluate every N steps (the best checkpoint is kept).
    #[arg(long, env = "GPO_EVAL_EVERY")]
    pub eval_every: Option<u64>,
    /// Groups per meta-batch (default: all training groups).
    #[arg(long, env = "GPO_BATCH_GROUPS")]
    pub batch_groups: Option<usize>,
    /// Peak learning rate (cosine decay to 0 over the run).
    #[arg(long, env = "GPO_LR")]
    pub lr: Option<f64>,
    /// Output folder: best.safetensors, last.safetensors, summary.json.
    #[arg(long, env = "GPO_OUT", default_value = "runs/train")]
    pub out: PathBuf,
    /// Data-parallel workers. `gpo train` starts a coordinator and this many worker
    /// processes on loopback (0 or absent: train in this process); `gpo coordinator` waits
    /// for this many workers to register.
    #[arg(long, env = "GPO_WORKERS")]
    pub workers: Option<usize>,
    /// Collective of a distributed run: tcp-ring (CPU) or nccl (workers built with `cuda`).
    #[arg(long, env = "GPO_COLLECTIVE", default_value = "tcp-ring", value_parser = clap::builder::PossibleValuesParser::new(COLLECTIVES))]
    pub collective: String,
    /// Continue a stopped run from the newest readable resume point in DIR/checkpoints
    /// (a corrupt newest one falls back to the previous, with a warning). The run's
    /// configuration comes from the checkpoint; pass the same --data and --embeddings.
    /// Outputs go to DIR. The result is bitwise that of an uninterrupted run.
    #[arg(long, env = "GPO_RESUME", value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Also write a resume point every N steps (they are always written at evaluations,
    /// on SIGTERM and at the end).
    #[arg(long, env = "GPO_CHECKPOINT_EVERY", default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Resume points kept in OUT/checkpoints (the newest).
    #[arg(long, env = "GPO_KEEP_CHECKPOINTS", default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// A distributed run goes on while at least this many workers are live (default 1);
    /// below, it pauses until workers return.
    #[arg(long, env = "GPO_MIN_WORKERS")]
    pub min_workers: Option<usize>,
    /// Seconds a paused distributed run waits for workers before it fails (default:
    /// forever).
    #[arg(long, env = "GPO_MAX_WAIT_S")]
    pub max_wait_s: Option<f64>,
    /// Serve /metrics (Prometheus text format), /healthz and /readyz on this address
    /// (default: off). With --workers N, each worker serves its own on a free port of the
    /// same host, listed by `gpo status`.
    #[arg(long, env = "GPO_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log lines as `text` or `json` (one object per line, with run id, generation and
    /// step); `GPO_LOG` sets the level.
    #[arg(long, env = "GPO_LOG_FORMAT", default_value = "text")]
    pub log_format: gpo_ops::logs::LogFormat,
    /// Append one JSON line per evaluation to FILE (`{"step", "test", "validation",
    /// "best"}`), flushed as it happens: what `gpo sweep` follows a trial by.
    #[arg(long, env = "GPO_EVENTS", value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Where gradients are computed: cpu (the fused ops) or cuda / cuda:N (the composite
    /// ops in f32; a build with `--features cuda`). Parameters, Adam and the all-reduce stay
    /// on the host. With --workers N every worker uses it; `gpo coordinator` ignores it.
    #[arg(long, env = "GPO_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// The built-in default run (no `--data`, no `--config`): the official module on the
/// synthetic survey, 1000 steps at lr 1e-3. In-context use of the context answers appears
/// after about 700 steps at that rate; at the paper's 3e-4 it takes several times longer,
/// which is why this preset (and only this one) raises it. About 3 minutes on 2 cores.
pub fn synthetic_preset() -> RunConfig {
    let mut cfg = RunConfig {
        steps: 1000,
        eval_every: 100,
        ..Default::default()
    };
    cfg.adam.lr = 1e-3;
    cfg
}

/// Resolves the run configuration from the layers.
pub fn resolve(a: &Args) -> Result<RunConfig> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<RunConfig>(&text)
                .with_context(|| format!("{}: invalid run configuration", p.display()))?
        }
        None if a.data.data.is_none() => synthetic_preset(),
        None => RunConfig::default(),
    };
    if let Some(v) = a.steps {
        cfg.steps = v;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.group_split {
        cfg.group_split = v;
    }
    if let Some(v) = a.eval_every {
        cfg.eval_every = v;
    }
    if let Some(v) = a.batch_groups {
        cfg.sampler.batch_groups = Some(v);
    }
    if let Some(v) = a.lr {
        cfg.adam.lr = v;
    }
    Ok(cfg)
}

/// A resolved run: configuration and data, ready to train.
pub struct Prepared {
    pub cfg: RunConfig,
    pub survey: Arc<Survey>,
    pub features: Arc<PointFeatures>,
    /// Where outputs go (the resumed run's folder with --resume).
    pub out: PathBuf,
    /// The resume point: progress and the state every replica starts from.
    pub resume: Option<(RunProgress, gpo_core::checkpoint::Checkpoint)>,
    /// The embedding store's embedder id (recorded in every checkpoint).
    pub embedder: String,
}

impl Prepared {
    /// The loop's options for this run; `stop` is the signal handlers' flag.
    pub fn loop_options(&self, a: &Args, stop: Option<Arc<AtomicBool>>) -> LoopOptions {
        LoopOptions {
            checkpoint_every: a.checkpoint_every,
            keep_checkpoints: a.keep_checkpoints,
            stop,
            resume: self.resume.as_ref().map(|(p, _)| p.clone()),
            embedder: self.embedder.clone(),
            data_paths: inputs::recorded_paths(&a.data),
        }
    }

    /// A replica of this run at its start state (step 0, or the resume point's).
    pub fn replica(&self) -> Result<Replica> {
        let mut r = Replica::new(
            self.cfg.model.clone(),
            self.cfg.adam,
            self.cfg.seed,
            self.survey.clone(),
            self.features.clone(),
            Device::Cpu,
        )?;
        r.set_shard_groups(self.cfg.shard_groups);
        if let Some((p, c)) = &self.resume {
            let flat: Vec<f32> = c
                .params
                .iter()
                .flat_map(|x| x.data.iter().copied())
                .collect();
            let adam = c
                .adam
                .clone()
                .context("the resume point has no optimizer state")?;
            r.set_state(p.step, &flat, adam)?;
        }
        Ok(r)
    }
}

/// Resolves the configuration, loads the data and prints what will run.
pub fn prepare(a: &Args) -> Result<Prepared> {
    prepare_with(a, None)
}

/// [`prepare`], resuming from `resume` when given (a coordinator elected in etcd resumes
/// the run its state pointer names) even without `--resume`.
pub fn prepare_with(a: &Args, resume: Option<&std::path::Path>) -> Result<Prepared> {
    let resume_dir = resume.map(|p| p.to_path_buf()).or(a.resume.clone());
    let (mut cfg, resume, out) = match &resume_dir {
        Some(dir) => {
            let given = [
                ("--config", a.config.is_some()),
                ("--steps", a.steps.is_some()),
                ("--seed", a.seed.is_some()),
                ("--group-split", a.group_split.is_some()),
                ("--eval-every", a.eval_every.is_some()),
                ("--batch-groups", a.batch_groups.is_some()),
                ("--lr", a.lr.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g && a.resume.is_some()) {
                anyhow::bail!(
                    "--resume takes the run's configuration from its checkpoint; drop {flag}"
                );
            }
            let (cfg, progress, ckpt, warnings) =
                load_resume(dir).with_context(|| format!("resuming from {}", dir.display()))?;
            for w in warnings {
                eprintln!("warning: skipped a corrupt resume point: {w}");
            }
            eprintln!(
                "resuming {} from step {} of {}",
                dir.display(),
                progress.step,
                cfg.steps
            );
            (cfg, Some((progress, ckpt)), dir.clone())
        }
        None => (resolve(a)?, None, a.out.clone()),
    };
    let inputs::Loaded {
        survey,
        features,
        desc,
        embedder,
    } = inputs::load_data(&a.data, cfg.seed)?;
    cfg.check_embedder(&embedder, &store_name(&a.data))
        .map_err(anyhow::Error::msg)?;
    if resume.is_some() && features.dim != cfg.model.dim_x {
        anyhow::bail!(
            "the resumed run's module reads embeddings of width {}, the data has {}: pass the run's --data and --embeddings",
            cfg.model.dim_x,
            features.dim
        );
    }
    cfg.model.dim_x = features.dim;
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("run configuration")?;
    inputs::output_dir(&out)?;
    eprintln!("data: {desc}");
    eprintln!(
        "model: {} parameters (dim_x {}), {} steps, seed {}, group split {}",
        cfg.model.param_count(),
        cfg.model.dim_x,
        cfg.steps,
        cfg.seed,
        cfg.group_split
    );
    let features = gpo_coordinator::plan::run_features(&cfg, &survey, features)?;
    Ok(Prepared {
        cfg,
        survey: Arc::new(survey),
        features: Arc::new(features),
        out,
        resume,
        embedder,
    })
}

/// The embedding store as the flags name it, for messages.
pub fn store_name(d: &DataArgs) -> String {
    match (&d.embeddings, &d.data) {
        (Some(e), _) => e.display().to_string(),
        (None, Some(data)) => format!("of {}", data.display()),
        (None, None) => "(built-in synthetic)".into(),
    }
}

/// The progress bar and evaluation lines of a training run.
pub struct Progress {
    pub bar: ProgressBar,
    ema: Option<f64>,
    /// The families the run's events feed: alignment always; loss, step time and the
    /// last step's time only in process (a coordinator's executor feeds those itself).
    pub metrics: Option<(gpo_ops::metrics::CoordinatorMetrics, bool)>,
    /// `--events`: one JSON line per evaluation.
    pub events: Option<std::fs::File>,
}

impl Progress {
    pub fn new(steps: u64) -> Self {
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Progress {
            bar,
            ema: None,
            metrics: None,
            events: None,
        }
    }

    /// Appends the evaluations to `path` (`--events`).
    pub fn events_to(&mut self, path: Option<&std::path::Path>) -> Result<()> {
        if let Some(p) = path {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("--events {}", p.display()))?;
            self.events = Some(f);
        }
        Ok(())
    }

    pub fn event(&mut self, e: RunEvent) {
        match e {
            RunEvent::Step { loss, seconds, .. } => {
                if let Some((m, true)) = &self.metrics {
                    m.steps.observe(gpo_ops::metrics::Phase::Dispatch, seconds);
                    m.step_done(loss, unix_now());
                }
                let m = self.ema.map_or(loss, |m| 0.9 * m + 0.1 * loss);
                self.ema = Some(m);
                self.bar.inc(1);
                self.bar.set_message(format!("loss {m:.3}"));
            }
            RunEvent::Eval {
                step,
                report,
                best,
                validation,
            } => {
                if let Some(f) = &mut self.events {
                    use std::io::Write;
                    let line = serde_json::json!({
                        "step": step,
                        "test": report.methods["gpo"],
                        "validation": validation,
                        "best": best,
                    });
                    // One write per line (O_APPEND), so a reader never sees half a line.
                    if let Err(e) = f.write_all(format!("{line}\n").as_bytes()) {
                        tracing::warn!("--events: {e}");
                    }
                }
                if let Some((m, _)) = &self.metrics {
                    use gpo_ops::metrics::Split;
                    m.alignment(Split::Test, report.methods["gpo"]);
                    if let Some(v) = validation {
                        m.alignment(Split::Validation, v);
                    }
                }
                self.bar.suspend(|| {
                    eprintln!(
                        "step {step:>6}: alignment gpo {:.4} (uniform {:.4}, train_mean {:.4}){}",
                        report.methods["gpo"],
                        report.methods["uniform"],
                        report.methods["train_mean"],
                        if best { "  *best" } else { "" }
                    )
                });
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Starts the `/metrics`, `/healthz`, `/readyz` server at `addr`, if one is asked for, with
/// gpo_build_info for `role` and what `register` adds (each part's families: the lead adds
/// other metric sets, such as the authentication failures, here).
pub fn serve_metrics(
    addr: Option<std::net::SocketAddr>,
    role: gpo_ops::metrics::Role,
    health: &gpo_ops::http::Health,
    register: impl FnOnce(&mut gpo_ops::metrics::Registry),
) -> Result<Option<gpo_ops::http::MetricsServer>> {
    let Some(addr) = addr else { return Ok(None) };
    let mut reg = gpo_ops::metrics::registry(role);
    register(&mut reg);
    let srv = gpo_ops::http::MetricsServer::start(addr, reg, health.clone())?;
    eprintln!("metrics on http://{}/metrics", srv.addr());
    Ok(Some(srv))
}

/// Prints the alignment table of a finished run.
pub fn report(summary: &Summary, out: &std::path::Path) {
    println!();
    inputs::print_table(
        summary.metric,
        &summary.methods,
        &format!(
            ", {} held-out groups, {} pairs, best step {}",
            summary.test_groups.len(),
            summary.eval_pairs,
            summary.best_step
        ),
    );
    println!("summary: {}", out.join("summary.json").display());
}

/// Prints the summary's table, or how to resume a stopped run.
pub fn finish(summary: &Summary, out: &std::path::Path) {
    match summary.stopped_at {
        Some(step) => eprintln!(
            "stopped at step {step} of {}; resume point written. Resume with: gpo train --resume {} (and the same --data/--embeddings)",
            summary.config.steps,
            out.display()
        ),
        None => report(summary, out),
    }
}

/// Refuses `--collective nccl` for workers this binary would start when it was built without
/// NCCL, before any data is read or any file written.
pub fn check_local_collective(collective: &str) -> Result<()> {
    if collective == "nccl" && !cfg!(feature = "cuda") {
        anyhow::bail!(
            "--collective nccl: this gpo was built without NCCL (rebuild with `--features cuda`: scripts/cuda_build.sh), or use --collective tcp-ring"
        );
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let device = gpo_worker::device::DeviceSpec::parse(&a.device)?.check_build()?;
    if let Some(n) = a.workers.filter(|&n| n > 0) {
        check_local_collective(&a.collective)?;
        // Probed here, so a missing driver fails before any worker starts; the worker
        // processes read their --device from the environment they inherit.
        device.probe()?;
        std::env::set_var("GPO_DEVICE", &a.device);
        return crate::cmd::coordinator::run_distributed(&a, n, None);
    }
    // Opened before any data is read: a missing driver fails at once.
    let device = device.open()?;
    let stop = crate::signals::stop_flag();
    let metrics = gpo_ops::metrics::CoordinatorMetrics::default();
    let health = gpo_ops::http::Health::not_ready("loading the data");
    let _server = serve_metrics(
        a.metrics_addr,
        gpo_ops::metrics::Role::Coordinator,
        &health,
        |r| metrics.register(r),
    )?;
    crate::embedding::fill_before_training(&a.embed, &a.data)?;
    let p = prepare(&a)?;
    let mut replica = p.replica()?;
    if !device.is_cpu() {
        replica.set_compute(&device, gpo_core::model::OpPath::Composite)?;
    }
    let mut dispatch = InProcess::new(replica);
    health.set_ready();
    let mut progress = Progress::new(p.cfg.steps);
    progress.metrics = Some((metrics, true));
    progress.events_to(a.events.as_deref())?;
    if let Some((r, _)) = &p.resume {
        progress.bar.set_position(r.step);
    }
    let opts = p.loop_options(&a, Some(stop));
    let summary = train_with(
        &p.cfg,
        p.survey.clone(),
        p.features.clone(),
        &mut dispatch,
        &p.out,
        &opts,
        &mut |e| progress.event(e),
    )?;
    progress.finish();
    finish(&summary, &p.out);
    Ok(())
}
