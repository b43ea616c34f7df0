//! Loading a decoder from a GGUF file: its metadata read into a [`DecoderConfig`], the
//! tokenizer rebuilt from the metadata, and its tensors dequantized on demand under their
//! Hugging Face names (llama.cpp renames them). Its own module because the GGUF format's
//! naming and metadata conventions are independent of the Hugging Face folder path.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::weights::{pooling_and_id, Weights};
use super::{Arch, DecoderConfig, DecoderEmbedder};
use crate::error::{invalid, io_err, EmbedError, Result};
use crate::tokenize::{self, TextEncoder};
use crate::{LoadOptions, Pooling};

/// GGUF tensors, dequantized on demand, under their Hugging Face names.
struct GgufWeights<'a> {
    ct: &'a gguf_file::Content,
    file: std::fs::File,
    dtype: DType,
    device: Device,
    path: &'a Path,
}

fn gguf_name(hf: &str) -> Option<String> {
    let map = |s: &str| -> Option<&'static str> {
        Some(match s {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        })
    };
    match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight".into()),
        "model.norm.weight" => Some("output_norm.weight".into()),
        "lm_head.weight" => Some("output.weight".into()),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (i, tail) = rest.split_once('.')?;
            Some(format!("blk.{i}.{}", map(tail)?))
        }
    }
}

impl Weights for GgufWeights<'_> {
    fn get(&mut self, name: &str) -> Result<Tensor> {
        let g = gguf_name(name)
            .ok_or_else(|| invalid(self.path, format!("no GGUF name for `{name}`")))?;
        if !self.ct.tensor_infos.contains_key(&g) {
            return Err(invalid(self.path, format!("GGUF file has no tensor `{g}`")));
        }
        let q = self.ct.tensor(&mut self.file, &g, &Device::Cpu)?;
        let t = q.dequantize(&Device::Cpu)?;
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
    fn has(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.ct.tensor_infos.contains_key(&g))
    }
}

/// A GGUF file read up to its tensors.
struct GgufPrepared {
    ct: gguf_file::Content,
    file: std::fs::File,
    cfg: DecoderConfig,
    encoder: TextEncoder,
    pooling: Pooling,
    id: String,
}

impl DecoderEmbedder {
    /// What a GGUF file would embed with (id, width, tokenizer), from its metadata alone.
    pub fn describe_gguf(
        path: &Path,
        opts: &LoadOptions,
        id_base: &str,
    ) -> Result<crate::Description> {
        let g = Self::prepare_gguf(path, opts, id_base)?;
        Ok(crate::Description {
            id: g.id,
            dim: g.cfg.hidden_size,
            encoder: g.encoder,
        })
    }

    /// Loads a decoder from a GGUF file, dequantizing every tensor.
    pub fn load_gguf(path: &Path, opts: &LoadOptions, id_base: &str) -> Result<DecoderEmbedder> {
        let g = Self::prepare_gguf(path, opts, id_base)?;
        let mut w = GgufWeights {
            ct: &g.ct,
            file: g.file,
            dtype: opts.compute_dtype(),
            device: opts.device.clone(),
            path,
        };
        DecoderEmbedder::build(g.cfg, &mut w, g.encoder, g.pooling, opts, g.id)
    }

    /// A GGUF file's metadata read into the config, tokenizer, pooling and id.
    fn prepare_gguf(path: &Path, opts: &LoadOptions, id_base: &str) -> Result<GgufPrepared> {
        let mut file = std::fs::File::open(path).map_err(io_err(path))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| invalid(path, format!("not a valid GGUF file: {e}")))?;
        let s = |k: &str| ct.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
        let arch_name = s("general.architecture").ok_or_else(|| EmbedError::Missing {
            path: path.to_path_buf(),
            what: "GGUF metadata `general.architecture`".into(),
            hint: String::new(),
        })?;
        let arch = match arch_name.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(EmbedError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        let u = |k: &str| -> Result<usize> {
            let key = format!("{arch_name}.{k}");
            let v = ct.metadata.get(&key).ok_or_else(|| EmbedError::Missing {
                path: path.to_path_buf(),
                what: format!("GGUF metadata `{key}`"),
                hint: String::new(),
            })?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|_| invalid(path, format!("GGUF metadata `{key}` is not an integer")))
        };
        let f = |k: &str, d: f64| -> f64 {
            ct.metadata
                .get(&format!("{arch_name}.{k}"))
                .and_then(|v| v.to_f32().ok())
                .map_or(d, |x| x as f64)
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv = u("attention.head_count_kv").unwrap_or(heads);
        let vocab = ct
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| invalid(path, "GGUF file has no tensor `token_embd.weight`"))?;
        let tok = tokenize::from_gguf(&ct, path)?;
        let ctx = u("context_length")?;
        let pad = ct
            .metadata
            .get("tokenizer.ggml.padding_token_id")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(0);
        let cfg = DecoderConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: u("attention.key_length").unwrap_or(hidden / heads.max(1)),
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: f("rope.freq_base", 10_000.0),
            max_position_embeddings: ctx,
            qkv_bias: arch == Arch::Qwen2,
            // llama.cpp permutes Llama's q/k rows for its interleaved RoPE; Qwen2 is not permuted.
            rope_interleaved: arch == Arch::Llama,
            pad_id: pad,
        };
        cfg.check(path)?;
        let max_len = opts.max_len.map_or(ctx, |m| m.min(ctx));
        let encoder = TextEncoder::new(tok, max_len)?;
        let (pooling, id) = pooling_and_id(opts, id_base)?;
        Ok(GgufPrepared {
            ct,
            file,
            cfg,
            encoder,
            pooling,
            id,
        })
    }
}
