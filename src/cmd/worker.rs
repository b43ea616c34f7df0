//! `gpo worker`: a distributed worker. It registers with a coordinator, reads the run's
//! data from the path the coordinator names, or fetches it from the coordinator into its
//! cache when it cannot (or generates the synthetic survey from the seed), and runs the steps it is assigned until the coordinator shuts it down.

use crate::inputs::{self, DataArgs};
use anyhow::{Context, Result};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_proto::v1 as pb;
use gpo_worker::client::{self, DataLoader, WorkerOptions};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Flags of `gpo worker`. Precedence: flag, then environment variable, then `--config`
/// TOML (keys as the flags, with underscores), then defaults.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The coordinator's address: host:port (as the coordinator prints it) or
    /// http://host:port.
    #[arg(long, env = "GPO_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Join the worker pool of the sweep at this address (`gpo sweep --listen`) instead of
    /// one run: the worker serves trial after trial, a gang at a time, until the sweep is
    /// over.
    #[arg(long, env = "GPO_SWEEP", conflicts_with_all = ["coordinator", "etcd"])]
    pub sweep: Option<String>,
    /// This worker's name (default: worker-<host>-<pid>).
    #[arg(long, env = "GPO_WORKER_NAME")]
    pub name: Option<String>,
    /// Seconds to keep retrying (with backoff) while the coordinator is unreachable.
    #[arg(long, env = "GPO_CONNECT_TIMEOUT_S")]
    pub connect_timeout_s: Option<f64>,
    /// Address the ring all-reduce listens on (port 0: any free port). Default loopback,
    /// for workers on one host; on several hosts bind 0.0.0.0:PORT.
    #[arg(long, env = "GPO_RING_BIND")]
    pub ring_bind: Option<String>,
    /// Address the other workers connect to: HOST or HOST:PORT (default: the bound address,
    /// or, bound on every interface, this host's address on the route to the coordinator).
    #[arg(long, env = "GPO_RING_ADVERTISE")]
    pub ring_advertise: Option<String>,
    /// Seconds every ring read and write may take before the step fails.
    #[arg(long, env = "GPO_IO_TIMEOUT_S")]
    pub io_timeout_s: Option<f64>,
    /// Gradient threads (default: the coordinator's hint, else all cores).
    #[arg(long, env = "GPO_WORKER_THREADS")]
    pub threads: Option<usize>,
    /// etcd endpoints (URL[,URL…]): the coordinator is whichever is elected for
    /// --run-name (no --coordinator needed), and the worker follows a new leader after a
    /// failover. It also keeps a membership key under a lease.
    #[arg(long, env = "GPO_ETCD")]
    pub etcd: Option<String>,
    /// The run's name in etcd (keys under /gpo/<name>/).
    #[arg(long, env = "GPO_RUN_NAME", default_value = "gpo")]
    pub run_name: String,
    /// Folder of the data fetched from the coordinator when the run's data path cannot be
    /// read here (no shared volume); reused by later joins of data with the same
    /// fingerprint. Default: $XDG_CACHE_HOME/gpo/data, else ~/.cache/gpo/data, else
    /// .gpo-cache in the working directory.
    #[arg(long, env = "GPO_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// TOML file with any of the settings above.
    #[arg(long, env = "GPO_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub credentials: crate::cmd::credentials::Flags,
    /// Serve /metrics, /healthz and /readyz (ready once the run's data is loaded) on this
    /// address (port 0: any free port; default: off). Reported to the coordinator, which
    /// lists it in `gpo status`.
    #[arg(long, env = "GPO_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Take part in the run's embedding phase with this model (an HF folder, a .gguf file
    /// or a hub id): the coordinator deals the texts its store lacks to the workers whose
    /// embedder fingerprint is its own.
    #[arg(long, env = "GPO_EMBEDDER")]
    pub embedder: Option<String>,
    /// Pooling of the embedder (default: the model's own).
    #[arg(long, requires = "embedder")]
    pub embed_pooling: Option<gpo_embed::Pooling>,
    /// Device of the embedder: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", requires = "embedder")]
    pub embed_device: String,
    /// Compute dtype of the embedder: f32, f16 or bf16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long, requires = "embedder")]
    pub embed_dtype: Option<String>,
    /// Log lines as `text` or `json` (with run id, generation and step).
    #[arg(long, env = "GPO_LOG_FORMAT", default_value = "text")]
    pub log_format: gpo_ops::logs::LogFormat,
    /// Where this worker computes its gradients: cpu (the fused ops) or cuda / cuda:N (the
    /// composite ops in f32; a build with `--features cuda`). Parameters, Adam and the
    /// all-reduce buffer stay on the host.
    #[arg(long, env = "GPO_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// The worker's TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WorkerFile {
    coordinator: Option<String>,
    name: Option<String>,
    connect_timeout_s: Option<f64>,
    ring_bind: Option<String>,
    ring_advertise: Option<String>,
    io_timeout_s: Option<f64>,
    threads: Option<usize>,
    cache_dir: Option<PathBuf>,
}

/// The default data cache: $XDG_CACHE_HOME/gpo/data, ~/.cache/gpo/data, or `.gpo-cache`.
fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .map(|c| c.join("gpo").join("data"))
        .unwrap_or_else(|| PathBuf::from(".gpo-cache"))
}

pub fn host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Loads what a run's data source names, through the CLI's I/O edge.
pub fn loader() -> DataLoader {
    Arc::new(|src: &pb::DataSource| -> Result<(Survey, PointFeatures)> {
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let (args, seed) = match &src.source {
            Some(pb::data_source::Source::SyntheticSeed(s)) => (DataArgs::default(), *s),
            Some(pb::data_source::Source::Dataset(d)) => (
                DataArgs {
                    data: Some(PathBuf::from(&d.data)),
                    format: nonempty(&d.format),
                    embeddings: nonempty(&d.embeddings).map(PathBuf::from),
                },
                0,
            ),
            None => anyhow::bail!("the coordinator named no data source"),
        };
        let (s, f, desc) = inputs::load(&args, seed)?;
        tracing::info!("data: {desc}");
        Ok((s, f))
    })
}

pub fn options(a: &Args) -> Result<WorkerOptions> {
    let file = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<WorkerFile>(&text)
                .with_context(|| format!("{}: invalid worker configuration", p.display()))?
        }
        None => WorkerFile::default(),
    };
    let etcd = a
        .etcd
        .as_deref()
        .map(|e| gpo_worker::etcd::EtcdConfig::new(e, &a.run_name, 5))
        .transpose()?;
    let coordinator = match (
        a.coordinator
            .clone()
            .or(a.sweep.clone())
            .or(file.coordinator),
        &etcd,
    ) {
        (Some(c), _) => {
            gpo_worker::addr::coordinator_url(&c)
                .map_err(anyhow::Error::msg)
                .context("--coordinator")?;
            c
        }
        (None, Some(_)) => String::new(),
        (None, None) => anyhow::bail!(
            "no coordinator: pass --coordinator HOST:PORT (or GPO_COORDINATOR), or --etcd"
        ),
    };
    let secs = |v: f64, what: &str| -> Result<Duration> {
        if v.is_finite() && v > 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            anyhow::bail!("`{what}` must be a positive number of seconds, got {v}")
        }
    };
    let threads = a.threads.or(file.threads);
    let host = host();
    let (credentials, max_message_bytes) = a.credentials.client()?;
    Ok(WorkerOptions {
        coordinator,
        name: a
            .name
            .clone()
            .or(file.name)
            .unwrap_or_else(|| format!("worker-{host}-{}", std::process::id())),
        connect_timeout: secs(
            a.connect_timeout_s
                .or(file.connect_timeout_s)
                .unwrap_or(60.0),
            "connect_timeout_s",
        )?,
        ring_bind: a
            .ring_bind
            .clone()
            .or(file.ring_bind)
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        ring_advertise: a.ring_advertise.clone().or(file.ring_advertise),
        io_timeout: secs(
            a.io_timeout_s.or(file.io_timeout_s).unwrap_or(60.0),
            "io_timeout_s",
        )?,
        threads,
        capabilities: pb::Capabilities {
            device: gpo_worker::device::DeviceSpec::parse(&a.device)?
                .probe()?
                .name(),
            memory_bytes: memory_bytes(),
            embedder: String::new(),
            threads: threads.unwrap_or_else(gpo_core::grad::default_threads) as u32,
            collectives: if cfg!(feature = "cuda") {
                vec!["tcp-ring".into(), "nccl".into()]
            } else {
                vec!["tcp-ring".into()]
            },
            hostname: host,
            version: env!("CARGO_PKG_VERSION").into(),
            metrics_addr: String::new(),
        },
        etcd,
        credentials,
        max_message_bytes,
        auth_failures: Default::default(),
        metrics: Default::default(),
        health: gpo_ops::http::Health::not_ready("loading the run's data"),
        cache_dir: a
            .cache_dir
            .clone()
            .or(file.cache_dir)
            .unwrap_or_else(default_cache_dir),
    })
}

pub fn run(a: Args) -> Result<()> {
    let mut opts = options(&a)?;
    let metrics = opts.metrics.clone();
    let auth_failures = opts.auth_failures.clone();
    let server = crate::cmd::train::serve_metrics(
        a.metrics_addr,
        gpo_ops::metrics::Role::Worker,
        &opts.health,
        |r| {
            metrics.register(r);
            auth_failures.register(r);
        },
    )?;
    if let Some(s) = &server {
        opts.capabilities.metrics_addr = s.addr().to_string();
    }
    // The embedder is loaded before anything connects: a wrong model fails at once.
    let embedder: Option<Arc<dyn gpo_worker::embed_work::BatchEmbedder>> = match &a.embedder {
        Some(m) => {
            let st = crate::embedding::Settings {
                model: m.clone(),
                template: "plain".into(),
                pooling: a.embed_pooling,
                device: a.embed_device.clone(),
                dtype: a.embed_dtype.clone(),
                max_batch_tokens: 0,
                max_batch_size: 0,
                max_len: None,
                truncate: false,
                flush_secs: 60,
            };
            let (e, parallel) = st.load()?;
            opts.capabilities.embedder = e.id().to_string();
            Some(Arc::new(ModelEmbedder { e, parallel }))
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        // SIGTERM (Kubernetes' eviction) and Ctrl-C: leave the run cleanly, so it goes on
        // without waiting for a timeout.
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(true);
        });
        if let Some(sweep) = &a.sweep {
            crate::cmd::worker_pool::run(sweep, opts, rx).await?;
            return Ok(None);
        }
        if let Some(e) = embedder {
            // A test hook: `N` or `NAME:N` ends this worker abruptly after N leases.
            let crash = std::env::var("GPO_TEST_EMBED_CRASH_AFTER")
                .ok()
                .and_then(|v| match v.rsplit_once(':') {
                    Some((name, n)) if name == opts.name => n.parse().ok(),
                    Some(_) => None,
                    None => v.parse().ok(),
                });
            let out = gpo_worker::embed_work::run(&opts, e, rx.clone(), crash).await?;
            if out.phase {
                eprintln!(
                    "embedded {} batches ({} tokens) for the run's store",
                    out.batches, out.tokens
                );
            }
            if !out.then_train {
                return Ok(None);
            }
        }
        client::run(opts, loader(), rx).await.map(Some)
    })?;
    let Some(report) = report else {
        return Ok(());
    };
    eprintln!(
        "worker {} of run {}: {} steps, {} rejoins; stopped: {}",
        report.worker_id, report.run_id, report.steps, report.rejoins, report.reason
    );
    Ok(())
}

/// A worker's embedder for the embedding phase: each planned batch one forward.
struct ModelEmbedder {
    e: Box<dyn gpo_embed::Embedder>,
    parallel: usize,
}

impl gpo_worker::embed_work::BatchEmbedder for ModelEmbedder {
    fn id(&self) -> &str {
        self.e.id()
    }
    fn dim(&self) -> usize {
        self.e.dim()
    }
    fn parallel(&self) -> usize {
        self.parallel
    }
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let refs: Vec<&[u32]> = batch.iter().map(|t| t.as_slice()).collect();
        Ok(self.e.embed_tokens(&refs)?)
    }
}
