//! The etcd leadership of a highly available run (`gpo coordinator --etcd`): the
//! campaign a standby waits in, and the thread that keeps the run's state pointer current
//! and fails the run when the leadership is lost. Its own module because it is the only
//! part of the command that talks to etcd, and a run without `--etcd` never enters it.

use anyhow::Result;
use gpo_coordinator::CoordinatorService;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Leadership through etcd: the runtime that keeps it, the leadership, and the pointer.
pub(super) struct Elected {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) leadership: Option<gpo_coordinator::etcd::Leadership>,
    pub(super) pointer: Option<gpo_coordinator::etcd::StatePointer>,
}

/// Campaigns in etcd for the run's leadership as `addr`, blocking while another leads.
pub(super) fn campaign(cfg: gpo_worker::etcd::EtcdConfig, addr: &str) -> Result<Elected> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gpo-etcd")
        .enable_all()
        .build()?;
    eprintln!("campaigning in etcd for run `{}` as {addr}", cfg.run_name);
    let (leadership, pointer) =
        rt.block_on(gpo_coordinator::etcd::Leadership::campaign(cfg, addr))?;
    eprintln!("elected leader");
    Ok(Elected {
        rt,
        leadership: Some(leadership),
        pointer,
    })
}

/// Writes the state pointer whenever the newest resume point or the generation changes,
/// and fails the run when the leadership is lost.
pub(super) fn pointer_writer(
    mut lead: gpo_coordinator::etcd::Leadership,
    handle: tokio::runtime::Handle,
    svc: &CoordinatorService,
    base: gpo_coordinator::etcd::StatePointer,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let abort = svc.aborter();
    let generation = svc.generation_reader();
    let dir = gpo_coordinator::run::checkpoints_dir(Path::new(&base.out));
    let lost = lead.lost();
    std::thread::spawn(move || {
        let mut last: Option<(u64, u64)> = None;
        let mut tries = 0;
        loop {
            // Read before the write: a final pass after the loop ended still writes.
            let finished = done.load(std::sync::atomic::Ordering::Relaxed);
            if lost.load(std::sync::atomic::Ordering::SeqCst) {
                abort("this coordinator lost its etcd leadership".into());
                return;
            }
            let step = gpo_core::io::checkpoint::resume_points(&dir)
                .first()
                .map_or(base.step, |p| p.0);
            let now = (step, generation().max(base.generation));
            if last != Some(now) {
                let p = gpo_coordinator::etcd::StatePointer {
                    step: now.0,
                    generation: now.1,
                    ..base.clone()
                };
                match handle.block_on(lead.write(&p)) {
                    Ok(()) => last = Some(now),
                    Err(e) if lost.load(std::sync::atomic::Ordering::SeqCst) => {
                        abort(format!("{e:#}"));
                        return;
                    }
                    Err(e) => tracing::warn!("{e:#}; retrying"),
                }
            }
            if finished && last == Some(now) {
                return;
            }
            if finished {
                // The run is over but etcd did not take the last pointer: a few more tries.
                tries += 1;
                if tries > 10 {
                    tracing::warn!("etcd: the final state pointer was not written");
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}
