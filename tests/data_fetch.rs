//! The run's data without a shared volume, and checkpoints that name their data, with real
//! `gpo` processes:
//!
//! - A worker whose working directory is empty, joining a coordinator whose dataset path
//!   does not exist on the worker's side, fetches the dataset and the store over gRPC into
//!   its cache and ends with bitwise the parameters of the shared-path run; joining again,
//!   it reuses the cached copy; with the path readable it fetches nothing.
//! - `gpo eval` refuses a checkpoint on other data of the same width (naming both
//!   fingerprints) unless `--force`, which warns; an older checkpoint without the fields
//!   warns; a store made by an embedder other than the config's is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: &str = "12";

fn gpo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GPO_") || k == "XDG_CACHE_HOME" {
            c.env_remove(k);
        }
    }
    c
}

fn small() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/synthetic-small.toml")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(c: &mut Command, what: &str) -> String {
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{what} failed:\n{t}");
    t
}

/// A child killed if the test fails first.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proc {
    fn wait(mut self, what: &str) -> String {
        let mut c = self.0.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while c.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = c.wait_with_output().unwrap();
        let t = text(&o);
        assert!(o.status.success(), "{what} failed:\n{t}");
        t
    }
}

/// A coordinator for one worker, started in `cwd` with the data at the relative path
/// `data`; returns it and its address once it serves.
fn coordinator(cwd: &Path, out: &str) -> (Proc, String) {
    let addr_file = cwd.join(format!("{out}.addr"));
    let child = gpo()
        .current_dir(cwd)
        .args(["coordinator", "--config"])
        .arg(small())
        .args(["--data", "data", "--steps", STEPS, "--eval-every", "6"])
        .args(["--workers", "1", "--listen", "127.0.0.1:0", "--out", out])
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            return (p, a);
        }
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker in the working directory `cwd`, with its data cache at `cwd/cache`.
fn worker(cwd: &Path, addr: &str) -> Proc {
    std::fs::create_dir_all(cwd).unwrap();
    let child = gpo()
        .current_dir(cwd)
        .env("GPO_LOG", "gpo_worker=info")
        .args(["worker", "--coordinator", addr, "--threads", "1"])
        .args(["--connect-timeout-s", "30", "--cache-dir", "cache"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc(Some(child))
}

/// A checkpoint's tensor bytes (parameters and optimizer state).
fn tensors(ckpt: &Path) -> Vec<u8> {
    let bytes = std::fs::read(ckpt).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + n..].to_vec()
}

/// One distributed run whose single worker works in `wcwd`; when `hide` is set, the
/// coordinator's data folder is moved away once it has opened it, so its path resolves
/// to nothing anywhere the worker looks. Returns the worker's log.
fn run(ccwd: &Path, wcwd: &Path, out: &str, hide: bool) -> String {
    let (coord, addr) = coordinator(ccwd, out);
    if hide {
        std::fs::rename(ccwd.join("data"), ccwd.join("hidden")).unwrap();
    }
    let log = worker(wcwd, &addr).wait("worker");
    coord.wait("coordinator");
    if hide {
        std::fs::rename(ccwd.join("hidden"), ccwd.join("data")).unwrap();
    }
    log
}

#[test]
fn a_worker_without_the_data_fetches_it_and_ends_with_the_same_parameters() {
    let t = tempfile::tempdir().unwrap();
    let ccwd = t.path().join("coordinator");
    std::fs::create_dir_all(&ccwd).unwrap();
    ok(
        gpo().current_dir(&ccwd).args(["synth", "--out", "data"]),
        "gpo synth",
    );

    // The shared path: the worker reads it and fetches nothing.
    let shared = run(&ccwd, &t.path().join("w-shared"), "shared", false);
    assert!(!shared.contains("fetching"), "{shared}");
    assert!(!t.path().join("w-shared/cache").exists());

    // No shared path: the worker fetches into its cache.
    let wcwd = t.path().join("w-empty");
    let fetched = run(&ccwd, &wcwd, "fetched", true);
    assert!(
        fetched.contains("fetching 4 files from the coordinator"),
        "{fetched}"
    );
    let line = fetched.lines().find(|l| l.contains("fetched 4 files"));
    eprintln!(
        "data_fetch: {}",
        line.expect("the worker reports the fetch")
    );
    let copies: Vec<_> = std::fs::read_dir(wcwd.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].len(), 64, "a copy named by the data fingerprint");
    let reference = tensors(&ccwd.join("shared/last.safetensors"));
    assert!(
        tensors(&ccwd.join("fetched/last.safetensors")) == reference,
        "the fetched run's parameters differ from the shared-path run's"
    );

    // The next join reuses the copy.
    let again = run(&ccwd, &wcwd, "again", true);
    assert!(!again.contains("fetching"), "{again}");
    assert!(again.contains("using the copy cached"), "{again}");
    assert!(tensors(&ccwd.join("again/last.safetensors")) == reference);

    // A corrupted cached copy is noticed (it does not load as the run's data) and
    // fetched again.
    let copy = wcwd.join("cache").join(&copies[0]);
    let answers = copy.join("data/answers.jsonl");
    let mut bytes = std::fs::read(&answers).unwrap();
    let i = bytes.iter().position(|b| b.is_ascii_digit()).unwrap();
    bytes[i] = if bytes[i] == b'1' { b'2' } else { b'1' };
    std::fs::write(&answers, bytes).unwrap();
    let refetched = run(&ccwd, &wcwd, "refetched", true);
    assert!(refetched.contains("fetching"), "{refetched}");
    assert!(tensors(&ccwd.join("refetched/last.safetensors")) == reference);
}

#[test]
fn eval_refuses_a_checkpoint_on_other_data_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for (name, seed) in [("data", "0"), ("other", "1")] {
        ok(
            gpo()
                .arg("synth")
                .arg("--out")
                .arg(d.join(name))
                .args(["--seed", seed]),
            "gpo synth",
        );
    }
    ok(
        gpo()
            .args(["train", "--config"])
            .arg(small())
            .arg("--data")
            .arg(d.join("data"))
            .args(["--steps", "2", "--eval-every", "2", "--out"])
            .arg(d.join("run")),
        "gpo train",
    );
    let ckpt = d.join("run/best.safetensors");
    let c = gpo_core::io::checkpoint::load(&ckpt).unwrap();
    let recorded = c.data.clone().expect("the checkpoint records its data");
    assert_eq!(recorded.embedder, "synthetic-latent/v1");
    for name in [
        "last.safetensors",
        "checkpoints/step-0000000002.safetensors",
    ] {
        let other = gpo_core::io::checkpoint::load(&d.join("run").join(name)).unwrap();
        assert_eq!(other.data.as_ref(), Some(&recorded), "{name}");
    }
    let eval = |data: &str, ckpt: &Path, force: bool| {
        let mut c = gpo();
        c.args(["eval", "--checkpoint"])
            .arg(ckpt)
            .arg("--data")
            .arg(d.join(data));
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    // The run's own data: no warning.
    let o = eval("data", &ckpt, false);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("warning"), "{}", text(&o));
    // Other data of the same width: refused, naming both fingerprints.
    let o = eval("other", &ckpt, false);
    let msg = text(&o);
    assert!(!o.status.success(), "{msg}");
    assert!(
        msg.contains(&recorded.fingerprint) && msg.contains("--force"),
        "{msg}"
    );
    let theirs = msg
        .split("this data's fingerprint is ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    assert_eq!(theirs.len(), 64, "{msg}");
    assert_ne!(theirs, recorded.fingerprint);
    // Forced: it warns and evaluates.
    let o = eval("other", &ckpt, true);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("warning") && text(&o).contains("evaluating anyway"),
        "{}",
        text(&o)
    );
    // A checkpoint written before the fields existed: a warning, not a refusal.
    let old = d.join("old.safetensors");
    let mut c = c;
    c.data = None;
    gpo_core::io::checkpoint::save(&old, &c).unwrap();
    let o = eval("other", &old, false);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("records no data fingerprint"),
        "{}",
        text(&o)
    );
    // A configuration that names another embedder refuses the store.
    let cfg = d.join("cfg.toml");
    let base = std::fs::read_to_string(small()).unwrap();
    std::fs::write(&cfg, format!("embedder = \"minilm@0000\"\n{base}")).unwrap();
    let o = gpo()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(d.join("data"))
        .args(["--steps", "1", "--out"])
        .arg(d.join("refused"))
        .output()
        .unwrap();
    let msg = text(&o);
    assert!(!o.status.success(), "{msg}");
    assert!(
        msg.contains("synthetic-latent/v1") && msg.contains("minilm@0000"),
        "{msg}"
    );
}
