//! The attention softmax and its backward written in AVX-512 intrinsics, for CPUs that
//! have it (chosen at run time by [`super::attention`]; the portable loops stay for the
//! others).
//!
//! Why it exists: an attention row is short (10–350 scores), so its ends cost as much as
//! its body. Compiled from plain loops, each reduction was one dependency chain, its final
//! horizontal sum sequential, and the row's tail (`n mod 16` values) ran one scalar at a
//! time: for the exponentials, as long as the vectorized rest. Here every pass runs on full
//! registers with two independent accumulators, and the tail is one masked load and store.
//! The arithmetic mirrors the portable code operation for operation (the score
//! `x·scale + mask`, [`super::fast_exp`]'s reduction and polynomial); only the order of the
//! sums differs.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

const W: usize = 16;

/// The tail mask of a row of `n` values: its last `n mod 16` lanes.
#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << (n % W)) - 1) as __mmask16
}

/// [`super::fast_exp`] on sixteen lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    // k = round-to-nearest-even(xc·log2 e): the portable code's 1.5·2^23 trick, in one
    // instruction.
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(
        k,
        _mm512_set1_ps(LN2_LO),
        _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), xc),
    );
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    // p·2^k, exactly as the portable code's multiply by 2^k built from the exponent bits.
    let e = _mm512_scalef_ps(p, k);
    // Zero below −87 (and for −∞); NaN passes through as in the portable code.
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.0));
    _mm512_maskz_mov_ps(keep, e)
}

/// `row ← softmax(row · scale + mask)` for every row (`nc` values) of `block`.
///
/// # Safety
/// The CPU must have AVX-512F; `mask` must hold at least `nc` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softmax_rows(block: &mut [f32], nc: usize, scale: f32, mask: &[f32]) {
    assert!(
        mask.len() >= nc && nc > 0,
        "softmax: mask shorter than a row"
    );
    let main = nc - nc % W;
    let tk = tail_mask(nc);
    let vs = _mm512_set1_ps(scale);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let m = mask.as_ptr();
    for row in block.chunks_exact_mut(nc) {
        let p = row.as_mut_ptr();
        // SAFETY (all loads and stores below): lanes i..i + 16 with i + 16 ≤ main ≤ nc,
        // or the masked tail lanes main..nc, of a row of nc values and of the mask.
        unsafe {
            let score = |i: usize| {
                _mm512_add_ps(
                    _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), vs),
                    _mm512_loadu_ps(m.add(i)),
                )
            };
            // The tail's score: padding lanes read as 0 with a −∞ mask, so they are −∞.
            let tail_score = _mm512_add_ps(
                _mm512_mul_ps(_mm512_maskz_loadu_ps(tk, p.add(main)), vs),
                _mm512_mask_loadu_ps(ninf, tk, m.add(main)),
            );
            let (mut a0, mut a1) = (ninf, ninf);
            let mut i = 0;
            while i + 2 * W <= main {
                a0 = _mm512_max_ps(a0, score(i));
                a1 = _mm512_max_ps(a1, score(i + W));
                i += 2 * W;
            }
            if i < main {
                a0 = _mm512_max_ps(a0, score(i));
            }
            a1 = _mm512_max_ps(a1, tail_score);
            let vmx = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(a0, a1)));
            // The exponentials, written and summed in one pass.
            let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 2 * W <= main {
                let e0 = exp16(_mm512_sub_ps(score(i), vmx));
                let e1 = exp16(_mm512_sub_ps(score(i + W), vmx));
                _mm512_storeu_ps(p.add(i), e0);
                _mm512_storeu_ps(p.add(i + W), e1);
                s0 = _mm512_add_ps(s0, e0);
                s1 = _mm512_add_ps(s1, e1);
                i += 2 * W;
            }
            if i < main {
                let e = exp16(_mm512_sub_ps(score(i), vmx));
                _mm512_storeu_ps(p.add(i), e);
                s0 = _mm512_add_ps(s0, e);
            }
            let et = exp16(_mm512_sub_ps(tail_score, vmx));
            _mm512_mask_storeu_ps(p.add(main), tk, et);
            s1 = _mm512_add_ps(s1, et);
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)));
            let mut i = 0;
            while i < main {
                _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
                i += W;
            }
            let t = _mm512_maskz_loadu_ps(tk, p.add(main));
            _mm512_mask_storeu_ps(p.add(main), tk, _mm512_mul_ps(t, inv));
        }
    }
}

/// The softmax's backward over rows of `nc`: `dS = scale · P ∘ (dP − rowsum(dP ∘ P))` in
/// place of `dP` (`ds`), from the probabilities `p`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softmax_grad_rows(ds: &mut [f32], p: &[f32], nc: usize, scale: f32) {
    assert!(nc > 0, "softmax backward: empty rows");
    let main = nc - nc % W;
    let tk = tail_mask(nc);
    let vs = _mm512_set1_ps(scale);
    for (dr, pr) in ds.chunks_exact_mut(nc).zip(p.chunks_exact(nc)) {
        let (d, q) = (dr.as_mut_ptr(), pr.as_ptr());
        // SAFETY: as in `softmax_rows`, every access is within a row of nc values.
        unsafe {
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 2 * W <= main {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(d.add(i)), _mm512_loadu_ps(q.add(i)), a0);
                a1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(d.add(i + W)),
                    _mm512_loadu_ps(q.add(i + W)),
                    a1,
                );
                i += 2 * W;
            }
            if i < main {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(d.add(i)), _mm512_loadu_ps(q.add(i)), a0);
            }
            a1 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(tk, d.add(main)),
                _mm512_maskz_loadu_ps(tk, q.add(main)),
                a1,
            );
            let dot = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
            let g =
                |x: __m512, pv: __m512| _mm512_mul_ps(_mm512_mul_ps(vs, pv), _mm512_sub_ps(x, dot));
            let mut i = 0;
            while i < main {
                let v = g(_mm512_loadu_ps(d.add(i)), _mm512_loadu_ps(q.add(i)));
                _mm512_storeu_ps(d.add(i), v);
                i += W;
            }
            let v = g(
                _mm512_maskz_loadu_ps(tk, d.add(main)),
                _mm512_maskz_loadu_ps(tk, q.add(main)),
            );
            _mm512_mask_storeu_ps(d.add(main), tk, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the portable kernels (`fast_exp`, plain sums in f64) at every row length
    /// from 1 to past two full rounds, with a masked key: every lane, the tail's included,
    /// is computed and written, and nothing past a row is touched.
    #[test]
    fn the_avx512_softmax_and_its_backward_match_plain_loops() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let scale = 0.17f32;
        for nc in 1..80 {
            let rows = 3;
            let x: Vec<f32> = (0..rows * nc)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.02)
                .collect();
            let mut mask = vec![0f32; nc];
            if nc > 2 {
                mask[nc / 2] = f32::NEG_INFINITY;
            }
            // One spare value after the block: it must survive.
            let mut got = x.clone();
            got.push(7.0);
            unsafe { softmax_rows(&mut got[..rows * nc], nc, scale, &mask) };
            assert_eq!(got[rows * nc], 7.0, "nc {nc}: wrote past the block");
            for r in 0..rows {
                let s: Vec<f64> = (0..nc)
                    .map(|j| (x[r * nc + j] * scale + mask[j]) as f64)
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for j in 0..nc {
                    let want = (s[j] - mx).exp() / z;
                    let g = got[r * nc + j] as f64;
                    assert!(
                        (g - want).abs() < 1e-6,
                        "nc {nc} row {r} col {j}: {g} vs {want}"
                    );
                }
            }
            let p = got[..rows * nc].to_vec();
            let mut ds = x.clone();
            ds.push(7.0);
            unsafe { softmax_grad_rows(&mut ds[..rows * nc], &p, nc, scale) };
            assert_eq!(ds[rows * nc], 7.0, "nc {nc}: backward wrote past the block");
            for r in 0..rows {
                let row = r * nc..(r + 1) * nc;
                let dot: f64 = row.clone().map(|i| x[i] as f64 * p[i] as f64).sum();
                for i in row {
                    let want = scale as f64 * p[i] as f64 * (x[i] as f64 - dot);
                    assert!((ds[i] as f64 - want).abs() < 1e-5, "nc {nc} at {i}");
                }
            }
        }
    }
}
