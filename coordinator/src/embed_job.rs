//! The embedding phase as a pure state machine: who holds which planned batch, which
//! batches are done, and which may be written to the store next. No I/O, no clock (times
//! are milliseconds the caller passes in), no threads; `embed_service` carries its
//! requests over gRPC.
//!
//! Rules:
//! - a worker joins only with the coordinator's embedder fingerprint;
//! - batches are leased on demand, longest first (the plan's order), so each worker's
//!   share of tokens follows its speed;
//! - a worker silent for longer than the timeout is dropped and its leased batches go back
//!   to the front of the queue, for the others;
//! - a batch is accepted once: a second delivery (a slow worker whose batch was re-leased)
//!   is a duplicate and is dropped, so nothing enters the store twice;
//! - batches are released for writing in plan order only (`writable`), so the store's
//!   rows come out in the single-process `gpo embed`'s order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The worker's embedder is not the coordinator's.
    Fingerprint { ours: String, theirs: String },
    /// The worker is not (or no longer) known: join again.
    UnknownWorker(u64),
    /// A batch that does not exist.
    UnknownBatch(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Fingerprint { ours, theirs } => write!(
                f,
                "embedder mismatch: the coordinator embeds with `{ours}`, this worker with \
                 `{theirs}` (the same model files, pooling and dtype are needed)"
            ),
            Refusal::UnknownWorker(w) => write!(
                f,
                "embedding worker {w} is not known (it timed out or never joined): join again"
            ),
            Refusal::UnknownBatch(b) => write!(f, "no batch {b} in the plan"),
        }
    }
}

/// What a lease request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// These batches, now held by the worker.
    Batches(Vec<usize>),
    /// Nothing pending, but other workers hold batches: ask again later.
    Wait,
    /// Every batch is done.
    Done,
}

/// What a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The batch's vectors are the plan's results.
    Accepted,
    /// The batch was done already: the vectors are dropped.
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Leased(u64),
    Done,
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    last_seen: u64,
    held: BTreeSet<usize>,
    tokens: u64,
    batches: u64,
}

/// One worker's share, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub worker: u64,
    pub name: String,
    pub batches: u64,
    pub tokens: u64,
}

/// The embedding phase of one store.
#[derive(Debug, Clone)]
pub struct EmbedJob {
    embedder: String,
    timeout_ms: u64,
    tokens: Vec<u64>,
    state: Vec<State>,
    queue: VecDeque<usize>,
    members: BTreeMap<u64, Member>,
    left: Vec<Share>,
    next_id: u64,
    written: usize,
    done: usize,
}

impl EmbedJob {
    /// A job over planned batches of `tokens[b]` tokens each (in plan order), for workers
    /// whose embedder fingerprint is `embedder`, dropping workers silent for `timeout_ms`.
    pub fn new(embedder: impl Into<String>, tokens: Vec<u64>, timeout_ms: u64) -> EmbedJob {
        EmbedJob {
            embedder: embedder.into(),
            timeout_ms,
            state: vec![State::Pending; tokens.len()],
            queue: (0..tokens.len()).collect(),
            tokens,
            members: BTreeMap::new(),
            left: Vec::new(),
            next_id: 1,
            written: 0,
            done: 0,
        }
    }

    /// A worker joins with its embedder fingerprint; its id, or the refusal.
    pub fn join(&mut self, name: &str, embedder: &str, now: u64) -> Result<u64, Refusal> {
        if embedder != self.embedder {
            return Err(Refusal::Fingerprint {
                ours: self.embedder.clone(),
                theirs: embedder.to_string(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.members.insert(
            id,
            Member {
                name: name.to_string(),
                last_seen: now,
                held: BTreeSet::new(),
                tokens: 0,
                batches: 0,
            },
        );
        Ok(id)
    }

    fn member(&mut self, worker: u64, now: u64) -> Result<&mut Member, Refusal> {
        let m = self
            .members
            .get_mut(&worker)
            .ok_or(Refusal::UnknownWorker(worker))?;
        m.last_seen = m.last_seen.max(now);
        Ok(m)
    }

    /// The worker is alive (a heartbeat).
    pub fn seen(&mut self, worker: u64, now: u64) -> Result<(), Refusal> {
        self.member(worker, now).map(|_| ())
    }

    /// Up to `max` batches for `worker`, from the front of the queue.
    pub fn lease(&mut self, worker: u64, max: usize, now: u64) -> Result<Lease, Refusal> {
        self.member(worker, now)?;
        if self.is_complete() {
            return Ok(Lease::Done);
        }
        let mut got = Vec::new();
        while got.len() < max.max(1) {
            let Some(b) = self.queue.pop_front() else {
                break;
            };
            if self.state[b] != State::Pending {
                continue;
            }
            self.state[b] = State::Leased(worker);
            got.push(b);
        }
        if got.is_empty() {
            return Ok(Lease::Wait);
        }
        let m = self.members.get_mut(&worker).expect("checked above");
        m.held.extend(got.iter().copied());
        Ok(Lease::Batches(got))
    }

    /// The tokens of batch `b`.
    pub fn tokens(&self, b: usize) -> u64 {
        self.tokens.get(b).copied().unwrap_or(0)
    }

    /// `worker` delivers batch `b`'s vectors.
    pub fn deliver(&mut self, worker: u64, b: usize, now: u64) -> Result<Delivery, Refusal> {
        if b >= self.state.len() {
            return Err(Refusal::UnknownBatch(b));
        }
        self.member(worker, now)?;
        let m = self.members.get_mut(&worker).expect("checked above");
        m.held.remove(&b);
        if self.state[b] == State::Done {
            return Ok(Delivery::Duplicate);
        }
        if let State::Leased(other) = self.state[b] {
            if other != worker {
                if let Some(o) = self.members.get_mut(&other) {
                    o.held.remove(&b);
                }
            }
        }
        self.state[b] = State::Done;
        self.done += 1;
        let m = self.members.get_mut(&worker).expect("checked above");
        m.tokens += self.tokens[b];
        m.batches += 1;
        Ok(Delivery::Accepted)
    }

    /// The worker leaves: its held batches go back to the queue.
    pub fn leave(&mut self, worker: u64) {
        if let Some(m) = self.members.remove(&worker) {
            self.requeue(&m.held);
            self.left.push(Share {
                worker,
                name: m.name,
                batches: m.batches,
                tokens: m.tokens,
            });
        }
    }

    fn requeue(&mut self, held: &BTreeSet<usize>) {
        // Back to the front, in plan order: the longest first again.
        for &b in held.iter().rev() {
            if matches!(self.state[b], State::Leased(_)) {
                self.state[b] = State::Pending;
                self.queue.push_front(b);
            }
        }
    }

    /// The clock moved to `now`: workers silent for longer than the timeout are dropped
    /// (returned), and their batches are queued again.
    pub fn tick(&mut self, now: u64) -> Vec<(u64, String)> {
        let dead: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_sub(m.last_seen) > self.timeout_ms)
            .map(|(&w, _)| w)
            .collect();
        dead.into_iter()
            .map(|w| {
                let name = self.members[&w].name.clone();
                self.leave(w);
                (w, name)
            })
            .collect()
    }

    /// Batches that may be written now, in plan order: every done batch from the last
    /// written one up to the first that is not done.
    pub fn writable(&mut self) -> std::ops::Range<usize> {
        let start = self.written;
        while self.written < self.state.len() && self.state[self.written] == State::Done {
            self.written += 1;
        }
        start..self.written
    }

    /// Whether every batch is done.
    pub fn is_complete(&self) -> bool {
        self.done == self.state.len()
    }

    /// (done, total) batches.
    pub fn progress(&self) -> (usize, usize) {
        (self.done, self.state.len())
    }

    /// Whether `worker` is a member.
    pub fn knows(&self, worker: u64) -> bool {
        self.members.contains_key(&worker)
    }

    /// Members now.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Each worker's share of the batches (members and those that left), by id.
    pub fn shares(&self) -> Vec<Share> {
        let mut v: Vec<Share> = self
            .members
            .iter()
            .map(|(&worker, m)| Share {
                worker,
                name: m.name.clone(),
                batches: m.batches,
                tokens: m.tokens,
            })
            .chain(self.left.iter().cloned())
            .collect();
        v.sort_by_key(|s| s.worker);
        v
    }

    /// The fingerprint workers must have.
    pub fn embedder(&self) -> &str {
        &self.embedder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: usize) -> EmbedJob {
        EmbedJob::new("m@1|mean|f32", (0..n as u64).rev().collect(), 1000)
    }

    #[test]
    fn a_worker_with_another_embedder_is_refused_naming_both() {
        let mut j = job(3);
        let e = j.join("w", "m@1|mean|bf16", 0).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("m@1|mean|f32") && msg.contains("m@1|mean|bf16"),
            "{msg}"
        );
        assert_eq!(j.members(), 0);
    }

    #[test]
    fn batches_are_leased_in_plan_order_and_written_in_plan_order() {
        let mut j = job(4);
        let a = j.join("a", "m@1|mean|f32", 0).unwrap();
        let b = j.join("b", "m@1|mean|f32", 0).unwrap();
        assert_eq!(j.lease(a, 2, 0).unwrap(), Lease::Batches(vec![0, 1]));
        assert_eq!(j.lease(b, 2, 0).unwrap(), Lease::Batches(vec![2, 3]));
        assert_eq!(j.lease(b, 2, 0).unwrap(), Lease::Wait);
        assert_eq!(j.deliver(b, 2, 1).unwrap(), Delivery::Accepted);
        assert_eq!(
            j.writable(),
            0..0,
            "batch 0 is not done: nothing may be written"
        );
        assert_eq!(j.deliver(a, 0, 1).unwrap(), Delivery::Accepted);
        assert_eq!(j.writable(), 0..1);
        assert_eq!(j.deliver(a, 1, 1).unwrap(), Delivery::Accepted);
        assert_eq!(j.writable(), 1..3);
        assert!(!j.is_complete());
        assert_eq!(j.deliver(b, 3, 1).unwrap(), Delivery::Accepted);
        assert_eq!(j.writable(), 3..4);
        assert!(j.is_complete());
        assert_eq!(j.lease(a, 1, 2).unwrap(), Lease::Done);
        let tokens: u64 = j.shares().iter().map(|s| s.tokens).sum();
        assert_eq!(tokens, 3 + 2 + 1);
    }

    #[test]
    fn a_silent_worker_loses_its_batches_and_a_late_delivery_is_a_duplicate() {
        let mut j = job(3);
        let a = j.join("a", "m@1|mean|f32", 0).unwrap();
        let b = j.join("b", "m@1|mean|f32", 0).unwrap();
        assert_eq!(j.lease(a, 2, 0).unwrap(), Lease::Batches(vec![0, 1]));
        assert_eq!(j.lease(b, 1, 0).unwrap(), Lease::Batches(vec![2]));
        j.seen(b, 900).unwrap();
        assert!(
            j.tick(1000).is_empty(),
            "not silent for longer than the timeout yet"
        );
        assert_eq!(j.tick(1500), vec![(a, "a".to_string())]);
        assert_eq!(j.lease(a, 1, 1500), Err(Refusal::UnknownWorker(a)));
        // a's batches come back first, in plan order.
        assert_eq!(j.lease(b, 1, 1500).unwrap(), Lease::Batches(vec![0]));
        assert_eq!(j.lease(b, 5, 1500).unwrap(), Lease::Batches(vec![1]));
        assert_eq!(j.deliver(b, 0, 1600).unwrap(), Delivery::Accepted);
        // a rejoins and delivers batch 0, which b has delivered: dropped.
        let a2 = j.join("a", "m@1|mean|f32", 1700).unwrap();
        assert_eq!(j.deliver(a2, 0, 1700).unwrap(), Delivery::Duplicate);
        assert_eq!(j.deliver(b, 1, 1700).unwrap(), Delivery::Accepted);
        assert_eq!(j.deliver(b, 2, 1700).unwrap(), Delivery::Accepted);
        assert!(j.is_complete());
        assert_eq!(j.writable(), 0..3);
        let shares = j.shares();
        assert_eq!(shares.iter().map(|s| s.batches).sum::<u64>(), 3);
    }

    #[test]
    fn a_batch_delivered_by_whoever_finishes_first_counts_once() {
        let mut j = job(1);
        let a = j.join("a", "m@1|mean|f32", 0).unwrap();
        let b = j.join("b", "m@1|mean|f32", 0).unwrap();
        assert_eq!(j.lease(a, 1, 0).unwrap(), Lease::Batches(vec![0]));
        j.leave(a);
        assert_eq!(j.lease(b, 1, 0).unwrap(), Lease::Batches(vec![0]));
        assert_eq!(j.deliver(b, 0, 1).unwrap(), Delivery::Accepted);
        assert_eq!(j.deliver(b, 0, 1).unwrap(), Delivery::Duplicate);
        assert_eq!(j.deliver(b, 7, 1), Err(Refusal::UnknownBatch(7)));
        assert_eq!(j.progress(), (1, 1));
    }

    #[test]
    fn an_empty_plan_is_complete_at_once() {
        let mut j = job(0);
        let a = j.join("a", "m@1|mean|f32", 0).unwrap();
        assert!(j.is_complete());
        assert_eq!(j.lease(a, 4, 0).unwrap(), Lease::Done);
    }
}
