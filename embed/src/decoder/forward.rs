//! The decoder's forward pass: the embedding, the transformer blocks (RMS norm, attention
//! with RoPE and grouped-query heads, a SwiGLU MLP) and the final norm. Its own module because
//! both the embedder (padded batches, causal mask) and next-token scoring in [`super::lm`]
//! (packed sequences after a K/V cache) run the same blocks.

use candle_core::{DType, Device, Module, Tensor, D};

use super::{Block, DecoderEmbedder};
use crate::error::Result;

impl DecoderEmbedder {
    pub(super) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
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
