//! The `gpo worker` processes a local run starts itself (`gpo train --workers N`, and the
//! workers of `gpo embed`'s distributed phase): how they are started, with which flags and
//! without which inherited variables, and how they are reaped. Its own module because
//! `gpo embed` uses it too, apart from the coordinator's run.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `n` `gpo worker` processes for the coordinator at `addr` (with `extra` flags,
/// e.g. the embedder of an embedding phase).
pub(crate) fn spawn_workers(
    n: usize,
    addr: SocketAddr,
    token: Option<&Path>,
    metrics: Option<SocketAddr>,
    log_format: &str,
    extra: &[String],
) -> Result<Vec<Child>> {
    let exe = std::env::current_exe().context("locating the gpo binary")?;
    (0..n)
        .map(|i| {
            let mut c = Command::new(&exe);
            c.args(["worker", "--coordinator"])
                .arg(format!("http://{addr}"))
                .args(["--name", &format!("worker-{i}")])
                .args(["--log-format", log_format])
                .args(extra);
            if let Some(t) = token {
                c.arg("--token-file").arg(t);
            }
            if let Some(m) = metrics {
                c.args(["--metrics-addr", &m.to_string()]);
            }
            c.env_remove("GPO_WORKER_CONFIG")
                .env_remove("GPO_EMBEDDER")
                .env_remove("GPO_TLS_CERT")
                .env_remove("GPO_TLS_KEY")
                .env_remove("GPO_TLS_CA")
                .env_remove("GPO_TOKEN_FILE")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting worker process {i}"))
        })
        .collect()
}

/// Waits for the worker processes to exit (killing any still alive after `grace`);
/// returns a message if one failed.
pub(crate) fn reap(children: &mut [Child], grace: Duration) -> Option<String> {
    let deadline = Instant::now() + grace;
    let mut failed = None;
    for (i, c) in children.iter_mut().enumerate() {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() && failed.is_none() {
                        failed = Some(format!("worker process {i} failed ({st})"));
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    failed.get_or_insert(format!(
                        "worker process {i} did not exit after the run and was killed"
                    ));
                    break;
                }
            }
        }
    }
    failed
}
