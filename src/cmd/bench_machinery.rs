//! `gpo bench machinery`: what fault tolerance costs an undisturbed run, side by side in
//! one run. Three parts, each against the step it rides on:
//!
//! - the state machine's work per step (a submit, every member's report, a tick, the
//!   commit), driven through [`Machine`] with no I/O, for several world sizes;
//! - the out-of-place Adam update (what makes a thrown-away step roll back by a swap)
//!   next to the in-place one it replaced, at the module's parameter count;
//! - a replica's whole step at the official shape, the denominator.
//!
//! The last line: `machinery_s=… step_s=… ratio=…`.

use anyhow::Result;
use candle_core::Device;
use gpo_coordinator::machine::{Event, Machine, MachineConfig, Report};
use gpo_core::model::GpoConfig;
use gpo_core::optim::{Adam, AdamConfig};
use gpo_core::sampler::{step_episodes, SamplerConfig};
use gpo_worker::{Local, Replica};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct MachineryArgs {
    /// Embedding width of the module (its parameter count follows).
    #[arg(long, default_value_t = 384)]
    pub dim_x: usize,
    /// Timed replica steps (after 2 warm-ups).
    #[arg(long, default_value_t = 10)]
    pub iters: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of machine work per committed step with `world` members.
fn machine_step_s(world: usize, steps: u64) -> f64 {
    let cfg = MachineConfig {
        target_workers: world,
        shard_groups: 1,
        ..Default::default()
    };
    let mut m = Machine::new(cfg, 0, 0, 0);
    let ids: Vec<u64> = (0..world)
        .map(|i| {
            let id = m
                .handle(
                    0,
                    Event::Register {
                        name: format!("w{i}"),
                        holds: Some((0, None)),
                    },
                )
                .reply
                .ok()
                .flatten()
                .unwrap_or(0);
            m.handle(0, Event::StreamOpened { id });
            id
        })
        .collect();
    for &id in &ids {
        m.handle(
            0,
            Event::Setup {
                id,
                generation: 1,
                addr: format!("a{id}"),
            },
        );
    }
    let digest = "0".repeat(64);
    let t = Instant::now();
    for step in 1..=steps {
        let now = step * 10;
        m.handle(
            now,
            Event::Submit {
                step,
                episodes: world * 4,
                want_state: false,
            },
        );
        for &id in &ids {
            m.handle(
                now,
                Event::StepResult {
                    id,
                    generation: 1,
                    step,
                    result: Ok(Report {
                        digest: digest.clone(),
                        loss_share: 0.1,
                        episodes: 4,
                        has_state: false,
                    }),
                },
            );
            m.handle(now, Event::Heartbeat { id });
        }
        m.handle(now, Event::Tick);
    }
    assert_eq!(m.committed(), steps, "the benchmark's steps all committed");
    t.elapsed().as_secs_f64() / steps as f64
}

pub fn machinery(a: MachineryArgs) -> Result<()> {
    let cfg = GpoConfig::official(a.dim_x);
    let n = cfg.param_count();
    // The replica's step at the official shape (8 groups), the denominator.
    let (survey, features) = super::bench_step::random_survey(8, a.dim_x, 0);
    let (survey, features) = (Arc::new(survey), Arc::new(features));
    let mut r = Replica::new(
        cfg,
        AdamConfig::default(),
        0,
        survey.clone(),
        features,
        Device::Cpu,
    )?;
    r.set_shard_groups(4);
    let groups: Vec<usize> = (0..8).collect();
    let pool: Vec<usize> = (0..survey.questions.len()).collect();
    let mut comm = Local;
    let mut step_times = Vec::new();
    for s in 1..=a.iters + 2 {
        let eps = step_episodes(
            &survey,
            0,
            s,
            &groups,
            Some(&pool),
            &SamplerConfig::default(),
        )
        .map_err(anyhow::Error::msg)?;
        let t = Instant::now();
        r.step(&eps, 8, s, a.iters + 2, &mut comm)?;
        if s > 2 {
            step_times.push(t.elapsed().as_secs_f64());
        }
    }
    let step_s = median(step_times);
    // Adam: in place (before) against out of place (now), alternating, same buffers.
    let grad: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect();
    let mut p = vec![0.1f32; n];
    let mut adam = Adam::new(n, AdamConfig::default());
    let (mut p2, mut adam2) = (Vec::new(), Adam::new(0, AdamConfig::default()));
    let (mut inplace, mut oop) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let t = Instant::now();
        adam.step(&mut p, &grad, 1e-3);
        inplace.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        adam.step_into(&p, &grad, 1e-3, &mut p2, &mut adam2);
        oop.push(t.elapsed().as_secs_f64());
    }
    let (inplace, oop) = (median(inplace), median(oop));
    println!(
        "replica step at the official shape (dim_x {}, 8 groups, {n} parameters): {:.4} s",
        a.dim_x, step_s
    );
    println!(
        "Adam in place: {:.5} s, out of place (rollback by swap): {:.5} s",
        inplace, oop
    );
    let mut machine_s = 0.0;
    for world in [2usize, 8, 64] {
        let s = machine_step_s(world, 2000);
        println!(
            "state machine per committed step, {world} members: {:.2} µs",
            s * 1e6
        );
        if world == 2 {
            machine_s = s;
        }
    }
    let machinery = machine_s + (oop - inplace).max(0.0);
    // Three significant digits whatever the size: on a noisy host the Adam difference can
    // come out 0, leaving the state machine's microsecond, which fixed decimals print as 0.
    println!(
        "machinery_s={machinery:.3e} step_s={step_s:.4} ratio={:.3e}",
        machinery / step_s
    );
    Ok(())
}
