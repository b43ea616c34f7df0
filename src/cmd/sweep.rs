//! `gpo sweep --spec FILE --out DIR`: runs a sweep's trials, gang-scheduled on a pool of
//! worker processes, and writes the leaderboard; `gpo sweep status --out DIR` prints where
//! a sweep stands (while it runs too).

use crate::sweep::exec::Processes;
use anyhow::{bail, Context, Result};
use gpo_sweep::schedule::Phase;
use std::path::{Path, PathBuf};

/// `gpo sweep`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub sub: Option<Sub>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `gpo sweep status`.
#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Print a sweep's trial counts and its leaderboard's top rows.
    Status(StatusArgs),
}

/// Flags of `gpo sweep status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The sweep folder.
    #[arg(long, env = "GPO_SWEEP_OUT")]
    pub out: PathBuf,
    /// Rows of the leaderboard to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

/// Flags of `gpo sweep`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The sweep file (see examples/sweep-quick.toml).
    #[arg(long, env = "GPO_SWEEP_SPEC")]
    pub spec: Option<PathBuf>,
    /// The sweep folder: records, leaderboard, plots, the best trial. Running the same
    /// command again resumes the sweep there. With --etcd and no --out: the folder etcd's
    /// pointer names.
    #[arg(long, env = "GPO_SWEEP_OUT")]
    pub out: Option<PathBuf>,
    /// Serve /metrics (`gpo_trials`, `gpo_trial_duration_seconds`, `gpo_sweep_best_score`),
    /// /healthz and /readyz on this address.
    #[arg(long, env = "GPO_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// etcd endpoints: the sweep's folder is recorded at `/gpo/<name>/sweep` (one small
    /// value, whatever the trial count), so a coordinator started again finds it.
    #[arg(long, env = "GPO_ETCD")]
    pub etcd: Option<String>,
    /// Serve a worker pool on this address (`gpo worker --sweep ADDR` joins it): trials run
    /// as `gpo coordinator` processes whose gangs come from the pool. Without it, trials run
    /// on `[sweep] workers` processes of this machine.
    #[arg(long, env = "GPO_SWEEP_LISTEN", value_parser = crate::cmd::coordinator::parse_listen)]
    pub listen: Option<std::net::SocketAddr>,
    /// The host the pool's workers reach trial coordinators at (a pod IP, a Service name;
    /// default: the --listen address, or this host's name when it listens on all).
    #[arg(long, env = "GPO_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// The pool's credentials, also those of every trial coordinator.
    #[command(flatten)]
    pub credentials: crate::cmd::credentials::Flags,
}

/// The etcd pointer's value.
#[derive(serde::Serialize, serde::Deserialize)]
struct Pointer {
    out: PathBuf,
}

fn etcd_pointer(endpoints: &str, name: &str, out: Option<&Path>) -> Result<PathBuf> {
    let cfg = gpo_worker::etcd::EtcdConfig::new(endpoints, name, 10)?;
    let key = format!("{}sweep", cfg.prefix());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = cfg.connect().await?;
        match out {
            Some(out) => {
                let abs = std::path::absolute(out)?;
                let v = serde_json::to_string(&Pointer { out: abs.clone() })?;
                c.put(key.clone(), v, None)
                    .await
                    .with_context(|| format!("etcd: writing {key}"))?;
                Ok(abs)
            }
            None => {
                let r = c
                    .get(key.clone(), None)
                    .await
                    .with_context(|| format!("etcd: reading {key}"))?;
                let kv = r
                    .kvs()
                    .first()
                    .with_context(|| format!("etcd has no {key}: pass --out for a new sweep"))?;
                let p: Pointer = serde_json::from_slice(kv.value())
                    .with_context(|| format!("etcd: {key} is not a sweep pointer"))?;
                Ok(p.out)
            }
        }
    })
}

fn status(a: StatusArgs) -> Result<()> {
    let spec_path = a.out.join("sweep.toml");
    let text = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("{}: not a sweep folder", a.out.display()))?;
    let spec = gpo_sweep::spec::SweepSpec::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    let recs: Vec<_> = crate::sweep::load_records(&a.out)?.into_values().collect();
    let total = spec.trials().len();
    let mut line = format!("sweep `{}`: {total} trials;", spec.name);
    for p in Phase::ALL {
        let n = if p == Phase::Pending {
            total - recs.iter().filter(|r| r.phase != Phase::Pending).count()
        } else {
            recs.iter().filter(|r| r.phase == p).count()
        };
        line.push_str(&format!(" {} {n}", p.as_str()));
    }
    println!("{line}");
    print!(
        "{}",
        gpo_sweep::leaderboard::table(&recs, spec.metric.as_str(), a.top)
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    if let Some(Sub::Status(s)) = a.sub {
        return status(s);
    }
    let a = a.run;
    let Some(spec_path) = a.spec.clone() else {
        bail!("gpo sweep needs --spec FILE (or `gpo sweep status --out DIR`)");
    };
    let text = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("reading {}", spec_path.display()))?;
    let spec = gpo_sweep::spec::SweepSpec::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    let out = match (&a.etcd, &a.out) {
        (Some(e), out) => etcd_pointer(e, &spec.name, out.as_deref())?,
        (None, Some(o)) => o.clone(),
        (None, None) => bail!("gpo sweep needs --out DIR (or --etcd with a recorded sweep)"),
    };
    let metrics = gpo_ops::metrics::SweepMetrics::default();
    let health = gpo_ops::http::Health::not_ready("starting the sweep");
    let _server = crate::cmd::train::serve_metrics(
        a.metrics_addr,
        gpo_ops::metrics::Role::Sweep,
        &health,
        |r| metrics.register(r),
    )?;
    health.set_ready();
    let exe = std::env::current_exe().context("locating the gpo binary")?;
    let channel = std::sync::mpsc::channel();
    let (mut exec, workers, _pool): (Box<dyn crate::sweep::exec::Executor>, _, _) = match a.listen {
        None => {
            let threads = (gpo_core::grad::default_threads() / spec.workers).max(1);
            eprintln!(
                "sweep `{}`: {} trials, {} at once on {} local workers (gangs of {}), into {}",
                spec.name,
                spec.trials().len(),
                spec.concurrent,
                spec.workers,
                spec.gang,
                out.display()
            );
            (
                Box::new(Processes::new(exe, threads)),
                crate::sweep::Workers::Local,
                None,
            )
        }
        Some(listen) => {
            let sec = a.credentials.server()?;
            let server = crate::sweep::pool::PoolServer::start(listen, &sec, channel.0.clone())?;
            let advertise = a.advertise_host.clone().unwrap_or_else(|| {
                if listen.ip().is_unspecified() {
                    crate::cmd::worker::host()
                } else {
                    listen.ip().to_string()
                }
            });
            let mut p = crate::sweep::pool::PoolExec::new(exe, listen.ip(), advertise);
            p.credentials = a.credentials.pass_through();
            eprintln!(
                    "sweep `{}`: {} trials, {} at once in gangs of {}; worker pool on {} (gpo worker --sweep {}), into {}",
                    spec.name,
                    spec.trials().len(),
                    spec.concurrent,
                    spec.gang,
                    server.addr(),
                    server.addr(),
                    out.display()
                );
            (Box::new(p), crate::sweep::Workers::Pool, Some(server))
        }
    };
    let o = crate::sweep::run(
        &text,
        &spec_path,
        &out,
        exec.as_mut(),
        Some(metrics),
        workers,
        channel,
    )?;
    let [_, _, done, stopped, failed] = o.counts;
    println!(
        "sweep `{}`: {done} done, {stopped} stopped early, {failed} failed in {:.1} s",
        spec.name, o.seconds
    );
    if o.saved_steps.1 > 0 && stopped > 0 {
        println!(
            "early stopping saved {} of {} steps ({:.1}%)",
            o.saved_steps.0,
            o.saved_steps.1,
            100.0 * o.saved_steps.0 as f64 / o.saved_steps.1 as f64
        );
    }
    if let Some((id, score)) = &o.best {
        println!(
            "best: {id} ({} {score:.4}); checkpoint in {}",
            spec.metric.as_str(),
            out.join("best").display()
        );
    }
    println!("leaderboard: {}", out.join("leaderboard.csv").display());
    Ok(())
}
