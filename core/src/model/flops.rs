//! The floating-point work of a training step, counted from the shapes the module executes,
//! so a benchmark can say how far a step is from the machine's matrix-multiply roofline.
//!
//! Every matrix product of the forward pass ([`super::Gpo::forward`]) and of its backward
//! is listed as a [`Gemm`]: `batch` independent products of an `m × k` by a `k × n` matrix,
//! `2·batch·m·k·n` operations. A linear layer over `rows` inputs is `(rows, in, out)` forward,
//! then `(out, rows, in)` for its weight's gradient and `(rows, out, in)` for its input's,
//! except the embedder's first layer, whose input is data. Attention is two products per
//! head forward (scores, then weights × values) and four backward. Elementwise work (layer
//! norms, softmax, the loss, Adam) is left out: it is a few percent of the operations and
//! none of it runs on the matrix kernels.
//!
//! [`official_step_gemms`] lists what the official module computes on the same batch, so
//! a benchmark against it can say how much of a ratio is the exact savings (fewer
//! operations) and how much is speed per operation.

use super::GpoConfig;

/// The shape of one meta-batch as [`super::ModelBatch`] holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Groups G.
    pub groups: usize,
    /// Groups that own their x (1 when every group shares the points, else G).
    pub gx: usize,
    /// Context points per group (padded).
    pub nc: usize,
    /// Target points per group (padded).
    pub nt: usize,
}

impl BatchShape {
    /// The shape of a batch the module would consume.
    pub fn of(b: &super::ModelBatch) -> Self {
        BatchShape {
            groups: b.groups,
            gx: b.xc.dims()[0],
            nc: b.nc,
            nt: b.nt,
        }
    }
}

/// `batch` products of an `m × k` and a `k × n` matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Gemm {
    /// Multiply-adds counted as two operations.
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// Which pass a product belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

/// The matrix products of one forward and backward pass over a batch of shape `s`.
pub fn step_gemms(cfg: &GpoConfig, s: BatchShape) -> Vec<(Pass, Gemm)> {
    shard_gemms(cfg, s, true)
}

/// The products of a whole step cut into shards of shapes `shards`, as
/// [`crate::grad::step_gradient`] runs them: each shard's [`step_gemms`], except that when
/// every group of the step answers the same questions (`shared_points`) the embedder's
/// first-layer x-part is computed once for all shards ([`super::tape::XPart`]).
pub fn sharded_step_gemms(
    cfg: &GpoConfig,
    shards: &[BatchShape],
    shared_points: bool,
) -> Vec<(Pass, Gemm)> {
    let once = shared_points && shards.len() > 1 && shards.iter().all(|s| s.gx == 1);
    let mut v: Vec<_> = shards
        .iter()
        .flat_map(|&s| shard_gemms(cfg, s, !once))
        .collect();
    if once {
        v.extend(x_part_gemms(cfg, shards[0].nc, shards[0].nt));
    }
    v
}

/// The forward products of the embedder's first-layer x-part of `nc` context and `nt`
/// target points shared by all groups, in the two halves [`super::tape::XPart`] cuts.
fn x_part_gemms(cfg: &GpoConfig, nc: usize, nt: usize) -> Vec<(Pass, Gemm)> {
    let (hc, ht) = super::tape::XPart::cut(nc, nt);
    [hc, ht, nc - hc, nt - ht]
        .into_iter()
        .filter(|&m| m > 0)
        .map(|m| {
            let g = Gemm {
                batch: 1,
                m,
                k: cfg.dim_x,
                n: cfg.d_model,
            };
            (Pass::Forward, g)
        })
        .collect()
}

/// [`step_gemms`], with the shared x-part's forward products (`gx` = 1) left out unless
/// `x_part` (when another pass computed it).
fn shard_gemms(cfg: &GpoConfig, s: BatchShape, x_part: bool) -> Vec<(Pass, Gemm)> {
    let (d, f, dx) = (cfg.d_model, cfg.dim_feedforward, cfg.dim_x);
    let (g, gx, nc, nt) = (s.groups, s.gx, s.nc, s.nt);
    let n_all = nc + nt;
    // The embedder: x's part of the first layer once per distinct x (its input gradient
    // is not needed: x is data); y's part is elementwise.
    let mut v = Vec::new();
    if gx == 1 && x_part {
        v.extend(x_part_gemms(cfg, nc, nt));
    } else if gx > 1 {
        v.push((
            Pass::Forward,
            Gemm {
                batch: 1,
                m: gx * nc,
                k: dx,
                n: d,
            },
        ));
        v.push((
            Pass::Forward,
            Gemm {
                batch: 1,
                m: gx * nt,
                k: dx,
                n: d,
            },
        ));
    }
    v.push((
        Pass::Backward,
        Gemm {
            batch: 1,
            m: d,
            k: gx * nc,
            n: dx,
        },
    ));
    v.push((
        Pass::Backward,
        Gemm {
            batch: 1,
            m: d,
            k: gx * nt,
            n: dx,
        },
    ));
    let mut linear = |rows: usize, i: usize, o: usize, input_grad: bool| {
        let one = |m, k, n| Gemm { batch: 1, m, k, n };
        v.push((Pass::Forward, one(rows, i, o)));
        v.push((Pass::Backward, one(o, rows, i)));
        if input_grad {
            v.push((Pass::Backward, one(rows, o, i)));
        }
    };
    for _ in 1..cfg.emb_depth {
        linear(g * nc, d, d, true);
        linear(gx * nt, d, d, true);
    }
    let mut attention = Vec::new();
    for l in 0..cfg.num_layers {
        // The last layer reads only the targets' rows: nothing after it uses the context's.
        let nq = if l + 1 == cfg.num_layers { nt } else { n_all };
        // The first layer's target rows are the embedder's: their queries once per x.
        let q_rows = if l == 0 && nq == n_all {
            g * nc + gx * nt
        } else {
            g * nq
        };
        linear(q_rows, d, d, true); // queries
        linear(g * nc, d, 2 * d, true); // keys and values of the context points
        attention.push(nq);
        linear(g * nq, d, d, true); // out_proj
        linear(g * nq, d, f, true);
        linear(g * nq, f, d, true);
    }
    linear(g * nt, d, f, true);
    linear(g * nt, f, 2 * cfg.dim_y, true);
    let (h, dh) = (cfg.nhead, d / cfg.nhead);
    for nq in attention {
        v.extend(attention_gemms(g * h, nq, nc, dh));
    }
    v
}

/// The matrix products of the official module's forward and backward on a batch of shape
/// `s`, as the PyTorch code computes them (`tools/reference/gpo_reference.py`): each group
/// embeds its own copy of every point, `[x; y]` together; every layer runs on all
/// `nc + nt` points, whose keys and values are all computed and all scored (the mask then
/// zeroes the targets' columns); the predictor reads the target rows. None of gpo's exact
/// savings (keys of the context only, the last layer on the targets only, shared x once and
/// with it the first layer's target queries) are taken.
pub fn official_step_gemms(cfg: &GpoConfig, s: BatchShape) -> Vec<(Pass, Gemm)> {
    let (d, f) = (cfg.d_model, cfg.dim_feedforward);
    let (g, nt) = (s.groups, s.nt);
    let n_all = s.nc + nt;
    let mut v = Vec::new();
    let mut linear = |rows: usize, i: usize, o: usize, input_grad: bool| {
        let one = |m, k, n| Gemm { batch: 1, m, k, n };
        v.push((Pass::Forward, one(rows, i, o)));
        v.push((Pass::Backward, one(o, rows, i)));
        if input_grad {
            v.push((Pass::Backward, one(rows, o, i)));
        }
    };
    linear(g * n_all, cfg.dim_x + cfg.dim_y, d, false);
    for _ in 1..cfg.emb_depth {
        linear(g * n_all, d, d, true);
    }
    for _ in 0..cfg.num_layers {
        linear(g * n_all, d, 3 * d, true); // in_proj: queries, keys and values of every point
        linear(g * n_all, d, d, true); // out_proj
        linear(g * n_all, d, f, true);
        linear(g * n_all, f, d, true);
    }
    linear(g * nt, d, f, true);
    linear(g * nt, f, 2 * cfg.dim_y, true);
    let (h, dh) = (cfg.nhead, d / cfg.nhead);
    for _ in 0..cfg.num_layers {
        v.extend(attention_gemms(g * h, n_all, n_all, dh));
    }
    v
}

/// The six products of one attention over `batch` (group, head) pairs: `nq` queries over
/// `nk` keys, heads `dh` wide; two forward, four backward.
fn attention_gemms(batch: usize, nq: usize, nk: usize, dh: usize) -> [(Pass, Gemm); 6] {
    let b = |m, k, n| Gemm { batch, m, k, n };
    [
        (Pass::Forward, b(nq, dh, nk)),  // scores = Q Kᵀ
        (Pass::Forward, b(nq, nk, dh)),  // weights × V
        (Pass::Backward, b(nq, dh, nk)), // d weights = dO Vᵀ
        (Pass::Backward, b(nk, nq, dh)), // dV = weightsᵀ dO
        (Pass::Backward, b(nq, nk, dh)), // dQ = dS K
        (Pass::Backward, b(nk, nq, dh)), // dK = dSᵀ Q
    ]
}

/// (forward, backward) operations of a list of products.
pub fn flops_of(gemms: &[(Pass, Gemm)]) -> (f64, f64) {
    gemms.iter().fold((0.0, 0.0), |(fw, bw), (p, m)| match p {
        Pass::Forward => (fw + m.flops(), bw),
        Pass::Backward => (fw, bw + m.flops()),
    })
}

/// Forward and backward operations of a batch of shape `s`.
pub fn step_flops(cfg: &GpoConfig, s: BatchShape) -> (f64, f64) {
    flops_of(&step_gemms(cfg, s))
}

/// Forward and backward operations of the official module on a batch of shape `s`
/// ([`official_step_gemms`]).
pub fn official_step_flops(cfg: &GpoConfig, s: BatchShape) -> (f64, f64) {
    flops_of(&official_step_gemms(cfg, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module small enough to count by hand: d_x 5, width 8, 2 heads, a feed-forward
    /// of 6, one layer, a two-layer embedder.
    fn tiny() -> GpoConfig {
        GpoConfig {
            dim_x: 5,
            d_model: 8,
            emb_depth: 2,
            dim_feedforward: 6,
            nhead: 2,
            num_layers: 1,
            ..Default::default()
        }
    }

    /// The forward count by hand for one group of 3 context and 2 target points, a module
    /// with one layer and a two-layer embedder: every term written out.
    #[test]
    fn forward_flops_by_hand() {
        let cfg = tiny();
        let s = BatchShape {
            groups: 1,
            gx: 1,
            nc: 3,
            nt: 2,
        };
        let mm = |m: f64, k: f64, n: f64| 2.0 * m * k * n;
        let embed = mm(3., 5., 8.) + mm(2., 5., 8.) + mm(3., 8., 8.) + mm(2., 8., 8.);
        // One (the last) layer: queries of the 2 targets over the 3 context points.
        let layer = mm(2., 8., 8.)
            + mm(3., 8., 16.)
            + 2.0 * (mm(2., 4., 3.) + mm(2., 3., 4.))
            + mm(2., 8., 8.)
            + mm(2., 8., 6.)
            + mm(2., 6., 8.);
        let head = mm(2., 8., 6.) + mm(2., 6., 2.);
        let (fw, bw) = step_flops(&cfg, s);
        assert_eq!(fw, embed + layer + head);
        // Backward: twice the forward, less the input gradient of the data-fed first layer.
        assert_eq!(bw, 2.0 * fw - mm(3., 5., 8.) - mm(2., 5., 8.));
    }

    /// The official module's count by hand for 2 groups of 3 context and 2 target points,
    /// one layer and a two-layer embedder: every point through everything, N × N scores.
    #[test]
    fn official_flops_by_hand() {
        let cfg = tiny();
        let s = BatchShape {
            groups: 2,
            gx: 1,
            nc: 3,
            nt: 2,
        };
        let mm = |m: f64, k: f64, n: f64| 2.0 * m * k * n;
        // 2 groups × 5 points, each with its own [x; y] (6 wide).
        let embed = mm(10., 6., 8.) + mm(10., 8., 8.);
        let layer = mm(10., 8., 24.)
            + 2.0 * 2.0 * (mm(5., 4., 5.) + mm(5., 5., 4.))
            + mm(10., 8., 8.)
            + mm(10., 8., 6.)
            + mm(10., 6., 8.);
        let head = mm(4., 8., 6.) + mm(4., 6., 2.);
        let (fw, bw) = official_step_flops(&cfg, s);
        assert_eq!(fw, embed + layer + head);
        assert_eq!(bw, 2.0 * fw - mm(10., 6., 8.));
        // gpo's exact savings on the same batch: fewer operations, never more.
        let (gf, gb) = step_flops(&cfg, s);
        assert!(gf + gb < fw + bw, "{} {}", gf + gb, fw + bw);
    }

    /// Shared x (OpinionQA steps) saves exactly the x-only work of the other groups.
    #[test]
    fn shared_points_count_the_x_work_once() {
        let cfg = GpoConfig::official(384);
        let own = BatchShape {
            groups: 4,
            gx: 4,
            nc: 200,
            nt: 150,
        };
        let shared = BatchShape { gx: 1, ..own };
        let (a, _) = step_flops(&cfg, own);
        let (b, _) = step_flops(&cfg, shared);
        let x_only = |rows: f64, k: f64| 2.0 * rows * k * 128.0;
        // First layer on context and targets, the target tail (3 layers of 128 × 128) and
        // the first encoder layer's target queries (128 × 128).
        let saved =
            3.0 * (x_only(200.0, 384.0) + x_only(150.0, 384.0) + 4.0 * x_only(150.0, 128.0));
        assert!((a - b - saved).abs() < 1e-6 * a, "{a} {b} {saved}");
    }

    /// Shards of a step that shares its points count the x-part's forward once, in the
    /// two halves it is computed in; everything else is each shard's own.
    #[test]
    fn shards_sharing_their_points_count_the_x_part_once() {
        let cfg = GpoConfig::official(4096);
        let s = BatchShape {
            groups: 4,
            gx: 1,
            nc: 201,
            nt: 150,
        };
        let (fw, bw) = step_flops(&cfg, s);
        let (sf, sb) = flops_of(&sharded_step_gemms(&cfg, &[s, s, s], true));
        let x_part = 2.0 * (201.0 + 150.0) * 4096.0 * 128.0;
        assert!(
            (3.0 * fw - sf - 2.0 * x_part).abs() < 1e-9 * sf,
            "{fw} {sf}"
        );
        assert_eq!(3.0 * bw, sb);
        // Cut as the pass cuts it: 176 rows, then 175 (25 context and 150 target).
        let xs: Vec<Gemm> = sharded_step_gemms(&cfg, &[s, s], true)
            .into_iter()
            .filter(|(_, g)| g.k == 4096 && g.n == 128)
            .map(|(_, g)| g)
            .collect();
        let rows: Vec<usize> = xs.iter().map(|g| g.m).collect();
        assert_eq!(rows, [176, 25, 150]);
        // Unshared points, or one shard: each shard its own.
        let (uf, _) = flops_of(&sharded_step_gemms(&cfg, &[s, s, s], false));
        assert_eq!(uf, 3.0 * fw);
        assert_eq!(flops_of(&sharded_step_gemms(&cfg, &[s], true)).0, fw);
    }
}
