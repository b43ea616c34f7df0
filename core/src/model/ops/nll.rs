//! GPO's loss head (per-question softmax and Gaussian NLL) as one fused CPU op with its
//! backward.

use super::{slice, values};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
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
        segment_probs(out, nt, &self.segments)
    }
}

/// Softmaxed means of the predictor output `out` (`[G, Nt, 2]`) over each question's
/// segment, for every target point (0 on padding).
pub(crate) fn segment_probs(out: &[f32], nt: usize, segments: &[Vec<(usize, usize)>]) -> Vec<f32> {
    let mut p = vec![0f32; out.len() / 2];
    for (g, segs) in segments.iter().enumerate() {
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

/// The summed Gaussian NLL of the real target points of `out` (`[G, Nt, 2]`), with `p`
/// its [`segment_probs`] and `y` the true probabilities (`[G * Nt]`).
pub(crate) fn nll_sum(
    out: &[f32],
    p: &[f32],
    y: &[f32],
    nt: usize,
    segments: &[Vec<(usize, usize)>],
) -> f64 {
    let mut total = 0f64;
    for (g, segs) in segments.iter().enumerate() {
        for &(s, n) in segs {
            for i in g * nt + s..g * nt + s + n {
                let raw = out[2 * i + 1];
                let z = (y[i] - p[i]) * (-raw).exp();
                total += (0.5 * z * z + raw + HALF_LN_2PI) as f64;
            }
        }
    }
    total
}

/// The gradient of `scale ×` [`nll_sum`] with respect to `out`, written to `d` (same
/// shape; 0 on padding).
pub(crate) fn nll_grad(
    d: &mut [f32],
    (out, p): (&[f32], &[f32]),
    y: &[f32],
    nt: usize,
    segments: &[Vec<(usize, usize)>],
    scale: f32,
) {
    d.fill(0.0);
    for (g, segs) in segments.iter().enumerate() {
        for &(s, n) in segs {
            let range = g * nt + s..g * nt + s + n;
            // dL/dp_i = (p_i − y_i)/σ_i²; dL/draw_i = 1 − z_i²
            let mut dot = 0f32;
            for i in range.clone() {
                let raw = out[2 * i + 1];
                let inv_var = (-2.0 * raw).exp();
                let dp = (p[i] - y[i]) * inv_var;
                d[2 * i] = dp;
                dot += dp * p[i];
                let z2 = (y[i] - p[i]) * (y[i] - p[i]) * inv_var;
                d[2 * i + 1] = scale * (1.0 - z2);
            }
            // Softmax Jacobian: dL/dm_i = p_i (dL/dp_i − Σ_j p_j dL/dp_j)
            for i in range {
                d[2 * i] = scale * p[i] * (d[2 * i] - dot);
            }
        }
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
        let total = nll_sum(out, &p, &self.y, nt, &self.segments);
        let loss = (total / self.denom) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = values(arg)?;
        let scale = (grad.to_scalar::<f32>()? as f64 / self.denom) as f32;
        let nt = arg.dims()[1];
        let p = self.probs(&out, nt);
        let mut d = vec![0f32; out.len()];
        nll_grad(&mut d, (&out, &p), &self.y, nt, &self.segments, scale);
        Ok(Some(Tensor::from_vec(d, arg.shape(), arg.device())?))
    }
}
