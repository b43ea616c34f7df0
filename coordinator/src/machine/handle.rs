//! The transitions of [`Machine`]: one function per event, and the helpers that form
//! generations, start and commit rounds, and lose members.

use super::*;

/// What handling one event produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What the adapter must do, in order.
    pub actions: Vec<Action>,
    /// The answer to the message: `Ok(Some(id))` for a registration, `Ok(None)` for any
    /// other accepted event, or why it was refused (then nothing changed).
    pub reply: Result<Option<WorkerId>, Reject>,
}

impl Machine {
    /// Handles one event at time `now`.
    pub fn handle(&mut self, now: Ms, ev: Event) -> Outcome {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let mut reform: Option<String> = None;
        let reply = match ev {
            Event::Register { name, holds } => self.register(name, holds),
            Event::StreamOpened { id } => self.stream_opened(id, &mut reform),
            Event::StreamClosed { id } => {
                if self.workers.contains_key(&id) {
                    self.lose(
                        id,
                        Loss::Closed,
                        "closed its connection",
                        &mut out,
                        &mut reform,
                    );
                }
                Ok(None)
            }
            Event::Heartbeat { id } => match self.workers.get_mut(&id) {
                Some(w) => {
                    w.last_seen = self.now;
                    Ok(None)
                }
                None => Err(unknown(id)),
            },
            Event::Setup {
                id,
                generation,
                addr,
            } => self.setup(id, generation, addr, &mut out),
            Event::StepResult {
                id,
                generation,
                step,
                result,
            } => self.step_result(id, generation, step, result, &mut out, &mut reform),
            Event::Leave { id, reason } => {
                if self.workers.contains_key(&id) {
                    let why = format!("left the run ({reason})");
                    self.lose(id, Loss::Left, &why, &mut out, &mut reform);
                }
                Ok(None)
            }
            Event::Tick => {
                self.tick(&mut out, &mut reform);
                Ok(None)
            }
            Event::Submit {
                step,
                episodes,
                want_state,
            } => self.submit(step, episodes, want_state),
            Event::Fail { reason } => {
                self.fail(reason, &mut out);
                Ok(None)
            }
            Event::Finish => {
                if !self.phase.over() {
                    self.phase = Phase::Done;
                    self.shutdown_all("the run finished", false, &mut out);
                }
                Ok(None)
            }
        };
        if let Some(why) = reform {
            if !self.phase.over() {
                self.reform(&why, &mut out);
            }
        }
        self.try_start_round(&mut out);
        Outcome {
            actions: out,
            reply,
        }
    }

    fn register(
        &mut self,
        name: String,
        holds: Option<(u64, Option<String>)>,
    ) -> Result<Option<WorkerId>, Reject> {
        if self.phase.over() {
            return Err(Reject::Precondition(format!(
                "the run is over ({})",
                self.phase.name()
            )));
        }
        let holds = match holds {
            Some((0, None)) => Some(0),
            Some((s, Some(d)))
                if s == self.committed && self.committed_digest.as_deref() == Some(d.as_str()) =>
            {
                Some(s)
            }
            _ => None,
        };
        self.next_id += 1;
        let id = self.next_id;
        let mut name: String = name.chars().take(MAX_NAME_LEN).collect();
        if name.is_empty() {
            name = format!("worker-{id}");
        }
        self.workers.insert(
            id,
            Worker {
                name,
                stream: false,
                last_seen: self.now,
                holds,
                last_step: 0,
                registered_at: self.now,
                joined: false,
            },
        );
        self.counters.registrations += 1;
        Ok(Some(id))
    }

    fn stream_opened(
        &mut self,
        id: WorkerId,
        reform: &mut Option<String>,
    ) -> Result<Option<WorkerId>, Reject> {
        let w = self.workers.get_mut(&id).ok_or_else(|| unknown(id))?;
        if w.stream {
            return Err(Reject::Duplicate(format!(
                "worker {id} already has an assignment stream"
            )));
        }
        w.stream = true;
        w.joined = true;
        w.last_seen = self.now;
        let ready = self.ready_workers().len();
        match self.phase {
            Phase::Waiting if ready >= self.cfg.target_workers => {
                *reform = Some(format!("{ready} workers registered"));
            }
            Phase::Paused if ready >= self.cfg.min_workers => {
                *reform = Some(format!("{ready} workers are live again"));
            }
            _ => {}
        }
        Ok(None)
    }

    fn setup(
        &mut self,
        id: WorkerId,
        generation: u64,
        addr: String,
        out: &mut Vec<Action>,
    ) -> Result<Option<WorkerId>, Reject> {
        let w = self.workers.get_mut(&id).ok_or_else(|| unknown(id))?;
        w.last_seen = self.now;
        let current = self.generation_number;
        let Some(g) = self.generation.as_mut().filter(|g| g.number == generation) else {
            self.counters.fenced_messages += 1;
            return Err(Reject::Stale(format!(
                "stale generation {generation}: the run is at membership generation {current}"
            )));
        };
        let rank = g
            .members
            .iter()
            .position(|&m| m == id)
            .ok_or_else(|| not_member(id, generation))?;
        match &g.addrs[rank] {
            Some(a) if *a != addr => {
                return Err(Reject::Duplicate(format!(
                    "rank {rank} already set up generation {generation} with address {a}"
                )))
            }
            _ => g.addrs[rank] = Some(addr),
        }
        if !g.ready && g.addrs.iter().all(Option::is_some) {
            g.ready = true;
            out.push(Action::SetupComplete {
                generation,
                addrs: g.addrs.iter().flatten().cloned().collect(),
            });
        }
        Ok(None)
    }

    fn step_result(
        &mut self,
        id: WorkerId,
        generation: u64,
        step: u64,
        result: Result<Report, String>,
        out: &mut Vec<Action>,
        reform: &mut Option<String>,
    ) -> Result<Option<WorkerId>, Reject> {
        if !self.workers.contains_key(&id) {
            return Err(unknown(id));
        }
        if generation != self.generation_number || self.generation.is_none() {
            self.counters.fenced_messages += 1;
            return Err(Reject::Stale(format!(
                "stale generation {generation}: the run is at membership generation {}",
                self.generation_number
            )));
        }
        let rank = self.rank_of(id).ok_or_else(|| not_member(id, generation))?;
        let w = self.workers.get_mut(&id).expect("checked above");
        w.last_seen = self.now;
        let skip = self.cfg.skip_digest_check;
        let round = match self.round.as_mut() {
            Some(r) if r.step == step && r.generation == generation => r,
            Some(r) => {
                return Err(Reject::Precondition(format!(
                    "step {step} is not in progress (step {} is)",
                    r.step
                )))
            }
            None => {
                return Err(Reject::Precondition(format!(
                    "step {step} is not in progress"
                )))
            }
        };
        if round.results[rank].is_some() {
            return Err(Reject::Duplicate(format!(
                "rank {rank} already reported step {step}"
            )));
        }
        match result {
            Ok(report) => {
                let assigned = round.bounds[rank + 1] - round.bounds[rank];
                if report.episodes != assigned {
                    return Err(Reject::Invalid(format!(
                        "the result covers {} episodes, rank {rank} was assigned {assigned}",
                        report.episodes
                    )));
                }
                if round.want_state && rank == 0 && !report.has_state && !skip {
                    return Err(Reject::Invalid(format!(
                        "step {step} asked rank 0 for its state and the result has none"
                    )));
                }
                round.results[rank] = Some(report);
                self.workers.get_mut(&id).expect("checked").last_step = step;
                if round.results.iter().all(Option::is_some) {
                    self.commit(out);
                }
            }
            Err(e) => {
                let why = format!("{} failed step {step}: {e}", self.label(id));
                if self.recoveries.iter().all(|r| r.recover_ms.is_some()) {
                    self.recoveries.push(Recovery {
                        step,
                        reason: why.clone(),
                        detect_ms: 0,
                        detected_at: self.now,
                        recover_ms: None,
                        steps_recomputed: 0,
                    });
                }
                self.abort_round(&why, "error", out);
                self.attempts += 1;
                if self.attempts >= self.cfg.max_step_attempts {
                    let n = self.attempts;
                    self.fail(
                        format!("step {step} failed {n} times in a row; last: {why}"),
                        out,
                    );
                } else {
                    *reform = Some(why);
                }
            }
        }
        Ok(None)
    }

    fn tick(&mut self, out: &mut Vec<Action>, reform: &mut Option<String>) {
        let now = self.now;
        let gap = now.saturating_sub(self.last_tick);
        self.last_tick = now;
        if self.phase.over() {
            return;
        }
        // The coordinator itself was not running (stopped, or starved of CPU): silence in
        // that gap says nothing about the workers, so nobody is blamed for it.
        if gap > self.cfg.heartbeat_timeout / 2 {
            for w in self.workers.values_mut() {
                w.last_seen = w.last_seen.max(now);
                if !w.joined {
                    w.registered_at = w.registered_at.saturating_add(gap);
                }
            }
            if let Some(r) = self.round.as_mut() {
                r.deadline += gap;
            }
            if let Some(g) = self.generation.as_mut() {
                g.formed_at += gap;
            }
            return;
        }
        let timeout = self.cfg.heartbeat_timeout;
        let silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.last_seen) > timeout)
            .map(|(&id, _)| id)
            .collect();
        for id in silent {
            let why = format!("sent no heartbeat for {:.1}s", timeout as f64 / 1000.0);
            self.lose(id, Loss::Heartbeat, &why, out, reform);
        }
        let join = self.cfg.join_timeout;
        let never_joined: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.joined && now.saturating_sub(w.registered_at) > join)
            .map(|(&id, _)| id)
            .collect();
        for id in never_joined {
            let why = format!(
                "registered {:.1}s ago and never opened its assignment stream: the registration expired",
                join as f64 / 1000.0
            );
            self.lose(id, Loss::Expired, &why, out, reform);
        }
        if let Some(r) = self.round.as_ref().filter(|r| now > r.deadline) {
            let late: Vec<WorkerId> = r
                .results
                .iter()
                .enumerate()
                .filter(|(_, x)| x.is_none())
                .filter_map(|(rank, _)| self.members().get(rank).copied())
                .collect();
            let secs = (r.deadline - r.started) as f64 / 1000.0;
            let step = r.step;
            for id in late {
                let why = format!("missed the deadline of step {step} ({secs:.1}s)");
                self.lose(id, Loss::Deadline, &why, out, reform);
            }
        }
        if let Some(g) = self
            .generation
            .as_ref()
            .filter(|g| !g.ready && now > g.formed_at + self.cfg.setup_timeout)
        {
            let slow: Vec<WorkerId> = g
                .members
                .iter()
                .zip(&g.addrs)
                .filter(|(_, a)| a.is_none())
                .map(|(&id, _)| id)
                .collect();
            for id in slow {
                self.lose(
                    id,
                    Loss::Setup,
                    "did not set up the collective in time",
                    out,
                    reform,
                );
            }
        }
        match self.phase {
            Phase::Paused => {
                let since = self.paused_since.unwrap_or(now);
                if let Some(max) = self.cfg.max_wait.filter(|&m| now - since > m) {
                    let why = format!(
                        "the run waited {:.1}s for at least {} live workers (--max-wait) and {} came",
                        max as f64 / 1000.0,
                        self.cfg.min_workers,
                        self.ready_workers().len()
                    );
                    self.fail(why, out);
                }
            }
            Phase::Waiting => {
                if let Some(t) = self
                    .cfg
                    .registration_timeout
                    .filter(|&t| now - self.waiting_since > t)
                {
                    let why = format!(
                        "timed out after {:.1}s waiting for {} workers to register ({} did)",
                        t as f64 / 1000.0,
                        self.cfg.target_workers,
                        self.ready_workers().len()
                    );
                    self.fail(why, out);
                }
            }
            _ => {}
        }
    }

    fn submit(
        &mut self,
        step: u64,
        episodes: usize,
        want_state: bool,
    ) -> Result<Option<WorkerId>, Reject> {
        if self.phase.over() {
            return Err(Reject::Precondition(format!(
                "the run is over: {}",
                self.error.clone().unwrap_or_else(|| "finished".into())
            )));
        }
        if step != self.committed + 1 {
            return Err(Reject::Precondition(format!(
                "step {step} cannot run next: step {} is the last committed",
                self.committed
            )));
        }
        if self.pending.is_some() || self.round.is_some() {
            return Err(Reject::Duplicate(format!(
                "step {step} is already submitted"
            )));
        }
        self.pending = Some(Pending {
            step,
            episodes,
            want_state,
        });
        Ok(None)
    }
}

fn unknown(id: WorkerId) -> Reject {
    Reject::UnknownWorker(format!(
        "unknown worker id {id}: it was never registered or was dropped from the run; register again"
    ))
}

fn not_member(id: WorkerId, generation: u64) -> Reject {
    Reject::NotMember(format!(
        "worker {id} is not a member of generation {generation}"
    ))
}
