//! A distributed worker: registers with a coordinator over gRPC, loads the run's data from
//! the shared path the coordinator names, builds its replica from the run's seed, sets up
//! the collective for each membership generation, and runs the steps it is assigned.

use crate::collective::{Collective, Local};
use crate::replica::Replica;
use crate::ring::{run_tag, RingId, TcpRing};
use crate::wire;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_core::model::GpoConfig;
use gpo_core::optim::AdamConfig;
use gpo_proto::v1 as pb;
use gpo_proto::v1::coordinator_client::CoordinatorClient;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message either side accepts (a replica's full state is 12 bytes per
/// parameter).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// This worker's name (shown by `gpo status`).
    pub name: String,
    /// How long to keep retrying (with backoff) while the coordinator is unreachable.
    pub connect_timeout: Duration,
    /// The address the ring listener binds and advertises (port 0: any free port).
    pub ring_bind: String,
    /// Timeout of every ring read and write, and of ring setup.
    pub io_timeout: Duration,
    /// Gradient threads; `None` takes the coordinator's hint, else the machine's cores.
    pub threads: Option<usize>,
    /// What this worker offers.
    pub capabilities: pb::Capabilities,
}

/// Loads the survey and point features a run names (the CLI's I/O edge).
pub type DataLoader = Arc<dyn Fn(&pb::DataSource) -> Result<(Survey, PointFeatures)> + Send + Sync>;

/// What a worker did.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    /// The run it served.
    pub run_id: String,
    /// Its id in that run.
    pub worker_id: u64,
    /// Steps it ran.
    pub steps: u64,
    /// Why it stopped.
    pub reason: String,
}

/// The parts of a run's configuration a replica needs.
#[derive(serde::Deserialize)]
struct ReplicaSpec {
    seed: u64,
    model: GpoConfig,
    adam: AdamConfig,
    #[serde(default = "one")]
    shard_groups: usize,
}

fn one() -> usize {
    1
}

/// Connects to the coordinator, retrying with exponential backoff (50 ms doubling to 2 s)
/// until `timeout` has passed.
pub async fn connect(url: &str, timeout: Duration) -> Result<CoordinatorClient<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("`{url}` is not a coordinator URL (expected http://host:port)"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(CoordinatorClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES))
            }
            Err(e) => {
                if start.elapsed() >= timeout {
                    bail!(
                        "cannot reach the coordinator at {url} after {:.1}s: {e}",
                        start.elapsed().as_secs_f64()
                    );
                }
                tracing::info!(
                    "coordinator at {url} not reachable yet ({e}); retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

struct Work {
    replica: Option<Replica>,
    comm: Box<dyn Collective>,
}

/// Runs a worker until the coordinator shuts it down (Ok) or something fails (Err; the
/// coordinator is told why before returning).
pub async fn run(opts: WorkerOptions, loader: DataLoader) -> Result<WorkerReport> {
    let mut client = connect(&opts.coordinator, opts.connect_timeout).await?;
    let reg = {
        let start = Instant::now();
        let mut wait = Duration::from_millis(50);
        loop {
            let req = pb::RegisterRequest {
                name: opts.name.clone(),
                capabilities: Some(opts.capabilities.clone()),
                run_id: String::new(),
            };
            match client.register(req).await {
                Ok(r) => break r.into_inner(),
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && start.elapsed() < opts.connect_timeout =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(s) => bail!("registering with the coordinator: {}", s.message()),
            }
        }
    };
    let run_id = reg.run_id.clone();
    let worker_id = reg.worker_id;
    tracing::info!("registered as worker {worker_id} of run {run_id}");
    let result = serve(&opts, &mut client, &reg, loader).await;
    let reason = match &result {
        Ok(r) => r.reason.clone(),
        Err(e) => format!("worker failed: {e:#}"),
    };
    let _ = client
        .leave(pb::LeaveRequest {
            run_id,
            worker_id,
            reason,
        })
        .await;
    result
}

async fn serve(
    opts: &WorkerOptions,
    client: &mut CoordinatorClient<Channel>,
    reg: &pb::RegisterResponse,
    loader: DataLoader,
) -> Result<WorkerReport> {
    let run_id = reg.run_id.clone();
    let worker_id = reg.worker_id;
    let fake = (reg.fake_compute_ms > 0).then(|| Duration::from_millis(reg.fake_compute_ms));
    let n_params = reg.param_count as usize;

    // The replica, built from the run's seed over data read from the shared path.
    let replica = match fake {
        Some(_) => None,
        None => {
            let spec: ReplicaSpec = serde_json::from_str(&reg.config_json)
                .context("the coordinator sent a run configuration this worker cannot read")?;
            let source = reg
                .data
                .clone()
                .context("the coordinator named no data source")?;
            let fingerprint = reg.data_fingerprint.clone();
            let threads = opts
                .threads
                .or((reg.threads > 0).then_some(reg.threads as usize));
            let replica = tokio::task::spawn_blocking(move || -> Result<Replica> {
                let (survey, features) = loader(&source).context("loading the run's data")?;
                let mine = wire::data_fingerprint(&survey, &features);
                if mine != fingerprint {
                    bail!("this worker's data (fingerprint {mine}) differs from the coordinator's ({fingerprint}): the dataset or embedding store at the shared path is not the same");
                }
                let mut r = Replica::new(
                    spec.model,
                    spec.adam,
                    spec.seed,
                    Arc::new(survey),
                    Arc::new(features),
                    Device::Cpu,
                )?;
                if let Some(t) = threads {
                    r.set_threads(t);
                }
                r.set_shard_groups(spec.shard_groups);
                Ok(r)
            })
            .await??;
            let count = replica.model().params.count();
            if count != n_params {
                bail!("this worker's module has {count} parameters, the coordinator's {n_params}");
            }
            Some(replica)
        }
    };

    let listener = Arc::new(
        TcpListener::bind(&opts.ring_bind)
            .with_context(|| format!("binding the ring listener on {}", opts.ring_bind))?,
    );
    let ring_addr = listener.local_addr()?;

    // Heartbeats, with the last finished step.
    let last_step = Arc::new(AtomicU64::new(0));
    let heartbeat = {
        let mut c = client.clone();
        let (run_id, last_step) = (run_id.clone(), last_step.clone());
        let every = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let req = pb::HeartbeatRequest {
                    run_id: run_id.clone(),
                    worker_id,
                    step: last_step.load(Ordering::Relaxed),
                };
                match c.heartbeat(req).await {
                    Ok(r) if r.get_ref().shutdown => break,
                    Ok(_) => {}
                    Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
                }
            }
        })
    };
    let _stop_heartbeat = AbortOnDrop(heartbeat);

    let mut stream = client
        .assignments(pb::AssignmentsRequest {
            run_id: run_id.clone(),
            worker_id,
        })
        .await
        .map_err(|s| anyhow::anyhow!("opening the assignment stream: {}", s.message()))?
        .into_inner();
    let mut work = Some(Work {
        replica,
        comm: Box::new(Local),
    });
    let mut generation = 0u64;
    let mut steps = 0u64;
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("the assignment stream failed: {}", s.message()))?;
        let Some(msg) = msg else {
            bail!("the coordinator closed the assignment stream without a shutdown");
        };
        match msg.kind {
            Some(pb::assignment::Kind::Membership(m)) => {
                let nccl_id = if reg.collective == "nccl" && m.rank == 0 {
                    nccl_unique_id()?
                } else {
                    Vec::new()
                };
                let setup = client
                    .collective_setup(pb::CollectiveSetupRequest {
                        run_id: run_id.clone(),
                        worker_id,
                        generation: m.generation,
                        ring_address: ring_addr.to_string(),
                        nccl_unique_id: nccl_id,
                        buffer_len: reg.param_count,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("collective setup: {}", s.message()))?
                    .into_inner();
                generation = setup.generation;
                let mut w = work.take().context("worker state lost")?;
                let listener = listener.clone();
                let (collective, run_tag) = (reg.collective.clone(), run_tag(&run_id));
                let io_timeout = opts.io_timeout;
                let fake = fake.is_some();
                let w = tokio::task::spawn_blocking(move || -> Result<Work> {
                    w.comm = make_collective(
                        &collective,
                        fake,
                        &setup,
                        &listener,
                        RingId {
                            run_tag,
                            generation: setup.generation,
                            buffer_len: n_params,
                        },
                        io_timeout,
                    )?;
                    Ok(w)
                })
                .await??;
                work = Some(w);
                tracing::info!(
                    "generation {generation}: rank {} of {}",
                    m.rank,
                    m.world_size
                );
            }
            Some(pb::assignment::Kind::Step(a)) => {
                if a.generation != generation {
                    bail!(
                        "step {} belongs to generation {}, this worker is set up for {generation}",
                        a.step,
                        a.generation
                    );
                }
                let w = work.take().context("worker state lost")?;
                let (w, result) = match fake {
                    Some(d) => {
                        tokio::time::sleep(d).await;
                        let r = pb::StepResult {
                            step: a.step,
                            compute_s: d.as_secs_f64(),
                            episodes: a.episodes.len() as u32,
                            ..Default::default()
                        };
                        (w, r)
                    }
                    None => tokio::task::spawn_blocking(move || step(w, a))
                        .await
                        .context("the step panicked")??,
                };
                work = Some(w);
                let mut result = result;
                result.run_id = run_id.clone();
                result.worker_id = worker_id;
                result.generation = generation;
                let s = result.step;
                client
                    .report_step(result)
                    .await
                    .map_err(|st| anyhow::anyhow!("reporting step {s}: {}", st.message()))?;
                steps += 1;
                last_step.store(s, Ordering::Relaxed);
            }
            Some(pb::assignment::Kind::Shutdown(s)) => {
                return Ok(WorkerReport {
                    run_id,
                    worker_id,
                    steps,
                    reason: s.reason,
                });
            }
            None => bail!("the coordinator sent an empty assignment"),
        }
    }
}

/// Runs one assigned step on the replica (blocking).
fn step(mut w: Work, a: pb::StepAssignment) -> Result<(Work, pb::StepResult)> {
    let replica = w.replica.as_mut().context("no replica")?;
    let survey = replica.survey().clone();
    let episodes = a
        .episodes
        .iter()
        .map(|e| wire::episode_from_pb(e, &survey))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("step {}", a.step))?;
    let out = replica
        .step(
            &episodes,
            a.batch_groups as usize,
            a.step,
            a.total_steps,
            w.comm.as_mut(),
        )
        .with_context(|| format!("step {}", a.step))?;
    let flat = replica.flat_params()?;
    let state = a.want_state.then(|| {
        let adam = replica.adam();
        pb::ReplicaState {
            params: wire::f32_bytes(&flat),
            adam_m: wire::f32_bytes(&adam.m),
            adam_v: wire::f32_bytes(&adam.v),
            adam_t: adam.t,
        }
    });
    let result = pb::StepResult {
        step: a.step,
        loss_share: out.loss_share,
        compute_s: out.compute_s,
        reduce_s: out.reduce_s,
        optim_s: out.optim_s,
        params_sha256: wire::params_sha256(&flat),
        state,
        episodes: episodes.len() as u32,
        ..Default::default()
    };
    Ok((w, result))
}

fn make_collective(
    kind: &str,
    fake: bool,
    setup: &pb::CollectiveSetupResponse,
    listener: &TcpListener,
    id: RingId,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    if fake {
        return Ok(Box::new(Local));
    }
    match kind {
        "tcp-ring" => {
            let addrs = setup
                .ring_addresses
                .iter()
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .with_context(|| format!("ring address `{a}` is not host:port"))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Box::new(TcpRing::connect(
                setup.rank as usize,
                &addrs,
                listener,
                id,
                timeout,
            )?))
        }
        "nccl" => nccl_collective(setup, id.buffer_len),
        other => bail!("unknown collective `{other}` (expected tcp-ring or nccl)"),
    }
}

#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>> {
    crate::nccl::unique_id()
}

#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>> {
    bail!("the run uses NCCL, but this worker was built without the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn nccl_collective(
    setup: &pb::CollectiveSetupResponse,
    buffer_len: usize,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(crate::nccl::Nccl::new(
        setup.rank as usize,
        setup.world_size as usize,
        &setup.nccl_unique_id,
        buffer_len,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_collective(
    _setup: &pb::CollectiveSetupResponse,
    _buffer_len: usize,
) -> Result<Box<dyn Collective>> {
    bail!("the run uses NCCL, but this worker was built without the `cuda` feature")
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
