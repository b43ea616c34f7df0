//! Multi-head attention as one fused CPU op with its backward: heads addressed by GEMM
//! strides. Split from [`super`] to keep each op file to one job.
//!
//! One copy is made on purpose: the keys (forward) and the values (backward) transposed,
//! once a layer ([`super::transpose::transpose_cols`]). `Q Kᵀ` and `dO Vᵀ` read a head's keys or values
//! down its columns, and gemm copies such an operand into panels one scalar at a time, a
//! strided gather, for every product: twice per group and head. Read from the transposed
//! copy, the same panels are a contiguous copy (and none at all where the context's length
//! is a multiple of 16). The panels hold the same values, so every sum is bit for bit the
//! same.
//!
//! The forward's scores are computed in a per-thread scratch, where the softmax and `P V`
//! find them in cache, and only then streamed to the kept probabilities
//! ([`super::stream::stream_copy`]): the same values, without reading the kept buffer's
//! lines from memory before overwriting them.

use super::gemm::gemm_strided;
use super::stream::stream_copy;
use super::transpose::transpose_cols;
use super::{fast_exp, lanes_sum, slice, values};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use std::cell::RefCell;

thread_local! {
    /// One head's scores, `[nq, nc]`, for [`Heads::forward`]: reused by every head and
    /// group this thread computes, so it stays in cache (grown to the largest seen).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The attention of one group's query rows over its context rows, as plain slice kernels
/// (the custom op below and the training tape, [`crate::model::tape`], both call them).
/// `q` and the output have rows of `d` values, heads side by side; `kv` rows of `2d`
/// (keys, then values).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Model width.
    pub d: usize,
    /// Heads (divide `d`).
    pub heads: usize,
    /// Score scale, 1/√d_head.
    pub scale: f32,
}

/// `row ← softmax(row · scale + mask)` in three passes, each a plain loop the compiler
/// vectorizes (one indexed loop doing all of it measured 4× slower: it stopped
/// vectorizing): the maximum, the exponentials, the normalization.
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32, mask: &[f32]) {
    // The maximum of the scaled, masked scores, without writing them.
    let mut acc = [f32::NEG_INFINITY; 8];
    let (rc, mc) = (row.chunks_exact(8), mask.chunks_exact(8));
    let mut mx = rc
        .remainder()
        .iter()
        .zip(mc.remainder())
        .fold(f32::NEG_INFINITY, |a, (&v, &m)| a.max(v * scale + m));
    for (c, m) in rc.zip(mc) {
        for i in 0..8 {
            let v = c[i] * scale + m[i];
            acc[i] = if v > acc[i] { v } else { acc[i] };
        }
    }
    mx = acc.iter().fold(mx, |a, &b| if b > a { b } else { a });
    for (v, &m) in row.iter_mut().zip(mask) {
        *v = fast_exp(*v * scale + m - mx);
    }
    let inv = 1.0 / lanes_sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Rows at least this long take the AVX-512 intrinsics of [`super::softmax512`]; shorter
/// ones the portable loops compiled for AVX-512, whose per-row overhead measured lower
/// (BENCHMARKS.md, issue 16). Both are deterministic functions of the row.
const SOFTMAX512_FROM: usize = 96;
/// The same for the softmax's backward.
const SOFTMAX_GRAD512_FROM: usize = 48;

/// [`softmax_row`] of every row (`nc` values) of `block`.
fn softmax_block(block: &mut [f32], nc: usize, scale: f32, mask: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if nc >= SOFTMAX512_FROM && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the kernel checks the mask's length.
        return unsafe { super::softmax512::softmax_rows(block, nc, scale, mask) };
    }
    softmax_block_portable(block, nc, scale, mask)
}

wide_dispatch! {
    /// [`softmax_row`] of every row (`nc` values) of `block`, in portable loops.
    fn softmax_block_portable => softmax_block_rows(block: &mut [f32], nc: usize, scale: f32, mask: &[f32])
}

#[inline(always)]
fn softmax_block_rows(block: &mut [f32], nc: usize, scale: f32, mask: &[f32]) {
    for row in block.chunks_exact_mut(nc) {
        softmax_row(row, scale, mask);
    }
}

/// The softmax's backward over a block of rows: `dS = scale · P ∘ (dP − rowsum(dP ∘ P))`
/// in place of `dP` (`ds`), from the probabilities `p`.
fn softmax_grad_block(ds: &mut [f32], p: &[f32], nc: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if nc >= SOFTMAX_GRAD512_FROM && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { super::softmax512::softmax_grad_rows(ds, p, nc, scale) };
    }
    softmax_grad_portable(ds, p, nc, scale)
}

wide_dispatch! {
    /// [`softmax_grad_block`] in portable loops.
    fn softmax_grad_portable => softmax_grad_rows(ds: &mut [f32], p: &[f32], nc: usize, scale: f32)
}

#[inline(always)]
fn softmax_grad_rows(ds: &mut [f32], p: &[f32], nc: usize, scale: f32) {
    for (dr, pr) in ds.chunks_exact_mut(nc).zip(p.chunks_exact(nc)) {
        let dot = lanes_dot(dr, pr);
        for (x, &pv) in dr.iter_mut().zip(pr) {
            *x = scale * pv * (*x - dot);
        }
    }
}

/// `Σ a_i b_i` over eight lanes (vectorized).
#[inline(always)]
fn lanes_dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let main = n - n % 8;
    let mut acc = [0f32; 8];
    for i in (0..main).step_by(8) {
        for j in 0..8 {
            acc[j] += a[i + j] * b[i + j];
        }
    }
    let rest: f32 = (main..n).map(|i| a[i] * b[i]).sum();
    acc.iter().sum::<f32>() + rest
}

/// Where [`Heads::backward`] puts its gradients: `dq` and `dkv` as (slice, first row),
/// each added to rather than written when its flag is set.
pub struct AttnGrads<'a> {
    /// Query-row gradients and the first row written.
    pub dq: (&'a mut [f32], usize),
    /// Key/value-row gradients (`2d` wide) and the first row written.
    pub dkv: (&'a mut [f32], usize),
    /// Add to `dq` instead of writing it.
    pub acc_q: bool,
    /// Add to `dkv` instead of writing it.
    pub acc_kv: bool,
}

impl Heads {
    /// Attention of query rows `q_row0..q_row0 + nq` over key/value rows
    /// `kv_row0..kv_row0 + nc` with the additive key mask `mask` (`[nc]`): writes the
    /// probabilities `probs` (`[heads, nq, nc]`) and rows `o_row0..o_row0 + nq` of `out`
    /// (the same rows as the queries', except where several groups share their queries).
    /// `kt` is the keys transposed ([`transpose_cols`]) with its row length: `kt.0[c·kt.1 +
    /// r]` is column `c` of the key in `kv`'s row `r`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        q: &[f32],
        kv: &[f32],
        kt: (&[f32], usize),
        out: &mut [f32],
        probs: &mut [f32],
        (q_row0, o_row0, nq): (usize, usize, usize),
        (kv_row0, nc): (usize, usize),
        mask: &[f32],
    ) {
        let d = self.d;
        let dh = d / self.heads;
        SCORES.with_borrow_mut(|s| {
            if s.len() < nq * nc {
                s.resize(nq * nc, 0.0);
            }
            let s = &mut s[..nq * nc];
            for hi in 0..self.heads {
                let p_off = hi * nq * nc;
                let (q_off, k_off) = (q_row0 * d + hi * dh, kv_row0 * 2 * d + hi * dh);
                let o_off = o_row0 * d + hi * dh;
                // S = Q Kᵀ, Kᵀ read from the transposed keys.
                gemm_strided(
                    s,
                    (0, nc),
                    q,
                    (q_off, d, 1),
                    kt.0,
                    (hi * dh * kt.1 + kv_row0, kt.1, 1),
                    (nq, nc, dh),
                    false,
                );
                softmax_block(s, nc, self.scale, mask);
                // O = P V
                gemm_strided(
                    out,
                    (o_off, d),
                    s,
                    (0, nc, 1),
                    kv,
                    (k_off + d, 2 * d, 1),
                    (nq, dh, nc),
                    false,
                );
                // Kept for the backward.
                stream_copy(&mut probs[p_off..p_off + nq * nc], s);
            }
        });
    }

    /// The backward of [`Heads::forward`] from the output gradient `dout` (rows as `out`):
    /// writes (or, when `acc_q`, adds to) `nq` rows of `dq` from row `dq_row0`, and writes
    /// (or, when `acc_kv`, adds to) `nc` rows of `dkv` from row `dkv_row0`. `ds` is scratch
    /// of `nq · nc` values. `vt` is the values transposed, as `kt` is the keys in
    /// [`Heads::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        q: &[f32],
        kv: &[f32],
        vt: (&[f32], usize),
        probs: &[f32],
        dout: &[f32],
        grads: AttnGrads<'_>,
        ds: &mut [f32],
        (q_row0, o_row0, nq): (usize, usize, usize),
        (kv_row0, nc): (usize, usize),
    ) {
        let AttnGrads {
            dq: (dq, dq_row0),
            dkv: (dkv, dkv_row0),
            acc_q,
            acc_kv,
        } = grads;
        let d = self.d;
        let dh = d / self.heads;
        for hi in 0..self.heads {
            let p = &probs[hi * nq * nc..(hi + 1) * nq * nc];
            let (q_off, k_off) = (q_row0 * d + hi * dh, kv_row0 * 2 * d + hi * dh);
            let (dq_off, dk_off) = (dq_row0 * d + hi * dh, dkv_row0 * 2 * d + hi * dh);
            let o_off = o_row0 * d + hi * dh;
            // dP = dO Vᵀ, Vᵀ read from the transposed values.
            gemm_strided(
                ds,
                (0, nc),
                dout,
                (o_off, d, 1),
                vt.0,
                (hi * dh * vt.1 + kv_row0, vt.1, 1),
                (nq, nc, dh),
                false,
            );
            // dS = scale · P ∘ (dP − rowsum(dP ∘ P))
            softmax_grad_block(&mut ds[..nq * nc], p, nc, self.scale);
            // dQ = dS K; dK = dSᵀ Q; dV = Pᵀ dO
            gemm_strided(
                dq,
                (dq_off, d),
                ds,
                (0, nc, 1),
                kv,
                (k_off, 2 * d, 1),
                (nq, dh, nc),
                acc_q,
            );
            gemm_strided(
                dkv,
                (dk_off, 2 * d),
                ds,
                (0, 1, nc),
                q,
                (q_off, d, 1),
                (nc, dh, nq),
                acc_kv,
            );
            gemm_strided(
                dkv,
                (dk_off + d, 2 * d),
                p,
                (0, 1, nc),
                dout,
                (o_off, d, 1),
                (nc, dh, nq),
                acc_kv,
            );
        }
    }
}

/// Multi-head attention of query rows over context keys, in one op with its backward.
/// Inputs: `q` `[G, Nq, d]` and `kv` `[G, Nc, 2d]` (keys then values, as the in-projection
/// lays them out); output `[G, Nq, d]` with heads side by side, like PyTorch's MHA before
/// its out-projection. Heads are addressed by strides; only the keys (forward) and values
/// (backward) are copied, transposed, so that gemm reads them without a strided gather.
/// The attention probabilities are kept for the backward.
pub struct Attention {
    /// Heads (must divide d).
    pub heads: usize,
    /// Score scale, 1/√d_head.
    pub scale: f32,
    /// Additive key mask, `[G * Nc]` (0 or −∞), or `None`.
    pub key_mask: Option<std::sync::Arc<Vec<f32>>>,
    probs: std::sync::Mutex<Option<Vec<f32>>>,
}

impl Attention {
    /// An attention op; see the type's documentation.
    pub fn new(heads: usize, scale: f32, key_mask: Option<std::sync::Arc<Vec<f32>>>) -> Self {
        Attention {
            heads,
            scale,
            key_mask,
            probs: std::sync::Mutex::new(None),
        }
    }

    fn dims(&self, q: &[usize], kv: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
        let (&[g, nq, d], &[g2, nc, d2]) = (q, kv) else {
            candle_core::bail!(
                "attention expects q [G,Nq,d] and kv [G,Nc,2d], got {q:?} and {kv:?}"
            );
        };
        if g != g2 || d2 != 2 * d || self.heads == 0 || d % self.heads != 0 {
            candle_core::bail!(
                "attention shapes {q:?} / {kv:?} do not fit {} heads",
                self.heads
            );
        }
        Ok((g, nq, nc, d, d / self.heads))
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "gpo-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, kv) = (slice(s1, l1)?, slice(s2, l2)?);
        let (g, nq, nc, d, _) = self.dims(l1.shape().dims(), l2.shape().dims())?;
        let h = self.heads;
        let mut probs = vec![0f32; g * h * nq * nc];
        let mut out = vec![0f32; g * nq * d];
        let zeros = vec![0f32; nc];
        let mut kt = vec![0f32; d * g * nc];
        transpose_cols(&mut kt, kv, (g * nc, 2 * d), (0, d));
        for (gi, p) in probs.chunks_exact_mut(h * nq * nc).enumerate() {
            let mask: &[f32] = match &self.key_mask {
                Some(m) => &m[gi * nc..(gi + 1) * nc],
                None => &zeros,
            };
            let heads = Heads {
                d,
                heads: h,
                scale: self.scale,
            };
            heads.forward(
                q,
                kv,
                (&kt, g * nc),
                &mut out,
                p,
                (gi * nq, gi * nq, nq),
                (gi * nc, nc),
                mask,
            );
        }
        *self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention cache poisoned".into()))? = Some(probs);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, nq, nc, d, _) = self.dims(q.dims(), kv.dims())?;
        let h = self.heads;
        let guard = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention cache poisoned".into()))?;
        let probs = guard.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("attention backward before its forward".into())
        })?;
        let (qv, kvv, dout) = (values(q)?, values(kv)?, values(grad)?);
        let mut dq = vec![0f32; g * nq * d];
        let mut dkv = vec![0f32; g * nc * 2 * d];
        let mut ds = vec![0f32; nq * nc];
        let mut vt = vec![0f32; d * g * nc];
        transpose_cols(&mut vt, &kvv, (g * nc, 2 * d), (d, d));
        let heads = Heads {
            d,
            heads: h,
            scale: self.scale,
        };
        for (gi, p) in probs.chunks_exact(h * nq * nc).enumerate() {
            let grads = AttnGrads {
                dq: (&mut dq[..], gi * nq),
                dkv: (&mut dkv[..], gi * nc),
                acc_q: false,
                acc_kv: false,
            };
            heads.backward(
                &qv,
                &kvv,
                (&vt, g * nc),
                p,
                &dout,
                grads,
                &mut ds,
                (gi * nq, gi * nq, nq),
                (gi * nc, nc),
            );
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dkv, kv.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::transpose::tests::values;
    use super::{gemm_strided, transpose_cols};

    /// `Q Kᵀ` with `Kᵀ` read from the transposed keys equals, bit for bit, the product read
    /// down the keys' columns in place, whether or not the context's length is a multiple
    /// of gemm's 16 lanes (gemm then copies no panel at all), and so does `dO Vᵀ`.
    #[test]
    fn scores_from_the_transposed_keys_keep_their_bits() {
        let (d, dh) = (128, 32);
        for (nq, nc, row0) in [(37, 16, 0), (290, 158, 5), (64, 48, 3), (158, 158, 0)] {
            let c = row0 + nc + 2;
            let q = values(nq * d, 1);
            let kv = values(c * 2 * d, 2);
            for half in [0, d] {
                let mut kt = vec![0f32; d * c];
                transpose_cols(&mut kt, &kv, (c, 2 * d), (half, d));
                for hi in [0, 3] {
                    let (mut a, mut b) = (vec![0f32; nq * nc], vec![0f32; nq * nc]);
                    let k_off = row0 * 2 * d + half + hi * dh;
                    let q_part = (hi * dh, d, 1);
                    gemm_strided(
                        &mut a,
                        (0, nc),
                        &q,
                        q_part,
                        &kv,
                        (k_off, 1, 2 * d),
                        (nq, nc, dh),
                        false,
                    );
                    let t_part = (hi * dh * c + row0, c, 1);
                    gemm_strided(
                        &mut b,
                        (0, nc),
                        &q,
                        q_part,
                        &kt,
                        t_part,
                        (nq, nc, dh),
                        false,
                    );
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "nq {nq}, nc {nc}, head {hi}, {}",
                        if half == 0 { "keys" } else { "values" }
                    );
                }
            }
        }
    }
}
