//! `gpo sweep`: runs a sweep file's trials on a pool of workers and writes the leaderboard.
//!
//! Why it exists: this is the I/O shell around `gpo_sweep`'s pure scheduler. It owns the
//! sweep folder (the spec, one record per trial, the leaderboard, the plots, the best
//! trial's checkpoint), turns the scheduler's actions into trial runs through an
//! [`exec::Executor`], and feeds what the runs report back as events. Everything it knows
//! is in the folder, so a sweep whose process dies is resumed by running the same command:
//! final trials are kept, running ones continue from their own checkpoints.
//!
//! Layout of DIR: `sweep.toml` (the spec, compared on resume), `trials/<id>/trial.json`
//! (the record), `trials/<id>/config.toml`, `trials/<id>/run/` (the trial's `gpo train`
//! output), `trials/<id>/events.jsonl`, `trials/<id>/train.log`, `stores/` (embedding stores
//! shared by trials), `leaderboard.csv`, `leaderboard.md`, `plots/`, `best/`.

pub mod exec;
mod plots;
pub mod pool;

use anyhow::{bail, Context, Result};
use exec::{Executor, Job, Msg};
use gpo_coordinator::RunConfig;
use gpo_sweep::record::TrialRecord;
use gpo_sweep::schedule::{Action, Event, Phase, Scheduler};
use gpo_sweep::spec::{show, Metric, SweepSpec, Trial};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

/// What a finished sweep reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Trials per phase ([`Phase::ALL`]'s order).
    pub counts: [usize; 5],
    /// The best trial and its score.
    pub best: Option<(String, f64)>,
    /// Steps not run thanks to early stopping, and the steps all trials would have run.
    pub saved_steps: (u64, u64),
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader (or a
/// resumed sweep) sees the old content or the new, never half of one.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Holds `DIR/lock` (flock) while the sweep runs: a second `gpo sweep` on the same folder
/// would start the same trials twice. The lock dies with the process (a killed sweep frees
/// it at once; its trial processes do not hold it).
fn lock(out: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = out.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "{} is in use by another gpo sweep ({}): one sweep process per folder",
            out.display(),
            holder.trim()
        );
    }
    let _ = f.set_len(0);
    let _ = std::fs::write(&path, format!("pid {}\n", std::process::id()));
    Ok(f)
}

/// The record files of a sweep folder, by trial id.
pub fn load_records(out: &Path) -> Result<BTreeMap<String, TrialRecord>> {
    let dir = out.join("trials");
    let mut recs = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(recs);
    };
    for e in entries {
        let path = e?.path().join("trial.json");
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let r =
            TrialRecord::parse(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
        recs.insert(r.id.clone(), r);
    }
    Ok(recs)
}

/// The run configuration of a trial, checked: a key the run does not know is refused,
/// naming the trial and the key.
pub fn trial_config(spec: &SweepSpec, t: &Trial) -> Result<(toml::Table, RunConfig)> {
    let table = spec
        .config(t)
        .map_err(|e| anyhow::anyhow!("trial {}: {e}", t.id))?;
    let cfg: RunConfig = toml::Value::Table(table.clone()).try_into().map_err(|e| {
        anyhow::anyhow!(
            "trial {} ({:?}): [train] with its values: {e}",
            t.id,
            t.params
        )
    })?;
    Ok((table, cfg))
}

/// The embedding store a trial reads (None: its dataset's own, or synthetic features).
pub fn store_of(spec: &SweepSpec, t: &Trial, out: &Path) -> Option<PathBuf> {
    let d = spec.dataset(t)?;
    match spec.embedder(t) {
        Some(e) => Some(out.join("stores").join(format!("{}-{}", d.name, e.name))),
        None => d.embeddings.as_ref().map(PathBuf::from),
    }
}

/// Embeds each (dataset, embedder) pair the unfinished trials use, once, before any trial
/// starts (resumable: keys already in a store are skipped).
fn ensure_stores(spec: &SweepSpec, trials: &[Trial], todo: &[bool], out: &Path) -> Result<()> {
    let mut done = std::collections::BTreeSet::new();
    for (t, _) in trials.iter().zip(todo).filter(|(_, td)| **td) {
        let (Some(d), Some(e)) = (spec.dataset(t), spec.embedder(t)) else {
            continue;
        };
        if !done.insert((d.name.clone(), e.name.clone())) {
            continue;
        }
        let store = store_of(spec, t, out).expect("an embedder gives a store");
        let data = d.data.as_ref().expect("checked: embedders need data");
        eprintln!(
            "sweep: embedding dataset `{}` with `{}` into {}",
            d.name,
            e.name,
            store.display()
        );
        crate::experiment::embed_store(
            &e.model,
            Path::new(data),
            d.format.as_deref(),
            &e.template,
            &store,
        )
        .with_context(|| format!("embedding dataset `{}` with embedder `{}`", d.name, e.name))?;
    }
    Ok(())
}

/// The sweep loop's state besides the scheduler: the records and their folder.
struct Book<'a> {
    out: &'a Path,
    recs: Vec<TrialRecord>,
    started: Vec<Option<Instant>>,
    metrics: Option<gpo_ops::metrics::SweepMetrics>,
    /// Per trial: the (step, test score) of each evaluation, to report a stopped trial's
    /// test score at its best evaluation.
    tests: Vec<Vec<(u64, f64)>>,
    /// The best score of a trial that ended (kept as trials end, not searched per event).
    best: Option<f64>,
}

impl Book<'_> {
    fn save(&self, i: usize) -> Result<()> {
        let dir = self.out.join("trials").join(&self.recs[i].id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(&dir.join("trial.json"), &self.recs[i].to_json())
    }

    fn sync_metrics(&self, sched: &Scheduler) {
        if let Some(m) = &self.metrics {
            m.states(sched.counts());
            if let Some(s) = self.best {
                m.best(s);
            }
        }
    }
}

/// Where a sweep's workers come from.
pub enum Workers {
    /// `[sweep] workers` slots of this machine.
    Local,
    /// Workers that join over gRPC; their joins and leaves arrive on the channel.
    Pool,
}

/// Runs (or resumes) the sweep of `spec_text` in `out` with `executor`, serving the sweep's
/// metrics into `metrics` when given. `channel` carries the executor's and the pool's
/// messages.
pub fn run(
    spec_text: &str,
    spec_path: &Path,
    out: &Path,
    executor: &mut dyn Executor,
    metrics: Option<gpo_ops::metrics::SweepMetrics>,
    workers: Workers,
    channel: (mpsc::Sender<Msg>, mpsc::Receiver<Msg>),
) -> Result<Outcome> {
    let t0 = Instant::now();
    let spec =
        SweepSpec::parse(spec_text).map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    std::fs::create_dir_all(out.join("trials"))
        .with_context(|| format!("creating {}", out.display()))?;
    let _lock = lock(out)?;
    let saved = out.join("sweep.toml");
    match std::fs::read_to_string(&saved) {
        Ok(old) if old != spec_text => bail!(
            "{} holds another sweep ({} differs from {}): resume with the same file, or use a new --out",
            out.display(),
            saved.display(),
            spec_path.display()
        ),
        Ok(_) => {}
        Err(_) => write_atomic(&saved, spec_text)?,
    }
    let trials = spec.trials();
    let mut jobs = Vec::with_capacity(trials.len());
    for t in &trials {
        let (table, cfg) = trial_config(&spec, t)?;
        jobs.push((table, cfg));
    }
    let mut old = load_records(out)?;
    let mut sched = Scheduler::new(
        trials.len(),
        match workers {
            Workers::Local => spec.workers,
            Workers::Pool => 0,
        },
        spec.concurrent,
        spec.gang,
        spec.max_retries,
        spec.early_stopping,
    );
    let mut recs = Vec::with_capacity(trials.len());
    for (i, t) in trials.iter().enumerate() {
        let params = t.params.iter().map(|(k, v)| (k.clone(), show(v))).collect();
        let planned = jobs[i].1.steps;
        let r = match old.remove(&t.id) {
            Some(r) => {
                if r.params != params {
                    bail!(
                        "{}: trial {} was recorded with other values ({:?}) than the spec gives ({:?})",
                        out.display(),
                        t.id,
                        r.params,
                        params
                    );
                }
                sched.restore(i, r.phase, r.attempts, &r.evals);
                r
            }
            None => TrialRecord::new(&t.id, params, planned),
        };
        recs.push(r);
    }
    if let Some(id) = old.keys().next() {
        bail!(
            "{}: trial {id} is not one of this spec's trials",
            out.display()
        );
    }
    let resumed = recs.iter().filter(|r| r.phase.is_final()).count();
    if resumed > 0 {
        eprintln!(
            "sweep: resuming; {resumed} of {} trials already ended",
            trials.len()
        );
    }
    let todo: Vec<bool> = recs.iter().map(|r| !r.phase.is_final()).collect();
    ensure_stores(&spec, &trials, &todo, out)?;
    let n = trials.len();
    let mut book = Book {
        out,
        started: vec![None; n],
        metrics,
        tests: vec![vec![]; n],
        best: gpo_sweep::leaderboard::best(&recs).and_then(|r| r.score),
        recs,
    };
    let (tx, rx) = channel;
    let mut conns: BTreeMap<u64, usize> = BTreeMap::new();
    let mut actions = sched.schedule();
    book.sync_metrics(&sched);
    loop {
        for a in std::mem::take(&mut actions) {
            match a {
                Action::Start {
                    trial,
                    gang,
                    attempt,
                    resume,
                } => {
                    let t = &trials[trial];
                    let r = &mut book.recs[trial];
                    r.phase = Phase::Running;
                    r.attempts = attempt;
                    if !resume {
                        r.evals.clear();
                        book.tests[trial].clear();
                    }
                    book.save(trial)?;
                    book.started[trial] = Some(Instant::now());
                    let d = spec.dataset(t);
                    let job = Job {
                        trial,
                        dir: out.join("trials").join(&t.id),
                        config: jobs[trial].0.clone(),
                        steps: jobs[trial].1.steps,
                        gang,
                        resume,
                        data: d.and_then(|d| d.data.clone()),
                        format: d.and_then(|d| d.format.clone()),
                        embeddings: store_of(&spec, t, out),
                    };
                    executor.start(job, tx.clone());
                }
                Action::Stop { trial } => executor.stop(trial),
                Action::Final { trial, phase } => {
                    let r = &mut book.recs[trial];
                    r.phase = phase;
                    if let Some(e) = sched.slot(trial).error.clone() {
                        r.error = Some(e);
                    }
                    if phase == Phase::Stopped {
                        // Its best evaluation so far stands (the run keeps that checkpoint).
                        let best =
                            r.evals
                                .iter()
                                .copied()
                                .fold(None::<(u64, f64)>, |b, e| match b {
                                    Some(b) if b.1 >= e.1 => Some(b),
                                    _ => Some(e),
                                });
                        if let Some((step, score)) = best {
                            r.score = Some(score);
                            r.best_step = Some(step);
                            r.test = book.tests[trial].iter().find(|p| p.0 == step).map(|p| p.1);
                        }
                    }
                    if let Some(s) = book.recs[trial].score.filter(|_| phase != Phase::Failed) {
                        book.best = Some(book.best.map_or(s, |b| b.max(s)));
                    }
                    book.save(trial)?;
                }
            }
        }
        book.sync_metrics(&sched);
        if sched.finished() {
            break;
        }
        let msg = rx.recv().context("every trial runner hung up")?;
        let ev = match msg {
            Msg::Joined { conn, name, assign } => {
                let (w, a) = sched.join();
                eprintln!(
                    "sweep: worker `{name}` joined the pool ({} live)",
                    sched.live_workers()
                );
                conns.insert(conn, w);
                executor.joined(w, name, assign);
                actions = a;
                continue;
            }
            Msg::Left { conn } => {
                if let Some(w) = conns.remove(&conn) {
                    sched.leave(w);
                    executor.left(w);
                    eprintln!(
                        "sweep: a worker left the pool ({} live)",
                        sched.live_workers()
                    );
                }
                continue;
            }
            Msg::Eval {
                trial,
                step,
                test,
                validation,
            } => {
                let score = match spec.metric {
                    Metric::Test => test,
                    // Without validation groups there is nothing to rank by; the run's end
                    // fails the trial with the reason.
                    Metric::Validation => match validation {
                        Some(v) => v,
                        None => continue,
                    },
                };
                let r = &mut book.recs[trial];
                if r.evals.last().is_none_or(|e| e.0 < step) {
                    r.evals.push((step, score));
                    r.steps_run = step;
                    book.tests[trial].push((step, test));
                    // `gpo sweep status` and a resumed stopping rule see it.
                    book.save(trial)?;
                }
                Event::Eval { trial, step, score }
            }
            Msg::Ended { trial, result } => {
                let secs = book.started[trial]
                    .take()
                    .map_or(0.0, |s| s.elapsed().as_secs_f64());
                if let Some(m) = &book.metrics {
                    m.trial_ended(secs);
                }
                let r = &mut book.recs[trial];
                r.seconds += secs;
                let score = |res: &exec::TrialResult| {
                    match spec.metric {
                    Metric::Test => Ok(res.test),
                    Metric::Validation => res.validation.ok_or_else(|| {
                        "the run has no validation score to rank by: use selection = \"validation\" (the default) or metric = \"test\"".to_string()
                    }),
                }
                };
                match result.and_then(|res| match res {
                    Some(res) => score(&res).map(|s| Some((s, res))),
                    None => Ok(None),
                }) {
                    Ok(res) => {
                        if let Some((s, res)) = res {
                            r.score = Some(s);
                            r.test = Some(res.test);
                            r.best_step = Some(res.best_step);
                            r.steps_run = res.steps_run;
                        }
                        Event::Ended { trial }
                    }
                    Err(error) => Event::Failed { trial, error },
                }
            }
        };
        actions = sched.handle(ev);
    }
    executor.close();
    let outcome = finish(&spec, out, &book.recs)?;
    Ok(Outcome {
        seconds: t0.elapsed().as_secs_f64(),
        ..outcome
    })
}

/// Writes the leaderboard, the plots and the best trial's checkpoint.
fn finish(spec: &SweepSpec, out: &Path, recs: &[TrialRecord]) -> Result<Outcome> {
    let metric = spec.metric.as_str();
    write_atomic(
        &out.join("leaderboard.csv"),
        &gpo_sweep::leaderboard::csv(recs),
    )?;
    let title = format!(
        "Sweep `{}`: {} trials, ranked by {metric}",
        spec.name,
        recs.len()
    );
    write_atomic(
        &out.join("leaderboard.md"),
        &gpo_sweep::leaderboard::markdown(recs, metric, &title, 50),
    )?;
    let best = gpo_sweep::leaderboard::best(recs).and_then(|r| Some((r.id.clone(), r.score?)));
    if let Some((id, _)) = &best {
        let run = out.join("trials").join(id).join("run");
        let dst = out.join("best");
        std::fs::create_dir_all(&dst)?;
        for f in ["best.safetensors", "summary.json"] {
            if run.join(f).exists() {
                std::fs::copy(run.join(f), dst.join(f)).with_context(|| {
                    format!("copying {} to {}", run.join(f).display(), dst.display())
                })?;
            }
        }
        write_atomic(&dst.join("TRIAL"), &format!("{id}\n"))?;
    }
    if let Err(e) = plots::write(out, recs, metric) {
        eprintln!("warning: sweep plots not written: {e:#}");
    }
    let mut counts = [0; 5];
    for r in recs {
        counts[Phase::ALL
            .iter()
            .position(|p| *p == r.phase)
            .expect("a phase")] += 1;
    }
    let planned: u64 = recs.iter().map(|r| r.planned_steps).sum();
    let saved: u64 = recs
        .iter()
        .filter(|r| r.phase == Phase::Stopped)
        .map(|r| r.planned_steps.saturating_sub(r.steps_run))
        .sum();
    Ok(Outcome {
        counts,
        best,
        saved_steps: (saved, planned),
        seconds: 0.0,
    })
}
