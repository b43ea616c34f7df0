//! The `nccl_through_coordinator` check: a real `gpo train --workers 1 --collective nccl`
//! child process on the GPU. Its own module because it is the only check that runs the
//! binary as a whole (coordinator, worker and the `CollectiveSetup` exchange) rather than
//! calling into the library.

use super::Outcome;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `gpo train --workers 1 --collective nccl` on `device`: the real coordinator hands rank
/// 0's unique id back through `CollectiveSetup`, the worker joins the communicator and
/// trains a few steps on the GPU.
pub(super) fn through_coordinator(device: &str, timeout: Duration) -> Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let exe = std::env::current_exe().context("locating the gpo binary")?;
    let log = dir.path().join("train.log");
    let mut child = std::process::Command::new(exe)
        .args([
            "train",
            "--workers",
            "1",
            "--collective",
            "nccl",
            "--device",
            device,
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--out",
        ])
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()
        .context("starting gpo train")?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let summary: Option<Value> = std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let v = json!({
        "command": format!("gpo train --workers 1 --collective nccl --device {device} --steps 6 --eval-every 3"),
        "exit": status.map(|s| s.to_string()),
        "seconds": t.elapsed().as_secs_f64(),
        "summary_best_step": summary.as_ref().and_then(|s| s.get("best_step").cloned()),
        "log_tail": tail,
    });
    let verdict = match status {
        None => Err(format!("timed out after {} s", timeout.as_secs())),
        Some(s) if !s.success() => Err(format!("gpo train exited with {s}")),
        Some(_) if summary.is_none() => Err("no summary.json".into()),
        Some(_) => Ok(()),
    };
    Ok((v, verdict))
}
