//! The coordinator's gRPC service (`gpo.v1.Coordinator`): a thin adapter that checks each
//! request's run id and sizes, turns it into a [`crate::machine::Event`], and answers with
//! what the machine replied. Workers' streams are watched so that a closed connection
//! (a killed process) becomes an event within milliseconds; a ticker task feeds the clock.
//!
//! Requests are validated before they touch the run: a wrong run id is
//! `FAILED_PRECONDITION`, a stale generation `ABORTED` (a fenced worker), an unknown or
//! dropped worker `NOT_FOUND` (it must register again), a wrong buffer size
//! `INVALID_ARGUMENT`, each with a message naming what was expected. Worker-scoped calls
//! must carry the registration's secret, and every string has a length limit
//! ([`crate::security`]); the port's credentials (TLS, mTLS, the token) are checked before
//! any of this, by the server's interceptor ([`crate::server`]).

use crate::machine::{Event, Reject, Report};
use crate::shared::{Link, Shared};
use gpo_proto::v1 as pb;
use gpo_proto::v1::coordinator_server::Coordinator;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status};

/// How the coordinator runs a distributed job.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Workers to wait for before the first step.
    pub expected_workers: usize,
    /// The run goes on while at least this many workers are live (default 1).
    pub min_workers: usize,
    /// How often workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// Floor of the step deadline (the deadline is max(3 × median step, this)).
    pub step_deadline_min: Duration,
    /// How long to wait for the expected workers to register (`None`: forever).
    pub registration_timeout: Option<Duration>,
    /// How long the run may stay paused below `min_workers` (`None`: forever).
    pub max_wait: Option<Duration>,
    /// How long the collective setup of a generation may take.
    pub setup_timeout: Duration,
    /// "tcp-ring" or "nccl".
    pub collective: String,
    /// Gradient threads each worker should use (0: the worker's default).
    pub worker_threads: u32,
    /// Non-zero: workers sleep this long per step instead of computing (benchmark mode).
    pub fake_compute_ms: u64,
    /// The credentials the port demands, the message-size limit, the refusals' counters.
    pub security: crate::security::Security,
    /// The Prometheus families the executor feeds (registered by whoever serves them).
    pub metrics: gpo_ops::metrics::CoordinatorMetrics,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            expected_workers: 1,
            min_workers: 1,
            heartbeat_interval: Duration::from_millis(1000),
            heartbeat_timeout: Duration::from_secs(5),
            step_deadline_min: Duration::from_secs(5),
            registration_timeout: None,
            max_wait: None,
            setup_timeout: Duration::from_secs(60),
            collective: "tcp-ring".into(),
            worker_threads: 0,
            fake_compute_ms: 0,
            security: Default::default(),
            metrics: Default::default(),
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
    /// [`gpo_worker::wire::data_fingerprint`] of the coordinator's data.
    pub fingerprint: String,
    /// Parameters of the module.
    pub param_count: usize,
    /// Steps in the run (for status).
    pub total_steps: u64,
    /// Episodes per gradient shard: each worker gets whole shards.
    pub shard_groups: usize,
    /// The meta-training groups whose population prior the model variant reads (empty:
    /// the faithful module reads none).
    pub prior_groups: Vec<usize>,
    /// The committed step the run starts from (0, or a checkpoint's on resume).
    pub start_step: u64,
    /// Generations are numbered after this one (a restarted coordinator's last).
    pub start_generation: u64,
    /// The data files served to workers that cannot read the data path (`None`: none,
    /// as for the synthetic survey). `data` lists them.
    pub files: Option<Arc<crate::data_files::DataFiles>>,
}

fn status_of(r: Reject) -> Status {
    match r {
        Reject::UnknownWorker(m) => Status::not_found(m),
        Reject::Stale(m) => Status::aborted(m),
        Reject::NotMember(m) => Status::permission_denied(m),
        Reject::Precondition(m) => Status::failed_precondition(m),
        Reject::Invalid(m) => Status::invalid_argument(m),
        Reject::Duplicate(m) => Status::already_exists(m),
    }
}

/// Hands an event to the machine; a refusal of a dropped worker says why it was dropped.
fn handled(sh: &Shared, core: &mut crate::shared::Core, ev: Event) -> Result<Option<u64>, Status> {
    let id = match &ev {
        Event::Heartbeat { id }
        | Event::Setup { id, .. }
        | Event::StepResult { id, .. }
        | Event::StreamOpened { id } => Some(*id),
        _ => None,
    };
    sh.handle(core, ev).map_err(|e| match (&e, id) {
        (Reject::UnknownWorker(_), Some(id)) => match Shared::dropped_reason(core, id) {
            Some(why) => Status::not_found(format!(
                "worker {id} was dropped from the run ({why}); register again"
            )),
            None => status_of(e),
        },
        _ => status_of(e),
    })
}

/// The gRPC service.
pub(crate) struct Service {
    pub(crate) shared: Arc<Shared>,
}

impl Service {
    fn check_run(&self, run_id: &str) -> Result<(), Status> {
        crate::security::check_run(
            &self.shared.opts.security.failures,
            &self.shared.run_id,
            run_id,
        )
    }

    /// The run id and the registration secret of a worker-scoped call.
    fn check_worker(&self, run_id: &str, id: u64, secret: &str) -> Result<(), Status> {
        self.check_run(run_id)?;
        let core = self.shared.lock();
        crate::security::check_worker(
            &self.shared.opts.security.failures,
            id,
            core.worker_secrets.get(&id),
            secret,
        )
    }

    fn event(&self, ev: Event) -> Result<Option<u64>, Status> {
        let mut core = self.shared.lock();
        handled(&self.shared, &mut core, ev)
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        let sh = &self.shared;
        crate::security::check_registration(&req)?;
        if !req.run_id.is_empty() {
            self.check_run(&req.run_id)?;
        }
        let secret =
            gpo_ops::auth::random_token().map_err(|e| Status::internal(format!("{e:#}")))?;
        let id = {
            let mut core = sh.lock();
            let holds = if req.fresh {
                Some((0, None))
            } else if !req.holds_sha256.is_empty() {
                Some((req.holds_step, Some(req.holds_sha256)))
            } else {
                None
            };
            sh.note_name(&mut core, &req.name);
            let ev = Event::Register {
                name: req.name,
                holds,
            };
            let id = sh
                .handle(&mut core, ev)
                .map_err(status_of)?
                .ok_or_else(|| Status::internal("registration gave no id"))?;
            if let Some(c) = req.capabilities {
                core.names_caps.insert(id, c);
            }
            core.worker_secrets.insert(id, secret.clone());
            tracing::info!("{} registered", core.machine.label(id));
            id
        };
        Ok(Response::new(pb::RegisterResponse {
            run_id: sh.run_id.clone(),
            worker_id: id,
            config_json: sh.info.config_json.clone(),
            prior_groups: sh.info.prior_groups.iter().map(|&g| g as u64).collect(),
            data: Some(sh.info.data.clone()),
            data_fingerprint: sh.info.fingerprint.clone(),
            param_count: sh.info.param_count as u64,
            heartbeat_interval_ms: sh.opts.heartbeat_interval.as_millis() as u64,
            collective: sh.opts.collective.clone(),
            threads: sh.opts.worker_threads,
            fake_compute_ms: sh.opts.fake_compute_ms,
            worker_secret: secret,
            ring_secret: sh.ring_secret.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        self.check_worker(&req.run_id, req.worker_id, &req.worker_secret)?;
        let mut core = self.shared.lock();
        let over = core.machine.phase().over();
        if !over {
            handled(
                &self.shared,
                &mut core,
                Event::Heartbeat { id: req.worker_id },
            )?;
        }
        Ok(Response::new(pb::HeartbeatResponse {
            generation: core.machine.generation(),
            shutdown: over,
        }))
    }

    type AssignmentsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Assignment, Status>>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let req = req.into_inner();
        self.check_worker(&req.run_id, req.worker_id, &req.worker_secret)?;
        let id = req.worker_id;
        let (tx, rx) = mpsc::channel(64);
        let dropped = Arc::new(Notify::new());
        {
            let mut core = self.shared.lock();
            if core.links.contains_key(&id) {
                return Err(Status::already_exists(format!(
                    "worker {id} already has an assignment stream"
                )));
            }
            if core.machine.workers().contains_key(&id) {
                core.links.insert(
                    id,
                    Link {
                        tx: tx.clone(),
                        dropped: dropped.clone(),
                    },
                );
            }
            if let Err(e) = handled(&self.shared, &mut core, Event::StreamOpened { id }) {
                core.links.remove(&id);
                return Err(e);
            }
        }
        // Watch the stream: a closed connection is a lost worker, noticed at once.
        let sh = self.shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {
                    let mut core = sh.lock();
                    if core.links.get(&id).is_some_and(|l| Arc::ptr_eq(&l.dropped, &dropped)) {
                        core.links.remove(&id);
                        let _ = sh.handle(&mut core, Event::StreamClosed { id });
                    }
                }
                _ = dropped.notified() => {}
            }
        });
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
        self.check_run(&req.run_id)?;
        crate::security::limit(
            "ring_address",
            &req.ring_address,
            crate::security::MAX_FIELD_BYTES,
        )?;
        if req.buffer_len as usize != sh.info.param_count {
            return Err(Status::invalid_argument(format!(
                "wrong buffer size: the worker would all-reduce {} values, the run's module has {} parameters",
                req.buffer_len, sh.info.param_count
            )));
        }
        self.check_worker(&req.run_id, req.worker_id, &req.worker_secret)?;
        {
            let core = sh.lock();
            let rank = core.machine.rank_of(req.worker_id);
            if sh.opts.collective == "nccl"
                && rank == Some(0)
                && req.generation == core.machine.generation()
                && req.nccl_unique_id.is_empty()
            {
                return Err(Status::invalid_argument(
                    "rank 0 must bring NCCL's unique id",
                ));
            }
        }
        let addr = if sh.opts.collective == "nccl" && !req.nccl_unique_id.is_empty() {
            hex_of(&req.nccl_unique_id)
        } else {
            req.ring_address.clone()
        };
        self.event(Event::Setup {
            id: req.worker_id,
            generation: req.generation,
            addr,
        })?;
        let deadline = Instant::now() + sh.opts.setup_timeout;
        loop {
            let notified = sh.notify.notified();
            {
                let core = sh.lock();
                if core.machine.phase().over() {
                    return Err(Status::aborted(format!(
                        "the run is over: {}",
                        core.machine.error().unwrap_or("finished")
                    )));
                }
                if let Some((members, addrs)) = core.setups.get(&req.generation) {
                    let rank = members
                        .iter()
                        .position(|&m| m == req.worker_id)
                        .ok_or_else(|| Status::permission_denied("not a member"))?;
                    let nccl = sh.opts.collective == "nccl";
                    return Ok(Response::new(pb::CollectiveSetupResponse {
                        generation: req.generation,
                        rank: rank as u32,
                        world_size: members.len() as u32,
                        ring_addresses: if nccl { Vec::new() } else { addrs.clone() },
                        nccl_unique_id: if nccl {
                            bytes_of_hex(&addrs[0])
                        } else {
                            Vec::new()
                        },
                    }));
                }
                if core.machine.generation() != req.generation {
                    return Err(Status::aborted(format!(
                        "generation {} was superseded by {}",
                        req.generation,
                        core.machine.generation()
                    )));
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
        let mut r = req.into_inner();
        let sh = &self.shared;
        self.check_run(&r.run_id)?;
        crate::security::limit(
            "params_sha256",
            &r.params_sha256,
            crate::security::MAX_FIELD_BYTES,
        )?;
        if r.error.len() > crate::security::MAX_FIELD_BYTES {
            let cut = (0..=crate::security::MAX_FIELD_BYTES)
                .rev()
                .find(|&i| r.error.is_char_boundary(i))
                .unwrap_or(0);
            r.error.truncate(cut);
        }
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
        self.check_worker(&r.run_id, r.worker_id, &r.worker_secret)?;
        let result = if r.error.is_empty() {
            Ok(Report {
                digest: r.params_sha256.clone(),
                loss_share: r.loss_share,
                episodes: r.episodes as usize,
                has_state: r.state.is_some(),
            })
        } else {
            Err(std::mem::take(&mut r.error))
        };
        let ok = result.is_ok();
        let (id, generation, step) = (r.worker_id, r.generation, r.step);
        let mut core = sh.lock();
        // Keep the result before the machine sees it: accepting the last one commits.
        if ok {
            core.results.insert(id, r);
        }
        let reply = handled(
            sh,
            &mut core,
            Event::StepResult {
                id,
                generation,
                step,
                result,
            },
        );
        if let Err(e) = reply {
            if ok && core.results.get(&id).is_some_and(|x| x.step == step) {
                core.results.remove(&id);
            }
            return Err(e);
        }
        Ok(Response::new(pb::StepAck { waiting_for: 0 }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = req.into_inner();
        self.check_worker(&req.run_id, req.worker_id, &req.worker_secret)?;
        let reason: String = req.reason.chars().take(256).collect();
        tracing::info!("worker {} leaves: {reason}", req.worker_id);
        self.event(Event::Leave {
            id: req.worker_id,
            reason,
        })?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    type FetchDataFileStream = crate::data_fetch::ChunkStream;

    async fn fetch_data_file(
        &self,
        req: Request<pb::FetchDataFileRequest>,
    ) -> Result<Response<Self::FetchDataFileStream>, Status> {
        let req = req.into_inner();
        self.check_run(&req.run_id)?;
        let s = crate::data_fetch::stream(self.shared.info.files.as_ref(), &req.root, &req.path)?;
        Ok(Response::new(s))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        Ok(Response::new(crate::status::run_status(&self.shared)))
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn bytes_of_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}
