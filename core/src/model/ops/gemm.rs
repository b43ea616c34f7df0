//! The one GEMM entry point of the fused ops: a strided, single-threaded call into the
//! `gemm` crate with its bounds checked first, so every op addresses heads and transposes by
//! strides instead of copies. Products one head wide go to [`super::gemm512`] on the CPUs
//! where it was measured faster, with the same bits.

/// Whether a product `C (m×n) = A (m×k) · B (k×n)` cut into pieces of at least
/// `m_piece × n_piece` gives every value of `C` bit for bit as the whole product does.
///
/// gemm 0.19 computes each value as one fused multiply-add chain along `k`, in blocks of
/// `k` whose size depends on `k` alone, except on three paths chosen by the sizes: products
/// of at most 256 values (horizontal dot products), products with an inner size `k` ≤ 2 or
/// a side of 1 (vector kernels), and products of at most 64 × 64 whose `k` exceeds 512
/// (blocks of 512). A piece stays off those paths when it keeps more than 256 values and a
/// side above 1, and, past `k` = 512, a side above 64; the whole is larger still.
pub(crate) fn cut_keeps_bits((m_piece, n_piece): (usize, usize), k: usize) -> bool {
    m_piece * n_piece > 256
        && m_piece > 1
        && n_piece > 1
        && k > 2
        && (k <= 512 || m_piece.max(n_piece) > 64)
}

/// gemm copies a product's left operand into panels whenever the product is more than 48
/// columns wide (`8 × NR`), even when the operand is already laid out as its kernels read
/// it. The step's products reuse that operand too little for the copy to pay: with the
/// threshold at its maximum (256, so the copy happens only for the layout's sake), a
/// step took 0.976–0.982 of the time at d_x 384 on 2 threads, 0.975 at d_x 4096 and 0.973
/// on one thread (BENCHMARKS.md), with the same bits: packing moves values, it does not
/// change a sum. The knob is gemm's and process-wide, so candle's matmul reads it too
/// (embedding rates moved within ±2.5 %); it is set on the first product.
static PACK_LHS_BY_LAYOUT_ONLY: std::sync::Once = std::sync::Once::new();

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
    #[cfg(target_arch = "x86_64")]
    if super::gemm512::applies(m, n, k) && super::gemm512::available() {
        // SAFETY: the assertions bound every element it touches (`applies` asks `k` ≥ 3,
        // so A and B were checked); the CPU has AVX-512F; `applies` keeps `n` to a head's
        // width.
        return unsafe {
            super::gemm512::gemm(
                c,
                (c_off, c_rs),
                a,
                (a_off, a_rs, a_cs),
                b,
                (b_off, b_rs, b_cs),
                (m, n, k),
                accumulate,
            )
        };
    }
    PACK_LHS_BY_LAYOUT_ONLY.call_once(|| gemm::set_lhs_packing_threshold_single_thread(256));
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

#[cfg(test)]
mod tests {
    use super::{cut_keeps_bits, gemm_strided};

    /// `A (m×k) · B (k×n)`, `A` row-major, `B` given by its row and column strides.
    fn product(
        a: &[f32],
        (b, b_rs, b_cs): (&[f32], usize, usize),
        (m, n, k): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        gemm_strided(
            &mut c,
            (0, n),
            a,
            (0, k, 1),
            b,
            (0, b_rs, b_cs),
            (m, n, k),
            false,
        );
        c
    }

    fn same_bits(x: &[f32], y: &[f32]) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
    }

    /// `C = A·B` whole against its rows in two halves, for products on each of gemm's
    /// paths: equal bit for bit wherever [`cut_keeps_bits`] allows the cut, and a cut it
    /// refuses is one that does change bits for some shape (the rule is not vacuous).
    #[test]
    fn a_product_cut_where_the_rule_allows_keeps_its_bits() {
        let mut r = 1u64;
        let mut rnd = || {
            r = r
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((r >> 33) as f32 / 2f32.powi(31)) - 0.5
        };
        let mut refused_and_differs = false;
        let shapes = [
            (270, 128, 128),
            (270, 128, 6),
            (176, 256, 128),
            (301, 2, 128),
            (135, 2, 128),
            (270, 3, 128),
            (130, 128, 1500),
            (130, 40, 1500),
            (256, 64, 700),
            (128, 128, 2),
        ];
        for (m, n, k) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            // B as a linear layer's weight `[n, k]` (row stride 1, column stride k).
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let w = (&b[..], 1, k);
            let whole = product(&a, w, (m, n, k));
            let h = m / 2;
            let mut cut = product(&a[..h * k], w, (h, n, k));
            cut.extend(product(&a[h * k..], w, (m - h, n, k)));
            let same = same_bits(&whole, &cut);
            if cut_keeps_bits((h, n), k) {
                assert!(same, "{m}×{n}×{k} cut in rows changed bits");
            } else if !same {
                refused_and_differs = true;
            }
        }
        assert!(
            refused_and_differs,
            "no refused cut changed bits: the shapes test nothing"
        );
    }

    /// Whether gemm packs the left operand moves values, not sums: a product gives the same
    /// bits with gemm's default packing threshold and with the one set here.
    #[test]
    fn packing_the_left_operand_or_not_gives_the_same_bits() {
        // gemm computes `Cᵀ = Bᵀ Aᵀ` here (C is row-major): its left operand is `Bᵀ`,
        // column-major, 256 rows (a multiple of the 16 lanes) and 300 columns wide, so its
        // layout needs no copy and only the threshold decides whether it is packed.
        let (m, n, k) = (300, 256, 128);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 991.0 - 0.5)
            .collect();
        // The first product sets the threshold once; then this test sets it for itself.
        gemm_strided(
            &mut [0f32],
            (0, 1),
            &[1.0],
            (0, 1, 1),
            &[1.0],
            (0, 1, 1),
            (1, 1, 1),
            false,
        );
        let run = |threshold: usize| {
            gemm::set_lhs_packing_threshold_single_thread(threshold);
            product(&a, (&b, n, 1), (m, n, k))
        };
        let (packed, unpacked) = (
            run(gemm::DEFAULT_LHS_PACKING_THRESHOLD_SINGLE_THREAD),
            run(256),
        );
        assert!(packed
            .iter()
            .zip(&unpacked)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(packed.iter().any(|&x| x != 0.0));
    }
}
