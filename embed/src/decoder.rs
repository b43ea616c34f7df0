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

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{invalid, io_err, EmbedError, Result};
use crate::tokenize::{self, TextEncoder};
use crate::{pad_batch, pool, Embedder, LoadOptions, Pooling};

pub mod lm;

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

    fn check(&self, path: &Path) -> Result<()> {
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

/// Where the weights come from: tensors by Hugging Face name.
trait Weights {
    fn get(&mut self, name: &str) -> Result<Tensor>;
    fn has(&self, name: &str) -> bool;
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

fn rope_tables(
    cfg: &DecoderConfig,
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let f = pos.broadcast_mul(&inv)?;
    Ok((f.cos()?.to_dtype(dtype)?, f.sin()?.to_dtype(dtype)?))
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
    fn build(
        cfg: DecoderConfig,
        w: &mut dyn Weights,
        encoder: TextEncoder,
        pooling: Pooling,
        opts: &LoadOptions,
        id: String,
    ) -> Result<DecoderEmbedder> {
        let (dtype, device, want_head) = (opts.compute_dtype(), &opts.device, opts.lm_head);
        let h = cfg.hidden_size;
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let shape = |t: Tensor, want: &[usize], name: &str| -> Result<Tensor> {
            if t.dims() != want {
                return Err(EmbedError::Unsupported(format!(
                    "tensor `{name}` has shape {:?}, config says {want:?}: weights and config do not match",
                    t.dims()
                )));
            }
            Ok(t)
        };
        let get = |w: &mut dyn Weights, name: &str, want: &[usize]| -> Result<Tensor> {
            shape(w.get(name)?, want, name)
        };
        let embed_w = get(w, "model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let q = get(w, &format!("{p}.self_attn.q_proj.weight"), &[qd, h])?;
            let k = get(w, &format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?;
            let v = get(w, &format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?;
            let bias = if cfg.qkv_bias {
                let qb = get(w, &format!("{p}.self_attn.q_proj.bias"), &[qd])?;
                let kb = get(w, &format!("{p}.self_attn.k_proj.bias"), &[kvd])?;
                let vb = get(w, &format!("{p}.self_attn.v_proj.bias"), &[kvd])?;
                Some(Tensor::cat(&[qb, kb, vb], 0)?)
            } else {
                None
            };
            let gate = get(
                w,
                &format!("{p}.mlp.gate_proj.weight"),
                &[cfg.intermediate_size, h],
            )?;
            let up = get(
                w,
                &format!("{p}.mlp.up_proj.weight"),
                &[cfg.intermediate_size, h],
            )?;
            blocks.push(Block {
                attn_norm: get(w, &format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: Linear::new(Tensor::cat(&[q, k, v], 0)?, bias),
                o: Linear::new(
                    get(w, &format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                    None,
                ),
                mlp_norm: get(w, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: Linear::new(Tensor::cat(&[gate, up], 0)?, None),
                down: Linear::new(
                    get(
                        w,
                        &format!("{p}.mlp.down_proj.weight"),
                        &[h, cfg.intermediate_size],
                    )?,
                    None,
                ),
            });
        }
        let norm = get(w, "model.norm.weight", &[h])?;
        // Tied models (SmolLM2, Qwen2-0.5B) have no output matrix and reuse the embeddings.
        let lm_head = if w.has("lm_head.weight") {
            want_head
                .then(|| get(w, "lm_head.weight", &[cfg.vocab_size, h]))
                .transpose()?
        } else {
            Some(embed_w.clone())
        };
        let (cos, sin) = rope_tables(&cfg, encoder.max_len(), dtype, device)?;
        Ok(DecoderEmbedder {
            id,
            embed: Embedding::new(embed_w, h),
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            pooling,
            dtype,
            device: device.clone(),
            encoder,
            cfg,
        })
    }

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
        let tok = tokenize::from_file(&dir.join("tokenizer.json"))?;
        let tv = tok.get_vocab_size(true);
        if tv > cfg.vocab_size {
            return Err(invalid(
                dir.join("tokenizer.json"),
                format!(
                    "tokenizer has {tv} tokens but config.json says vocab_size {}: \
                     tokenizer and model do not match",
                    cfg.vocab_size
                ),
            ));
        }
        let max_len = opts.max_len.map_or(cfg.max_position_embeddings, |m| {
            m.min(cfg.max_position_embeddings)
        });
        let encoder = TextEncoder::new(tok, max_len)?;
        let pooling = opts.pooling.unwrap_or(Pooling::Mean);
        check_pooling(pooling)?;
        let id = format!(
            "{id_base}|{}|{}",
            pooling.name(),
            opts.compute_dtype().as_str()
        );
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
        let pooling = opts.pooling.unwrap_or(Pooling::Mean);
        check_pooling(pooling)?;
        let id = format!(
            "{id_base}|{}|{}",
            pooling.name(),
            opts.compute_dtype().as_str()
        );
        Ok(GgufPrepared {
            ct,
            file,
            cfg,
            encoder,
            pooling,
            id,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mask = attention_mask(t, 0, |i, j| j <= i, &self.device)?;
        let mut x = self.embed.forward(ids)?;
        for blk in &self.blocks {
            x = self.block(blk, x, &cos, &sin, &mask, None)?.0;
        }
        Ok(candle_nn::ops::rms_norm(
            &x,
            &self.norm,
            self.cfg.rms_norm_eps as f32,
        )?)
    }

    /// One decoder block over `x` `[b, t, h]`. `cos`/`sin` are the RoPE rows of the new
    /// tokens' positions `[t, head_dim / 2]`; `mask` `[t, p + t]` is 0 where a new token may
    /// attend and -inf elsewhere, over `p` cached keys `past` (`[b, kv_heads, p, head_dim]`,
    /// rotated) then the new ones. Returns the block's output and its own rotated K/V.
    pub(crate) fn block(
        &self,
        blk: &Block,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, _) = x.dims3()?;
        let c = &self.cfg;
        let (nh, nkv, dh) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let rep = nh / nkv;
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0 / (dh as f64).sqrt();
        let hn = candle_nn::ops::rms_norm(&x, &blk.attn_norm, eps)?;
        let qkv = blk.qkv.forward(&hn)?;
        let q = qkv.narrow(D::Minus1, 0, nh * dh)?;
        let k = qkv.narrow(D::Minus1, nh * dh, nkv * dh)?;
        let v = qkv.narrow(D::Minus1, (nh + nkv) * dh, nkv * dh)?;
        let q = q.reshape((b, t, nh, dh))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, dh))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, dh))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = if c.rope_interleaved {
            (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        let (k_all, v_all) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k.clone(), v.clone()),
        };
        let kt = k_all.dim(2)?;
        // Grouped-query attention without copying K/V: query head i uses kv head i / rep,
        // so [b, nh, t, dh] viewed as [b, nkv, rep·t, dh] lines up with [b, nkv, kt, dh].
        let q = (q * scale)?.reshape((b, nkv, rep * t, dh))?;
        let scores = q
            .matmul(&k_all.t()?)?
            .reshape((b, nh, t, kt))?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?;
        let probs = crate::fast::softmax_last_dim(&scores)?
            .to_dtype(self.dtype)?
            .reshape((b, nkv, rep * t, kt))?;
        let ctx = probs
            .matmul(&v_all)?
            .reshape((b, nh, t, dh))?
            .transpose(1, 2)?
            .reshape((b, t, nh * dh))?;
        let x = (x + blk.o.forward(&ctx)?)?;
        let hn = candle_nn::ops::rms_norm(&x, &blk.mlp_norm, eps)?;
        let gu = blk.gate_up.forward(&hn)?;
        let inter = c.intermediate_size;
        let g = gu.narrow(D::Minus1, 0, inter)?;
        let u = gu.narrow(D::Minus1, inter, inter)?;
        let m = (candle_nn::ops::silu(&g)? * u)?;
        let x = (x + blk.down.forward(&m)?)?;
        Ok((x, (k, v)))
    }
}

/// An additive attention mask `[t, p + t]` in f32: 0 where new token `i` may see key `j`
/// (`p` cached keys, then the `t` new ones), -inf elsewhere. Cached keys are always visible.
pub(crate) fn attention_mask(
    t: usize,
    p: usize,
    visible: impl Fn(usize, usize) -> bool,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; t * (p + t)];
    for i in 0..t {
        for j in 0..t {
            if !visible(i, j) {
                m[i * (p + t) + p + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, p + t), device)?)
}

fn check_pooling(p: Pooling) -> Result<()> {
    if p == Pooling::Cls {
        return Err(EmbedError::Unsupported(
            "cls pooling does not apply to decoders (use mean or last)".into(),
        ));
    }
    Ok(())
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
