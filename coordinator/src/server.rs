//! The coordinator's gRPC service (`gpo.v1.Coordinator`) and [`GrpcDispatch`], the
//! [`Dispatch`] that drives remote workers through it.
//!
//! The service runs on its own tokio runtime; the training loop ([`crate::run::train`])
//! runs on the caller's thread and talks to the service's state through a mutex and a
//! condition variable. Workers register, open their assignment stream, and wait. When the
//! expected number of workers is present, the dispatch forms membership generation 1
//! (ranks by registration order), each member sets up the collective through
//! `CollectiveSetup` (which returns once all have), and steps begin: each step's
//! meta-batch is split across the members by index, each member gets only its episode
//! specs, and the step ends when every member has reported. Rank 0 attaches its
//! parameters and optimizer state when the loop is about to evaluate or checkpoint;
//! every member reports a checksum of its parameters, and replicas that disagree stop the
//! run.
//!
//! Requests are validated before they touch the run: a wrong run id is
//! `FAILED_PRECONDITION`, a stale generation `ABORTED`, a buffer of the wrong size
//! `INVALID_ARGUMENT`, each with a message naming what was expected.
//!
//! A member that leaves, closes its stream or misses heartbeats for `heartbeat_timeout`
//! fails the run with an error naming it (elastic re-forming of the membership is not
//! implemented: the generation stays 1 for a whole run).

use crate::run::Dispatch;
use anyhow::{bail, Context, Result};
use gpo_core::model::Gpo;
use gpo_core::optim::Adam;
use gpo_core::sampler::EpisodeSpec;
use gpo_proto::v1 as pb;
use gpo_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use gpo_worker::client::MAX_MESSAGE_BYTES;
use gpo_worker::{wire, Replica};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// How the coordinator runs a distributed job.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Workers to wait for before the first step (the run's world size).
    pub expected_workers: usize,
    /// How often workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// A member silent for this long fails the run.
    pub heartbeat_timeout: Duration,
    /// How long to wait for the expected workers to register (`None`: forever).
    pub registration_timeout: Option<Duration>,
    /// How long the collective setup of a generation may take.
    pub setup_timeout: Duration,
    /// "tcp-ring" or "nccl".
    pub collective: String,
    /// Gradient threads each worker should use (0: the worker's default).
    pub worker_threads: u32,
    /// Non-zero: workers sleep this long per step instead of computing (benchmark mode).
    pub fake_compute_ms: u64,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            expected_workers: 1,
            heartbeat_interval: Duration::from_millis(1000),
            heartbeat_timeout: Duration::from_secs(15),
            registration_timeout: None,
            setup_timeout: Duration::from_secs(120),
            collective: "tcp-ring".into(),
            worker_threads: 0,
            fake_compute_ms: 0,
        }
    }
}

/// What workers are told about the run when they register.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The run configuration as JSON (dim_x filled in).
    pub config_json: String,
    /// Where the data comes from.
    pub data: pb::DataSource,
    /// [`wire::data_fingerprint`] of the coordinator's data.
    pub fingerprint: String,
    /// Parameters of the module.
    pub param_count: usize,
    /// Steps in the run (for status).
    pub total_steps: u64,
    /// Episodes per gradient shard: each worker gets whole shards.
    pub shard_groups: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    Done,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
    fn over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

type Tx = mpsc::Sender<Result<pb::Assignment, Status>>;

struct WorkerEntry {
    name: String,
    caps: Option<pb::Capabilities>,
    last_seen: Instant,
    last_step: u64,
    tx: Option<Tx>,
    rank: Option<u32>,
    left: Option<String>,
}

struct Setup {
    generation: u64,
    addrs: Vec<Option<String>>,
    nccl_id: Vec<u8>,
    done: bool,
}

struct Round {
    step: u64,
    generation: u64,
    assigned: Vec<u32>,
    results: Vec<Option<pb::StepResult>>,
    want_state: bool,
    started: Instant,
}

struct Inner {
    phase: Phase,
    error: Option<String>,
    workers: BTreeMap<u64, WorkerEntry>,
    next_id: u64,
    generation: u64,
    members: Vec<u64>,
    setup: Option<Setup>,
    round: Option<Round>,
    step: u64,
    recent: VecDeque<pb::StepTiming>,
}

struct Shared {
    run_id: String,
    info: RunInfo,
    opts: CoordinatorOptions,
    inner: Mutex<Inner>,
    changed: Condvar,
    notify: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter (the dispatch thread and async handlers).
    fn wake(&self) {
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    fn fail(&self, inner: &mut Inner, why: String) {
        if !inner.phase.over() {
            tracing::error!("run failed: {why}");
            inner.phase = Phase::Failed;
            inner.error = Some(why);
        }
        self.wake();
    }

    fn check_run(&self, run_id: &str) -> Result<(), Status> {
        if run_id != self.run_id {
            return Err(Status::failed_precondition(format!(
                "wrong run id `{run_id}`: this coordinator runs `{}`",
                self.run_id
            )));
        }
        Ok(())
    }
}

fn check_worker(inner: &mut Inner, id: u64) -> Result<&mut WorkerEntry, Status> {
    inner
        .workers
        .get_mut(&id)
        .ok_or_else(|| Status::not_found(format!("unknown worker id {id}: register first")))
}

fn check_generation(inner: &Inner, g: u64) -> Result<(), Status> {
    if g != inner.generation {
        return Err(Status::aborted(format!(
            "stale generation {g}: the run is at membership generation {}",
            inner.generation
        )));
    }
    Ok(())
}

/// The rank of `worker` in the current membership, or PERMISSION_DENIED naming it.
fn member_rank(inner: &Inner, worker: u64, generation: u64) -> Result<usize, Status> {
    inner
        .members
        .iter()
        .position(|&m| m == worker)
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "worker {worker} is not a member of generation {generation}"
            ))
        })
}

fn worker_label(inner: &Inner, id: u64) -> String {
    match inner.workers.get(&id) {
        Some(w) => match w.rank {
            Some(r) => format!("worker {id} `{}` (rank {r})", w.name),
            None => format!("worker {id} `{}`", w.name),
        },
        None => format!("worker {id}"),
    }
}

/// The gRPC service.
struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        let sh = &self.shared;
        if !req.run_id.is_empty() {
            sh.check_run(&req.run_id)?;
        }
        let mut inner = sh.lock();
        if inner.phase.over() {
            return Err(Status::failed_precondition(format!(
                "run `{}` is over ({})",
                sh.run_id,
                inner.phase.name()
            )));
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let name = if req.name.is_empty() {
            format!("worker-{id}")
        } else {
            req.name
        };
        tracing::info!("worker {id} `{name}` registered");
        inner.workers.insert(
            id,
            WorkerEntry {
                name,
                caps: req.capabilities,
                last_seen: Instant::now(),
                last_step: 0,
                tx: None,
                rank: None,
                left: None,
            },
        );
        sh.wake();
        Ok(Response::new(pb::RegisterResponse {
            run_id: sh.run_id.clone(),
            worker_id: id,
            config_json: sh.info.config_json.clone(),
            data: Some(sh.info.data.clone()),
            data_fingerprint: sh.info.fingerprint.clone(),
            param_count: sh.info.param_count as u64,
            heartbeat_interval_ms: sh.opts.heartbeat_interval.as_millis() as u64,
            collective: sh.opts.collective.clone(),
            threads: sh.opts.worker_threads,
            fake_compute_ms: sh.opts.fake_compute_ms,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        self.shared.check_run(&req.run_id)?;
        let mut inner = self.shared.lock();
        let over = inner.phase.over();
        let generation = inner.generation;
        let w = check_worker(&mut inner, req.worker_id)?;
        w.last_seen = Instant::now();
        w.last_step = w.last_step.max(req.step);
        Ok(Response::new(pb::HeartbeatResponse {
            generation,
            shutdown: over || w.left.is_some(),
        }))
    }

    type AssignmentsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Assignment, Status>>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let req = req.into_inner();
        self.shared.check_run(&req.run_id)?;
        let mut inner = self.shared.lock();
        let w = check_worker(&mut inner, req.worker_id)?;
        if w.tx.is_some() {
            return Err(Status::already_exists(format!(
                "worker {} already has an assignment stream",
                req.worker_id
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        w.tx = Some(tx);
        w.last_seen = Instant::now();
        self.shared.wake();
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn collective_setup(
        &self,
        req: Request<pb::CollectiveSetupRequest>,
    ) -> Result<Response<pb::CollectiveSetupResponse>, Status> {
        let req = req.into_inner();
        let sh = &self.shared;
        sh.check_run(&req.run_id)?;
        let rank = {
            let mut inner = sh.lock();
            check_worker(&mut inner, req.worker_id)?.last_seen = Instant::now();
            check_generation(&inner, req.generation)?;
            if req.buffer_len as usize != sh.info.param_count {
                return Err(Status::invalid_argument(format!(
                    "wrong buffer size: the worker would all-reduce {} values, the run's module has {} parameters",
                    req.buffer_len, sh.info.param_count
                )));
            }
            let rank = member_rank(&inner, req.worker_id, req.generation)?;
            if sh.opts.collective == "nccl" && rank == 0 && req.nccl_unique_id.is_empty() {
                return Err(Status::invalid_argument(
                    "rank 0 must bring NCCL's unique id",
                ));
            }
            let setup = inner
                .setup
                .as_mut()
                .filter(|s| s.generation == req.generation)
                .ok_or_else(|| Status::internal("no collective setup in progress"))?;
            setup.addrs[rank] = Some(req.ring_address);
            if rank == 0 {
                setup.nccl_id = req.nccl_unique_id;
            }
            setup.done = setup.addrs.iter().all(Option::is_some);
            sh.wake();
            rank
        };
        let deadline = Instant::now() + sh.opts.setup_timeout;
        loop {
            let notified = sh.notify.notified();
            {
                let inner = sh.lock();
                if inner.phase == Phase::Failed {
                    return Err(Status::aborted(format!(
                        "the run failed: {}",
                        inner.error.clone().unwrap_or_default()
                    )));
                }
                check_generation(&inner, req.generation)?;
                if let Some(s) = inner.setup.as_ref().filter(|s| s.done) {
                    return Ok(Response::new(pb::CollectiveSetupResponse {
                        generation: s.generation,
                        rank: rank as u32,
                        world_size: s.addrs.len() as u32,
                        ring_addresses: s.addrs.iter().flatten().cloned().collect(),
                        nccl_unique_id: s.nccl_id.clone(),
                    }));
                }
            }
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(
                    "the other members did not set up the collective in time",
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    async fn report_step(
        &self,
        req: Request<pb::StepResult>,
    ) -> Result<Response<pb::StepAck>, Status> {
        let r = req.into_inner();
        let sh = &self.shared;
        sh.check_run(&r.run_id)?;
        let mut inner = sh.lock();
        check_worker(&mut inner, r.worker_id)?.last_seen = Instant::now();
        check_generation(&inner, r.generation)?;
        if let Some(s) = &r.state {
            let n = sh.info.param_count;
            for (what, b) in [
                ("params", &s.params),
                ("adam_m", &s.adam_m),
                ("adam_v", &s.adam_v),
            ] {
                if b.len() != n * 4 {
                    return Err(Status::invalid_argument(format!(
                        "wrong buffer size: state.{what} holds {} bytes, expected {} ({n} parameters × 4)",
                        b.len(),
                        n * 4
                    )));
                }
            }
        }
        let rank = member_rank(&inner, r.worker_id, r.generation)?;
        let round = inner.round.as_mut().ok_or_else(|| {
            Status::failed_precondition(format!("step {} is not in progress", r.step))
        })?;
        if round.step != r.step || round.generation != r.generation {
            return Err(Status::failed_precondition(format!(
                "step {} is not in progress (step {} is)",
                r.step, round.step
            )));
        }
        if r.episodes != round.assigned[rank] {
            return Err(Status::invalid_argument(format!(
                "the result covers {} episodes, rank {rank} was assigned {}",
                r.episodes, round.assigned[rank]
            )));
        }
        if round.want_state && rank == 0 && r.state.is_none() && sh.opts.fake_compute_ms == 0 {
            return Err(Status::invalid_argument(format!(
                "step {} asked rank 0 for its state and the result has none",
                r.step
            )));
        }
        if round.results[rank].is_some() {
            return Err(Status::already_exists(format!(
                "rank {rank} already reported step {}",
                r.step
            )));
        }
        let step = r.step;
        round.results[rank] = Some(r);
        let waiting = round.results.iter().filter(|x| x.is_none()).count() as u32;
        let id = inner.members[rank];
        let w = inner.workers.get_mut(&id).expect("member exists");
        w.last_step = step;
        sh.wake();
        Ok(Response::new(pb::StepAck {
            waiting_for: waiting,
        }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = req.into_inner();
        let sh = &self.shared;
        sh.check_run(&req.run_id)?;
        let mut inner = sh.lock();
        let w = check_worker(&mut inner, req.worker_id)?;
        w.left = Some(req.reason.clone());
        w.tx = None;
        let member = inner.members.contains(&req.worker_id);
        tracing::info!("worker {} left: {}", req.worker_id, req.reason);
        if member && !inner.phase.over() {
            let who = worker_label(&inner, req.worker_id);
            sh.fail(&mut inner, format!("{who} left the run: {}", req.reason));
        }
        sh.wake();
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        let sh = &self.shared;
        let inner = sh.lock();
        let now = Instant::now();
        Ok(Response::new(pb::RunStatus {
            run_id: sh.run_id.clone(),
            state: inner.phase.name().into(),
            step: inner.step,
            total_steps: sh.info.total_steps,
            generation: inner.generation,
            expected_workers: sh.opts.expected_workers as u32,
            workers: inner
                .workers
                .iter()
                .map(|(&id, w)| pb::WorkerStatus {
                    worker_id: id,
                    name: w.name.clone(),
                    rank: w.rank.unwrap_or(0),
                    member: inner.members.contains(&id),
                    last_seen_ms: (now - w.last_seen).as_millis() as u64,
                    last_step: w.last_step,
                    capabilities: w.caps.clone(),
                })
                .collect(),
            recent_steps: inner.recent.iter().cloned().collect(),
            error: inner.error.clone().unwrap_or_default(),
        }))
    }
}

/// A running coordinator service. Dropping it stops the service.
pub struct CoordinatorService {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

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

impl CoordinatorService {
    /// Binds `listen` (port 0: any free port) and serves the run in the background.
    pub fn start(
        listen: SocketAddr,
        info: RunInfo,
        opts: CoordinatorOptions,
    ) -> Result<CoordinatorService> {
        if opts.expected_workers == 0 {
            bail!("a distributed run needs at least one worker");
        }
        if opts.collective != "tcp-ring" && opts.collective != "nccl" {
            bail!(
                "unknown collective `{}` (expected tcp-ring or nccl)",
                opts.collective
            );
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gpo-coordinator")
            .enable_all()
            .build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("binding the coordinator on {listen}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            run_id: new_run_id(),
            info,
            opts,
            inner: Mutex::new(Inner {
                phase: Phase::Waiting,
                error: None,
                workers: BTreeMap::new(),
                next_id: 0,
                generation: 0,
                members: Vec::new(),
                setup: None,
                round: None,
                step: 0,
                recent: VecDeque::new(),
            }),
            changed: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        });
        let svc = CoordinatorServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        runtime.spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("the coordinator's gRPC server stopped: {e}");
            }
        });
        runtime.spawn(monitor(shared.clone()));
        tracing::info!("coordinator of run {} listening on {addr}", shared.run_id);
        Ok(CoordinatorService {
            addr,
            shared,
            shutdown: Some(tx),
            runtime: Some(runtime),
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

    /// A handle that fails the run from another thread (e.g. when a spawned worker process
    /// dies before registering): waiters wake with `why` as their error.
    pub fn aborter(&self) -> impl Fn(String) + Send + Sync + 'static {
        let sh = self.shared.clone();
        move |why| {
            let mut inner = sh.lock();
            sh.fail(&mut inner, why);
        }
    }

    /// A dispatch for the training loop. `mirror` is a replica built from the run's seed
    /// (as every worker builds its own): the coordinator evaluates and checkpoints from it,
    /// refreshed from rank 0's state on `sync` steps. `None` in benchmark mode.
    pub fn dispatch(&self, mirror: Option<Replica>) -> GrpcDispatch {
        GrpcDispatch {
            shared: self.shared.clone(),
            mirror,
            timings: Vec::new(),
        }
    }

    /// Ends the run: every worker is told to shut down with `reason`, and this waits up to
    /// `grace` for the members to leave.
    pub fn finish(&self, failed: Option<String>, grace: Duration) {
        let sh = &self.shared;
        let mut inner = sh.lock();
        let reason = match failed {
            Some(e) => {
                sh.fail(&mut inner, e.clone());
                format!("the run failed: {e}")
            }
            None => {
                if !inner.phase.over() {
                    inner.phase = Phase::Done;
                }
                "the run finished".to_string()
            }
        };
        for w in inner.workers.values_mut() {
            if let Some(tx) = w.tx.take() {
                let _ = tx.try_send(Ok(pb::Assignment {
                    kind: Some(pb::assignment::Kind::Shutdown(pb::Shutdown {
                        reason: reason.clone(),
                    })),
                }));
            }
        }
        sh.wake();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            let left = inner
                .members
                .iter()
                .all(|id| inner.workers.get(id).is_none_or(|w| w.left.is_some()));
            if left {
                break;
            }
            inner = sh
                .changed
                .wait_timeout(inner, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
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

/// Fails the run when a member stops sending heartbeats.
async fn monitor(sh: Arc<Shared>) {
    let tick = (sh.opts.heartbeat_interval / 2).max(Duration::from_millis(20));
    loop {
        tokio::time::sleep(tick).await;
        let mut inner = sh.lock();
        if inner.phase.over() {
            return;
        }
        let now = Instant::now();
        let silent = inner.members.iter().copied().find(|id| {
            inner
                .workers
                .get(id)
                .is_some_and(|w| now - w.last_seen > sh.opts.heartbeat_timeout)
        });
        if let Some(id) = silent {
            let who = worker_label(&inner, id);
            let secs = sh.opts.heartbeat_timeout.as_secs_f64();
            sh.fail(
                &mut inner,
                format!("{who} sent no heartbeat for {secs:.1}s"),
            );
        }
    }
}

/// Timings of one distributed step.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepTimes {
    /// Wall seconds at the coordinator, from dispatch to the last result.
    pub step_s: f64,
    /// Slowest member's gradient seconds.
    pub compute_s: f64,
    /// Slowest member's all-reduce seconds.
    pub reduce_s: f64,
    /// Slowest member's optimizer seconds.
    pub optim_s: f64,
}

/// The [`Dispatch`] that runs steps on remote workers.
pub struct GrpcDispatch {
    shared: Arc<Shared>,
    mirror: Option<Replica>,
    timings: Vec<StepTimes>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl GrpcDispatch {
    /// Per-step timings so far.
    pub fn timings(&self) -> &[StepTimes] {
        &self.timings
    }

    fn wait<'a>(
        &self,
        mut inner: MutexGuard<'a, Inner>,
        deadline: Option<Instant>,
        what: &str,
        mut done: impl FnMut(&Inner) -> bool,
    ) -> Result<MutexGuard<'a, Inner>> {
        loop {
            if let Some(e) = &inner.error {
                bail!("{e}");
            }
            if done(&inner) {
                return Ok(inner);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                bail!("timed out waiting for {what}");
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the expected workers, then forms membership generation 1 and waits for
    /// its collective to be set up.
    pub fn form_membership(&mut self) -> Result<()> {
        let sh = self.shared.clone();
        let want = sh.opts.expected_workers;
        let inner = sh.lock();
        let deadline = sh.opts.registration_timeout.map(|t| Instant::now() + t);
        let ready = |i: &Inner| {
            i.workers
                .values()
                .filter(|w| w.tx.is_some() && w.left.is_none())
                .count()
                >= want
        };
        let mut inner = self
            .wait(
                inner,
                deadline,
                &format!("{want} workers to register"),
                ready,
            )
            .context("forming the membership")?;
        let members: Vec<u64> = inner
            .workers
            .iter()
            .filter(|(_, w)| w.tx.is_some() && w.left.is_none())
            .map(|(&id, _)| id)
            .take(want)
            .collect();
        inner.generation += 1;
        let generation = inner.generation;
        inner.members = members.clone();
        inner.setup = Some(Setup {
            generation,
            addrs: vec![None; want],
            nccl_id: Vec::new(),
            done: false,
        });
        inner.phase = Phase::Running;
        for (rank, id) in members.iter().enumerate() {
            let w = inner.workers.get_mut(id).expect("member exists");
            w.rank = Some(rank as u32);
            let msg = pb::Assignment {
                kind: Some(pb::assignment::Kind::Membership(pb::Membership {
                    generation,
                    rank: rank as u32,
                    world_size: want as u32,
                })),
            };
            let sent = w.tx.as_ref().map(|tx| tx.try_send(Ok(msg)));
            if !matches!(sent, Some(Ok(()))) {
                let who = worker_label(&inner, *id);
                sh.fail(&mut inner, format!("{who} closed its assignment stream"));
                bail!("{}", inner.error.clone().unwrap_or_default());
            }
        }
        sh.wake();
        tracing::info!("generation {generation}: {want} workers");
        let deadline = Some(Instant::now() + sh.opts.setup_timeout);
        let _inner = self
            .wait(inner, deadline, "the collective setup", |i| {
                i.setup.as_ref().is_some_and(|s| s.done)
            })
            .context("setting up the collective")?;
        Ok(())
    }

    /// Runs one step: splits `episodes` across the members by index, sends each its specs,
    /// and gathers the results. Returns the batch loss.
    pub fn run_step(
        &mut self,
        step: u64,
        total_steps: u64,
        episodes: &[EpisodeSpec],
        sync: bool,
    ) -> Result<f64> {
        if self.shared.lock().generation == 0 {
            self.form_membership()?;
        }
        let sh = self.shared.clone();
        let mut inner = sh.lock();
        let world = inner.members.len();
        let n = episodes.len();
        let generation = inner.generation;
        // Whole shards per worker, spread as evenly as the shard count allows.
        let sg = sh.info.shard_groups.max(1);
        let shards = n.div_ceil(sg);
        let bounds: Vec<usize> = (0..=world)
            .map(|r| (r * shards / world * sg).min(n))
            .collect();
        inner.round = Some(Round {
            step,
            generation,
            assigned: (0..world)
                .map(|r| (bounds[r + 1] - bounds[r]) as u32)
                .collect(),
            results: vec![None; world],
            want_state: sync,
            started: Instant::now(),
        });
        for r in 0..world {
            let id = inner.members[r];
            let msg = pb::Assignment {
                kind: Some(pb::assignment::Kind::Step(pb::StepAssignment {
                    generation,
                    step,
                    total_steps,
                    batch_groups: n as u32,
                    first_index: bounds[r] as u32,
                    episodes: episodes[bounds[r]..bounds[r + 1]]
                        .iter()
                        .map(wire::episode_to_pb)
                        .collect(),
                    want_state: sync && r == 0,
                })),
            };
            let w = inner.workers.get(&id).expect("member exists");
            let sent = w.tx.as_ref().map(|tx| tx.try_send(Ok(msg)));
            if !matches!(sent, Some(Ok(()))) {
                let who = worker_label(&inner, id);
                sh.fail(&mut inner, format!("{who} is not reading its assignments"));
                bail!("{}", inner.error.clone().unwrap_or_default());
            }
        }
        let mut inner = self.wait(inner, None, "step results", |i| {
            i.round
                .as_ref()
                .is_some_and(|r| r.results.iter().all(Option::is_some))
        })?;
        let round = inner.round.take().expect("round in progress");
        let step_s = round.started.elapsed().as_secs_f64();
        let results: Vec<pb::StepResult> = round.results.into_iter().flatten().collect();
        let fake = sh.opts.fake_compute_ms > 0;
        if !fake {
            if let Some(bad) = results
                .iter()
                .position(|r| r.params_sha256 != results[0].params_sha256)
            {
                let why = format!(
                    "replicas diverged at step {step}: rank {bad}'s parameters differ from rank 0's"
                );
                sh.fail(&mut inner, why.clone());
                bail!(why);
            }
        }
        let loss: f64 = results.iter().map(|r| r.loss_share).sum();
        let max = |f: fn(&pb::StepResult) -> f64| results.iter().map(f).fold(0.0, f64::max);
        let t = StepTimes {
            step_s,
            compute_s: max(|r| r.compute_s),
            reduce_s: max(|r| r.reduce_s),
            optim_s: max(|r| r.optim_s),
        };
        self.timings.push(t);
        inner.step = step;
        inner.recent.push_back(pb::StepTiming {
            step,
            step_s,
            compute_s: t.compute_s,
            reduce_s: t.reduce_s,
            loss,
        });
        while inner.recent.len() > 20 {
            inner.recent.pop_front();
        }
        drop(inner);
        if sync && !fake {
            let state = results[0].state.as_ref().context("rank 0 sent no state")?;
            let mirror = self
                .mirror
                .as_mut()
                .context("the coordinator has no mirror replica")?;
            let n = sh.info.param_count;
            let p = wire::f32_from_bytes("params", &state.params, n).map_err(anyhow::Error::msg)?;
            let adam = Adam {
                cfg: mirror.adam().cfg,
                m: wire::f32_from_bytes("adam_m", &state.adam_m, n).map_err(anyhow::Error::msg)?,
                v: wire::f32_from_bytes("adam_v", &state.adam_v, n).map_err(anyhow::Error::msg)?,
                t: state.adam_t,
            };
            if wire::params_sha256(&p) != results[0].params_sha256 {
                bail!("rank 0's state does not match its own checksum at step {step}");
            }
            mirror.set_state(&p, adam)?;
        }
        Ok(loss)
    }
}

impl Dispatch for GrpcDispatch {
    fn step(
        &mut self,
        step: u64,
        total_steps: u64,
        episodes: &[EpisodeSpec],
        sync: bool,
    ) -> Result<f64> {
        self.run_step(step, total_steps, episodes, sync)
    }

    fn model(&self) -> &Gpo {
        self.mirror
            .as_ref()
            .expect("a distributed training run has a mirror replica")
            .model()
    }

    fn checkpoint(
        &self,
        step: u64,
        config: serde_json::Value,
    ) -> Result<gpo_core::checkpoint::Checkpoint> {
        self.mirror
            .as_ref()
            .context("the coordinator has no mirror replica")?
            .checkpoint(step, config)
    }

    fn stats(&self) -> Option<serde_json::Value> {
        let t = &self.timings;
        let inner = self.shared.lock();
        let workers: Vec<serde_json::Value> = inner
            .members
            .iter()
            .enumerate()
            .map(|(rank, id)| {
                let w = &inner.workers[id];
                serde_json::json!({"rank": rank, "worker_id": id, "name": w.name})
            })
            .collect();
        let overhead: Vec<f64> = t
            .iter()
            .map(|s| (s.step_s - s.compute_s - s.optim_s).max(0.0))
            .collect();
        Some(serde_json::json!({
            "run_id": self.shared.run_id,
            "world_size": inner.members.len(),
            "generation": inner.generation,
            "collective": self.shared.opts.collective,
            "workers": workers,
            "median_step_s": median(t.iter().map(|s| s.step_s).collect()),
            "median_compute_s": median(t.iter().map(|s| s.compute_s).collect()),
            "median_reduce_s": median(t.iter().map(|s| s.reduce_s).collect()),
            "median_optim_s": median(t.iter().map(|s| s.optim_s).collect()),
            "median_overhead_s": median(overhead),
        }))
    }
}
