//! LayerNorm and its backward in AVX-512 intrinsics, for rows a multiple of 16 wide (the
//! model's 128) on CPUs that have it; [`super`] chooses at run time and keeps the portable
//! loops for everything else.
//!
//! Why it exists: a row is 128 values, eight registers, so a row's reductions (mean,
//! variance, and in the backward two more) are short chains whose ends dominate. Compiled
//! from plain loops each ran on one accumulator and ended in a sequential horizontal sum;
//! here each runs on two accumulators and ends in a tree. The arithmetic mirrors the
//! portable code operation for operation; only the order of the sums differs.

#![cfg(target_arch = "x86_64")]

use super::NormSource;
use std::arch::x86_64::*;

const W: usize = 16;

/// `Σ f(chunk)` over a row's chunks on two accumulators, then as a tree.
#[inline]
#[target_feature(enable = "avx512f")]
fn sum_chunks(d: usize, mut f: impl FnMut(usize) -> __m512) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 2 * W <= d {
        a0 = _mm512_add_ps(a0, f(i));
        a1 = _mm512_add_ps(a1, f(i + W));
        i += 2 * W;
    }
    if i < d {
        a0 = _mm512_add_ps(a0, f(i));
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// Mean and 1/√(var + ε) of the row at `x` (`d` values, `d` a multiple of 16).
///
/// # Safety
/// `x` must point at `d` readable values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn moments(x: *const f32, d: usize, eps: f32) -> (f32, f32) {
    // SAFETY: chunks i..i + 16 with i + 16 ≤ d.
    let mu = sum_chunks(d, |i| unsafe { _mm512_loadu_ps(x.add(i)) }) / d as f32;
    let vmu = _mm512_set1_ps(mu);
    let var = sum_chunks(d, |i| {
        let e = _mm512_sub_ps(unsafe { _mm512_loadu_ps(x.add(i)) }, vmu);
        _mm512_mul_ps(e, e)
    }) / d as f32;
    (mu, 1.0 / (var + eps).sqrt())
}

/// Layer normalization of each row of `x` (rows of `γ`'s length) into `out`; with `keep`,
/// also each row's normalized values `x̂` and `1/σ`, for a backward that reads them
/// instead of `x` ([`NormSource::Kept`]).
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn layer_norm_forward_rows(
    out: &mut [f32],
    x: &[f32],
    g: &[f32],
    b: &[f32],
    eps: f32,
    mut keep: Option<(&mut [f32], &mut [f32])>,
) {
    let d = g.len();
    assert!(
        d.is_multiple_of(W) && d > 0 && b.len() == d,
        "layer norm: rows of 16k values"
    );
    let rows = x.len() / d;
    assert!(out.len() >= rows * d, "layer norm: output too short");
    if let Some((xh, rs)) = &keep {
        assert!(
            xh.len() >= rows * d && rs.len() >= rows,
            "layer norm: kept x̂ or 1/σ too short"
        );
    }
    for (r, (xr, or)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        // SAFETY: every row, γ, β and the kept rows hold d values; chunks end at d.
        unsafe {
            let (mu, rstd) = moments(xr.as_ptr(), d, eps);
            let (vmu, vr) = (_mm512_set1_ps(mu), _mm512_set1_ps(rstd));
            for i in (0..d).step_by(W) {
                let xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr.as_ptr().add(i)), vmu), vr);
                if let Some((kx, _)) = &mut keep {
                    _mm512_storeu_ps(kx.as_mut_ptr().add(r * d + i), xh);
                }
                _mm512_storeu_ps(or.as_mut_ptr().add(i), affine(xh, g, b, i));
            }
            if let Some((_, ks)) = &mut keep {
                ks[r] = rstd;
            }
        }
    }
}

/// `x̂·γ + β` on the 16 values at `i`: the forward's output, and the same bits again
/// from a kept `x̂` ([`layer_norm_affine_rows`]).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn affine(xh: __m512, g: &[f32], b: &[f32], i: usize) -> __m512 {
    // SAFETY: the callers keep i + 16 ≤ d = γ's and β's length.
    unsafe {
        _mm512_add_ps(
            _mm512_mul_ps(xh, _mm512_loadu_ps(g.as_ptr().add(i))),
            _mm512_loadu_ps(b.as_ptr().add(i)),
        )
    }
}

/// `out = x̂·γ + β` for every row of a kept `x̂`: bit for bit the output
/// [`layer_norm_forward_rows`] wrote when it kept `x̂`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn layer_norm_affine_rows(out: &mut [f32], xhat: &[f32], g: &[f32], b: &[f32]) {
    let d = g.len();
    assert!(
        d.is_multiple_of(W) && d > 0 && b.len() == d && out.len() >= xhat.len() / d * d,
        "layer norm: rows of 16k values"
    );
    for (xr, or) in xhat.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        for i in (0..d).step_by(W) {
            // SAFETY: both rows hold d values; chunks end at d.
            unsafe {
                let xh = _mm512_loadu_ps(xr.as_ptr().add(i));
                _mm512_storeu_ps(or.as_mut_ptr().add(i), affine(xh, g, b, i));
            }
        }
    }
}

/// Layer normalization's backward from its input (or what its forward kept) and output
/// gradient `dy`: writes `dx`, and adds to `(dγ, dβ)`. Both sources give the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn layer_norm_backward_rows(
    dx: &mut [f32],
    (dg, db): (&mut [f32], &mut [f32]),
    src: NormSource,
    gv: &[f32],
    dy: &[f32],
    eps: f32,
) {
    let d = gv.len();
    assert!(
        d.is_multiple_of(W) && d > 0,
        "layer norm: rows of 16k values"
    );
    assert!(
        dg.len() == d && db.len() == d,
        "layer norm: γ/β gradients of d values"
    );
    let rows = dy.len() / d;
    assert!(dx.len() >= rows * d, "layer norm: dx too short");
    match src {
        NormSource::Input(x) => assert!(x.len() >= rows * d, "layer norm: input too short"),
        NormSource::Kept { xhat, rstd } => assert!(
            xhat.len() >= rows * d && rstd.len() >= rows,
            "layer norm: kept x̂ or 1/σ too short"
        ),
    }
    let inv_d = 1.0 / d as f32;
    for (r, (dyr, dxr)) in dy.chunks_exact(d).zip(dx.chunks_exact_mut(d)).enumerate() {
        // SAFETY: every row, γ and the gradients hold d values; chunks end at d.
        unsafe {
            let row = (dyr.as_ptr(), gv.as_ptr(), dxr.as_mut_ptr());
            let grads = (dg.as_mut_ptr(), db.as_mut_ptr());
            match src {
                NormSource::Input(x) => {
                    let xp = x.as_ptr().add(r * d);
                    let (mu, rstd) = moments(xp, d, eps);
                    let (vmu, vr) = (_mm512_set1_ps(mu), _mm512_set1_ps(rstd));
                    let xhat = |i: usize| {
                        _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xp.add(i)), vmu), vr)
                    };
                    backward_row(d, inv_d, rstd, xhat, row, grads);
                }
                NormSource::Kept { xhat, rstd } => {
                    let xp = xhat.as_ptr().add(r * d);
                    backward_row(
                        d,
                        inv_d,
                        rstd[r],
                        |i| _mm512_loadu_ps(xp.add(i)),
                        row,
                        grads,
                    );
                }
            }
        }
    }
}

/// One row of [`layer_norm_backward_rows`], given its `x̂` (16 values at a time) and `1/σ`.
///
/// # Safety
/// `dy`, `γ`, `dx` and the two gradients must hold `d` values, `d` a multiple of 16.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn backward_row(
    d: usize,
    inv_d: f32,
    rstd: f32,
    xhat: impl Fn(usize) -> __m512,
    (yp, gp, dxp): (*const f32, *const f32, *mut f32),
    (dgp, dbp): (*mut f32, *mut f32),
) {
    // SAFETY: chunks i..i + 16 with i + 16 ≤ d.
    unsafe {
        let vr = _mm512_set1_ps(rstd);
        // xhat = (x − μ)·rstd; dxhat = dy·γ;
        // dx = rstd · (dxhat − mean(dxhat) − xhat·mean(dxhat·xhat)).
        let (mut a1, mut a2) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..d).step_by(W) {
            let xh = xhat(i);
            let y = _mm512_loadu_ps(yp.add(i));
            let dxh = _mm512_mul_ps(y, _mm512_loadu_ps(gp.add(i)));
            a1 = _mm512_add_ps(a1, dxh);
            a2 = _mm512_add_ps(a2, _mm512_mul_ps(dxh, xh));
            let (pg, pb) = (dgp.add(i), dbp.add(i));
            _mm512_storeu_ps(pg, _mm512_add_ps(_mm512_loadu_ps(pg), _mm512_mul_ps(y, xh)));
            _mm512_storeu_ps(pb, _mm512_add_ps(_mm512_loadu_ps(pb), y));
        }
        let m1 = _mm512_set1_ps(_mm512_reduce_add_ps(a1) * inv_d);
        let m2 = _mm512_set1_ps(_mm512_reduce_add_ps(a2) * inv_d);
        for i in (0..d).step_by(W) {
            let xh = xhat(i);
            let dxh = _mm512_mul_ps(_mm512_loadu_ps(yp.add(i)), _mm512_loadu_ps(gp.add(i)));
            let v = _mm512_mul_ps(
                vr,
                _mm512_sub_ps(_mm512_sub_ps(dxh, m1), _mm512_mul_ps(xh, m2)),
            );
            _mm512_storeu_ps(dxp.add(i), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against plain f64 loops, on rows of 16, 128 and 144 values: the forward's output and
    /// the backward's three gradients.
    #[test]
    fn the_avx512_layer_norm_and_its_backward_match_plain_loops() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        for d in [16usize, 128, 144] {
            let rows = 5;
            let [x, dy, g, b] = super::super::norm::test_rows(rows, d);
            let eps = 1e-5f32;
            let mut out = vec![0f32; rows * d];
            unsafe { layer_norm_forward_rows(&mut out, &x, &g, &b, eps, None) };
            let (mut dx, mut dg, mut db) = (vec![0f32; rows * d], vec![0f32; d], vec![0f32; d]);
            let src = NormSource::Input(&x);
            unsafe { layer_norm_backward_rows(&mut dx, (&mut dg, &mut db), src, &g, &dy, eps) };
            let (mut wg, mut wb) = (vec![0f64; d], vec![0f64; d]);
            for r in 0..rows {
                let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                let yr: Vec<f64> = dy[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                let mu = xr.iter().sum::<f64>() / d as f64;
                let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                let xh: Vec<f64> = xr.iter().map(|v| (v - mu) * rstd).collect();
                let dxh: Vec<f64> = (0..d).map(|i| yr[i] * g[i] as f64).collect();
                let m1 = dxh.iter().sum::<f64>() / d as f64;
                let m2 = (0..d).map(|i| dxh[i] * xh[i]).sum::<f64>() / d as f64;
                for i in 0..d {
                    let want = xh[i] * g[i] as f64 + b[i] as f64;
                    assert!(
                        (out[r * d + i] as f64 - want).abs() < 1e-5,
                        "d {d} forward at {i}"
                    );
                    let want = rstd * (dxh[i] - m1 - xh[i] * m2);
                    assert!(
                        (dx[r * d + i] as f64 - want).abs() < 1e-4,
                        "d {d} dx at {i}"
                    );
                    wg[i] += yr[i] * xh[i];
                    wb[i] += yr[i];
                }
            }
            for i in 0..d {
                assert!((dg[i] as f64 - wg[i]).abs() < 1e-4, "d {d} dγ at {i}");
                assert!((db[i] as f64 - wb[i]).abs() < 1e-4, "d {d} dβ at {i}");
            }
        }
    }
}
