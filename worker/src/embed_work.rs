//! A worker's part of the embedding phase (`gpo.v1.Embedding`): join with its embedder's
//! fingerprint, lease planned batches of token ids, embed each batch as one forward (up to
//! [`BatchEmbedder::parallel`] batches at once), stream the vectors back in chunks, and
//! heartbeat while computing so its leases are kept. It returns when the coordinator says
//! the store is complete, or at once when the coordinator has no embedding phase.
//!
//! The model sits behind [`BatchEmbedder`], so this crate needs no embedder of its own.

use crate::client::{causes, WorkerOptions, CALL_TIMEOUT};
use anyhow::{bail, Context, Result};
use gpo_proto::v1 as pb;
use gpo_proto::v1::embedding_client::EmbeddingClient;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The model a worker embeds with.
pub trait BatchEmbedder: Send + Sync {
    /// The fingerprint the coordinator checks (model files, pooling, normalization, dtype).
    fn id(&self) -> &str;
    /// Width of every vector.
    fn dim(&self) -> usize;
    /// Batches embedded at once (one per core on CPU, one on a GPU).
    fn parallel(&self) -> usize;
    /// Embeds one planned batch as one forward: one vector per text, in order.
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
}

/// What the phase did on this worker.
#[derive(Debug, Clone, Default)]
pub struct EmbedOutcome {
    /// A training run follows on the same port.
    pub then_train: bool,
    /// Batches this worker delivered and the coordinator accepted.
    pub batches: u64,
    /// Their tokens.
    pub tokens: u64,
    /// Whether the coordinator had an embedding phase at all.
    pub phase: bool,
}

type Client = EmbeddingClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        gpo_ops::auth::ClientToken,
    >,
>;

async fn connect(opts: &WorkerOptions) -> Result<Client> {
    let addr = match &opts.etcd {
        Some(cfg) => crate::etcd::leader_address(cfg, opts.connect_timeout, None).await?,
        None => opts.coordinator.clone(),
    };
    let (ch, interceptor) =
        crate::client::channel(&addr, opts.connect_timeout, &opts.credentials).await?;
    Ok(EmbeddingClient::with_interceptor(ch, interceptor)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes))
}

/// Chunks of about 1 MiB of vectors.
fn chunks(worker: u64, batch: u32, vectors: &[Vec<f32>], dim: usize) -> Vec<pb::EmbedChunk> {
    let per = ((1usize << 20) / (dim.max(1) * 4)).max(1);
    vectors
        .chunks(per)
        .enumerate()
        .map(|(k, part)| {
            let mut values = Vec::with_capacity(part.len() * dim * 4);
            for v in part {
                for x in v {
                    values.extend_from_slice(&x.to_le_bytes());
                }
            }
            pb::EmbedChunk {
                worker_id: worker,
                batch,
                first: (k * per) as u32,
                count: part.len() as u32,
                values,
            }
        })
        .collect()
}

/// Joins, retrying while the coordinator is unreachable; `None` when it has no embedding
/// phase (it serves the run already).
async fn join(
    client: &mut Client,
    opts: &WorkerOptions,
    e: &dyn BatchEmbedder,
) -> Result<Option<pb::EmbedJoinResponse>> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        let req = pb::EmbedJoinRequest {
            name: opts.name.clone(),
            embedder: e.id().to_string(),
            parallel: e.parallel() as u32,
        };
        match crate::client::within(
            CALL_TIMEOUT,
            "joining the embedding phase",
            client.embed_join(req),
        )
        .await
        {
            Ok(r) => return Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) && start.elapsed() < opts.connect_timeout =>
            {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(s) => bail!("joining the embedding phase: {}", s.message()),
        }
    }
}

/// Runs the worker's part of the embedding phase. `crash_after` (a test hook,
/// `GPO_TEST_EMBED_CRASH_AFTER`) ends the process abruptly after that many leases, holding
/// the last one, as a machine that dies mid-phase would.
pub async fn run(
    opts: &WorkerOptions,
    e: Arc<dyn BatchEmbedder>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    crash_after: Option<u64>,
) -> Result<EmbedOutcome> {
    let mut client = connect(opts).await?;
    let mut out = EmbedOutcome::default();
    let mut leases = 0u64;
    'join: loop {
        let Some(j) = join(&mut client, opts, e.as_ref()).await? else {
            tracing::info!("the coordinator has no embedding phase: nothing to embed");
            out.then_train = true;
            return Ok(out);
        };
        out.phase = true;
        out.then_train = j.then_train;
        if j.dim as usize != e.dim() {
            bail!(
                "the coordinator's store has width {}, this worker's embedder {}",
                j.dim,
                e.dim()
            );
        }
        if j.done {
            return Ok(out);
        }
        let worker = j.worker_id;
        let interval = Duration::from_millis(j.heartbeat_interval_ms.max(10));
        tracing::info!(
            "embedding: joined as {worker}; {} batches planned",
            j.batches
        );
        loop {
            if *stop.borrow() {
                bail!("stopped (SIGTERM) during the embedding phase");
            }
            let req = pb::EmbedLeaseRequest {
                worker_id: worker,
                max_batches: e.parallel().max(1) as u32,
            };
            let lease = match crate::client::within(
                CALL_TIMEOUT,
                "leasing batches",
                client.embed_lease(req),
            )
            .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::warn!("embedding: {}; joining again", s.message());
                    continue 'join;
                }
                Err(s) => bail!("leasing embedding batches: {}", causes(&s)),
            };
            if lease.done {
                out.then_train = lease.then_train;
                tracing::info!(
                    "embedding: the store is complete ({} batches, {} tokens here)",
                    out.batches,
                    out.tokens
                );
                return Ok(out);
            }
            if lease.batches.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(lease.wait_ms.max(10))) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            leases += 1;
            if crash_after.is_some_and(|n| leases > n) {
                tracing::error!("GPO_TEST_EMBED_CRASH_AFTER: ending abruptly with batches held");
                std::process::exit(3);
            }
            let batches: Vec<(u32, Vec<Vec<u32>>)> = lease
                .batches
                .into_iter()
                .map(|b| (b.batch, b.texts.into_iter().map(|t| t.ids).collect()))
                .collect();
            let tokens: u64 = batches
                .iter()
                .map(|(_, t)| t.iter().map(|x| x.len() as u64).sum::<u64>())
                .sum();
            let model = e.clone();
            let work = tokio::task::spawn_blocking(move || -> Result<Vec<(u32, Vec<Vec<f32>>)>> {
                std::thread::scope(|s| {
                    let handles: Vec<_> = batches
                        .iter()
                        .map(|(b, texts)| {
                            let m = &model;
                            s.spawn(move || m.embed(texts).map(|v| (*b, v)))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join()
                                .map_err(|_| anyhow::anyhow!("an embedding thread panicked"))?
                        })
                        .collect()
                })
            });
            tokio::pin!(work);
            let results = loop {
                tokio::select! {
                    r = &mut work => break r.context("the embedding task")??,
                    _ = tokio::time::sleep(interval) => {
                        let hb = pb::EmbedHeartbeatRequest { worker_id: worker };
                        match crate::client::within(CALL_TIMEOUT, "heartbeat", client.embed_heartbeat(hb)).await {
                            Ok(r) if !r.get_ref().known => tracing::warn!("embedding: the coordinator dropped this worker; its batches go to others"),
                            Ok(_) => {}
                            Err(s) => tracing::warn!("embedding heartbeat: {}", causes(&s)),
                        }
                    }
                }
            };
            let dim = e.dim();
            let mut msgs = Vec::new();
            for (b, vectors) in &results {
                if vectors.iter().any(|v| v.len() != dim) {
                    bail!("the embedder returned a vector not of width {dim}");
                }
                msgs.extend(chunks(worker, *b, vectors, dim));
            }
            match client.embed_put(tokio_stream::iter(msgs)).await {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    if ack.duplicate > 0 {
                        tracing::info!(
                            "embedding: {} batch(es) had been delivered by another worker",
                            ack.duplicate
                        );
                    }
                    out.batches += ack.accepted as u64;
                    out.tokens += tokens;
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::warn!("embedding: {}; joining again", s.message());
                    continue 'join;
                }
                Err(s) => bail!("returning embeddings: {}", causes(&s)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cover_every_vector_once_in_order() {
        let dim = 100_000; // 400 kB a vector: 2 per chunk
        let vs: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32; dim]).collect();
        let c = chunks(7, 3, &vs, dim);
        assert_eq!(c.iter().map(|c| c.count).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(c.iter().map(|c| c.first).collect::<Vec<_>>(), vec![0, 2, 4]);
        assert!(c
            .iter()
            .all(|c| c.values.len() == c.count as usize * dim * 4));
        assert_eq!(c[2].values[..4], 4f32.to_le_bytes());
    }
}
