//! The decoder's shape ([`DecoderConfig`]) and family ([`Arch`]), whichever source it was read
//! from: both loaders fill it in and check it here, and the blocks read it at every forward.

use std::path::Path;

use crate::error::{invalid, Result};

/// Which decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Mistral, SmolLM, Alpaca.
    Llama,
    /// Qwen2: Llama blocks with q/k/v biases.
    Qwen2,
}

/// The decoder's shape.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Whether q/k/v projections have biases.
    pub qkv_bias: bool,
    /// Whether RoPE rotates interleaved pairs (GGUF Llama) rather than halves.
    pub rope_interleaved: bool,
    /// Padding id used to fill batches (any id works: padded positions are never read).
    pub pad_id: u32,
}

impl DecoderConfig {
    pub(super) fn check(&self, path: &Path) -> Result<()> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(
                path,
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(path, format!("head_dim {} is odd", self.head_dim)));
        }
        Ok(())
    }
}
