//! A copy into memory that the step keeps and does not read again soon, with streaming
//! stores ([`super::attention`]'s kept probabilities). Split from the attention to keep
//! each op file to one job.
//!
//! Why it exists: a store to a line that is not in the caches first reads that line from
//! memory (write-allocate), only to overwrite all of it. The attention's probabilities are
//! written once a layer and read again only by the backward, long after they have left the
//! caches, so that read is pure cost: measured in the step, the forward's `Q Kᵀ` written
//! into the kept buffer took 1.6 times the samples of the backward's `dO Vᵀ`, the same
//! operations written into a reused scratch. Streaming stores write whole lines to memory
//! without reading them first.

/// `dst ← src`, the same values, with streaming stores (AVX2, where the build has it, as
/// this project's x86 builds do) on the 32-byte-aligned part of `dst` and plain stores on
/// its ends; a fence at the end orders them before any later store.
pub(crate) fn stream_copy(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "stream copy: lengths differ");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        use std::arch::x86_64::{_mm256_loadu_ps, _mm256_stream_ps, _mm_sfence};
        const W: usize = 8;
        let n = dst.len();
        let head = ((32 - dst.as_ptr() as usize % 32) % 32 / 4).min(n);
        dst[..head].copy_from_slice(&src[..head]);
        let body = head + (n - head) / W * W;
        for i in (head..body).step_by(W) {
            // SAFETY: i + 8 ≤ body ≤ n for both slices (equal lengths, asserted), and
            // dst + i is 32-byte aligned (head aligns it, and i − head is a multiple of 8
            // floats); AVX2 is enabled at compile time.
            unsafe {
                _mm256_stream_ps(
                    dst.as_mut_ptr().add(i),
                    _mm256_loadu_ps(src.as_ptr().add(i)),
                )
            };
        }
        // SAFETY: a fence has no memory operands.
        unsafe { _mm_sfence() };
        dst[body..].copy_from_slice(&src[body..]);
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::stream_copy;

    /// Every length from 0 to 40 at every float offset of a 32-byte line: the destination
    /// holds exactly the source, and nothing around it is touched.
    #[test]
    fn stream_copy_copies_every_value_at_every_alignment() {
        let src: Vec<f32> = (0..64).map(|i| i as f32 * 1.5 + 0.25).collect();
        for off in 0..8 {
            for n in 0..=40 {
                let mut buf = vec![-1f32; 64];
                stream_copy(&mut buf[off..off + n], &src[off..off + n]);
                for (i, v) in buf.iter().enumerate() {
                    let want = if (off..off + n).contains(&i) {
                        src[i]
                    } else {
                        -1.0
                    };
                    assert_eq!(
                        v.to_bits(),
                        want.to_bits(),
                        "offset {off}, length {n}, index {i}"
                    );
                }
            }
        }
    }
}
