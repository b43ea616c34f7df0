//! The GPU entry points of a build without the `cuda` feature: each refuses at once, before
//! any data is read or any file written, and says which build to use.

use std::process::{Command, Output};

fn gpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args(args)
        .env_remove("GPO_LOG")
        .env_remove("GPO_DEVICE")
        .output()
        .expect("run gpo")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn gpu_check_without_the_cuda_build_refuses_and_writes_nothing() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.json");
    let o = gpo(&["gpu-check", "--out", out.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("needs a build with the `cuda` feature"), "{e}");
    assert!(e.contains("scripts/cuda_build.sh --release"), "{e}");
    assert!(!out.exists(), "a results file was written: {e}");
}

#[test]
fn device_cuda_without_the_cuda_build_is_refused_before_any_work() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for extra in [&[][..], &["--workers", "2"][..]] {
        let mut args = vec!["train", "--device", "cuda", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = gpo(&args);
        let e = stderr(&o);
        assert!(!o.status.success());
        assert!(e.contains("built without the `cuda` feature"), "{e}");
        assert!(!out.exists(), "the output folder was created: {e}");
    }
    let o = gpo(&["train", "--device", "tpu", "--out", out.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
    // A worker refuses before it connects anywhere.
    let o = gpo(&[
        "worker",
        "--coordinator",
        "http://127.0.0.1:9",
        "--device",
        "cuda:1",
    ]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("built without the `cuda` feature"), "{e}");
}
