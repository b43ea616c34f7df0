//! The NCCL checks (`nccl_one_rank`, `allreduce_sweep`) with the `cuda` feature: a 1-rank
//! communicator's id, all-reduce, trainer path and abort, and the all-reduce bandwidth
//! sweep. Its own module because it is the only code of the command that calls NCCL, and
//! it compiles only with `cuda` (`nccl_stub.rs` stands in without it).

use super::Outcome;
use anyhow::Result;
use gpo_worker::nccl::{unique_id, Nccl};
use gpo_worker::Collective;
use serde_json::json;
use std::time::Instant;

/// A 1-rank communicator: the id, an exact all-reduce, the trainer's path, and abort.
pub fn one_rank() -> Result<Outcome> {
    let id = unique_id()?;
    let n = 1 << 20;
    let mut comm = Nccl::new(0, 1, &id, n)?;
    let want: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 1e5).collect();
    let mut buf = want.clone();
    comm.all_reduce_sum(&mut buf)?;
    let err = buf
        .iter()
        .zip(&want)
        .fold(0f64, |s, (a, b)| s.max((a - b).abs()));
    let wrong_size = comm.all_reduce_sum(&mut [0.0; 3]).is_err();
    // The trainer's path (host buffer → device → all-reduce → host) at the official
    // module's size for d_x 4096.
    let params = gpo_core::model::GpoConfig::official(4096).param_count();
    let mut trainer = Nccl::new(0, 1, &unique_id()?, params)?;
    let mut g = vec![1.0f64; params];
    trainer.all_reduce_sum(&mut g)?;
    let t = Instant::now();
    for _ in 0..10 {
        trainer.all_reduce_sum(&mut g)?;
    }
    let trainer_ms = t.elapsed().as_secs_f64() * 1e3 / 10.0;
    // Abort from another thread, as recovery does, then every call must fail.
    let aborter = comm.aborter();
    let t = Instant::now();
    std::thread::spawn(move || aborter.abort())
        .join()
        .map_err(|_| anyhow::anyhow!("the aborting thread panicked"))?;
    let abort_ms = t.elapsed().as_secs_f64() * 1e3;
    let after = comm.all_reduce_sum(&mut buf);
    let abort_error = after.as_ref().err().map(|e| format!("{e:#}"));
    comm.aborter().abort(); // twice is harmless
    let abort_ok = abort_error
        .as_deref()
        .is_some_and(|e| e.contains("aborted"));
    let v = json!({
        "unique_id_bytes": id.len(),
        "unique_id_nonzero": id.iter().any(|&b| b != 0),
        "all_reduce_values": n,
        "all_reduce_max_abs_err": err,
        "wrong_size_refused": wrong_size,
        "trainer_path_values": params,
        "trainer_path_ms": trainer_ms,
        "abort_ms": abort_ms,
        "after_abort_error": abort_error,
        "abort_ok": abort_ok,
    });
    let verdict = if id.len() == 128 && err == 0.0 && wrong_size && abort_ok {
        Ok(())
    } else {
        Err("see result: the id, the sum, the size check or the abort misbehaved".into())
    };
    Ok((v, verdict))
}

/// All-reduce of 1 MB to `max_mb` MB on device buffers, next to the ring bound.
pub fn sweep(max_mb: usize) -> Result<Outcome> {
    let ranks = 1usize;
    let max_bytes = max_mb.max(1) << 20;
    let mut comm = Nccl::new(0, ranks, &unique_id()?, max_bytes / 8)?;
    let mem_bw = comm.device_copy_rate(max_bytes, 10)?;
    let mut rows = Vec::new();
    let mut mb = 1usize;
    while mb <= max_mb.max(1) {
        let bytes = mb << 20;
        let reps = if mb <= 16 { 50 } else { 10 };
        let s = comm.time_device_all_reduce(bytes / 8, reps)?;
        let alg = bytes as f64 / s;
        let bus = alg * 2.0 * (ranks as f64 - 1.0) / ranks as f64;
        rows.push(json!({
            "mb": mb,
            "bytes": bytes,
            "us": s * 1e6,
            "algbw_gb_s": alg / 1e9,
            "busbw_gb_s": bus / 1e9,
            "reps": reps,
        }));
        mb *= 2;
    }
    let v = json!({
        "ranks": ranks,
        "dtype": "f64, in place, sum",
        "rows": rows,
        "ring_bound": {
            "formula": "a ring all-reduce over n ranks moves 2(n-1)/n of the buffer over each link: algbw <= B_link * n / (2(n-1)), i.e. busbw <= B_link",
            "ranks": ranks,
            "link": "none: with one rank no byte crosses a link, so the bound is the device memory bandwidth (busbw is 0 by definition)",
            "device_copy_gb_s": mem_bw / 1e9,
            "device_copy_counts": "bytes copied once per copy (read + write is twice that)",
        },
    });
    Ok((v, Ok(())))
}
