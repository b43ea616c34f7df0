//! The run of a distributed job, from binding the port to reaping the workers: the
//! metrics port, the etcd campaign, the embedding phase, the service, the training loop
//! and the shutdown, in that order. Its own module because it is the one long sequence
//! both `gpo coordinator` and `gpo train --workers N` end in, apart from how their flags
//! become a `Service`.

use super::leadership::{campaign, pointer_writer};
use super::workers::{reap, spawn_workers};
use super::Service;
use crate::cmd::train::{self, Progress};
use crate::inputs::DataArgs;
use anyhow::{Context, Result};
use gpo_coordinator::data_files::DataFiles;
use gpo_coordinator::run::train_with;
use gpo_coordinator::{CoordinatorService, RunInfo};
use gpo_proto::v1 as pb;
use gpo_worker::wire;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the workers find the run's data: the same path, made absolute, with the files
/// the coordinator serves to workers that cannot read it (`FetchDataFile`), or the seed of
/// the built-in synthetic survey. `fingerprint` is the data's, which every worker checks.
fn data_source(
    d: &DataArgs,
    seed: u64,
    fingerprint: &str,
) -> Result<(pb::DataSource, Option<Arc<DataFiles>>)> {
    let abs = |p: &Path| -> Result<PathBuf> {
        std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
    };
    let (source, files) = match &d.data {
        None => (pb::data_source::Source::SyntheticSeed(seed), None),
        Some(data) => {
            let data = abs(data)?;
            let store = abs(&crate::inputs::store_dir(&data, d.embeddings.as_deref())?)?;
            let files = DataFiles::open(&data, &store)
                .map_err(anyhow::Error::msg)
                .context("listing the data files to serve to workers")?;
            let source = pb::data_source::Source::Dataset(pb::DatasetPath {
                data: data.display().to_string(),
                format: d.format.clone().unwrap_or_default(),
                embeddings: store.display().to_string(),
                files: files
                    .entries()
                    .into_iter()
                    .map(|e| pb::DataFileEntry {
                        root: e.root,
                        path: e.path,
                        size: e.size,
                    })
                    .collect(),
                data_is_file: files.data_is_file(),
            });
            (source, Some(Arc::new(files)))
        }
    };
    Ok((
        pb::DataSource {
            source: Some(source),
            fingerprint: fingerprint.to_string(),
        },
        files,
    ))
}

/// Runs a distributed job: serves the run, optionally spawns `spawn` worker processes on
/// loopback, trains, and shuts the workers down. SIGTERM stops it at the next step with
/// a resume point written, and it exits 0.
pub(super) fn drive(a: &train::Args, service: Service, spawn: usize) -> Result<()> {
    let stop = crate::signals::stop_flag();
    // The metrics port serves from the start: a standby campaigning in etcd is live but
    // not ready until it leads and serves the run.
    let health = gpo_ops::http::Health::not_ready(if service.etcd.is_some() {
        "a standby: campaigning in etcd for the leadership"
    } else {
        "starting the run"
    });
    let metrics = service.opts.metrics.clone();
    let auth_failures = service.opts.security.failures.clone();
    let metrics_server = train::serve_metrics(
        a.metrics_addr,
        gpo_ops::metrics::Role::Coordinator,
        &health,
        |r| {
            metrics.register(r);
            auth_failures.register(r);
        },
    )?;
    let listener = std::net::TcpListener::bind(service.listen)
        .with_context(|| format!("binding the coordinator on {}", service.listen))?;
    let bound = listener.local_addr()?;
    let advertise = service
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    // With etcd, a standby waits here until it is elected; the leader then continues the
    // run the state pointer names (its newest resume point), or starts it.
    let mut elected = match service.etcd.clone() {
        Some(cfg) => Some(campaign(cfg, &advertise)?),
        None => None,
    };
    let pointer = elected.as_ref().and_then(|e| e.pointer.clone());
    let resume_from = pointer
        .as_ref()
        .filter(|ptr| ptr.step > 0)
        .map(|ptr| PathBuf::from(&ptr.out));
    if let Some(ptr) = &pointer {
        eprintln!(
            "the run's state pointer: step {}, generation {}, written by {}",
            ptr.step, ptr.generation, ptr.leader
        );
    }
    // Spawned workers serve their metrics on free ports of the coordinator's metrics host.
    let worker_metrics = metrics_server
        .as_ref()
        .map(|m| SocketAddr::new(m.addr().ip(), 0));
    let log_format = match a.log_format {
        gpo_ops::logs::LogFormat::Json => "json",
        gpo_ops::logs::LogFormat::Text => "text",
    };
    // A store that lacks texts is filled first, by the workers, on this port.
    let embedded = match a.embed.settings() {
        Some(st) => {
            let (survey, store) = crate::embedding::run_survey(&a.data)?;
            let extra = crate::cmd::embed::worker_embed_args(&st);
            let token = service.worker_token.clone();
            health.set_not_ready("filling the run's embedding store");
            if let Some(f) = &service.addr_file {
                gpo_core::io::checkpoint::write_atomic(f, bound.to_string().as_bytes())
                    .with_context(|| format!("writing {}", f.display()))?;
            }
            let phase = crate::embedding::Phase {
                listener: listener.try_clone()?,
                security: &service.opts.security,
                timing: gpo_coordinator::embed_service::EmbedTiming {
                    heartbeat_interval: service.opts.heartbeat_interval,
                    heartbeat_timeout: service.opts.heartbeat_timeout.max(Duration::from_secs(10)),
                },
                then_train: true,
                spawn: Box::new(move |addr, embed| {
                    let extra = if embed { &extra[..] } else { &[] };
                    spawn_workers(
                        spawn,
                        addr,
                        token.as_deref(),
                        worker_metrics,
                        log_format,
                        extra,
                    )
                }),
            };
            Some(crate::embedding::fill_distributed(
                &st, &survey, &store, phase,
            )?)
        }
        None => None,
    };
    let p = train::prepare_with(a, resume_from.as_deref())?;
    let cfg = &p.cfg;
    let config_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(serde_json::to_vec(cfg)?))
    };
    if let Some(ptr) = pointer.as_ref().filter(|ptr| ptr.step == 0) {
        anyhow::ensure!(
            ptr.config_sha256 == config_sha256,
            "the run in etcd was started with another configuration (SHA-256 {}, this one's {config_sha256})",
            ptr.config_sha256
        );
    }
    let mirror = p.replica()?;
    let fingerprint = wire::data_fingerprint(&p.survey, &p.features);
    let (data, files) = data_source(&a.data, cfg.seed, &fingerprint)?;
    let info = RunInfo {
        config_json: serde_json::to_string(cfg)?,
        data,
        fingerprint,
        files,
        param_count: cfg.model.param_count(),
        total_steps: cfg.steps,
        shard_groups: cfg.shard_groups,
        prior_groups: p
            .features
            .prior
            .as_ref()
            .map(|pr| pr.groups().to_vec())
            .unwrap_or_default(),
        start_step: mirror.applied_step(),
        start_generation: pointer.as_ref().map_or(0, |ptr| ptr.generation),
    };
    let world = service.opts.expected_workers;
    let start_step = info.start_step;
    let svc = CoordinatorService::start_on(listener, info, service.opts)?;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = elected.as_mut().map(|e| {
        let base = gpo_coordinator::etcd::StatePointer {
            out: std::fs::canonicalize(&p.out)
                .unwrap_or_else(|_| p.out.clone())
                .display()
                .to_string(),
            step: start_step,
            generation: pointer.as_ref().map_or(0, |ptr| ptr.generation),
            config_sha256: config_sha256.clone(),
            leader: advertise.clone(),
        };
        let lead = e.leadership.take().expect("elected");
        pointer_writer(lead, e.rt.handle().clone(), &svc, base, done.clone())
    });
    let addr = svc.addr();
    eprintln!(
        "coordinator of run {} listening on {addr}; waiting for {world} worker(s)",
        svc.run_id()
    );
    if let Some(t) = &service.worker_token {
        eprintln!(
            "the run is closed to other processes; inspect it with: gpo status --coordinator {addr} --token-file {}",
            t.display()
        );
    }
    if let Some(f) = &service.addr_file {
        gpo_core::io::checkpoint::write_atomic(f, addr.to_string().as_bytes())
            .with_context(|| format!("writing {}", f.display()))?;
    }
    health.set_ready();
    let children = Arc::new(Mutex::new(match embedded {
        // The workers that embedded train next.
        Some(c) => c,
        None => spawn_workers(
            spawn,
            addr,
            service.worker_token.as_deref(),
            worker_metrics,
            log_format,
            &[],
        )?,
    }));
    // A worker process that dies is a lost worker, which the run recovers from; only when
    // every spawned process has failed can no worker come, and the run fails.
    let watcher = {
        let (children, done, abort) = (children.clone(), done.clone(), svc.aborter());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut all_failed = spawn > 0;
                let mut last = String::new();
                for (i, c) in children.lock().unwrap().iter_mut().enumerate() {
                    match c.try_wait() {
                        Ok(Some(st)) if !st.success() => {
                            last = format!("worker process {i} exited ({st})")
                        }
                        _ => all_failed = false,
                    }
                }
                if all_failed {
                    abort(format!("every worker process exited; the last: {last}"));
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let result = {
        let mut dispatch = svc.dispatch(Some(mirror));
        let mut progress = Progress::new(cfg.steps);
        progress.metrics = Some((metrics.clone(), false));
        progress.events_to(a.events.as_deref())?;
        if let Some((r, _)) = &p.resume {
            progress.bar.set_position(r.step);
        }
        let opts = p.loop_options(a, Some(stop));
        let s = train_with(
            cfg,
            p.survey.clone(),
            p.features.clone(),
            &mut dispatch,
            &p.out,
            &opts,
            &mut |e| progress.event(e),
        );
        progress.finish();
        s
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    if let Some(w) = writer {
        let _ = w.join();
    }
    health.set_not_ready("the run is over");
    match &result {
        Ok(_) => svc.finish(None, Duration::from_secs(10)),
        Err(e) => svc.finish(Some(format!("{e:#}")), Duration::from_secs(3)),
    }
    let mut children = std::mem::take(&mut *children.lock().unwrap());
    let failed = reap(&mut children, Duration::from_secs(15));
    drop(svc);
    let summary = result?;
    if let Some(f) = failed {
        tracing::warn!("{f}");
    }
    train::finish(&summary, &p.out);
    Ok(())
}
