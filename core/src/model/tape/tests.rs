//! The tape against the references: the composite path in f64 (itself checked by finite
//! differences), finite differences directly, and the fused ops under candle's autograd.

use super::{applies, loss_and_grad, loss_and_grad_with, XPart};
use crate::model::tests::{
    as_f64, composite_f64, finite_difference, grads, random_batch, tiny_cfg,
};
use crate::model::{Backward, Gpo, GpoConfig, ModelBatch, OpPath, Variant};
use candle_core::Device;

/// Every combination of shared x and padded context the batches come in.
const LAYOUTS: [(bool, bool); 4] = [(false, true), (true, false), (false, false), (true, true)];

fn official_small(dim_x: usize) -> GpoConfig {
    GpoConfig::official(dim_x)
}

/// Flat f64 gradient of the reference: the composite path in f64 under autograd.
fn reference(m: &Gpo, b: &ModelBatch) -> (f64, Vec<f64>) {
    let (l, per) = grads(&composite_f64(m.clone()), &as_f64(b));
    (l, per.concat())
}

/// `|a − b| ≤ tol · max|b|` per parameter tensor, naming the tensor that fails.
fn assert_close(m: &Gpo, tape: &[f32], want: &[f64], tol: f64, what: &str) {
    let mut off = 0;
    for (name, v) in m.params.entries() {
        let n = v.elem_count();
        let (a, c) = (&tape[off..off + n], &want[off..off + n]);
        let scale = c.iter().fold(0f64, |s, x| s.max(x.abs())).max(1e-6);
        let worst = a
            .iter()
            .zip(c)
            .fold(0f64, |s, (x, y)| s.max((*x as f64 - y).abs()));
        assert!(
            worst <= tol * scale,
            "{what} {name}: tape and reference gradients differ by {worst} (scale {scale})"
        );
        off += n;
    }
    assert_eq!(off, tape.len());
}

#[test]
fn the_tape_matches_the_composite_path_in_f64() {
    for (i, (shared, pad)) in LAYOUTS.into_iter().enumerate() {
        for (cfg, dx) in [(tiny_cfg(6), 6), (official_small(6), 6)] {
            let b = random_batch(20 + i as u64, 4, dx, shared, pad);
            let m = Gpo::new(cfg, 3 + i as u64, &Device::Cpu).unwrap();
            assert!(applies(&m, &b));
            let denom = (b.groups * b.nt) as f64;
            let (lt, gt) = loss_and_grad(&m, &b, denom).unwrap();
            let (lr, gr) = reference(&m, &b);
            let what = format!("shared {shared} pad {pad} d_model {}", m.cfg.d_model);
            assert!(
                (lt as f64 - lr).abs() <= 1e-5 * lr.abs().max(1.0),
                "{what}: loss tape {lt} reference {lr}"
            );
            assert_close(&m, &gt, &gr, 2e-4, &what);
        }
    }
}

#[test]
fn the_tape_matches_finite_differences() {
    // Groups with their own x, and groups sharing x (the first layer then projects the
    // target queries once and sums their gradient over the groups).
    for shared in [false, true] {
        finite_differences_on(&random_batch(5, 3, 5, shared, true));
    }
}

fn finite_differences_on(b: &ModelBatch) {
    let m = Gpo::new(tiny_cfg(5), 8, &Device::Cpu).unwrap();
    let (_, tape) = loss_and_grad(&m, b, (b.groups * b.nt) as f64).unwrap();
    // Finite differences of the reference loss in f64 (h = 1e-6).
    let r = composite_f64(m.clone());
    let b64 = as_f64(b);
    let (dx, d) = (m.cfg.dim_x, m.cfg.d_model);
    let mut off = 0;
    for (name, var) in r.params.entries() {
        let n = var.elem_count();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let g = &tape[off..off + n];
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &c| g[c].abs().total_cmp(&g[a].abs()));
        let mut picks: Vec<usize> = idx.into_iter().take(3).collect();
        picks.push((name.len() * 7919) % n);
        if name == "embedder.0.weight" {
            picks.extend((0..d).map(|row| row * (dx + 1) + dx));
        }
        for i in picks {
            let fd = finite_difference(&r, &b64, var, &base, i, 1e-6);
            let err = (fd - g[i] as f64).abs();
            assert!(
                err <= 2e-5 + 1e-3 * fd.abs(),
                "{name}[{i}]: finite difference {fd} vs tape {}",
                g[i]
            );
        }
        off += n;
    }
}

#[test]
fn the_tape_matches_the_fused_ops_under_autograd() {
    for (i, (shared, pad)) in LAYOUTS.into_iter().enumerate() {
        let b = random_batch(40 + i as u64, 4, 12, shared, pad);
        let mut m = Gpo::new(official_small(12), 1 + i as u64, &Device::Cpu).unwrap();
        let (lt, gt) = loss_and_grad(&m, &b, 7.0).unwrap();
        m.backward = Backward::Autograd;
        assert!(!applies(&m, &b));
        let loss = m.loss_over(&b, 7.0).unwrap();
        let la = loss.to_scalar::<f32>().unwrap();
        let ga = crate::optim::flat_grads(&m.params, &loss.backward().unwrap()).unwrap();
        let ga: Vec<f64> = ga.iter().map(|&x| x as f64).collect();
        assert!(
            (lt - la).abs() <= 1e-5 * la.abs().max(1.0),
            "loss tape {lt} autograd {la}"
        );
        assert_close(&m, &gt, &ga, 1e-5, &format!("shared {shared} pad {pad}"));
    }
}

#[test]
fn the_tape_is_deterministic_whatever_its_buffers_held() {
    let b = random_batch(9, 4, 6, true, true);
    let m = Gpo::new(tiny_cfg(6), 4, &Device::Cpu).unwrap();
    let a = loss_and_grad(&m, &b, 3.0).unwrap();
    // Another batch in between leaves other values in the reused buffers.
    let other = random_batch(10, 5, 6, false, true);
    loss_and_grad(&m, &other, 2.0).unwrap();
    let c = loss_and_grad(&m, &b, 3.0).unwrap();
    assert_eq!(a.0.to_bits(), c.0.to_bits());
    assert!(a
        .1
        .iter()
        .zip(&c.1)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn the_tape_leaves_what_it_does_not_compute_to_autograd() {
    let b = random_batch(2, 2, 4, false, false);
    let mut m = Gpo::new(tiny_cfg(4), 1, &Device::Cpu).unwrap();
    assert!(applies(&m, &b));
    m.path = OpPath::Composite;
    assert!(!applies(&m, &b));
    let err = loss_and_grad(&m, &b, 1.0).unwrap_err().to_string();
    assert!(err.contains("autograd"), "{err}");
    let mut cfg = tiny_cfg(4);
    cfg.variant = Variant::Residual;
    let v = Gpo::new(cfg, 1, &Device::Cpu).unwrap();
    assert!(!applies(&v, &b));
    assert!(!applies(&m, &as_f64(&b)));
}

/// The x-part computed once ([`XPart`]) gives bitwise the tape's own result, on either
/// thread layout; one of another batch's shape is refused with an error.
#[test]
fn a_shared_x_part_gives_the_same_bits() {
    let m = Gpo::new(official_small(6), 5, &Device::Cpu).unwrap();
    let b = random_batch(40, 4, 6, true, false);
    let denom = (b.groups * b.nt) as f64;
    let (l, g) = loss_and_grad(&m, &b, denom).unwrap();
    for parallel in [false, true] {
        let xp = XPart::of(&m, &b, parallel).unwrap();
        let (l2, g2) = loss_and_grad_with(&m, &b, denom, Some(&xp)).unwrap();
        assert_eq!(l.to_bits(), l2.to_bits());
        assert!(g.iter().zip(&g2).all(|(a, c)| a.to_bits() == c.to_bits()));
    }
    // Other batches' x-parts: read when of the same shape (another loss), refused otherwise.
    let (mut read, mut refused) = (false, false);
    for seed in 41..80 {
        let other = random_batch(seed, 4, 6, true, false);
        let xo = XPart::of(&m, &other, false).unwrap();
        if (other.nc, other.nt) == (b.nc, b.nt) {
            let (l3, _) = loss_and_grad_with(&m, &b, denom, Some(&xo)).unwrap();
            assert_ne!(l.to_bits(), l3.to_bits(), "the x-part is read");
            read = true;
        } else {
            let e = loss_and_grad_with(&m, &b, denom, Some(&xo)).unwrap_err();
            assert!(e.to_string().contains("x-part of"), "{e}");
            refused = true;
        }
    }
    assert!(read && refused, "seeds 41..80 gave only one kind of batch");
    // Groups with their own x have no shared x-part.
    let own = random_batch(42, 4, 6, false, false);
    assert!(XPart::of(&m, &own, false).is_err());
}

/// Ops cut for idle threads ([`crate::model::balance`]) give bitwise the uncut gradient:
/// every op that can be cut is cut here, on a pool of two threads that take the halves as
/// they come, for each batch layout.
#[test]
fn ops_cut_for_idle_threads_give_the_same_bits() {
    use crate::model::balance::Balance;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // The official width (128 features: parameter gradients are cut) and 16 groups (more
    // than 128 rows: products are cut by rows too).
    let m = Gpo::new(official_small(6), 11, &Device::Cpu).unwrap();
    for (i, (shared, pad)) in LAYOUTS.into_iter().enumerate() {
        let b = random_batch(60 + i as u64, 16, 6, shared, pad);
        assert!(b.groups * b.nc >= 128, "{} context rows", b.groups * b.nc);
        let denom = (b.groups * b.nt) as f64;
        let (l, g) = loss_and_grad(&m, &b, denom).unwrap();
        for _ in 0..3 {
            let cut = || Balance::always().run(|| loss_and_grad(&m, &b, denom));
            let (lc, gc) = pool.install(cut).unwrap();
            let what = format!("shared {shared} pad {pad}");
            assert_eq!(l.to_bits(), lc.to_bits(), "{what}: loss");
            let mut off = 0;
            for (name, v) in m.params.entries() {
                let n = v.elem_count();
                let bad = (off..off + n)
                    .filter(|&j| g[j].to_bits() != gc[j].to_bits())
                    .count();
                if bad > 0 {
                    println!("{what}: {name} {bad}/{n} differ");
                }
                off += n;
            }
            let diff = g
                .iter()
                .zip(&gc)
                .filter(|(a, c)| a.to_bits() != c.to_bits());
            assert_eq!(diff.count(), 0, "{what}: gradients differ");
        }
    }
}
