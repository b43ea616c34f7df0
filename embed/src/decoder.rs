//! Decoder LLMs as embedders: the Llama architecture (Llama 1/2, Alpaca, Mistral, SmolLM) and
//! Qwen2 (the same blocks with biases on the q/k/v projections).
//!
//! The forward pass is the model's own up to the final RMS norm (candle's quantized and full
//! Llama modules return only logits), then pooling: mean over the non-padding tokens (the
//! paper's choice) or the last token. Batches are right-padded, so under the causal mask a
//! real token never attends to padding and no padding mask is needed inside the blocks.
//!
//! Weights come from a Hugging Face folder (safetensors in f32/f16/bf16) or a GGUF file,
//! dequantized to f32 at load: candle's quantized matmul is far slower for batched prefill on
//! CPU. llama.cpp stores Llama's q/k projections permuted for interleaved RoPE, so a GGUF
//! Llama uses interleaved RoPE and a folder uses the halves layout; both compute the same
//! function.
//!
//! This module holds the model itself ([`DecoderEmbedder`] and its blocks' weights) and its
//! [`Embedder`] implementation; the rest is split by concern:
//!
//! - `config`: the decoder's shape ([`DecoderConfig`], [`Arch`]);
//! - `hf`: loading from a Hugging Face folder (`config.json`, `tokenizer.json`, safetensors);
//! - `gguf`: loading from a GGUF file (metadata, tokenizer, tensors under their llama.cpp names);
//! - `weights`: what both sources share, the assembly of the model from named tensors;
//! - `forward`: the transformer blocks (attention with RoPE and grouped-query heads, MLP);
//! - [`lm`]: next-token scoring with a K/V cache, for the LLM baselines.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear};

use crate::error::{EmbedError, Result};
use crate::tokenize::TextEncoder;
use crate::{pad_batch, pool, Embedder, Pooling};

mod config;
mod forward;
mod gguf;
mod hf;
pub mod lm;
mod weights;

pub use config::{Arch, DecoderConfig};

pub(crate) struct Block {
    attn_norm: Tensor,
    qkv: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// A decoder LLM with its tokenizer and pooling.
pub struct DecoderEmbedder {
    id: String,
    cfg: DecoderConfig,
    encoder: TextEncoder,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    /// The output matrix `[vocab, h]` (the token embeddings when tied); `None` when an
    /// untied head was not asked for.
    lm_head: Option<Tensor>,
    /// RoPE tables `[max_len, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    pooling: Pooling,
    dtype: DType,
    device: Device,
}

impl DecoderEmbedder {
    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }
}

impl Embedder for DecoderEmbedder {
    fn id(&self) -> &str {
        &self.id
    }
    fn dim(&self) -> usize {
        self.cfg.hidden_size
    }
    fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }
    fn embed_tokens(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.encoder.max_len();
        for s in batch {
            if s.len() > max {
                return Err(EmbedError::TooLong {
                    text: format!("<{} token ids>", s.len()),
                    tokens: s.len(),
                    max,
                });
            }
        }
        let (ids, mask, lens) = pad_batch(batch, self.cfg.pad_id, &self.device)?;
        let hidden = self.forward(&ids)?;
        pool(&hidden, &mask, &lens, self.pooling, false)
    }
}
