//! `gpo embed`: fills an embedding store with a real model's embeddings of every
//! (question, non-refusal option) of a dataset, rendered by a prompt template; or, in the
//! simple mode, embeds each line of a text file into JSONL.
//!
//! Texts are tokenized first (over-long ones are an error, or truncated with a warning under
//! `--truncate`), sorted by length and batched to a token budget (`--max-batch-tokens`, like
//! TEI's), so little compute goes to padding. On CPU each batch is split across the threads
//! (each planned batch one forward, so the store does not depend on the core count). The
//! store is rewritten every `--flush-secs` and at the end; keys already in it are skipped, so
//! an interrupted run resumes where it stopped. `--workers N` embeds the same plan on N
//! worker processes on loopback ([`crate::embedding::fill_distributed`]), bitwise alike.

use crate::embedding::{self, Settings};
use crate::inputs::parse_format;
use anyhow::{bail, Context, Result};
use gpo_core::data::Survey;
use gpo_core::io::dataset;
use gpo_core::io::store::EmbeddingStore;
use gpo_core::store::StoreMeta;
use gpo_embed::Pooling;
use indicatif::ProgressStyle;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a Hugging Face folder (BERT family, Llama/Mistral/SmolLM, Qwen2), a .gguf file
    /// (Llama, Qwen2), or a hub id ORG/NAME already in the Hugging Face cache.
    #[arg(long, env = "GPO_EMBED_MODEL")]
    pub model: String,
    /// Dataset to embed (any layout `gpo train --data` reads).
    #[arg(long, required_unless_present = "texts", conflicts_with = "texts")]
    pub data: Option<PathBuf>,
    /// Dataset layout, when auto-detection is not wanted: native, opinionqa, weighted, global.
    #[arg(long, requires = "data")]
    pub format: Option<String>,
    /// Prompt template: plain (encoders), alpaca or llama2-chat (decoder LLMs).
    #[arg(long, default_value = "plain", requires = "data")]
    pub template: String,
    /// Store folder to fill (created, or resumed when it exists).
    #[arg(long, requires = "data")]
    pub out: Option<PathBuf>,
    /// Simple mode: a text file, one text per line (blank lines skipped).
    #[arg(long, requires = "jsonl")]
    pub texts: Option<PathBuf>,
    /// Simple mode: output JSONL, one `{"text": ..., "embedding": [...]}` per line.
    #[arg(long, requires = "texts")]
    pub jsonl: Option<PathBuf>,
    /// Pooling: mean, last (decoders) or cls (encoders). Default: the model's own
    /// (sentence-transformers config for encoders; mean, the paper's choice, for decoders).
    #[arg(long)]
    pub pooling: Option<Pooling>,
    /// Token budget of one batch (texts × longest text, padding included).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Most texts in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_batch_size: usize,
    /// Cap on the context length in tokens (default: the model's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Truncate texts longer than the context (with a warning) instead of failing.
    #[arg(long)]
    pub truncate: bool,
    /// Device: cpu, or cuda / cuda:N (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Rewrite the store at most this often (seconds), so an interrupted run resumes.
    #[arg(long, default_value_t = 60)]
    pub flush_secs: u64,
    /// Serve /metrics (gpo_embed_tokens_total, gpo_embed_duration_seconds), /healthz and
    /// /readyz on this address while it embeds (default: off).
    #[arg(long, env = "GPO_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Embed on N worker processes on loopback (the embedding phase of a distributed run):
    /// the same plan, the same store, bit for bit.
    #[arg(long, requires = "data")]
    pub workers: Option<usize>,
    /// The embedding families this run feeds.
    #[arg(skip)]
    pub metrics: gpo_ops::metrics::EmbedMetrics,
}

pub(crate) fn style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Args {
    /// The embedding settings these flags give.
    pub fn settings(&self) -> Settings {
        Settings {
            model: self.model.clone(),
            template: self.template.clone(),
            pooling: self.pooling,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            max_batch_tokens: self.max_batch_tokens,
            max_batch_size: self.max_batch_size,
            max_len: self.max_len,
            truncate: self.truncate,
            flush_secs: self.flush_secs,
        }
    }
}

fn run_texts(a: &Args, input: &Path, output: &Path) -> Result<()> {
    let f =
        std::fs::File::open(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut texts = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", input.display(), n + 1))?;
        if !line.trim().is_empty() {
            texts.push(line);
        }
    }
    if texts.is_empty() {
        bail!("{}: no texts (every line is blank)", input.display());
    }
    let st = a.settings();
    let (e, parallel) = st.load()?;
    let ids = embedding::tokenize(e.encoder(), &texts, a.truncate)?;
    let lens: Vec<usize> = ids.iter().map(|v| v.len()).collect();
    let batches = gpo_embed::plan_batches(&lens, a.max_batch_tokens, a.max_batch_size);
    let mut vecs: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
    embedding::run_plan(
        e.as_ref(),
        parallel,
        &ids,
        &batches,
        &st,
        &a.metrics,
        |b, v| {
            for (&i, v) in b.iter().zip(v) {
                vecs[i] = Some(v);
            }
            Ok(())
        },
        || Ok(()),
    )?;
    if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(output)
            .with_context(|| format!("cannot write {}", output.display()))?,
    );
    for (t, v) in texts.iter().zip(vecs) {
        let line = serde_json::json!({"text": t, "embedding": v.unwrap_or_default()});
        writeln!(w, "{line}")?;
    }
    w.flush()?;
    println!(
        "wrote {} embeddings (dim {}) to {}",
        texts.len(),
        e.dim(),
        output.display()
    );
    Ok(())
}

fn run_dataset(a: &Args, data: &Path, out: &Path) -> Result<()> {
    let st = a.settings();
    let template = st.template()?;
    let survey = match &a.format {
        Some(f) => dataset::load_as(data, parse_format(f)?)?,
        None => dataset::load(data)?,
    };
    if let Some(n) = a.workers {
        return run_workers(&st, &survey, out, n);
    }
    let (e, parallel) = st.load()?;
    let meta = StoreMeta {
        embedder: e.id().to_string(),
        template: template.name().to_string(),
        dim: e.dim(),
        synthetic: false,
    };
    let todo = embedding::todo(&survey, &template, meta.clone(), out)?;
    eprintln!(
        "{}: {} questions, {} texts under template `{}`; {} already in {}, {} to embed",
        data.display(),
        survey.questions.len(),
        todo.total,
        template.name(),
        todo.total - todo.missing.len(),
        out.display(),
        todo.missing.len()
    );
    let writer = embedding::fill_local(e.as_ref(), parallel, todo, &st, out, &a.metrics)?;
    println!(
        "wrote {}: {} embeddings (dim {}) of `{}`, template `{}`",
        out.display(),
        writer.len(),
        meta.dim,
        meta.embedder,
        meta.template
    );
    Ok(())
}

/// `--workers N`: the embedding phase on a loopback coordinator, with N worker processes
/// this command starts and reaps.
fn run_workers(st: &Settings, survey: &Survey, out: &Path, n: usize) -> Result<()> {
    anyhow::ensure!(n >= 1, "--workers must be at least 1");
    let token = crate::cmd::credentials::LocalToken::create()?;
    let security = gpo_coordinator::Security {
        token: Some(token.token.clone()),
        ..Default::default()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let worker_args = worker_embed_args(st);
    let token_path = token.path().to_path_buf();
    let phase = embedding::Phase {
        listener: listener.try_clone()?,
        security: &security,
        timing: Default::default(),
        then_train: false,
        spawn: Box::new(move |addr, embed| {
            if !embed {
                return Ok(Vec::new());
            }
            crate::cmd::coordinator::spawn_workers(
                n,
                addr,
                Some(&token_path),
                None,
                "text",
                &worker_args,
            )
        }),
    };
    let mut children = embedding::fill_distributed(st, survey, out, phase)?;
    if let Some(f) = crate::cmd::coordinator::reap(&mut children, Duration::from_secs(15)) {
        tracing::warn!("{f}");
    }
    let store = EmbeddingStore::open(out)?;
    println!(
        "wrote {}: {} embeddings (dim {}) of `{}`, template `{}`, on {n} worker(s)",
        out.display(),
        store.len(),
        store.meta().dim,
        store.meta().embedder,
        store.meta().template
    );
    Ok(())
}

/// The `gpo worker` flags that make a spawned worker embed with `st`'s model.
pub fn worker_embed_args(st: &Settings) -> Vec<String> {
    let mut v = vec!["--embedder".to_string(), st.model.clone()];
    if let Some(p) = st.pooling {
        v.extend(["--embed-pooling".into(), p.name().into()]);
    }
    if st.device != "cpu" {
        v.extend(["--embed-device".into(), st.device.clone()]);
    }
    if let Some(d) = &st.dtype {
        v.extend(["--embed-dtype".into(), d.clone()]);
    }
    v
}

pub fn run(a: Args) -> Result<()> {
    let health = gpo_ops::http::Health::not_ready("starting");
    let _server = crate::cmd::train::serve_metrics(
        a.metrics_addr,
        gpo_ops::metrics::Role::Embed,
        &health,
        |r| a.metrics.register(r),
    )?;
    health.set_ready();
    match (&a.data, &a.out, &a.texts, &a.jsonl) {
        (Some(d), Some(o), None, None) => run_dataset(&a, d, o),
        (Some(_), None, _, _) => bail!("--data needs --out (the embedding store folder to fill)"),
        (None, _, Some(t), Some(j)) => run_texts(&a, t, j),
        _ => bail!("give --data D --out STORE, or --texts FILE --jsonl OUT"),
    }
}
