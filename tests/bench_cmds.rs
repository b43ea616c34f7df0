//! `gpo bench ring` and `gpo bench dispatch` run at small sizes and print their last-line
//! summaries. Timings are not checked: the machine may be shared.

use std::process::Command;

fn gpo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GPO_") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs `gpo bench <args>`, asserts success, and returns the last stdout line parsed as
/// `key=value` pairs (keys in order).
fn last_line(args: &[&str]) -> Vec<(String, f64)> {
    let out = gpo().arg("bench").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpo bench {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("some output");
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("`{kv}` in `{line}` is not key=value"));
            let v: f64 = v
                .parse()
                .unwrap_or_else(|_| panic!("`{v}` in `{line}` is not a number"));
            (k.to_string(), v)
        })
        .collect()
}

fn keys(kv: &[(String, f64)]) -> Vec<&str> {
    kv.iter().map(|(k, _)| k.as_str()).collect()
}

#[test]
fn bench_ring_prints_throughput_next_to_memcpy() {
    for world in ["2", "3"] {
        let kv = last_line(&["ring", "--world", world, "--mib", "0.25", "--iters", "3"]);
        assert_eq!(
            keys(&kv),
            [
                "ring_gbps",
                "tcp_pair_gbps",
                "ratio",
                "memcpy_gbps",
                "memcpy_ratio"
            ]
        );
        assert!(kv.iter().all(|(_, v)| v.is_finite() && *v > 0.0), "{kv:?}");
    }
}

#[test]
fn bench_machinery_prints_its_cost_next_to_the_step() {
    let kv = last_line(&["machinery", "--iters", "1"]);
    assert_eq!(keys(&kv), ["machinery_s", "step_s", "ratio"]);
    assert!(kv.iter().all(|(_, v)| v.is_finite() && *v > 0.0), "{kv:?}");
}

#[test]
fn bench_ring_rejects_a_world_of_one() {
    let out = gpo()
        .args(["bench", "ring", "--world", "1", "--mib", "0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--world"));
}

#[test]
fn bench_dispatch_drives_simulated_workers() {
    let kv = last_line(&[
        "dispatch",
        "--workers",
        "4",
        "--compute-ms",
        "20",
        "--steps",
        "3",
        "--heartbeat-ms",
        "100",
    ]);
    assert_eq!(keys(&kv), ["ideal_s", "measured_s", "overhead_pct"]);
    assert!((kv[0].1 - 0.06).abs() < 1e-9, "{kv:?}");
    assert!(kv[1].1 > 0.0 && kv[2].1.is_finite(), "{kv:?}");
}

/// Runs `gpo bench step <args>`, asserts success, and returns its stdout.
fn bench_step(args: &[&str]) -> String {
    let out = gpo().args(["bench", "step"]).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gpo bench step {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number after `key=` on the line of `stdout` that starts with it.
fn value_of(stdout: &str, key: &str) -> f64 {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{stdout}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// `gpo bench step` states its roofline: the operations it counted (and the official
/// module's on the same batches), the speed it reached, the measured GEMM peak on the same
/// shapes, and their ratio (a fraction in (0, 1.5]:
/// above 1 would mean the count or the peak is wrong; a little slack for a noisy machine).
#[test]
fn bench_step_prints_its_roofline() {
    let stdout = bench_step(&["--dim-x", "32", "--groups", "2", "--iters", "2"]);
    let value = |key: &str| value_of(&stdout, key);
    let (flops, achieved, peak, frac) = (
        value("flops_per_step"),
        value("achieved_gflops"),
        value("gemm_peak_gflops"),
        value("fraction_of_peak"),
    );
    assert!(flops > 1e6 && achieved > 0.0 && peak > 0.0, "{stdout}");
    assert!(
        (frac - achieved / peak).abs() < 0.01 * frac.max(1e-3) + 1e-3,
        "{stdout}"
    );
    assert!(frac > 0.0 && frac <= 1.5, "{stdout}");
    // The same shapes with their operands from memory: a second, positive peak, and the
    // step's fraction of it printed consistently.
    let (cold, cold_frac) = (
        value("gemm_peak_from_memory_gflops"),
        value("fraction_of_peak_from_memory"),
    );
    assert!(cold > 0.0 && cold.is_finite(), "{stdout}");
    assert!(
        (cold_frac - achieved / cold).abs() < 0.01 * cold_frac.max(1e-3) + 1e-3,
        "{stdout}"
    );
    // The official module's count on the same batches: more operations than gpo's (its
    // N × N scores, every layer on every point, each group's own x).
    let official = value("official_flops_per_step");
    assert!(official > flops, "{stdout}");
}

/// `gpo bench step --scaling` times every step on one thread, on several, and as one
/// independent one-thread copy per thread at once, in the same process, and refuses to
/// report a ratio unless every gradient is bitwise equal; a single thread has nothing to
/// compare with and is refused with a clear error.
#[test]
fn bench_step_scaling_pairs_each_step_on_one_and_several_threads() {
    let stdout = bench_step(&[
        "--dim-x",
        "32",
        "--groups",
        "4",
        "--shard-groups",
        "1",
        "--iters",
        "3",
        "--threads",
        "2",
        "--scaling",
    ]);
    let timed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("step ") && !l.ends_with("warm-up"))
        .collect();
    assert_eq!(timed.len(), 3, "{stdout}");
    assert!(
        timed
            .iter()
            .all(|l| l.contains("on 1 thread") && l.contains("2 one-thread copies at once")),
        "{stdout}"
    );
    for key in [
        "scaling_median",
        "scaling_total",
        "copies_scaling_median",
        "scaling_over_copies_median",
    ] {
        let v = value_of(&stdout, key);
        assert!(v > 0.0 && v.is_finite(), "{key}={v}\n{stdout}");
    }

    let out = gpo()
        .args(["bench", "step", "--threads", "1", "--scaling"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--threads 2 or more"), "{stderr}");
}
