//! What the Hugging Face and GGUF loaders share: the [`Weights`] source of tensors by
//! Hugging Face name, and the assembly of a [`DecoderEmbedder`] from one (shape-checked
//! blocks with fused q/k/v and gate/up projections, the tied or untied output matrix, the RoPE
//! tables). Its own module so each loader only reads its format and hands over the tensors.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear};

use super::{Block, DecoderConfig, DecoderEmbedder};
use crate::error::{EmbedError, Result};
use crate::tokenize::TextEncoder;
use crate::{LoadOptions, Pooling};

/// Where the weights come from: tensors by Hugging Face name.
pub(super) trait Weights {
    fn get(&mut self, name: &str) -> Result<Tensor>;
    fn has(&self, name: &str) -> bool;
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

impl DecoderEmbedder {
    pub(super) fn build(
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
}

/// The decoder's pooling (mean unless `opts` says otherwise; `cls` does not apply to a
/// decoder) and its embedder id: `id_base`, the pooling and the compute dtype.
pub(super) fn pooling_and_id(opts: &LoadOptions, id_base: &str) -> Result<(Pooling, String)> {
    let pooling = opts.pooling.unwrap_or(Pooling::Mean);
    if pooling == Pooling::Cls {
        return Err(EmbedError::Unsupported(
            "cls pooling does not apply to decoders (use mean or last)".into(),
        ));
    }
    let id = format!(
        "{id_base}|{}|{}",
        pooling.name(),
        opts.compute_dtype().as_str()
    );
    Ok((pooling, id))
}
