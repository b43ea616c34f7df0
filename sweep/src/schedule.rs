//! The gang scheduler: which trial runs next, on which workers of the pool.
//!
//! Why it exists: a sweep's throughput and its correctness both come down to a few rules,
//! and they are easy to get subtly wrong when they are spread over process handling. Here
//! they are one state machine — fed [`Event`]s, answering [`Action`]s, with no I/O and no
//! clock — whose invariants a property test checks on arbitrary event orders:
//!
//! - a gang is all or nothing: a trial starts only when `gang` free workers exist, and it
//!   gets exactly that many; no worker is in two gangs; no trial holds workers while it
//!   waits;
//! - at most `concurrent` trials run at once, and as soon as one ends the next starts;
//! - a failed trial runs again up to `max_retries` times, then is marked failed;
//! - a trial that is done, stopped early or failed never runs again, which is what makes a
//!   resumed sweep (see [`Scheduler::restore`]) run each trial to completion once.

use crate::spec::EarlyStopping;
use crate::stopping::Stopper;

/// Where a trial is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for a gang.
    Pending,
    /// Running on its gang.
    Running,
    /// Ran to its last step.
    Done,
    /// Stopped early by the stopping rule (its best checkpoint so far stands).
    Stopped,
    /// Failed more than `max_retries` times.
    Failed,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Running,
        Phase::Done,
        Phase::Stopped,
        Phase::Failed,
    ];
    /// Whether the trial will never run again.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Stopped | Phase::Failed)
    }
    /// The name in records, metrics and the leaderboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// What happened to a trial.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The trial evaluated: its ranking score at `step`.
    Eval {
        /// Trial index.
        trial: usize,
        /// Step.
        step: u64,
        /// Ranking score.
        score: f64,
    },
    /// The trial's run ended without error (to its last step, or stopped when asked).
    Ended {
        /// Trial index.
        trial: usize,
    },
    /// The trial's run failed.
    Failed {
        /// Trial index.
        trial: usize,
        /// Why.
        error: String,
    },
}

/// What the scheduler wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start `trial` on these workers (its `attempt`-th run, from 1). `resume`: continue
    /// from its checkpoints (a trial that was running when the sweep's process died).
    Start {
        /// Trial index.
        trial: usize,
        /// Worker indices of the pool, `gang` of them.
        gang: Vec<usize>,
        /// 1 for the first run.
        attempt: u32,
        /// Continue from the trial's own checkpoints.
        resume: bool,
    },
    /// Stop `trial` early (it keeps its best checkpoint so far); an [`Event::Ended`] follows.
    Stop {
        /// Trial index.
        trial: usize,
    },
    /// The trial reached a final phase (record it).
    Final {
        /// Trial index.
        trial: usize,
        /// Its phase.
        phase: Phase,
    },
}

/// One trial's place in the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// Its phase.
    pub phase: Phase,
    /// Runs started so far.
    pub attempts: u32,
    /// Its gang while it runs.
    pub gang: Vec<usize>,
    /// The last failure's message.
    pub error: Option<String>,
    /// Continue from checkpoints when it next starts.
    pub resume: bool,
    /// Asked to stop early (ends as [`Phase::Stopped`]).
    pub stopping: bool,
}

/// The sweep's scheduler.
#[derive(Debug, Clone)]
pub struct Scheduler {
    trials: Vec<Slot>,
    /// The pool, by worker index (a worker that left keeps its index).
    workers: Vec<Worker>,
    concurrent: usize,
    gang: usize,
    max_retries: u32,
    stopper: Stopper,
    /// Next pending trial to look at (trials start in index order).
    cursor: usize,
    /// Trials per phase, in [`Phase::ALL`]'s order.
    counts: [usize; 5],
}

/// A worker of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Worker {
    /// In no gang.
    Free,
    /// In the gang of this trial.
    Busy(usize),
    /// Left the pool (a gang it was in runs on without it: the run's own fault tolerance).
    Gone,
}

fn index(p: Phase) -> usize {
    Phase::ALL.iter().position(|q| *q == p).expect("a phase")
}

impl Scheduler {
    /// `trials` pending trials on a pool of `workers` (0 for a pool that workers
    /// [`Scheduler::join`]).
    pub fn new(
        trials: usize,
        workers: usize,
        concurrent: usize,
        gang: usize,
        max_retries: u32,
        rule: EarlyStopping,
    ) -> Self {
        assert!(gang >= 1 && concurrent >= 1);
        Scheduler {
            trials: vec![
                Slot {
                    phase: Phase::Pending,
                    attempts: 0,
                    gang: vec![],
                    error: None,
                    resume: false,
                    stopping: false,
                };
                trials
            ],
            workers: vec![Worker::Free; workers],
            concurrent,
            gang,
            max_retries,
            stopper: Stopper::new(rule),
            cursor: 0,
            counts: [trials, 0, 0, 0, 0],
        }
    }

    /// Restores a trial from its record (before the first [`Scheduler::schedule`]): a final
    /// trial stays final; one that was running continues from its checkpoints. `evals` feed
    /// the stopping rule as they were reported.
    pub fn restore(&mut self, trial: usize, phase: Phase, attempts: u32, evals: &[(u64, f64)]) {
        for &(step, score) in evals {
            self.stopper.report(trial, step, score);
        }
        let s = &mut self.trials[trial];
        s.attempts = attempts;
        match phase {
            Phase::Running => {
                s.resume = true;
                // The interrupted run was not its fault: it keeps its attempt.
                s.attempts = attempts.saturating_sub(1);
                self.set(trial, Phase::Pending);
            }
            p => self.set(trial, p),
        }
    }

    fn set(&mut self, trial: usize, phase: Phase) {
        let s = &mut self.trials[trial];
        self.counts[index(s.phase)] -= 1;
        self.counts[index(phase)] += 1;
        s.phase = phase;
    }

    /// A trial's state.
    pub fn slot(&self, trial: usize) -> &Slot {
        &self.trials[trial]
    }

    /// How many trials are in each phase (in [`Phase::ALL`]'s order).
    pub fn counts(&self) -> [usize; 5] {
        self.counts
    }

    /// Whether every trial is final.
    pub fn finished(&self) -> bool {
        self.counts[0] + self.counts[1] == 0
    }

    /// The best score a trial reported.
    pub fn best(&self, trial: usize) -> Option<f64> {
        self.stopper.best(trial)
    }

    fn running(&self) -> usize {
        self.counts[1]
    }

    /// Starts every trial that can start now.
    pub fn schedule(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while self.running() < self.concurrent {
            let free: Vec<usize> = (0..self.workers.len())
                .filter(|w| self.workers[*w] == Worker::Free)
                .take(self.gang)
                .collect();
            if free.len() < self.gang {
                break;
            }
            while self.cursor < self.trials.len()
                && self.trials[self.cursor].phase != Phase::Pending
            {
                self.cursor += 1;
            }
            // Retried trials go back before the cursor; look for them from the start.
            let next = if self.cursor < self.trials.len() {
                Some(self.cursor)
            } else {
                self.trials.iter().position(|t| t.phase == Phase::Pending)
            };
            let Some(t) = next else { break };
            for &w in &free {
                self.workers[w] = Worker::Busy(t);
            }
            self.set(t, Phase::Running);
            let s = &mut self.trials[t];
            s.attempts += 1;
            s.gang = free.clone();
            s.stopping = false;
            out.push(Action::Start {
                trial: t,
                gang: free,
                attempt: s.attempts,
                resume: std::mem::take(&mut s.resume),
            });
        }
        out
    }

    fn release(&mut self, trial: usize) {
        for w in std::mem::take(&mut self.trials[trial].gang) {
            if self.workers[w] == Worker::Busy(trial) {
                self.workers[w] = Worker::Free;
            }
        }
    }

    /// A worker joins the pool: its index, and the trials that can start now.
    pub fn join(&mut self) -> (usize, Vec<Action>) {
        self.workers.push(Worker::Free);
        (self.workers.len() - 1, self.schedule())
    }

    /// A worker leaves the pool. A trial whose gang it was in goes on (a distributed run
    /// continues with the workers it has left, or fails and is retried); the worker is
    /// never given to a gang again.
    pub fn leave(&mut self, worker: usize) {
        if let Some(w) = self.workers.get_mut(worker) {
            *w = Worker::Gone;
        }
    }

    /// Workers in the pool (not gone).
    pub fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| **w != Worker::Gone).count()
    }

    /// Feeds one event; answers what to do, including the trials that can start now.
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::Eval { trial, step, score } => {
                let s = &self.trials[trial];
                let stopping = s.stopping;
                if s.phase == Phase::Running && self.stopper.report(trial, step, score) && !stopping
                {
                    self.trials[trial].stopping = true;
                    out.push(Action::Stop { trial });
                }
            }
            Event::Ended { trial } => {
                if self.trials[trial].phase != Phase::Running {
                    return out;
                }
                self.release(trial);
                let phase = if self.trials[trial].stopping {
                    Phase::Stopped
                } else {
                    Phase::Done
                };
                self.set(trial, phase);
                out.push(Action::Final { trial, phase });
            }
            Event::Failed { trial, error } => {
                if self.trials[trial].phase != Phase::Running {
                    return out;
                }
                self.release(trial);
                let s = &mut self.trials[trial];
                s.error = Some(error);
                // Failing while asked to stop: what it had stands.
                let phase = if s.stopping {
                    Phase::Stopped
                } else if s.attempts > self.max_retries {
                    Phase::Failed
                } else {
                    Phase::Pending
                };
                self.set(trial, phase);
                if phase != Phase::Pending {
                    out.push(Action::Final { trial, phase });
                }
            }
        }
        out.extend(self.schedule());
        out
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
