//! The embedding phase's gRPC adapter: serves `gpo.v1.Embedding` on the coordinator's port
//! while the run's embedding store lacks texts, carrying requests to the pure
//! [`crate::embed_job::EmbedJob`] and assembling the vectors workers stream back. The caller
//! (the CLI) takes the finished batches in plan order with [`EmbedServer::take_writable`]
//! and writes the store; this module does no file I/O.

use crate::embed_job::{Delivery, EmbedJob, Lease, Refusal};
use crate::security::Security;
use anyhow::Result;
use gpo_proto::v1 as pb;
use gpo_proto::v1::embedding_server::{Embedding, EmbeddingServer};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

/// The gRPC health service name of the embedding phase.
pub const EMBED_HEALTH_SERVICE: &str = "gpo.v1.Embedding";

/// What the workers are to embed: planned batches of token ids, each embedded as one
/// forward.
#[derive(Debug, Clone)]
pub struct EmbedPlan {
    /// The embedder fingerprint every worker must have.
    pub embedder: String,
    /// Width of every vector.
    pub dim: usize,
    /// `batches[b][i]`: the token ids of text `i` of batch `b`, in plan order.
    pub batches: Vec<Vec<Vec<u32>>>,
    /// A training run follows on the same port.
    pub then_train: bool,
}

/// Timing of the phase.
#[derive(Debug, Clone, Copy)]
pub struct EmbedTiming {
    /// How often workers heartbeat while they compute.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker's batches go to the others.
    pub heartbeat_timeout: Duration,
}

impl Default for EmbedTiming {
    fn default() -> Self {
        EmbedTiming {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
        }
    }
}

struct State {
    job: EmbedJob,
    /// Accepted batches not yet taken by the writer.
    results: BTreeMap<usize, Vec<Vec<f32>>>,
    /// Batches being streamed, by (worker, batch).
    partial: HashMap<(u64, usize), Vec<Option<Vec<f32>>>>,
    duplicates: u64,
}

struct Inner {
    plan: EmbedPlan,
    timing: EmbedTiming,
    start: Instant,
    state: Mutex<State>,
}

impl Inner {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn status(r: Refusal) -> Status {
    match r {
        Refusal::Fingerprint { .. } => Status::failed_precondition(r.to_string()),
        Refusal::UnknownWorker(_) => Status::not_found(r.to_string()),
        Refusal::UnknownBatch(_) => Status::invalid_argument(r.to_string()),
    }
}

struct Service(Arc<Inner>);

#[tonic::async_trait]
impl Embedding for Service {
    async fn embed_join(
        &self,
        req: Request<pb::EmbedJoinRequest>,
    ) -> Result<Response<pb::EmbedJoinResponse>, Status> {
        let r = req.into_inner();
        if r.name.len() > 256 || r.embedder.len() > 4096 {
            return Err(Status::invalid_argument("name or embedder is too long"));
        }
        let now = self.0.now();
        let mut st = self.0.lock();
        let id = st.job.join(&r.name, &r.embedder, now).map_err(|e| {
            tracing::warn!("embedding: refused worker `{}`: {e}", r.name);
            status(e)
        })?;
        tracing::info!(
            "embedding: worker `{}` joined as {id} ({} batches at a time)",
            r.name,
            r.parallel.max(1)
        );
        Ok(Response::new(pb::EmbedJoinResponse {
            worker_id: id,
            dim: self.0.plan.dim as u32,
            heartbeat_interval_ms: self.0.timing.heartbeat_interval.as_millis() as u64,
            done: st.job.is_complete(),
            then_train: self.0.plan.then_train,
            batches: self.0.plan.batches.len() as u64,
        }))
    }

    async fn embed_lease(
        &self,
        req: Request<pb::EmbedLeaseRequest>,
    ) -> Result<Response<pb::EmbedLeaseResponse>, Status> {
        let r = req.into_inner();
        let now = self.0.now();
        let mut st = self.0.lock();
        let lease = st
            .job
            .lease(r.worker_id, r.max_batches.clamp(1, 64) as usize, now)
            .map_err(status)?;
        let then_train = self.0.plan.then_train;
        Ok(Response::new(match lease {
            Lease::Done => {
                // Told it is over: it leaves the phase.
                st.job.leave(r.worker_id);
                pb::EmbedLeaseResponse {
                    done: true,
                    then_train,
                    ..Default::default()
                }
            }
            Lease::Wait => pb::EmbedLeaseResponse {
                wait_ms: 200,
                then_train,
                ..Default::default()
            },
            Lease::Batches(bs) => pb::EmbedLeaseResponse {
                batches: bs
                    .into_iter()
                    .map(|b| pb::EmbedBatch {
                        batch: b as u32,
                        texts: self.0.plan.batches[b]
                            .iter()
                            .map(|ids| pb::TokenIds { ids: ids.clone() })
                            .collect(),
                    })
                    .collect(),
                then_train,
                ..Default::default()
            },
        }))
    }

    async fn embed_put(
        &self,
        req: Request<Streaming<pb::EmbedChunk>>,
    ) -> Result<Response<pb::EmbedPutAck>, Status> {
        let mut stream = req.into_inner();
        let dim = self.0.plan.dim;
        let mut ack = pb::EmbedPutAck::default();
        while let Some(c) = stream.message().await? {
            let b = c.batch as usize;
            let Some(texts) = self.0.plan.batches.get(b) else {
                return Err(status(Refusal::UnknownBatch(b)));
            };
            let (first, count) = (c.first as usize, c.count as usize);
            if first + count > texts.len() || c.values.len() != count * dim * 4 {
                return Err(Status::invalid_argument(format!(
                    "chunk of batch {b}: texts {first}..{} of {}, {} bytes for dim {dim} \
                     (expected {})",
                    first + count,
                    texts.len(),
                    c.values.len(),
                    count * dim * 4
                )));
            }
            let vectors: Vec<Vec<f32>> = c
                .values
                .chunks_exact(dim * 4)
                .map(|v| {
                    v.chunks_exact(4)
                        .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                        .collect()
                })
                .collect();
            if let Some((i, _)) = vectors
                .iter()
                .enumerate()
                .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
            {
                return Err(Status::invalid_argument(format!(
                    "chunk of batch {b}: text {} has a non-finite value",
                    first + i
                )));
            }
            let now = self.0.now();
            let mut st = self.0.lock();
            st.job.seen(c.worker_id, now).map_err(status)?;
            let slot = st
                .partial
                .entry((c.worker_id, b))
                .or_insert_with(|| vec![None; texts.len()]);
            for (i, v) in vectors.into_iter().enumerate() {
                slot[first + i] = Some(v);
            }
            if slot.iter().all(Option::is_some) {
                let full: Vec<Vec<f32>> = st
                    .partial
                    .remove(&(c.worker_id, b))
                    .expect("present")
                    .into_iter()
                    .map(|v| v.expect("complete"))
                    .collect();
                match st.job.deliver(c.worker_id, b, now).map_err(status)? {
                    Delivery::Accepted => {
                        st.results.insert(b, full);
                        ack.accepted += 1;
                    }
                    Delivery::Duplicate => {
                        st.duplicates += 1;
                        ack.duplicate += 1;
                    }
                }
            }
        }
        Ok(Response::new(ack))
    }

    async fn embed_heartbeat(
        &self,
        req: Request<pb::EmbedHeartbeatRequest>,
    ) -> Result<Response<pb::EmbedHeartbeatResponse>, Status> {
        let r = req.into_inner();
        let now = self.0.now();
        let known = self.0.lock().job.seen(r.worker_id, now).is_ok();
        Ok(Response::new(pb::EmbedHeartbeatResponse { known }))
    }
}

/// A running embedding phase. Dropping it stops the service.
pub struct EmbedServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl EmbedServer {
    /// Serves `plan` on `listener` (a clone of the coordinator's, so the run's service can
    /// take the same port afterwards) with the run's security.
    pub fn start_on(
        listener: std::net::TcpListener,
        plan: EmbedPlan,
        sec: &Security,
        timing: EmbedTiming,
    ) -> Result<EmbedServer> {
        let (runtime, listener, addr) =
            crate::server::serving_runtime(listener, "gpo-embed-coord")?;
        let tokens = plan
            .batches
            .iter()
            .map(|b| b.iter().map(|t| t.len() as u64).sum())
            .collect();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                job: EmbedJob::new(
                    plan.embedder.clone(),
                    tokens,
                    timing.heartbeat_timeout.as_millis() as u64,
                ),
                results: BTreeMap::new(),
                partial: HashMap::new(),
                duplicates: 0,
            }),
            plan,
            timing,
            start: Instant::now(),
        });
        let (tls, auth) = sec.server_side()?;
        let svc = EmbeddingServer::new(Service(inner.clone()))
            .max_decoding_message_size(sec.max_message_bytes)
            .max_encoding_message_size(sec.max_message_bytes);
        let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);
        let (health, health_svc) = tonic_health::server::health_reporter();
        runtime.block_on(async {
            health
                .set_service_status(EMBED_HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
                .await;
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let failures = sec.failures.clone();
        runtime.spawn(async move {
            let _health = health;
            let router = tonic::transport::Server::builder()
                .add_service(health_svc)
                .add_service(svc);
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) =
                gpo_ops::tls_accept::serve_router(router, listener, tls, failures, shutdown).await
            {
                tracing::error!("the embedding phase's gRPC server stopped: {e}");
            }
        });
        let ticker = inner.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = ticker.now();
                let mut st = ticker.lock();
                for (w, name) in st.job.tick(now) {
                    tracing::warn!(
                        "embedding: worker `{name}` ({w}) was silent for longer than {:?}; \
                         its batches go to the others",
                        ticker.timing.heartbeat_timeout
                    );
                    st.partial.retain(|(pw, _), _| *pw != w);
                }
                if st.job.is_complete() && st.job.members() == 0 {
                    return;
                }
            }
        });
        Ok(EmbedServer {
            addr,
            inner,
            shutdown: Some(tx),
            runtime: Some(runtime),
        })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accepted batches that may be written now, in plan order (each taken once).
    pub fn take_writable(&self) -> Vec<(usize, Vec<Vec<f32>>)> {
        let mut st = self.inner.lock();
        let range = st.job.writable();
        range
            .map(|b| (b, st.results.remove(&b).expect("accepted batches are held")))
            .collect()
    }

    /// (done, total) batches.
    pub fn progress(&self) -> (usize, usize) {
        self.inner.lock().job.progress()
    }

    /// Whether every batch is done.
    pub fn is_complete(&self) -> bool {
        self.inner.lock().job.is_complete()
    }

    /// Workers in the phase now.
    pub fn members(&self) -> usize {
        self.inner.lock().job.members()
    }

    /// Each worker's share, and the duplicate deliveries dropped.
    pub fn shares(&self) -> (Vec<crate::embed_job::Share>, u64) {
        let st = self.inner.lock();
        (st.job.shares(), st.duplicates)
    }

    /// Once complete: waits (at most `grace`) until every worker has been told, then stops.
    pub fn finish(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.members() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for EmbedServer {
    fn drop(&mut self) {
        self.stop();
    }
}
