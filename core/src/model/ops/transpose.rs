//! A block of columns transposed into rows, for operands that gemm would otherwise gather
//! one scalar at a time ([`super::attention`]'s keys and values). Split from the attention
//! to keep each op file to one job.

/// Columns `col0..col0 + w` of the `rows` rows of `src` (row stride `rs`), transposed
/// into `dst` as `w` rows of `rows` values: `dst[j·rows + i] = src[i·rs + col0 + j]`. Done
/// in 8 × 8 tiles (in AVX2 registers where the build has AVX2, as this project's x86
/// builds do), whose lines stay in L1 between the reads and the writes.
pub(crate) fn transpose_cols(
    dst: &mut [f32],
    src: &[f32],
    (rows, rs): (usize, usize),
    (col0, w): (usize, usize),
) {
    const T: usize = 8;
    assert!(dst.len() >= w * rows, "transpose: destination too short");
    if rows == 0 || w == 0 {
        return;
    }
    assert!(
        (rows - 1) * rs + col0 + w <= src.len(),
        "transpose: source too short"
    );
    for i0 in (0..rows).step_by(T) {
        let ie = (i0 + T).min(rows);
        for j0 in (0..w).step_by(T) {
            let je = (j0 + T).min(w);
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            if ie - i0 == T && je - j0 == T {
                // SAFETY: the tile's 8 source rows of 8 values end within `src` (asserted
                // above: row i0 + 7 < rows, column j0 + 7 < w) and its 8 destination rows
                // of 8 values within `dst` (j0 + 7 < w, i0 + 7 < rows); AVX2 is enabled
                // at compile time.
                unsafe {
                    transpose8(
                        src.as_ptr().add(i0 * rs + col0 + j0),
                        rs,
                        dst.as_mut_ptr().add(j0 * rows + i0),
                        rows,
                    )
                };
                continue;
            }
            for j in j0..je {
                let out = &mut dst[j * rows + i0..j * rows + ie];
                for (o, i) in out.iter_mut().zip(i0..ie) {
                    *o = src[i * rs + col0 + j];
                }
            }
        }
    }
}

/// One 8 × 8 tile: `d[j·dr + i] = s[i·sr + j]`, in the usual unpack, shuffle and lane
/// permute of eight AVX registers.
///
/// # Safety
/// `s` must be readable at `i·sr + j` and `d` writable at `j·dr + i` for `i, j < 8`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
unsafe fn transpose8(s: *const f32, sr: usize, d: *mut f32, dr: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * sr)));
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for j in 0..4 {
            _mm256_storeu_ps(
                d.add(j * dr),
                _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]),
            );
            _mm256_storeu_ps(
                d.add((j + 4) * dr),
                _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]),
            );
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::transpose_cols;

    /// `n` pseudo-random values in [−0.5, 0.5) from `seed` (shared with the attention's
    /// tests).
    pub(in crate::model::ops) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = seed;
        (0..n)
            .map(|_| {
                r = r
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((r >> 33) as f32 / 2f32.powi(31)) - 0.5
            })
            .collect()
    }

    /// Every element lands where the plain definition puts it, for full 8 × 8 tiles and
    /// for ragged edges in both directions, from a column offset within wider rows; nothing
    /// past the `w · rows` values is written.
    #[test]
    fn transpose_cols_matches_its_definition() {
        for rows in [1, 7, 8, 9, 16, 23, 158] {
            for (col0, w, rs) in [
                (0, 1, 1),
                (0, 8, 8),
                (3, 13, 20),
                (0, 128, 256),
                (128, 128, 256),
            ] {
                let src = values(rows * rs, (rows * 31 + w) as u64);
                let mut dst = vec![f32::NAN; w * rows + 5];
                transpose_cols(&mut dst, &src, (rows, rs), (col0, w));
                for j in 0..w {
                    for i in 0..rows {
                        assert_eq!(
                            dst[j * rows + i].to_bits(),
                            src[i * rs + col0 + j].to_bits(),
                            "rows {rows}, columns {col0}..{}: ({i}, {j})",
                            col0 + w
                        );
                    }
                }
                assert!(
                    dst[w * rows..].iter().all(|v| v.is_nan()),
                    "wrote past the end"
                );
            }
        }
    }
}
