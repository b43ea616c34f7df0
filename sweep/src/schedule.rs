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
        self.stopper.best_of(trial)
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn starts(a: &[Action]) -> Vec<(usize, Vec<usize>)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Start { trial, gang, .. } => Some((*trial, gang.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn gangs_fill_the_pool_and_the_next_trial_starts_when_one_ends() {
        let mut s = Scheduler::new(5, 5, 4, 2, 0, EarlyStopping::None);
        // 5 workers hold two gangs of 2; the fifth worker is never half a gang.
        assert_eq!(
            starts(&s.schedule()),
            vec![(0, vec![0, 1]), (1, vec![2, 3])]
        );
        let a = s.handle(Event::Ended { trial: 1 });
        assert_eq!(
            a[0],
            Action::Final {
                trial: 1,
                phase: Phase::Done
            }
        );
        assert_eq!(starts(&a), vec![(2, vec![2, 3])]);
        assert_eq!(s.counts(), [2, 2, 1, 0, 0]);
    }

    #[test]
    fn a_failed_trial_is_retried_then_marked_failed_with_its_error() {
        let mut s = Scheduler::new(1, 1, 1, 1, 1, EarlyStopping::None);
        s.schedule();
        let a = s.handle(Event::Failed {
            trial: 0,
            error: "boom".into(),
        });
        assert!(
            matches!(
                a[..],
                [Action::Start {
                    trial: 0,
                    attempt: 2,
                    ..
                }]
            ),
            "{a:?}"
        );
        let a = s.handle(Event::Failed {
            trial: 0,
            error: "boom 2".into(),
        });
        assert_eq!(
            a,
            vec![Action::Final {
                trial: 0,
                phase: Phase::Failed
            }]
        );
        assert_eq!(s.slot(0).error.as_deref(), Some("boom 2"));
        assert!(s.finished());
    }

    #[test]
    fn a_restored_sweep_skips_final_trials_and_resumes_running_ones() {
        let mut s = Scheduler::new(3, 2, 2, 1, 0, EarlyStopping::None);
        s.restore(0, Phase::Done, 1, &[(10, 0.7)]);
        s.restore(1, Phase::Running, 1, &[(10, 0.6)]);
        let a = s.schedule();
        assert_eq!(
            a[0],
            Action::Start {
                trial: 1,
                gang: vec![0],
                attempt: 1,
                resume: true
            }
        );
        assert_eq!(
            a[1],
            Action::Start {
                trial: 2,
                gang: vec![1],
                attempt: 1,
                resume: false
            }
        );
        assert_eq!(s.best(0), Some(0.7));
    }

    #[test]
    fn a_trial_the_rule_stops_ends_stopped() {
        let rule = EarlyStopping::Asha {
            grace: 10,
            reduction: 2.0,
        };
        let mut s = Scheduler::new(2, 2, 2, 1, 0, rule);
        s.schedule();
        assert!(s
            .handle(Event::Eval {
                trial: 0,
                step: 10,
                score: 0.9
            })
            .is_empty());
        let a = s.handle(Event::Eval {
            trial: 1,
            step: 10,
            score: 0.1,
        });
        assert_eq!(a, vec![Action::Stop { trial: 1 }]);
        // Asked once only.
        assert!(s
            .handle(Event::Eval {
                trial: 1,
                step: 20,
                score: 0.0
            })
            .is_empty());
        let a = s.handle(Event::Ended { trial: 1 });
        assert_eq!(
            a,
            vec![Action::Final {
                trial: 1,
                phase: Phase::Stopped
            }]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Eval(usize, u64, u32),
        End(usize),
        Fail(usize),
        Join,
        Leave(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..12usize, 1..100u64, 0..100u32).prop_map(|(t, s, v)| Op::Eval(t, s, v)),
            (0..12usize).prop_map(Op::End),
            (0..12usize).prop_map(Op::Fail),
            Just(Op::Join),
            (0..12usize).prop_map(Op::Leave),
        ]
    }

    proptest! {
        #[test]
        fn every_order_of_events_keeps_gangs_whole_and_runs_each_trial_to_an_end_once(
            workers in 0..9usize,
            gang in 1..4usize,
            concurrent in 1..5usize,
            retries in 0..3u32,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let rule = EarlyStopping::Median { grace: 10, min_trials: 1 };
            let mut s = Scheduler::new(12, workers, concurrent, gang, retries, rule);
            let mut gone = vec![false; workers];
            let mut actions = s.schedule();
            let mut finals = vec![0; 12];
            let check = |s: &Scheduler, gone: &[bool], actions: &[Action], finals: &mut Vec<usize>| {
                let mut held = vec![false; gone.len()];
                let mut running = 0;
                for t in 0..12 {
                    let slot = s.slot(t);
                    if slot.phase == Phase::Running {
                        running += 1;
                        prop_assert_eq!(slot.gang.len(), gang, "a gang is whole");
                        for &w in &slot.gang {
                            prop_assert!(!held[w], "worker {} in two gangs", w);
                            held[w] = true;
                        }
                    } else {
                        prop_assert!(slot.gang.is_empty(), "no workers held while not running");
                    }
                    prop_assert!(slot.attempts <= retries + 1);
                }
                for a in actions {
                    match a {
                        Action::Start { gang: g, .. } => {
                            prop_assert!(g.iter().all(|w| !gone[*w]), "a gone worker in a new gang");
                        }
                        Action::Final { trial, .. } => {
                            finals[*trial] += 1;
                            prop_assert_eq!(finals[*trial], 1, "trial {} ended twice", trial);
                        }
                        Action::Stop { .. } => {}
                    }
                }
                prop_assert!(running <= concurrent);
                // Work conserving: nothing pending while a gang and a run slot are free.
                let pending = (0..12).any(|t| s.slot(t).phase == Phase::Pending);
                let free = (0..gone.len()).filter(|w| !held[*w] && !gone[*w]).count();
                prop_assert!(!(pending && running < concurrent && free >= gang));
                prop_assert_eq!(s.live_workers(), gone.iter().filter(|g| !**g).count());
                Ok(())
            };
            check(&s, &gone, &actions, &mut finals)?;
            for o in ops {
                actions = match o {
                    Op::Eval(t, st, v) => s.handle(Event::Eval { trial: t, step: st, score: v as f64 / 100.0 }),
                    Op::End(t) => s.handle(Event::Ended { trial: t }),
                    Op::Fail(t) => s.handle(Event::Failed { trial: t, error: "x".into() }),
                    Op::Join => {
                        let (w, a) = s.join();
                        prop_assert_eq!(w, gone.len());
                        gone.push(false);
                        a
                    }
                    Op::Leave(w) => {
                        if w < gone.len() {
                            s.leave(w);
                            gone[w] = true;
                        }
                        vec![]
                    }
                };
                check(&s, &gone, &actions, &mut finals)?;
            }
            // Drain: end every running trial (adding workers when too few are left) until
            // all are final.
            let mut guard = 0;
            while !s.finished() {
                let a = match (0..12).find(|t| s.slot(*t).phase == Phase::Running) {
                    Some(t) => s.handle(Event::Ended { trial: t }),
                    None => {
                        gone.push(false);
                        s.join().1
                    }
                };
                check(&s, &gone, &a, &mut finals)?;
                guard += 1;
                prop_assert!(guard < 200);
            }
            prop_assert!(finals.iter().all(|f| *f == 1), "{:?}", finals);
        }
    }
}
