//! The run's status for `gpo status`: the machine's view (phase, generation, members,
//! what it waits for, the generation history and the recoveries) as a `RunStatus`.

use crate::shared::Shared;
use gpo_proto::v1 as pb;

/// The run's status now.
pub(crate) fn run_status(sh: &Shared) -> pb::RunStatus {
    let core = sh.lock();
    let m = &core.machine;
    let now = sh.now();
    let members = m.members();
    pb::RunStatus {
        run_id: sh.run_id.clone(),
        state: m.phase().name().into(),
        step: m.committed(),
        total_steps: sh.info.total_steps,
        generation: m.generation(),
        expected_workers: sh.opts.expected_workers as u32,
        workers: m
            .workers()
            .iter()
            .map(|(&id, w)| {
                let rank = members.iter().position(|&x| x == id);
                pb::WorkerStatus {
                    worker_id: id,
                    name: w.name.clone(),
                    rank: rank.unwrap_or(0) as u32,
                    member: rank.is_some(),
                    last_seen_ms: now.saturating_sub(w.last_seen),
                    last_step: w.last_step,
                    capabilities: core.names_caps.get(&id).cloned(),
                }
            })
            .collect(),
        recent_steps: core.recent.iter().cloned().collect(),
        error: m.error().unwrap_or_default().to_string(),
        waiting_for: m.waiting_for().unwrap_or_default(),
        generations: m
            .history()
            .iter()
            .map(|g| pb::GenerationInfo {
                generation: g.generation,
                at_s: sh.secs(g.at),
                members: g.members.clone(),
                reason: g.reason.clone(),
            })
            .collect(),
        recoveries: m
            .recoveries()
            .iter()
            .map(|r| pb::RecoveryInfo {
                step: r.step,
                reason: r.reason.clone(),
                detect_s: sh.secs(r.detect_ms),
                recover_s: r.recover_ms.map_or(-1.0, |x| sh.secs(x)),
                steps_recomputed: r.steps_recomputed,
            })
            .collect(),
    }
}
