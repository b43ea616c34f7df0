//! A bounded load client for `gpo serve` on loopback (gRPC Predict, 20 context questions and
//! 10 targets of 4 options each). Not a test: it prints requests/s, p50/p99 latency of the
//! accepted requests and the refusals, for BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p gpo-serve --example load -- URL MODE SECONDS [RATE | CONCURRENCY]
//!   MODE: closed (CONCURRENCY clients back to back) or open (RATE requests/s, Poisson-free
//!         fixed spacing); append `-uncached` (closed-uncached, open-uncached) to give every
//!         request texts of its own, so every vector is embedded.
//! ```

use gpo_proto::serve::v1 as pb;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn request(tag: Option<u64>) -> pb::PredictRequest {
    let t = |s: String| match tag {
        Some(n) => format!("{s} (variant {n})"),
        None => s,
    };
    let options: Vec<String> = ["Strongly agree", "Agree", "Disagree", "Strongly disagree"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    pb::PredictRequest {
        context: (0..20)
            .map(|i| pb::ContextItem {
                question: t(format!(
                    "Survey question number {i}: should the city fund project {i}?"
                )),
                options: options.clone(),
                distribution: vec![0.1, 0.2, 0.3, 0.4],
            })
            .collect(),
        targets: (0..10)
            .map(|i| pb::Target {
                question: t(format!(
                    "Target question {i}: would you support policy {i}?"
                )),
                options: options.clone(),
            })
            .collect(),
        group_id: String::new(),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: load URL closed|open[-uncached] SECONDS RATE|CONCURRENCY");
        std::process::exit(2);
    }
    let (url, mode, secs, n) = (
        a[1].clone(),
        a[2].clone(),
        a[3].parse::<f64>()?,
        a[4].parse::<f64>()?,
    );
    let uncached = mode.ends_with("-uncached");
    let client = pb::serve_client::ServeClient::connect(url).await?;
    // Warm the cache (and the connection) once.
    client.clone().predict(request(None)).await?;
    let tags = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let one = {
        let (tags, refused, failed) = (tags.clone(), refused.clone(), failed.clone());
        move |mut c: pb::serve_client::ServeClient<tonic::transport::Channel>| {
            let (tags, refused, failed) = (tags.clone(), refused.clone(), failed.clone());
            async move {
                let tag = uncached.then(|| tags.fetch_add(1, Ordering::Relaxed));
                let t = Instant::now();
                match c.predict(request(tag)).await {
                    Ok(_) => Some(t.elapsed().as_secs_f64()),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        }
    };
    let mut lat = Vec::new();
    if mode.starts_with("closed") {
        let tasks: Vec<_> = (0..n as usize)
            .map(|_| {
                let (c, one) = (client.clone(), one.clone());
                tokio::spawn(async move {
                    let mut l = Vec::new();
                    while Instant::now() < end {
                        l.extend(one(c.clone()).await);
                    }
                    l
                })
            })
            .collect();
        for t in tasks {
            lat.extend(t.await?);
        }
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / n));
        let mut tasks = Vec::new();
        while Instant::now() < end {
            tick.tick().await;
            let (c, one) = (client.clone(), one.clone());
            tasks.push(tokio::spawn(async move { one(c).await }));
        }
        for t in tasks {
            lat.extend(t.await?);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let ok = lat.len();
    println!(
        "mode={mode} n={n} seconds={wall:.1} accepted={ok} refused={} failed={} accepted_per_s={:.1} p50_ms={:.2} p99_ms={:.2}",
        refused.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        ok as f64 / wall,
        pct(&mut lat, 0.5) * 1e3,
        pct(&mut lat, 0.99) * 1e3,
    );
    Ok(())
}
