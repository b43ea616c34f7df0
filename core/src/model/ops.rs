//! Fused CPU ops for training, each with its own backward.
//!
//! candle-nn 0.11's fused `layer_norm` and `softmax_last_dim` have no backward (gradients
//! silently go missing), and the composite versions cost many allocations per step. These
//! custom ops do one pass forward and one pass backward and register with candle's autograd
//! through `CustomOp*::bwd`. Each has a composite twin in [`super::composite`]; tests check
//! that both paths agree on values and gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Borrows a contiguous f32 slice of a CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op expects a contiguous input, got {:?}", l.shape()),
    }
}

/// Copies a tensor's values out as a contiguous f32 vector.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `C (m×n) = A (m×k) · B (k×n)` on contiguous row-major slices, with each operand
/// optionally transposed (`ta`: A is stored k×m; `tb`: B is stored n×k). Accumulates into C
/// when `accumulate`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    c: &mut [f32],
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let a_strides = if ta { (0, 1, m) } else { (0, k, 1) };
    let b_strides = if tb { (0, 1, k) } else { (0, n, 1) };
    gemm_strided(c, (0, n), a, a_strides, b, b_strides, (m, n, k), accumulate);
}

/// A linear layer `y = x Wᵀ + b`, optionally followed by ReLU, as one op with its backward:
/// one GEMM forward, two backward, and the bias and ReLU folded into the same passes.
/// `x` is `[M, K]`, `W` is `[N, K]` (PyTorch's layout), `b` is `[N]`.
pub struct Linear {
    /// Apply ReLU to the output.
    pub relu: bool,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "gpo-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (m, k) = l1.shape().dims2()?;
        let n = l2.shape().dims2()?.0;
        let mut y = vec![0f32; m * n];
        for row in y.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
        matmul(&mut y, x, false, w, true, m, n, k, true);
        if self.relu {
            for v in &mut y {
                *v = v.max(0.0);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let n = w.dims2()?.0;
        let mut g = values(grad)?;
        if self.relu {
            for (gv, y) in g.iter_mut().zip(values(res)?) {
                if y <= 0.0 {
                    *gv = 0.0;
                }
            }
        }
        let dev = x.device();
        let dx = if x.track_op() {
            let mut dx = vec![0f32; m * k];
            matmul(&mut dx, &g, false, &values(w)?, false, m, k, n, false);
            Some(Tensor::from_vec(dx, (m, k), dev)?)
        } else {
            None
        };
        let mut dw = vec![0f32; n * k];
        matmul(&mut dw, &g, true, &values(x)?, false, n, k, m, false);
        let mut db = vec![0f32; n];
        for row in g.chunks_exact(n) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        Ok((
            dx,
            Some(Tensor::from_vec(dw, (n, k), dev)?),
            Some(Tensor::from_vec(db, n, b.device())?),
        ))
    }
}

/// Layer normalization over the last dimension: `(x − μ)/√(σ² + ε) · γ + β`.
pub struct LayerNorm {
    /// ε added to the variance (PyTorch's default is 1e-5).
    pub eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "gpo-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let d = g.len();
        let mut out = vec![0f32; x.len()];
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let (mu, rstd) = moments(xr, self.eps);
            for i in 0..d {
                or[i] = (xr[i] - mu) * rstd * g[i] + b[i];
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xv, gv, dy) = (values(x)?, values(gamma)?, values(grad)?);
        let d = gv.len();
        let mut dx = vec![0f32; xv.len()];
        let mut dg = vec![0f32; d];
        let mut db = vec![0f32; d];
        let inv_d = 1.0 / d as f32;
        for ((xr, dyr), dxr) in xv
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let (mu, rstd) = moments(xr, self.eps);
            // xhat = (x − μ)·rstd; dxhat = dy·γ;
            // dx = rstd · (dxhat − mean(dxhat) − xhat·mean(dxhat·xhat))
            let (mut s1, mut s2) = (0f32, 0f32);
            for i in 0..d {
                let xh = (xr[i] - mu) * rstd;
                let dxh = dyr[i] * gv[i];
                s1 += dxh;
                s2 += dxh * xh;
                dg[i] += dyr[i] * xh;
                db[i] += dyr[i];
            }
            let (m1, m2) = (s1 * inv_d, s2 * inv_d);
            for i in 0..d {
                let xh = (xr[i] - mu) * rstd;
                dxr[i] = rstd * (dyr[i] * gv[i] - m1 - xh * m2);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, gamma.shape(), dev)?),
            Some(Tensor::from_vec(db, gamma.shape(), dev)?),
        ))
    }
}

/// e^x for x ≤ 0 (softmax inputs after max subtraction), accurate to a few ulp, in a
/// branch-free form the compiler vectorizes (libm's `expf` is a scalar call and was the
/// attention softmax's main cost). Returns 0 below −87 (and for −∞ from padding masks).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.max(-87.0);
    // Round to nearest with the 1.5·2^23 trick (no libm call, vectorizes).
    const ROUND: f32 = 12_582_912.0;
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    // exp(r) on |r| ≤ ln2/2: degree-6 Taylor/Horner (relative error < 2e-7).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^k from the bits of k + 127 + 2^23 (an exact integer in the mantissa): no
    // float-to-int conversion, so the loop vectorizes. k + 127 ∈ [0, 255] here.
    let scale = f32::from_bits(((k + 8_388_735.0).to_bits() & 0xFF) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Sum with eight independent accumulators (vectorizes; plain `sum` is sequential).
#[inline(always)]
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum with eight independent lanes.
#[inline(always)]
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(rest, |a, &b| if b > a { b } else { a })
}

/// Mean and 1/√(var + ε) of one row (biased variance, as PyTorch).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mu = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d;
    (mu, 1.0 / (var + eps).sqrt())
}

/// A strided single-threaded GEMM: `C (m×n) [+]= A (m×k) · B (k×n)`, each operand given by
/// a base offset into its slice and row/column strides. Bounds are checked up front.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    c: &mut [f32],
    (c_off, c_rs): (usize, usize),
    a: &[f32],
    (a_off, a_rs, a_cs): (usize, usize, usize),
    b: &[f32],
    (b_off, b_rs, b_cs): (usize, usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |off: usize, rows: usize, rs: usize, cols: usize, cs: usize| {
        off + rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs
    };
    assert!(
        last(c_off, m, c_rs, n, 1) < c.len(),
        "gemm: C out of bounds"
    );
    if k > 0 {
        assert!(
            last(a_off, m, a_rs, k, a_cs) < a.len(),
            "gemm: A out of bounds"
        );
        assert!(
            last(b_off, k, b_rs, n, b_cs) < b.len(),
            "gemm: B out of bounds"
        );
    }
    // SAFETY: the assertions bound every element gemm touches through these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(c_off),
            1,
            c_rs as isize,
            accumulate,
            a.as_ptr().add(a_off),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr().add(b_off),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Multi-head attention of query rows over context keys, in one op with its backward.
/// Inputs: `q` `[G, Nq, d]` and `kv` `[G, Nc, 2d]` (keys then values, as the in-projection
/// lays them out); output `[G, Nq, d]` with heads side by side, like PyTorch's MHA before
/// its out-projection. Heads are addressed by strides, so nothing is transposed or copied.
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
        let (g, nq, nc, d, dh) = self.dims(l1.shape().dims(), l2.shape().dims())?;
        let h = self.heads;
        let mut probs = vec![0f32; g * h * nq * nc];
        let mut out = vec![0f32; g * nq * d];
        let zeros = vec![0f32; nc];
        for gi in 0..g {
            let mask: &[f32] = match &self.key_mask {
                Some(m) => &m[gi * nc..(gi + 1) * nc],
                None => &zeros,
            };
            for hi in 0..h {
                let p_off = (gi * h + hi) * nq * nc;
                let (q_off, k_off) = (gi * nq * d + hi * dh, gi * nc * 2 * d + hi * dh);
                // S = Q Kᵀ
                gemm_strided(
                    &mut probs,
                    (p_off, nc),
                    q,
                    (q_off, d, 1),
                    kv,
                    (k_off, 1, 2 * d),
                    (nq, nc, dh),
                    false,
                );
                for row in probs[p_off..p_off + nq * nc].chunks_exact_mut(nc) {
                    for (v, &m) in row.iter_mut().zip(mask) {
                        *v = *v * self.scale + m;
                    }
                    let mx = lanes_max(row);
                    for v in row.iter_mut() {
                        *v = fast_exp(*v - mx);
                    }
                    let inv = 1.0 / lanes_sum(row);
                    for v in row.iter_mut() {
                        *v *= inv;
                    }
                }
                // O = P V
                gemm_strided(
                    &mut out,
                    (q_off, d),
                    &probs,
                    (p_off, nc, 1),
                    kv,
                    (k_off + d, 2 * d, 1),
                    (nq, dh, nc),
                    false,
                );
            }
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
        let (g, nq, nc, d, dh) = self.dims(q.dims(), kv.dims())?;
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
        for gi in 0..g {
            for hi in 0..h {
                let p_off = (gi * h + hi) * nq * nc;
                let p = &probs[p_off..p_off + nq * nc];
                let (q_off, k_off) = (gi * nq * d + hi * dh, gi * nc * 2 * d + hi * dh);
                // dP = dO Vᵀ
                gemm_strided(
                    &mut ds,
                    (0, nc),
                    &dout,
                    (q_off, d, 1),
                    &kvv,
                    (k_off + d, 1, 2 * d),
                    (nq, nc, dh),
                    false,
                );
                // dS = scale · P ∘ (dP − rowsum(dP ∘ P))
                for (dr, pr) in ds.chunks_exact_mut(nc).zip(p.chunks_exact(nc)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = self.scale * pv * (*x - dot);
                    }
                }
                // dQ = dS K; dK = dSᵀ Q; dV = Pᵀ dO
                gemm_strided(
                    &mut dq,
                    (q_off, d),
                    &ds,
                    (0, nc, 1),
                    &kvv,
                    (k_off, 2 * d, 1),
                    (nq, dh, nc),
                    false,
                );
                gemm_strided(
                    &mut dkv,
                    (k_off, 2 * d),
                    &ds,
                    (0, 1, nc),
                    &qv,
                    (q_off, d, 1),
                    (nc, dh, nq),
                    false,
                );
                gemm_strided(
                    &mut dkv,
                    (k_off + d, 2 * d),
                    p,
                    (0, 1, nc),
                    &dout,
                    (q_off, d, 1),
                    (nc, dh, nq),
                    false,
                );
            }
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dkv, kv.shape(), dev)?),
        ))
    }
}

/// GPO's loss head in one op: per-question softmax of the predicted means, then the
/// Gaussian negative log-likelihood of the true option probabilities, summed over real
/// target points and averaged over groups. Input: the predictor output `[G, Nt, 2]`
/// (mean, raw std with σ = exp(raw)). Output: the scalar loss.
pub struct SegmentNll {
    /// True option probabilities, `[G * Nt]`.
    pub y: std::sync::Arc<Vec<f32>>,
    /// Question segments per group: `(start, len)` over target points; padding is in none.
    pub segments: std::sync::Arc<Vec<Vec<(usize, usize)>>>,
    /// What the summed NLL is divided by: G × Nt_max for the official mean over groups and
    /// padded target slots (a shard passes its whole step's G × Nt_max).
    pub denom: f64,
}

const HALF_LN_2PI: f32 = 0.918_938_5;

impl SegmentNll {
    /// Softmaxed means for every target point (0 on padding).
    fn probs(&self, out: &[f32], nt: usize) -> Vec<f32> {
        let mut p = vec![0f32; out.len() / 2];
        for (g, segs) in self.segments.iter().enumerate() {
            for &(s, n) in segs {
                let base = g * nt + s;
                let mx = (0..n)
                    .map(|i| out[2 * (base + i)])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for i in 0..n {
                    let e = (out[2 * (base + i)] - mx).exp();
                    p[base + i] = e;
                    sum += e;
                }
                for i in 0..n {
                    p[base + i] /= sum;
                }
            }
        }
        p
    }
}

impl CustomOp1 for SegmentNll {
    fn name(&self) -> &'static str {
        "gpo-segment-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = slice(s, l)?;
        let nt = l.shape().dims()[1];
        let p = self.probs(out, nt);
        let mut total = 0f64;
        for (g, segs) in self.segments.iter().enumerate() {
            for &(s, n) in segs {
                for i in g * nt + s..g * nt + s + n {
                    let raw = out[2 * i + 1];
                    let z = (self.y[i] - p[i]) * (-raw).exp();
                    total += (0.5 * z * z + raw + HALF_LN_2PI) as f64;
                }
            }
        }
        let loss = (total / self.denom) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = values(arg)?;
        let scale = (grad.to_scalar::<f32>()? as f64 / self.denom) as f32;
        let nt = arg.dims()[1];
        let p = self.probs(&out, nt);
        let mut d = vec![0f32; out.len()];
        for (g, segs) in self.segments.iter().enumerate() {
            for &(s, n) in segs {
                let range = g * nt + s..g * nt + s + n;
                // dL/dp_i = (p_i − y_i)/σ_i²; dL/draw_i = 1 − z_i²
                let mut dot = 0f32;
                for i in range.clone() {
                    let raw = out[2 * i + 1];
                    let inv_var = (-2.0 * raw).exp();
                    let dp = (p[i] - self.y[i]) * inv_var;
                    d[2 * i] = dp;
                    dot += dp * p[i];
                    let z2 = (self.y[i] - p[i]) * (self.y[i] - p[i]) * inv_var;
                    d[2 * i + 1] = scale * (1.0 - z2);
                }
                // Softmax Jacobian: dL/dm_i = p_i (dL/dp_i − Σ_j p_j dL/dp_j)
                for i in range {
                    d[2 * i] = scale * p[i] * (d[2 * i] - dot);
                }
            }
        }
        Ok(Some(Tensor::from_vec(d, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_matches_libm_on_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (a, b) = (fast_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
    }
}
