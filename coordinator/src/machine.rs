//! The run's logic as a pure state machine: membership, generations, fencing, the step
//! round, detection deadlines and recovery. No I/O, no async, no clock.
//!
//! Why it exists: every failure mode of a distributed run (a killed worker, a stuck one, a
//! late or duplicated message, a joiner, a coordinator that was itself paused) is a
//! question of *which state transition happens*, and that question is answered here alone,
//! where a seeded simulator can drive it through thousands of fault schedules
//! (`tests/simulation.rs`). The gRPC service ([`crate::service`]) and the training loop's
//! dispatch ([`crate::dispatch`]) only turn messages into [`Event`]s and carry out the
//! [`Action`]s that come back. Time comes in with the events, in milliseconds of any
//! monotonic clock.
//!
//! The protocol in one paragraph: a step is committed only when every member of the
//! current generation has reported success for it, with equal parameter digests. Until
//! then every replica can roll back to the committed state. Any failure of a member (its
//! stream closed, its heartbeats stopped, it missed the step deadline, it left, or it
//! reported a collective error) throws the step away: the survivors are told to abort
//! their collective, the generation goes up, and the same step runs again with its shards
//! split over the new members. Messages of an older generation are refused (fencing); a
//! worker dropped from the run must register again and receives the committed state.
//! Joiners enter between steps, with the committed state transferred to them when they do
//! not hold it.

use std::collections::BTreeMap;

/// Milliseconds on the adapter's monotonic clock.
pub type Ms = u64;
/// A worker's id in a run; never reused.
pub type WorkerId = u64;

/// Longest worker name kept; longer names are cut.
pub const MAX_NAME_LEN: usize = 128;

/// The knobs of detection and recovery.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Workers to wait for before the first generation forms.
    pub target_workers: usize,
    /// The run goes on while at least this many workers are live; below, it pauses.
    pub min_workers: usize,
    /// A worker silent for this long is dead.
    pub heartbeat_timeout: Ms,
    /// Floor of the step deadline.
    pub step_deadline_min: Ms,
    /// The step deadline is this many times the median step time (or the floor).
    pub step_deadline_factor: f64,
    /// Deadline of a step before any step time is known (the first step warms up).
    pub first_step_deadline: Ms,
    /// How long a generation's collective setup may take.
    pub setup_timeout: Ms,
    /// How long the run may stay paused below `min_workers` (`None`: forever).
    pub max_wait: Option<Ms>,
    /// How long to wait for the first `target_workers` (`None`: forever).
    pub registration_timeout: Option<Ms>,
    /// Episodes per gradient shard: each member gets whole shards.
    pub shard_groups: usize,
    /// A step aborted this many times in a row with no member lost fails the run.
    pub max_step_attempts: u32,
    /// Digests are not compared (the benchmark's simulated workers compute nothing).
    pub skip_digest_check: bool,
    /// A registration whose assignment stream has not opened this long after it
    /// registered expires (a squatter, or a worker that died while loading its data), so
    /// that registrations cannot pile up.
    pub join_timeout: Ms,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            target_workers: 1,
            min_workers: 1,
            heartbeat_timeout: 5_000,
            step_deadline_min: 5_000,
            step_deadline_factor: 3.0,
            first_step_deadline: 120_000,
            setup_timeout: 60_000,
            max_wait: None,
            registration_timeout: None,
            shard_groups: 1,
            max_step_attempts: 5,
            skip_digest_check: false,
            join_timeout: 120_000,
        }
    }
}

/// What a worker reports for a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Digest of its parameters after the step.
    pub digest: String,
    /// Its share of the batch loss.
    pub loss_share: f64,
    /// Episodes it computed.
    pub episodes: usize,
    /// Whether it attached its full state.
    pub has_state: bool,
}

/// Something that happened, as the adapter saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A worker asks to join (the answer is its new id). `holds`: the state it holds, as
    /// (step, digest): `(0, None)` for a fresh worker built from the run's seed, the
    /// replica's step and parameter digest for one that comes back, `None` when it has
    /// none. It counts as holding the committed state only when the digest is the
    /// committed one.
    Register {
        name: String,
        holds: Option<(u64, Option<String>)>,
    },
    /// A worker opened its assignment stream.
    StreamOpened { id: WorkerId },
    /// A worker's stream or connection closed.
    StreamClosed { id: WorkerId },
    /// A worker proved it is alive.
    Heartbeat { id: WorkerId },
    /// A member brought its collective address for a generation.
    Setup {
        id: WorkerId,
        generation: u64,
        addr: String,
    },
    /// A member's result for a step: its report, or the error it hit.
    StepResult {
        id: WorkerId,
        generation: u64,
        step: u64,
        result: Result<Report, String>,
    },
    /// A worker leaves cleanly.
    Leave { id: WorkerId, reason: String },
    /// The clock moved.
    Tick,
    /// The training loop asks for `step` over `episodes` episodes (the next after the
    /// committed one); `want_state`: rank 0 must attach its state.
    Submit {
        step: u64,
        episodes: usize,
        want_state: bool,
    },
    /// The adapter failed the run (e.g. a spawned worker process died).
    Fail { reason: String },
    /// The run ended well.
    Finish,
}

/// Something the adapter must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Tell a member about its new generation. `transfer`: it must first receive the
    /// committed state (its own is not the committed one).
    Membership {
        to: WorkerId,
        generation: u64,
        rank: usize,
        world: usize,
        committed: u64,
        transfer: bool,
    },
    /// Every member of `generation` has set up: answer their setup calls with `addrs`.
    SetupComplete { generation: u64, addrs: Vec<String> },
    /// Run a step: episodes `first..end` of the submitted batch.
    SendStep {
        to: WorkerId,
        generation: u64,
        step: u64,
        first: usize,
        end: usize,
        want_state: bool,
    },
    /// Abort the collective of `step` and roll back to the committed state.
    Abort {
        to: WorkerId,
        generation: u64,
        step: u64,
        reason: String,
    },
    /// The worker is out of the run (fenced): close its stream; it may register again.
    Drop { id: WorkerId, reason: String },
    /// No live worker holds the committed state: the run goes back to step `to`, whose
    /// state the adapter holds, and the steps after it run again (the training loop
    /// truncates its histories to `to`).
    Rewind { to: u64 },
    /// `step` is committed. `state_from`: the member whose report carries the state.
    Committed {
        step: u64,
        generation: u64,
        loss: f64,
        state_from: Option<WorkerId>,
    },
    /// The run is over: tell every worker.
    Shutdown {
        to: WorkerId,
        reason: String,
        failed: bool,
    },
}

/// Why a message was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// No such worker (never registered, or dropped from the run).
    UnknownWorker(String),
    /// A message of an older (or unknown) generation.
    Stale(String),
    /// The worker is not a member of the generation.
    NotMember(String),
    /// Not what the run is doing now.
    Precondition(String),
    /// A malformed message.
    Invalid(String),
    /// A duplicate.
    Duplicate(String),
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Reject::UnknownWorker(s)
        | Reject::Stale(s)
        | Reject::NotMember(s)
        | Reject::Precondition(s)
        | Reject::Invalid(s)
        | Reject::Duplicate(s)) = self;
        f.write_str(s)
    }
}

/// The run's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the first workers.
    Waiting,
    /// Steps run.
    Running,
    /// Fewer than `min_workers` are live; waiting for more.
    Paused,
    /// Finished.
    Done,
    /// Failed.
    Failed,
}

impl Phase {
    /// The name `gpo status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
    /// Whether the run is over.
    pub fn over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// A worker as the machine sees it.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its name (cut to [`MAX_NAME_LEN`]).
    pub name: String,
    /// Its assignment stream is open.
    pub stream: bool,
    /// Last sign of life.
    pub last_seen: Ms,
    /// The committed step whose state it holds (fresh workers hold step 0's, built from
    /// the seed), or `None` when unknown.
    pub holds: Option<u64>,
    /// The last step it reported.
    pub last_step: u64,
    /// When it registered.
    pub registered_at: Ms,
    /// Its assignment stream has opened at least once (it joined the run).
    pub joined: bool,
}

/// One formed generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRecord {
    /// Its number.
    pub generation: u64,
    /// When it formed.
    pub at: Ms,
    /// Its members in rank order.
    pub members: Vec<WorkerId>,
    /// Why it formed.
    pub reason: String,
}

/// One recovery: a failure detected and the run back to committing steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The step that was running (or next) when the failure was detected.
    pub step: u64,
    /// What happened.
    pub reason: String,
    /// From the failed worker's last sign of life to the detection.
    pub detect_ms: Ms,
    /// When it was detected.
    pub detected_at: Ms,
    /// From detection to the next committed step (`None` until then).
    pub recover_ms: Option<Ms>,
    /// Steps started and thrown away.
    pub steps_recomputed: u64,
}

/// One committed step.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    /// The step.
    pub step: u64,
    /// The generation it committed in.
    pub generation: u64,
    /// Episode bounds per rank (`bounds[r]..bounds[r + 1]`): every episode exactly once.
    pub bounds: Vec<usize>,
    /// The members' common digest.
    pub digest: String,
}

/// Counters for operations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Workers that registered.
    pub registrations: u64,
    /// Workers that entered a generation after the first.
    pub joins: u64,
    /// Messages refused for their generation.
    pub fenced_messages: u64,
    /// Aborted steps by reason kind (`lost`, `deadline`, `heartbeat`, `left`, `error`).
    pub aborted: BTreeMap<String, u64>,
    /// Recoveries completed.
    pub recoveries: u64,
}

#[derive(Debug, Clone)]
struct Generation {
    number: u64,
    members: Vec<WorkerId>,
    addrs: Vec<Option<String>>,
    ready: bool,
    formed_at: Ms,
}

#[derive(Debug, Clone)]
struct Round {
    step: u64,
    generation: u64,
    bounds: Vec<usize>,
    results: Vec<Option<Report>>,
    deadline: Ms,
    want_state: bool,
    started: Ms,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    step: u64,
    episodes: usize,
    want_state: bool,
}

/// The state machine of one run.
#[derive(Debug, Clone)]
pub struct Machine {
    cfg: MachineConfig,
    now: Ms,
    last_tick: Ms,
    phase: Phase,
    error: Option<String>,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    generation: Option<Generation>,
    generation_number: u64,
    committed: u64,
    committed_digest: Option<String>,
    state_at: Option<u64>,
    pending: Option<Pending>,
    round: Option<Round>,
    attempts: u32,
    /// Rounds thrown away since the last commit (for the recoveries' count).
    thrown: u64,
    paused_since: Option<Ms>,
    waiting_since: Ms,
    step_times: Vec<Ms>,
    history: Vec<GenerationRecord>,
    recoveries: Vec<Recovery>,
    ledger: Vec<LedgerEntry>,
    counters: Counters,
}

/// Which way a member was lost, for the counters.
#[derive(Clone, Copy)]
enum Loss {
    Closed,
    Heartbeat,
    Deadline,
    Left,
    Setup,
    Expired,
}

impl Loss {
    fn kind(self) -> &'static str {
        match self {
            Loss::Closed => "lost",
            Loss::Heartbeat => "heartbeat",
            Loss::Deadline => "deadline",
            Loss::Left => "left",
            Loss::Setup => "setup",
            Loss::Expired => "expired",
        }
    }
}

mod handle;
mod round;
pub use handle::Outcome;

impl Machine {
    /// A machine for a run whose committed state is that of `start_step` (0 for a fresh
    /// run, a checkpoint's step on resume), which the adapter holds; generations are
    /// numbered after `generation` (0 fresh; the persisted one on a coordinator restart).
    pub fn new(cfg: MachineConfig, now: Ms, start_step: u64, generation: u64) -> Machine {
        Machine {
            cfg,
            now,
            last_tick: now,
            phase: Phase::Waiting,
            error: None,
            workers: BTreeMap::new(),
            next_id: 0,
            generation: None,
            generation_number: generation,
            committed: start_step,
            committed_digest: None,
            state_at: Some(start_step),
            pending: None,
            round: None,
            attempts: 0,
            thrown: 0,
            paused_since: None,
            waiting_since: now,
            step_times: Vec::new(),
            history: Vec::new(),
            recoveries: Vec::new(),
            ledger: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// Records the digest of the start state (a resumed run's checkpoint), so that workers
    /// which come back holding it need no transfer.
    pub fn set_committed_digest(&mut self, digest: String) {
        self.committed_digest = Some(digest);
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Why the run failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
    /// The last committed step.
    pub fn committed(&self) -> u64 {
        self.committed
    }
    /// The current generation's number (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation_number
    }
    /// The current generation's members in rank order.
    pub fn members(&self) -> &[WorkerId] {
        self.generation.as_ref().map_or(&[], |g| &g.members)
    }
    /// Every live worker.
    pub fn workers(&self) -> &BTreeMap<WorkerId, Worker> {
        &self.workers
    }
    /// Every generation formed, oldest first.
    pub fn history(&self) -> &[GenerationRecord] {
        &self.history
    }
    /// Every recovery, oldest first.
    pub fn recoveries(&self) -> &[Recovery] {
        &self.recoveries
    }
    /// Every committed step, in order.
    pub fn ledger(&self) -> &[LedgerEntry] {
        &self.ledger
    }
    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// What the run waits for, when it is not running steps (for `gpo status`).
    pub fn waiting_for(&self) -> Option<String> {
        let live = self.ready_workers().len();
        match self.phase {
            Phase::Waiting => Some(format!(
                "{} of {} workers to register",
                live, self.cfg.target_workers
            )),
            Phase::Paused => Some(format!(
                "at least {} live workers ({} now)",
                self.cfg.min_workers, live
            )),
            _ => None,
        }
    }
    /// The rank of `id` in the current generation.
    pub fn rank_of(&self, id: WorkerId) -> Option<usize> {
        self.members().iter().position(|&m| m == id)
    }
    /// The current step deadline's length.
    pub fn step_deadline(&self) -> Ms {
        if self.step_times.is_empty() {
            return self.cfg.first_step_deadline.max(self.cfg.step_deadline_min);
        }
        let mut t = self.step_times.clone();
        t.sort_unstable();
        let median = t[t.len() / 2] as f64;
        ((median * self.cfg.step_deadline_factor) as Ms).max(self.cfg.step_deadline_min)
    }

    /// A label for logs and errors: `worker 3 \`name\``.
    pub fn label(&self, id: WorkerId) -> String {
        match self.workers.get(&id) {
            Some(w) => match self.rank_of(id) {
                Some(r) => format!("worker {id} `{}` (rank {r})", w.name),
                None => format!("worker {id} `{}`", w.name),
            },
            None => format!("worker {id}"),
        }
    }

    /// Workers that could be members: stream open.
    fn ready_workers(&self) -> Vec<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| w.stream)
            .map(|(&id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests;
