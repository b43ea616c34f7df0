//! Next-token scoring with a decoder LLM, for the LLM baselines: their prompts end where the
//! model should answer with an option letter, and a prompt's scores are the next-token
//! logits of those letters.
//!
//! A prompt prefix shared by many continuations (the few-shot baseline's context questions)
//! runs once into a [`KvCache`]. Continuations are packed into one sequence per chunk, each
//! attending to the prefix and to itself only (a block-diagonal causal mask, RoPE positions
//! restarting after the prefix), so nothing is padded and the prefix is never recomputed.
//! Every call is single-threaded under the `gpo` binary's kernel setting; callers run
//! independent calls (groups, chunks) on rayon's pool.

use candle_core::{Module, Tensor};

use super::DecoderEmbedder;
use crate::error::{EmbedError, Result};

/// Token budget of one packed chunk. It bounds the attention matrix (heads × t × (p + t)),
/// most of whose t × t part the block-diagonal mask discards, while keeping the matmuls
/// tall enough to run at full speed.
const CHUNK_TOKENS: usize = 512;

/// Rotated keys and values of a prompt prefix, per layer `[1, kv_heads, len, head_dim]`.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DecoderEmbedder {
    /// Whether the model can score next tokens (a tied head, or an output matrix loaded with
    /// [`crate::LoadOptions::lm_head`]).
    pub fn has_lm_head(&self) -> bool {
        self.lm_head.is_some()
    }

    /// Runs `ids` (the sequences `lens`, packed) after `past`: returns the final-normed
    /// hidden states `[t, h]` and each layer's new rotated K/V.
    fn packed(
        &self,
        ids: &[u32],
        lens: &[usize],
        past: Option<&KvCache>,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let p = past.map_or(0, |c| c.len);
        let t = ids.len();
        let longest = lens.iter().copied().max().unwrap_or(0);
        if p + longest > self.cos.dim(0)? {
            return Err(EmbedError::TooLong {
                text: format!("<prefix of {p} tokens + {longest} token ids>"),
                tokens: p + longest,
                max: self.cos.dim(0)?,
            });
        }
        let mut seq = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        for (s, &n) in lens.iter().enumerate() {
            seq.extend(std::iter::repeat_n(s, n));
            pos.extend((0..n).map(|i| (p + i) as u32));
        }
        let pos = Tensor::new(pos.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mask =
            super::forward::attention_mask(t, p, |i, j| seq[i] == seq[j] && j <= i, &self.device)?;
        let mut x = self
            .embed
            .forward(&Tensor::new(ids, &self.device)?.unsqueeze(0)?)?;
        let mut kv = Vec::with_capacity(self.blocks.len());
        for (l, blk) in self.blocks.iter().enumerate() {
            let (nx, new) = self.block(blk, x, &cos, &sin, &mask, past.map(|c| &c.layers[l]))?;
            x = nx;
            kv.push(new);
        }
        let h = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok((h.squeeze(0)?, kv))
    }

    /// Runs a prompt prefix into a cache (in chunks, each attending to the ones before).
    pub fn prefill(&self, ids: &[u32]) -> Result<KvCache> {
        let mut cache: Option<KvCache> = None;
        for c in ids.chunks(CHUNK_TOKENS) {
            let (_, kv) = self.packed(c, &[c.len()], cache.as_ref())?;
            cache = Some(match cache {
                None => KvCache {
                    layers: kv,
                    len: c.len(),
                },
                Some(old) => KvCache {
                    layers: old
                        .layers
                        .iter()
                        .zip(kv)
                        .map(|((pk, pv), (k, v))| {
                            Ok((Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?))
                        })
                        .collect::<Result<_>>()?,
                    len: old.len + c.len(),
                },
            });
        }
        cache.ok_or(EmbedError::Empty {
            text: "<empty prefix>".into(),
        })
    }

    /// The next-token logits of `candidates` after each sequence of `seqs` (each continuing
    /// `prefix` when given): one row per sequence, one column per candidate id.
    pub fn next_token_logits(
        &self,
        prefix: Option<&KvCache>,
        seqs: &[&[u32]],
        candidates: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let head = self.lm_head.as_ref().ok_or_else(|| {
            EmbedError::Unsupported(
                "this model was loaded without its output layer (LoadOptions::lm_head)".into(),
            )
        })?;
        let vocab = head.dim(0)?;
        if let Some(&bad) = candidates.iter().find(|&&c| c as usize >= vocab) {
            return Err(EmbedError::Unsupported(format!(
                "candidate token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let rows = head.index_select(&Tensor::new(candidates, &self.device)?, 0)?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < seqs.len() && (end == start || tokens + seqs[end].len() <= CHUNK_TOKENS) {
                tokens += seqs[end].len();
                end += 1;
            }
            let chunk = &seqs[start..end];
            if chunk.iter().any(|s| s.is_empty()) {
                return Err(EmbedError::Empty {
                    text: "<empty continuation>".into(),
                });
            }
            let ids: Vec<u32> = chunk.iter().flat_map(|s| s.iter().copied()).collect();
            let lens: Vec<usize> = chunk.iter().map(|s| s.len()).collect();
            let (h, _) = self.packed(&ids, &lens, prefix)?;
            let mut last = Vec::with_capacity(lens.len());
            let mut at = 0u32;
            for &n in &lens {
                at += n as u32;
                last.push(at - 1);
            }
            let h = h.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
            let logits = h
                .matmul(&rows.t()?)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2::<f32>()?;
            for (r, row) in logits.into_iter().enumerate() {
                if let Some((index, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite())
                {
                    return Err(EmbedError::NonFinite {
                        row: start + r,
                        index,
                        value,
                    });
                }
                out.push(row);
            }
            start = end;
        }
        Ok(out)
    }
}

/// Softmax of candidate logits: the next-token probabilities renormalized over the candidates.
pub fn normalized(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}
