//! What a new user types wrong, and what the CLI says back: each case is refused at once,
//! before any data is read or any output folder is created, with one message that names the
//! flag or path and what to do instead.

use std::path::Path;
use std::process::{Command, Output};

fn gpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args(args)
        .env_remove("GPO_LOG")
        .output()
        .expect("run gpo")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_negative_number_is_a_value_and_validation_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = gpo(&["train", "--lr", "-1", "--out", out.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(!e.contains("unexpected argument"), "{e}");
    assert!(e.contains("`adam.lr` must be positive, got -1"), "{e}");
}

#[test]
fn an_unknown_collective_is_refused_by_the_parser_with_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = gpo(&[
        "train",
        "--workers",
        "2",
        "--collective",
        "tcp",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("tcp-ring"), "{e}");
    assert!(!out.exists(), "the output folder was created: {e}");
}

#[test]
fn nccl_without_an_nccl_build_is_refused_before_any_work() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = gpo(&[
        "train",
        "--workers",
        "2",
        "--collective",
        "nccl",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("built without NCCL"), "{e}");
    assert_eq!(
        e.matches("built without NCCL").count(),
        1,
        "the cause printed more than once: {e}"
    );
    assert!(!e.contains("data:"), "data was loaded first: {e}");
    assert!(!out.exists(), "the output folder was created: {e}");
}

#[test]
fn a_missing_path_is_named_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-survey");
    let m = missing.to_str().unwrap();
    let o = gpo(&[
        "train",
        "--data",
        m,
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(e.matches(m).count(), 1, "{e}");
    assert!(e.contains("cannot read"), "{e}");
}

/// A dataset with no store next to it, and a folder given as `--embeddings` that is not a
/// store, both say what a store is and give the `gpo embed` line that makes one (into a
/// folder of the user's choosing, not the dataset's, which may be read-only).
#[test]
fn a_missing_or_wrong_store_gives_the_gpo_embed_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("survey");
    let o = gpo(&["synth", "--out", data.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(data.join("embeddings")).unwrap();
    let out = dir.path().join("o");
    let o = gpo(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("gpo embed --data"), "{e}");
    assert!(e.contains("--out STORE"), "{e}");

    let not_a_store = dir.path().join("empty");
    std::fs::create_dir(&not_a_store).unwrap();
    let o = gpo(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--embeddings",
        not_a_store.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("is not an embedding store"), "{e}");
    assert!(e.contains("gpo embed --data"), "{e}");
    assert!(!e.contains("No such file or directory"), "{e}");
    assert!(!Path::new(&out).exists(), "{e}");
}

/// Logs written to a pipe carry no colour codes (`\x1b[`), with or without `NO_COLOR`.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let o = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args([
            "worker",
            "--coordinator",
            "127.0.0.1:1",
            "--connect-timeout-s",
            "1",
        ])
        .env("GPO_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("run gpo");
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("INFO") || e.contains("WARN"),
        "no log lines: {e}"
    );
    assert!(!e.contains('\u{1b}'), "colour codes in piped logs: {e:?}");
}

/// A checkpoint is self-contained: `gpo eval --checkpoint C` alone, from another working
/// directory, re-scores it on the run's recorded data (relative paths were made absolute),
/// and gives the scores the run wrote for that checkpoint.
#[test]
fn eval_needs_only_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .current_dir(dir.path())
        // Another seed than the run's: the built-in survey eval would otherwise fall back
        // to is then other data, and refused by its fingerprint.
        .args(["synth", "--seed", "7", "--out", "survey"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/synthetic-small.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .current_dir(dir.path())
        .args([
            "train",
            "--data",
            "survey",
            "--steps",
            "2",
            "--eval-every",
            "2",
        ])
        .arg("--config")
        .arg(&config)
        .args(["--out", "run"])
        .env_remove("GPO_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let elsewhere = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run/last.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .current_dir(elsewhere.path())
        .arg("eval")
        .arg("--checkpoint")
        .arg(&ckpt)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}{out}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap(),
    )
    .unwrap();
    let want = summary["methods"]["gpo"].as_f64().unwrap();
    let got: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("gpo "))
        .unwrap_or_else(|| panic!("no gpo row in:\n{out}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        (got - want).abs() < 5e-5,
        "eval {got} vs the run's {want}:\n{out}"
    );
}
