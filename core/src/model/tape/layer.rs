//! One post-LN encoder layer of the tape ([`super`]): its forward, keeping what the
//! backward reads, and its backward, adding the layer's parameter gradients straight into
//! the flat gradient.
//!
//! Rows are laid out as the tape keeps them: every group's context rows (`G·Nc`), then every
//! group's target rows (`G·Nt`). Keys and values come from the context block only; the
//! queries are all rows, or on the last layer the target block alone.

use super::buf::{buf, Buf};
use super::{two, Rows, W};
use crate::model::balance;
use crate::model::ops::{
    layer_norm_affine, layer_norm_backward, layer_norm_forward, linear_forward,
    linear_forward_residual, linear_input_grad, linear_param_grads, relu_mask, transpose_cols,
    AttnGrads, Heads, NormSource,
};

/// A layer's parameters, by their parts of the official names.
pub(super) struct LayerParams<'a> {
    pub in_w: W<'a>,
    pub in_b: W<'a>,
    pub out_w: W<'a>,
    pub out_b: W<'a>,
    pub l1_w: W<'a>,
    pub l1_b: W<'a>,
    pub l2_w: W<'a>,
    pub l2_b: W<'a>,
    pub n1_w: W<'a>,
    pub n1_b: W<'a>,
    pub n2_w: W<'a>,
    pub n2_b: W<'a>,
}

/// What a layer's forward keeps for its backward, and its output.
pub(super) struct Acts {
    kv: Buf,
    q: Buf,
    /// Attention probabilities of the context queries, `[G, H, Nc, Nc]` (empty on the last
    /// layer), and of the target queries, `[G, H, Nt, Nc]`.
    p_ctx: Buf,
    p_tgt: Buf,
    o: Buf,
    /// The two LayerNorms' normalized rows `x̂` and each row's `1/σ`, which their
    /// backwards read instead of the pre-norm sums; the first's output (the feed-forward
    /// block's input) is `x̂·γ + β` again, bit for bit, where the backward needs it.
    xh1: Buf,
    rs1: Buf,
    f1: Buf,
    xh2: Buf,
    rs2: Buf,
    /// The layer's output rows (the query rows).
    pub out: Buf,
}

/// One encoder layer with its sizes.
pub(super) struct Layer<'a> {
    pub p: LayerParams<'a>,
    pub heads: Heads,
    pub ffn: usize,
    pub eps: f32,
    /// Whether this is the last layer (queries: target rows only).
    pub last: bool,
    /// Whether every group's target rows of this layer's input are the same rows (the
    /// first layer when the groups share x: a target's embedding depends on x alone). Its
    /// target queries are then projected once, from group 0's rows, and their gradient
    /// summed over the groups before it is projected back: exact savings of `(G − 1)·Nt`
    /// rows of the query projection, forward and backward.
    pub shared_targets: bool,
}

impl Layer<'_> {
    /// The first query row and the number of query rows.
    fn queries(&self, rows: &Rows) -> (usize, usize) {
        let q0 = if self.last { rows.c } else { 0 };
        (q0, rows.r - q0)
    }

    /// The first row of group 0's target queries within the query rows.
    fn target_q0(&self, rows: &Rows) -> usize {
        if self.last {
            0
        } else {
            rows.c
        }
    }

    /// The rows the query projection computes: all query rows, or with
    /// [`Layer::shared_targets`] the context rows and group 0's target rows (contiguous).
    fn projected(&self, rows: &Rows) -> usize {
        let (_, nq) = self.queries(rows);
        if self.shares_targets() {
            rows.c + rows.nt
        } else {
            nq
        }
    }

    /// Group `gi`'s first target row among the projected query rows.
    fn target_q_row(&self, rows: &Rows, gi: usize) -> usize {
        self.target_q0(rows)
            + if self.shares_targets() {
                0
            } else {
                gi * rows.nt
            }
    }

    /// Whether the target queries are projected once for every group (never on the last
    /// layer, whose queries are the target block alone).
    fn shares_targets(&self) -> bool {
        self.shared_targets && !self.last
    }

    /// The layer on `hin` (`[R, d]`), with each group's additive key mask `masks[g]`.
    pub fn forward(&self, hin: &[f32], rows: &Rows, masks: &[&[f32]]) -> Acts {
        let (d, f, h) = (self.heads.d, self.ffn, self.heads.heads);
        let p = &self.p;
        let (q0, nq) = self.queries(rows);
        let (g, nc, nt) = (rows.g, rows.nc, rows.nt);
        let mut kv = buf(rows.c * 2 * d);
        linear_forward(
            &mut kv,
            &hin[..rows.c * d],
            (&p.in_w.v[d * d..], d),
            &p.in_b.v[d..],
            (rows.c, 2 * d, d),
            false,
        );
        let nqp = self.projected(rows);
        let mut q = buf(nqp * d);
        linear_forward(
            &mut q,
            &hin[q0 * d..],
            (&p.in_w.v[..d * d], d),
            &p.in_b.v[..d],
            (nqp, d, d),
            false,
        );
        // The keys transposed, for every group's `Q Kᵀ` (scratch, back in the free list
        // when the forward returns).
        let mut kt = buf(d * rows.c);
        transpose_cols(&mut kt, &kv, (rows.c, 2 * d), (0, d));
        let mut o = buf(nq * d);
        let mut p_ctx = buf(if self.last { 0 } else { g * h * nc * nc });
        let mut p_tgt = buf(g * h * nt * nc);
        // Each group writes its own probabilities and output rows: the groups run in
        // order, or spread over idle threads at a step's end ([`balance`]).
        {
            let (o_ctx, o_tgt) = o.split_at_mut(if self.last { 0 } else { rows.c * d });
            let o_ctx = per_group(o_ctx, g, if self.last { 0 } else { nc * d });
            let o_tgt = per_group(o_tgt, g, nt * d);
            let p_c = per_group(&mut p_ctx, g, if self.last { 0 } else { h * nc * nc });
            let p_t = per_group(&mut p_tgt, g, h * nt * nc);
            let tasks: Vec<_> = (o_ctx.into_iter().zip(o_tgt))
                .zip(p_c.into_iter().zip(p_t))
                .enumerate()
                .collect();
            let (q, kv, kt) = (&q[..], &kv[..], (&kt[..], rows.c));
            balance::for_each(tasks, |(gi, ((oc, ot), (pc, pt)))| {
                let mask = masks[gi];
                if !self.last {
                    let qrows = (gi * nc, 0, nc);
                    self.heads
                        .forward(q, kv, kt, oc, pc, qrows, (gi * nc, nc), mask);
                }
                let qrows = (self.target_q_row(rows, gi), 0, nt);
                self.heads
                    .forward(q, kv, kt, ot, pt, qrows, (gi * nc, nc), mask);
            });
        }
        // The attention's output projection plus the residual hq (IEEE addition commutes:
        // the same bits as the composite path's order).
        let mut r1 = buf(nq * d);
        linear_forward_residual(
            &mut r1,
            &o,
            (p.out_w.v, d),
            p.out_b.v,
            &hin[q0 * d..],
            (nq, d, d),
        );
        // The pre-norm sums and the first norm's output are scratch, back in the free list
        // (and so still in cache for the next request) once read: the backward reads x̂.
        let mut x1 = buf(nq * d);
        let (mut xh1, mut rs1) = (buf(nq * d), buf(nq));
        let (g1, b1) = (p.n1_w.v, p.n1_b.v);
        layer_norm_forward(&mut x1, &r1, g1, b1, self.eps, Some((&mut xh1, &mut rs1)));
        drop(r1);
        let mut f1 = buf(nq * f);
        linear_forward(&mut f1, &x1, (p.l1_w.v, d), p.l1_b.v, (nq, f, d), true);
        let mut r2 = buf(nq * d);
        linear_forward_residual(&mut r2, &f1, (p.l2_w.v, f), p.l2_b.v, &x1, (nq, d, f));
        drop(x1);
        let mut out = buf(nq * d);
        let (mut xh2, mut rs2) = (buf(nq * d), buf(nq));
        let (g2, b2) = (p.n2_w.v, p.n2_b.v);
        layer_norm_forward(&mut out, &r2, g2, b2, self.eps, Some((&mut xh2, &mut rs2)));
        drop(r2);
        Acts {
            kv,
            q,
            p_ctx,
            p_tgt,
            o,
            xh1,
            rs1,
            f1,
            xh2,
            rs2,
            out,
        }
    }

    /// The layer's backward from the gradient of its output rows `dout`: adds its
    /// parameter gradients to `grad` (the flat gradient) and returns the gradient of its
    /// input `hin` (`[R, d]`).
    pub fn backward(
        &self,
        hin: &[f32],
        a: &Acts,
        rows: &Rows,
        dout: &[f32],
        grad: &mut [f32],
    ) -> Buf {
        let (d, f, h) = (self.heads.d, self.ffn, self.heads.heads);
        let p = &self.p;
        let (q0, nq) = self.queries(rows);
        let (g, nc, nt, c) = (rows.g, rows.nc, rows.nt, rows.c);
        // LayerNorm 2, then the feed-forward block and its residual.
        let src2 = NormSource::Kept {
            xhat: &a.xh2,
            rstd: &a.rs2,
        };
        let src1 = NormSource::Kept {
            xhat: &a.xh1,
            rstd: &a.rs1,
        };
        let mut dr2 = buf(nq * d);
        layer_norm_backward(
            &mut dr2,
            two(grad, p.n2_w.r(), p.n2_b.r()),
            src2,
            p.n2_w.v,
            dout,
            self.eps,
        );
        let (dw, db) = two(grad, p.l2_w.r(), p.l2_b.r());
        linear_param_grads((dw, f), db, &dr2, &a.f1, (nq, d, f));
        let mut df1 = buf(nq * f);
        linear_input_grad(&mut df1, &dr2, (p.l2_w.v, f), (nq, d, f), false);
        relu_mask(&mut df1, &a.f1);
        let (dw, db) = two(grad, p.l1_w.r(), p.l1_b.r());
        let mut x1 = buf(nq * d);
        layer_norm_affine(&mut x1, &a.xh1, p.n1_w.v, p.n1_b.v);
        linear_param_grads((dw, d), db, &df1, &x1, (nq, f, d));
        drop(x1);
        let mut dx1 = dr2;
        linear_input_grad(&mut dx1, &df1, (p.l1_w.v, d), (nq, f, d), true);
        // LayerNorm 1, then attention and its residual.
        let mut dr1 = buf(nq * d);
        layer_norm_backward(
            &mut dr1,
            two(grad, p.n1_w.r(), p.n1_b.r()),
            src1,
            p.n1_w.v,
            &dx1,
            self.eps,
        );
        let (dw, db) = two(grad, p.out_w.r(), p.out_b.r());
        linear_param_grads((dw, d), db, &dr1, &a.o, (nq, d, d));
        let mut d_o = buf(nq * d);
        linear_input_grad(&mut d_o, &dr1, (p.out_w.v, d), (nq, d, d), false);
        let nqp = self.projected(rows);
        let mut dq = buf(nqp * d);
        let mut dkv = buf(c * 2 * d);
        let tq0 = self.target_q0(rows);
        // The values transposed, for every group's `dO Vᵀ`.
        let mut vt = buf(d * c);
        transpose_cols(&mut vt, &a.kv, (c, 2 * d), (d, d));
        let vt = (&vt[..], c);
        // Each group's context queries, then each group's target queries: per group the
        // same order as one loop (its keys' and values' gradient written by the first,
        // added to by the second), and groups spread over idle threads at a step's end
        // ([`balance`]), except where they add to shared target queries' gradient.
        {
            let (dq_ctx, dq_tgt) = dq.split_at_mut(tq0 * d);
            let mut dkv_g = per_group(&mut dkv, g, nc * 2 * d);
            let ctx = |gi: usize, dq: &mut [f32], dkv: &mut [f32]| {
                let pc = &a.p_ctx[gi * h * nc * nc..(gi + 1) * h * nc * nc];
                let mut ds = buf(nc * nc);
                let grads = AttnGrads {
                    dq: (dq, 0),
                    dkv: (dkv, 0),
                    acc_q: false,
                    acc_kv: false,
                };
                let rows_q = (gi * nc, gi * nc, nc);
                let kvr = (gi * nc, nc);
                self.heads
                    .backward(&a.q, &a.kv, vt, pc, &d_o, grads, &mut ds, rows_q, kvr);
            };
            let tgt = |gi: usize, dq: &mut [f32], acc_q: bool, dkv: &mut [f32]| {
                let pt = &a.p_tgt[gi * h * nt * nc..(gi + 1) * h * nt * nc];
                let mut ds = buf(nt * nc);
                let grads = AttnGrads {
                    dq: (dq, 0),
                    dkv: (dkv, 0),
                    acc_q,
                    acc_kv: !self.last,
                };
                let rows_q = (self.target_q_row(rows, gi), tq0 + gi * nt, nt);
                let kvr = (gi * nc, nc);
                self.heads
                    .backward(&a.q, &a.kv, vt, pt, &d_o, grads, &mut ds, rows_q, kvr);
            };
            if !self.last {
                let dq_c = per_group(dq_ctx, g, nc * d);
                let tasks: Vec<_> = dq_c.into_iter().zip(dkv_g.iter_mut()).enumerate().collect();
                balance::for_each(tasks, |(gi, (dq, dkv))| ctx(gi, dq, dkv));
            }
            if self.shares_targets() {
                // Shared target queries: group 0 writes their gradient, the others add to
                // it, in group order.
                for (gi, dkv) in dkv_g.iter_mut().enumerate() {
                    tgt(gi, &mut dq_tgt[..nt * d], gi > 0, dkv);
                }
            } else {
                let dq_t = per_group(dq_tgt, g, nt * d);
                let tasks: Vec<_> = dq_t.into_iter().zip(dkv_g.iter_mut()).enumerate().collect();
                balance::for_each(tasks, |(gi, (dq, dkv))| tgt(gi, dq, false, dkv));
            }
        }
        // The in-projection: queries (rows 0..d of its weight), keys and values (d..3d).
        let (iw, ib) = (p.in_w.off, p.in_b.off);
        let mut dh = buf(rows.r * d);
        {
            let (dw, db) = two(grad, (iw, d * d), (ib, d));
            linear_param_grads((dw, d), db, &dq, &hin[q0 * d..], (nqp, d, d));
            let dhq = &mut dh[q0 * d..];
            dhq.copy_from_slice(&dr1);
            // With shared target queries, their summed gradient goes to group 0's rows,
            // which the embedder's backward sums with the others' anyway.
            let w_q = (&p.in_w.v[..d * d], d);
            linear_input_grad(&mut dhq[..nqp * d], &dq, w_q, (nqp, d, d), true);
        }
        let (dw, db) = two(grad, (iw + d * d, 2 * d * d), (ib + d, 2 * d));
        linear_param_grads((dw, d), db, &dkv, &hin[..c * d], (c, 2 * d, d));
        // On the last layer nothing else reaches the context rows: write them.
        linear_input_grad(
            &mut dh[..c * d],
            &dkv,
            (&p.in_w.v[d * d..], d),
            (c, 2 * d, d),
            !self.last,
        );
        dh
    }
}

/// `v` cut into `g` consecutive pieces of `n` values each (empty ones when `n` is 0), one a
/// group.
fn per_group(v: &mut [f32], g: usize, n: usize) -> Vec<&mut [f32]> {
    let mut rest = &mut v[..g * n];
    let mut out = Vec::with_capacity(g);
    for _ in 0..g {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
        out.push(a);
        rest = b;
    }
    out
}
