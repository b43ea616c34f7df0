//! Plain composite versions of the fused ops, built only from candle ops whose backward
//! candle implements. They are the reference the fused ops are tested against, and the
//! path a non-CPU device takes.

use super::batch::ModelBatch;
use candle_core::{Result, Tensor, D};

/// Layer norm over the last dimension from elementary ops.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// Scaled, masked softmax over the last dimension of `[G, H, Nq, Nk]` scores.
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let mut s = (scores * scale)?;
    if let Some(m) = mask {
        s = s.broadcast_add(m)?;
    }
    let mx = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&mx)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Per-question softmax of the means, vectorized with a one-hot segment matrix.
/// Returns the probabilities `[G, Nt]` (1/1 on padding: e/(e+…) is masked by callers).
pub fn segment_softmax(mean: &Tensor, b: &ModelBatch) -> Result<(Tensor, Tensor)> {
    let (g, nt) = (b.groups, b.nt);
    let q = b.segments.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut onehot = vec![0f32; g * nt * q];
    let mut valid = vec![0f32; g * nt];
    for (gi, segs) in b.segments.iter().enumerate() {
        for (qi, &(s, n)) in segs.iter().enumerate() {
            for t in s..s + n {
                onehot[(gi * nt + t) * q + qi] = 1.0;
                valid[gi * nt + t] = 1.0;
            }
        }
    }
    let dev = mean.device();
    let s = Tensor::from_vec(onehot, (g, nt, q), dev)?.to_dtype(mean.dtype())?;
    let valid = Tensor::from_vec(valid, (g, nt), dev)?.to_dtype(mean.dtype())?;
    let mx = mean.max_keepdim(1)?.detach();
    let e = mean.broadcast_sub(&mx)?.exp()?;
    let seg_sum = e.unsqueeze(1)?.matmul(&s)?; // [G, 1, Q]
    let denom = seg_sum.matmul(&s.t()?)?.squeeze(1)?; // [G, Nt]
    let denom = (denom + (1.0 - &valid)?)?;
    Ok(((e / denom)?, valid))
}

/// GPO's loss from the predictor output `[G, Nt, 2]`: Gaussian NLL of the true option
/// probabilities under N(softmaxed mean, exp(raw)²), summed over real targets and divided
/// by `denom` (G × Nt_max for the official mean over groups and padded target slots).
pub fn segment_nll(out: &Tensor, b: &ModelBatch, denom: f64) -> Result<Tensor> {
    let mean = out.narrow(2, 0, 1)?.squeeze(2)?;
    let raw = out.narrow(2, 1, 1)?.squeeze(2)?;
    let (p, valid) = segment_softmax(&mean, b)?;
    let y = Tensor::from_slice(b.yt.as_slice(), (b.groups, b.nt), out.device())?
        .to_dtype(out.dtype())?;
    let z = ((y - p)? * raw.neg()?.exp()?)?;
    let nll = (((z.sqr()? * 0.5)? + raw)? + 0.5 * (2.0 * std::f64::consts::PI).ln())?;
    (nll * valid)?.sum_all()? / denom
}
