//! The embedder checks (`embedder_minilm`, `embedder_smollm2`): a model's GPU embedder
//! (bf16) against its CPU one (f32) on the same fixed texts. Its own module because it is
//! the only check that loads a language model and needs texts of its own.

use super::Outcome;
use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// Survey-like texts of varied lengths, the same every run.
pub(super) fn texts(n: usize) -> Vec<String> {
    const TOPICS: [&str; 8] = [
        "the government should spend more on public transport",
        "artificial intelligence will make most jobs easier",
        "local newspapers are a trustworthy source of information",
        "people in my community share the same values",
        "the economy will be better a year from now",
        "scientists should have a bigger role in policy decisions",
        "social media does more harm than good to democracy",
        "it is important to live in a country governed democratically",
    ];
    const ANSWERS: [&str; 5] = [
        "Strongly agree",
        "Somewhat agree",
        "Neither agree nor disagree",
        "Somewhat disagree",
        "Strongly disagree",
    ];
    (0..n)
        .map(|i| {
            let topic = TOPICS[i % TOPICS.len()];
            let answer = ANSWERS[(i / TOPICS.len()) % ANSWERS.len()];
            let extra = " Please think about the last twelve months when you answer.".repeat(i % 4);
            format!("Question {i}: How much do you agree that {topic}?{extra} Answer: {answer}")
        })
        .collect()
}

pub(super) fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

/// Embeds `texts` in length-sorted batches of 32: (vectors in input order, seconds).
fn embed_all(
    e: &dyn gpo_embed::Embedder,
    toks: &[Vec<u32>],
    shards: usize,
) -> Result<(Vec<Vec<f32>>, f64)> {
    let lengths: Vec<usize> = toks.iter().map(Vec::len).collect();
    let batches = gpo_embed::plan_batches(&lengths, 32 * 512, 32);
    let mut out = vec![Vec::new(); toks.len()];
    let t = Instant::now();
    for b in &batches {
        let refs: Vec<&[u32]> = b.iter().map(|&i| toks[i].as_slice()).collect();
        let v = gpo_embed::embed_sharded(e, &refs, shards)?;
        for (&i, v) in b.iter().zip(v) {
            out[i] = v;
        }
    }
    Ok((out, t.elapsed().as_secs_f64()))
}

/// The GPU embedder (its default dtype, bf16) against the CPU one (f32).
pub(super) fn embedder(path: &Path, dev: &Device, n: usize) -> Result<Outcome> {
    /// The least cosine between a GPU vector in bf16 and its CPU twin in f32.
    const MIN_COSINE: f64 = 0.99;
    let spec = path.to_str().context("the model path is not UTF-8")?;
    let cpu_opts = gpo_embed::LoadOptions::default();
    let gpu_opts = gpo_embed::LoadOptions {
        device: dev.clone(),
        ..Default::default()
    };
    let cpu = gpo_embed::load(spec, &cpu_opts).context("loading the CPU embedder")?;
    let gpu = gpo_embed::load(spec, &gpu_opts).context("loading the GPU embedder")?;
    let texts = texts(n);
    let toks: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| Ok(cpu.encoder().encode(t, true)?.ids))
        .collect::<Result<_>>()?;
    let tokens: usize = toks.iter().map(Vec::len).sum();
    // Warm-up: the GPU's first batch compiles and loads kernels.
    embed_all(&*gpu, &toks[..toks.len().min(32)], 1)?;
    let (g, gpu_s) = embed_all(&*gpu, &toks, 1)?;
    let (c, cpu_s) = embed_all(&*cpu, &toks, gpo_core::grad::default_threads())?;
    let cos: Vec<f64> = g.iter().zip(&c).map(|(a, b)| cosine(a, b)).collect();
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
    let v = json!({
        "model": spec,
        "gpu_dtype": format!("{:?}", gpu_opts.compute_dtype()),
        "cpu_dtype": "F32",
        "texts": texts.len(),
        "tokens": tokens,
        "cosine_min": min,
        "cosine_mean": mean,
        "cosine_min_required": MIN_COSINE,
        "gpu_seconds": gpu_s,
        "cpu_seconds": cpu_s,
        "gpu_tokens_per_s": tokens as f64 / gpu_s,
        "cpu_tokens_per_s": tokens as f64 / cpu_s,
        "cpu_threads": gpo_core::grad::default_threads(),
        "batch": "length-sorted, at most 32 texts",
    });
    let verdict = if min >= MIN_COSINE {
        Ok(())
    } else {
        Err(format!("cosine {min} below {MIN_COSINE}"))
    };
    Ok((v, verdict))
}
