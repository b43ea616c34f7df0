//! One registration's life on a worker: heartbeats, the assignment stream, and what each
//! assignment asks for — set up the collective of a new generation (rolling back a step
//! the run threw away, or loading the committed state the coordinator sent), run a step,
//! abort a step's collective, or stop.
//!
//! A reader task owns the stream and breaks the running collective the moment an `Abort`
//! arrives, while the step itself runs on a blocking thread; so a worker whose peer died
//! never waits out a timeout. The session ends with an [`Ended`] that tells the caller
//! whether to stop, register again, or reconnect.

use crate::client::{within, Client, WorkerOptions, CALL_TIMEOUT};
use crate::collective::{Aborter, Collective, Local};
use crate::replica::Replica;
use crate::ring::{run_tag, RingId, TcpRing};
use crate::wire;
use anyhow::{bail, Context, Result};
use gpo_proto::v1 as pb;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How a session ended.
#[derive(Debug)]
pub enum Ended {
    /// The coordinator ended the run.
    Shutdown { reason: String, failed: bool },
    /// This worker was asked to stop (SIGTERM).
    Stopped,
    /// The coordinator dropped this worker (fenced, or its state is not the committed
    /// one): register again.
    Dropped(String),
    /// The coordinator cannot be reached: reconnect.
    CoordinatorLost(String),
}

enum FromStream {
    Assignment(pb::Assignment),
    End,
    Error(tonic::Status),
}

fn lost_or_dropped(s: &tonic::Status, what: &str) -> Option<Ended> {
    let why = format!("{what}: {}", s.message());
    match s.code() {
        tonic::Code::NotFound => Some(Ended::Dropped(why)),
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Internal => Some(Ended::CoordinatorLost(why)),
        _ => None,
    }
}

/// Tells the coordinator this worker leaves (best effort: it may be gone).
pub async fn leave(client: &mut Client, reg: &pb::RegisterResponse, why: &str) {
    let req = pb::LeaveRequest {
        run_id: reg.run_id.clone(),
        worker_id: reg.worker_id,
        reason: why.to_string(),
        worker_secret: reg.worker_secret.clone(),
    };
    let _ = within(Duration::from_secs(5), "leaving", client.leave(req)).await;
}

struct Work {
    replica: Option<Replica>,
    comm: Box<dyn Collective>,
}

/// Serves one registration until it ends.
pub async fn serve(
    opts: &WorkerOptions,
    client: &mut Client,
    reg: &pb::RegisterResponse,
    listener: &Arc<TcpListener>,
    replica: &mut Option<Replica>,
    steps: &mut u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Ended> {
    let run_id = reg.run_id.clone();
    let worker_id = reg.worker_id;
    let fake = (reg.fake_compute_ms > 0).then(|| Duration::from_millis(reg.fake_compute_ms));
    let n_params = reg.param_count as usize;
    let ring_addr = match &opts.ring_advertise {
        Some(a) => a.clone(),
        None => listener.local_addr()?.to_string(),
    };

    // Heartbeats, with the last finished step; a refusal as unknown means dropped.
    let last_step = Arc::new(AtomicU64::new(0));
    let (dropped_tx, mut dropped_rx) = mpsc::channel::<String>(1);
    let heartbeat = {
        let mut c = client.clone();
        let (run_id, last_step) = (run_id.clone(), last_step.clone());
        let secret = reg.worker_secret.clone();
        let every = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let req = pb::HeartbeatRequest {
                    run_id: run_id.clone(),
                    worker_id,
                    step: last_step.load(Ordering::Relaxed),
                    worker_secret: secret.clone(),
                };
                match within(CALL_TIMEOUT, "heartbeat", c.heartbeat(req)).await {
                    Ok(r) if r.get_ref().shutdown => break,
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        let _ = dropped_tx.send(s.message().to_string()).await;
                        break;
                    }
                    Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
                }
            }
        })
    };
    let _stop_heartbeat = AbortOnDrop(heartbeat);

    let stream = match within(
        CALL_TIMEOUT,
        "opening the assignment stream",
        client.assignments(pb::AssignmentsRequest {
            run_id: run_id.clone(),
            worker_id,
            worker_secret: reg.worker_secret.clone(),
        }),
    )
    .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => {
            return match lost_or_dropped(&s, "opening the assignment stream") {
                Some(e) => Ok(e),
                None => bail!("opening the assignment stream: {}", s.message()),
            }
        }
    };
    // The reader: forwards assignments, and aborts the running collective at once.
    let aborter = Arc::new(Mutex::new(Aborter::noop()));
    let abort_mark: Arc<Mutex<Option<(u64, u64)>>> = Arc::new(Mutex::new(None));
    let (tx, mut rx) = mpsc::unbounded_channel::<FromStream>();
    let reader = {
        let (aborter, mark) = (aborter.clone(), abort_mark.clone());
        let mut stream = stream;
        tokio::spawn(async move {
            loop {
                let item = match stream.message().await {
                    Ok(Some(a)) => {
                        if let Some(pb::assignment::Kind::Abort(ab)) = &a.kind {
                            tracing::warn!(
                                "aborting step {} of generation {}: {}",
                                ab.step,
                                ab.generation,
                                ab.reason
                            );
                            *mark.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((ab.generation, ab.step));
                            aborter.lock().unwrap_or_else(|p| p.into_inner()).abort();
                        }
                        FromStream::Assignment(a)
                    }
                    Ok(None) => FromStream::End,
                    Err(s) => FromStream::Error(s),
                };
                let end = !matches!(item, FromStream::Assignment(_));
                if tx.send(item).is_err() || end {
                    return;
                }
            }
        })
    };
    let _stop_reader = AbortOnDrop(reader);

    let mut work = Some(Work {
        replica: replica.take(),
        comm: Box::new(Local),
    });
    let mut generation = 0u64;
    let mut setup_failed: Option<(u64, String)> = None;
    let result: Result<Ended> = async {
        loop {
            let item = tokio::select! {
                m = rx.recv() => m.unwrap_or(FromStream::End),
                d = dropped_rx.recv() => {
                    return Ok(Ended::Dropped(d.unwrap_or_else(|| "heartbeat refused".into())));
                }
                Ok(_) = stop.wait_for(|s| *s) => return Ok(Ended::Stopped),
            };
            let a = match item {
                FromStream::Assignment(a) => a,
                FromStream::End => {
                    return Ok(Ended::Dropped(
                        "the coordinator closed the assignment stream".into(),
                    ))
                }
                FromStream::Error(s) => {
                    return Ok(lost_or_dropped(&s, "the assignment stream failed").unwrap_or(
                        Ended::CoordinatorLost(format!(
                            "the assignment stream failed: {}",
                            s.message()
                        )),
                    ))
                }
            };
            match a.kind {
                Some(pb::assignment::Kind::Membership(m)) => {
                    let w = work.as_mut().context("worker state lost")?;
                    if let Err(e) = adopt(w, &m, n_params, fake.is_some()) {
                        return Ok(Ended::Dropped(format!("{e:#}")));
                    }
                    let nccl_id = if reg.collective == "nccl" && m.rank == 0 {
                        nccl_unique_id()?
                    } else {
                        Vec::new()
                    };
                    let req = pb::CollectiveSetupRequest {
                        run_id: run_id.clone(),
                        worker_id,
                        generation: m.generation,
                        ring_address: ring_addr.clone(),
                        nccl_unique_id: nccl_id,
                        buffer_len: reg.param_count,
                        worker_secret: reg.worker_secret.clone(),
                    };
                    let setup = match within(
                        CALL_TIMEOUT * 3,
                        "collective setup",
                        client.collective_setup(req),
                    )
                    .await
                    {
                        Ok(s) => s.into_inner(),
                        Err(s) if s.code() == tonic::Code::Aborted => {
                            tracing::info!("generation {} superseded: {}", m.generation, s.message());
                            continue;
                        }
                        Err(s) => {
                            return Ok(lost_or_dropped(&s, "collective setup").unwrap_or(
                                Ended::Dropped(format!("collective setup: {}", s.message())),
                            ))
                        }
                    };
                    generation = setup.generation;
                    let w = work.take().context("worker state lost")?;
                    let listener = listener.clone();
                    let (collective, tag) = (reg.collective.clone(), run_tag(&run_id));
                    let io_timeout = opts.io_timeout;
                    let is_fake = fake.is_some();
                    let failures = opts.auth_failures.clone();
                    let secret = ring_secret(reg, is_fake || collective != "tcp-ring")?;
                    let (w, made) = tokio::task::spawn_blocking(move || {
                        let made = make_collective(
                            &collective,
                            is_fake,
                            &setup,
                            &listener,
                            &failures,
                            RingId {
                                run_tag: tag,
                                generation: setup.generation,
                                buffer_len: n_params,
                                secret,
                            },
                            io_timeout,
                        );
                        (w, made)
                    })
                    .await
                    .context("the collective setup panicked")?;
                    work = Some(w);
                    match made {
                        Ok(comm) => {
                            opts.metrics.collective_reset();
                            gpo_ops::logs::context::set_generation(generation);
                            *aborter.lock().unwrap_or_else(|p| p.into_inner()) = comm.aborter();
                            work.as_mut().expect("just set").comm = comm;
                            tracing::info!(
                                "generation {generation}: rank {} of {}",
                                m.rank,
                                m.world_size
                            );
                        }
                        Err(e) => {
                            // A peer went away while the ring formed, most likely: this
                            // generation's steps are answered with the error, so the
                            // coordinator forms the next one.
                            tracing::warn!("generation {generation}: {e:#}");
                            work.as_mut().expect("just set").comm = Box::new(Local);
                            setup_failed = Some((generation, format!("{e:#}")));
                        }
                    }
                }
                Some(pb::assignment::Kind::Step(a)) => {
                    if a.generation != generation {
                        tracing::info!(
                            "skipping step {} of generation {} (this worker is set up for {generation})",
                            a.step,
                            a.generation
                        );
                        continue;
                    }
                    let (s, g) = (a.step, a.generation);
                    gpo_ops::logs::context::set_step(s);
                    if let Some((_, e)) = setup_failed.as_ref().filter(|(fg, _)| *fg == g) {
                        let r = pb::StepResult {
                            run_id: run_id.clone(),
                            worker_id,
                            worker_secret: reg.worker_secret.clone(),
                            generation: g,
                            step: s,
                            error: format!("the collective of generation {g} did not form: {e}"),
                            ..Default::default()
                        };
                        let _ = within(CALL_TIMEOUT, "reporting a step", client.report_step(r)).await;
                        continue;
                    }
                    let w = work.take().context("worker state lost")?;
                    let (w, result) = match fake {
                        Some(d) => {
                            tokio::time::sleep(d).await;
                            let r = pb::StepResult {
                                step: a.step,
                                compute_s: d.as_secs_f64(),
                                episodes: a.episodes.len() as u32,
                                ..Default::default()
                            };
                            (w, Ok(r))
                        }
                        None => tokio::task::spawn_blocking(move || step(w, a))
                            .await
                            .context("the step panicked")?,
                    };
                    work = Some(w);
                    let mut result = match result {
                        Ok(r) => {
                            opts.metrics.step(r.compute_s, r.reduce_s, r.optim_s);
                            if let Some(w) = &work {
                                opts.metrics.allreduce_sent(w.comm.bytes_sent());
                            }
                            r
                        }
                        Err(e) => {
                            // The reader marks an abort before it breaks the collective.
                            if *abort_mark.lock().unwrap_or_else(|p| p.into_inner()) == Some((g, s)) {
                                continue;
                            }
                            pb::StepResult {
                                step: s,
                                error: format!("{e:#}"),
                                ..Default::default()
                            }
                        }
                    };
                    result.run_id = run_id.clone();
                    result.worker_id = worker_id;
                    result.worker_secret = reg.worker_secret.clone();
                    result.generation = g;
                    let ok = result.error.is_empty();
                    match within(CALL_TIMEOUT, "reporting a step", client.report_step(result)).await {
                        Ok(_) => {}
                        Err(st) if st.code() == tonic::Code::Aborted => {
                            tracing::info!("step {s} of generation {g} was fenced: {}", st.message());
                        }
                        Err(st) => {
                            if let Some(e) = lost_or_dropped(&st, &format!("reporting step {s}")) {
                                return Ok(e);
                            }
                            tracing::warn!("reporting step {s}: {}", st.message());
                        }
                    }
                    if ok {
                        *steps += 1;
                        last_step.store(s, Ordering::Relaxed);
                    }
                }
                Some(pb::assignment::Kind::Abort(_)) => {}
                Some(pb::assignment::Kind::Shutdown(s)) => {
                    return Ok(Ended::Shutdown {
                        reason: s.reason,
                        failed: s.failed,
                    });
                }
                None => bail!("the coordinator sent an empty assignment"),
            }
        }
    }
    .await;
    *replica = work.and_then(|w| w.replica);
    result
}

/// Brings the replica to the committed state a membership names: loads a transferred
/// state, rolls back a step the run threw away, or checks that it already holds it.
fn adopt(w: &mut Work, m: &pb::Membership, n: usize, fake: bool) -> Result<()> {
    let Some(r) = w.replica.as_mut() else {
        if fake {
            return Ok(());
        }
        bail!("no replica");
    };
    let c = m.committed_step;
    if let Some(s) = &m.state {
        let (p, adam) = wire::state_from_pb(s, n, r.adam().cfg).map_err(anyhow::Error::msg)?;
        let sha = wire::params_sha256(&p);
        if !m.params_sha256.is_empty() && sha != m.params_sha256 {
            bail!(
                "the transferred state of step {c} does not match its checksum ({sha} vs {})",
                m.params_sha256
            );
        }
        r.set_state(c, &p, adam)?;
        tracing::info!("loaded step {c}'s state from the coordinator");
        return Ok(());
    }
    if r.applied_step() == c + 1 {
        r.roll_back()?;
        tracing::info!("rolled back step {} (thrown away by the run)", c + 1);
    }
    if r.applied_step() != c {
        bail!(
            "generation {} is at step {c}, this worker holds step {}'s state",
            m.generation,
            r.applied_step()
        );
    }
    if !m.params_sha256.is_empty() {
        let sha = wire::params_sha256(&r.flat_params()?);
        if sha != m.params_sha256 {
            bail!("this worker's parameters at step {c} differ from the committed ones");
        }
    }
    Ok(())
}

/// Runs one assigned step on the replica (blocking).
fn step(mut w: Work, a: pb::StepAssignment) -> (Work, Result<pb::StepResult>) {
    let r = (|| {
        let replica = w.replica.as_mut().context("no replica")?;
        if replica.applied_step() + 1 != a.step {
            bail!(
                "step {} assigned, this worker holds step {}'s state",
                a.step,
                replica.applied_step()
            );
        }
        replica.set_target_slots((a.target_slots > 0).then_some(a.target_slots as usize));
        let survey = replica.survey().clone();
        let episodes = a
            .episodes
            .iter()
            .map(|e| wire::episode_from_pb(e, &survey))
            .collect::<Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("step {}", a.step))?;
        let out = replica
            .step(
                &episodes,
                a.batch_groups as usize,
                a.step,
                a.total_steps,
                w.comm.as_mut(),
            )
            .with_context(|| format!("step {}", a.step))?;
        let flat = replica.flat_params()?;
        let state = a.want_state.then(|| {
            let adam = replica.adam();
            pb::ReplicaState {
                params: wire::f32_bytes(&flat),
                adam_m: wire::f32_bytes(&adam.m),
                adam_v: wire::f32_bytes(&adam.v),
                adam_t: adam.t,
            }
        });
        Ok(pb::StepResult {
            step: a.step,
            loss_share: out.loss_share,
            compute_s: out.compute_s,
            reduce_s: out.reduce_s,
            optim_s: out.optim_s,
            params_sha256: wire::params_sha256(&flat),
            state,
            episodes: episodes.len() as u32,
            ..Default::default()
        })
    })();
    (w, r)
}

/// The run's ring secret from the registration (`unused`: no ring will form).
fn ring_secret(reg: &pb::RegisterResponse, unused: bool) -> Result<[u8; 32]> {
    match <[u8; 32]>::try_from(reg.ring_secret.as_slice()) {
        Ok(s) => Ok(s),
        Err(_) if unused => Ok([0; 32]),
        Err(_) => bail!(
            "the coordinator sent a ring secret of {} bytes, not 32: the ring cannot authenticate its members",
            reg.ring_secret.len()
        ),
    }
}

fn make_collective(
    kind: &str,
    fake: bool,
    setup: &pb::CollectiveSetupResponse,
    listener: &TcpListener,
    failures: &gpo_ops::auth::AuthFailures,
    id: RingId,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    if fake {
        return Ok(Box::new(Local));
    }
    match kind {
        "tcp-ring" => {
            let addrs = setup
                .ring_addresses
                .iter()
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .with_context(|| format!("ring address `{a}` is not host:port"))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Box::new(TcpRing::connect_with(
                setup.rank as usize,
                &addrs,
                listener,
                id,
                timeout,
                failures,
            )?))
        }
        "nccl" => nccl_collective(setup, id.buffer_len),
        other => bail!("unknown collective `{other}` (expected tcp-ring or nccl)"),
    }
}

#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>> {
    crate::nccl::unique_id()
}

#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>> {
    bail!("the run uses NCCL, but this worker was built without the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn nccl_collective(
    setup: &pb::CollectiveSetupResponse,
    buffer_len: usize,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(crate::nccl::Nccl::new(
        setup.rank as usize,
        setup.world_size as usize,
        &setup.nccl_unique_id,
        buffer_len,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_collective(
    _setup: &pb::CollectiveSetupResponse,
    _buffer_len: usize,
) -> Result<Box<dyn Collective>> {
    bail!("the run uses NCCL, but this worker was built without the `cuda` feature")
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
