//! Adam with PyTorch's exact update and CosineAnnealingLR, over one flat parameter buffer.
//!
//! A flat buffer is what data-parallel replicas all-reduce and what checkpoints store, so
//! the optimizer works on it directly: every replica that applies the same averaged
//! gradient to the same buffer ends bitwise identical.

use crate::model::Params;
use candle_core::backprop::GradStore;
use candle_core::Result;
use serde::{Deserialize, Serialize};

/// Adam hyperparameters (PyTorch defaults; GPO uses lr 3e-4 and no weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator ε.
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Adam state: moments and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// Hyperparameters.
    pub cfg: AdamConfig,
    /// First moments, one per parameter.
    pub m: Vec<f32>,
    /// Second moments, one per parameter.
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

impl Adam {
    /// Fresh state for `n` parameters.
    pub fn new(n: usize, cfg: AdamConfig) -> Self {
        Adam {
            cfg,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// The update of [`Adam::step`] written out of place: the new parameters go to
    /// `params_out` and the new state to `out`, while `self` and `params` keep the state
    /// before the step. A replica keeps both, so that a step the run throws away rolls back
    /// by a swap instead of a copy. Bitwise equal to `step` (the same operations in the
    /// same order).
    pub fn step_into(
        &self,
        params: &[f32],
        grad: &[f32],
        lr: f64,
        params_out: &mut Vec<f32>,
        out: &mut Adam,
    ) {
        assert_eq!(
            params.len(),
            grad.len(),
            "parameter and gradient buffers differ in length"
        );
        let n = params.len();
        out.cfg = self.cfg;
        out.t = self.t + 1;
        let (b1, b2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
        let bc1 = 1.0 - self.cfg.beta1.powi(out.t as i32);
        let bc2 = 1.0 - self.cfg.beta2.powi(out.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.cfg.eps as f32;
        params_out.resize(n, 0.0);
        out.m.resize(n, 0.0);
        out.v.resize(n, 0.0);
        let (m_in, v_in) = (&self.m[..n], &self.v[..n]);
        let (m_out, v_out, p_out) = (&mut out.m[..n], &mut out.v[..n], &mut params_out[..n]);
        for i in 0..n {
            let g = grad[i];
            let m = b1 * m_in[i] + (1.0 - b1) * g;
            let v = b2 * v_in[i] + (1.0 - b2) * g * g;
            m_out[i] = m;
            v_out[i] = v;
            let denom = v.sqrt() / bc2_sqrt + eps;
            p_out[i] = params[i] - step_size * m / denom;
        }
    }

    /// One update of `params` with gradient `grad` at learning rate `lr`, computed as
    /// PyTorch's `Adam` does (bias corrections, `addcdiv`).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], lr: f64) {
        assert_eq!(
            params.len(),
            grad.len(),
            "parameter and gradient buffers differ in length"
        );
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
        let bc1 = 1.0 - self.cfg.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.cfg.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.cfg.eps as f32;
        for i in 0..params.len() {
            let g = grad[i];
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let denom = self.v[i].sqrt() / bc2_sqrt + eps;
            params[i] -= step_size * self.m[i] / denom;
        }
    }
}

/// Learning rate of PyTorch's `CosineAnnealingLR(T_max = total, eta_min = 0)` for the
/// optimizer step numbered `step` (1-based): the schedule has been stepped `step − 1` times.
pub fn cosine_lr(base: f64, step: u64, total: u64) -> f64 {
    if total == 0 {
        return base;
    }
    let t = (step.saturating_sub(1)).min(total) as f64;
    0.5 * base * (1.0 + (std::f64::consts::PI * t / total as f64).cos())
}

/// Gradients of all parameters as one flat buffer in `state_dict` order (0 where a
/// parameter received none).
pub fn flat_grads(params: &Params, grads: &GradStore) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(params.count());
    for (_, v) in params.entries() {
        match grads.get(v.as_tensor()) {
            Some(g) => out.extend(
                g.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => out.extend(std::iter::repeat_n(0.0, v.elem_count())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_hand_computed_pytorch_steps() {
        // torch.optim.Adam([p], lr=0.1) with p=1.0 and grads 0.5 then -0.25:
        // step 1: m=0.05, v=0.00025, m̂=0.5, v̂=0.25 → p = 1 − 0.1·0.5/(0.5+1e-8) = 0.9
        // step 2: m=0.02, v=0.0003122..., bias-corrected → p ≈ 0.9 − 0.1·0.10526/0.39528
        let mut a = Adam::new(
            1,
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
        );
        let mut p = [1.0f32];
        a.step(&mut p, &[0.5], 0.1);
        assert!((p[0] - 0.9).abs() < 1e-6, "{}", p[0]);
        a.step(&mut p, &[-0.25], 0.1);
        let m = 0.9 * 0.05 + 0.1 * -0.25;
        let v = 0.999 * 0.00025 + 0.001 * 0.0625;
        let mh = m / (1.0 - 0.81);
        let vh: f64 = v / (1.0 - 0.998001);
        let expect = 0.9 - 0.1 * mh / (vh.sqrt() + 1e-8);
        assert!((p[0] as f64 - expect).abs() < 1e-6, "{} vs {expect}", p[0]);
    }

    #[test]
    fn out_of_place_step_is_bitwise_the_in_place_one() {
        let cfg = AdamConfig::default();
        let mut a = Adam::new(5, cfg);
        let mut b = a.clone();
        let mut p = vec![0.3f32, -1.2, 4.0, 1e-3, -7.5];
        let mut q = p.clone();
        for s in 1..=4u64 {
            let g: Vec<f32> = (0..5)
                .map(|i| ((i as f32 + 1.3) * s as f32).sin())
                .collect();
            a.step(&mut p, &g, cosine_lr(1e-2, s, 4));
            let (mut q2, mut b2) = (Vec::new(), Adam::new(0, cfg));
            b.step_into(&q, &g, cosine_lr(1e-2, s, 4), &mut q2, &mut b2);
            q = q2;
            b = b2;
        }
        assert_eq!(a, b);
        assert_eq!(
            p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            q.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn cosine_schedule_endpoints() {
        assert_eq!(cosine_lr(3e-4, 1, 100), 3e-4);
        assert!((cosine_lr(3e-4, 51, 100) - 1.5e-4).abs() < 1e-12);
        assert!(cosine_lr(3e-4, 101, 100).abs() < 1e-12);
        assert!(cosine_lr(1.0, 30, 100) > cosine_lr(1.0, 31, 100));
    }
}
