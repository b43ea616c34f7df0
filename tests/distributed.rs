//! The distributed spine with real processes on loopback: a coordinator and worker
//! processes of the `gpo` binary, ports chosen at run time.
//!
//! - Runs with 1, 2 and 3 workers end with the parameters of the single-process run.
//! - The same seed and world size give bitwise-identical checkpoints.
//! - Workers register, show in `gpo status`, and shut down when the run ends.
//! - A worker started before its coordinator retries with backoff until it is up.
//! - Requests with a wrong run id, a stale generation or a wrong buffer size are rejected
//!   with clear errors, and the run they were aimed at ends exactly as an undisturbed one.

use gpo_proto::v1 as pb;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

fn check(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// `gpo train` of the small config for `steps`, with `workers` worker processes (0: in
/// process); returns the output folder.
fn train(dir: &Path, name: &str, steps: u32, workers: usize) -> PathBuf {
    train_config(dir, name, &small(), steps, workers)
}

/// [`train`] of the config file `config`.
fn train_config(dir: &Path, name: &str, config: &Path, steps: u32, workers: usize) -> PathBuf {
    let out = dir.join(name);
    let mut c = gpo();
    c.arg("train")
        .arg("--config")
        .arg(config)
        .args(["--steps", &steps.to_string(), "--eval-every", "10", "--out"])
        .arg(&out);
    if workers > 0 {
        c.args(["--workers", &workers.to_string()]);
    }
    check(c.output().unwrap(), &format!("gpo train ({name})"));
    out
}

/// Parameters (no optimizer state) of a checkpoint, by name.
fn params(ckpt: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(ckpt).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("optim."))
        .map(|(n, t)| {
            let data = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, data)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            num = num.max((x - y).abs() as f64);
            den = den.max(x.abs() as f64);
        }
    }
    num / den
}

/// A checkpoint's content: its parsed header (tensor table and metadata; JSON key order
/// is not part of the content) and its data bytes.
fn content(ckpt: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(ckpt).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn one_two_and_three_workers_match_the_single_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let single = train(dir.path(), "single", 20, 0);
    // The resume point at the first evaluation (step 10) against the end: the run moved
    // the parameters, so the comparison below is not between two equal states.
    let midway = params(&single.join("checkpoints/step-0000000010.safetensors"));
    let reference = params(&single.join("last.safetensors"));
    assert!(relative_difference(&midway, &reference) > 1e-3);
    for n in [1, 2, 3] {
        let out = train(dir.path(), &format!("w{n}"), 20, n);
        let d = relative_difference(&reference, &params(&out.join("last.safetensors")));
        assert!(d <= 1e-5, "{n} workers: relative difference {d}");
        let s = summary(&out);
        assert_eq!(s["distributed"]["world_size"], n);
        assert_eq!(s["distributed"]["generation"], 1);
        assert_eq!(s["steps"], 20);
        assert!(PathBuf::from(s["checkpoint"].as_str().unwrap()).exists());
        assert_eq!(
            s["methods"],
            summary(&single)["methods"],
            "{n} workers: the same alignment"
        );
    }
}

#[test]
fn same_seed_and_world_size_give_bitwise_identical_runs() {
    let dir = tempfile::tempdir().unwrap();
    let a = train(dir.path(), "a", 12, 2);
    let b = train(dir.path(), "b", 12, 2);
    for f in ["last.safetensors", "best.safetensors"] {
        assert!(content(&a.join(f)) == content(&b.join(f)), "{f} differs");
    }
}

#[test]
fn a_variant_that_reads_the_prior_trains_bitwise_alike_on_two_workers() {
    // The workers rebuild the population prior from the meta-training groups the
    // coordinator names at registration; a wrong or missing prior would change every step.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(small()).unwrap();
    let config = dir.path().join("residual.toml");
    std::fs::write(
        &config,
        text.replace("[model]\n", "[model]\nvariant = \"residual\"\n"),
    )
    .unwrap();
    let single = train_config(dir.path(), "single", &config, 12, 0);
    let two = train_config(dir.path(), "two", &config, 12, 2);
    assert_eq!(summary(&single)["config"]["model"]["variant"], "residual");
    assert!(params(&single.join("last.safetensors")) == params(&two.join("last.safetensors")));
    assert_eq!(summary(&single)["methods"], summary(&two)["methods"]);
    // The faithful run of the same seed is another run.
    let faithful = train(dir.path(), "faithful", 12, 0);
    assert_ne!(
        summary(&single)["methods"]["gpo"],
        summary(&faithful)["methods"]["gpo"]
    );
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn finish(mut self, what: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{what} did not finish in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let child = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap());
        check(child.wait_with_output().unwrap(), what)
    }
}

fn coordinator(dir: &Path, port: u16, workers: usize, steps: u32) -> (Proc, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let child = gpo()
        .arg("coordinator")
        .arg("--config")
        .arg(small())
        .args([
            "--steps",
            &steps.to_string(),
            "--eval-every",
            "10",
            "--workers",
            &workers.to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--heartbeat-ms",
            "200",
            "--out",
        ])
        .arg(dir.join("run"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    (p, format!("http://{addr}"))
}

fn worker(url: &str, name: &str) -> Proc {
    Proc(
        gpo()
            .args(["worker", "--coordinator", url, "--name", name])
            .args(["--connect-timeout-s", "60", "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn status(url: &str) -> String {
    check(
        gpo()
            .args(["status", "--coordinator", url])
            .output()
            .unwrap(),
        "gpo status",
    )
}

fn wait_status(url: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(url);
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; last status:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workers_register_show_in_status_and_shut_down_when_the_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) = coordinator(dir.path(), 0, 2, 20);
    let w1 = worker(&url, "first");
    let s = wait_status(&url, "one registered worker", |s| s.contains("first"));
    assert!(s.contains(": waiting, step 0/20, generation 0"), "{s}");
    let w2 = worker(&url, "second");
    let out = coord.finish("gpo coordinator", Duration::from_secs(120));
    assert!(out.contains("gpo "), "{out}");
    for (w, name) in [(w1, "first"), (w2, "second")] {
        let text = w.finish(name, Duration::from_secs(30));
        assert!(
            text.contains("20 steps, 0 rejoins; stopped: the run finished"),
            "{name}: {text}"
        );
    }
    let s = summary(&dir.path().join("run"));
    assert_eq!(s["distributed"]["world_size"], 2);
    let names: Vec<_> = s["distributed"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["first", "second"],
        "ranks follow registration order"
    );
}

#[test]
fn a_worker_started_before_the_coordinator_waits_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let w = worker(&url, "early");
    std::thread::sleep(Duration::from_millis(1500));
    let (coord, url2) = coordinator(dir.path(), port, 1, 5);
    assert_eq!(url, url2);
    coord.finish("gpo coordinator", Duration::from_secs(120));
    let text = w.finish("early worker", Duration::from_secs(30));
    assert!(
        text.contains("5 steps, 0 rejoins; stopped: the run finished"),
        "{text}"
    );
}

#[test]
fn bad_requests_are_rejected_and_never_corrupt_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let clean = train(dir.path(), "clean", 60, 2);
    let disturbed = dir.path().join("disturbed");
    std::fs::create_dir_all(&disturbed).unwrap();
    let (coord, url) = coordinator(&disturbed, 0, 2, 60);
    let w1 = worker(&url, "a");
    let w2 = worker(&url, "b");
    wait_status(&url, "generation 1", |s| s.contains(", generation 1,"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = pb::coordinator_client::CoordinatorClient::connect(url.clone())
            .await
            .unwrap();
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        let run_id = st.run_id.clone();
        let step = st.step + 1;
        let result =
            |run_id: &str, generation: u64, state: Option<pb::ReplicaState>| pb::StepResult {
                run_id: run_id.into(),
                worker_id: 1,
                generation,
                step,
                loss_share: 1e9,
                episodes: 7,
                params_sha256: "0".repeat(64),
                state,
                ..Default::default()
            };
        let e = c
            .report_step(result("run-not-this-one", 1, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("wrong run id"), "{}", e.message());

        // Without worker 1's registration secret the call is refused before its
        // generation is looked at (stale generations: the machine's tests and the chaos
        // suites).
        let e = c.report_step(result(&run_id, 0, None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        let bad = pb::ReplicaState {
            params: vec![0; 12],
            adam_m: vec![0; 12],
            adam_v: vec![0; 12],
            adam_t: 1,
        };
        let e = c
            .report_step(result(&run_id, 1, Some(bad)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("wrong buffer size"), "{}", e.message());

        let e = c
            .collective_setup(pb::CollectiveSetupRequest {
                run_id: run_id.clone(),
                worker_id: 1,
                generation: 1,
                ring_address: "127.0.0.1:1".into(),
                nccl_unique_id: vec![],
                buffer_len: 3,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("wrong buffer size"), "{}", e.message());

        let e = c
            .heartbeat(pb::HeartbeatRequest {
                run_id: "run-not-this-one".into(),
                worker_id: 1,
                step: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    });
    coord.finish("gpo coordinator", Duration::from_secs(120));
    w1.finish("worker a", Duration::from_secs(30));
    w2.finish("worker b", Duration::from_secs(30));
    let run = disturbed.join("run");
    assert!(
        content(&run.join("last.safetensors")) == content(&clean.join("last.safetensors")),
        "the rejected requests changed the run"
    );
    assert_eq!(
        summary(&run)["loss_history"],
        summary(&clean)["loss_history"]
    );
}
