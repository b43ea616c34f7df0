//! `gpo embed`: fills an embedding store with a real model's embeddings of every
//! (question, non-refusal option) of a dataset, rendered by a prompt template; or, in the
//! simple mode, embeds each line of a text file into JSONL.
//!
//! Texts are tokenized first (over-long ones are an error, or truncated with a warning under
//! `--truncate`), sorted by length and batched to a token budget (`--max-batch-tokens`, like
//! TEI's), so little compute goes to padding. On CPU each batch is split across the threads
//! (each kernel single-threaded). The store is rewritten every `--flush-secs` and at the end;
//! keys already in it are skipped, so an interrupted run resumes where it stopped.

use crate::inputs::parse_format;
use anyhow::{bail, Context, Result};
use gpo_core::io::dataset;
use gpo_core::io::store::{EmbeddingStore, StoreWriter, INDEX_FILE};
use gpo_core::prompt::Template;
use gpo_core::store::StoreMeta;
use gpo_embed::{embed_sharded, plan_batches, Embedder, LoadOptions, Pooling};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// The embedding families this run feeds.
    #[arg(skip)]
    pub metrics: gpo_ops::metrics::EmbedMetrics,
}

fn device(s: &str) -> Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ord: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse().context("--device cuda:N needs a number"))
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this gpo was built without the `cuda` feature (cargo build --release --features cuda)");
            }
            Ok(candle_core::Device::new_cuda(ord)?)
        }
        _ => bail!("unknown --device `{s}` (expected cpu, cuda or cuda:N)"),
    }
}

fn dtype(s: &str) -> Result<candle_core::DType> {
    Ok(match s {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        _ => bail!("unknown --dtype `{s}` (expected f32, f16 or bf16)"),
    })
}

fn style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Tokenizes `texts` (warning on truncation), returning ids in order.
fn tokenize(e: &dyn Embedder, texts: &[String], truncate: bool) -> Result<Vec<Vec<u32>>> {
    use rayon::prelude::*;
    let toks: Vec<gpo_embed::Tokens> = texts
        .par_iter()
        .map(|t| e.encoder().encode(t, truncate))
        .collect::<Result<_, _>>()?;
    let cut: Vec<&gpo_embed::Tokens> = toks.iter().filter(|t| t.truncated_from.is_some()).collect();
    if !cut.is_empty() {
        eprintln!(
            "warning: truncated {} text(s) to the context of {} tokens (longest was {} tokens)",
            cut.len(),
            e.encoder().max_len(),
            cut.iter()
                .filter_map(|t| t.truncated_from)
                .max()
                .unwrap_or(0)
        );
    }
    Ok(toks.into_iter().map(|t| t.ids).collect())
}

/// Embeds `ids` in token-budget batches, calling `sink(index, vector)` for each, with a
/// progress bar; `flush` is called at most every `flush_every`.
fn run_batches(
    e: &dyn Embedder,
    ids: &[Vec<u32>],
    a: &Args,
    shards: usize,
    mut sink: impl FnMut(usize, Vec<f32>) -> Result<()>,
    mut flush: impl FnMut() -> Result<()>,
) -> Result<()> {
    let lens: Vec<usize> = ids.iter().map(|v| v.len()).collect();
    let batches = plan_batches(&lens, a.max_batch_tokens, a.max_batch_size);
    let bar = ProgressBar::new(ids.len() as u64);
    bar.set_style(style("texts"));
    let tokens: usize = lens.iter().sum();
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let every = Duration::from_secs(a.flush_secs);
    for b in &batches {
        let refs: Vec<&[u32]> = b.iter().map(|&i| ids[i].as_slice()).collect();
        let t = Instant::now();
        let out = embed_sharded(e, &refs, shards)?;
        let batch_tokens: usize = refs.iter().map(|r| r.len()).sum();
        a.metrics
            .batch(batch_tokens as u64, t.elapsed().as_secs_f64());
        for (&i, v) in b.iter().zip(out) {
            sink(i, v)?;
        }
        bar.inc(b.len() as u64);
        if last_flush.elapsed() >= every {
            bar.suspend(&mut flush)?;
            last_flush = Instant::now();
        }
    }
    bar.finish_and_clear();
    let s = start.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "embedded {} texts ({} tokens) in {:.1} s: {:.1} texts/s, {:.0} tokens/s, {} batches",
        ids.len(),
        tokens,
        s,
        ids.len() as f64 / s,
        tokens as f64 / s,
        batches.len()
    );
    Ok(())
}

fn load_embedder(a: &Args) -> Result<(Box<dyn Embedder>, usize)> {
    let dev = device(&a.device)?;
    let shards = if dev.is_cpu() {
        rayon::current_num_threads()
    } else {
        1
    };
    let opts = LoadOptions {
        pooling: a.pooling,
        device: dev,
        dtype: a.dtype.as_deref().map(dtype).transpose()?,
        max_len: a.max_len,
        lm_head: false,
    };
    let t = Instant::now();
    let e =
        gpo_embed::load(&a.model, &opts).with_context(|| format!("loading model `{}`", a.model))?;
    eprintln!(
        "model: {} (dim {}, context {} tokens), loaded in {:.1} s",
        e.id(),
        e.dim(),
        e.encoder().max_len(),
        t.elapsed().as_secs_f64()
    );
    Ok((e, shards))
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
    let (e, shards) = load_embedder(a)?;
    let ids = tokenize(e.as_ref(), &texts, a.truncate)?;
    let mut vecs: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
    run_batches(
        e.as_ref(),
        &ids,
        a,
        shards,
        |i, v| {
            vecs[i] = Some(v);
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
    let template = Template::parse(&a.template).map_err(anyhow::Error::msg)?;
    let survey = match &a.format {
        Some(f) => dataset::load_as(data, parse_format(f)?)?,
        None => dataset::load(data)?,
    };
    let (e, shards) = load_embedder(a)?;
    let meta = StoreMeta {
        embedder: e.id().to_string(),
        template: template.name().to_string(),
        dim: e.dim(),
        synthetic: false,
    };
    let mut writer = if out.join(INDEX_FILE).exists() {
        let old = EmbeddingStore::open(out)?;
        let m = old.meta();
        if m.embedder != meta.embedder || m.template != meta.template || m.dim != meta.dim {
            bail!(
                "{} holds embeddings of `{}` with template `{}` (dim {}), not `{}` with `{}` \
                 (dim {}): choose another --out",
                out.display(),
                m.embedder,
                m.template,
                m.dim,
                meta.embedder,
                meta.template,
                meta.dim
            );
        }
        StoreWriter::from_existing(&old)
    } else {
        StoreWriter::new(meta.clone())
    };
    // Every (question, non-refusal option), rendered; each distinct text once.
    let mut seen = HashSet::new();
    let mut todo: Vec<(String, String)> = Vec::new();
    let mut total = 0usize;
    for q in &survey.questions {
        for (k, o) in q.options.iter().enumerate() {
            if o.refusal {
                continue;
            }
            let text = template.render(q, k);
            let key = meta.key(&text);
            if seen.insert(key.clone()) {
                total += 1;
                if !writer.contains(&key) {
                    todo.push((key, text));
                }
            }
        }
    }
    eprintln!(
        "{}: {} questions, {} texts under template `{}`; {} already in {}, {} to embed",
        data.display(),
        survey.questions.len(),
        total,
        template.name(),
        total - todo.len(),
        out.display(),
        todo.len()
    );
    if !todo.is_empty() {
        let texts: Vec<String> = todo.iter().map(|(_, t)| t.clone()).collect();
        let ids = tokenize(e.as_ref(), &texts, a.truncate)?;
        let writer_cell = std::cell::RefCell::new(&mut writer);
        run_batches(
            e.as_ref(),
            &ids,
            a,
            shards,
            |i, v| {
                writer_cell
                    .borrow_mut()
                    .insert(todo[i].0.clone(), &v)
                    .with_context(|| format!("embedding of {:?}", todo[i].1))
            },
            || {
                writer_cell
                    .borrow()
                    .write(out)
                    .with_context(|| format!("writing {}", out.display()))
            },
        )?;
    }
    writer
        .write(out)
        .with_context(|| format!("writing {}", out.display()))?;
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
