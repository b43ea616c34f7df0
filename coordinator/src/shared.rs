//! The adapter's shared state: the pure [`Machine`] behind one mutex, the workers'
//! assignment channels, and the executor that turns the machine's [`Action`]s into gRPC
//! messages. Both the async gRPC handlers ([`crate::service`]) and the training loop's
//! dispatch thread ([`crate::dispatch`]) go through [`Shared::handle`], so every event is
//! handled in one order and every action is carried out right after the event that caused
//! it, under the same lock.

use crate::machine::{Action, Event, Machine, Ms, Reject, WorkerId};
use gpo_core::sampler::EpisodeSpec;
use gpo_proto::v1 as pb;
use gpo_worker::wire;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tonic::Status;

pub(crate) type Tx = mpsc::Sender<Result<pb::Assignment, Status>>;

/// Dropped workers remembered for error messages (bounded).
const DROPPED_KEPT: usize = 256;
/// Worker names remembered to count restarts (bounded: later names are not counted).
const NAMES_KEPT: usize = 1024;

/// A worker's open assignment stream.
pub(crate) struct Link {
    pub tx: Tx,
    /// Tells the stream's watcher task to let go of its sender, so the stream ends.
    pub dropped: Arc<Notify>,
}

/// A committed step, as the dispatch reads it.
pub(crate) struct CommitInfo {
    pub step: u64,
    pub loss: f64,
    /// The members' results in rank order.
    pub results: Vec<pb::StepResult>,
}

/// The committed state the coordinator holds, for transfers and its mirror.
#[derive(Clone)]
pub(crate) struct StateBlob {
    pub step: u64,
    pub sha: String,
    pub state: pb::ReplicaState,
}

/// Everything behind the mutex.
pub(crate) struct Core {
    pub machine: Machine,
    pub links: BTreeMap<WorkerId, Link>,
    /// The submitted step's episodes and the run's length.
    pub episodes: Vec<EpisodeSpec>,
    pub total_steps: u64,
    /// The submitted step's padded target width (0: the workers infer it).
    pub target_slots: u64,
    /// Accepted results of the running step, by worker.
    pub results: BTreeMap<WorkerId, pb::StepResult>,
    /// Completed collective setups: generation → (members, addresses).
    pub setups: BTreeMap<u64, (Vec<WorkerId>, Vec<String>)>,
    pub commits: VecDeque<CommitInfo>,
    /// Set when the machine went back to an earlier step (the dispatch tells the loop).
    pub rewind: Option<u64>,
    pub state: Option<StateBlob>,
    pub recent: VecDeque<pb::StepTiming>,
    pub dropped: VecDeque<(WorkerId, String)>,
    pub names_caps: BTreeMap<WorkerId, pb::Capabilities>,
    /// Each registered worker's secret; worker-scoped calls must carry it.
    pub worker_secrets: BTreeMap<WorkerId, String>,
    /// Names that registered in this run (for `gpo_worker_restarts_total`).
    pub names_seen: std::collections::BTreeSet<String>,
}

/// The adapter's state, shared by the service and the dispatch.
pub(crate) struct Shared {
    pub run_id: String,
    pub info: crate::service::RunInfo,
    pub opts: crate::service::CoordinatorOptions,
    core: Mutex<Core>,
    pub changed: Condvar,
    pub notify: Notify,
    epoch: Instant,
    /// The run's ring secret, handed to workers at registration.
    pub ring_secret: Vec<u8>,
}

impl Shared {
    pub fn new(
        run_id: String,
        info: crate::service::RunInfo,
        opts: crate::service::CoordinatorOptions,
        machine: Machine,
        ring_secret: Vec<u8>,
    ) -> Shared {
        Shared {
            run_id,
            info,
            opts,
            core: Mutex::new(Core {
                machine,
                links: BTreeMap::new(),
                episodes: Vec::new(),
                total_steps: 0,
                target_slots: 0,
                results: BTreeMap::new(),
                setups: BTreeMap::new(),
                commits: VecDeque::new(),
                rewind: None,
                state: None,
                recent: VecDeque::new(),
                dropped: VecDeque::new(),
                names_caps: BTreeMap::new(),
                worker_secrets: BTreeMap::new(),
                names_seen: Default::default(),
            }),
            changed: Condvar::new(),
            notify: Notify::new(),
            epoch: Instant::now(),
            ring_secret,
        }
    }

    /// Milliseconds since the service started (the machine's clock).
    pub fn now(&self) -> Ms {
        self.epoch.elapsed().as_millis() as Ms
    }

    /// Seconds since the service started, for a machine time.
    pub fn secs(&self, at: Ms) -> f64 {
        at as f64 / 1000.0
    }

    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter (the dispatch thread and async handlers).
    pub fn wake(&self) {
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    /// Waits on the condition variable for at most `d`.
    pub fn wait<'a>(&self, g: MutexGuard<'a, Core>, d: Duration) -> MutexGuard<'a, Core> {
        self.changed
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// Hands one event to the machine and carries out what it asks for. Events the
    /// execution itself discovers (a stream that can no longer be written) follow.
    pub fn handle(&self, core: &mut Core, ev: Event) -> Result<Option<WorkerId>, Reject> {
        let mut queue = VecDeque::from([ev]);
        let mut first = None;
        while let Some(ev) = queue.pop_front() {
            let out = core.machine.handle(self.now(), ev);
            if first.is_none() {
                first = Some(out.reply);
            }
            for a in out.actions {
                if let Some(follow) = self.execute(core, a) {
                    queue.push_back(follow);
                }
            }
        }
        self.export(core);
        self.wake();
        first.unwrap_or(Ok(None))
    }

    /// Copies the machine's counters and gauges into the Prometheus families (the machine
    /// itself knows nothing of metrics).
    fn export(&self, core: &Core) {
        let m = &core.machine;
        let c = m.counters();
        self.opts.metrics.sync(&gpo_ops::metrics::MachineTotals {
            fenced_messages: c.fenced_messages,
            recoveries: c.recoveries,
            aborted: c.aborted.iter().map(|(k, &n)| (k.clone(), n)).collect(),
            live: m.workers().len(),
            members: m.members().len(),
            expected: self.opts.expected_workers,
            generation: m.generation(),
        });
    }

    /// Counts a registration under a name seen before in this run as a worker restart.
    pub fn note_name(&self, core: &mut Core, name: &str) {
        let name: String = name.chars().take(crate::machine::MAX_NAME_LEN).collect();
        if core.names_seen.contains(&name) {
            self.opts.metrics.worker_restarted();
        } else if core.names_seen.len() < NAMES_KEPT {
            core.names_seen.insert(name);
        }
    }

    fn send(core: &mut Core, to: WorkerId, kind: pb::assignment::Kind) -> Option<Event> {
        let link = core.links.get(&to)?;
        match link.tx.try_send(Ok(pb::Assignment { kind: Some(kind) })) {
            Ok(()) => None,
            Err(_) => Some(Event::StreamClosed { id: to }),
        }
    }

    fn execute(&self, core: &mut Core, a: Action) -> Option<Event> {
        use pb::assignment::Kind;
        match a {
            Action::Membership {
                to,
                generation,
                rank,
                world,
                committed,
                transfer,
            } => {
                let blob = core.state.as_ref().filter(|s| s.step == committed);
                let msg = pb::Membership {
                    generation,
                    rank: rank as u32,
                    world_size: world as u32,
                    committed_step: committed,
                    state: transfer.then(|| blob.map(|b| b.state.clone())).flatten(),
                    params_sha256: blob.map(|b| b.sha.clone()).unwrap_or_default(),
                };
                gpo_ops::logs::context::set_generation(generation);
                if transfer {
                    tracing::info!(
                        "generation {generation}: sending step {committed}'s state to {}",
                        core.machine.label(to)
                    );
                }
                Self::send(core, to, Kind::Membership(msg))
            }
            Action::SetupComplete { generation, addrs } => {
                let members = core.machine.members().to_vec();
                gpo_ops::logs::context::set_generation(generation);
                tracing::info!(
                    "generation {generation}: {} member(s) set up, steps start",
                    members.len()
                );
                core.setups.insert(generation, (members, addrs));
                while core.setups.len() > 4 {
                    core.setups.pop_first();
                }
                None
            }
            Action::SendStep {
                to,
                generation,
                step,
                first,
                end,
                want_state,
            } => {
                let episodes = core.episodes[first..end]
                    .iter()
                    .map(wire::episode_to_pb)
                    .collect();
                let msg = pb::StepAssignment {
                    generation,
                    step,
                    total_steps: core.total_steps,
                    batch_groups: core.episodes.len() as u32,
                    first_index: first as u32,
                    episodes,
                    want_state,
                    target_slots: core.target_slots,
                };
                Self::send(core, to, Kind::Step(msg))
            }
            Action::Abort {
                to,
                generation,
                step,
                reason,
            } => Self::send(
                core,
                to,
                Kind::Abort(pb::Abort {
                    generation,
                    step,
                    reason,
                }),
            ),
            Action::Drop { id, reason } => {
                tracing::warn!("{reason}: dropped from the run");
                if let Some(link) = core.links.remove(&id) {
                    link.dropped.notify_one();
                }
                core.results.remove(&id);
                // A dropped worker registers again under a new id: forget this one's.
                core.names_caps.remove(&id);
                core.worker_secrets.remove(&id);
                core.dropped.push_back((id, reason));
                while core.dropped.len() > DROPPED_KEPT {
                    core.dropped.pop_front();
                }
                None
            }
            Action::Committed {
                step,
                generation: _,
                loss,
                state_from,
            } => {
                let members = core.machine.members().to_vec();
                let mut results: Vec<pb::StepResult> = members
                    .iter()
                    .filter_map(|id| core.results.remove(id))
                    .collect();
                core.results.clear();
                if let Some(from) = state_from {
                    let pos = members.iter().position(|&m| m == from).unwrap_or(0);
                    if let Some(r) = results.get_mut(pos) {
                        if let Some(state) = r.state.take() {
                            core.state = Some(StateBlob {
                                step,
                                sha: r.params_sha256.clone(),
                                state,
                            });
                        }
                    }
                }
                let episodes = results.iter().map(|r| u64::from(r.episodes)).sum();
                let unix_s = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.opts.metrics.committed(loss, episodes, unix_s);
                gpo_ops::logs::context::set_step(step);
                core.commits.push_back(CommitInfo {
                    step,
                    loss,
                    results,
                });
                None
            }
            Action::Rewind { to } => {
                tracing::warn!("no live worker holds the committed state: back to step {to}");
                core.commits.clear();
                core.results.clear();
                core.rewind = Some(to);
                None
            }
            Action::Shutdown { to, reason, failed } => {
                Self::send(core, to, Kind::Shutdown(pb::Shutdown { reason, failed }));
                None
            }
        }
    }

    /// Why a worker was dropped, if it was recently.
    pub fn dropped_reason(core: &Core, id: WorkerId) -> Option<String> {
        core.dropped
            .iter()
            .rev()
            .find(|(d, _)| *d == id)
            .map(|(_, r)| r.clone())
    }
}
