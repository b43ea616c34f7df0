//! Fused CPU ops for training, each with its own backward.
//!
//! candle-nn 0.11's fused `layer_norm` and `softmax_last_dim` have no backward (gradients
//! silently go missing), and the composite versions cost many allocations per step. These
//! custom ops do one pass forward and one pass backward and register with candle's autograd
//! through `CustomOp*::bwd`. Each has a composite twin in [`super::composite`]; tests check
//! that both paths agree on values and gradients. Linear lives here; LayerNorm ([`norm`]),
//! attention ([`attention`]), the loss head ([`nll`]) and the strided GEMM they share
//! ([`gemm`], with its kernel for products one head wide, [`gemm512`]) have files of their
//! own.

use super::balance;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

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

/// `y = x Wᵀ + b`, then ReLU when `relu`: `x` is `[m, k]`, `W` is `[n, k]` given as
/// `(slice, row stride)` (a stride above `k` reads the first `k` columns of a wider
/// weight, as the embedder's x-part), `b` is `[n]`, `y` is `[m, n]` and fully written.
///
/// The product is written first and the bias added in the same pass as the ReLU (one pass
/// over `y`, where a broadcast of the bias before an accumulating product took two). Where
/// the inner size `k` fits one of gemm's blocks (every layer but a wide embedder's first),
/// `x Wᵀ + b` is then the same IEEE addition as before; past it, gemm's partial sums meet
/// the bias in another order, a difference in the last bits.
pub(crate) fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: (&[f32], usize),
    b: &[f32],
    dims: (usize, usize, usize),
    relu: bool,
) {
    if relu {
        linear_then(y, x, w, b, dims, &|v, bv, _| (v + bv).max(0.0), None)
    } else {
        linear_then(y, x, w, b, dims, &|v, bv, _| v + bv, None)
    }
}

/// `y = (x Wᵀ + b) + r`: [`linear_forward`] with a residual `r` (`[m, n]`) added in the
/// same pass, in the order the composite path adds them.
pub(crate) fn linear_forward_residual(
    y: &mut [f32],
    x: &[f32],
    w: (&[f32], usize),
    b: &[f32],
    r: &[f32],
    dims: (usize, usize, usize),
) {
    linear_then(y, x, w, b, dims, &|v, bv, rv| (v + bv) + rv, Some(r))
}

/// Rows a product needs before [`linear_then`] or [`linear_input_grad`] cut it in two for
/// an idle thread ([`balance`]), and output features before [`linear_param_grads`] does.
const CUT_ROWS: usize = 128;
const CUT_FEATURES: usize = 64;

/// The product `x Wᵀ` into `y`, then `y ← f(y, b, r)` element-wise in one pass (`r` is 0
/// where absent). Cut into two halves of rows while another thread is idle: each row is
/// the same sum either way.
#[inline(always)]
fn linear_then<F: Fn(f32, f32, f32) -> f32 + Sync>(
    y: &mut [f32],
    x: &[f32],
    (w, w_rs): (&[f32], usize),
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    f: &F,
    r: Option<&[f32]>,
) {
    if m >= CUT_ROWS && cut_keeps_bits((m / 2, n), k) && balance::idle_thread() {
        let h = m / 2;
        let (y0, y1) = y[..m * n].split_at_mut(h * n);
        let (x0, x1) = x[..m * k].split_at(h * k);
        let (r0, r1) = match r {
            Some(r) => {
                let (a, b) = r[..m * n].split_at(h * n);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        balance::split(
            || linear_then(y0, x0, (w, w_rs), b, (h, n, k), f, r0),
            || linear_then(y1, x1, (w, w_rs), b, (m - h, n, k), f, r1),
        );
        return;
    }
    gemm_strided(y, (0, n), x, (0, k, 1), w, (0, 1, w_rs), (m, n, k), false);
    let b = &b[..n];
    match r {
        Some(r) => {
            for (row, rr) in y[..m * n]
                .chunks_exact_mut(n)
                .zip(r[..m * n].chunks_exact(n))
            {
                for ((v, &bv), &rv) in row.iter_mut().zip(b).zip(rr) {
                    *v = f(*v, bv, rv);
                }
            }
        }
        None => {
            for row in y[..m * n].chunks_exact_mut(n) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v = f(*v, bv, 0.0);
                }
            }
        }
    }
}

/// Zeroes the entries of the output gradient `g` where the ReLU'd output `y` is not
/// positive (ReLU's backward).
pub(crate) fn relu_mask(g: &mut [f32], y: &[f32]) {
    for (gv, &yv) in g.iter_mut().zip(y) {
        if yv <= 0.0 {
            *gv = 0.0;
        }
    }
}

/// A linear layer's parameter gradients from its output gradient `g` (`[m, n]`, ReLU
/// already applied) and input `x` (`[m, k]`): `dW += gᵀ x` (`[n, k]`, given as `(slice,
/// row stride)`) and `db += Σ_rows g`. Cut into two halves of output features while
/// another thread is idle: each value is the same sum either way.
pub(crate) fn linear_param_grads(
    (dw, dw_rs): (&mut [f32], usize),
    db: &mut [f32],
    g: &[f32],
    x: &[f32],
    dims: (usize, usize, usize),
) {
    param_grads_cols((dw, dw_rs), db, (g, 0), x, dims, dims.1);
}

/// [`linear_param_grads`] for the output features `j0..j0 + n` of a gradient `g` whose rows
/// are `g_rs` wide (`db` and `dw` are those features' own).
fn param_grads_cols(
    (dw, dw_rs): (&mut [f32], usize),
    db: &mut [f32],
    (g, j0): (&[f32], usize),
    x: &[f32],
    (m, n, k): (usize, usize, usize),
    g_rs: usize,
) {
    if n >= 2 * CUT_FEATURES && cut_keeps_bits((n / 2, k), m) && balance::idle_thread() {
        let h = n / 2;
        let (dw0, dw1) = dw.split_at_mut(h * dw_rs);
        let (db0, db1) = db[..n].split_at_mut(h);
        balance::split(
            || param_grads_cols((dw0, dw_rs), db0, (g, j0), x, (m, h, k), g_rs),
            || param_grads_cols((dw1, dw_rs), db1, (g, j0 + h), x, (m, n - h, k), g_rs),
        );
        return;
    }
    gemm_strided(
        dw,
        (0, dw_rs),
        g,
        (j0, 1, g_rs),
        x,
        (0, k, 1),
        (n, k, m),
        true,
    );
    for row in g[..m * g_rs].chunks_exact(g_rs) {
        for (d, v) in db[..n].iter_mut().zip(&row[j0..j0 + n]) {
            *d += v;
        }
    }
}

/// A linear layer's input gradient `dx = g W` (`[m, k]`), added to `dx` when `accumulate`,
/// else written; `W` as `(slice, row stride)`. Cut into two halves of rows while another
/// thread is idle.
pub(crate) fn linear_input_grad(
    dx: &mut [f32],
    g: &[f32],
    (w, w_rs): (&[f32], usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m >= CUT_ROWS && cut_keeps_bits((m / 2, k), n) && balance::idle_thread() {
        let h = m / 2;
        let (dx0, dx1) = dx[..m * k].split_at_mut(h * k);
        let (g0, g1) = g[..m * n].split_at(h * n);
        balance::split(
            || linear_input_grad(dx0, g0, (w, w_rs), (h, n, k), accumulate),
            || linear_input_grad(dx1, g1, (w, w_rs), (m - h, n, k), accumulate),
        );
        return;
    }
    gemm_strided(
        dx,
        (0, k),
        g,
        (0, n, 1),
        w,
        (0, w_rs, 1),
        (m, k, n),
        accumulate,
    );
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
        linear_forward(&mut y, x, (w, k), b, (m, n, k), self.relu);
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
            relu_mask(&mut g, &values(res)?);
        }
        let dev = x.device();
        let dx = if x.track_op() {
            let mut dx = vec![0f32; m * k];
            linear_input_grad(&mut dx, &g, (&values(w)?, k), (m, n, k), false);
            Some(Tensor::from_vec(dx, (m, k), dev)?)
        } else {
            None
        };
        let mut dw = vec![0f32; n * k];
        let mut db = vec![0f32; n];
        linear_param_grads((&mut dw, k), &mut db, &g, &values(x)?, (m, n, k));
        Ok((
            dx,
            Some(Tensor::from_vec(dw, (n, k), dev)?),
            Some(Tensor::from_vec(db, n, b.device())?),
        ))
    }
}

/// Runs `$generic` compiled with AVX-512 where the CPU has it (chosen at run time, once per
/// call), else as the build's baseline (x86-64-v3) compiled it: the row kernels' loops then
/// go 16 lanes wide on CPUs that have the units, as gemm's own kernels do.
macro_rules! wide_dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident => $generic:ident ($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
                fn wide($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
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
    // The reduction and the polynomial as fused multiply-adds (one instruction each on
    // x86-64-v3, half the operations of separate multiplies and adds).
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, xc));
    // exp(r) on |r| ≤ ln2/2: degree-6 Taylor/Horner (relative error < 2e-7).
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
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

mod attention;
mod gemm;
mod gemm512;
mod nll;
mod norm;
mod norm512;
mod softmax512;
mod stream;
mod transpose;

use gemm::{cut_keeps_bits, gemm_strided};

pub use attention::Attention;
pub(crate) use attention::{AttnGrads, Heads};
pub use nll::SegmentNll;
pub(crate) use nll::{nll_grad, nll_sum, segment_probs};
pub use norm::LayerNorm;
pub(crate) use norm::{layer_norm_affine, layer_norm_backward, layer_norm_forward, NormSource};
pub(crate) use transpose::transpose_cols;

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
