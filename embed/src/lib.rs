//! Embedders for GPO's points: the base LLM's (or an encoder's) embedding of each
//! (question, option) text, on candle.
//!
//! One [`Embedder`] implementation per model family:
//!
//! - [`bert::BertEmbedder`]: BERT and its relatives (MiniLM, BGE, E5) from a Hugging Face
//!   folder, pooled and normalized as the folder's sentence-transformers config says;
//! - [`decoder::DecoderEmbedder`]: Llama-architecture decoders (Llama 1/2, Alpaca, Mistral,
//!   SmolLM) and Qwen2, from a Hugging Face folder (safetensors in f32/f16/bf16) or a GGUF file
//!   (tokenizer rebuilt from its metadata, weights dequantized at load). The embedding is the
//!   last layer's hidden state after the final norm, mean-pooled over the non-padding tokens
//!   (the paper's choice) or taken at the last token.
//!
//! [`load`] picks the family from the path (a `.gguf` file, or a folder's `config.json`), or
//! resolves a hub id through the standard Hugging Face cache folder ([`source`]).
//! Inference uses candle's fused ops (layer/RMS norm, softmax, RoPE): none of this is trained.

pub mod bert;
pub mod decoder;
pub mod error;
mod fast;
pub mod source;
pub mod tokenize;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

pub use error::{EmbedError, Result};
pub use source::{describe, load, load_decoder};
pub use tokenize::{TextEncoder, Tokens};

/// How a sequence of hidden states becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the non-padding tokens.
    Mean,
    /// The last non-padding token's state (decoders).
    LastToken,
    /// The first token's state (BERT's `[CLS]`, e.g. BGE).
    Cls,
}

impl Pooling {
    /// The name used on the command line and in embedder ids.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::LastToken => "last",
            Pooling::Cls => "cls",
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "last" | "last-token" => Ok(Pooling::LastToken),
            "cls" => Ok(Pooling::Cls),
            _ => Err(format!(
                "unknown pooling `{s}` (expected mean, last or cls)"
            )),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pooling; `None` takes the model's own (sentence-transformers config for encoders,
    /// mean for decoders).
    pub pooling: Option<Pooling>,
    /// Device to run on.
    pub device: Device,
    /// Compute dtype; `None` is f32 on CPU and bf16 on GPU.
    pub dtype: Option<DType>,
    /// Caps the context length below the model's own.
    pub max_len: Option<usize>,
    /// Loads a decoder's untied output matrix too, for next-token scoring (tied models
    /// always have it; embedding never needs it).
    pub lm_head: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pooling: None,
            device: Device::Cpu,
            dtype: None,
            max_len: None,
            lm_head: false,
        }
    }
}

impl LoadOptions {
    /// The compute dtype these options give on their device.
    pub fn compute_dtype(&self) -> DType {
        self.dtype.unwrap_or(if self.device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        })
    }
}

/// What an embedder would produce, known without its weights ([`describe`]).
#[derive(Debug)]
pub struct Description {
    /// The embedder id ([`Embedder::id`]).
    pub id: String,
    /// The width of every vector.
    pub dim: usize,
    /// The tokenizer and context length.
    pub encoder: TextEncoder,
}

/// A model that turns texts into fixed-size vectors.
pub trait Embedder: Send + Sync {
    /// A stable identifier of what produces the vectors (model, pooling, normalization,
    /// dtype and a fingerprint of the files). Embedding stores key every vector by it.
    fn id(&self) -> &str;
    /// Length of every embedding.
    fn dim(&self) -> usize;
    /// The text encoder (tokenizer and context length).
    fn encoder(&self) -> &TextEncoder;
    /// Embeds a batch of token sequences (each from [`Embedder::encoder`]); one vector per
    /// sequence, in order. Non-finite outputs are an error.
    fn embed_tokens(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>>;

    /// Tokenizes (no truncation) and embeds `texts` as one batch.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let toks: Vec<Tokens> = texts
            .iter()
            .map(|t| self.encoder().encode(t, false))
            .collect::<Result<_>>()?;
        let refs: Vec<&[u32]> = toks.iter().map(|t| t.ids.as_slice()).collect();
        self.embed_tokens(&refs)
    }
}

/// Embeds `batch` in `shards` contiguous pieces on rayon's pool, for CPU runs where each
/// kernel is single-threaded (the `gpo` binary's setting): sharding the batch keeps every
/// core busy without candle's per-op thread barrier. `shards <= 1` is one call.
pub fn embed_sharded(e: &dyn Embedder, batch: &[&[u32]], shards: usize) -> Result<Vec<Vec<f32>>> {
    if shards <= 1 || batch.len() < 2 {
        return e.embed_tokens(batch);
    }
    use rayon::prelude::*;
    let per = batch.len().div_ceil(shards.min(batch.len()));
    let parts: Vec<Result<Vec<Vec<f32>>>> =
        batch.par_chunks(per).map(|c| e.embed_tokens(c)).collect();
    let mut out = Vec::with_capacity(batch.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Embeds whole planned batches, in parallel on rayon's pool (one process's cores; `parallel <= 1`: in turn), each as one
/// [`Embedder::embed_tokens`] call, so a text's vector depends only on the batch the plan
/// put it in: vectors are not bitwise invariant to a batch's padding, and a store must not
/// depend on the thread count or on which process ran the batch.
pub fn embed_batches(
    e: &dyn Embedder,
    batches: &[Vec<&[u32]>],
    parallel: usize,
) -> Result<Vec<Vec<Vec<f32>>>> {
    if parallel <= 1 || batches.len() < 2 {
        return batches.iter().map(|b| e.embed_tokens(b)).collect();
    }
    use rayon::prelude::*;
    batches.par_iter().map(|b| e.embed_tokens(b)).collect()
}

/// Groups texts into batches under a token budget, like TEI's max-batch-tokens: indices are
/// sorted by length (longest first, so memory peaks early and the ETA is pessimistic), and a
/// batch grows while `count × longest ≤ max_batch_tokens` and `count ≤ max_batch_size`, which
/// bounds the padded size. A text longer than the budget gets a batch of its own.
pub fn plan_batches(
    lengths: &[usize],
    max_batch_tokens: usize,
    max_batch_size: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let l = lengths[i].max(1);
        let new_longest = longest.max(l);
        if !cur.is_empty()
            && ((cur.len() + 1) * new_longest > max_batch_tokens
                || cur.len() + 1 > max_batch_size.max(1))
        {
            batches.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(l);
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Right-pads `batch` into `(ids [b, t] u32, mask [b, t] f32, lengths)` on `device`.
pub(crate) fn pad_batch(
    batch: &[&[u32]],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let t = batch.iter().map(|s| s.len()).max().unwrap_or(0);
    let b = batch.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut lens = Vec::with_capacity(b);
    for (r, s) in batch.iter().enumerate() {
        if s.is_empty() {
            return Err(EmbedError::Unsupported(format!(
                "sequence #{r} of the batch is empty"
            )));
        }
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        mask[r * t..r * t + s.len()].fill(1.0);
        lens.push(s.len());
    }
    Ok((
        Tensor::from_vec(ids, (b, t), device)?,
        Tensor::from_vec(mask, (b, t), device)?,
        lens,
    ))
}

/// Pools hidden states `[b, t, d]` into `[b, d]` f32 rows; `mask` is `[b, t]` f32 (1 for real
/// tokens), `lens` the real lengths (right padding).
pub(crate) fn pool(
    hidden: &Tensor,
    mask: &Tensor,
    lens: &[usize],
    pooling: Pooling,
    normalize: bool,
) -> Result<Vec<Vec<f32>>> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let pooled = match pooling {
        Pooling::Mean => {
            let m = mask.unsqueeze(2)?;
            let sum = hidden.broadcast_mul(&m)?.sum(1)?;
            let count = mask.sum_keepdim(1)?;
            sum.broadcast_div(&count)?
        }
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::LastToken => {
            let rows: Vec<Tensor> = lens
                .iter()
                .enumerate()
                .map(|(r, &l)| hidden.get(r)?.get(l - 1))
                .collect::<candle_core::Result<_>>()?;
            Tensor::stack(&rows, 0)?
        }
    };
    let pooled = if normalize {
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        pooled.broadcast_div(&norm)?
    } else {
        pooled
    };
    let rows: Vec<Vec<f32>> = pooled.to_vec2()?;
    for (r, row) in rows.iter().enumerate() {
        if let Some((index, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(EmbedError::NonFinite {
                row: r,
                index,
                value,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget_and_cover_everything() {
        let lengths = [5, 50, 7, 49, 3, 100, 8, 8, 2];
        let b = plan_batches(&lengths, 100, 32);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for batch in &b {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() == 1 || batch.len() * longest <= 100, "{b:?}");
        }
        // Longest first, and similar lengths together.
        assert_eq!(b[0], vec![5]);
        assert_eq!(b[1], vec![1, 3]);
        assert_eq!(b[2], vec![6, 7, 2, 0, 4, 8]);
        // The size cap.
        let b = plan_batches(&[1; 10], 1000, 4);
        assert_eq!(b.iter().map(|x| x.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert!(plan_batches(&[], 10, 10).is_empty());
    }

    #[test]
    fn pooling_names_round_trip() {
        for p in [Pooling::Mean, Pooling::LastToken, Pooling::Cls] {
            assert_eq!(p.name().parse::<Pooling>(), Ok(p));
        }
        assert!("max".parse::<Pooling>().unwrap_err().contains("mean"));
    }

    #[test]
    fn pooling_ignores_padding() {
        let dev = Device::Cpu;
        // Two sequences, t = 3; the second has length 2 and a huge value in its pad slot.
        let h = Tensor::from_vec(
            vec![1f32, 2., 3., 4., 5., 6., 10., 20., 30., 40., 1e6, 1e6],
            (2, 3, 2),
            &dev,
        )
        .unwrap();
        let (_, mask, lens) = pad_batch(&[&[1, 2, 3], &[1, 2]], 0, &dev).unwrap();
        let mean = pool(&h, &mask, &lens, Pooling::Mean, false).unwrap();
        assert_eq!(mean, vec![vec![3., 4.], vec![20., 30.]]);
        let last = pool(&h, &mask, &lens, Pooling::LastToken, false).unwrap();
        assert_eq!(last, vec![vec![5., 6.], vec![30., 40.]]);
        let cls = pool(&h, &mask, &lens, Pooling::Cls, true).unwrap();
        let n = (1f32 + 4.).sqrt();
        assert!((cls[0][0] - 1. / n).abs() < 1e-6 && (cls[0][1] - 2. / n).abs() < 1e-6);
        let bad = Tensor::from_vec(vec![f32::NAN; 12], (2, 3, 2), &dev).unwrap();
        assert!(matches!(
            pool(&bad, &mask, &lens, Pooling::Mean, false),
            Err(EmbedError::NonFinite {
                row: 0,
                index: 0,
                ..
            })
        ));
    }
}
