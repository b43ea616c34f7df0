//! `gpo coordinator`: owns a distributed run. It serves the `gpo.v1` gRPC API, waits for
//! `--workers` workers to register, dispatches each step's episode specs to them, evaluates
//! on schedule and writes the checkpoints and `summary.json` (the same training loop as the
//! single-process `gpo train`). `gpo train --workers N` runs the same code with N worker
//! processes it starts itself on loopback.
//!
//! The command is split by concern: this module turns the flags into the service's
//! options (`gpo coordinator` and `gpo train --workers N`), `drive` runs the job,
//! `leadership` is the etcd wiring of a highly available run, and `workers` starts and
//! reaps the worker processes of a local run.

mod drive;
mod leadership;
mod workers;

pub(crate) use workers::{reap, spawn_workers};

use crate::cmd::train;
use anyhow::Result;
use gpo_coordinator::CoordinatorOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `gpo coordinator`: the run's (as `gpo train`, with `--workers` the number of
/// workers to wait for) plus the service's.
#[derive(Debug, clap::Args)]
#[group(id = "coordinator-flags")]
pub struct Args {
    #[command(flatten)]
    pub train: train::Args,
    /// Address to serve gRPC on (port 0: any free port; see --addr-file).
    #[arg(long, env = "GPO_LISTEN", default_value = "127.0.0.1:50051", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Write the address actually bound to this file (for scripts and tests).
    #[arg(long, env = "GPO_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Milliseconds between worker heartbeats.
    #[arg(long, env = "GPO_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Seconds of silence after which a worker is dropped from the run (the step it was
    /// in is thrown away and rerun on the others).
    #[arg(long, env = "GPO_HEARTBEAT_TIMEOUT_S", default_value_t = 5.0)]
    pub heartbeat_timeout_s: f64,
    /// Floor of the step deadline in seconds: a member that has not reported a step
    /// within max(3 × the median step time, this) is dropped.
    #[arg(long, env = "GPO_STEP_DEADLINE_S", default_value_t = 5.0)]
    pub step_deadline_s: f64,
    /// Seconds to wait for the workers to register (default: forever).
    #[arg(long, env = "GPO_REGISTRATION_TIMEOUT_S")]
    pub registration_timeout_s: Option<f64>,
    /// Gradient threads each worker should use (default: the worker's cores).
    #[arg(long, env = "GPO_WORKER_THREADS")]
    pub worker_threads: Option<u32>,
    /// etcd endpoints (URL[,URL…]): coordinators of the same --run-name campaign for the
    /// leadership; a standby waits and takes over (from the run's state pointer and its
    /// newest resume point) when the leader dies. Run them with the same --out.
    #[arg(long, env = "GPO_ETCD")]
    pub etcd: Option<String>,
    /// The run's name in etcd (keys under /gpo/<name>/).
    #[arg(long, env = "GPO_RUN_NAME", default_value = "gpo")]
    pub run_name: String,
    /// Seconds the leadership lease lives without a keep-alive: a dead leader is replaced
    /// this long after it died.
    #[arg(long, env = "GPO_ETCD_LEASE_TTL_S", default_value_t = 10)]
    pub etcd_lease_ttl_s: i64,
    /// The address workers connect to, announced in etcd (default: the bound address).
    #[arg(long, env = "GPO_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub credentials: crate::cmd::credentials::Flags,
}

/// How a run is served, as `gpo coordinator` and `gpo train --workers N` each set it up
/// from their flags: what [`drive::drive`] takes besides the run's own flags.
struct Service {
    listen: SocketAddr,
    addr_file: Option<PathBuf>,
    opts: CoordinatorOptions,
    etcd: Option<gpo_worker::etcd::EtcdConfig>,
    advertise: Option<String>,
    /// The token file the spawned workers read (`gpo train --workers N`).
    worker_token: Option<PathBuf>,
}

fn secs(v: f64, what: &str) -> Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0,
        "`{what}` must be a positive number of seconds, got {v}"
    );
    Ok(Duration::from_secs_f64(v))
}

/// The fault-tolerance options the run's flags set.
fn elastic(a: &train::Args, opts: &mut CoordinatorOptions) -> Result<()> {
    if let Some(m) = a.min_workers {
        opts.min_workers = m;
    }
    opts.max_wait = a.max_wait_s.map(|s| secs(s, "max_wait_s")).transpose()?;
    Ok(())
}

/// `gpo train --workers N`: a coordinator on a free loopback port and N worker processes.
pub fn run_distributed(a: &train::Args, n: usize, threads: Option<u32>) -> Result<()> {
    let cores = gpo_core::grad::default_threads();
    let mut opts = CoordinatorOptions {
        expected_workers: n,
        collective: a.collective.clone(),
        worker_threads: threads.unwrap_or((cores / n).max(1) as u32),
        registration_timeout: Some(Duration::from_secs(300)),
        ..Default::default()
    };
    elastic(a, &mut opts)?;
    // Closed to other local processes: a random token only this run's workers can read.
    let token = crate::cmd::credentials::LocalToken::create()?;
    opts.security.token = Some(token.token.clone());
    let service = Service {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        addr_file: None,
        opts,
        etcd: None,
        advertise: None,
        worker_token: Some(token.path().to_path_buf()),
    };
    let r = drive::drive(a, service, n);
    drop(token);
    r
}

pub fn run(a: Args) -> Result<()> {
    let workers = a.train.workers.unwrap_or(1);
    anyhow::ensure!(workers >= 1, "--workers must be at least 1");
    let mut opts = CoordinatorOptions {
        expected_workers: workers,
        heartbeat_interval: Duration::from_millis(a.heartbeat_ms.max(10)),
        heartbeat_timeout: secs(a.heartbeat_timeout_s, "heartbeat_timeout_s")?,
        step_deadline_min: secs(a.step_deadline_s, "step_deadline_s")?,
        registration_timeout: a
            .registration_timeout_s
            .map(|s| secs(s, "registration_timeout_s"))
            .transpose()?,
        collective: a.train.collective.clone(),
        worker_threads: a.worker_threads.unwrap_or(0),
        security: a.credentials.server()?,
        ..Default::default()
    };
    elastic(&a.train, &mut opts)?;
    let etcd = a
        .etcd
        .as_deref()
        .map(|e| gpo_worker::etcd::EtcdConfig::new(e, &a.run_name, a.etcd_lease_ttl_s))
        .transpose()?;
    let service = Service {
        listen: a.listen,
        addr_file: a.addr_file.clone(),
        opts,
        etcd,
        advertise: a.advertise.clone(),
        worker_token: None,
    };
    drive::drive(&a.train, service, 0)
}

/// `--listen`: an `IP:PORT`, `localhost:PORT`, or a host name this machine resolves.
pub fn parse_listen(s: &str) -> std::result::Result<SocketAddr, String> {
    let expected = "expected IP:PORT or localhost:PORT, e.g. 127.0.0.1:50051 (0.0.0.0:PORT listens on every interface)";
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("`{s}` has no port: {expected}"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` is not a port number 0–65535: {expected}"))?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            format!(
                "`{host}` is not an IP address or a host name this machine resolves: {expected}"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::parse_listen;

    #[test]
    fn listen_takes_what_people_type() {
        assert_eq!(
            parse_listen("127.0.0.1:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(
            parse_listen("localhost:50051").unwrap().to_string(),
            "127.0.0.1:50051"
        );
        assert_eq!(parse_listen("0.0.0.0:9").unwrap().to_string(), "0.0.0.0:9");
        assert!(parse_listen("50051").unwrap_err().contains("no port"));
        assert!(parse_listen("localhost:x")
            .unwrap_err()
            .contains("not a port"));
        assert!(parse_listen("no-such-host.invalid:1")
            .unwrap_err()
            .contains("expected IP:PORT"));
    }
}
