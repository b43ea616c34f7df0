//! `gpo worker --sweep ADDR`: a worker of a sweep's pool. It joins the sweep once, and for
//! each trial it is lent to (a gang at a time) joins that trial's run as an ordinary worker;
//! when the run ends it is back in the pool.
//!
//! Why it exists: on Kubernetes a sweep's compute is a set of long-lived worker pods, not
//! processes the sweep starts itself. The pool stream is also the worker's liveness: when it
//! breaks, the sweep stops lending the worker, and the worker reconnects (a sweep that
//! died and was started again gets its pool back). The stream's clean end means the sweep
//! is over, and the worker exits 0.

use anyhow::{Context, Result};
use gpo_proto::v1 as pb;
use gpo_worker::client::{self, WorkerOptions};
use std::time::{Duration, Instant};

/// Serves the sweep at `sweep` until it is over (or SIGTERM).
pub async fn run(
    sweep: &str,
    opts: WorkerOptions,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let mut lost_since: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let joined = async {
            let (ch, token) =
                client::channel(sweep, opts.connect_timeout, &opts.credentials).await?;
            let mut c = pb::sweep_pool_client::SweepPoolClient::with_interceptor(ch, token);
            let stream = c
                .join(pb::PoolJoinRequest {
                    name: opts.name.clone(),
                })
                .await
                .with_context(|| format!("joining the sweep pool at {sweep}"))?;
            anyhow::Ok(stream.into_inner())
        };
        let mut stream = tokio::select! {
            r = joined => match r {
                Ok(s) => s,
                Err(e) => {
                    let since = *lost_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > opts.connect_timeout {
                        return Err(e.context(format!(
                            "the sweep at {sweep} was unreachable for {:.0} s",
                            since.elapsed().as_secs_f64()
                        )));
                    }
                    tracing::warn!("sweep pool: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            _ = stop.changed() => return Ok(()),
        };
        lost_since = None;
        eprintln!("worker {}: in the pool of the sweep at {sweep}", opts.name);
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed() => return Ok(()),
            };
            match next {
                Ok(Some(a)) => {
                    let mut o = opts.clone();
                    o.coordinator = a.coordinator.clone();
                    eprintln!(
                        "worker {}: trial {} at {}",
                        opts.name, a.trial, a.coordinator
                    );
                    match client::run(o, crate::cmd::worker::loader(), stop.clone()).await {
                        Ok(r) => eprintln!(
                            "worker {}: trial {} ended: {} steps; {}",
                            opts.name, a.trial, r.steps, r.reason
                        ),
                        // The trial's own coordinator decides what a lost worker means; this
                        // worker goes back to the pool either way.
                        Err(e) => {
                            eprintln!("worker {}: trial {} failed here: {e:#}", opts.name, a.trial)
                        }
                    }
                }
                Ok(None) => {
                    eprintln!("worker {}: the sweep is over", opts.name);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!("sweep pool stream lost: {e}; reconnecting");
                    break;
                }
            }
        }
    }
}
