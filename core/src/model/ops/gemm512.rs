//! The products at most one attention head wide (`n` ≤ 32: `P V`, `dS K`, `dSᵀ Q`,
//! `Pᵀ dO`) in AVX-512 intrinsics, bit for bit what the `gemm` crate computes for them.
//! [`super::gemm::gemm_strided`] sends such products here when [`available`] and
//! [`applies`] say so, and every other product to gemm.
//!
//! Why it exists: gemm computes a product 32 wide with its 32 × 6 kernel (12 accumulators,
//! six broadcasts a step of `k`, read through the left operand's strides). These register
//! tiles are 12 rows × 32 columns (24 accumulators, twelve broadcasts against two loads
//! of the right operand's row), and the right operand, a head's 32 columns of a 128- or
//! 256-wide row, is first copied into a contiguous per-thread scratch ([`pack`]), so its
//! rows do not fall on a power-of-two stride that crowds a few cache sets. In the step, on
//! the Intel Xeon of BENCHMARKS.md, that took a median 0.978 of the time at d_x 384 (five
//! runs, 0.964–1.008), 0.988 at d_x 4096, 0.979 on one thread and 0.967 at 64 groups,
//! every gradient bitwise equal. Sent every
//! product, kernels like these took 1.030× the step: on the wide products gemm's own
//! packing pays (BENCHMARKS.md, issue 16).
//!
//! The arithmetic is gemm's: every value of `C` is one chain of fused multiply-adds along
//! `k`, from zero ([`applies`] keeps `k` to gemm's single block), then written, or added
//! to `C`. So the bits are gemm's, which the tests check on every path, and nothing that
//! compares against them moves.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::cell::RefCell;

/// Lanes of a register.
const L: usize = 16;

/// The widest product sent here: one head of the official module (128 / 4).
const MAX_N: usize = 2 * L;

thread_local! {
    /// The right operand's rows, contiguous ([`pack`]); grown to the largest seen.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether a product of these sizes is sent here: at most [`MAX_N`] wide, and on gemm's
/// ordinary path, the one this kernel reproduces: more than 256 values, both sides above
/// 1, `k` above 2, and `k` at most 512. gemm sums `k` in blocks of at most 512, and a
/// product with a side of 32 or less in one block up to 512 (`gemm_common::gemm`,
/// `kernel_params`): so every value here is one chain along all of `k`.
pub(super) fn applies(m: usize, n: usize, k: usize) -> bool {
    n <= MAX_N && m * n > 256 && m > 1 && n > 1 && (3..=512).contains(&k)
}

/// Whether this CPU takes the kernel: AVX-512F, on an Intel CPU. It was measured faster
/// on an Intel Xeon only; on the AMD EPYC of BENCHMARKS.md, whose gemm kernels already
/// ran these products nearer their ceiling, gemm keeps them until it is measured there.
pub(super) fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f") && intel())
}

/// Whether the CPU's vendor string is Intel's.
fn intel() -> bool {
    // CPUID leaf 0 (the vendor) exists on every x86-64 CPU.
    let r = __cpuid(0);
    let mut v = [0u8; 12];
    for (i, w) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
        v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    &v == b"GenuineIntel"
}

/// `C (m×n) [+]= A (m×k) · B (k×n)` for a product [`applies`] accepts: `C[i, j]` at
/// `c[c_off + i·c_rs + j]`, `A[i, p]` at `a[a_off + i·a_rs + p·a_cs]`, `B[p, j]` at
/// `b[b_off + p·b_rs + j·b_cs]`. `B` is read through [`pack`] unless its rows already
/// lie contiguous.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]), `n` ≤ [`MAX_N`], and every element those
/// offsets name for `i < m`, `j < n`, `p < k` must lie within its slice (the caller,
/// [`super::gemm::gemm_strided`], checks the bounds).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    c: &mut [f32],
    (c_off, c_rs): (usize, usize),
    a: &[f32],
    (a_off, a_rs, a_cs): (usize, usize, usize),
    b: &[f32],
    (b_off, b_rs, b_cs): (usize, usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let (cp, ap) = (c.as_mut_ptr().add(c_off), a.as_ptr().add(a_off));
    let dims = (m, n, k);
    if b_cs == 1 && b_rs == n {
        return sweep(
            cp,
            c_rs,
            ap,
            (a_rs, a_cs),
            b.as_ptr().add(b_off),
            dims,
            accumulate,
        );
    }
    PACKED.with_borrow_mut(|packed| {
        pack(packed, b, (b_off, b_rs, b_cs), (k, n));
        // SAFETY: as the caller vouches; the packed rows are `n` apart.
        unsafe {
            sweep(
                cp,
                c_rs,
                ap,
                (a_rs, a_cs),
                packed.as_ptr(),
                dims,
                accumulate,
            )
        }
    })
}

/// `B`'s `k` rows of `n` values, copied one after another into `out`: the same values,
/// so the same sums.
fn pack(
    out: &mut Vec<f32>,
    b: &[f32],
    (off, rs, cs): (usize, usize, usize),
    (k, n): (usize, usize),
) {
    out.clear();
    for p in 0..k {
        let row = off + p * rs;
        if cs == 1 {
            out.extend_from_slice(&b[row..row + n]);
        } else {
            out.extend((0..n).map(|j| b[row + j * cs]));
        }
    }
}

/// The product as one sweep of [`rows`]; `B`'s rows are `n` apart.
#[target_feature(enable = "avx512f")]
unsafe fn sweep(
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let mask: __mmask16 = if n % L == 0 {
        0xFFFF
    } else {
        (1u16 << (n % L)) - 1
    };
    let t = (c, c_rs, a, (a_rs, a_cs), b, n);
    // Two registers a row (17 to 32 columns) or one (up to 16), the last one masked.
    if n > L {
        rows::<2>(t, (m, k), mask, accumulate);
    } else {
        rows::<1>(t, (m, k), mask, accumulate);
    }
}

/// The operands of a sweep: `C` and its row stride, `A` and its strides, `B` and its
/// row stride.
type Sweep = (
    *mut f32,
    usize,
    *const f32,
    (usize, usize),
    *const f32,
    usize,
);

/// All `m` rows of `V` registers, in tiles of 12 rows and one tile of the remainder.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rows<const V: usize>(
    (c, c_rs, a, (a_rs, a_cs), b, b_rs): Sweep,
    (m, k): (usize, usize),
    mask: __mmask16,
    acc: bool,
) {
    // The sweep from row `i` on.
    let from = |i: usize| -> Sweep {
        (
            c.add(i * c_rs),
            c_rs,
            a.add(i * a_rs),
            (a_rs, a_cs),
            b,
            b_rs,
        )
    };
    let mut i = 0;
    while i + 12 <= m {
        tile::<12, V>(from(i), k, mask, acc);
        i += 12;
    }
    let t = from(i);
    macro_rules! rest {
        ($($r:literal)*) => {
            match m - i {
                0 => {}
                $($r => tile::<$r, V>(t, k, mask, acc),)*
                _ => unreachable!("a remainder below the tile's rows"),
            }
        };
    }
    rest!(1 2 3 4 5 6 7 8 9 10 11);
}

/// `R` rows × `V` registers of `C` from one chain of multiply-adds along `k` each, held in
/// registers: per step of `k`, the right operand's row is loaded once (the last register
/// masked) and each row's value of the left operand broadcast against it.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    (c, c_rs, a, (a_rs, a_cs), b, b_rs): Sweep,
    k: usize,
    mask: __mmask16,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..k {
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, reg) in bv.iter_mut().enumerate() {
            *reg = if v + 1 == V {
                _mm512_maskz_loadu_ps(mask, bp.add(v * L))
            } else {
                _mm512_loadu_ps(bp.add(v * L))
            };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*ap.add(r * a_rs));
            for (reg, &bq) in row.iter_mut().zip(&bv) {
                *reg = _mm512_fmadd_ps(x, bq, *reg);
            }
        }
        ap = ap.add(a_cs);
        bp = bp.add(b_rs);
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &sum) in row.iter().enumerate() {
            let p = c.add(r * c_rs + v * L);
            let mk = if v + 1 == V { mask } else { 0xFFFF };
            // gemm writes `1 · sum`, or adds the sum to what is there.
            let out = if accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mk, p), sum)
            } else {
                sum
            };
            _mm512_mask_storeu_ps(p, mk, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::transpose::tests::values;
    use super::{applies, gemm};

    /// gemm 0.19 itself on the same strides (the path [`super::super::gemm::gemm_strided`]
    /// takes without this kernel).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        c: &mut [f32],
        c_rs: usize,
        a: &[f32],
        (a_rs, a_cs): (usize, usize),
        b: &[f32],
        (b_rs, b_cs): (usize, usize),
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        // SAFETY: the callers size every buffer for the strides they pass.
        unsafe {
            ::gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                c_rs as isize,
                accumulate,
                a.as_ptr(),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            )
        };
    }

    /// Every product this kernel takes, in every layout the step uses, gives gemm's bits
    /// exactly: the left operand by rows or by columns, with wider strides than its size;
    /// the right operand contiguous, in wider rows (packed), or read down its columns
    /// (packed through its strides); `C` written or added to. The shapes are the step's
    /// (`P V`, `dS K`, `dSᵀ Q`, the loss head's two columns), every remainder of the row
    /// tiles and of the 16 lanes, and `k` up to gemm's block of 512.
    /// It runs where the CPU has AVX-512F, whoever made it.
    #[test]
    fn the_kernel_gives_gemms_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F here: the kernel is not used, nothing to compare");
            return;
        }
        let shapes = [
            (448, 32, 158),
            (158, 32, 448),
            (491, 32, 118),
            (1492, 2, 128),
            (29, 17, 70),
            (100, 31, 3),
            (13, 20, 5),
            (70, 16, 300),
            (300, 24, 512),
        ];
        let mut compared = 0;
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            assert!(applies(m, n, k), "{m}×{n}×{k} is not taken");
            for by_cols in [false, true] {
                // B contiguous, in rows wider than `n`, and by columns.
                for (b_rs, b_cs) in [(n, 1), (n + 7, 1), (1, k + 3)] {
                    for accumulate in [false, true] {
                        let (a_rs, a_cs, a_len) = if by_cols {
                            (1, m + 3, (m + 3) * k)
                        } else {
                            (k + 5, 1, (k + 5) * m)
                        };
                        let c_rs = n + 2;
                        let a = values(a_len, si as u64 * 4 + 1);
                        let b = values(k * n + (k + 3) * n + 7 * k, si as u64 * 4 + 2);
                        let c0 = values(c_rs * m, si as u64 * 4 + 3);
                        let (mut want, mut got) = (c0.clone(), c0.clone());
                        let (ar, br, dims) = ((a_rs, a_cs), (b_rs, b_cs), (m, n, k));
                        reference(&mut want, c_rs, &a, ar, &b, br, dims, accumulate);
                        // SAFETY: AVX-512F is there; the buffers are sized for these strides.
                        unsafe {
                            gemm(
                                &mut got,
                                (0, c_rs),
                                &a,
                                (0, a_rs, a_cs),
                                &b,
                                (0, b_rs, b_cs),
                                dims,
                                accumulate,
                            )
                        };
                        for (i, (x, y)) in want.iter().zip(&got).enumerate() {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "{m}×{n}×{k}, A by {}, B strides {b_rs}/{b_cs}, accumulate \
                                 {accumulate}: C[{}, {}] {x} against {y}",
                                if by_cols { "columns" } else { "rows" },
                                i / c_rs,
                                i % c_rs
                            );
                        }
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 12 * shapes.len());
    }

    /// Products the kernel must leave to gemm: wider than a head, or off gemm's ordinary
    /// path (the rule is not vacuous).
    #[test]
    fn wide_and_unusual_products_stay_with_gemm() {
        assert!(applies(491, 32, 118));
        assert!(!applies(491, 33, 118), "wider than a head");
        assert!(!applies(1964, 128, 128), "a linear layer");
        assert!(!applies(16, 16, 128), "256 values: gemm's dot products");
        assert!(!applies(491, 32, 2), "k of 2: gemm's vector kernels");
        assert!(!applies(158, 32, 513), "past gemm's block of 512");
    }
}
