//! Loading a decoder from a Hugging Face folder: `config.json` read into a [`DecoderConfig`],
//! `tokenizer.json`, and safetensors weights (f32/f16/bf16) already under the names the
//! assembly in `weights` asks for. Its own module because nothing here concerns GGUF files.

use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::weights::{pooling_and_id, Weights};
use super::{Arch, DecoderConfig, DecoderEmbedder};
use crate::error::{invalid, EmbedError, Result};
use crate::tokenize::{self, TextEncoder};
use crate::{LoadOptions, Pooling};

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn default_theta() -> f64 {
    10_000.0
}

impl DecoderConfig {
    /// Reads a Hugging Face `config.json` (Llama, Mistral or Qwen2).
    pub fn from_hf(v: &serde_json::Value, path: &Path) -> Result<DecoderConfig> {
        let c: HfConfig = serde_json::from_value(v.clone())
            .map_err(|e| invalid(path, format!("not a decoder config: {e}")))?;
        let arch = match c.model_type.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(EmbedError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        if let Some(rs) = &c.rope_scaling {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("");
            if !rs.is_null() && ty != "default" {
                return Err(invalid(
                    path,
                    format!("rope_scaling `{ty}` is not supported (only unscaled RoPE)"),
                ));
            }
        }
        if c.num_attention_heads == 0 {
            return Err(invalid(path, "num_attention_heads is 0"));
        }
        let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let pad = c
            .pad_token_id
            .or_else(|| {
                c.eos_token_id
                    .as_ref()
                    .and_then(|v| v.as_u64())
                    .map(|v| v as u32)
            })
            .unwrap_or(0);
        let cfg = DecoderConfig {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: kv,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            max_position_embeddings: c.max_position_embeddings,
            qkv_bias: arch == Arch::Qwen2 || c.attention_bias,
            rope_interleaved: false,
            pad_id: pad,
        };
        cfg.check(path)?;
        Ok(cfg)
    }
}

struct HfWeights {
    vb: VarBuilder<'static>,
}

impl Weights for HfWeights {
    fn get(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.vb.get_unchecked(name)?)
    }
    fn has(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }
}

impl DecoderEmbedder {
    /// What a decoder folder would embed with (id, width, tokenizer), without its weights.
    pub fn describe_hf(
        dir: &Path,
        cfg_json: &serde_json::Value,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<crate::Description> {
        let (cfg, encoder, _, id) = Self::prepare_hf(dir, cfg_json, opts, id_base)?;
        Ok(crate::Description {
            id,
            dim: cfg.hidden_size,
            encoder,
        })
    }

    /// A folder's config, tokenizer, pooling and id: everything but the weights.
    fn prepare_hf(
        dir: &Path,
        cfg_json: &serde_json::Value,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<(DecoderConfig, TextEncoder, Pooling, String)> {
        let cfg = DecoderConfig::from_hf(cfg_json, &dir.join("config.json"))?;
        let tok = tokenize::from_folder(dir, cfg.vocab_size)?;
        let max_len = opts.max_len.map_or(cfg.max_position_embeddings, |m| {
            m.min(cfg.max_position_embeddings)
        });
        let encoder = TextEncoder::new(tok, max_len)?;
        let (pooling, id) = pooling_and_id(opts, id_base)?;
        Ok((cfg, encoder, pooling, id))
    }

    /// Loads a decoder from a Hugging Face folder.
    pub fn load_hf(
        dir: &Path,
        cfg_json: &serde_json::Value,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<DecoderEmbedder> {
        let (cfg, encoder, pooling, id) = Self::prepare_hf(dir, cfg_json, opts, id_base)?;
        let files = crate::source::safetensors_files(dir)?;
        // SAFETY: read-only mapping; the weights are copied out at load.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&files, opts.compute_dtype(), &opts.device)?
        };
        DecoderEmbedder::build(cfg, &mut HfWeights { vb }, encoder, pooling, opts, id)
    }
}
