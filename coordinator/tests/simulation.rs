//! Deterministic simulation of the run's state machine under random fault schedules.
//!
//! A seeded simulator plays the coordinator's adapter and the workers around a real
//! [`Machine`]: messages travel with random delays (worker-bound ones in order per worker,
//! as a gRPC stream delivers them), results are sometimes sent twice, and each schedule
//! draws kills, stalls (SIGSTOP and SIGCONT), clean leaves, joins and coordinator restarts
//! from the last persisted state. Simulated workers behave as `gpo worker` does: they roll
//! back an uncommitted step when a new generation names the previous step as committed,
//! load a transferred state when told to, and register again when dropped.
//!
//! After every event it checks that steps are committed once each and in order, that the
//! generation only grows, and that no message of an old generation is accepted; at the end,
//! that the run finished and its ledger (step → shard bounds → digest) is the fault-free
//! one. A failing schedule prints its seed: `GPO_SIM_SEED=<seed> cargo test -p
//! gpo-coordinator --test simulation` replays it alone. `GPO_SIM_SCHEDULES` sets how many
//! run (default 10,000).

use gpo_coordinator::machine::{Action, Event, Machine, MachineConfig, Ms, Phase, Report};
use std::collections::{BTreeMap, BinaryHeap};

#[path = "simulation/workers.rs"]
mod workers;

/// SplitMix64: small, seeded, good enough for schedules.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// The fault-free digest chain: the state after step s is a function of the state after
/// step s − 1 and s alone, as a deterministic trainer's is.
fn next_digest(d: u64, step: u64) -> u64 {
    let mut r = Rng(d ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d));
    r.next()
}

const EPISODES: usize = 12;
const SHARD: usize = 2;
const HEARTBEAT: Ms = 1_000;
const RING_TIMEOUT: Ms = 8_000;

#[derive(Debug, Clone)]
enum ToWorker {
    Action(Action),
    /// A membership with the state the adapter attached when it sent it.
    Membership(Action, (u64, u64)),
    /// The coordinator refused the worker's last message as coming from a dropped worker.
    Rejected,
}

#[derive(Debug, Clone)]
enum Msg {
    ToCoord(Event, usize, u64),
    ToWorker(usize, u64, ToWorker),
    /// A worker's own timer: heartbeat, or a collective timeout for (generation, step).
    Timer(usize, Timer),
    /// The coordinator's tick.
    Tick(u64),
    /// Fault injection.
    Fault(Fault),
    /// The training loop submits the next step.
    Submit(u64),
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Heartbeat(u64),
    RingTimeout(u64, u64),
    Compute(u64, u64),
    Register,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Stall(Ms),
    Leave,
    Join,
    RestartCoordinator,
    Wake(usize),
    /// After the faults, a supervisor (Kubernetes) brings the pool back to its size.
    TopUp,
}

struct Queued {
    at: Ms,
    seq: u64,
    msg: Msg,
}
impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone)]
struct SimWorker {
    /// Its id at the current coordinator (`None`: registering).
    id: Option<u64>,
    /// Bumped on every (re)registration, so messages to an old identity are ignored.
    epoch: u64,
    alive: bool,
    stalled_until: Option<Ms>,
    /// (step, digest) it holds, and the one before its last uncommitted step.
    state: (u64, u64),
    prev: Option<(u64, u64)>,
    generation: u64,
    rank: usize,
    world: usize,
    ready: bool,
    /// The step it is in, with its shard size.
    in_step: Option<(u64, u64, usize)>,
    /// Worker-bound messages arrive in order: the time of the last one queued.
    last_delivery: Ms,
}

struct Sim {
    rng: Rng,
    now: Ms,
    seq: u64,
    queue: BinaryHeap<Queued>,
    machine: Machine,
    cfg: MachineConfig,
    /// Coordinator instance; messages addressed to an older one are lost.
    instance: u64,
    workers: Vec<SimWorker>,
    by_id: BTreeMap<u64, usize>,
    total_steps: u64,
    chain: Vec<u64>,
    /// The state the coordinator holds: (step, digest), from rank 0's reports.
    coord_state: (u64, u64),
    /// What the persisted checkpoint holds (for a coordinator restart).
    persisted: (u64, u64, u64),
    /// Collective participation per (generation, step): ranks that entered.
    collectives: BTreeMap<(u64, u64), Vec<usize>>,
    /// The final ledger: step → digest of its last commit.
    final_ledger: BTreeMap<u64, String>,
    last_generation: u64,
    last_committed: u64,
    faults_until: Ms,
    stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    commits: u64,
    generations: u64,
    fenced: u64,
    restarts: u64,
    rewinds: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let workers = 2 + rng.below(3) as usize;
        let cfg = MachineConfig {
            target_workers: workers,
            min_workers: 1 + rng.below(2) as usize,
            heartbeat_timeout: 5_000,
            step_deadline_min: 5_000,
            first_step_deadline: 20_000,
            setup_timeout: 10_000,
            shard_groups: SHARD,
            max_step_attempts: 1_000,
            ..Default::default()
        };
        let total_steps = 8 + rng.below(16);
        let mut chain = vec![seed ^ 0x5eed];
        for s in 1..=total_steps {
            let d = next_digest(chain[s as usize - 1], s);
            chain.push(d);
        }
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            machine: Machine::new(cfg.clone(), 0, 0, 0),
            cfg,
            instance: 0,
            workers: Vec::new(),
            by_id: BTreeMap::new(),
            total_steps,
            coord_state: (0, chain[0]),
            persisted: (0, chain[0], 0),
            chain,
            collectives: BTreeMap::new(),
            final_ledger: BTreeMap::new(),
            last_generation: 0,
            last_committed: 0,
            faults_until: 0,
            stats: Stats::default(),
        };
        for _ in 0..workers {
            sim.spawn_worker();
        }
        let faults = sim.rng.below(6);
        let span = 3_000 + sim.rng.below(30_000);
        sim.faults_until = span;
        for _ in 0..faults {
            let at = sim.rng.below(span);
            let f = match sim.rng.below(12) {
                0..=3 => Fault::Kill,
                4..=6 => Fault::Stall(2_000 + sim.rng.below(12_000)),
                7 => Fault::Leave,
                8..=9 => Fault::Join,
                _ => Fault::RestartCoordinator,
            };
            sim.push(at, Msg::Fault(f));
        }
        sim.push(span + 15_000, Msg::Fault(Fault::TopUp));
        sim.push(0, Msg::Submit(1));
        sim.push(100, Msg::Tick(0));
        sim
    }

    pub(crate) fn push(&mut self, at: Ms, msg: Msg) {
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            msg,
        });
    }

    pub(crate) fn delay(&mut self) -> Ms {
        if self.rng.chance(0.02) {
            200 + self.rng.below(800)
        } else {
            1 + self.rng.below(30)
        }
    }

    pub(crate) fn spawn_worker(&mut self) -> usize {
        let w = self.workers.len();
        self.workers.push(SimWorker {
            id: None,
            epoch: 0,
            alive: true,
            stalled_until: None,
            state: (0, self.chain[0]),
            prev: None,
            generation: 0,
            rank: 0,
            world: 0,
            ready: false,
            in_step: None,
            last_delivery: 0,
        });
        let at = self.now + self.delay();
        self.push(at, Msg::Timer(w, Timer::Register));
        w
    }

    /// Delivers an event to the machine and carries out its actions.
    pub(crate) fn coord(&mut self, ev: Event, from: Option<usize>) -> Result<(), String> {
        let gen_before = self.machine.generation();
        let is_result = matches!(ev, Event::StepResult { .. } | Event::Setup { .. });
        let ev_gen = match &ev {
            Event::StepResult { generation, .. } | Event::Setup { generation, .. } => *generation,
            _ => 0,
        };
        let register_from = match &ev {
            Event::Register { .. } => from,
            _ => None,
        };
        let out = self.machine.handle(self.now, ev);
        if is_result && out.reply.is_ok() && ev_gen != gen_before {
            return Err(format!(
                "a message of generation {ev_gen} was accepted while the run was at {gen_before}"
            ));
        }
        if let Err(e) = &out.reply {
            if matches!(e, gpo_coordinator::machine::Reject::Stale(_)) {
                self.stats.fenced += 1;
            }
            if let (Some(w), gpo_coordinator::machine::Reject::UnknownWorker(_)) = (from, e) {
                let at = self.now + self.delay();
                let epoch = self.workers[w].epoch;
                self.push(at, Msg::ToWorker(w, epoch, ToWorker::Rejected));
            }
        }
        if let (Some(w), Ok(Some(id))) = (register_from, &out.reply) {
            self.workers[w].id = Some(*id);
            self.by_id.insert(*id, w);
            let ev = Event::StreamOpened { id: *id };
            self.coord(ev, Some(w))?;
        }
        if self.machine.generation() < self.last_generation {
            return Err("the generation went down".into());
        }
        self.last_generation = self.machine.generation();
        // The adapter persists every new generation with its leadership (etcd's pointer).
        self.persisted.2 = self.machine.generation();
        for a in out.actions {
            self.act(a)?;
        }
        Ok(())
    }

    fn act(&mut self, a: Action) -> Result<(), String> {
        if std::env::var("GPO_SIM_TRACE").is_ok() {
            eprintln!("{:>7} [{}] {a:?}", self.now, self.instance);
        }
        match &a {
            Action::Committed {
                step,
                state_from,
                generation: _,
                loss: _,
            } => {
                if *step != self.last_committed + 1 {
                    return Err(format!(
                        "step {step} committed after step {}",
                        self.last_committed
                    ));
                }
                self.last_committed = *step;
                self.stats.commits += 1;
                let e = self
                    .machine
                    .ledger()
                    .last()
                    .expect("ledger has the step")
                    .clone();
                if e.bounds.first() != Some(&0)
                    || e.bounds.last() != Some(&EPISODES)
                    || e.bounds.windows(2).any(|w| w[0] > w[1])
                {
                    return Err(format!("step {step}: shard bounds {:?}", e.bounds));
                }
                self.final_ledger.insert(*step, e.digest.clone());
                if state_from.is_some() {
                    let d: u64 = e.digest.parse().map_err(|_| "bad digest")?;
                    self.coord_state = (*step, d);
                    // The adapter checkpoints what it holds.
                    self.persisted = (*step, d, self.machine.generation());
                }
                if *step < self.total_steps {
                    let at = self.now + 1 + self.rng.below(5);
                    self.push(at, Msg::Submit(*step + 1));
                } else {
                    self.coord(Event::Finish, None)?;
                }
            }
            Action::Membership { to, .. }
            | Action::SendStep { to, .. }
            | Action::Abort { to, .. }
            | Action::Shutdown { to, .. } => self.deliver(*to, a.clone())?,
            Action::Drop { id, .. } => self.deliver(*id, a.clone())?,
            Action::Rewind { to } => {
                // The adapter's state is the persisted one; the loop runs on from there.
                if self.coord_state.0 != *to {
                    return Err(format!(
                        "rewound to step {to}, the coordinator holds step {}'s state",
                        self.coord_state.0
                    ));
                }
                self.last_committed = *to;
                self.stats.rewinds += 1;
                let at = self.now + 1;
                self.push(at, Msg::Submit(*to + 1));
            }
            Action::SetupComplete { .. } => {
                let members = self.machine.members().to_vec();
                for id in members {
                    self.deliver(id, a.clone())?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn deliver(&mut self, id: u64, a: Action) -> Result<(), String> {
        let Some(&w) = self.by_id.get(&id) else {
            return Ok(());
        };
        let msg = match &a {
            Action::Membership {
                generation,
                committed,
                transfer: true,
                ..
            } => {
                // The adapter attaches the state it holds when it sends the membership.
                if self.coord_state.0 != *committed {
                    return Err(format!(
                        "generation {generation} transfers step {committed}'s state, the coordinator holds step {}'s",
                        self.coord_state.0
                    ));
                }
                ToWorker::Membership(a, self.coord_state)
            }
            _ => ToWorker::Action(a),
        };
        let d = self.delay();
        let at = (self.now + d).max(self.workers[w].last_delivery);
        self.workers[w].last_delivery = at;
        let epoch = self.workers[w].epoch;
        self.push(at, Msg::ToWorker(w, epoch, msg));
        Ok(())
    }

    pub(crate) fn send(&mut self, w: usize, ev: Event) {
        let at = self.now + self.delay();
        let inst = self.instance;
        self.push(at, Msg::ToCoord(ev.clone(), w, inst));
        if matches!(ev, Event::StepResult { .. }) && self.rng.chance(0.05) {
            let at2 = at + self.delay();
            self.push(at2, Msg::ToCoord(ev, w, inst));
        }
    }

    fn run(&mut self) -> Result<Stats, String> {
        let limit: Ms = 600_000;
        while let Some(q) = self.queue.pop() {
            self.now = q.at;
            if self.now > limit {
                break;
            }
            match q.msg {
                Msg::Tick(inst) => {
                    if inst == self.instance {
                        self.coord(Event::Tick, None)?;
                        if self.machine.phase().over() {
                            break;
                        }
                        let at = self.now + 100;
                        self.push(at, Msg::Tick(inst));
                    } else {
                        let at = self.now + 100;
                        let i = self.instance;
                        self.push(at, Msg::Tick(i));
                    }
                }
                Msg::Submit(step) => {
                    if step == self.machine.committed() + 1 {
                        let want_state = step % 4 == 0 || self.rng.chance(0.1);
                        let ev = Event::Submit {
                            step,
                            episodes: EPISODES,
                            want_state,
                        };
                        self.coord(ev, None)?;
                    }
                }
                Msg::ToCoord(ev, w, inst) => {
                    if inst == self.instance
                        && self.workers[w].stalled_until.is_none()
                        && (self.workers[w].alive
                            || matches!(ev, Event::StreamClosed { .. } | Event::Leave { .. }))
                    {
                        self.coord(ev, Some(w))?;
                    } else if self.workers[w].stalled_until.is_some() {
                        // A stalled process sends its message when it wakes.
                        let at = self.workers[w].stalled_until.unwrap_or(self.now) + 1;
                        self.push(at, Msg::ToCoord(ev, w, inst));
                    }
                }
                Msg::ToWorker(w, epoch, m) => {
                    let wk = &self.workers[w];
                    if !wk.alive || wk.epoch != epoch {
                        continue;
                    }
                    if let Some(until) = wk.stalled_until {
                        self.push(until + 1, Msg::ToWorker(w, epoch, m));
                        continue;
                    }
                    self.worker_msg(w, m)?;
                }
                Msg::Timer(w, t) => {
                    let wk = &self.workers[w];
                    if !wk.alive {
                        continue;
                    }
                    if let Some(until) = wk.stalled_until {
                        self.push(until + 1, Msg::Timer(w, t));
                        continue;
                    }
                    self.timer(w, t)?;
                }
                Msg::Fault(f) => self.fault(f)?,
            }
            if self.machine.phase() == Phase::Done {
                break;
            }
            if self.machine.phase() == Phase::Failed {
                return Err(format!(
                    "the run failed: {}",
                    self.machine.error().unwrap_or_default()
                ));
            }
        }
        if self.machine.phase() != Phase::Done {
            return Err(format!(
                "the run did not finish: phase {}, committed {} of {} ({})",
                self.machine.phase().name(),
                self.machine.committed(),
                self.total_steps,
                self.machine.waiting_for().unwrap_or_default()
            ));
        }
        for s in 1..=self.total_steps {
            let want = self.chain[s as usize].to_string();
            match self.final_ledger.get(&s) {
                Some(d) if *d == want => {}
                Some(d) => return Err(format!("step {s}: digest {d}, fault-free {want}")),
                None => return Err(format!("step {s} was never committed")),
            }
        }
        self.stats.generations = self.machine.generation();
        Ok(self.stats)
    }
}

fn run_schedule(seed: u64) -> Result<Stats, String> {
    let mut sim = Sim::new(seed);
    sim.run()
}

#[test]
fn random_fault_schedules_keep_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("GPO_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("GPO_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("GPO_SIM_SCHEDULES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(10_000);
            (0..n).collect()
        }
    };
    let mut total = Stats::default();
    for &seed in &seeds {
        match run_schedule(seed) {
            Ok(s) => {
                total.commits += s.commits;
                total.generations += s.generations;
                total.fenced += s.fenced;
                total.restarts += s.restarts;
                total.rewinds += s.rewinds;
            }
            Err(e) => panic!(
                "schedule {seed} broke an invariant: {e}\nreplay: GPO_SIM_SEED={seed} cargo test -p gpo-coordinator --test simulation"
            ),
        }
    }
    eprintln!(
        "{} schedules: {} commits, {} generations, {} fenced messages, {} coordinator restarts, {} rewinds",
        seeds.len(),
        total.commits,
        total.generations,
        total.fenced,
        total.restarts,
        total.rewinds
    );
    // The schedules exercised what they claim to.
    if seeds.len() >= 100 {
        assert!(total.fenced > 0 && total.restarts > 0 && total.generations > seeds.len() as u64);
    }
}
