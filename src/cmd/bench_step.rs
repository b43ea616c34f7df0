//! `gpo bench step`: one meta-training step (forward, backward, Adam) at the official
//! shape on random inputs, with its roofline ([`super::roofline`]): 8 groups sharing one
//! permutation of a 684-question pool (as OpinionQA), 2–5 options per question (mean 3.6),
//! context and target counts drawn as the sampler draws them. Split from [`super::bench`]
//! to keep each benchmark to one file.

use super::roofline::{self, Operands};
use anyhow::{ensure, Context, Result};
use candle_core::Device;
use gpo_core::data::{AnswerOption, Group, MetricKind, Question, Survey};
use gpo_core::features::{assemble, PointFeatures};
use gpo_core::grad::{episodes_gradient, shares_points};
use gpo_core::model::flops::{flops_of, official_step_flops, sharded_step_gemms, BatchShape, Gemm};
use gpo_core::model::{Backward, Gpo, GpoConfig, OpPath};
use gpo_core::optim::{Adam, AdamConfig};
use gpo_core::rng::Rng;
use gpo_core::sampler::{step_episodes, SamplerConfig};
use std::time::Instant;

/// Runs `gradient(false)` (one thread's step) on every thread of rayon's pool at once, as
/// independent copies of the same work, and returns their gradients and the seconds until
/// the last finished. The pool's threads, not new ones, so each copy finds the per-thread
/// scratch the parallel step left there, as the one-thread step finds its own.
fn independent_copies(
    gradient: &(dyn Fn(bool) -> Result<(Vec<f64>, f64)> + Sync),
) -> Result<(Vec<Vec<f64>>, f64)> {
    let t = Instant::now();
    let outs = rayon::broadcast(|_| gradient(false));
    let s = t.elapsed().as_secs_f64();
    let grads = outs
        .into_iter()
        .map(|r| r.map(|(g, _)| g))
        .collect::<Result<Vec<_>>>()?;
    Ok((grads, s))
}

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Embedding width.
    #[arg(long, default_value_t = 384)]
    pub dim_x: usize,
    /// Groups per step.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 20)]
    pub iters: u64,
    /// Use the composite (reference) ops instead of the fused ones.
    #[arg(long)]
    pub composite: bool,
    /// Backpropagate the fused ops with candle's autograd instead of the hand-written
    /// backward (the tape), for a side-by-side comparison.
    #[arg(long)]
    pub autograd: bool,
    /// Threads the gradient shards are computed on in parallel (default: all cores).
    #[arg(long, default_value_t = gpo_core::grad::default_threads())]
    pub threads: usize,
    /// Groups per gradient shard (default: the run configuration's `shard_groups`, 4, as
    /// the trainer cuts a step). 8 groups on 2 threads are then 2 shards at once; 64 groups
    /// are 16 shards on one thread or on two.
    #[arg(long, default_value_t = 4)]
    pub shard_groups: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write every step's batch shape (the option counts of its context and target
    /// questions, warm-ups included) to this JSON file, for the PyTorch twin to replay
    /// (`tools/reference/gpo_reference.py bench --shapes FILE`).
    #[arg(long)]
    pub shapes_out: Option<std::path::PathBuf>,
    /// Print each distinct product shape of the median step with its share of the
    /// operations and its measured speed.
    #[arg(long)]
    pub per_shape: bool,
    /// Also compute every step's gradient on one thread, next to the parallel one, in
    /// rotating order, and print how much faster the parallel step is (the median of the
    /// per-step ratios and the ratio of the totals). The gradients must be bitwise equal.
    /// Pairing each step in one process keeps a shared host's drift, which moves
    /// separate runs by a third, out of the ratio. Each step's gradient also runs as
    /// independent one-thread copies, one on every pool thread at once: what the host gives
    /// N separate programs (a shared host's cores give less than N), the yardstick for the
    /// parallel step's scaling. Needs `--threads` of 2 or more.
    #[arg(long)]
    pub scaling: bool,
}

/// A random survey at OpinionQA's scale: 684 questions, options drawn 2–5 with mean 3.6.
pub(crate) fn random_survey(groups: usize, dim: usize, seed: u64) -> (Survey, PointFeatures) {
    let mut r = Rng::keyed(&[seed, 0xbe4c]);
    let questions: Vec<Question> = (0..684)
        .map(|i| {
            let u = r.f64();
            let k = if u < 0.2 {
                2
            } else if u < 0.45 {
                3
            } else if u < 0.75 {
                4
            } else {
                5
            };
            Question {
                id: format!("Q{i}"),
                text: format!("question {i}"),
                options: (0..k)
                    .map(|o| AnswerOption {
                        text: format!("option {o}"),
                        ordinal: Some(o as f64 + 1.0),
                        refusal: false,
                    })
                    .collect(),
            }
        })
        .collect();
    let answers = (0..groups)
        .map(|_| {
            questions
                .iter()
                .map(|q| {
                    let v: Vec<f32> = (0..q.options.len())
                        .map(|_| r.f64() as f32 + 0.05)
                        .collect();
                    let s: f32 = v.iter().sum();
                    Some(v.into_iter().map(|x| x / s).collect())
                })
                .collect()
        })
        .collect();
    let survey = Survey {
        name: "bench".into(),
        metric: MetricKind::Wasserstein,
        questions,
        groups: (0..groups)
            .map(|g| Group {
                name: format!("g{g}"),
            })
            .collect(),
        answers,
    };
    let n_points: usize = survey.questions.iter().map(|q| q.options.len()).sum();
    let x: Vec<f32> = (0..n_points * dim).map(|_| r.normal() as f32).collect();
    let mut start = Vec::new();
    let mut len = Vec::new();
    let mut off = 0;
    for q in &survey.questions {
        start.push(off);
        len.push(q.options.len());
        off += q.options.len();
    }
    (
        survey,
        PointFeatures {
            dim,
            x,
            start,
            len,
            prior: None,
        },
    )
}

pub fn step(a: StepArgs) -> Result<()> {
    ensure!(a.groups >= 1, "--groups must be at least 1");
    ensure!(a.iters >= 1, "--iters must be at least 1");
    ensure!(a.threads >= 1, "--threads must be at least 1");
    ensure!(a.shard_groups >= 1, "--shard-groups must be at least 1");
    ensure!(
        !a.scaling || a.threads > 1,
        "--scaling compares one thread with several: give --threads 2 or more"
    );
    let dev = Device::Cpu;
    let (survey, features) = random_survey(a.groups, a.dim_x, a.seed);
    let groups: Vec<usize> = (0..a.groups).collect();
    let pool: Vec<usize> = (0..survey.questions.len()).collect();
    let mut model = Gpo::new(GpoConfig::official(a.dim_x), a.seed, &dev)?;
    if a.composite {
        model.path = OpPath::Composite;
    }
    if a.autograd {
        model.backward = Backward::Autograd;
    }
    let mut adam = Adam::new(model.params.count(), AdamConfig::default());
    let mut times = Vec::new();
    let mut points = Vec::new();
    // Per timed step: (operations forward + backward, its matrix products).
    let mut work: Vec<(f64, f64, Vec<Gemm>)> = Vec::new();
    // Per timed step: the official module's operations on the same batch.
    let mut official = Vec::new();
    let shard = a.shard_groups.max(1);
    let mut shapes = Vec::new();
    // With --scaling, per timed step, the gradient's seconds on one thread, on the pool,
    // and until every pool thread's independent one-thread copy had finished; then Adam's.
    let mut paired: Vec<[f64; 4]> = Vec::new();
    for it in 0..a.iters + 2 {
        let eps = step_episodes(
            &survey,
            a.seed,
            it,
            &groups,
            Some(&pool),
            &SamplerConfig::default(),
        )
        .map_err(anyhow::Error::msg)?;
        let counts = |qs: &[usize]| qs.iter().map(|&q| features.len[q]).collect::<Vec<_>>();
        shapes.push(serde_json::json!({
            "context": counts(&eps[0].context),
            "target": counts(&eps[0].target),
        }));
        let gradient = |parallel: bool| -> Result<(Vec<f64>, f64)> {
            let t = Instant::now();
            let (_, g) = episodes_gradient(
                &model,
                &survey,
                &features,
                &eps,
                eps.len(),
                shard,
                parallel,
                &dev,
            )?;
            Ok((g, t.elapsed().as_secs_f64()))
        };
        let (g, grad_s, serial_s) = if a.scaling {
            // The one-thread step, the parallel one and the copies, in an order that
            // rotates, so that none always finds the caches warm.
            let (mut one, mut par, mut copies) = (None, None, None);
            for k in 0..3 {
                match (k + it as usize) % 3 {
                    0 => one = Some(gradient(false)?),
                    1 => par = Some(gradient(true)?),
                    _ => copies = Some(independent_copies(&gradient)?),
                }
            }
            let (Some((gs, ts)), Some((gp, tp)), Some((gc, tc))) = (one, par, copies) else {
                unreachable!("each of the three runs once")
            };
            let same = |x: &[f64]| {
                x.len() == gs.len() && x.iter().zip(&gs).all(|(x, y)| x.to_bits() == y.to_bits())
            };
            ensure!(
                same(&gp),
                "step {it}: the gradient on one thread differs from the parallel one"
            );
            ensure!(
                gc.iter().all(|g| same(g)),
                "step {it}: an independent one-thread copy's gradient differs from the one-thread step's"
            );
            (gp, tp, Some((ts, tc)))
        } else {
            let (g, t) = gradient(a.threads > 1)?;
            (g, t, None)
        };
        let t = Instant::now();
        // Adam rounds the summed gradient to f32 as it reads it, as the trainer's does.
        let mut p = model.params.flat()?;
        adam.step(&mut p, &g, 3e-4);
        model.params.set_flat(&p)?;
        let adam_s = t.elapsed().as_secs_f64();
        let s = grad_s + adam_s;
        if let (Some((ts, tc)), true) = (serial_s, it >= 2) {
            paired.push([ts, grad_s, tc, adam_s]);
        }
        let (nc, nt) = (
            features.points(&eps[0].context),
            features.points(&eps[0].target),
        );
        if it >= 2 {
            times.push(s);
            points.push(nc + nt);
            let mut shapes = Vec::new();
            let mut of = 0.0;
            for part in eps.chunks(shard.max(1)) {
                let shape = BatchShape::of(&assemble(&survey, &features, part, &dev)?);
                let (f, b) = official_step_flops(&model.cfg, shape);
                of += f + b;
                shapes.push(shape);
            }
            let products = sharded_step_gemms(&model.cfg, &shapes, shares_points(&eps));
            let (fw, bw) = flops_of(&products);
            work.push((fw, bw, products.into_iter().map(|(_, g)| g).collect()));
            official.push(of);
        }
        println!(
            "step {it}: {s:.4}s ({nc} context + {nt} target points per group){}{}",
            serial_s.map_or(String::new(), |(ts, tc)| format!(
                ", on 1 thread {:.4}s; its gradient as {} one-thread copies at once {:.4}s",
                ts + adam_s,
                rayon::current_num_threads(),
                tc
            )),
            if it < 2 { " warm-up" } else { "" }
        );
    }
    if let Some(path) = &a.shapes_out {
        let doc = serde_json::json!({
            "dim_x": a.dim_x,
            "groups": a.groups,
            "warmup": 2,
            "steps": shapes,
        });
        std::fs::write(path, serde_json::to_string(&doc)? + "\n")
            .with_context(|| format!("writing --shapes-out {}", path.display()))?;
    }
    let total_s: f64 = times.iter().sum();
    let n = work.len().max(1) as f64;
    let (fw, bw) = work
        .iter()
        .fold((0.0, 0.0), |(f, b), w| (f + w.0 / n, b + w.1 / n));
    // The peak is measured on the products of the median-time step.
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&i, &j| times[i].total_cmp(&times[j]));
    let median_step = order[order.len() / 2];
    times.sort_by(f64::total_cmp);
    let mean_points = points.iter().sum::<usize>() as f64 / points.len().max(1) as f64;
    println!(
        "dim_x {} groups {} path {} mean points/group {:.0} threads {} shard_groups {shard}",
        a.dim_x,
        a.groups,
        match (a.composite, a.autograd) {
            (true, _) => "composite",
            (false, true) => "fused+autograd",
            (false, false) => "fused+tape",
        },
        mean_points,
        a.threads
    );
    let achieved = (fw + bw) * n / total_s / 1e9;
    let parallel = a.threads.max(1).min(a.groups.div_ceil(shard.max(1)));
    // The FMA ceiling is measured before and after the GEMM peak, which takes seconds, and
    // the better of the two kept: on a shared host one burst of 90 ms can fall entirely in
    // a moment when a core is taken (one run read half the ceiling).
    let round = std::time::Duration::from_millis(30);
    let (fma_before, isa) = roofline::fma_peak(parallel, round)?;
    let products = &work[median_step].2;
    let (peak, per_shape) = roofline::weighted_peak(products, parallel, Operands::Cached)?;
    let (cold, per_shape_cold) = roofline::weighted_peak(products, parallel, Operands::FromMemory)?;
    let fma = fma_before.max(roofline::fma_peak(parallel, round)?.0);
    let shapes = per_shape.len();
    if a.per_shape {
        println!(
            "the median step's products (batch x m x k x n): share of its operations, GFLOP/s with operands cached and from memory"
        );
        let mut by_share: Vec<_> = per_shape.iter().zip(&per_shape_cold).collect();
        by_share.sort_by(|x, y| y.0.share.total_cmp(&x.0.share));
        for (s, c) in by_share {
            let g = s.gemm;
            println!(
                "  {:>4} x {:>5} x {:>5} x {:>5}: {:5.1} %  {:7.2}  {:7.2}",
                g.batch,
                g.m,
                g.k,
                g.n,
                100.0 * s.share,
                s.gflops,
                c.gflops
            );
        }
    }
    println!(
        "flops_per_step={:.3e} (forward {:.3} GFLOP, backward {:.3} GFLOP; matrix products only)",
        fw + bw,
        fw / 1e9,
        bw / 1e9
    );
    let official = official.iter().sum::<f64>() / n;
    println!(
        "official_flops_per_step={official:.3e} (the official module's products on the same batches: every point a key, every layer on every point, each group's own x; {:.2}x gpo's)",
        official / (fw + bw)
    );
    println!("achieved_gflops={achieved:.2}");
    println!(
        "gemm_peak_gflops={peak:.2} ({parallel} threads at once, the median step's {shapes} distinct product shapes, weighted by their operations)"
    );
    println!("fraction_of_peak={:.3}", achieved / peak);
    println!(
        "gemm_peak_from_memory_gflops={cold:.2} (the same shapes and threads, every call on operands no call has touched since they left the caches: the step's products read activations written tens of megabytes earlier, so they run between this and the peak)"
    );
    println!("fraction_of_peak_from_memory={:.3}", achieved / cold);
    println!(
        "fma_peak_gflops={fma:.2} ({parallel} threads at once, {isa} multiply-adds from registers: the cores' ceiling; the GEMM peak is {:.2} of it)",
        peak / fma
    );
    println!("fraction_of_fma_peak={:.3}", achieved / fma);
    if !paired.is_empty() {
        let n = rayon::current_num_threads() as f64;
        let median = |f: &dyn Fn(&[f64; 4]) -> f64| {
            let mut v: Vec<f64> = paired.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (one, par) = paired.iter().fold((0.0, 0.0), |(o, p), [ts, tp, _, adam]| {
            (o + ts + adam, p + tp + adam)
        });
        println!(
            "scaling_median={:.3} (each step on 1 thread over the same step on {n} threads, in one process, in rotating order; gradients bitwise equal)",
            median(&|[ts, tp, _, adam]| (ts + adam) / (tp + adam)),
        );
        println!(
            "scaling_total={:.3} (the {} steps' seconds on 1 thread over on {n} threads)",
            one / par,
            paired.len(),
        );
        println!(
            "copies_scaling_median={:.3} (what the host gives {n} separate programs: {n} independent one-thread copies of each step's gradient at once, one per pool thread, against one alone, scaled by {n})",
            median(&|[ts, _, tc, _]| n * ts / tc),
        );
        println!(
            "scaling_over_copies_median={:.3} (each step's gradient scaling over what its {n} independent copies got: above 1, the parallel step gets more from the cores than {n} separate programs would)",
            median(&|[_, tp, tc, _]| tc / (n * tp)),
        );
    }
    println!("median_step_s={:.4}", times[times.len() / 2]);
    Ok(())
}
