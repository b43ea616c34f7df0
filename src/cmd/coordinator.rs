//! `gpo coordinator`: owns a distributed run. It serves the `gpo.v1` gRPC API, waits for
//! `--workers` workers to register, dispatches each step's episode specs to them, evaluates
//! on schedule and writes the checkpoints and `summary.json` (the same training loop as the
//! single-process `gpo train`). `gpo train --workers N` runs the same code with N worker
//! processes it starts itself on loopback.

use crate::cmd::train::{self, Progress};
use crate::inputs::DataArgs;
use anyhow::{Context, Result};
use gpo_coordinator::data_files::DataFiles;
use gpo_coordinator::run::train_with;
use gpo_coordinator::{CoordinatorOptions, CoordinatorService, RunInfo};
use gpo_proto::v1 as pb;
use gpo_worker::wire;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Where the workers find the run's data: the same path, made absolute, with the files
/// the coordinator serves to workers that cannot read it (`FetchDataFile`), or the seed of
/// the built-in synthetic survey. `fingerprint` is the data's, which every worker checks.
fn data_source(
    d: &DataArgs,
    seed: u64,
    fingerprint: &str,
) -> Result<(pb::DataSource, Option<Arc<DataFiles>>)> {
    let abs = |p: &Path| -> Result<PathBuf> {
        std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
    };
    let (source, files) = match &d.data {
        None => (pb::data_source::Source::SyntheticSeed(seed), None),
        Some(data) => {
            let data = abs(data)?;
            let store = abs(&crate::inputs::store_dir(&data, d.embeddings.as_deref())?)?;
            let files = DataFiles::open(&data, &store)
                .map_err(anyhow::Error::msg)
                .context("listing the data files to serve to workers")?;
            let source = pb::data_source::Source::Dataset(pb::DatasetPath {
                data: data.display().to_string(),
                format: d.format.clone().unwrap_or_default(),
                embeddings: store.display().to_string(),
                files: files
                    .entries()
                    .into_iter()
                    .map(|e| pb::DataFileEntry {
                        root: e.root,
                        path: e.path,
                        size: e.size,
                    })
                    .collect(),
                data_is_file: files.data_is_file(),
            });
            (source, Some(Arc::new(files)))
        }
    };
    Ok((
        pb::DataSource {
            source: Some(source),
            fingerprint: fingerprint.to_string(),
        },
        files,
    ))
}

struct Service {
    listen: SocketAddr,
    addr_file: Option<PathBuf>,
    opts: CoordinatorOptions,
    etcd: Option<gpo_worker::etcd::EtcdConfig>,
    advertise: Option<String>,
    /// The token file the spawned workers read (`gpo train --workers N`).
    worker_token: Option<PathBuf>,
}

/// Leadership through etcd: the runtime that keeps it, the leadership, and the pointer.
struct Elected {
    rt: tokio::runtime::Runtime,
    leadership: Option<gpo_coordinator::etcd::Leadership>,
    pointer: Option<gpo_coordinator::etcd::StatePointer>,
}

fn campaign(cfg: gpo_worker::etcd::EtcdConfig, addr: &str) -> Result<Elected> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gpo-etcd")
        .enable_all()
        .build()?;
    eprintln!("campaigning in etcd for run `{}` as {addr}", cfg.run_name);
    let (leadership, pointer) =
        rt.block_on(gpo_coordinator::etcd::Leadership::campaign(cfg, addr))?;
    eprintln!("elected leader");
    Ok(Elected {
        rt,
        leadership: Some(leadership),
        pointer,
    })
}

/// Writes the state pointer whenever the newest resume point or the generation changes,
/// and fails the run when the leadership is lost.
fn pointer_writer(
    mut lead: gpo_coordinator::etcd::Leadership,
    handle: tokio::runtime::Handle,
    svc: &CoordinatorService,
    base: gpo_coordinator::etcd::StatePointer,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let abort = svc.aborter();
    let generation = svc.generation_reader();
    let dir = gpo_coordinator::run::checkpoints_dir(Path::new(&base.out));
    let lost = lead.lost();
    std::thread::spawn(move || {
        let mut last: Option<(u64, u64)> = None;
        let mut tries = 0;
        loop {
            // Read before the write: a final pass after the loop ended still writes.
            let finished = done.load(std::sync::atomic::Ordering::Relaxed);
            if lost.load(std::sync::atomic::Ordering::SeqCst) {
                abort("this coordinator lost its etcd leadership".into());
                return;
            }
            let step = gpo_core::io::checkpoint::resume_points(&dir)
                .first()
                .map_or(base.step, |p| p.0);
            let now = (step, generation().max(base.generation));
            if last != Some(now) {
                let p = gpo_coordinator::etcd::StatePointer {
                    step: now.0,
                    generation: now.1,
                    ..base.clone()
                };
                match handle.block_on(lead.write(&p)) {
                    Ok(()) => last = Some(now),
                    Err(e) if lost.load(std::sync::atomic::Ordering::SeqCst) => {
                        abort(format!("{e:#}"));
                        return;
                    }
                    Err(e) => tracing::warn!("{e:#}; retrying"),
                }
            }
            if finished && last == Some(now) {
                return;
            }
            if finished {
                // The run is over but etcd did not take the last pointer: a few more tries.
                tries += 1;
                if tries > 10 {
                    tracing::warn!("etcd: the final state pointer was not written");
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// Runs a distributed job: serves the run, optionally spawns `spawn` worker processes on
/// loopback, trains, and shuts the workers down. SIGTERM stops it at the next step with
/// a resume point written, and it exits 0.
fn drive(a: &train::Args, service: Service, spawn: usize) -> Result<()> {
    let stop = crate::signals::stop_flag();
    // The metrics port serves from the start: a standby campaigning in etcd is live but
    // not ready until it leads and serves the run.
    let health = gpo_ops::http::Health::not_ready(if service.etcd.is_some() {
        "a standby: campaigning in etcd for the leadership"
    } else {
        "starting the run"
    });
    let metrics = service.opts.metrics.clone();
    let auth_failures = service.opts.security.failures.clone();
    let metrics_server = train::serve_metrics(
        a.metrics_addr,
        gpo_ops::metrics::Role::Coordinator,
        &health,
        |r| {
            metrics.register(r);
            auth_failures.register(r);
        },
    )?;
    let listener = std::net::TcpListener::bind(service.listen)
        .with_context(|| format!("binding the coordinator on {}", service.listen))?;
    let bound = listener.local_addr()?;
    let advertise = service
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    // With etcd, a standby waits here until it is elected; the leader then continues the
    // run the state pointer names (its newest resume point), or starts it.
    let mut elected = match service.etcd.clone() {
        Some(cfg) => Some(campaign(cfg, &advertise)?),
        None => None,
    };
    let pointer = elected.as_ref().and_then(|e| e.pointer.clone());
    let resume_from = pointer
        .as_ref()
        .filter(|ptr| ptr.step > 0)
        .map(|ptr| PathBuf::from(&ptr.out));
    if let Some(ptr) = &pointer {
        eprintln!(
            "the run's state pointer: step {}, generation {}, written by {}",
            ptr.step, ptr.generation, ptr.leader
        );
    }
    // Spawned workers serve their metrics on free ports of the coordinator's metrics host.
    let worker_metrics = metrics_server
        .as_ref()
        .map(|m| SocketAddr::new(m.addr().ip(), 0));
    let log_format = match a.log_format {
        gpo_ops::logs::LogFormat::Json => "json",
        gpo_ops::logs::LogFormat::Text => "text",
    };
    // A store that lacks texts is filled first, by the workers, on this port.
    let embedded = match a.embed.settings() {
        Some(st) => {
            let (survey, store) = crate::embedding::run_survey(&a.data)?;
            let extra = crate::cmd::embed::worker_embed_args(&st);
            let token = service.worker_token.clone();
            health.set_not_ready("filling the run's embedding store");
            if let Some(f) = &service.addr_file {
                gpo_core::io::checkpoint::write_atomic(f, bound.to_string().as_bytes())
                    .with_context(|| format!("writing {}", f.display()))?;
            }
            let phase = crate::embedding::Phase {
                listener: listener.try_clone()?,
                security: &service.opts.security,
                timing: gpo_coordinator::embed_service::EmbedTiming {
                    heartbeat_interval: service.opts.heartbeat_interval,
                    heartbeat_timeout: service.opts.heartbeat_timeout.max(Duration::from_secs(10)),
                },
                then_train: true,
                spawn: Box::new(move |addr, embed| {
                    let extra = if embed { &extra[..] } else { &[] };
                    spawn_workers(
                        spawn,
                        addr,
                        token.as_deref(),
                        worker_metrics,
                        log_format,
                        extra,
                    )
                }),
            };
            Some(crate::embedding::fill_distributed(
                &st, &survey, &store, phase,
            )?)
        }
        None => None,
    };
    let p = train::prepare_with(a, resume_from.as_deref())?;
    let cfg = &p.cfg;
    let config_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(serde_json::to_vec(cfg)?))
    };
    if let Some(ptr) = pointer.as_ref().filter(|ptr| ptr.step == 0) {
        anyhow::ensure!(
            ptr.config_sha256 == config_sha256,
            "the run in etcd was started with another configuration (SHA-256 {}, this one's {config_sha256})",
            ptr.config_sha256
        );
    }
    let mirror = p.replica()?;
    let fingerprint = wire::data_fingerprint(&p.survey, &p.features);
    let (data, files) = data_source(&a.data, cfg.seed, &fingerprint)?;
    let info = RunInfo {
        config_json: serde_json::to_string(cfg)?,
        data,
        fingerprint,
        files,
        param_count: cfg.model.param_count(),
        total_steps: cfg.steps,
        shard_groups: cfg.shard_groups,
        prior_groups: p
            .features
            .prior
            .as_ref()
            .map(|pr| pr.groups().to_vec())
            .unwrap_or_default(),
        start_step: mirror.applied_step(),
        start_generation: pointer.as_ref().map_or(0, |ptr| ptr.generation),
    };
    let world = service.opts.expected_workers;
    let start_step = info.start_step;
    let svc = CoordinatorService::start_on(listener, info, service.opts)?;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = elected.as_mut().map(|e| {
        let base = gpo_coordinator::etcd::StatePointer {
            out: std::fs::canonicalize(&p.out)
                .unwrap_or_else(|_| p.out.clone())
                .display()
                .to_string(),
            step: start_step,
            generation: pointer.as_ref().map_or(0, |ptr| ptr.generation),
            config_sha256: config_sha256.clone(),
            leader: advertise.clone(),
        };
        let lead = e.leadership.take().expect("elected");
        pointer_writer(lead, e.rt.handle().clone(), &svc, base, done.clone())
    });
    let addr = svc.addr();
    eprintln!(
        "coordinator of run {} listening on {addr}; waiting for {world} worker(s)",
        svc.run_id()
    );
    if let Some(t) = &service.worker_token {
        eprintln!(
            "the run is closed to other processes; inspect it with: gpo status --coordinator {addr} --token-file {}",
            t.display()
        );
    }
    if let Some(f) = &service.addr_file {
        gpo_core::io::checkpoint::write_atomic(f, addr.to_string().as_bytes())
            .with_context(|| format!("writing {}", f.display()))?;
    }
    health.set_ready();
    let children = Arc::new(Mutex::new(match embedded {
        // The workers that embedded train next.
        Some(c) => c,
        None => spawn_workers(
            spawn,
            addr,
            service.worker_token.as_deref(),
            worker_metrics,
            log_format,
            &[],
        )?,
    }));
    // A worker process that dies is a lost worker, which the run recovers from; only when
    // every spawned process has failed can no worker come, and the run fails.
    let watcher = {
        let (children, done, abort) = (children.clone(), done.clone(), svc.aborter());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut all_failed = spawn > 0;
                let mut last = String::new();
                for (i, c) in children.lock().unwrap().iter_mut().enumerate() {
                    match c.try_wait() {
                        Ok(Some(st)) if !st.success() => {
                            last = format!("worker process {i} exited ({st})")
                        }
                        _ => all_failed = false,
                    }
                }
                if all_failed {
                    abort(format!("every worker process exited; the last: {last}"));
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let result = {
        let mut dispatch = svc.dispatch(Some(mirror));
        let mut progress = Progress::new(cfg.steps);
        progress.metrics = Some((metrics.clone(), false));
        progress.events_to(a.events.as_deref())?;
        if let Some((r, _)) = &p.resume {
            progress.bar.set_position(r.step);
        }
        let opts = p.loop_options(a, Some(stop));
        let s = train_with(
            cfg,
            p.survey.clone(),
            p.features.clone(),
            &mut dispatch,
            &p.out,
            &opts,
            &mut |e| progress.event(e),
        );
        progress.finish();
        s
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    if let Some(w) = writer {
        let _ = w.join();
    }
    health.set_not_ready("the run is over");
    match &result {
        Ok(_) => svc.finish(None, Duration::from_secs(10)),
        Err(e) => svc.finish(Some(format!("{e:#}")), Duration::from_secs(3)),
    }
    let mut children = std::mem::take(&mut *children.lock().unwrap());
    let failed = reap(&mut children, Duration::from_secs(15));
    drop(svc);
    let summary = result?;
    if let Some(f) = failed {
        tracing::warn!("{f}");
    }
    train::finish(&summary, &p.out);
    Ok(())
}

/// Starts `n` `gpo worker` processes for the coordinator at `addr` (with `extra` flags,
/// e.g. the embedder of an embedding phase).
pub(crate) fn spawn_workers(
    n: usize,
    addr: SocketAddr,
    token: Option<&Path>,
    metrics: Option<SocketAddr>,
    log_format: &str,
    extra: &[String],
) -> Result<Vec<Child>> {
    let exe = std::env::current_exe().context("locating the gpo binary")?;
    (0..n)
        .map(|i| {
            let mut c = Command::new(&exe);
            c.args(["worker", "--coordinator"])
                .arg(format!("http://{addr}"))
                .args(["--name", &format!("worker-{i}")])
                .args(["--log-format", log_format])
                .args(extra);
            if let Some(t) = token {
                c.arg("--token-file").arg(t);
            }
            if let Some(m) = metrics {
                c.args(["--metrics-addr", &m.to_string()]);
            }
            c.env_remove("GPO_WORKER_CONFIG")
                .env_remove("GPO_EMBEDDER")
                .env_remove("GPO_TLS_CERT")
                .env_remove("GPO_TLS_KEY")
                .env_remove("GPO_TLS_CA")
                .env_remove("GPO_TOKEN_FILE")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting worker process {i}"))
        })
        .collect()
}

/// Waits for the worker processes to exit (killing any still alive after `grace`);
/// returns a message if one failed.
pub(crate) fn reap(children: &mut [Child], grace: Duration) -> Option<String> {
    let deadline = Instant::now() + grace;
    let mut failed = None;
    for (i, c) in children.iter_mut().enumerate() {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() && failed.is_none() {
                        failed = Some(format!("worker process {i} failed ({st})"));
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    failed.get_or_insert(format!(
                        "worker process {i} did not exit after the run and was killed"
                    ));
                    break;
                }
            }
        }
    }
    failed
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
    let r = drive(a, service, n);
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
    drive(&a.train, service, 0)
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
