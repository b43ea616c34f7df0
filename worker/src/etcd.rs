//! The run's keys in etcd, and the worker's side of them: finding the leader
//! coordinator's address, and a membership key under a lease that lives as long as the
//! worker does. The coordinator's side (the election and the state pointer) is
//! `gpo_coordinator::etcd`.
//!
//! Layout under `/gpo/<run name>/`: `leader` (the election; its value is the leader's
//! gRPC address), `state` (the run's state pointer, JSON), `workers/<name>` (one key per
//! live worker, on its own lease).

use anyhow::{bail, Context, Result};
use etcd_client::{Client, ConnectOptions, PutOptions};
use std::time::{Duration, Instant};

/// Where a run's keys live.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// The etcd endpoints (`host:port` or URLs).
    pub endpoints: Vec<String>,
    /// The run's name: its keys live under `/gpo/<name>/`.
    pub run_name: String,
    /// Seconds a lease lives without a keep-alive (a dead coordinator's leadership ends
    /// this long after it died).
    pub lease_ttl_s: i64,
}

impl EtcdConfig {
    /// Parses `--etcd URL[,URL…]`.
    pub fn new(endpoints: &str, run_name: &str, lease_ttl_s: i64) -> Result<EtcdConfig> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if endpoints.is_empty() {
            bail!("--etcd needs at least one endpoint, e.g. 127.0.0.1:2379");
        }
        if run_name.is_empty() || run_name.contains('/') {
            bail!("--run-name must be a non-empty name without `/`, got `{run_name}`");
        }
        if lease_ttl_s < 2 {
            bail!("--etcd-lease-ttl-s must be at least 2, got {lease_ttl_s}");
        }
        Ok(EtcdConfig {
            endpoints,
            run_name: run_name.to_string(),
            lease_ttl_s,
        })
    }
    /// The key prefix of the run.
    pub fn prefix(&self) -> String {
        format!("/gpo/{}/", self.run_name)
    }
    /// The election's name.
    pub fn leader_key(&self) -> String {
        format!("{}leader", self.prefix())
    }
    /// The state pointer's key.
    pub fn state_key(&self) -> String {
        format!("{}state", self.prefix())
    }
    /// A worker's membership key.
    pub fn worker_key(&self, name: &str) -> String {
        format!("{}workers/{name}", self.prefix())
    }
    /// Connects (each call has a 5 s deadline).
    pub async fn connect(&self) -> Result<Client> {
        self.connect_with(Some(Duration::from_secs(5))).await
    }

    /// Connects with a deadline on each call, or none (a campaign blocks until elected).
    pub async fn connect_with(&self, timeout: Option<Duration>) -> Result<Client> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(4));
        if let Some(t) = timeout {
            opts = opts.with_timeout(t);
        }
        Client::connect(&self.endpoints, Some(opts))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoints.join(",")))
    }
}

/// The leader coordinator's address, waiting up to `timeout` for one to be elected. With
/// `not`, an address to skip (the leader that was just lost, until its lease ends).
pub async fn leader_address(
    cfg: &EtcdConfig,
    timeout: Duration,
    not: Option<&str>,
) -> Result<String> {
    let start = Instant::now();
    let mut last: String;
    loop {
        match cfg.connect().await {
            Ok(mut c) => match c.leader(cfg.leader_key()).await {
                Ok(r) => {
                    if let Some(kv) = r.kv() {
                        let addr = String::from_utf8_lossy(kv.value()).into_owned();
                        if Some(addr.as_str()) != not {
                            return Ok(addr);
                        }
                        last = format!("the leader is still {addr}, which was lost");
                    } else {
                        last = "no coordinator is elected".into();
                    }
                }
                Err(e) => last = format!("{e}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= timeout {
            bail!(
                "no leader coordinator of run `{}` in etcd after {:.1}s: {last}",
                cfg.run_name,
                start.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps `/gpo/<run>/workers/<name>` alive on its own lease until dropped (the task is
/// aborted with it). Errors while etcd is away are retried.
pub struct Presence(tokio::task::JoinHandle<()>);

impl Drop for Presence {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Announces a worker in etcd.
pub fn announce(cfg: EtcdConfig, name: String, value: String) -> Presence {
    Presence(tokio::spawn(async move {
        loop {
            let r: Result<()> = async {
                let mut c = cfg.connect().await?;
                let lease = c.lease_grant(cfg.lease_ttl_s, None).await?.id();
                c.put(
                    cfg.worker_key(&name),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                let every = Duration::from_secs((cfg.lease_ttl_s as u64 / 3).max(1));
                loop {
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(r) if r.ttl() > 0 => {}
                        _ => bail!("the worker's lease expired"),
                    }
                    tokio::time::sleep(every).await;
                }
            }
            .await;
            if let Err(e) = r {
                tracing::warn!("etcd: keeping the worker's key alive: {e:#}; retrying");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }))
}
