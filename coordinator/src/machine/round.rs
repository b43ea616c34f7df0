//! The transitions that shape the run: joiners admitted between steps, rounds started
//! and committed, members lost (and the step they were in thrown away), generations
//! formed (or the run paused, or rewound), and the run failed or shut down.

use super::*;

impl Machine {
    /// Joiners enter between steps: when a step is about to start and live workers wait
    /// outside the generation, a new generation takes them in if they hold the committed
    /// state or the adapter can transfer it; otherwise this step brings rank 0's state back
    /// so that the next one can.
    pub(super) fn admit_joiners(&mut self, out: &mut Vec<Action>) {
        if self.phase != Phase::Running || self.round.is_some() {
            return;
        }
        let members = self.members().to_vec();
        let joiners: Vec<WorkerId> = self
            .ready_workers()
            .into_iter()
            .filter(|id| !members.contains(id))
            .collect();
        if joiners.is_empty() {
            return;
        }
        let transferable = self.state_at == Some(self.committed);
        let admissible =
            |id: &WorkerId| transferable || self.workers[id].holds == Some(self.committed);
        if joiners.iter().all(admissible) {
            let n = joiners.len();
            self.reform(&format!("{n} worker(s) joined"), out);
        } else if let Some(p) = self.pending.as_mut() {
            p.want_state = true;
        }
    }

    pub(super) fn try_start_round(&mut self, out: &mut Vec<Action>) {
        if self.pending.is_some() {
            self.admit_joiners(out);
        }
        if self.phase != Phase::Running || self.round.is_some() {
            return;
        }
        let Some(p) = self.pending else { return };
        let Some(g) = self.generation.as_ref().filter(|g| g.ready) else {
            return;
        };
        let world = g.members.len();
        let n = p.episodes;
        let sg = self.cfg.shard_groups.max(1);
        let shards = n.div_ceil(sg);
        let bounds: Vec<usize> = (0..=world)
            .map(|r| (r * shards / world * sg).min(n))
            .collect();
        for (rank, &to) in g.members.iter().enumerate() {
            out.push(Action::SendStep {
                to,
                generation: g.number,
                step: p.step,
                first: bounds[rank],
                end: bounds[rank + 1],
                want_state: p.want_state && rank == 0,
            });
        }
        self.round = Some(Round {
            step: p.step,
            generation: g.number,
            bounds,
            results: vec![None; world],
            deadline: self.now + self.step_deadline(),
            want_state: p.want_state,
            started: self.now,
        });
    }

    pub(super) fn commit(&mut self, out: &mut Vec<Action>) {
        let r = self.round.take().expect("a round is committing");
        let results: Vec<Report> = r.results.into_iter().flatten().collect();
        if !self.cfg.skip_digest_check {
            if let Some(bad) = results.iter().position(|x| x.digest != results[0].digest) {
                let why = format!(
                    "replicas diverged at step {}: rank {bad}'s parameters differ from rank 0's",
                    r.step
                );
                self.fail(why, out);
                return;
            }
        }
        self.committed = r.step;
        self.committed_digest = Some(results[0].digest.clone());
        if r.want_state {
            self.state_at = Some(r.step);
        }
        let members = self.members().to_vec();
        for id in &members {
            if let Some(w) = self.workers.get_mut(id) {
                w.holds = Some(r.step);
            }
        }
        self.ledger.push(LedgerEntry {
            step: r.step,
            generation: r.generation,
            bounds: r.bounds,
            digest: results[0].digest.clone(),
        });
        self.step_times.push(self.now - r.started);
        if self.step_times.len() > 64 {
            self.step_times.remove(0);
        }
        self.attempts = 0;
        self.pending = None;
        let thrown = std::mem::take(&mut self.thrown);
        for rec in self
            .recoveries
            .iter_mut()
            .filter(|x| x.recover_ms.is_none())
        {
            rec.recover_ms = Some(self.now - rec.detected_at);
            rec.steps_recomputed = rec.steps_recomputed.max(thrown);
            self.counters.recoveries += 1;
        }
        out.push(Action::Committed {
            step: r.step,
            generation: r.generation,
            loss: results.iter().map(|x| x.loss_share).sum(),
            state_from: r.want_state.then(|| members[0]),
        });
    }

    /// Takes a worker out of the run. A member's loss throws the running step away and
    /// asks for a new generation.
    pub(super) fn lose(
        &mut self,
        id: WorkerId,
        how: Loss,
        why: &str,
        out: &mut Vec<Action>,
        reform: &mut Option<String>,
    ) {
        let label = self.label(id);
        let member = self.rank_of(id).is_some();
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let why = format!("{label} {why}");
        out.push(Action::Drop {
            id,
            reason: why.clone(),
        });
        if !member || self.phase.over() {
            return;
        }
        let running = self.round.is_some();
        self.recoveries.push(Recovery {
            step: self.committed + 1,
            reason: why.clone(),
            detect_ms: self.now.saturating_sub(w.last_seen),
            detected_at: self.now,
            recover_ms: None,
            steps_recomputed: u64::from(running),
        });
        if running {
            self.abort_round(&why, how.kind(), out);
        }
        if let Some(g) = self.generation.as_mut() {
            g.members.retain(|&m| m != id);
            g.ready = false;
        }
        *reform = Some(why);
    }

    pub(super) fn abort_round(&mut self, why: &str, kind: &str, out: &mut Vec<Action>) {
        let Some(r) = self.round.take() else { return };
        self.thrown += 1;
        *self.counters.aborted.entry(kind.to_string()).or_default() += 1;
        for &to in self.members() {
            if self.workers.contains_key(&to) {
                out.push(Action::Abort {
                    to,
                    generation: r.generation,
                    step: r.step,
                    reason: why.to_string(),
                });
            }
        }
    }

    /// Forms the next generation from the live workers that hold (or can be given) the
    /// committed state, or pauses when there are too few.
    pub(super) fn reform(&mut self, why: &str, out: &mut Vec<Action>) {
        if self.phase == Phase::Waiting && self.ready_workers().len() < self.cfg.target_workers {
            return;
        }
        let transferable = self.state_at == Some(self.committed);
        let committed = self.committed;
        let candidates: Vec<WorkerId> = self
            .ready_workers()
            .into_iter()
            .filter(|id| transferable || self.workers[id].holds == Some(committed))
            .collect();
        let min = self.cfg.min_workers.max(1);
        if candidates.len() < min {
            if let Some(to) = self
                .state_at
                .filter(|&s| s < self.committed && self.ready_workers().len() >= min)
            {
                // Every holder of the committed state is gone, but the adapter holds an
                // earlier one: go back to it and run the steps after it again.
                let lost = self.committed - to;
                self.recoveries.push(Recovery {
                    step: self.committed + 1,
                    reason: format!(
                        "no live worker holds step {}'s state: back to step {to}",
                        self.committed
                    ),
                    detect_ms: 0,
                    detected_at: self.now,
                    recover_ms: None,
                    steps_recomputed: lost,
                });
                self.committed = to;
                self.committed_digest = None;
                self.ledger.retain(|e| e.step <= to);
                self.round = None;
                self.pending = None;
                self.attempts = 0;
                out.push(Action::Rewind { to });
                return self.reform(why, out);
            }
            if self.phase != Phase::Paused {
                self.phase = Phase::Paused;
                self.paused_since = Some(self.now);
            }
            self.generation = None;
            return;
        }
        let previous = self.members().to_vec();
        let first = self.history.is_empty();
        self.generation_number += 1;
        let number = self.generation_number;
        for (rank, &to) in candidates.iter().enumerate() {
            let w = self.workers.get_mut(&to).expect("candidate exists");
            let transfer = w.holds != Some(committed);
            w.holds = Some(committed);
            if !first && !previous.contains(&to) {
                self.counters.joins += 1;
            }
            out.push(Action::Membership {
                to,
                generation: number,
                rank,
                world: candidates.len(),
                committed,
                transfer,
            });
        }
        self.history.push(GenerationRecord {
            generation: number,
            at: self.now,
            members: candidates.clone(),
            reason: why.to_string(),
        });
        self.generation = Some(Generation {
            number,
            addrs: vec![None; candidates.len()],
            members: candidates,
            ready: false,
            formed_at: self.now,
        });
        self.phase = Phase::Running;
        self.paused_since = None;
    }

    pub(super) fn fail(&mut self, why: String, out: &mut Vec<Action>) {
        if self.phase.over() {
            return;
        }
        self.phase = Phase::Failed;
        self.round = None;
        self.pending = None;
        self.shutdown_all(&format!("the run failed: {why}"), true, out);
        self.error = Some(why);
    }

    pub(super) fn shutdown_all(&mut self, reason: &str, failed: bool, out: &mut Vec<Action>) {
        for &to in self.workers.keys() {
            out.push(Action::Shutdown {
                to,
                reason: reason.to_string(),
                failed,
            });
        }
    }
}
