//! The one GEMM entry point of the fused ops: a strided, single-threaded call into the
//! `gemm` crate with its bounds checked first, so every op addresses heads and transposes by
//! strides instead of copies.

/// A strided single-threaded GEMM: `C (m×n) [+]= A (m×k) · B (k×n)`, each operand given by
/// a base offset into its slice and row/column strides. Bounds are checked up front.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_strided(
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
