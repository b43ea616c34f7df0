//! `gpo serve`: loads a checkpoint and an embedder (and optionally the embedding store
//! `gpo embed` wrote for it), then serves few-shot Predict, Rerank and group sessions over
//! HTTP/JSON and gRPC until SIGTERM or SIGINT (see the `gpo-serve` crate).

use anyhow::{bail, Context, Result};
use gpo_core::io::store::EmbeddingStore;
use gpo_core::prompt::Template;
use gpo_serve::embedding::{ModelEmbedder, TextEmbedder, VectorStore, Vectors};
use gpo_serve::metrics::Metrics;
use gpo_serve::service::{Options, Server};
use gpo_serve::task::Limits;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint written by `gpo train` (e.g. runs/main/train/best.safetensors).
    #[arg(long, env = "GPO_SERVE_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// The embedder the checkpoint was trained on: what `gpo embed --model` takes.
    #[arg(long, env = "GPO_SERVE_EMBEDDER")]
    pub embedder: String,
    /// Prompt template the training embeddings were rendered with.
    #[arg(long, default_value = "plain")]
    pub template: String,
    /// An embedding store of the same embedder and template, consulted after the memory cache.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// HTTP/JSON address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    /// gRPC address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub grpc_addr: String,
    /// Writes `http=ADDR` and `grpc=ADDR` lines here once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Requests running at once.
    #[arg(long, default_value_t = 32)]
    pub max_concurrency: usize,
    /// Requests waiting beyond those; more are refused with 429 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Deadline of every request, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub deadline_ms: u64,
    /// Vectors kept in the memory cache.
    #[arg(long, default_value_t = 100_000)]
    pub cache_capacity: usize,
    /// Token budget of one embedder batch (texts × longest, padding included).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Points (context and targets of all requests) of one forward batch.
    #[arg(long, default_value_t = 4096)]
    pub max_batch_points: usize,
    /// Forward threads, each batching the requests dealt to it (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub forward_threads: usize,
    /// Run the requests of a forward batch that have equal context widths as one padded
    /// pass (faster under load; predictions then differ from `gpo eval`'s in the last bits).
    #[arg(long)]
    pub merge_forward: bool,
    /// Group sessions kept (least recently used forgotten first).
    #[arg(long, default_value_t = 10_000)]
    pub max_sessions: usize,
    /// Inline contexts kept by content, so a context sent again reuses its vectors and its
    /// encoding (0: none).
    #[arg(long, default_value_t = 1024)]
    pub context_cache: usize,
    /// Most context questions of a request.
    #[arg(long, default_value_t = 100)]
    pub max_context: usize,
    /// Most target questions of a request (at most 128).
    #[arg(long, default_value_t = 100)]
    pub max_targets: usize,
    /// Most options of a question or candidates of a rerank.
    #[arg(long, default_value_t = 32)]
    pub max_options: usize,
    /// Longest text, in characters.
    #[arg(long, default_value_t = 2000)]
    pub max_text_chars: usize,
    /// TLS (on both ports), mTLS and the token.
    #[command(flatten)]
    pub credentials: crate::cmd::credentials::Flags,
}

fn store_for(
    a: &Args,
    e: &dyn TextEmbedder,
    template: Template,
) -> Result<Option<Box<dyn VectorStore>>> {
    let Some(dir) = &a.store else {
        return Ok(None);
    };
    let s = EmbeddingStore::open(dir)?;
    let m = s.meta();
    if m.embedder != e.id() || m.template != template.name() {
        bail!(
            "--store {}: its vectors are of embedder `{}` with template `{}`, the server embeds with `{}` and `{}`",
            dir.display(),
            m.embedder,
            m.template,
            e.id(),
            template.name()
        );
    }
    Ok(Some(Box::new(s)))
}

pub fn run(a: Args) -> Result<()> {
    if a.max_targets > 128 || a.max_targets == 0 {
        bail!("--max-targets must be between 1 and 128 (gpo eval's forward chunk)");
    }
    let template = Template::parse(&a.template).map_err(anyhow::Error::msg)?;
    let security = a.credentials.serve()?;
    let (model, step) = gpo_serve::model::load(&a.checkpoint)?;
    let embedder = gpo_embed::load(&a.embedder, &gpo_embed::LoadOptions::default())
        .with_context(|| format!("--embedder {}", a.embedder))?;
    let embedder: Arc<dyn TextEmbedder> = Arc::new(ModelEmbedder(embedder));
    if embedder.dim() != model.cfg.dim_x {
        bail!(
            "the checkpoint reads embeddings of width {}, --embedder {} makes {}",
            model.cfg.dim_x,
            a.embedder,
            embedder.dim()
        );
    }
    let store = store_for(&a, embedder.as_ref(), template)?;
    let metrics = Metrics::new();
    let limits = Limits {
        max_context: a.max_context,
        max_targets: a.max_targets,
        max_options: a.max_options,
        max_text_chars: a.max_text_chars,
        ..Limits::default()
    };
    let info = serde_json::json!({
        "model": "gpo",
        "checkpoint": a.checkpoint.display().to_string(),
        "step": step,
        "config": model.cfg,
        "embedder": embedder.id(),
        "template": template.name(),
        "store": a.store.as_ref().map(|p| p.display().to_string()),
        "limits": limits,
        "max_concurrency": a.max_concurrency,
        "max_queue": a.max_queue,
        "deadline_ms": a.deadline_ms,
        "merge_forward": a.merge_forward,
        "context_cache": a.context_cache,
        "forward_threads": a.forward_threads,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let vectors = Vectors::new(
        embedder,
        template.name(),
        store,
        a.cache_capacity,
        a.max_batch_tokens,
        metrics.clone(),
    )?;
    let options = Options {
        limits,
        concurrency: a.max_concurrency,
        queue: a.max_queue,
        deadline: Duration::from_millis(a.deadline_ms),
        max_batch_points: a.max_batch_points,
        forward_threads: a.forward_threads,
        max_sessions: a.max_sessions,
        context_cache: a.context_cache,
        merge_forward: a.merge_forward,
    };
    let server = Arc::new(Server::new(
        Arc::new(model),
        template,
        vectors,
        options,
        metrics,
        info,
    )?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind(&a.http_addr)
            .await
            .with_context(|| format!("--http-addr {}", a.http_addr))?;
        let grpc = tokio::net::TcpListener::bind(&a.grpc_addr)
            .await
            .with_context(|| format!("--grpc-addr {}", a.grpc_addr))?;
        let (ha, ga) = (http.local_addr()?, grpc.local_addr()?);
        let warm = server.clone();
        let secured = security.describe();
        let running = tokio::spawn(gpo_serve::run(server, http, grpc, security, async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }));
        warm.warm_up()
            .await
            .map_err(|e| anyhow::anyhow!("warm-up request failed: {e:?}"))?;
        if let Some(f) = &a.addr_file {
            std::fs::write(f, format!("http={ha}\ngrpc={ga}\n"))
                .with_context(|| format!("--addr-file {}", f.display()))?;
        }
        let scheme = if secured.contains("TLS") {
            "https"
        } else {
            "http"
        };
        eprintln!("gpo serve: {scheme}://{ha} (docs at /docs), grpc {ga}, {secured}; ready");
        running.await?
    })
}
