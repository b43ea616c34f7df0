//! The training step's loss and gradient on the CPU, with a hand-written backward (the
//! "tape"): the same module, the same fused kernels ([`super::ops`]), but no autograd graph.
//!
//! Why it exists: under candle's autograd every op's output gradient starts as a zeroed
//! tensor and is added to (`zeros_like` + `add`, one allocation each), every custom op's
//! backward copies its inputs out of their tensors, and residual adds and reshapes are
//! graph nodes of their own. On the official shape that plumbing was a fifth of the step
//! (BENCHMARKS.md, issue 16). The tape runs the forward keeping exactly what the backward
//! reads, then walks back through it, adding every parameter's gradient straight into the
//! flat gradient vector in `state_dict` order.
//!
//! Rows are kept as one block of every group's context rows followed by one block of every
//! group's target rows, so each row-wise product (projections, feed-forward) is one GEMM
//! over the whole shard, and keys and values are one GEMM over the context block.
//!
//! It computes the faithful module only; [`applies`] says when it does, and
//! [`crate::grad`] falls back to autograd otherwise (the prior-reading variants, the
//! composite path, other devices or dtypes). Its gradients are tested against the composite
//! path in f64 and against finite differences (`tape::tests`).

mod buf;
mod layer;
#[cfg(test)]
mod tests;
mod xpart;

use super::batch::ModelBatch;
use super::gpo::{Backward, Gpo, OpPath};
use super::ops::{
    linear_forward, linear_input_grad, linear_param_grads, nll_grad, nll_sum, relu_mask,
    segment_probs, Heads,
};
use super::Variant;
use buf::{buf, Buf};
use candle_core::{DType, Layout, Result, Storage, StorageRef, Tensor};
use layer::{Layer, LayerParams};
pub use xpart::XPart;

/// One parameter: its values and its offset in the flat parameter (and gradient) vector.
#[derive(Clone, Copy)]
pub(super) struct W<'a> {
    pub v: &'a [f32],
    pub off: usize,
}

impl W<'_> {
    /// `(offset, length)` in the flat vector.
    pub fn r(&self) -> (usize, usize) {
        (self.off, self.v.len())
    }
}

/// The flat gradient's ranges `w` and `b` (`(offset, length)`, `w` before `b`), mutably:
/// a weight's and its bias's gradients.
pub(super) fn two(
    grad: &mut [f32],
    (wo, wn): (usize, usize),
    (bo, bn): (usize, usize),
) -> (&mut [f32], &mut [f32]) {
    assert!(
        wo + wn <= bo,
        "tape: a weight's gradient must precede its bias's"
    );
    let (lo, hi) = grad.split_at_mut(bo);
    (&mut lo[wo..wo + wn], &mut hi[..bn])
}

/// Row counts of a shard: `g` groups of `nc` context and `nt` target rows; `c = g·nc`
/// context rows, then the target block, `r` rows in all.
pub(super) struct Rows {
    pub g: usize,
    pub nc: usize,
    pub nt: usize,
    pub c: usize,
    pub r: usize,
}

/// Whether the tape computes this module's loss on this batch: the faithful module on the
/// fused path, f32 on the CPU, with the tape selected ([`Backward::Tape`]).
pub fn applies(m: &Gpo, b: &ModelBatch) -> bool {
    m.path == OpPath::Fused
        && m.backward == Backward::Tape
        && m.cfg.variant == Variant::Faithful
        && m.cfg.dim_y == 1
        && b.device().is_cpu()
        && b.xc.dtype() == DType::F32
        && m.params.entries()[0].1.dtype() == DType::F32
        && b.nc > 0
}

type Guard<'a> = (StorageRef<'a>, &'a Layout);

/// The contiguous f32 values behind a read guard of a CPU tensor.
fn borrow<'a>(g: &'a Guard<'_>) -> Result<&'a [f32]> {
    let (s, l) = g;
    match &**s {
        Storage::Cpu(c) => {
            let v = c.as_slice::<f32>()?;
            match l.contiguous_offsets() {
                Some((a, e)) => Ok(&v[a..e]),
                None => candle_core::bail!("tape: a non-contiguous input {:?}", l.shape()),
            }
        }
        _ => candle_core::bail!("tape: the tape runs on the CPU only"),
    }
}

fn guard(t: &Tensor) -> Guard<'_> {
    t.storage_and_layout()
}

/// The (loss, flat gradient in `state_dict` order) of `b`: the summed NLL of its real
/// target points divided by `denom`, as [`Gpo::loss_over`] and its autograd backward give.
/// Call only where [`applies`] holds.
pub fn loss_and_grad(m: &Gpo, b: &ModelBatch, denom: f64) -> Result<(f32, Vec<f32>)> {
    loss_and_grad_with(m, b, denom, None)
}

/// [`loss_and_grad`], reading the embedder's first-layer x-part from `xp` (computed once
/// for every shard of a step that shares its points, [`XPart`]) instead of computing it.
/// The result is bitwise the same.
pub fn loss_and_grad_with(
    m: &Gpo,
    b: &ModelBatch,
    denom: f64,
    xp: Option<&XPart>,
) -> Result<(f32, Vec<f32>)> {
    if !applies(m, b) {
        candle_core::bail!("tape: this module or batch needs candle's autograd");
    }
    if !(denom > 0.0 && denom.is_finite()) {
        candle_core::bail!("the loss denominator must be positive, got {denom}");
    }
    let cfg = &m.cfg;
    let (dx, d, f) = (cfg.dim_x, cfg.d_model, cfg.dim_feedforward);
    // Every parameter, borrowed in place.
    let guards: Vec<Guard> = m
        .params
        .entries()
        .iter()
        .map(|(_, v)| guard(v.as_tensor()))
        .collect();
    let mut ws = std::collections::HashMap::new();
    let mut off = 0;
    for ((name, _), g) in m.params.entries().iter().zip(&guards) {
        let v = borrow(g)?;
        ws.insert(name.as_str(), W { v, off });
        off += v.len();
    }
    let count = off;
    let w = |name: &str| -> Result<W> {
        ws.get(name)
            .copied()
            .ok_or_else(|| candle_core::Error::Msg(format!("tape: no parameter `{name}`")))
    };
    let (xc_g, xt_g, yc_g) = (guard(&b.xc), guard(&b.xt), guard(&b.yc));
    let (xc, xt, yc) = (borrow(&xc_g)?, borrow(&xt_g)?, borrow(&yc_g)?);
    let (g, nc, nt) = (b.groups, b.nc, b.nt);
    let gx = b.xc.dims()[0];
    let rows = Rows {
        g,
        nc,
        nt,
        c: g * nc,
        r: g * (nc + nt),
    };
    let zeros = vec![0f32; nc];
    let masks: Vec<&[f32]> = (0..g)
        .map(|gi| match &b.ctx_mask {
            Some(mk) => &mk[gi * nc..(gi + 1) * nc],
            None => &zeros[..],
        })
        .collect();
    let heads = Heads {
        d,
        heads: cfg.nhead,
        scale: (1.0 / ((d / cfg.nhead) as f64).sqrt()) as f32,
    };
    let layers: Vec<Layer> = (0..cfg.num_layers)
        .map(|l| {
            let n = |s: &str| w(&format!("encoder.layers.{l}.{s}"));
            Ok(Layer {
                p: LayerParams {
                    in_w: n("self_attn.in_proj_weight")?,
                    in_b: n("self_attn.in_proj_bias")?,
                    out_w: n("self_attn.out_proj.weight")?,
                    out_b: n("self_attn.out_proj.bias")?,
                    l1_w: n("linear1.weight")?,
                    l1_b: n("linear1.bias")?,
                    l2_w: n("linear2.weight")?,
                    l2_b: n("linear2.bias")?,
                    n1_w: n("norm1.weight")?,
                    n1_b: n("norm1.bias")?,
                    n2_w: n("norm2.weight")?,
                    n2_b: n("norm2.bias")?,
                },
                heads,
                ffn: f,
                eps: cfg.layer_norm_eps as f32,
                last: l + 1 == cfg.num_layers,
                // The first layer's target rows are the embedder's, one copy per group.
                shared_targets: l == 0 && gx == 1,
            })
        })
        .collect::<Result<_>>()?;
    let emb: Vec<(W, W)> = (0..cfg.emb_depth)
        .map(|k| {
            Ok((
                w(&format!("embedder.{}.weight", 2 * k))?,
                w(&format!("embedder.{}.bias", 2 * k))?,
            ))
        })
        .collect::<Result<_>>()?;
    let (w0, b0) = emb[0];
    let k0 = dx + 1;

    // ---- forward
    // The embedder's first layer: the x-part once per distinct x, then each group's y.
    // Groups that share x read it from an [`XPart`] (the caller's, or computed here).
    let own_xp;
    let xp = match xp {
        Some(p) => Some(p),
        None if gx == 1 => {
            own_xp = XPart::of(m, b, false)?;
            Some(&own_xp)
        }
        None => None,
    };
    if let Some(p) = xp {
        p.check(b, d)?;
    }
    let own_a1;
    let a1: &[f32] = match xp {
        Some(p) => &p.ctx,
        None => {
            let mut a = buf(gx * nc * d);
            linear_forward(&mut a, xc, (w0.v, k0), b0.v, (gx * nc, d, dx), false);
            own_a1 = a;
            &own_a1
        }
    };
    let mut e0c = buf(rows.c * d);
    for gi in 0..g {
        let src = if gx == 1 { 0 } else { gi };
        for i in 0..nc {
            let y = yc[gi * nc + i];
            let from = &a1[(src * nc + i) * d..(src * nc + i + 1) * d];
            let to = &mut e0c[(gi * nc + i) * d..(gi * nc + i + 1) * d];
            for p in 0..d {
                to[p] = (from[p] + y * w0.v[p * k0 + dx]).max(0.0);
            }
        }
    }
    let ctx_acts = embedder_tail(&emb, e0c, rows.c, d);
    // Targets carry y = 0: their embedding depends on x alone.
    let mut e0t = buf(gx * nt * d);
    match xp {
        Some(p) => e0t.copy_from_slice(&p.tgt),
        None => linear_forward(&mut e0t, xt, (w0.v, k0), b0.v, (gx * nt, d, dx), true),
    }
    let tgt_acts = embedder_tail(&emb, e0t, gx * nt, d);
    let mut h0 = buf(rows.r * d);
    h0[..rows.c * d].copy_from_slice(ctx_acts.last().expect("embedder output"));
    let et = tgt_acts.last().expect("embedder output");
    for gi in 0..g {
        let src = if gx == 1 { 0 } else { gi };
        h0[(rows.c + gi * nt) * d..(rows.c + (gi + 1) * nt) * d]
            .copy_from_slice(&et[src * nt * d..(src + 1) * nt * d]);
    }
    let mut hs = vec![h0];
    let mut acts = Vec::with_capacity(layers.len());
    for layer in &layers {
        let a = layer.forward(hs.last().expect("layer input"), &rows, &masks);
        acts.push(a);
        if !layer.last {
            let out = std::mem::take(&mut acts.last_mut().expect("acts").out);
            hs.push(out);
        }
    }
    let z = &acts.last().expect("a layer").out; // [G·Nt, d]
    let t = g * nt;
    let (pw0, pb0) = (w("predictor.0.weight")?, w("predictor.0.bias")?);
    let (pw2, pb2) = (w("predictor.2.weight")?, w("predictor.2.bias")?);
    let mut p1 = buf(t * f);
    linear_forward(&mut p1, z, (pw0.v, d), pb0.v, (t, f, d), true);
    let mut out = buf(t * 2);
    linear_forward(&mut out, &p1, (pw2.v, f), pb2.v, (t, 2, f), false);
    let probs = segment_probs(&out, nt, &b.segments);
    let loss = (nll_sum(&out, &probs, &b.yt, nt, &b.segments) / denom) as f32;

    // ---- backward
    let mut grad = vec![0f32; count];
    let mut dout = buf(t * 2);
    nll_grad(
        &mut dout,
        (&out, &probs),
        &b.yt,
        nt,
        &b.segments,
        (1.0 / denom) as f32,
    );
    let (dw, db) = two(&mut grad, pw2.r(), pb2.r());
    linear_param_grads((dw, f), db, &dout, &p1, (t, 2, f));
    let mut dp1 = buf(t * f);
    linear_input_grad(&mut dp1, &dout, (pw2.v, f), (t, 2, f), false);
    relu_mask(&mut dp1, &p1);
    let (dw, db) = two(&mut grad, pw0.r(), pb0.r());
    linear_param_grads((dw, d), db, &dp1, z, (t, f, d));
    let mut dh = buf(t * d);
    linear_input_grad(&mut dh, &dp1, (pw0.v, d), (t, f, d), false);
    for (l, layer) in layers.iter().enumerate().rev() {
        dh = layer.backward(&hs[l], &acts[l], &rows, &dh, &mut grad);
    }
    // The embedder: targets first (their rows summed over groups when x is shared).
    let shared = gx == 1 && g > 1;
    let dt = fold_groups(&dh[rows.c * d..], g, shared);
    let dt0 = embedder_tail_backward(&emb, &tgt_acts, dt, gx * nt, d, &mut grad);
    let dc0 = embedder_tail_backward(
        &emb,
        &ctx_acts,
        fold_groups(&dh[..rows.c * d], g, false),
        rows.c,
        d,
        &mut grad,
    );
    // The first layer: its x columns (row stride dim_x + 1), its y column and its bias.
    let (dw0, db0) = two(&mut grad, w0.r(), b0.r());
    let dc_x = fold_groups(&dc0, g, shared);
    linear_param_grads((&mut *dw0, k0), &mut *db0, &dc_x, xc, (gx * nc, d, dx));
    linear_param_grads((dw0, k0), db0, &dt0, xt, (gx * nt, d, dx));
    for (i, row) in dc0.chunks_exact(d).enumerate() {
        let y = yc[i];
        if y != 0.0 {
            for p in 0..d {
                dw0[p * k0 + dx] += row[p] * y;
            }
        }
    }
    Ok((loss, grad))
}

/// `x`, `groups` blocks of equal size, summed block-wise into one block when `sum` (the
/// gradient of a value every group shares), else copied.
fn fold_groups(x: &[f32], groups: usize, sum: bool) -> Buf {
    let n = if sum { x.len() / groups } else { x.len() };
    let mut s = buf(n);
    s.copy_from_slice(&x[..n]);
    if sum {
        for gi in 1..groups {
            for (a, v) in s.iter_mut().zip(&x[gi * n..(gi + 1) * n]) {
                *a += v;
            }
        }
    }
    s
}

/// The embedder's layers after the first, on `e0` (the first layer's ReLU'd output,
/// `[rows, d]`): every layer's output in order, `e0` first; ReLU between layers, none after
/// the last.
fn embedder_tail(emb: &[(W, W)], e0: Buf, rows: usize, d: usize) -> Vec<Buf> {
    let mut acts = vec![e0];
    for (k, (wk, bk)) in emb.iter().enumerate().skip(1) {
        let mut y = buf(rows * d);
        let x = acts.last().expect("input");
        linear_forward(&mut y, x, (wk.v, d), bk.v, (rows, d, d), k + 1 < emb.len());
        acts.push(y);
    }
    acts
}

/// The backward of [`embedder_tail`] from the gradient of its output: adds the tail's
/// parameter gradients and returns the gradient of the first layer's pre-activation (ReLU
/// applied).
fn embedder_tail_backward(
    emb: &[(W, W)],
    acts: &[Buf],
    mut g: Buf,
    rows: usize,
    d: usize,
    grad: &mut [f32],
) -> Buf {
    for k in (1..emb.len()).rev() {
        if k + 1 < emb.len() {
            relu_mask(&mut g, &acts[k]);
        }
        let (wk, bk) = emb[k];
        let (dw, db) = two(grad, wk.r(), bk.r());
        linear_param_grads((dw, d), db, &g, &acts[k - 1], (rows, d, d));
        let mut gi = buf(rows * d);
        linear_input_grad(&mut gi, &g, (wk.v, d), (rows, d, d), false);
        g = gi;
    }
    relu_mask(&mut g, &acts[0]);
    g
}
