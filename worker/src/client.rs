//! A distributed worker: registers with a coordinator over gRPC, loads the run's data from
//! the path the coordinator names, builds its replica from the run's seed, and serves
//! sessions ([`crate::session`]) until the run ends. A worker dropped from the run (fenced
//! after a stall, or cut off) registers again with its replica kept; a lost coordinator is
//! reconnected to within `connect_timeout`; SIGTERM leaves cleanly.

use crate::replica::Replica;
use crate::session::{self, Ended};
use crate::wire;
use anyhow::{bail, Context, Result};
use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_core::model::GpoConfig;
use gpo_core::optim::AdamConfig;
use gpo_proto::v1 as pb;
use gpo_proto::v1::coordinator_client::CoordinatorClient;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Default limit of a gRPC message either way (a replica's full state is 12 bytes per
/// parameter; see `gpo_coordinator::security::DEFAULT_MAX_MESSAGE_BYTES` for the sizing).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A client of the coordinator: every request carries the run token, when there is one.
pub type Client = CoordinatorClient<
    tonic::service::interceptor::InterceptedService<Channel, gpo_ops::auth::ClientToken>,
>;

/// Deadline of every unary call to the coordinator (the collective setup, which waits for
/// the other members, gets `setup_timeout` on top).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's address: `host:port` or `http://host:port`.
    pub coordinator: String,
    /// This worker's name (shown by `gpo status`).
    pub name: String,
    /// How long to keep retrying (with backoff) while the coordinator is unreachable,
    /// at start and after losing it.
    pub connect_timeout: Duration,
    /// The address the ring listener binds (port 0: any free port).
    pub ring_bind: String,
    /// The address peers are told to connect to (`HOST` or `HOST:PORT`); `None`: the bound
    /// address, or this host's address on the route to the coordinator when the listener
    /// is on every interface (see [`crate::ring_addr`]).
    pub ring_advertise: Option<String>,
    /// Timeout of every ring read and write, and of ring setup.
    pub io_timeout: Duration,
    /// Gradient threads; `None` takes the coordinator's hint, else the machine's cores.
    pub threads: Option<usize>,
    /// What this worker offers.
    pub capabilities: pb::Capabilities,
    /// With etcd, the coordinator is whichever is elected (`coordinator` may be empty),
    /// and the worker keeps a membership key alive.
    pub etcd: Option<crate::etcd::EtcdConfig>,
    /// TLS files and the run token this worker presents to the coordinator.
    pub credentials: gpo_ops::tls::ClientCredentials,
    /// Largest gRPC message either way.
    pub max_message_bytes: usize,
    /// Refusals by reason (a stranger on the ring port): `gpo_auth_failures_total`.
    pub auth_failures: gpo_ops::auth::AuthFailures,
    /// The Prometheus families the session feeds.
    pub metrics: gpo_ops::metrics::WorkerMetrics,
    /// Ready once the run's data and embeddings are loaded (`/readyz`).
    pub health: gpo_ops::http::Health,
    /// Where data fetched from the coordinator is kept (when the run's data path cannot
    /// be read here), one folder per data fingerprint, reused by later joins.
    pub cache_dir: std::path::PathBuf,
}

/// Loads the survey and point features a run names (the CLI's I/O edge).
pub type DataLoader = Arc<dyn Fn(&pb::DataSource) -> Result<(Survey, PointFeatures)> + Send + Sync>;

/// What a worker did.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    /// The run it served.
    pub run_id: String,
    /// Its last id in that run.
    pub worker_id: u64,
    /// Steps it ran (committed or not).
    pub steps: u64,
    /// Times it registered again after being dropped or losing the coordinator.
    pub rejoins: u64,
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

/// An error with every cause it carries, for people ("transport error" alone says
/// nothing).
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// Connects to the coordinator at `addr` without credentials (see [`connect_with`]).
pub async fn connect(addr: &str, timeout: Duration) -> Result<Client> {
    connect_with(addr, timeout, &Default::default(), MAX_MESSAGE_BYTES).await
}

/// Connects to the coordinator at `addr` (`host:port` or a URL), presenting `creds` (TLS
/// when it names TLS files, the token on every request), retrying with exponential
/// backoff (50 ms doubling to 2 s) until `timeout` has passed. A malformed address fails
/// at once.
pub async fn connect_with(
    addr: &str,
    timeout: Duration,
    creds: &gpo_ops::tls::ClientCredentials,
    max_message_bytes: usize,
) -> Result<Client> {
    let (ch, interceptor) = channel(addr, timeout, creds).await?;
    Ok(CoordinatorClient::with_interceptor(ch, interceptor)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// A channel to the gRPC server at `addr` with the interceptor that presents `creds`' token,
/// retrying as [`connect_with`] does (shared by the coordinator's and a sweep pool's clients).
pub async fn channel(
    addr: &str,
    timeout: Duration,
    creds: &gpo_ops::tls::ClientCredentials,
) -> Result<(tonic::transport::Channel, gpo_ops::auth::ClientToken)> {
    let mut url = crate::addr::coordinator_url(addr).map_err(anyhow::Error::msg)?;
    let tls = if creds.tls.any() {
        if let Some(rest) = url.strip_prefix("http://") {
            url = format!("https://{rest}");
        }
        let host = url
            .parse::<tonic::transport::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_string()))
            .with_context(|| format!("`{addr}` names no host"))?;
        creds.tls.client(&host)?
    } else {
        None
    };
    let interceptor = creds.interceptor()?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("`{addr}` is not a coordinator address"))?;
    if let Some(cfg) = tls {
        endpoint = endpoint
            .tls_config(cfg)
            .context("the worker's TLS configuration (--tls-ca, --tls-cert, --tls-key)")?;
    }
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok((ch, interceptor)),
            Err(e) => {
                if start.elapsed() >= timeout {
                    bail!(
                        "cannot reach the coordinator at {url} after {:.1}s: {}",
                        start.elapsed().as_secs_f64(),
                        causes(&e)
                    );
                }
                tracing::info!(
                    "coordinator at {url} not reachable yet ({}); retrying in {wait:?}",
                    causes(&e)
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Connects to the run's coordinator: the elected one when the worker uses etcd (a lost
/// leader's address is tried until a new one is elected), else `opts.coordinator`.
pub async fn connect_coordinator(opts: &WorkerOptions) -> Result<Client> {
    let (creds, max) = (&opts.credentials, opts.max_message_bytes);
    let Some(cfg) = &opts.etcd else {
        return connect_with(&opts.coordinator, opts.connect_timeout, creds, max).await;
    };
    let start = Instant::now();
    loop {
        let left = opts.connect_timeout.saturating_sub(start.elapsed());
        let addr = crate::etcd::leader_address(cfg, left, None).await?;
        match connect_with(&addr, Duration::from_millis(500), creds, max).await {
            Ok(c) => {
                tracing::info!("coordinator of run `{}` is {addr}", cfg.run_name);
                return Ok(c);
            }
            Err(e) if start.elapsed() < opts.connect_timeout => {
                tracing::info!("the elected coordinator {addr} is not reachable yet ({e:#})");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A deadline on one call.
pub(crate) async fn within<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "{what}: no answer from the coordinator within {:.0}s",
            d.as_secs_f64()
        ))),
    }
}

async fn register(
    opts: &WorkerOptions,
    client: &mut Client,
    fresh: bool,
    holds: Option<(u64, String)>,
) -> Result<pb::RegisterResponse> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    let mut told = false;
    loop {
        let req = pb::RegisterRequest {
            name: opts.name.clone(),
            capabilities: Some(opts.capabilities.clone()),
            run_id: String::new(),
            fresh,
            holds_step: holds.as_ref().map_or(0, |h| h.0),
            holds_sha256: holds.as_ref().map(|h| h.1.clone()).unwrap_or_default(),
        };
        match within(CALL_TIMEOUT, "registering", client.register(req)).await {
            Ok(r) => return Ok(r.into_inner()),
            // The port serves the run's embedding phase (`gpo.v1.Embedding`) until the
            // store is complete; the run's service follows on it, however long that takes.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                if !told {
                    tracing::info!(
                        "the coordinator is filling the run's embedding store; waiting to register"
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) if retry_registration(s.code()) && start.elapsed() < opts.connect_timeout => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(s) => bail!("registering with the coordinator: {}", s.message()),
        }
    }
}

/// Whether a registration that failed with `code` is tried again (until the connect
/// timeout). Besides an unreachable or slow coordinator, that is a connection cut under
/// the call: when the embedding phase ends, its server closes the connections it holds
/// and the run's service takes the port over, and a call in flight then fails as tonic
/// reports a broken connection, `Unknown` ("transport error") or `Cancelled`.
fn retry_registration(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// Builds the replica a registration describes on the run's data (already checked
/// against the coordinator's fingerprint by [`crate::data_fetch::obtain`]).
fn build_replica(
    opts: &WorkerOptions,
    reg: &pb::RegisterResponse,
    (survey, features): (Survey, PointFeatures),
) -> Result<Replica> {
    let spec: ReplicaSpec = serde_json::from_str(&reg.config_json)
        .context("the coordinator sent a run configuration this worker cannot read")?;
    let features = if spec.model.variant.reads_prior() {
        let groups: Vec<usize> = reg.prior_groups.iter().map(|&g| g as usize).collect();
        if groups.is_empty() || groups.iter().any(|&g| g >= survey.groups.len()) {
            bail!(
                "the run's `{}` variant reads the population prior, and the coordinator named {} meta-training groups for it (the survey has {})",
                spec.model.variant.name(),
                groups.len(),
                survey.groups.len()
            );
        }
        features.with_prior(&survey, &groups)
    } else {
        features
    };
    let mut r = Replica::new(
        spec.model,
        spec.adam,
        spec.seed,
        Arc::new(survey),
        Arc::new(features),
        crate::device::for_capability(&opts.capabilities.device)?,
    )?;
    let threads = opts
        .threads
        .or((reg.threads > 0).then_some(reg.threads as usize));
    if let Some(t) = threads {
        r.set_threads(t);
    }
    r.set_shard_groups(spec.shard_groups);
    let count = r.model().params.count();
    if count != reg.param_count as usize {
        bail!(
            "this worker's module has {count} parameters, the coordinator's {}",
            reg.param_count
        );
    }
    Ok(r)
}

/// Runs a worker until the run ends. `Ok` when it finished or this worker was stopped
/// (`stop` turned true: it leaves cleanly); `Err` when the run failed or this worker
/// could not go on (the coordinator is told why first, when it can be reached).
pub async fn run(
    opts: WorkerOptions,
    loader: DataLoader,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<WorkerReport> {
    let mut client = connect_coordinator(&opts).await?;
    let _presence = opts.etcd.clone().map(|cfg| {
        let host = opts.capabilities.hostname.clone();
        crate::etcd::announce(cfg, opts.name.clone(), host)
    });
    let listener = Arc::new(
        TcpListener::bind(&opts.ring_bind)
            .with_context(|| format!("binding the ring listener on {}", opts.ring_bind))?,
    );
    let opts = with_ring_advertised(opts, listener.local_addr()?)?;
    let mut replica: Option<Replica> = None;
    let mut fingerprint = String::new();
    let mut fresh = true;
    let mut steps = 0u64;
    let mut rejoins = 0u64;
    loop {
        let holds = match (&replica, fresh) {
            (Some(r), false) => Some((r.applied_step(), wire::params_sha256(&r.flat_params()?))),
            _ => None,
        };
        let reg = register(&opts, &mut client, fresh, holds).await?;
        gpo_ops::logs::context::set_run(&reg.run_id);
        tracing::info!(
            "registered as worker {} of run {}",
            reg.worker_id,
            reg.run_id
        );
        let fake = reg.fake_compute_ms > 0;
        if !fake && (replica.is_none() || fingerprint != reg.data_fingerprint) {
            let cache = crate::data_cache::DataCache::new(&opts.cache_dir);
            let data = crate::data_fetch::obtain(&mut client, &reg, &loader, &cache)
                .await
                .context("loading the run's data")?;
            let (o, r2) = (opts.clone(), reg.clone());
            replica = Some(
                tokio::task::spawn_blocking(move || build_replica(&o, &r2, data))
                    .await
                    .context("loading the data panicked")??,
            );
            fingerprint = reg.data_fingerprint.clone();
        }
        opts.health.set_ready();
        let ended = session::serve(
            &opts,
            &mut client,
            &reg,
            &listener,
            &mut replica,
            &mut steps,
            stop.clone(),
        )
        .await;
        let report = |reason: String| WorkerReport {
            run_id: reg.run_id.clone(),
            worker_id: reg.worker_id,
            steps,
            rejoins,
            reason,
        };
        match ended {
            Ok(Ended::Shutdown { reason, failed }) => {
                if failed {
                    bail!("{reason}");
                }
                return Ok(report(reason));
            }
            Ok(Ended::Stopped) => {
                session::leave(&mut client, &reg, "the worker was stopped (SIGTERM)").await;
                return Ok(report("stopped (SIGTERM); left the run".into()));
            }
            Ok(Ended::Dropped(why)) => {
                tracing::warn!("dropped from the run ({why}); registering again");
                // A stream that just ended may be a leader that died, not a drop: with
                // etcd, register with whoever leads now, instead of retrying a dead
                // address until the connect timeout while a standby takes over.
                if opts.etcd.is_some() {
                    client = connect_coordinator(&opts)
                        .await
                        .with_context(|| format!("after being dropped ({why})"))?;
                }
                fresh = false;
                rejoins += 1;
            }
            Ok(Ended::CoordinatorLost(why)) => {
                tracing::warn!("lost the coordinator ({why}); reconnecting");
                client = connect_coordinator(&opts)
                    .await
                    .with_context(|| format!("after losing the coordinator ({why})"))?;
                fresh = false;
                rejoins += 1;
            }
            Err(e) => {
                let reason = format!("worker failed: {e:#}");
                session::leave(&mut client, &reg, &reason).await;
                return Err(e);
            }
        }
    }
}

/// Fixes the ring address this worker advertises, once, and warns when it cannot work for a
/// run whose coordinator is on another host.
fn with_ring_advertised(
    mut opts: WorkerOptions,
    bound: std::net::SocketAddr,
) -> Result<WorkerOptions> {
    use crate::ring_addr::{advertised, route_to, url_host};
    let target = if opts.coordinator.is_empty() {
        opts.etcd
            .as_ref()
            .and_then(|e| e.endpoints.first().cloned())
            .unwrap_or_default()
    } else {
        opts.coordinator.clone()
    };
    let url = crate::addr::coordinator_url(&target).unwrap_or_default();
    let host = url_host(&url).to_string();
    let port = url
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok());
    let route = port.and_then(|p| route_to(&host, p));
    let a = advertised(bound, opts.ring_advertise.as_deref(), &host, route)
        .map_err(anyhow::Error::msg)?;
    if let Some(w) = &a.warning {
        tracing::warn!("{w}");
    }
    opts.ring_advertise = Some(a.address);
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    /// A connection that breaks or is not there yet is tried again; a refusal is final.
    #[test]
    fn registration_retries_broken_connections_not_refusals() {
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(super::retry_registration(c), "{c:?}");
        }
        for c in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::NotFound,
        ] {
            assert!(!super::retry_registration(c), "{c:?}");
        }
    }
}
