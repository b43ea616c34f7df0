//! The chaos suite: real `gpo` processes on loopback, faults injected with real signals.
//!
//! Each scenario asserts that the final checkpoint equals the undisturbed run's bitwise
//! and that the step ledger is exact (every step once, in order, with the undisturbed
//! run's losses), and prints its detection time, recovery time and steps recomputed
//! (`chaos: …` lines; BENCHMARKS.md collects them). The scenarios run one at a time: they
//! time heartbeats and deadlines, and two of them at once on two cores would starve each
//! other.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const STEPS: u64 = 80;

fn gpo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GPO_") {
            c.env_remove(k);
        }
    }
    c
}

fn small() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/synthetic-small.toml")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The run's flags, the same for every scenario and the reference.
fn run_flags(c: &mut Command) -> &mut Command {
    c.arg("--config")
        .arg(small())
        .args(["--steps", &STEPS.to_string(), "--eval-every", "20"])
}

/// The undisturbed run, in one process (the result does not depend on the worker count),
/// computed once for every scenario.
fn reference(_dir: &Path) -> PathBuf {
    static REF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        compute_reference(&dir)
    })
    .clone()
}

fn compute_reference(dir: &Path) -> PathBuf {
    let out = dir.join("reference");
    let o = run_flags(gpo().arg("train"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "reference run failed:\n{}", text(&o));
    out
}

struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Waits for the process to exit; returns (success, output).
    fn wait(mut self, within: Duration) -> (bool, String) {
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
fn coordinator(dir: &Path, workers: usize, extra: &[&str]) -> (Proc, String) {
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

fn worker(addr: &str, name: &str) -> Proc {
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

fn status(addr: &str) -> String {
    let o = gpo()
        .args(["status", "--coordinator", addr])
        .output()
        .unwrap();
    text(&o)
}

/// The committed step `gpo status` reports.
fn step_of(status: &str) -> Option<u64> {
    let rest = status.split(", step ").nth(1)?;
    rest.split('/').next()?.parse().ok()
}

/// Waits until the run has committed at least `step`; returns when it saw it.
fn wait_step(addr: &str, step: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(addr);
        if step_of(&s).is_some_and(|x| x >= step) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the run never reached step {step}; last status:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A checkpoint's content: its parsed header and its data bytes.
fn content(ckpt: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(ckpt).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The scenario's two claims: the final checkpoint is bitwise the reference's, and the
/// ledger is exact (every step once, in order, with the reference's loss). Returns the
/// summary.
fn assert_undisturbed(run: &Path, reference: &Path, what: &str) -> Value {
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

fn report(what: &str, s: &Value) {
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

#[test]
fn sigkill_of_a_worker_mid_step_continues_on_the_survivors() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let (coord, addr) = coordinator(dir.path(), 3, &[]);
    let ws: Vec<Proc> = ["a", "b", "c"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 15);
    let mut ws = ws;
    let victim = ws.pop().unwrap();
    victim.signal("KILL");
    drop(victim);
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "the coordinator failed:\n{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "a surviving worker failed:\n{out}");
    }
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "SIGKILL");
    report("sigkill", &s);
    let rec = s["recoveries"].as_array().unwrap();
    assert_eq!(rec.len(), 1, "{rec:?}");
    let why = rec[0]["reason"].as_str().unwrap();
    assert!(why.contains("`c`") && why.contains("closed"), "{why}");
    assert!(rec[0]["detect_s"].as_f64().unwrap() < 1.0, "{rec:?}");
    assert_eq!(s["distributed"]["world_size"], 2);
    assert_eq!(s["distributed"]["generation"], 2);
}

#[test]
fn a_stopped_worker_is_fenced_then_rejoins() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let (coord, addr) = coordinator(dir.path(), 3, &[]);
    let ws: Vec<Proc> = ["a", "b", "c"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 10);
    ws[2].signal("STOP");
    // Past the 3 s heartbeat timeout, then wake it: it is fenced, registers again and
    // receives the committed state.
    std::thread::sleep(Duration::from_secs(5));
    ws[2].signal("CONT");
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "the coordinator failed:\n{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker failed:\n{out}");
    }
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "SIGSTOP");
    report("sigstop", &s);
    let rec = s["recoveries"].as_array().unwrap();
    assert!(!rec.is_empty());
    assert!(
        rec[0]["reason"].as_str().unwrap().contains("no heartbeat"),
        "{rec:?}"
    );
    let c = &s["distributed"]["counters"];
    assert!(c["joins"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(s["distributed"]["world_size"], 3, "it rejoined");
}

#[test]
fn a_worker_joins_in_the_middle_of_the_run() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let (coord, addr) = coordinator(dir.path(), 2, &[]);
    let mut ws: Vec<Proc> = ["a", "b"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 15);
    ws.push(worker(&addr, "late"));
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "the coordinator failed:\n{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker failed:\n{out}");
    }
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "join");
    assert_eq!(s["distributed"]["world_size"], 3);
    assert_eq!(s["distributed"]["counters"]["joins"], 1);
    assert!(s["recoveries"].as_array().unwrap().is_empty());
}

#[test]
fn sigterm_of_the_coordinator_then_resume() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let (coord, addr) = coordinator(dir.path(), 2, &[]);
    let ws: Vec<Proc> = ["a", "b"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 25);
    coord.signal("TERM");
    let (ok, out) = coord.wait(Duration::from_secs(60));
    assert!(ok, "SIGTERM must exit 0:\n{out}");
    assert!(out.contains("resume"), "{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker failed:\n{out}");
    }
    let run = dir.path().join("run");
    let stopped = json(&run.join("summary.json"))["stopped_at"]
        .as_u64()
        .unwrap();
    assert!((25..STEPS).contains(&stopped));
    let (coord, addr) = coordinator(dir.path(), 2, &["--resume", run.to_str().unwrap()]);
    let ws: Vec<Proc> = ["c", "d"].iter().map(|n| worker(&addr, n)).collect();
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "the resumed coordinator failed:\n{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker failed:\n{out}");
    }
    let s = assert_undisturbed(&run, &reference, "SIGTERM + resume");
    assert_eq!(s["resumed_from"].as_u64().unwrap(), stopped);
    eprintln!("chaos: sigterm: stopped at {stopped}, resumed, 0 steps recomputed");
}

#[test]
fn sigkill_of_every_process_then_resume_from_the_checkpoint() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let (coord, addr) = coordinator(dir.path(), 2, &["--checkpoint-every", "7"]);
    let ws: Vec<Proc> = ["a", "b"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 30);
    let killed_after = step_of(&status(&addr)).unwrap();
    coord.signal("KILL");
    for w in &ws {
        w.signal("KILL");
    }
    drop(ws);
    drop(coord);
    let run = dir.path().join("run");
    let (coord, addr) = coordinator(dir.path(), 2, &["--resume", run.to_str().unwrap()]);
    let ws: Vec<Proc> = ["c", "d"].iter().map(|n| worker(&addr, n)).collect();
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "the resumed coordinator failed:\n{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker failed:\n{out}");
    }
    let s = assert_undisturbed(&run, &reference, "SIGKILL all + resume");
    let from = s["resumed_from"].as_u64().unwrap();
    assert!(from <= killed_after && from >= 7, "resumed from {from}");
    eprintln!(
        "chaos: sigkill-all: killed after step {killed_after}, resumed from {from}, {} steps recomputed",
        killed_after - from
    );
}

#[test]
fn a_coordinator_paused_past_the_heartbeat_timeout_blames_nobody() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let (coord, addr) = coordinator(dir.path(), 2, &[]);
    let ws: Vec<Proc> = ["a", "b"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 15);
    coord.signal("STOP");
    std::thread::sleep(Duration::from_secs(6));
    coord.signal("CONT");
    let (ok, out) = coord.wait(Duration::from_secs(180));
    assert!(ok, "the coordinator failed:\n{out}");
    for w in ws {
        let (ok, out) = w.wait(Duration::from_secs(30));
        assert!(ok, "worker failed:\n{out}");
    }
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "coordinator SIGSTOP");
    assert!(
        s["recoveries"].as_array().unwrap().is_empty(),
        "{}",
        s["recoveries"]
    );
}

#[test]
fn a_worker_exits_nonzero_when_the_run_fails() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (coord, addr) = coordinator(dir.path(), 2, &["--min-workers", "2", "--max-wait-s", "1"]);
    let mut ws: Vec<Proc> = ["a", "b"].iter().map(|n| worker(&addr, n)).collect();
    wait_step(&addr, 5);
    let s = status(&addr);
    assert!(s.contains("generations:"), "{s}");
    ws.pop().unwrap().signal("KILL");
    let (ok, out) = coord.wait(Duration::from_secs(60));
    assert!(!ok, "the run must fail below --min-workers:\n{out}");
    assert!(out.contains("--max-wait"), "{out}");
    let (ok, out) = ws.pop().unwrap().wait(Duration::from_secs(30));
    assert!(!ok, "the surviving worker must exit non-zero:\n{out}");
    assert!(out.contains("the run failed"), "{out}");
}

#[test]
fn sigterm_of_a_single_process_run_then_resume() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let run = dir.path().join("run");
    let child = run_flags(gpo().arg("train"))
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc {
        child,
        name: "gpo train".into(),
    };
    // The first resume point is written at the first evaluation (step 20).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("checkpoints").exists() {
        assert!(Instant::now() < deadline, "no resume point appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.signal("TERM");
    let (ok, out) = p.wait(Duration::from_secs(60));
    assert!(ok, "SIGTERM must exit 0:\n{out}");
    let o = gpo()
        .args(["train", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "resume failed:\n{}", text(&o));
    assert_undisturbed(&run, &reference, "gpo train SIGTERM + resume");
}

#[test]
fn cli_faults_fail_fast_and_clearly() {
    // A malformed coordinator address is refused at once, saying what was expected.
    let t = Instant::now();
    let o = gpo()
        .args(["worker", "--coordinator", "notaurl"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("expected host:port"), "{}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(10));
    // A closed stdout (`gpo status | head`) is no panic.
    let dir = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(dir.path(), 2, &[]);
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' status --coordinator {addr} | true; exit 0",
            env!("CARGO_BIN_EXE_gpo")
        ))
        .output()
        .unwrap();
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}
