//! Shared by the end-to-end suites (chaos, Prometheus, security): real `gpo` processes, signals, the undisturbed reference
//! run, and the two claims every scenario checks (bitwise final state, exact ledger).
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Scenarios time heartbeats and deadlines: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub const STEPS: u64 = 80;

pub fn gpo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GPO_") {
            c.env_remove(k);
        }
    }
    c
}

/// The installed models' packages (`scripts/models.sh`; `$GPO_MODELS_DIR` overrides).
pub fn model_pkgs() -> PathBuf {
    std::env::var_os("GPO_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
        .join("pkgs")
}

/// `gpo sweep --spec SPEC [--out OUT]`.
pub fn sweep(spec: &Path, out: Option<&Path>) -> Command {
    let mut c = gpo();
    c.args(["sweep", "--spec"]).arg(spec);
    if let Some(o) = out {
        c.arg("--out").arg(o);
    }
    c
}

pub fn small() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/synthetic-small.toml")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The run's flags, the same for every scenario and the reference.
pub fn run_flags(c: &mut Command) -> &mut Command {
    c.arg("--config")
        .arg(small())
        .args(["--steps", &STEPS.to_string(), "--eval-every", "20"])
}

/// The undisturbed run, in one process (the result does not depend on the worker count),
/// computed once for every scenario.
pub fn reference(_dir: &Path) -> PathBuf {
    static REF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        compute_reference(&dir)
    })
    .clone()
}

pub fn compute_reference(dir: &Path) -> PathBuf {
    let out = dir.join("reference");
    let o = run_flags(gpo().arg("train"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "reference run failed:\n{}", text(&o));
    out
}

pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// A piped child under `name`.
    pub fn spawn(c: &mut Command, name: &str) -> Proc {
        Proc {
            child: c
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {name}: {e}")),
            name: name.into(),
        }
    }

    /// Waits for the process to exit, asserts that it succeeded, returns its output.
    pub fn finish(self, within: Duration) -> String {
        let name = self.name.clone();
        let (ok, t) = self.wait(within);
        assert!(ok, "{name} failed:\n{t}");
        t
    }

    /// Waits for the process to exit; returns (success, output).
    pub fn wait(mut self, within: Duration) -> (bool, String) {
        let deadline = Instant::now() + within;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{} did not finish within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        let out = child.wait_with_output().unwrap();
        (out.status.success(), text(&out))
    }
}

/// A coordinator for `workers` on a free port; `extra` flags after the run's.
pub fn coordinator(dir: &Path, workers: usize, extra: &[&str]) -> (Proc, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut c = gpo();
    c.arg("coordinator");
    if !extra.contains(&"--resume") {
        run_flags(&mut c);
    }
    let child = c
        .args(["--workers", &workers.to_string(), "--listen", "127.0.0.1:0"])
        .args(["--heartbeat-ms", "200", "--heartbeat-timeout-s", "3"])
        .args(extra)
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc {
        child,
        name: "coordinator".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    (p, addr)
}

pub fn worker(addr: &str, name: &str) -> Proc {
    Proc {
        child: gpo()
            .args(["worker", "--coordinator", addr, "--name", name])
            .args(["--connect-timeout-s", "30", "--threads", "1"])
            .args(["--io-timeout-s", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        name: name.into(),
    }
}

pub fn status(addr: &str) -> String {
    status_with(addr, &[])
}

/// `gpo status` with more flags (credentials).
pub fn status_with(addr: &str, flags: &[&str]) -> String {
    let o = gpo()
        .args(["status", "--coordinator", addr])
        .args(flags)
        .output()
        .unwrap();
    text(&o)
}

/// The committed step `gpo status` reports.
pub fn step_of(status: &str) -> Option<u64> {
    let rest = status.split(", step ").nth(1)?;
    rest.split('/').next()?.parse().ok()
}

/// Waits until the run has committed at least `step`; returns when it saw it.
pub fn wait_step(addr: &str, step: u64) -> Instant {
    poll_step(addr, step).unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_step`]; when the run never gets there, `procs` are killed and their own output
/// goes into the panic, so that a process that hung or gave up can be told apart.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn wait_step_or_show(addr: &str, step: u64, procs: &mut Vec<Proc>) -> Instant {
    poll_step(addr, step).unwrap_or_else(|e| {
        let mut out = e;
        for mut p in procs.drain(..) {
            let _ = p.child.kill();
            let name = p.name.clone();
            let (_, text) = p.wait(Duration::from_secs(10));
            out.push_str(&format!("\n--- {name}:\n{text}"));
        }
        panic!("{out}")
    })
}

fn poll_step(addr: &str, step: u64) -> Result<Instant, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(addr);
        if step_of(&s).is_some_and(|x| x >= step) {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the run never reached step {step}; last status:\n{s}"
            ));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

pub fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A checkpoint's content: its parsed header and its data bytes.
pub fn content(ckpt: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(ckpt).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The scenario's two claims: the final checkpoint is bitwise the reference's, and the
/// ledger is exact (every step once, in order, with the reference's loss). Returns the
/// summary.
pub fn assert_undisturbed(run: &Path, reference: &Path, what: &str) -> Value {
    let a = content(&run.join("last.safetensors"));
    let b = content(&reference.join("last.safetensors"));
    assert!(
        a.1 == b.1,
        "{what}: the final parameters differ from the undisturbed run's"
    );
    let s = json(&run.join("summary.json"));
    let r = json(&reference.join("summary.json"));
    let steps: Vec<u64> = s["loss_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "{what}: ledger");
    for (x, y) in s["loss_history"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r["loss_history"].as_array().unwrap())
    {
        let (x, y) = (x[1].as_f64().unwrap(), y[1].as_f64().unwrap());
        // Shares are summed in another grouping than one process's: float rounding only.
        assert!((x - y).abs() <= 1e-9 * y.abs(), "{what}: loss {x} vs {y}");
    }
    assert_eq!(s["eval_history"], r["eval_history"], "{what}: evaluations");
    s
}

pub fn report(what: &str, s: &Value) {
    for r in s["recoveries"].as_array().unwrap() {
        eprintln!(
            "chaos: {what}: step {} detect_s={:.3} recover_s={:.3} steps_recomputed={} ({})",
            r["step"],
            r["detect_s"].as_f64().unwrap_or(-1.0),
            r["recover_s"].as_f64().unwrap_or(-1.0),
            r["steps_recomputed"],
            r["reason"].as_str().unwrap_or("")
        );
    }
}

/// Waits for the coordinator, then for every worker: each must exit 0. `what` names the
/// coordinator in the failure message.
pub fn all_succeed(coord: Proc, workers: Vec<Proc>, what: &str) {
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "{what}:\n{out}");
    for w in workers {
        let name = w.name.clone();
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker {name} failed:\n{out}");
    }
}
