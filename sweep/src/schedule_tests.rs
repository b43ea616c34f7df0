//! Tests of [`super`] (kept apart so the module stays readable).
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
