//! The chaos suite: real `gpo` processes on loopback, faults injected with real signals.
//!
//! Each scenario asserts that the final checkpoint equals the undisturbed run's bitwise
//! and that the step ledger is exact (every step once, in order, with the undisturbed
//! run's losses), and prints its detection time, recovery time and steps recomputed
//! (`chaos: …` lines; BENCHMARKS.md collects them). The scenarios run one at a time: they
//! time heartbeats and deadlines, and two of them at once on two cores would starve each
//! other.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

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
    all_succeed(coord, ws, "the coordinator failed");
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "SIGKILL");
    report("sigkill", &s);
    // The survivors' ring may report the broken step before the closed stream is seen:
    // then the step error is a recovery of its own, and the lost worker's follows.
    let rec = s["recoveries"].as_array().unwrap();
    let lost = rec
        .iter()
        .find(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .contains("closed its connection")
        })
        .unwrap_or_else(|| panic!("no recovery names the killed worker: {rec:?}"));
    assert!(lost["reason"].as_str().unwrap().contains("`c`"), "{lost}");
    assert!(lost["detect_s"].as_f64().unwrap() < 1.0, "{lost}");
    assert!(rec.len() <= 2, "{rec:?}");
    assert_eq!(s["distributed"]["world_size"], 2);
    assert!(s["distributed"]["generation"].as_u64().unwrap() >= 2);
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
    all_succeed(coord, ws, "the coordinator failed");
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
    all_succeed(coord, ws, "the coordinator failed");
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
    all_succeed(coord, ws, "the resumed coordinator failed");
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
    all_succeed(coord, ws, "the resumed coordinator failed");
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
    all_succeed(coord, ws, "the coordinator failed");
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
