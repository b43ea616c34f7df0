//! The simulated workers and the fault injector: how `gpo worker` reacts to each
//! assignment (roll back, load a transferred state, set up, compute, report, register
//! again when dropped), its timers, and the faults a schedule draws.

use super::*;

impl Sim {
    pub(crate) fn worker_msg(&mut self, w: usize, m: ToWorker) -> Result<(), String> {
        let Some(id) = self.workers[w].id else {
            return Ok(());
        };
        match m {
            ToWorker::Rejected => self.reregister(w),
            ToWorker::Action(Action::Membership {
                generation,
                rank,
                world,
                committed,
                transfer,
                ..
            })
            | ToWorker::Membership(
                Action::Membership {
                    generation,
                    rank,
                    world,
                    committed,
                    transfer,
                    ..
                },
                _,
            ) => {
                let sent = match &m {
                    ToWorker::Membership(_, st) => Some(*st),
                    _ => None,
                };
                let wk = &mut self.workers[w];
                if transfer {
                    wk.state = sent.ok_or("a transfer without a state")?;
                    wk.prev = None;
                } else if wk.state.0 == committed + 1 {
                    wk.state = wk.prev.take().ok_or("no state to roll back to")?;
                } else if wk.state.0 != committed {
                    return Err(format!(
                        "generation {generation} gives no state to a worker at step {} (committed {committed})",
                        wk.state.0
                    ));
                }
                wk.generation = generation;
                wk.rank = rank;
                wk.world = world;
                wk.ready = false;
                wk.in_step = None;
                self.send(
                    w,
                    Event::Setup {
                        id,
                        generation,
                        addr: format!("w{w}"),
                    },
                );
            }
            ToWorker::Action(Action::SetupComplete { generation, .. }) => {
                if self.workers[w].generation == generation {
                    self.workers[w].ready = true;
                }
            }
            ToWorker::Action(Action::SendStep {
                generation,
                step,
                first,
                end,
                ..
            }) => {
                let wk = &mut self.workers[w];
                if generation != wk.generation || !wk.ready {
                    return Ok(());
                }
                if wk.state.0 + 1 != step {
                    return Err(format!(
                        "worker at step {} asked to run step {step}",
                        wk.state.0
                    ));
                }
                wk.in_step = Some((generation, step, end - first));
                let (rank, world) = (wk.rank, wk.world);
                let entered = self.collectives.entry((generation, step)).or_default();
                entered.push(rank);
                if entered.len() >= world {
                    // Everyone entered: the all-reduce completes after the compute.
                    let ranks = entered.clone();
                    for r in ranks {
                        if let Some(pw) = self.workers.iter().position(|x| {
                            x.generation == generation && x.rank == r && x.alive && x.id.is_some()
                        }) {
                            let at = self.now + 20 + self.rng.below(60);
                            self.push(at, Msg::Timer(pw, Timer::Compute(generation, step)));
                        }
                    }
                }
                let at = self.now + RING_TIMEOUT;
                self.push(at, Msg::Timer(w, Timer::RingTimeout(generation, step)));
            }
            ToWorker::Action(Action::Abort {
                generation, step, ..
            }) => {
                let wk = &mut self.workers[w];
                if wk
                    .in_step
                    .is_some_and(|(g, s, _)| g == generation && s == step)
                {
                    wk.in_step = None;
                }
            }
            ToWorker::Action(Action::Drop { .. }) => self.reregister(w),
            ToWorker::Action(Action::Shutdown { .. }) => {
                self.workers[w].alive = false;
            }
            ToWorker::Action(Action::Committed { .. } | Action::Rewind { .. })
            | ToWorker::Membership(..) => {}
        }
        Ok(())
    }

    pub(crate) fn reregister(&mut self, w: usize) {
        let wk = &mut self.workers[w];
        if let Some(id) = wk.id.take() {
            self.by_id.remove(&id);
        }
        wk.epoch += 1;
        wk.generation = 0;
        wk.ready = false;
        wk.in_step = None;
        let at = self.now + self.delay();
        self.push(at, Msg::Timer(w, Timer::Register));
    }

    pub(crate) fn timer(&mut self, w: usize, t: Timer) -> Result<(), String> {
        match t {
            Timer::Register => {
                if self.workers[w].id.is_none() {
                    let fresh = self.workers[w].state.0 == 0 && self.workers[w].epoch == 0;
                    let st = self.workers[w].state;
                    let ev = Event::Register {
                        name: format!("w{w}"),
                        holds: Some(if fresh {
                            (0, None)
                        } else {
                            (st.0, Some(st.1.to_string()))
                        }),
                    };
                    // Registration is a call and its answer; it is modelled as immediate.
                    self.coord(ev, Some(w))?;
                    let at = self.now + HEARTBEAT;
                    let e = self.workers[w].epoch;
                    self.push(at, Msg::Timer(w, Timer::Heartbeat(e)));
                }
            }
            Timer::Heartbeat(epoch) => {
                if self.workers[w].epoch == epoch {
                    if let Some(id) = self.workers[w].id {
                        self.send(w, Event::Heartbeat { id });
                    }
                    let at = self.now + HEARTBEAT;
                    self.push(at, Msg::Timer(w, Timer::Heartbeat(epoch)));
                }
            }
            Timer::Compute(generation, step) => {
                let wk = &mut self.workers[w];
                let Some((g, s, n)) = wk.in_step else {
                    return Ok(());
                };
                if g != generation || s != step {
                    return Ok(());
                }
                wk.prev = Some(wk.state);
                wk.state = (step, next_digest(wk.state.1, step));
                wk.in_step = None;
                let Some(id) = wk.id else { return Ok(()) };
                let report = Report {
                    digest: wk.state.1.to_string(),
                    loss_share: 0.0,
                    episodes: n,
                    has_state: true,
                };
                self.send(
                    w,
                    Event::StepResult {
                        id,
                        generation,
                        step,
                        result: Ok(report),
                    },
                );
            }
            Timer::RingTimeout(generation, step) => {
                let wk = &mut self.workers[w];
                if wk
                    .in_step
                    .is_some_and(|(g, s, _)| g == generation && s == step)
                {
                    wk.in_step = None;
                    if let Some(id) = wk.id {
                        self.send(
                            w,
                            Event::StepResult {
                                id,
                                generation,
                                step,
                                result: Err("ring: receiving timed out".into()),
                            },
                        );
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn live(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&w| self.workers[w].alive && self.workers[w].stalled_until.is_none())
            .collect()
    }

    pub(crate) fn fault(&mut self, f: Fault) -> Result<(), String> {
        match f {
            Fault::Kill | Fault::Leave | Fault::Stall(_) => {
                let live = self.live();
                // Keep one worker alive: the schedule tests recovery, not the end of all.
                if live.len() <= 1 {
                    return Ok(());
                }
                let w = live[self.rng.below(live.len() as u64) as usize];
                match f {
                    Fault::Kill => {
                        self.workers[w].alive = false;
                        if let Some(id) = self.workers[w].id {
                            let at = self.now + self.delay();
                            let inst = self.instance;
                            self.push(at, Msg::ToCoord(Event::StreamClosed { id }, w, inst));
                        }
                        // A replacement comes up, as a supervisor would start one.
                        if self.rng.chance(0.7) {
                            self.spawn_worker();
                        }
                    }
                    Fault::Leave => {
                        self.workers[w].alive = false;
                        if let Some(id) = self.workers[w].id {
                            self.send(
                                w,
                                Event::Leave {
                                    id,
                                    reason: "SIGTERM".into(),
                                },
                            );
                        }
                    }
                    Fault::Stall(d) => {
                        self.workers[w].stalled_until = Some(self.now + d);
                        let at = self.now + d;
                        self.push(at, Msg::Fault(Fault::Wake(w)));
                    }
                    _ => unreachable!(),
                }
            }
            Fault::Wake(w) => {
                self.workers[w].stalled_until = None;
            }
            Fault::Join => {
                self.spawn_worker();
            }
            Fault::TopUp => {
                let alive = self.workers.iter().filter(|w| w.alive).count();
                for _ in alive..self.cfg.target_workers {
                    self.spawn_worker();
                }
            }
            Fault::RestartCoordinator => {
                if std::env::var("GPO_SIM_TRACE").is_ok() {
                    eprintln!("{:>7} restart from {:?}", self.now, self.persisted);
                }
                self.stats.restarts += 1;
                self.instance += 1;
                let (step, digest, generation) = self.persisted;
                self.machine = Machine::new(self.cfg.clone(), self.now, step, generation);
                self.coord_state = (step, digest);
                self.last_committed = step;
                self.by_id.clear();
                self.collectives.clear();
                for w in 0..self.workers.len() {
                    if self.workers[w].alive {
                        // Their connections broke: they find the new leader and register.
                        self.reregister(w);
                    }
                }
                let at = self.now + 1;
                self.push(at, Msg::Submit(step + 1));
            }
        }
        Ok(())
    }
}
