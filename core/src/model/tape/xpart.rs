//! The embedder's first layer on x alone, computed once for every shard of a step.
//!
//! Why it exists: on OpinionQA-style steps every group answers the same questions, so x is
//! the same in every shard, and so is the first embedder layer's x-part: `x W_xᵀ + b` on the
//! context rows (y's column is added per group afterwards) and `relu(x W_xᵀ + b)` on the
//! target rows (their y is 0). Each shard's tape computed both again. At d_x 4096 that
//! product is 2.8 % of a step's operations for each shard beyond the first
//! (BENCHMARKS.md, issue 16). [`XPart::of`] computes it once, the context rows and the
//! target rows cut into two even halves for two threads, and each shard's tape reads it
//! ([`super::loss_and_grad_with`]). A tape given none computes it with the same calls,
//! so the bits do not depend on who computed it.
//!
//! Only the forward is shared. The first layer's weight gradient stays in each shard, since
//! summing the shards' input gradients before that product would tie the result to how
//! shards are spread over replicas.

use super::{applies, borrow, guard};
use crate::model::ops::linear_forward;
use crate::model::{Gpo, ModelBatch};
use candle_core::Result;

/// The first embedder layer's x-part of one set of shared points (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct XPart {
    nc: usize,
    nt: usize,
    d: usize,
    /// `xc W_xᵀ + b`, `[Nc, d]`: the context rows before y's column and the ReLU.
    pub(super) ctx: Vec<f32>,
    /// `relu(xt W_xᵀ + b)`, `[Nt, d]`: the target rows' first activation.
    pub(super) tgt: Vec<f32>,
}

impl XPart {
    /// The x-part of `b`'s points under `m`'s current parameters. `b`'s groups must share
    /// their points (one x block) and the tape must apply ([`applies`]). With `parallel`,
    /// the context and target products run on two threads of rayon's pool.
    pub fn of(m: &Gpo, b: &ModelBatch, parallel: bool) -> Result<XPart> {
        if !applies(m, b) {
            candle_core::bail!("tape: this module or batch needs candle's autograd");
        }
        if b.xc.dims()[0] != 1 {
            candle_core::bail!(
                "tape: the x-part is shared only by groups that share their points ({} x blocks)",
                b.xc.dims()[0]
            );
        }
        let (dx, d) = (m.cfg.dim_x, m.cfg.d_model);
        let (w_g, b_g) = (
            guard(m.params.get("embedder.0.weight").as_tensor()),
            guard(m.params.get("embedder.0.bias").as_tensor()),
        );
        let (w0, b0) = (borrow(&w_g)?, borrow(&b_g)?);
        let (xc_g, xt_g) = (guard(&b.xc), guard(&b.xt));
        let (xc, xt) = (borrow(&xc_g)?, borrow(&xt_g)?);
        let (nc, nt) = (b.nc, b.nt);
        let (mut ctx, mut tgt) = (vec![0f32; nc * d], vec![0f32; nt * d]);
        // The rows, context then target, cut in two halves of the same size, so that two
        // threads share the work evenly. The cut depends on the shape alone (not on the
        // threads), so every caller gets the same products and the same bits.
        let (hc, ht) = Self::cut(nc, nt);
        let (c0, c1) = ctx.split_at_mut(hc * d);
        let (t0, t1) = tgt.split_at_mut(ht * d);
        let lin = |y: &mut [f32], x: &[f32], rows: std::ops::Range<usize>, relu: bool| {
            if !rows.is_empty() {
                let x = &x[rows.start * dx..rows.end * dx];
                linear_forward(y, x, (w0, dx + 1), b0, (rows.len(), d, dx), relu);
            }
        };
        let mut first = move || {
            lin(c0, xc, 0..hc, false);
            lin(t0, xt, 0..ht, true);
        };
        let mut second = move || {
            lin(c1, xc, hc..nc, false);
            lin(t1, xt, ht..nt, true);
        };
        if parallel {
            rayon::join(first, second);
        } else {
            first();
            second();
        }
        Ok(XPart {
            nc,
            nt,
            d,
            ctx,
            tgt,
        })
    }

    /// Where [`XPart::of`] cuts `nc` context and `nt` target rows in two: the first half is
    /// context rows `0..hc` and target rows `0..ht`, the second the rest.
    pub fn cut(nc: usize, nt: usize) -> (usize, usize) {
        let half = (nc + nt).div_ceil(2);
        (half.min(nc), half.saturating_sub(nc))
    }

    /// An error unless this x-part is of `b`'s shape: `b`'s groups share one x block of
    /// `nc` context and `nt` target points, and the model's width is `d`.
    pub(super) fn check(&self, b: &ModelBatch, d: usize) -> Result<()> {
        if b.xc.dims()[0] != 1 || (b.nc, b.nt, d) != (self.nc, self.nt, self.d) {
            candle_core::bail!(
                "tape: an x-part of {} context and {} target points (width {}) given for a \
                 batch of {} x blocks of {} and {} points (width {d})",
                self.nc,
                self.nt,
                self.d,
                b.xc.dims()[0],
                b.nc,
                b.nt
            );
        }
        Ok(())
    }
}
