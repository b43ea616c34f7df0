//! Adam with PyTorch's exact update and CosineAnnealingLR, over one flat parameter buffer.
//!
//! A flat buffer is what data-parallel replicas all-reduce and what checkpoints store, so
//! the optimizer works on it directly: every replica that applies the same averaged
//! gradient to the same buffer ends bitwise identical.

use crate::model::Params;
use candle_core::backprop::GradStore;
use candle_core::Result;
use rayon::prelude::*;
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
    pub fn step_into<G: GradValue>(
        &self,
        params: &[f32],
        grad: &[G],
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
        let c = Coeffs::of(&self.cfg, out.t, lr);
        params_out.resize(n, 0.0);
        out.m.resize(n, 0.0);
        out.v.resize(n, 0.0);
        let (m_in, v_in) = (&self.m[..n], &self.v[..n]);
        params_out[..n]
            .par_chunks_mut(CHUNK)
            .zip(out.m[..n].par_chunks_mut(CHUNK))
            .zip(out.v[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(k, ((p_out, m_out), v_out))| {
                let at = k * CHUNK..k * CHUNK + p_out.len();
                let (p, g) = (&params[at.clone()], &grad[at.clone()]);
                let (m, v) = (&m_in[at.clone()], &v_in[at]);
                for i in 0..p_out.len() {
                    (p_out[i], m_out[i], v_out[i]) = c.update(p[i], g[i].f32(), m[i], v[i]);
                }
            });
    }

    /// One update of `params` with gradient `grad` at learning rate `lr`, computed as
    /// PyTorch's `Adam` does (bias corrections, `addcdiv`).
    pub fn step<G: GradValue>(&mut self, params: &mut [f32], grad: &[G], lr: f64) {
        assert_eq!(
            params.len(),
            grad.len(),
            "parameter and gradient buffers differ in length"
        );
        self.t += 1;
        let c = Coeffs::of(&self.cfg, self.t, lr);
        let n = params.len();
        params
            .par_chunks_mut(CHUNK)
            .zip(self.m[..n].par_chunks_mut(CHUNK))
            .zip(self.v[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(k, ((p, m), v))| {
                let g = &grad[k * CHUNK..k * CHUNK + p.len()];
                for i in 0..p.len() {
                    (p[i], m[i], v[i]) = c.update(p[i], g[i].f32(), m[i], v[i]);
                }
            });
    }
}

/// Parameters per parallel piece of an update. Each parameter's update reads only its own
/// values, so how the buffer is cut (and over how many threads) does not change a bit; the
/// cut just lets the update of a step's 0.7 M parameters use every core instead of one
/// while the others wait (issue 16).
const CHUNK: usize = 1 << 14;

/// A gradient value Adam reads: f32, or the f64 a step's shards are summed and
/// all-reduced in, rounded to f32 as it is read. Rounding inside the update gives the bits
/// of rounding the buffer first, without writing and reading a rounded copy, on every
/// core instead of one (issue 16).
pub trait GradValue: Copy + Sync {
    /// The value as Adam uses it.
    fn f32(self) -> f32;
}

impl GradValue for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl GradValue for f64 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self as f32
    }
}

/// The per-step constants of an Adam update at step `t`.
#[derive(Clone, Copy)]
struct Coeffs {
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl Coeffs {
    fn of(cfg: &AdamConfig, t: u64, lr: f64) -> Self {
        let bc1 = 1.0 - cfg.beta1.powi(t as i32);
        let bc2 = 1.0 - cfg.beta2.powi(t as i32);
        Coeffs {
            b1: cfg.beta1 as f32,
            b2: cfg.beta2 as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: cfg.eps as f32,
        }
    }

    /// (parameter, first moment, second moment) after one update of one parameter.
    #[inline(always)]
    fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let (b1, b2) = (self.b1, self.b2);
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        (p - self.step_size * m / denom, m, v)
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
    fn an_f64_gradient_gives_the_bits_of_rounding_it_first() {
        // Values whose f32 rounding is not exact, over more than one parallel piece.
        let n = 3 * CHUNK + 17;
        let g64: Vec<f64> = (0..n)
            .map(|i| ((i as f64 * 0.7311).sin() * 1e-3) / 3.0 + 1e-11)
            .collect();
        let g32: Vec<f32> = g64.iter().map(|&g| g as f32).collect();
        assert!(g64.iter().zip(&g32).any(|(a, b)| *a != *b as f64));
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).cos()).collect();
        let (mut a, mut b) = (
            Adam::new(n, AdamConfig::default()),
            Adam::new(n, AdamConfig::default()),
        );
        let (mut p, mut q) = (p0.clone(), p0.clone());
        for _ in 0..3 {
            a.step(&mut p, &g32, 3e-4);
            b.step(&mut q, &g64, 3e-4);
        }
        assert!(p.iter().zip(&q).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!((&a.m, &a.v), (&b.m, &b.v));
        let (mut p2, mut q2) = (Vec::new(), Vec::new());
        let (mut a2, mut b2) = (a.clone(), b.clone());
        a.step_into(&p, &g32, 1e-3, &mut p2, &mut a2);
        b.step_into(&q, &g64, 1e-3, &mut q2, &mut b2);
        assert!(p2.iter().zip(&q2).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(a2, b2);
    }

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

    /// A buffer of several pieces updated on the pool is bitwise the update written out
    /// one parameter at a time, in and out of place: each parameter reads its own values.
    #[test]
    fn the_pieces_of_a_long_update_are_each_parameters_own() {
        let n = 3 * CHUNK + 5;
        let cfg = AdamConfig::default();
        let p0: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).cos()).collect();
        let mut a = Adam::new(n, cfg);
        let (mut p, mut q, mut b) = (p0.clone(), p0.clone(), Adam::new(n, cfg));
        let (mut m, mut v, mut r) = (vec![0f32; n], vec![0f32; n], p0);
        for t in 1..=3u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + t as usize) as f32).sin())
                .collect();
            a.step(&mut p, &g, 1e-2);
            let (mut q2, mut b2) = (Vec::new(), Adam::new(0, cfg));
            b.step_into(&q, &g, 1e-2, &mut q2, &mut b2);
            (q, b) = (q2, b2);
            let (b1, b2) = (0.9f32, 0.999f32);
            let step = (1e-2 / (1.0 - 0.9f64.powi(t as i32))) as f32;
            let bc2 = ((1.0 - 0.999f64.powi(t as i32)).sqrt()) as f32;
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                r[i] -= step * m[i] / (v[i].sqrt() / bc2 + 1e-8);
            }
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&r));
        assert_eq!(bits(&q), bits(&r));
        assert_eq!((bits(&a.m), bits(&a.v)), (bits(&m), bits(&v)));
    }

    #[test]
    fn cosine_schedule_endpoints() {
        assert_eq!(cosine_lr(3e-4, 1, 100), 3e-4);
        assert!((cosine_lr(3e-4, 51, 100) - 1.5e-4).abs() < 1e-12);
        assert!(cosine_lr(3e-4, 101, 100).abs() < 1e-12);
        assert!(cosine_lr(1.0, 30, 100) > cosine_lr(1.0, 31, 100));
    }
}
