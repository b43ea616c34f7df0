//! The Prometheus metric families every gpo process exports, and their encoding in the
//! plain text format (version 0.0.4, what `promtool check metrics` reads).
//!
//! Why it exists: the names, units and labels are a contract with the dashboard and the
//! alert rules in `deploy/` (checked there by `scripts/check_deploy.sh` and against a live
//! Prometheus by `tests/prometheus_e2e.rs`), so they are declared once, here. Every label
//! value is an enum of this module ([`Phase`], [`WorkerState`], [`AbortReason`], [`Split`],
//! [`Role`]): nothing unbounded (a worker id, a step, a free-form reason) can become a
//! label. The coordinator's pure state machine knows nothing of these types; its executor
//! copies the machine's counters in through [`CoordinatorMetrics::sync`].

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
pub use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The `Content-Type` of what [`encode_text`] writes.
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Defines a label value enum with its fixed spelling.
macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }
        impl EncodeLabelValue for $name {
            fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
                e.write_str(self.as_str())
            }
        }
    };
}

label_enum!(
    /// A part of a training step (`gpo_step_duration_seconds{phase}`).
    Phase {
        /// A worker's gradient of its episodes.
        Compute => "compute",
        /// A worker's all-reduce of the gradient.
        Allreduce => "allreduce",
        /// A worker's Adam step.
        Optimizer => "optimizer",
        /// The coordinator's whole step: submit to commit, through any recovery.
        Dispatch => "dispatch",
    }
);

label_enum!(
    /// How the coordinator counts its workers (`gpo_workers{state}`). The states overlap:
    /// every member is live; `expected` is the run's `--workers`.
    WorkerState {
        /// Registered and not dropped.
        Live => "live",
        /// In the current membership generation.
        Member => "member",
        /// The number the run waits for.
        Expected => "expected",
    }
);

label_enum!(
    /// Why a step was thrown away (`gpo_steps_aborted_total{reason}`).
    AbortReason {
        /// A member's stream or connection closed.
        WorkerLost => "worker_lost",
        /// A member's heartbeats stopped.
        Heartbeat => "heartbeat_timeout",
        /// A member missed the step deadline.
        Deadline => "deadline",
        /// A member left (SIGTERM).
        WorkerLeft => "worker_left",
        /// A generation's collective did not form.
        Setup => "setup_failed",
        /// A member reported an error for the step.
        StepError => "step_error",
        /// A kind this build does not know.
        Other => "other",
    }
);

impl AbortReason {
    /// The reason of one of the machine's abort kinds (`lost`, `heartbeat`, `deadline`,
    /// `left`, `setup`, `error`).
    pub fn of_kind(kind: &str) -> AbortReason {
        match kind {
            "lost" => AbortReason::WorkerLost,
            "heartbeat" => AbortReason::Heartbeat,
            "deadline" => AbortReason::Deadline,
            "left" => AbortReason::WorkerLeft,
            "setup" => AbortReason::Setup,
            "error" => AbortReason::StepError,
            _ => AbortReason::Other,
        }
    }
}

label_enum!(
    /// The groups an alignment score is measured on (`gpo_alignment_score{split}`).
    Split {
        /// The held-out test groups.
        Test => "test",
        /// The validation groups carved from the meta-training groups.
        Validation => "validation",
    }
);

label_enum!(
    /// What a process is (`gpo_build_info{role}`).
    Role {
        /// `gpo coordinator` or the coordinator of `gpo train`.
        Coordinator => "coordinator",
        /// `gpo worker`.
        Worker => "worker",
        /// `gpo embed`.
        Embed => "embed",
        /// `gpo sweep`.
        Sweep => "sweep",
    }
);

label_enum!(
    /// Where a sweep's trials are (`gpo_trials{state}`).
    TrialState {
        /// Waiting for a gang of workers.
        Pending => "pending",
        /// Running on its gang.
        Running => "running",
        /// Ran to its last step.
        Done => "done",
        /// Stopped early by the stopping rule.
        Stopped => "stopped",
        /// Failed after its retries.
        Failed => "failed",
    }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrialStateLabel {
    state: TrialState,
}

/// A sweep's families: trials per state, how long trials take, the best score so far. No
/// label names a trial: 10,000 trials are 5 series, not 10,000.
#[derive(Clone, Debug)]
pub struct SweepMetrics {
    trials: Family<TrialStateLabel, Gauge>,
    duration: Histogram,
    best: F64Gauge,
}

impl Default for SweepMetrics {
    fn default() -> Self {
        SweepMetrics {
            trials: Family::default(),
            duration: Histogram::new(exponential_buckets(0.25, 2.0, 20)),
            best: F64Gauge::default(),
        }
    }
}

impl SweepMetrics {
    /// Registers the families.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "gpo_trials",
            "Trials of the sweep in each state",
            self.trials.clone(),
        );
        r.register(
            "gpo_trial_duration_seconds",
            "Wall time of each trial run that ended (done, stopped or failed)",
            self.duration.clone(),
        );
        r.register(
            "gpo_sweep_best_score",
            "The best ranking score of the sweep's trials so far",
            self.best.clone(),
        );
    }

    /// Sets the trial counts, one per state in [`TrialState::ALL`]'s order.
    pub fn states(&self, counts: [usize; 5]) {
        for (state, n) in TrialState::ALL.iter().zip(counts) {
            self.trials
                .get_or_create(&TrialStateLabel { state: *state })
                .set(n as i64);
        }
    }

    /// A trial run ended after `seconds`.
    pub fn trial_ended(&self, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.duration.observe(seconds);
        }
    }

    /// The best score so far.
    pub fn best(&self, score: f64) {
        self.best.set(score);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: Phase,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: WorkerState,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: AbortReason,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SplitLabel {
    split: Split,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    role: Role,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// A fresh registry holding `gpo_build_info{version, role}`.
pub fn registry(role: Role) -> Registry {
    let mut r = Registry::default();
    r.register(
        "gpo_build",
        "The gpo build and the role of this process (always 1)",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            role,
        }),
    );
    r
}

/// The registry in the Prometheus plain text format (version 0.0.4).
pub fn encode_text(r: &Registry) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, r);
    s
}

/// Step-time buckets: 1 ms to about 33 min, doubling.
fn step_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 22)
}

/// `gpo_step_duration_seconds{phase}`: the coordinator observes `dispatch`, workers the rest.
#[derive(Clone, Debug)]
pub struct StepDurations(Family<PhaseLabel, Histogram>);

impl Default for StepDurations {
    fn default() -> Self {
        StepDurations(Family::new_with_constructor(|| {
            Histogram::new(step_buckets())
        }))
    }
}

impl StepDurations {
    /// Records one step's `phase` lasting `seconds`.
    pub fn observe(&self, phase: Phase, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.0.get_or_create(&PhaseLabel { phase }).observe(seconds);
        }
    }

    fn register(&self, r: &mut Registry, phases: &[Phase]) {
        for &phase in phases {
            // Each phase is exported from the start (an empty histogram), so a panel by
            // phase is never blank and a rate has a zero to start from.
            let _ = self.0.get_or_create(&PhaseLabel { phase });
        }
        r.register(
            "gpo_step_duration_seconds",
            "Duration of one training step, by phase",
            self.0.clone(),
        );
    }
}

/// The machine's totals, as the executor reads them after an event: the counters export
/// what was added since the last call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MachineTotals {
    /// Messages refused for their generation.
    pub fenced_messages: u64,
    /// Recoveries completed.
    pub recoveries: u64,
    /// Aborted steps by the machine's kind (`lost`, `deadline`, …).
    pub aborted: Vec<(String, u64)>,
    /// Live workers, members of the current generation, and the target.
    pub live: usize,
    pub members: usize,
    pub expected: usize,
    /// The current generation.
    pub generation: u64,
}

/// The coordinator's families.
#[derive(Clone, Debug)]
pub struct CoordinatorMetrics {
    pub steps: StepDurations,
    episodes: Counter,
    train_loss: F64Gauge,
    alignment: Family<SplitLabel, F64Gauge>,
    workers: Family<StateLabel, Gauge>,
    generation: Gauge,
    restarts: Counter,
    aborted: Family<ReasonLabel, Counter>,
    recoveries: Counter,
    fenced: Counter,
    last_step: F64Gauge,
    /// What [`CoordinatorMetrics::sync`] exported last (a new machine starts from zero).
    seen: Arc<Mutex<MachineTotals>>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        CoordinatorMetrics {
            steps: StepDurations::default(),
            episodes: Counter::default(),
            train_loss: F64Gauge::default(),
            alignment: Family::default(),
            workers: Family::default(),
            generation: Gauge::default(),
            restarts: Counter::default(),
            aborted: Family::default(),
            recoveries: Counter::default(),
            fenced: Counter::default(),
            last_step: F64Gauge::default(),
            seen: Arc::new(Mutex::new(MachineTotals::default())),
        }
    }
}

impl CoordinatorMetrics {
    /// Adds the coordinator's families to `r`.
    pub fn register(&self, r: &mut Registry) {
        self.steps.register(r, &[Phase::Dispatch]);
        r.register(
            "gpo_episodes",
            "Episodes of committed steps",
            self.episodes.clone(),
        );
        r.register(
            "gpo_train_loss",
            "The official GPO loss of the last committed step",
            self.train_loss.clone(),
        );
        r.register(
            "gpo_alignment_score",
            "GPO's alignment at the last evaluation, by group split",
            self.alignment.clone(),
        );
        for &state in WorkerState::ALL {
            let _ = self.workers.get_or_create(&StateLabel { state });
        }
        r.register(
            "gpo_workers",
            "Workers by state (member is a subset of live; expected is --workers)",
            self.workers.clone(),
        );
        r.register(
            "gpo_membership_generation",
            "The current membership generation",
            self.generation.clone(),
        );
        r.register(
            "gpo_worker_restarts",
            "Registrations of a worker name seen before in this run (a restarted or re-registered worker)",
            self.restarts.clone(),
        );
        for &reason in AbortReason::ALL {
            let _ = self.aborted.get_or_create(&ReasonLabel { reason });
        }
        r.register(
            "gpo_steps_aborted",
            "Steps thrown away and rerun, by reason",
            self.aborted.clone(),
        );
        r.register(
            "gpo_recoveries",
            "Recoveries completed: a failure detected and the run back to committing steps",
            self.recoveries.clone(),
        );
        r.register(
            "gpo_fenced_messages",
            "Messages refused because they name an older generation",
            self.fenced.clone(),
        );
        r.register(
            "gpo_last_step_timestamp_seconds",
            "Unix time at which the last step committed (0: none yet)",
            self.last_step.clone(),
        );
    }

    /// Copies the machine's state in: gauges are set, counters grow by what the machine
    /// added since the last call.
    pub fn sync(&self, t: &MachineTotals) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let grow = |c: &Counter, now: u64, before: u64| {
            if now > before {
                c.inc_by(now - before);
            }
        };
        grow(&self.fenced, t.fenced_messages, seen.fenced_messages);
        grow(&self.recoveries, t.recoveries, seen.recoveries);
        for (kind, n) in &t.aborted {
            let before = seen
                .aborted
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0, |x| x.1);
            let reason = AbortReason::of_kind(kind);
            grow(
                &self.aborted.get_or_create(&ReasonLabel { reason }),
                *n,
                before,
            );
        }
        for (state, n) in [
            (WorkerState::Live, t.live),
            (WorkerState::Member, t.members),
            (WorkerState::Expected, t.expected),
        ] {
            self.workers
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        self.generation.set(t.generation as i64);
        *seen = t.clone();
    }

    /// A step committed with `loss` over `episodes` episodes at Unix time `unix_s`.
    pub fn committed(&self, loss: f64, episodes: u64, unix_s: f64) {
        self.episodes.inc_by(episodes);
        self.step_done(loss, unix_s);
    }

    /// A step ended with `loss` at Unix time `unix_s` (in process, where episodes are not
    /// counted: no executor sees them).
    pub fn step_done(&self, loss: f64, unix_s: f64) {
        self.train_loss.set(loss);
        self.last_step.set(unix_s);
    }

    /// A worker registered under a name this run saw before.
    pub fn worker_restarted(&self) {
        self.restarts.inc();
    }

    /// An evaluation scored GPO at `score` on `split`.
    pub fn alignment(&self, split: Split, score: f64) {
        self.alignment
            .get_or_create(&SplitLabel { split })
            .set(score);
    }
}

/// The families of a process that computes embeddings (today `gpo embed` and the
/// in-process store of `gpo train`; workers that embed come with a later issue).
#[derive(Clone, Debug)]
pub struct EmbedMetrics {
    tokens: Counter,
    duration: Histogram,
}

impl Default for EmbedMetrics {
    fn default() -> Self {
        EmbedMetrics {
            tokens: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
        }
    }
}

impl EmbedMetrics {
    /// Adds the embedding families to `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "gpo_embed_tokens",
            "Tokens embedded (padding excluded)",
            self.tokens.clone(),
        );
        r.register(
            "gpo_embed_duration_seconds",
            "Duration of one embedding batch",
            self.duration.clone(),
        );
    }

    /// One batch of `tokens` tokens embedded in `seconds`.
    pub fn batch(&self, tokens: u64, seconds: f64) {
        self.tokens.inc_by(tokens);
        if seconds.is_finite() && seconds >= 0.0 {
            self.duration.observe(seconds);
        }
    }

    /// Tokens so far.
    pub fn tokens(&self) -> u64 {
        self.tokens.get()
    }
}

/// A worker's families.
#[derive(Clone, Debug, Default)]
pub struct WorkerMetrics {
    pub steps: StepDurations,
    allreduce_bytes: Counter,
    pub embed: EmbedMetrics,
    /// Bytes the current collective had sent at the last observation.
    last_sent: Arc<AtomicU64>,
}

impl WorkerMetrics {
    /// Adds the worker's families to `r`.
    pub fn register(&self, r: &mut Registry) {
        self.steps
            .register(r, &[Phase::Compute, Phase::Allreduce, Phase::Optimizer]);
        r.register(
            "gpo_allreduce_bytes",
            "Bytes this worker sent to its ring peer in all-reduces",
            self.allreduce_bytes.clone(),
        );
        self.embed.register(r);
    }

    /// One step's phase times.
    pub fn step(&self, compute_s: f64, allreduce_s: f64, optimizer_s: f64) {
        self.steps.observe(Phase::Compute, compute_s);
        self.steps.observe(Phase::Allreduce, allreduce_s);
        self.steps.observe(Phase::Optimizer, optimizer_s);
    }

    /// Bytes sent by the collective's all-reduces, as its own running total: a new
    /// collective (a new generation) starts again from `0`, which [`Self::collective_reset`] marks.
    pub fn allreduce_sent(&self, total: u64) {
        let before = self.last_sent.swap(total, Ordering::Relaxed);
        if total > before {
            self.allreduce_bytes.inc_by(total - before);
        }
    }

    /// A new collective whose running total starts at 0.
    pub fn collective_reset(&self) {
        self.last_sent.store(0, Ordering::Relaxed);
    }

    /// Bytes so far.
    pub fn allreduce_bytes(&self) -> u64 {
        self.allreduce_bytes.get()
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
