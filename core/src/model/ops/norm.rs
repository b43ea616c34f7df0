//! LayerNorm: the fused candle op ([`LayerNorm`]) and the row functions the tape calls,
//! AVX-512 intrinsics ([`super::norm512`]) where they apply and portable loops elsewhere.
//!
//! Why a file of its own: the tape keeps what a LayerNorm's forward computed on the way
//! (each row's `x̂` and `1/σ`, [`NormSource::Kept`]) instead of the pre-norm sums and the
//! output, so that a step holds one activation fewer per layer; the forward, its output
//! again from a kept `x̂`, and a backward from either source live together here, with the
//! test that the two sources give the same bits.

use super::{lanes_sum, norm512, slice, values};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

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
        let mut out = vec![0f32; x.len()];
        layer_norm_forward(&mut out, x, g, b, self.eps, None);
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
        let src = NormSource::Input(&xv);
        layer_norm_backward(&mut dx, (&mut dg, &mut db), src, &gv, &dy, self.eps);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, gamma.shape(), dev)?),
            Some(Tensor::from_vec(db, gamma.shape(), dev)?),
        ))
    }
}

/// Whether rows of `d` values take the AVX-512 intrinsics of [`norm512`].
fn norm512_applies(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d > 0 && d.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// What a LayerNorm's backward reads of its forward: the input `x` (whose moments it then
/// computes again), or each row's normalized values `x̂` and `1/σ` as the forward kept
/// them. The two give the same bits; the kept form spares a step's tape the pre-norm rows.
#[derive(Clone, Copy)]
pub(crate) enum NormSource<'a> {
    Input(&'a [f32]),
    Kept { xhat: &'a [f32], rstd: &'a [f32] },
}

/// Layer normalization of each row of `x` (rows of `γ`'s length) into `out`, keeping each
/// row's `x̂` and `1/σ` in `keep` if given ([`NormSource::Kept`]): AVX-512 intrinsics
/// ([`norm512`]) where they apply, else portable loops.
pub(crate) fn layer_norm_forward(
    out: &mut [f32],
    x: &[f32],
    g: &[f32],
    b: &[f32],
    eps: f32,
    keep: Option<(&mut [f32], &mut [f32])>,
) {
    #[cfg(target_arch = "x86_64")]
    if norm512_applies(g.len()) {
        // SAFETY: the CPU has AVX-512F; the kernel checks the row width.
        return unsafe { norm512::layer_norm_forward_rows(out, x, g, b, eps, keep) };
    }
    layer_norm_forward_portable(out, x, g, b, eps, keep)
}

/// `out = x̂·γ + β` from a kept `x̂`: bit for bit the output of the [`layer_norm_forward`]
/// that kept it.
pub(crate) fn layer_norm_affine(out: &mut [f32], xhat: &[f32], g: &[f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if norm512_applies(g.len()) {
        // SAFETY: the CPU has AVX-512F; the kernel checks the row width.
        return unsafe { norm512::layer_norm_affine_rows(out, xhat, g, b) };
    }
    let d = g.len();
    for (xr, or) in xhat.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        for i in 0..d {
            or[i] = xr[i] * g[i] + b[i];
        }
    }
}

/// Layer normalization's backward from its input or what its forward kept (`src`) and
/// its output gradient `dy`: writes `dx`, and adds to `(dγ, dβ)`; AVX-512 intrinsics
/// ([`norm512`]) where they apply, else portable loops.
pub(crate) fn layer_norm_backward(
    dx: &mut [f32],
    dgb: (&mut [f32], &mut [f32]),
    src: NormSource,
    gv: &[f32],
    dy: &[f32],
    eps: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if norm512_applies(gv.len()) {
        // SAFETY: the CPU has AVX-512F; the kernel checks the row width.
        return unsafe { norm512::layer_norm_backward_rows(dx, dgb, src, gv, dy, eps) };
    }
    layer_norm_backward_portable(dx, dgb, src, gv, dy, eps)
}

wide_dispatch! {
    /// [`layer_norm_forward`] in portable loops.
    fn layer_norm_forward_portable => layer_norm_forward_rows(
        out: &mut [f32],
        x: &[f32],
        g: &[f32],
        b: &[f32],
        eps: f32,
        keep: Option<(&mut [f32], &mut [f32])>,
    )
}

wide_dispatch! {
    /// [`layer_norm_backward`] in portable loops.
    fn layer_norm_backward_portable => layer_norm_backward_rows(
        dx: &mut [f32],
        dgb: (&mut [f32], &mut [f32]),
        src: NormSource,
        gv: &[f32],
        dy: &[f32],
        eps: f32,
    )
}

#[inline(always)]
fn layer_norm_forward_rows(
    out: &mut [f32],
    x: &[f32],
    g: &[f32],
    b: &[f32],
    eps: f32,
    mut keep: Option<(&mut [f32], &mut [f32])>,
) {
    let d = g.len();
    for (r, (xr, or)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let (mu, rstd) = moments(xr, eps);
        for i in 0..d {
            let xh = (xr[i] - mu) * rstd;
            if let Some((kx, _)) = &mut keep {
                kx[r * d + i] = xh;
            }
            or[i] = xh * g[i] + b[i];
        }
        if let Some((_, ks)) = &mut keep {
            ks[r] = rstd;
        }
    }
}

#[inline(always)]
fn layer_norm_backward_rows(
    dx: &mut [f32],
    (dg, db): (&mut [f32], &mut [f32]),
    src: NormSource,
    gv: &[f32],
    dy: &[f32],
    eps: f32,
) {
    let d = gv.len();
    let inv_d = 1.0 / d as f32;
    for (r, (dyr, dxr)) in dy.chunks_exact(d).zip(dx.chunks_exact_mut(d)).enumerate() {
        let row = (dyr, gv, dxr);
        match src {
            NormSource::Input(x) => {
                let xr = &x[r * d..(r + 1) * d];
                let (mu, rstd) = moments(xr, eps);
                backward_row(
                    inv_d,
                    rstd,
                    |i| (xr[i] - mu) * rstd,
                    row,
                    (&mut *dg, &mut *db),
                );
            }
            NormSource::Kept { xhat, rstd } => {
                let xr = &xhat[r * d..(r + 1) * d];
                backward_row(inv_d, rstd[r], |i| xr[i], row, (&mut *dg, &mut *db));
            }
        }
    }
}

/// One row of [`layer_norm_backward_rows`], given its `x̂` and `1/σ`.
#[inline(always)]
fn backward_row(
    inv_d: f32,
    rstd: f32,
    xhat: impl Fn(usize) -> f32,
    (dyr, gv, dxr): (&[f32], &[f32], &mut [f32]),
    (dg, db): (&mut [f32], &mut [f32]),
) {
    let d = gv.len();
    let main = d - d % 8;
    // xhat = (x − μ)·rstd; dxhat = dy·γ;
    // dx = rstd · (dxhat − mean(dxhat) − xhat·mean(dxhat·xhat)).
    // The two sums run over eight lanes (vectorized); γ's and β's gradients likewise.
    let (mut a1, mut a2) = ([0f32; 8], [0f32; 8]);
    for i in (0..main).step_by(8) {
        for j in 0..8 {
            let xh = xhat(i + j);
            let dxh = dyr[i + j] * gv[i + j];
            a1[j] += dxh;
            a2[j] += dxh * xh;
            dg[i + j] += dyr[i + j] * xh;
            db[i + j] += dyr[i + j];
        }
    }
    for i in main..d {
        let xh = xhat(i);
        let dxh = dyr[i] * gv[i];
        a1[i - main] += dxh;
        a2[i - main] += dxh * xh;
        dg[i] += dyr[i] * xh;
        db[i] += dyr[i];
    }
    let (s1, s2): (f32, f32) = (a1.iter().sum(), a2.iter().sum());
    let (m1, m2) = (s1 * inv_d, s2 * inv_d);
    for i in 0..d {
        dxr[i] = rstd * (dyr[i] * gv[i] - m1 - xhat(i) * m2);
    }
}

/// Mean and 1/√(var + ε) of one row (biased variance, as PyTorch), each sum over eight
/// independent lanes so that it vectorizes.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mu = lanes_sum(x) / d;
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|v| (v - mu) * (v - mu)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += (c[i] - mu) * (c[i] - mu);
        }
    }
    let var = (acc.iter().sum::<f32>() + rest) / d;
    (mu, 1.0 / (var + eps).sqrt())
}

/// Inputs, output gradients, γ and β for `rows` rows of `d` values: the LayerNorm tests'
/// data.
#[cfg(test)]
pub(super) fn test_rows(rows: usize, d: usize) -> [Vec<f32>; 4] {
    [
        (0..rows * d)
            .map(|i| ((i * 7919 % 1000) as f32 - 450.0) * 0.01)
            .collect(),
        (0..rows * d)
            .map(|i| ((i * 31 % 997) as f32 - 500.0) * 0.01)
            .collect(),
        (0..d).map(|i| 0.5 + i as f32 * 0.01).collect(),
        (0..d).map(|i| i as f32 * -0.02).collect(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a LayerNorm's forward keeps gives the backward the same bits as its input, and
    /// `x̂·γ + β` from it the forward's output, bit for bit: through the dispatcher (the
    /// AVX-512 rows where the width is a multiple of 16 and the CPU has it, the portable
    /// loops at 100) and through the portable loops at every width.
    #[test]
    fn a_kept_layer_norm_gives_the_same_bits_as_its_input() {
        type Fwd = fn(&mut [f32], &[f32], &[f32], &[f32], f32, Option<(&mut [f32], &mut [f32])>);
        type Bwd = fn(&mut [f32], (&mut [f32], &mut [f32]), NormSource, &[f32], &[f32], f32);
        let paths: [(&str, Fwd, Bwd); 2] = [
            ("dispatched", layer_norm_forward, layer_norm_backward),
            (
                "portable",
                layer_norm_forward_portable,
                layer_norm_backward_portable,
            ),
        ];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for d in [16usize, 100, 128] {
            let rows = 7;
            let [x, dy, g, b] = test_rows(rows, d);
            let eps = 1e-5f32;
            for (name, fwd, bwd) in paths {
                let (mut plain, mut kept) = (vec![0f32; rows * d], vec![0f32; rows * d]);
                let (mut xh, mut rs) = (vec![0f32; rows * d], vec![0f32; rows]);
                fwd(&mut plain, &x, &g, &b, eps, None);
                fwd(&mut kept, &x, &g, &b, eps, Some((&mut xh, &mut rs)));
                assert_eq!(bits(&plain), bits(&kept), "{name} d {d}: forward");
                let mut again = vec![0f32; rows * d];
                layer_norm_affine(&mut again, &xh, &g, &b);
                assert_eq!(bits(&plain), bits(&again), "{name} d {d}: x̂·γ + β");
                let run = |src: NormSource| {
                    let (mut dx, mut dg, mut db) =
                        (vec![0f32; rows * d], vec![0f32; d], vec![0f32; d]);
                    bwd(&mut dx, (&mut dg, &mut db), src, &g, &dy, eps);
                    (bits(&dx), bits(&dg), bits(&db))
                };
                let from_x = run(NormSource::Input(&x));
                let from_kept = run(NormSource::Kept {
                    xhat: &xh,
                    rstd: &rs,
                });
                assert_eq!(from_x, from_kept, "{name} d {d}: backward");
                // Not vacuous: a kept x̂ off in one value changes the gradient.
                let mut off = xh.clone();
                off[3] += 0.25;
                let moved = run(NormSource::Kept {
                    xhat: &off,
                    rstd: &rs,
                });
                assert_ne!(from_x, moved, "{name} d {d}: backward ignores x̂");
            }
        }
    }
}
