//! The coordinator's side of etcd: it campaigns for the run's leadership (a standby
//! waits in the campaign until the leader's lease ends), keeps its lease alive, and
//! writes the run's state pointer (newest resume point, step, generation, config) in a
//! transaction guarded by its leadership key, so a deposed leader cannot write.
//!
//! Without `--etcd`, leadership is trivial and the state lives in the run folder alone;
//! [`Leadership`] is what the rest of the coordinator sees either way.

use anyhow::{bail, Context, Result};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use gpo_worker::etcd::EtcdConfig;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a new leader needs to continue the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatePointer {
    /// The run's output folder (its resume points are in `checkpoints/`).
    pub out: String,
    /// The step of the newest resume point.
    pub step: u64,
    /// The membership generation the run is at (the next leader numbers after it).
    pub generation: u64,
    /// SHA-256 of the run configuration (JSON), so a leader with another one refuses.
    pub config_sha256: String,
    /// The leader that wrote it (its gRPC address).
    pub leader: String,
}

/// This coordinator's leadership of the run.
pub struct Leadership {
    cfg: EtcdConfig,
    client: Client,
    leader_key: Vec<u8>,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Leadership {
    /// Campaigns for the run's leadership with `addr` as the value workers connect to;
    /// returns once elected (a standby waits here) with the state pointer, if any.
    pub async fn campaign(
        cfg: EtcdConfig,
        addr: &str,
    ) -> Result<(Leadership, Option<StatePointer>)> {
        let mut client = cfg.connect().await?;
        let lease = client
            .lease_grant(cfg.lease_ttl_s, None)
            .await
            .context("etcd: granting the leadership lease")?
            .id();
        let lost = Arc::new(AtomicBool::new(false));
        // Keep the lease alive while campaigning too: a standby's campaign key must last.
        let keeper = tokio::spawn(keep_alive(cfg.clone(), lease, lost.clone()));
        tracing::info!(
            "etcd: campaigning for run `{}` as {addr} (a standby waits here)",
            cfg.run_name
        );
        // The campaign call blocks until this coordinator is elected: no deadline on it.
        let resp = cfg
            .connect_with(None)
            .await?
            .campaign(cfg.leader_key(), addr, lease)
            .await
            .context("etcd: campaigning for the leadership")?;
        let leader_key = resp
            .leader()
            .context("etcd: the campaign returned no leader key")?
            .key()
            .to_vec();
        let pointer = match client.get(cfg.state_key(), None).await?.kvs().first() {
            Some(kv) => Some(
                serde_json::from_slice(kv.value())
                    .with_context(|| format!("etcd: {} is not a state pointer", cfg.state_key()))?,
            ),
            None => None,
        };
        tracing::info!("etcd: elected leader of run `{}`", cfg.run_name);
        Ok((
            Leadership {
                cfg,
                client,
                leader_key,
                lost,
                keeper,
            },
            pointer,
        ))
    }

    /// Whether the leadership was lost (the lease expired).
    pub fn lost(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    /// Writes the state pointer, only while this coordinator still holds the leadership.
    pub async fn write(&mut self, p: &StatePointer) -> Result<()> {
        let value = serde_json::to_vec(p)?;
        let txn = Txn::new()
            .when(vec![Compare::version(
                self.leader_key.clone(),
                CompareOp::Greater,
                0,
            )])
            .and_then(vec![TxnOp::put(self.cfg.state_key(), value, None)]);
        let r = self
            .client
            .txn(txn)
            .await
            .context("etcd: writing the state pointer")?;
        if !r.succeeded() {
            self.lost.store(true, Ordering::SeqCst);
            bail!(
                "etcd: this coordinator is no longer the leader; the state pointer was not written"
            );
        }
        Ok(())
    }
}

/// Keeps the lease alive; marks the leadership lost when etcd says the lease is gone.
/// While etcd is unreachable it retries: a restarted etcd keeps its leases.
async fn keep_alive(cfg: EtcdConfig, lease: i64, lost: Arc<AtomicBool>) {
    let every = Duration::from_millis((cfg.lease_ttl_s as u64 * 1000 / 3).max(300));
    loop {
        let r: Result<()> = async {
            let mut c = cfg.connect().await?;
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => {
                        lost.store(true, Ordering::SeqCst);
                        bail!("the leadership lease expired");
                    }
                }
                tokio::time::sleep(every).await;
            }
        }
        .await;
        if lost.load(Ordering::SeqCst) {
            tracing::error!("etcd: leadership lost: {r:?}");
            return;
        }
        if let Err(e) = r {
            tracing::warn!("etcd: keeping the leadership lease alive: {e:#}; retrying");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
