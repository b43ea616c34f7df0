//! Inference-only CPU kernels for the encoders' elementwise work: exact-form GELU and the
//! attention softmax, in branch-free loops the compiler vectorizes. candle's `gelu_erf` and
//! `softmax_last_dim` call libm's scalar `erff`/`expf` per element, which profiled at about a
//! sixth of MiniLM's time. These have no backward (inference only, never in trainable code)
//! and fall back to candle's ops for other dtypes, devices or layouts.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use gpo_core::model::ops::fast_exp;

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), with e^(−x²) from
/// [`fast_exp`].
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("fast-gelu-erf: contiguous f32 only");
        };
        let out: Vec<f32> = v[a..b]
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fast-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("fast-softmax: contiguous f32 only");
        };
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = v[a..b].to_vec();
        for row in out.chunks_exact_mut(n) {
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = fast_exp(*x - mx);
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

fn fits(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

/// GELU in its exact (erf) form.
pub fn gelu_erf(t: &Tensor) -> Result<Tensor> {
    if fits(t) {
        t.apply_op1_no_bwd(&GeluErf)
    } else {
        t.gelu_erf()
    }
}

/// Softmax over the last dimension (rows whose maximum is −∞ are not expected: the
/// encoders' padding masks use a large finite negative bias).
pub fn softmax_last_dim(t: &Tensor) -> Result<Tensor> {
    if fits(t) {
        t.apply_op1_no_bwd(&Softmax)
    } else {
        candle_nn::ops::softmax_last_dim(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn match_candles_ops() {
        let v: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.0) / 200.0).collect();
        let t = Tensor::from_vec(v, (16, 256), &Device::Cpu).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let g = max_diff(&gelu_erf(&t).unwrap(), &t.gelu_erf().unwrap());
        assert!(g < 2e-6, "gelu {g}");
        let s = max_diff(
            &softmax_last_dim(&t).unwrap(),
            &candle_nn::ops::softmax_last_dim(&t).unwrap(),
        );
        assert!(s < 1e-6, "softmax {s}");
        // A non-contiguous input takes candle's path and gives the same values.
        let tt = t.t().unwrap();
        let d = max_diff(&gelu_erf(&tt).unwrap(), &tt.gelu_erf().unwrap());
        assert_eq!(d, 0.0);
    }
}
