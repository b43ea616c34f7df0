//! The sweep's worker pool over gRPC (`gpo sweep --listen`): `gpo worker --sweep ADDR`
//! processes join it, and [`PoolExec`] lends them, a gang at a time, to trial runs.
//!
//! Why it exists: on a cluster the workers are pods that outlive any one trial. Each trial
//! is a `gpo coordinator` child process of the sweep (on a free port of `--bind`, advertised
//! as `--advertise-host`); its gang gets the coordinator's address on their pool streams and
//! joins it as ordinary workers, all-reducing over the TCP ring; when the run ends they are
//! back in the pool. A pool stream that breaks takes its worker out of the pool (a trial it
//! was in goes on under the run's own fault tolerance, or fails and is retried).

use super::exec::{self, Executor, Job, Msg};
use anyhow::{Context, Result};
use gpo_coordinator::security::Security;
use gpo_proto::v1 as pb;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// A connection's assignments.
pub type AssignTx = UnboundedSender<pb::PoolAssignment>;

/// Sends [`Msg::Left`] when a pool stream is dropped (the worker went away, or the sweep
/// ended the stream).
struct LeaveGuard {
    conn: u64,
    tx: Sender<Msg>,
}

impl Drop for LeaveGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Left { conn: self.conn });
    }
}

struct Svc {
    tx: Mutex<Sender<Msg>>,
    next: std::sync::atomic::AtomicU64,
}

type JoinStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::PoolAssignment, Status>> + Send>>;

#[tonic::async_trait]
impl pb::sweep_pool_server::SweepPool for Svc {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        req: Request<pb::PoolJoinRequest>,
    ) -> Result<Response<JoinStream>, Status> {
        let name = req.into_inner().name;
        if name.is_empty() || name.len() > 253 {
            return Err(Status::invalid_argument(
                "`name` must be 1 to 253 characters",
            ));
        }
        let conn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (atx, arx) = tokio::sync::mpsc::unbounded_channel();
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tx.send(Msg::Joined {
            conn,
            name,
            assign: atx,
        })
        .map_err(|_| Status::unavailable("the sweep is over"))?;
        let guard = LeaveGuard { conn, tx };
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(arx).map(move |a| {
            let _ = &guard;
            Ok(a)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The pool's gRPC server.
pub struct PoolServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl PoolServer {
    /// Serves the pool on `listen`, sending joins and leaves to `tx`.
    pub fn start(listen: SocketAddr, sec: &Security, tx: Sender<Msg>) -> Result<PoolServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gpo-sweep-pool")
            .enable_all()
            .build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("--listen {listen}"))?;
        let addr = listener.local_addr()?;
        let (tls, auth) =
            gpo_ops::tls_accept::server_side(&sec.tls, sec.token.as_deref(), sec.failures.clone())
                .context("the sweep's TLS configuration (--tls-cert, --tls-key, --tls-ca)")?;
        let svc = pb::sweep_pool_server::SweepPoolServer::new(Svc {
            tx: Mutex::new(tx),
            next: Default::default(),
        });
        let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
        let (stx, srx) = tokio::sync::oneshot::channel::<()>();
        let failures = sec.failures.clone();
        runtime.spawn(async move {
            let router = tonic::transport::Server::builder().add_service(svc);
            let shutdown = async {
                let _ = srx.await;
            };
            let r =
                gpo_ops::tls_accept::serve_router(router, listener, tls, failures, shutdown).await;
            if let Err(e) = r {
                tracing::error!("the sweep pool's gRPC server stopped: {e}");
            }
        });
        Ok(PoolServer {
            addr,
            shutdown: Some(stx),
            runtime: Some(runtime),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PoolServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

/// Trials as `gpo coordinator` children whose gangs come from the pool.
pub struct PoolExec {
    exe: PathBuf,
    /// Where trial coordinators listen (port 0: a free one each).
    pub bind: std::net::IpAddr,
    /// The host the pool's workers reach trial coordinators at.
    pub advertise: String,
    /// Credential flags of the trial coordinators (`--token-file`, `--tls-*`): the pool's
    /// own, which its workers present.
    pub credentials: Vec<std::ffi::OsString>,
    members: Arc<Mutex<HashMap<usize, (String, AssignTx)>>>,
    pids: exec::Pids,
}

impl PoolExec {
    /// A pool executor running `exe coordinator` for each trial.
    pub fn new(exe: PathBuf, bind: std::net::IpAddr, advertise: String) -> Self {
        PoolExec {
            exe,
            bind,
            advertise,
            credentials: vec![],
            members: Arc::default(),
            pids: Arc::default(),
        }
    }
}

impl Executor for PoolExec {
    fn start(&mut self, job: Job, tx: Sender<Msg>) {
        let members = self.members.clone();
        let pids = self.pids.clone();
        let (exe, bind, advertise, token) = (
            self.exe.clone(),
            self.bind,
            self.advertise.clone(),
            self.credentials.clone(),
        );
        std::thread::spawn(move || {
            let addr_file = job.dir.join("coordinator.addr");
            let _ = std::fs::remove_file(&addr_file);
            let gang = job.gang.clone();
            let trial_id = job
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let mode = exec::Mode::Coordinator {
                listen: SocketAddr::new(bind, 0),
                addr_file: addr_file.clone(),
                credentials: token,
                on_listening: Box::new(move |port| {
                    let coordinator = format!("{advertise}:{port}");
                    let m = members.lock().unwrap_or_else(|p| p.into_inner());
                    for w in &gang {
                        if let Some((name, a)) = m.get(w) {
                            tracing::info!("trial {trial_id}: lending {name} to {coordinator}");
                            let _ = a.send(pb::PoolAssignment {
                                trial: trial_id.clone(),
                                coordinator: coordinator.clone(),
                            });
                        }
                    }
                }),
            };
            let result = exec::run_child(&exe, 1, &job, &pids, &tx, mode);
            let _ = tx.send(Msg::Ended {
                trial: job.trial,
                result,
            });
        });
    }

    fn stop(&mut self, trial: usize) {
        exec::signal(&self.pids, trial);
    }

    fn joined(&mut self, worker: usize, name: String, assign: AssignTx) {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker, (name, assign));
    }

    fn left(&mut self, worker: usize) {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&worker);
    }

    fn close(&mut self) {
        // Dropping the senders ends every pool stream cleanly: the sweep is over.
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
