//! Tests of the model variants that read the population prior: each against the composite
//! path and finite differences, the prior recovered exactly by a zero deviation, and the
//! residual variant's y.

use super::tests::{
    as_f64, assert_finite_differences, assert_paths_agree, composite_f64, random_batch, tiny_cfg,
};
use super::*;
use crate::rng::Rng;
use candle_core::{DType, Device};

/// `b` with a random prior: a distribution over each target question's points, any
/// probability on context points (padding as `assemble` lays it out).
fn with_prior(b: ModelBatch, seed: u64) -> ModelBatch {
    let mut r = Rng::new(seed);
    let mut pt = vec![1f32; b.groups * b.nt];
    for (gi, segs) in b.segments.iter().enumerate() {
        for &(s, n) in segs.iter() {
            let v: Vec<f32> = (0..n).map(|_| r.f64() as f32 + 0.05).collect();
            let sum: f32 = v.iter().sum();
            for (i, x) in v.into_iter().enumerate() {
                pt[gi * b.nt + s + i] = x / sum;
            }
        }
    }
    let pc: Vec<f32> = (0..b.groups * b.nc)
        .map(|_| r.f64() as f32 * 0.9 + 0.05)
        .collect();
    b.with_prior(pc, pt).unwrap()
}

fn prior_f64(mut b: ModelBatch) -> ModelBatch {
    let (pc, pt) = b.prior.take().unwrap();
    b = as_f64(&b);
    b.prior = Some((
        pc.to_dtype(DType::F64).unwrap(),
        pt.to_dtype(DType::F64).unwrap(),
    ));
    b
}

fn cfg(v: Variant, dim_x: usize) -> GpoConfig {
    GpoConfig {
        variant: v,
        ..tiny_cfg(dim_x)
    }
}

const VARIANTS: [Variant; 4] = [
    Variant::PriorInput,
    Variant::PriorLogit,
    Variant::Residual,
    Variant::ResidualInput,
];

#[test]
fn each_variant_matches_the_composite_path_and_finite_differences() {
    for v in VARIANTS {
        for (shared, pad) in [(false, true), (true, false)] {
            let b = with_prior(random_batch(7, 4, 6, shared, pad), 3);
            let mut m = Gpo::new(cfg(v, 6), 5, &Device::Cpu).unwrap();
            assert_paths_agree(&mut m, &b, &format!("{v:?}"));
        }
        // Finite differences on the composite path in f64, on the embedder's input columns
        // (x, y and, for prior_input, the prior) and the predictor's output.
        let b = prior_f64(with_prior(random_batch(1, 3, 5, false, true), 9));
        let m = composite_f64(Gpo::new(cfg(v, 5), 3, &Device::Cpu).unwrap());
        let (dx, d) = (m.cfg.dim_x, m.cfg.d_model);
        let cols = dx + 1 + v.extra_inputs();
        assert_finite_differences(&m, &b, &format!("{v:?}"), |name, ga| match name {
            "embedder.0.weight" => (0..d)
                .flat_map(|r| (dx..cols).map(move |c| r * cols + c))
                .chain([0, 7])
                .collect(),
            "predictor.2.bias" => (0..ga.len()).collect(),
            _ => Vec::new(),
        });
    }
}

#[test]
fn a_fresh_logit_variant_predicts_the_prior_exactly() {
    for v in [
        Variant::PriorLogit,
        Variant::Residual,
        Variant::ResidualInput,
    ] {
        let b = with_prior(random_batch(4, 3, 6, false, true), 2);
        // A fresh module starts at zero deviation: its mean row starts at zero.
        let m = Gpo::new(cfg(v, 6), 1, &Device::Cpu).unwrap();
        let w = m
            .params
            .get("predictor.2.weight")
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        assert!(w[0].iter().all(|&x| x == 0.0) && w[1].iter().any(|&x| x != 0.0));
        let pred = m.predict(&b).unwrap();
        let pt = b.prior.as_ref().unwrap().1.flatten_all().unwrap();
        let pt = pt.to_vec1::<f32>().unwrap();
        for (gi, segs) in b.segments.iter().enumerate() {
            for &(s, n) in segs.iter() {
                for i in gi * b.nt + s..gi * b.nt + s + n {
                    assert!(
                        (pred[i] - pt[i]).abs() < 1e-6,
                        "{v:?}: {} vs {}",
                        pred[i],
                        pt[i]
                    );
                }
            }
        }
    }
}

#[test]
fn the_residual_variant_reads_y_minus_the_prior() {
    let b = with_prior(random_batch(5, 3, 4, true, false), 6);
    let (pc, _) = b.prior.clone().unwrap();
    let mut shifted = b.clone();
    shifted.yc = (&b.yc - &pc).unwrap();
    // The faithful initialization (the variants' mean row starts at zero, which would
    // predict the prior whatever the context).
    let params = Gpo::new(tiny_cfg(4), 8, &Device::Cpu).unwrap().params;
    let residual = Gpo::from_params(cfg(Variant::Residual, 4), params.clone());
    let logit = Gpo::from_params(cfg(Variant::PriorLogit, 4), params);
    assert_eq!(
        residual.predict(&b).unwrap(),
        logit.predict(&shifted).unwrap()
    );
    // Its predictions move with the context's answers (the prior is not all it reads).
    assert_ne!(
        residual.predict(&b).unwrap(),
        residual.predict(&shifted).unwrap()
    );
}

#[test]
fn a_variant_without_a_prior_is_an_error_naming_it() {
    let b = random_batch(3, 2, 4, false, false);
    for v in VARIANTS {
        let m = Gpo::new(cfg(v, 4), 0, &Device::Cpu).unwrap();
        let e = m.loss(&b).unwrap_err().to_string();
        assert!(e.contains(v.name()) && e.contains("prior"), "{e}");
    }
    // The faithful module ignores a prior it is given.
    let m = Gpo::new(tiny_cfg(4), 0, &Device::Cpu).unwrap();
    let with = with_prior(b.clone(), 1);
    assert_eq!(m.predict(&b).unwrap(), m.predict(&with).unwrap());
}

#[test]
fn prior_input_adds_one_embedder_column() {
    let f = cfg(Variant::Faithful, 6).param_shapes();
    let p = cfg(Variant::PriorInput, 6).param_shapes();
    assert_eq!(f[0].1, vec![8, 7]);
    assert_eq!(p[0].1, vec![8, 8]);
    assert_eq!(f[1..], p[1..]);
}
