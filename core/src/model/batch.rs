//! The GPO module's input for one meta-batch: context and target points of G groups.
//!
//! On OpinionQA-style steps every group sees the same questions, so x is stored once
//! (`[1, N, D]`) and only y differs per group; the module exploits that exactly.

use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

/// One meta-batch as the module consumes it.
#[derive(Debug, Clone)]
pub struct ModelBatch {
    /// Number of groups G.
    pub groups: usize,
    /// Context points per group (padded), Nc.
    pub nc: usize,
    /// Target points per group (padded), Nt.
    pub nt: usize,
    /// Context x, `[Gx, Nc, D]`, where Gx is 1 when all groups share the points, else G.
    pub xc: Tensor,
    /// Target x, `[Gx, Nt, D]`.
    pub xt: Tensor,
    /// Context y, `[G, Nc, 1]` (0 on padding).
    pub yc: Tensor,
    /// Target y, `G * Nt` values (0 on padding).
    pub yt: Arc<Vec<f32>>,
    /// Additive key mask over context points, `G * Nc` values (0 or −∞); `None` if no padding.
    pub ctx_mask: Option<Arc<Vec<f32>>>,
    /// Per group, the target questions as `(start, len)` runs of target points.
    pub segments: Arc<Vec<Vec<(usize, usize)>>>,
    /// The population prior of every point, for the variants that read it
    /// ([`crate::model::Variant`]): context `[G, Nc, 1]` (0 on padding) and targets
    /// `[G, Nt, 1]` (1 on padding). `None` for the faithful module.
    pub prior: Option<(Tensor, Tensor)>,
}

impl ModelBatch {
    /// Whether x is shared by all groups.
    pub fn shared_x(&self) -> bool {
        self.xc.dims()[0] == 1 && self.groups > 1
    }

    /// Builds a batch from the tensors of the official layout: `xc [G,Nc,D]`, `yc [G,Nc,1]`,
    /// `xt [G,Nt,D]`, `yt [G,Nt,1]` and `tarqlen [G,Q]` (option counts of each target
    /// question, zero-padded). Like the official code, a point whose x sums to exactly 0 is
    /// padding.
    pub fn from_official(
        xc: &Tensor,
        yc: &Tensor,
        xt: &Tensor,
        yt: &Tensor,
        tarqlen: &[Vec<i64>],
    ) -> std::result::Result<Self, String> {
        let e = |e: candle_core::Error| e.to_string();
        let (g, nc, d) = xc
            .dims3()
            .map_err(|_| format!("xc must be [G, Nc, D], got {:?}", xc.dims()))?;
        let (g2, nt, d2) = xt
            .dims3()
            .map_err(|_| format!("xt must be [G, Nt, D], got {:?}", xt.dims()))?;
        if g2 != g || d2 != d {
            return Err(format!(
                "xt is {:?} but xc is {:?}: G and D must agree",
                xt.dims(),
                xc.dims()
            ));
        }
        if yc.dims() != [g, nc, 1] {
            return Err(format!("yc must be [{g}, {nc}, 1], got {:?}", yc.dims()));
        }
        if yt.dims() != [g, nt, 1] {
            return Err(format!("yt must be [{g}, {nt}, 1], got {:?}", yt.dims()));
        }
        if tarqlen.len() != g {
            return Err(format!(
                "tarqlen has {} rows, expected G = {g}",
                tarqlen.len()
            ));
        }
        let ctx_sum: Vec<f32> = xc
            .sum(2)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(e)?;
        let mask: Vec<f32> = ctx_sum
            .iter()
            .map(|&s| if s == 0.0 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let mut segments = Vec::with_capacity(g);
        for (gi, row) in tarqlen.iter().enumerate() {
            let mut start = 0usize;
            let mut segs = Vec::new();
            for &n in row {
                if n < 0 {
                    return Err(format!("tarqlen[{gi}] has a negative option count {n}"));
                }
                if n == 0 {
                    continue;
                }
                segs.push((start, n as usize));
                start += n as usize;
            }
            if start > nt {
                return Err(format!(
                    "tarqlen[{gi}] covers {start} target points but Nt is {nt}"
                ));
            }
            segments.push(segs);
        }
        Ok(ModelBatch {
            groups: g,
            nc,
            nt,
            xc: xc.clone(),
            xt: xt.clone(),
            yc: yc.clone(),
            yt: Arc::new(yt.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?),
            ctx_mask: mask.iter().any(|&m| m != 0.0).then(|| Arc::new(mask)),
            segments: Arc::new(segments),
            prior: None,
        })
    }

    /// This batch with the population prior of its points: `pc` holds `G * Nc` values,
    /// `pt` `G * Nt` (see [`ModelBatch::prior`]).
    pub fn with_prior(mut self, pc: Vec<f32>, pt: Vec<f32>) -> Result<Self> {
        let dev = self.xc.device().clone();
        let dt = self.xc.dtype();
        self.prior = Some((
            Tensor::from_vec(pc, (self.groups, self.nc, 1), &dev)?.to_dtype(dt)?,
            Tensor::from_vec(pt, (self.groups, self.nt, 1), &dev)?.to_dtype(dt)?,
        ));
        Ok(self)
    }

    /// Target points that belong to a question (not padding), per group.
    pub fn real_targets(&self) -> Vec<usize> {
        self.segments
            .iter()
            .map(|s| s.iter().map(|&(_, n)| n).sum())
            .collect()
    }

    /// Device of the batch's tensors.
    pub fn device(&self) -> &Device {
        self.xc.device()
    }
}

/// Builds a [`ModelBatch`] from plain vectors. `xc`/`xt` hold `gx * n * d` values with
/// `gx` 1 (shared) or G.
#[allow(clippy::too_many_arguments)]
pub fn build_batch(
    groups: usize,
    d: usize,
    xc: Vec<f32>,
    xt: Vec<f32>,
    yc: Vec<f32>,
    yt: Vec<f32>,
    ctx_valid: &[bool],
    segments: Vec<Vec<(usize, usize)>>,
    device: &Device,
) -> Result<ModelBatch> {
    let nc = yc.len() / groups.max(1);
    let nt = yt.len() / groups.max(1);
    let gx = if xc.len() == nc * d && groups > 1 {
        1
    } else {
        groups
    };
    let mask: Vec<f32> = ctx_valid
        .iter()
        .map(|&v| if v { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    Ok(ModelBatch {
        groups,
        nc,
        nt,
        xc: Tensor::from_vec(xc, (gx, nc, d), device)?,
        xt: Tensor::from_vec(xt, (gx, nt, d), device)?,
        yc: Tensor::from_vec(yc, (groups, nc, 1), device)?,
        yt: Arc::new(yt),
        ctx_mask: ctx_valid.iter().any(|v| !v).then(|| Arc::new(mask)),
        segments: Arc::new(segments),
        prior: None,
    })
}
