//! Filling an embedding store, the CLI's one path for it: the texts a dataset needs that a
//! store lacks, tokenized and planned into length-sorted batches under a token budget, then
//! embedded either in this process (`gpo embed`, `gpo train --embedder` alone) or by the
//! workers of a distributed run (the embedding phase: `gpo embed --workers N`,
//! `gpo train --workers N --embedder M`, `gpo coordinator --embedder M`), and written in
//! plan order, atomically, every `flush_secs` and at the end.
//!
//! Every planned batch is embedded as one forward, whoever runs it: a vector is not bitwise
//! invariant to the padding of the batch it is in, so a store depends only on the plan
//! (texts, model, budget), never on the thread or worker count.

use anyhow::{bail, Context, Result};
use gpo_coordinator::embed_service::{EmbedPlan, EmbedServer, EmbedTiming};
use gpo_core::data::Survey;
use gpo_core::io::store::{EmbeddingStore, StoreWriter, INDEX_FILE};
use gpo_core::prompt::Template;
use gpo_core::store::StoreMeta;
use gpo_embed::{plan_batches, Embedder, LoadOptions, Pooling, TextEncoder};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// How to embed: the model and its options, the template, and the batching.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: String,
    pub template: String,
    pub pooling: Option<Pooling>,
    pub device: String,
    pub dtype: Option<String>,
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    pub max_len: Option<usize>,
    pub truncate: bool,
    pub flush_secs: u64,
}

/// `--device`: cpu, cuda or cuda:N.
pub fn device(s: &str) -> Result<candle_core::Device> {
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

/// `--dtype`: f32, f16 or bf16.
pub fn dtype(s: &str) -> Result<candle_core::DType> {
    Ok(match s {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        _ => bail!("unknown --dtype `{s}` (expected f32, f16 or bf16)"),
    })
}

impl Settings {
    /// The embedder's load options. `on_device` false describes it for the device named
    /// without opening that device (the coordinator plans for workers' GPUs on a CPU).
    pub fn load_options(&self, on_device: bool) -> Result<LoadOptions> {
        let gpu = self.device != "cpu";
        let dev = if on_device {
            device(&self.device)?
        } else {
            candle_core::Device::Cpu
        };
        let dt = match &self.dtype {
            Some(d) => Some(dtype(d)?),
            // The device's default (bf16 on GPU), also when describing it from a CPU.
            None if gpu => Some(candle_core::DType::BF16),
            None => None,
        };
        Ok(LoadOptions {
            pooling: self.pooling,
            device: dev,
            dtype: dt,
            max_len: self.max_len,
            lm_head: false,
        })
    }

    /// The prompt template.
    pub fn template(&self) -> Result<Template> {
        Template::parse(&self.template).map_err(anyhow::Error::msg)
    }

    /// Loads the embedder on its device; also returns the batches it runs at once.
    pub fn load(&self) -> Result<(Box<dyn Embedder>, usize)> {
        let opts = self.load_options(true)?;
        let parallel = if opts.device.is_cpu() {
            rayon::current_num_threads()
        } else {
            1
        };
        let t = Instant::now();
        let e = gpo_embed::load(&self.model, &opts)
            .with_context(|| format!("loading model `{}`", self.model))?;
        eprintln!(
            "model: {} (dim {}, context {} tokens), loaded in {:.1} s",
            e.id(),
            e.dim(),
            e.encoder().max_len(),
            t.elapsed().as_secs_f64()
        );
        Ok((e, parallel))
    }
}

/// Tokenizes `texts` (warning on truncation), returning ids in order.
pub fn tokenize(enc: &TextEncoder, texts: &[String], truncate: bool) -> Result<Vec<Vec<u32>>> {
    use rayon::prelude::*;
    let toks: Vec<gpo_embed::Tokens> = texts
        .par_iter()
        .map(|t| enc.encode(t, truncate))
        .collect::<Result<_, _>>()?;
    let cut: Vec<&gpo_embed::Tokens> = toks.iter().filter(|t| t.truncated_from.is_some()).collect();
    if !cut.is_empty() {
        eprintln!(
            "warning: truncated {} text(s) to the context of {} tokens (longest was {} tokens)",
            cut.len(),
            enc.max_len(),
            cut.iter()
                .filter_map(|t| t.truncated_from)
                .max()
                .unwrap_or(0)
        );
    }
    Ok(toks.into_iter().map(|t| t.ids).collect())
}

/// What a store lacks for a dataset.
pub struct Todo {
    /// The store's rows so far.
    pub writer: StoreWriter,
    /// Distinct texts the dataset has.
    pub total: usize,
    /// The missing ones: (key, text), in the dataset's order.
    pub missing: Vec<(String, String)>,
}

/// Opens (or starts) the store at `out` for `meta`, refusing one of another embedder, and
/// lists every (question, non-refusal option) text of `survey` it lacks, each once.
pub fn todo(survey: &Survey, template: &Template, meta: StoreMeta, out: &Path) -> Result<Todo> {
    let writer = if out.join(INDEX_FILE).exists() {
        let old = EmbeddingStore::open(out)?;
        let m = old.meta();
        if m.embedder != meta.embedder || m.template != meta.template || m.dim != meta.dim {
            bail!(
                "{} holds embeddings of `{}` with template `{}` (dim {}), not `{}` with `{}` \
                 (dim {}): choose another --out (gpo embed) or --embeddings (gpo train)",
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
    let mut seen = HashSet::new();
    let mut missing = Vec::new();
    for q in &survey.questions {
        for (k, o) in q.options.iter().enumerate() {
            if o.refusal {
                continue;
            }
            let text = template.render(q, k);
            let key = meta.key(&text);
            if seen.insert(key.clone()) && !writer.contains(&key) {
                missing.push((key, text));
            }
        }
    }
    Ok(Todo {
        writer,
        total: seen.len(),
        missing,
    })
}

/// Token ids of texts, and planned batches of indices into them.
pub type Planned = (Vec<Vec<u32>>, Vec<Vec<usize>>);

/// The missing texts' token ids and their batches (indices into `missing`).
pub fn plan(enc: &TextEncoder, missing: &[(String, String)], s: &Settings) -> Result<Planned> {
    let texts: Vec<String> = missing.iter().map(|(_, t)| t.clone()).collect();
    let ids = tokenize(enc, &texts, s.truncate)?;
    let lens: Vec<usize> = ids.iter().map(|v| v.len()).collect();
    let batches = plan_batches(&lens, s.max_batch_tokens, s.max_batch_size);
    Ok((ids, batches))
}

/// Adds batch `b`'s vectors to the store's rows.
fn insert(
    writer: &mut StoreWriter,
    missing: &[(String, String)],
    batch: &[usize],
    vectors: Vec<Vec<f32>>,
) -> Result<()> {
    if vectors.len() != batch.len() {
        bail!(
            "a batch of {} texts came back with {} vectors",
            batch.len(),
            vectors.len()
        );
    }
    for (&i, v) in batch.iter().zip(vectors) {
        writer
            .insert(missing[i].0.clone(), &v)
            .with_context(|| format!("embedding of {:?}", missing[i].1))?;
    }
    Ok(())
}

fn write(writer: &StoreWriter, out: &Path) -> Result<()> {
    writer
        .write(out)
        .with_context(|| format!("writing {}", out.display()))
}

fn report(texts: usize, tokens: usize, batches: usize, start: Instant) {
    let s = start.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "embedded {texts} texts ({tokens} tokens) in {s:.1} s: {:.1} texts/s, {:.0} tokens/s, {batches} batches",
        texts as f64 / s,
        tokens as f64 / s,
    );
}

/// Embeds planned `batches` of `ids` in this process, whole batches `parallel` at a time,
/// with a progress bar: `sink(batch, vectors)` in plan order, `flush()` at most every
/// `s.flush_secs`.
#[allow(clippy::too_many_arguments)]
pub fn run_plan(
    e: &dyn Embedder,
    parallel: usize,
    ids: &[Vec<u32>],
    batches: &[Vec<usize>],
    s: &Settings,
    metrics: &gpo_ops::metrics::EmbedMetrics,
    mut sink: impl FnMut(&[usize], Vec<Vec<f32>>) -> Result<()>,
    mut flush: impl FnMut() -> Result<()>,
) -> Result<()> {
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(crate::cmd::embed::style("texts"));
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let every = Duration::from_secs(s.flush_secs);
    for window in batches.chunks(parallel.max(1)) {
        let refs: Vec<Vec<&[u32]>> = window
            .iter()
            .map(|b| b.iter().map(|&i| ids[i].as_slice()).collect())
            .collect();
        let t = Instant::now();
        let out = gpo_embed::embed_batches(e, &refs, parallel)?;
        let tokens: usize = refs.iter().flatten().map(|r| r.len()).sum();
        metrics.batch(tokens as u64, t.elapsed().as_secs_f64());
        for (b, v) in window.iter().zip(out) {
            if v.len() != b.len() {
                bail!(
                    "a batch of {} texts came back with {} vectors",
                    b.len(),
                    v.len()
                );
            }
            sink(b, v)?;
            bar.inc(b.len() as u64);
        }
        if last_flush.elapsed() >= every {
            bar.suspend(&mut flush)?;
            last_flush = Instant::now();
        }
    }
    bar.finish_and_clear();
    report(
        ids.len(),
        ids.iter().map(|v| v.len()).sum(),
        batches.len(),
        start,
    );
    Ok(())
}

/// Embeds `todo` in this process and writes the store.
pub fn fill_local(
    e: &dyn Embedder,
    parallel: usize,
    mut todo: Todo,
    s: &Settings,
    out: &Path,
    metrics: &gpo_ops::metrics::EmbedMetrics,
) -> Result<StoreWriter> {
    if !todo.missing.is_empty() {
        let (ids, batches) = plan(e.encoder(), &todo.missing, s)?;
        let cell = std::cell::RefCell::new(&mut todo.writer);
        let missing = &todo.missing;
        run_plan(
            e,
            parallel,
            &ids,
            &batches,
            s,
            metrics,
            |b, v| insert(&mut cell.borrow_mut(), missing, b, v),
            || write(&cell.borrow(), out),
        )?;
    }
    write(&todo.writer, out)?;
    Ok(todo.writer)
}

/// How the embedding phase of a distributed run is served.
pub struct Phase<'a> {
    /// A clone of the coordinator's listener (the run's service takes the port after).
    pub listener: std::net::TcpListener,
    pub security: &'a gpo_coordinator::Security,
    pub timing: EmbedTiming,
    /// A training run follows on the same port.
    pub then_train: bool,
    /// Starts the workers of `gpo embed/train --workers N` once the phase serves (`true`:
    /// to embed; `false`: the store is complete, they only train).
    pub spawn: Box<dyn FnOnce(SocketAddr, bool) -> Result<Vec<Child>> + 'a>,
}

/// Fills the store at `out` for `survey` through the workers that join the phase; returns
/// the worker processes it started (still running when a training run follows).
pub fn fill_distributed(
    s: &Settings,
    survey: &Survey,
    out: &Path,
    phase: Phase<'_>,
) -> Result<Vec<Child>> {
    let template = s.template()?;
    let d = gpo_embed::describe(&s.model, &s.load_options(false)?)
        .with_context(|| format!("reading model `{}`", s.model))?;
    let meta = StoreMeta {
        embedder: d.id.clone(),
        template: template.name().to_string(),
        dim: d.dim,
        synthetic: false,
    };
    let mut todo = todo(survey, &template, meta, out)?;
    eprintln!(
        "{}: {} texts under template `{}` for `{}`; {} in the store, {} to embed on the workers",
        out.display(),
        todo.total,
        template.name(),
        d.id,
        todo.total - todo.missing.len(),
        todo.missing.len()
    );
    if todo.missing.is_empty() {
        write(&todo.writer, out)?;
        return (phase.spawn)(phase.listener.local_addr()?, false);
    }
    let (ids, batches) = plan(&d.encoder, &todo.missing, s)?;
    let tokens: usize = ids.iter().map(|v| v.len()).sum();
    let plan = EmbedPlan {
        embedder: d.id.clone(),
        dim: d.dim,
        batches: batches
            .iter()
            .map(|b| b.iter().map(|&i| ids[i].clone()).collect())
            .collect(),
        then_train: phase.then_train,
    };
    let server = EmbedServer::start_on(phase.listener, plan, phase.security, phase.timing)?;
    eprintln!(
        "embedding phase on {}: {} batches ({tokens} tokens) for workers running `{}`",
        server.addr(),
        batches.len(),
        d.id
    );
    let mut children = (phase.spawn)(server.addr(), true)?;
    let start = Instant::now();
    let (mut last_flush, mut last_log) = (Instant::now(), Instant::now());
    let every = Duration::from_secs(s.flush_secs);
    let mut dirty = false;
    loop {
        for (b, v) in server.take_writable() {
            insert(&mut todo.writer, &todo.missing, &batches[b], v)?;
            dirty = true;
        }
        if server.is_complete() {
            break;
        }
        if dirty && last_flush.elapsed() >= every {
            write(&todo.writer, out)?;
            (last_flush, dirty) = (Instant::now(), false);
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            let (done, total) = server.progress();
            eprintln!(
                "embedding: {done}/{total} batches, {} worker(s) in the phase",
                server.members()
            );
            last_log = Instant::now();
        }
        if !children.is_empty() {
            let mut failed = 0;
            for c in children.iter_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    if !st.success() {
                        failed += 1;
                    }
                }
            }
            if failed == children.len() {
                write(&todo.writer, out)?;
                bail!(
                    "every worker process failed during the embedding phase ({}/{} batches done; \
                     the store keeps them: run again to resume)",
                    server.progress().0,
                    server.progress().1
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    write(&todo.writer, out)?;
    report(ids.len(), tokens, batches.len(), start);
    let (shares, dups) = server.shares();
    for sh in shares {
        eprintln!(
            "  worker `{}`: {} batches, {} tokens",
            sh.name, sh.batches, sh.tokens
        );
    }
    if dups > 0 {
        eprintln!("  {dups} duplicate batch deliveries dropped");
    }
    server.finish(Duration::from_secs(10));
    Ok(children)
}

/// The flags of `gpo train` and `gpo coordinator` that fill the run's store first.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedFlags {
    /// Fill what the embedding store (--embeddings, default `<data>/embeddings`) lacks
    /// with this model before training: an HF folder, a .gguf file, or a hub id. With
    /// --workers (or `gpo coordinator`), the workers embed (`gpo worker --embedder` the
    /// same model).
    #[arg(long, env = "GPO_EMBEDDER", requires = "data")]
    pub embedder: Option<String>,
    /// Prompt template of a new store: plain (encoders), alpaca or llama2-chat.
    #[arg(long, default_value = "plain", requires = "embedder")]
    pub embed_template: String,
    /// Pooling of the embedder (default: the model's own).
    #[arg(long, requires = "embedder")]
    pub embed_pooling: Option<Pooling>,
    /// Device the embedder runs on (the workers', in a distributed run): cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu", requires = "embedder")]
    pub embed_device: String,
    /// Compute dtype of the embedder: f32, f16 or bf16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long, requires = "embedder")]
    pub embed_dtype: Option<String>,
    /// Token budget of one embedding batch.
    #[arg(long, default_value_t = 8192, requires = "embedder")]
    pub embed_max_batch_tokens: usize,
}

impl EmbedFlags {
    /// The settings, when a store is to be filled.
    pub fn settings(&self) -> Option<Settings> {
        self.embedder.as_ref().map(|m| Settings {
            model: m.clone(),
            template: self.embed_template.clone(),
            pooling: self.embed_pooling,
            device: self.embed_device.clone(),
            dtype: self.embed_dtype.clone(),
            max_batch_tokens: self.embed_max_batch_tokens,
            max_batch_size: 256,
            max_len: None,
            truncate: false,
            flush_secs: 60,
        })
    }
}

/// The survey a run's data flags name and its store folder (the `--embeddings` flag, or
/// `<data>/embeddings`), for filling before training.
pub fn run_survey(d: &crate::inputs::DataArgs) -> Result<(Survey, std::path::PathBuf)> {
    let Some(data) = &d.data else {
        bail!("--embedder needs --data (the built-in synthetic survey brings its own embeddings)");
    };
    let (format, opts) = match &d.format {
        Some(f) => crate::inputs::parse_format_spec(f)?,
        None => (None, Default::default()),
    };
    let (survey, _) = gpo_core::io::dataset::load_with(data, format, &opts)?;
    let store = d.embeddings.clone().unwrap_or_else(|| {
        if data.is_dir() {
            data.join("embeddings")
        } else {
            data.with_file_name("embeddings")
        }
    });
    Ok((survey, store))
}

/// `gpo train --embedder M` in one process: fills the store here before training.
pub fn fill_before_training(flags: &EmbedFlags, d: &crate::inputs::DataArgs) -> Result<()> {
    let Some(st) = flags.settings() else {
        return Ok(());
    };
    let (survey, out) = run_survey(d)?;
    let template = st.template()?;
    // Nothing to load when the store has every text already.
    let desc = gpo_embed::describe(&st.model, &st.load_options(false)?)
        .with_context(|| format!("reading model `{}`", st.model))?;
    let meta = StoreMeta {
        embedder: desc.id.clone(),
        template: template.name().to_string(),
        dim: desc.dim,
        synthetic: false,
    };
    let todo = todo(&survey, &template, meta, &out)?;
    eprintln!(
        "{}: {} texts for `{}`, {} to embed before training",
        out.display(),
        todo.total,
        desc.id,
        todo.missing.len()
    );
    if todo.missing.is_empty() && out.join(INDEX_FILE).exists() {
        return Ok(());
    }
    let (e, parallel) = st.load()?;
    anyhow::ensure!(
        e.id() == desc.id,
        "the loaded embedder is `{}`, not the described `{}`",
        e.id(),
        desc.id
    );
    fill_local(
        e.as_ref(),
        parallel,
        todo,
        &st,
        &out,
        &gpo_ops::metrics::EmbedMetrics::default(),
    )?;
    Ok(())
}
