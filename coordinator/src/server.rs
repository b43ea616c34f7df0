//! The running coordinator: binds its port, serves the gRPC service ([`crate::service`])
//! on its own tokio runtime, feeds the machine its clock (a tick every 100 ms), and ends
//! the run by telling every worker. The training loop talks to it through
//! [`CoordinatorService::dispatch`].

use crate::machine::{Event, Machine, MachineConfig};
use crate::service::{CoordinatorOptions, RunInfo, Service};
use crate::shared::Shared;
use anyhow::{bail, Context, Result};
use gpo_proto::v1::coordinator_server::CoordinatorServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running coordinator service. Dropping it stops the service.
pub struct CoordinatorService {
    addr: SocketAddr,
    pub(crate) shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The standard gRPC health service's state: SERVING while this coordinator leads the
    /// run and serves it (it only starts once elected), NOT_SERVING once the run is over.
    health: tonic_health::server::HealthReporter,
}

/// The gRPC health service name of the coordinator (`grpc.health.v1`).
pub const HEALTH_SERVICE: &str = "gpo.v1.Coordinator";

/// A run id: unique enough to tell runs apart (time and process).
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "run-{:016x}",
        nanos ^ ((std::process::id() as u64) << 40).rotate_left(7)
    )
}

/// What the port demands, for the log.
fn describe(sec: &crate::security::Security) -> String {
    let tls = match (sec.tls.any(), sec.tls.requires_client_cert()) {
        (false, _) => "plain gRPC",
        (true, false) => "TLS",
        (true, true) => "mTLS",
    };
    let token = if sec.token.is_some() {
        ", run token"
    } else {
        ", no token"
    };
    format!("{tls}{token}")
}

/// A two-thread runtime for one of the coordinator's gRPC services, and `listener` (bound
/// already) moved into it, with its address.
pub(crate) fn serving_runtime(
    listener: std::net::TcpListener,
    thread_name: &str,
) -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(thread_name)
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _g = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let addr = listener.local_addr()?;
    Ok((runtime, listener, addr))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl CoordinatorService {
    /// Binds `listen` (port 0: any free port) and serves the run in the background.
    pub fn start(
        listen: SocketAddr,
        info: RunInfo,
        opts: CoordinatorOptions,
    ) -> Result<CoordinatorService> {
        let l = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the coordinator on {listen}"))?;
        Self::start_on(l, info, opts)
    }

    /// Serves the run in the background on a listener bound already (a coordinator that
    /// campaigns in etcd binds first, to advertise its address).
    pub fn start_on(
        listener: std::net::TcpListener,
        info: RunInfo,
        opts: CoordinatorOptions,
    ) -> Result<CoordinatorService> {
        if opts.expected_workers == 0 {
            bail!("a distributed run needs at least one worker");
        }
        if opts.min_workers == 0 || opts.min_workers > opts.expected_workers {
            bail!(
                "--min-workers must be between 1 and --workers ({}), got {}",
                opts.expected_workers,
                opts.min_workers
            );
        }
        if opts.collective != "tcp-ring" && opts.collective != "nccl" {
            bail!(
                "unknown collective `{}` (expected tcp-ring or nccl)",
                opts.collective
            );
        }
        let (runtime, listener, addr) =
            crate::server::serving_runtime(listener, "gpo-coordinator")?;
        let mcfg = MachineConfig {
            target_workers: opts.expected_workers,
            min_workers: opts.min_workers,
            heartbeat_timeout: ms(opts.heartbeat_timeout),
            step_deadline_min: ms(opts.step_deadline_min),
            setup_timeout: ms(opts.setup_timeout),
            max_wait: opts.max_wait.map(ms),
            registration_timeout: opts.registration_timeout.map(ms),
            shard_groups: info.shard_groups.max(1),
            skip_digest_check: opts.fake_compute_ms > 0,
            ..Default::default()
        };
        let machine = Machine::new(mcfg, 0, info.start_step, info.start_generation);
        let sec = opts.security.clone();
        // TLS handshakes are ours (gpo_ops::tls_accept), so refused ones are counted.
        let (tls, auth) = sec.server_side()?;
        let ring_secret = gpo_ops::auth::random_bytes(32)?;
        let shared = Arc::new(Shared::new(new_run_id(), info, opts, machine, ring_secret));
        let svc = CoordinatorServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(sec.max_message_bytes)
        .max_encoding_message_size(sec.max_message_bytes);
        let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
        let mut builder = tonic::transport::Server::builder();
        // The health service answers without credentials: it says only whether this
        // coordinator leads, which probes need and which reveals nothing of the run.
        let (health, health_svc) = tonic_health::server::health_reporter();
        runtime.block_on(async {
            health
                .set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        });
        gpo_ops::logs::context::set_run(&shared.run_id);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let failures = sec.failures.clone();
        runtime.spawn(async move {
            let router = builder.add_service(health_svc).add_service(svc);
            let shutdown = async {
                let _ = rx.await;
            };
            let r =
                gpo_ops::tls_accept::serve_router(router, listener, tls, failures, shutdown).await;
            if let Err(e) = r {
                tracing::error!("the coordinator's gRPC server stopped: {e}");
            }
        });
        let sh = shared.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut core = sh.lock();
                let _ = sh.handle(&mut core, Event::Tick);
                if core.machine.phase().over() {
                    return;
                }
            }
        });
        tracing::info!(
            "coordinator of run {} listening on {addr} ({})",
            shared.run_id,
            describe(&sec)
        );
        Ok(CoordinatorService {
            addr,
            shared,
            shutdown: Some(tx),
            runtime: Some(runtime),
            health,
        })
    }

    /// The address the service listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.shared.run_id
    }

    /// The current membership generation.
    pub fn generation(&self) -> u64 {
        self.shared.lock().machine.generation()
    }

    /// A reader of the current generation for another thread.
    pub fn generation_reader(&self) -> impl Fn() -> u64 + Send + 'static {
        let sh = self.shared.clone();
        move || sh.lock().machine.generation()
    }

    /// A handle that fails the run from another thread: waiters wake with `why`.
    pub fn aborter(&self) -> impl Fn(String) + Send + Sync + 'static {
        let sh = self.shared.clone();
        move |why| {
            let mut core = sh.lock();
            let _ = sh.handle(&mut core, Event::Fail { reason: why });
        }
    }

    /// A dispatch for the training loop. `mirror` is a replica built from the run's seed
    /// (as every worker builds its own), holding the start step's state: the coordinator
    /// evaluates and checkpoints from it and sends its state to workers that lack it.
    /// `None` in benchmark mode.
    pub fn dispatch(&self, mirror: Option<gpo_worker::Replica>) -> crate::GrpcDispatch {
        crate::dispatch::GrpcDispatch::new(self.shared.clone(), mirror)
    }

    /// Ends the run: every worker is told to shut down (with `failed`'s reason when it
    /// failed), and this waits up to `grace` for their streams to close.
    pub fn finish(&self, failed: Option<String>, grace: Duration) {
        let sh = &self.shared;
        let mut core = sh.lock();
        let ev = match failed {
            Some(reason) => Event::Fail { reason },
            None => Event::Finish,
        };
        let _ = sh.handle(&mut core, ev);
        if let Some(rt) = &self.runtime {
            let h = self.health.clone();
            rt.spawn(async move {
                for name in [HEALTH_SERVICE, ""] {
                    h.set_service_status(name, tonic_health::ServingStatus::NotServing)
                        .await;
                }
            });
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !core.links.is_empty() {
            core.links.retain(|_, l| !l.tx.is_closed());
            core = sh.wait(core, Duration::from_millis(50));
        }
    }
}

impl Drop for CoordinatorService {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
