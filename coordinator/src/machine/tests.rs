//! Unit tests of the transitions, one scenario each; the random schedules are in
//! `tests/simulation.rs`.

use super::*;

fn cfg(workers: usize) -> MachineConfig {
    MachineConfig {
        target_workers: workers,
        min_workers: 1,
        shard_groups: 1,
        ..Default::default()
    }
}

fn report(digest: &str, episodes: usize) -> Report {
    Report {
        digest: digest.into(),
        loss_share: 0.5,
        episodes,
        has_state: true,
    }
}

/// Registers `n` fresh workers with open streams and sets up generation 1.
fn started(n: usize) -> (Machine, Vec<WorkerId>) {
    let mut m = Machine::new(cfg(n), 0, 0, 0);
    let ids: Vec<WorkerId> = (0..n)
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
                .unwrap()
                .unwrap();
            m.handle(0, Event::StreamOpened { id });
            id
        })
        .collect();
    assert_eq!(m.generation(), 1);
    setup_all(&mut m, &ids, 1);
    (m, ids)
}

fn setup_all(m: &mut Machine, ids: &[WorkerId], generation: u64) -> Vec<Action> {
    let mut acts = Vec::new();
    for &id in ids {
        let o = m.handle(
            1,
            Event::Setup {
                id,
                generation,
                addr: format!("a{id}"),
            },
        );
        o.reply.unwrap();
        acts.extend(o.actions);
    }
    acts
}

fn steps_sent(acts: &[Action]) -> Vec<(WorkerId, u64, usize, usize)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SendStep {
                to,
                step,
                first,
                end,
                ..
            } => Some((*to, *step, *first, *end)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_killed_member_aborts_the_step_which_reruns_on_the_survivors() {
    let (mut m, ids) = started(3);
    let o = m.handle(
        2,
        Event::Submit {
            step: 1,
            episodes: 6,
            want_state: false,
        },
    );
    assert_eq!(steps_sent(&o.actions).len(), 3);
    // Rank 0 reports, then rank 2's process dies.
    m.handle(
        3,
        Event::StepResult {
            id: ids[0],
            generation: 1,
            step: 1,
            result: Ok(report("d1", 2)),
        },
    )
    .reply
    .unwrap();
    let o = m.handle(4, Event::StreamClosed { id: ids[2] });
    let aborts = o
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Abort { step: 1, .. }))
        .count();
    assert_eq!(aborts, 2, "{:?}", o.actions);
    assert_eq!(m.generation(), 2);
    assert!(o.actions.iter().any(|a| matches!(
        a,
        Action::Membership {
            generation: 2,
            world: 2,
            committed: 0,
            transfer: false,
            ..
        }
    )));
    // The old generation's late result is fenced.
    let late = m.handle(
        5,
        Event::StepResult {
            id: ids[1],
            generation: 1,
            step: 1,
            result: Ok(report("d1", 2)),
        },
    );
    assert!(matches!(late.reply, Err(Reject::Stale(_))));
    let acts = setup_all(&mut m, &ids[..2], 2);
    let sent = steps_sent(&acts);
    assert_eq!(sent, vec![(ids[0], 1, 0, 3), (ids[1], 1, 3, 6)]);
    for (i, &id) in ids[..2].iter().enumerate() {
        m.handle(
            10 + i as u64,
            Event::StepResult {
                id,
                generation: 2,
                step: 1,
                result: Ok(report("d1", 3)),
            },
        )
        .reply
        .unwrap();
    }
    assert_eq!(m.committed(), 1);
    let r = &m.recoveries()[0];
    assert_eq!((r.step, r.steps_recomputed), (1, 1));
    assert_eq!(r.recover_ms, Some(7));
    assert_eq!(m.counters().aborted["lost"], 1);
}

#[test]
fn a_joiner_needs_the_state_first_then_enters_between_steps() {
    let (mut m, ids) = started(1);
    m.handle(
        1,
        Event::Submit {
            step: 1,
            episodes: 2,
            want_state: false,
        },
    );
    m.handle(
        2,
        Event::StepResult {
            id: ids[0],
            generation: 1,
            step: 1,
            result: Ok(report("d1", 2)),
        },
    );
    let j = m
        .handle(
            3,
            Event::Register {
                name: "late".into(),
                holds: Some((0, None)),
            },
        )
        .reply
        .unwrap()
        .unwrap();
    m.handle(3, Event::StreamOpened { id: j });
    // Step 2 runs without it and brings rank 0's state back.
    let o = m.handle(
        4,
        Event::Submit {
            step: 2,
            episodes: 2,
            want_state: false,
        },
    );
    assert!(o.actions.iter().any(|a| matches!(
        a,
        Action::SendStep {
            want_state: true,
            ..
        }
    )));
    let o = m.handle(
        5,
        Event::StepResult {
            id: ids[0],
            generation: 1,
            step: 2,
            result: Ok(report("d2", 2)),
        },
    );
    assert!(o.actions.iter().any(|a| matches!(
        a,
        Action::Committed {
            step: 2,
            state_from: Some(_),
            ..
        }
    )));
    let o = m.handle(
        6,
        Event::Submit {
            step: 3,
            episodes: 2,
            want_state: false,
        },
    );
    assert!(o.actions.iter().any(|a| matches!(
        a,
        Action::Membership { to, generation: 2, transfer: true, committed: 2, .. } if *to == j
    )));
    assert_eq!(m.counters().joins, 1);
}

#[test]
fn a_paused_coordinator_blames_nobody_and_a_silent_worker_is_dropped() {
    let (mut m, ids) = started(2);
    m.handle(500, Event::Heartbeat { id: ids[0] });
    m.handle(500, Event::Heartbeat { id: ids[1] });
    m.handle(600, Event::Tick);
    // The coordinator was stopped for a minute: nobody is blamed for the gap.
    m.handle(60_600, Event::Tick);
    assert_eq!(m.generation(), 1);
    assert!(m.recoveries().is_empty());
    // Then one worker really goes silent.
    let mut t = 60_600;
    while t < 67_000 {
        t += 500;
        m.handle(t, Event::Heartbeat { id: ids[0] });
        m.handle(t, Event::Tick);
    }
    assert_eq!(m.generation(), 2);
    assert_eq!(m.members(), &ids[..1]);
    assert!(m.recoveries()[0].reason.contains("sent no heartbeat"));
}

#[test]
fn below_min_workers_the_run_pauses_and_max_wait_fails_it() {
    let mut c = cfg(2);
    c.min_workers = 2;
    c.max_wait = Some(10_000);
    let mut m = Machine::new(c, 0, 0, 0);
    let mut ids = Vec::new();
    for i in 0..2 {
        let id = m
            .handle(
                0,
                Event::Register {
                    name: format!("w{i}"),
                    holds: Some((0, None)),
                },
            )
            .reply
            .unwrap()
            .unwrap();
        m.handle(0, Event::StreamOpened { id });
        ids.push(id);
    }
    m.handle(
        1,
        Event::Leave {
            id: ids[1],
            reason: "SIGTERM".into(),
        },
    );
    assert_eq!(m.phase(), Phase::Paused);
    assert!(m.waiting_for().unwrap().contains("at least 2 live workers"));
    let mut t = 1;
    while t < 12_000 && !m.phase().over() {
        t += 500;
        m.handle(t, Event::Heartbeat { id: ids[0] });
        m.handle(t, Event::Tick);
    }
    assert_eq!(m.phase(), Phase::Failed);
    assert!(m.error().unwrap().contains("--max-wait"));
}

#[test]
fn bad_results_are_refused_without_changing_anything() {
    let (mut m, ids) = started(2);
    m.handle(
        2,
        Event::Submit {
            step: 1,
            episodes: 4,
            want_state: true,
        },
    );
    let before = format!("{:?}", m.round);
    let wrong_count = m.handle(
        3,
        Event::StepResult {
            id: ids[1],
            generation: 1,
            step: 1,
            result: Ok(report("d", 3)),
        },
    );
    assert!(matches!(wrong_count.reply, Err(Reject::Invalid(_))));
    let mut no_state = report("d", 2);
    no_state.has_state = false;
    let r = m.handle(
        3,
        Event::StepResult {
            id: ids[0],
            generation: 1,
            step: 1,
            result: Ok(no_state),
        },
    );
    assert!(matches!(r.reply, Err(Reject::Invalid(_))));
    let unknown = m.handle(3, Event::Heartbeat { id: 99 });
    assert!(matches!(unknown.reply, Err(Reject::UnknownWorker(_))));
    assert_eq!(before, format!("{:?}", m.round));
    // Diverging digests fail the run.
    for (i, d) in ["x", "y"].iter().enumerate() {
        m.handle(
            4,
            Event::StepResult {
                id: ids[i],
                generation: 1,
                step: 1,
                result: Ok(report(d, 2)),
            },
        );
    }
    assert_eq!(m.phase(), Phase::Failed);
    assert!(m.error().unwrap().contains("diverged"));
}

#[test]
fn a_registration_that_never_joins_expires_even_while_it_heartbeats() {
    let mut m = Machine::new(cfg(2), 0, 0, 0);
    let reg = |m: &mut Machine, name: &str| {
        m.handle(
            0,
            Event::Register {
                name: name.into(),
                holds: Some((0, None)),
            },
        )
        .reply
        .unwrap()
        .unwrap()
    };
    let squatter = reg(&mut m, "squatter");
    let real = reg(&mut m, "real");
    m.handle(0, Event::StreamOpened { id: real });
    let join = m.cfg.join_timeout;
    let mut t = 0;
    let mut dropped = Vec::new();
    while t <= join + 1_000 {
        t += 1_000;
        for id in [squatter, real] {
            let _ = m.handle(t, Event::Heartbeat { id });
        }
        let out = m.handle(t, Event::Tick);
        for a in out.actions {
            if let Action::Drop { id, reason } = a {
                dropped.push((t, id, reason));
            }
        }
    }
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let (at, id, reason) = &dropped[0];
    assert_eq!(*id, squatter);
    assert!(*at > join && reason.contains("expired"), "{at} {reason}");
    assert!(!m.workers().contains_key(&squatter));
    assert!(m.workers().contains_key(&real), "a joined worker stays");
    assert!(matches!(
        m.handle(t, Event::StreamOpened { id: squatter }).reply,
        Err(Reject::UnknownWorker(_))
    ));
}
