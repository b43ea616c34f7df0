//! `gpo bench`: benchmarks whose figures go to BENCHMARKS.md.
//!
//! `bench step` times one meta-training step at the official shape ([`super::bench_step`]).
//!
//! `bench ring` times the TCP ring all-reduce ([`gpo_worker::ring::TcpRing`]) on loopback,
//! `world` ranks as threads of this process, each with its own TCP connections, on f64
//! buffers as the trainer reduces; next to it, in the same run, a plain TCP pair (one
//! thread writes the bytes the ring moves per rank, 2(N−1)/N × buffer, another reads them:
//! the transport's own throughput, which the goal is set against) and a memcpy of
//! those bytes on one core (the bound no transport passes).
//!
//! `bench dispatch` drives the coordinator's fake-compute mode: a real
//! [`CoordinatorService`] and `workers` simulated workers ([`gpo_worker::client::run`] as
//! tasks of this process, each with its own gRPC connection) that register, receive their
//! episode specs through the assignment stream, sleep `compute_ms` instead of computing,
//! skip the collective and report. Measured wall time is set against steps × compute.

use anyhow::{bail, ensure, Context, Result};
use gpo_coordinator::{CoordinatorOptions, CoordinatorService, RunInfo};
use gpo_core::model::GpoConfig;
use gpo_core::sampler::{step_episodes, SamplerConfig};
use gpo_proto::v1 as pb;
use gpo_worker::client::{self, WorkerOptions};
use gpo_worker::ring::{run_tag, RingId, TcpRing};
use gpo_worker::Collective;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Time one meta-training step at the official shape.
    Step(super::bench_step::StepArgs),
    /// TCP ring all-reduce throughput on loopback against a plain TCP pair and memcpy.
    Ring(RingArgs),
    /// The coordinator driving simulated workers that sleep instead of computing.
    Dispatch(DispatchArgs),
    /// What fault tolerance costs an undisturbed step (state machine, rollback-ready Adam).
    Machinery(super::bench_machinery::MachineryArgs),
    /// The sweep scheduler's overhead: trials that sleep, on simulated workers.
    Sweep(super::bench_sweep::SweepArgs),
}

#[derive(Debug, clap::Args)]
pub struct RingArgs {
    /// Ranks in the ring (threads of this process, connected over loopback TCP).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Buffer per rank in MiB of f64 values (default: the official module's gradient,
    /// 1,188,354 values at dim_x 4096, 9.07 MiB).
    #[arg(long)]
    pub mib: Option<f64>,
    /// Timed all-reduces (after 2 warm-up calls).
    #[arg(long, default_value_t = 20)]
    pub iters: u32,
}

#[derive(Debug, clap::Args)]
pub struct DispatchArgs {
    /// Simulated workers (gRPC clients in this process).
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Milliseconds each worker sleeps per step instead of computing.
    #[arg(long, default_value_t = 200)]
    pub compute_ms: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Episodes (groups) per step, split across the workers by index (default: one per
    /// worker). Their specs are drawn by the real sampler: 10–100 context and target
    /// questions each.
    #[arg(long)]
    pub episodes: Option<usize>,
    /// Milliseconds between worker heartbeats.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Seed of the episode specs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Step(a) => super::bench_step::step(a),
        Bench::Ring(a) => ring(a),
        Bench::Dispatch(a) => dispatch(a),
        Bench::Machinery(a) => super::bench_machinery::machinery(a),
        Bench::Sweep(a) => super::bench_sweep::sweep(a),
    }
}

/// Decimal gigabytes per second.
fn gbps(bytes: f64, secs: f64) -> f64 {
    bytes / secs.max(1e-12) / 1e9
}

fn ring(a: RingArgs) -> Result<()> {
    ensure!(
        a.world >= 2,
        "--world must be at least 2 (a world of one moves nothing)"
    );
    ensure!(a.iters >= 1, "--iters must be at least 1");
    const WARMUP: u32 = 2;
    let (world, iters) = (a.world, a.iters);
    let len = match a.mib {
        None => GpoConfig::official(4096).param_count(),
        Some(m) => {
            ensure!(
                m.is_finite() && m > 0.0,
                "--mib must be a positive number, got {m}"
            );
            ((m * (1u64 << 20) as f64 / 8.0).round() as usize).max(world)
        }
    };
    let buf_bytes = (len * 8) as f64;
    // What every rank sends (and receives) per all-reduce: 2(N−1)/N of the buffer.
    let moved = 2.0 * (world - 1) as f64 / world as f64 * buf_bytes;
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("binding loopback listeners")?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?;
    let id = RingId {
        run_tag: run_tag("bench-ring"),
        generation: 1,
        buffer_len: len,
        secret: [0x5a; 32],
    };
    let timeout = Duration::from_secs(60);
    // Each rank: connect, check one exact sum, then time `iters` back-to-back calls.
    let per_rank: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                s.spawn(move || -> Result<f64> {
                    let mut ring = TcpRing::connect(r, addrs, l, id, timeout)?;
                    let mut buf: Vec<f64> =
                        (0..len).map(|i| ((r + 1) * (1 + i % 7)) as f64).collect();
                    ring.all_reduce_sum(&mut buf)?;
                    let ranks = (world * (world + 1) / 2) as f64;
                    if let Some(i) = (0..len).find(|&i| buf[i] != ranks * (1 + i % 7) as f64) {
                        bail!(
                            "rank {r}: value {i} of the sum is {}, expected {}",
                            buf[i],
                            ranks * (1 + i % 7) as f64
                        );
                    }
                    for _ in 1..WARMUP {
                        ring.all_reduce_sum(&mut buf)?;
                    }
                    let t = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce_sum(&mut buf)?;
                    }
                    Ok(t.elapsed().as_secs_f64() / iters as f64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a ring thread panicked")))
            })
            .collect()
    });
    let mut ring_s = 0f64;
    for (r, t) in per_rank.into_iter().enumerate() {
        ring_s = ring_s.max(t.with_context(|| format!("ring rank {r}"))?);
    }
    // The bound: one core copying the bytes a rank moves, same iteration count.
    let n = moved.round() as usize;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    for _ in 0..WARMUP {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    let t = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    let copy_s = t.elapsed().as_secs_f64() / iters as f64;
    let tcp_s = tcp_stream_secs(n, iters)?;
    let (ring_gbps, memcpy_gbps) = (gbps(moved, ring_s), gbps(moved, copy_s));
    let tcp_pair_gbps = gbps(moved, tcp_s);
    println!(
        "ring all-reduce: {world} ranks (threads) on loopback TCP, {:.2} MiB per rank ({len} f64), {iters} timed calls after {WARMUP} warm-up",
        buf_bytes / (1u64 << 20) as f64
    );
    println!(
        "per call: each rank sends and receives 2(N-1)/N x buffer = {:.2} MB in {:.2} ms (slowest rank's mean)",
        moved / 1e6,
        ring_s * 1e3
    );
    println!(
        "memcpy of the same {:.2} MB on one core: {:.3} ms",
        moved / 1e6,
        copy_s * 1e3
    );
    println!(
        "plain TCP pair, the same {:.2} MB over one loopback connection (one writer, one reader thread): {:.3} ms",
        moved / 1e6,
        tcp_s * 1e3,
    );
    println!("(GB/s = 10^9 bytes per second of data moved per rank; ratio = ring / TCP pair)");
    println!(
        "ring_gbps={ring_gbps:.3} tcp_pair_gbps={tcp_pair_gbps:.3} ratio={:.3} memcpy_gbps={memcpy_gbps:.3} memcpy_ratio={:.4}",
        ring_gbps / tcp_pair_gbps,
        ring_gbps / memcpy_gbps
    );
    Ok(())
}

/// Seconds to push `n` bytes through one loopback TCP connection with default socket
/// settings (mean of `iters`, after one warm-up), a writer and a reader thread: what the
/// transport alone allows, without the ring's framing and sums.
fn tcp_stream_secs(n: usize, iters: u32) -> Result<f64> {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let buf = vec![7u8; n];
        for _ in 0..=iters {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    let t = Instant::now();
    for _ in 0..iters {
        s.read_exact(&mut buf)?;
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    writer
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the TCP writer thread panicked")))?;
    Ok(secs)
}

fn dispatch(a: DispatchArgs) -> Result<()> {
    ensure!(a.workers >= 1, "--workers must be at least 1");
    ensure!(
        a.compute_ms >= 1,
        "--compute-ms must be at least 1 (0 turns fake compute off)"
    );
    ensure!(a.steps >= 1, "--steps must be at least 1");
    let episodes = a.episodes.unwrap_or(a.workers);
    ensure!(episodes >= 1, "--episodes must be at least 1");
    // Specs come from the real sampler over a survey of OpinionQA's shape; the vectors are
    // never read (dim 1), as simulated workers load no data.
    let (survey, _) = super::bench_step::random_survey(episodes, 1, a.seed);
    let groups: Vec<usize> = (0..episodes).collect();
    let pool: Vec<usize> = (0..survey.questions.len()).collect();
    let specs = |step: u64| {
        step_episodes(
            &survey,
            a.seed,
            step,
            &groups,
            Some(&pool),
            &SamplerConfig::default(),
        )
        .map_err(anyhow::Error::msg)
    };
    let param_count = GpoConfig::official(384).param_count();
    let info = RunInfo {
        config_json: "{}".into(),
        data: pb::DataSource {
            source: Some(pb::data_source::Source::SyntheticSeed(a.seed)),
            ..Default::default()
        },
        fingerprint: String::new(),
        param_count,
        prior_groups: Vec::new(),
        total_steps: a.steps,
        shard_groups: 1,
        start_step: 0,
        start_generation: 0,
        files: None,
    };
    let opts = CoordinatorOptions {
        expected_workers: a.workers,
        heartbeat_interval: Duration::from_millis(a.heartbeat_ms.max(10)),
        registration_timeout: Some(Duration::from_secs(120)),
        fake_compute_ms: a.compute_ms,
        ..Default::default()
    };
    let svc = CoordinatorService::start("127.0.0.1:0".parse()?, info, opts)?;
    let url = format!("http://{}", svc.addr());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gpo-sim-worker")
        .enable_all()
        .build()?;
    let loader: client::DataLoader =
        Arc::new(|_: &pb::DataSource| bail!("simulated workers load no data"));
    let (_keep_running, stop) = tokio::sync::watch::channel(false);
    let handles: Vec<_> = (0..a.workers)
        .map(|i| {
            let opts = WorkerOptions {
                coordinator: url.clone(),
                name: format!("sim-{i}"),
                connect_timeout: Duration::from_secs(30),
                ring_bind: "127.0.0.1:0".into(),
                ring_advertise: None,
                io_timeout: Duration::from_secs(60),
                threads: Some(1),
                capabilities: pb::Capabilities {
                    device: "simulated".into(),
                    threads: 1,
                    ..Default::default()
                },
                etcd: None,
                credentials: Default::default(),
                max_message_bytes: client::MAX_MESSAGE_BYTES,
                auth_failures: Default::default(),
                metrics: Default::default(),
                health: gpo_ops::http::Health::not_ready("simulated"),
                cache_dir: Default::default(), // simulated workers load no data
            };
            rt.spawn(client::run(opts, loader.clone(), stop.clone()))
        })
        .collect();
    let result = (|| -> Result<(f64, Vec<f64>)> {
        let mut d = svc.dispatch(None);
        let t = Instant::now();
        d.form_membership()?;
        eprintln!(
            "{} workers registered and set up in {:.2}s",
            a.workers,
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        for step in 1..=a.steps {
            let eps = specs(step)?;
            d.run_step(step, a.steps, &eps, false)?;
        }
        let wall = t.elapsed().as_secs_f64();
        Ok((wall, d.timings().iter().map(|s| s.step_s).collect()))
    })();
    match &result {
        Ok(_) => svc.finish(None, Duration::from_secs(10)),
        Err(e) => svc.finish(Some(format!("{e:#}")), Duration::from_secs(3)),
    }
    let reports = rt.block_on(async {
        let mut out = Vec::new();
        for h in handles {
            out.push(tokio::time::timeout(Duration::from_secs(10), h).await);
        }
        out
    });
    drop(svc);
    rt.shutdown_timeout(Duration::from_secs(2));
    let (wall, mut steps) = result?;
    for (i, r) in reports.into_iter().enumerate() {
        match r {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => bail!("simulated worker {i} failed: {e:#}"),
            Ok(Err(e)) => bail!("simulated worker {i} panicked: {e}"),
            Err(_) => bail!("simulated worker {i} did not stop after the run"),
        }
    }
    steps.sort_by(f64::total_cmp);
    let compute = a.compute_ms as f64 / 1e3;
    let ideal = a.steps as f64 * compute;
    println!(
        "dispatch: {} simulated workers (gRPC clients in this process), {episodes} episodes per step, compute {} ms, {} steps",
        a.workers, a.compute_ms, a.steps
    );
    println!(
        "step wall time at the coordinator: median {:.4}s, min {:.4}s, max {:.4}s",
        steps[steps.len() / 2],
        steps[0],
        steps[steps.len() - 1]
    );
    println!(
        "ideal_s={ideal:.3} measured_s={wall:.3} overhead_pct={:.2}",
        (wall - ideal) / ideal * 100.0
    );
    Ok(())
}
