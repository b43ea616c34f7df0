//! `gpo bench`: benchmarks whose figures go to BENCHMARKS.md.
//!
//! `bench step` times one meta-training step (forward, backward, Adam) at the official
//! shape on random inputs: 8 groups sharing one permutation of a 684-question pool (as
//! OpinionQA), 2–5 options per question (mean 3.6), context and target counts drawn as
//! the sampler draws them.

use anyhow::Result;
use candle_core::Device;
use gpo_core::data::{AnswerOption, Group, MetricKind, Question, Survey};
use gpo_core::features::PointFeatures;
use gpo_core::grad::episodes_gradient;
use gpo_core::model::{Gpo, GpoConfig, OpPath};
use gpo_core::optim::{Adam, AdamConfig};
use gpo_core::rng::Rng;
use gpo_core::sampler::{step_episodes, SamplerConfig};
use std::time::Instant;

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Time one meta-training step at the official shape.
    Step(StepArgs),
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
    /// Threads to shard the groups over (default: all cores).
    #[arg(long, default_value_t = gpo_core::grad::default_threads())]
    pub threads: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A random survey at OpinionQA's scale: 684 questions, options drawn 2–5 with mean 3.6.
fn random_survey(groups: usize, dim: usize, seed: u64) -> (Survey, PointFeatures) {
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
    (survey, PointFeatures { dim, x, start, len })
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Step(a) => step(a),
    }
}

fn step(a: StepArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (survey, features) = random_survey(a.groups, a.dim_x, a.seed);
    let groups: Vec<usize> = (0..a.groups).collect();
    let pool: Vec<usize> = (0..survey.questions.len()).collect();
    let mut model = Gpo::new(GpoConfig::official(a.dim_x), a.seed, &dev)?;
    if a.composite {
        model.path = OpPath::Composite;
    }
    let mut adam = Adam::new(model.params.count(), AdamConfig::default());
    let mut times = Vec::new();
    let mut points = Vec::new();
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
        let t = Instant::now();
        let (_, g) =
            episodes_gradient(&model, &survey, &features, &eps, eps.len(), a.threads, &dev)?;
        let mut p = model.params.flat()?;
        adam.step(&mut p, &g, 3e-4);
        model.params.set_flat(&p)?;
        let s = t.elapsed().as_secs_f64();
        let (nc, nt) = (
            features.points(&eps[0].context),
            features.points(&eps[0].target),
        );
        if it >= 2 {
            times.push(s);
            points.push(nc + nt);
        }
        println!(
            "step {it}: {s:.4}s ({nc} context + {nt} target points per group){}",
            if it < 2 { " warm-up" } else { "" }
        );
    }
    times.sort_by(f64::total_cmp);
    let mean_points = points.iter().sum::<usize>() as f64 / points.len().max(1) as f64;
    println!(
        "dim_x {} groups {} path {} mean points/group {:.0} threads {}",
        a.dim_x,
        a.groups,
        if a.composite { "composite" } else { "fused" },
        mean_points,
        a.threads
    );
    println!("median_step_s={:.4}", times[times.len() / 2]);
    Ok(())
}
