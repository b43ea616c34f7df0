//! `gpo bench sweep`: what the sweep loop costs over the ideal schedule, on trials whose
//! compute is a fixed sleep, on simulated workers.
//!
//! Ideal: `trials × seconds / workers` (every worker busy all the time). Measured: the wall
//! time of the real sweep loop — the spec's expansion and checks, the scheduler, one record
//! file written at every start and end, the leaderboard at the end — with
//! [`crate::sweep::exec::Sleep`] in place of `gpo train`.

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Trials.
    #[arg(long, default_value_t = 1000)]
    pub trials: usize,
    /// Simulated workers (one per trial: gangs of 1).
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Seconds each trial sleeps.
    #[arg(long, default_value_t = 1.0)]
    pub trial_seconds: f64,
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    anyhow::ensure!(
        a.trials > 0 && a.workers > 0,
        "--trials and --workers must be positive"
    );
    let spec = format!(
        "[sweep]\nname = \"bench\"\nsearch = \"random\"\nsamples = {}\nconcurrent = {w}\nworkers = {w}\nmetric = \"test\"\n\
         [train]\nsteps = 10\n[space]\nlr = {{ log_uniform = [1e-4, 1e-2] }}\nseed = {{ int = [0, 1000000] }}\n",
        a.trials,
        w = a.workers
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, &spec)?;
    let mut exec = crate::sweep::exec::Sleep {
        seconds: a.trial_seconds,
    };
    let o = crate::sweep::run(
        &spec,
        &path,
        &dir.path().join("out"),
        &mut exec,
        None,
        crate::sweep::Workers::Local,
        std::sync::mpsc::channel(),
    )?;
    let ideal = a.trials as f64 * a.trial_seconds / a.workers as f64;
    let ideal = ideal.max(a.trial_seconds);
    println!(
        "{} trials of {} s on {} workers: {:.1} s against an ideal of {:.1} s: overhead {:.2}% ({} done)",
        a.trials,
        a.trial_seconds,
        a.workers,
        o.seconds,
        ideal,
        100.0 * (o.seconds / ideal - 1.0),
        o.counts[2]
    );
    Ok(())
}
