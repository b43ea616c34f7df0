//! The GPO module's forward pass: point embedder, context-only attention encoder, and the
//! (mean, log std) predictor, following the official TNP-D/GPO implementation exactly.
//!
//! Exact savings over the official code (same result, less work):
//! - nothing attends to targets, so keys and values are projected from context points only
//!   and the scores are `N × N_context`;
//! - the last layer's context rows are never read, so it runs on target rows only;
//! - when all groups share x (OpinionQA-style steps), the x-part of the embedder's first
//!   layer runs once, and since targets carry y = 0, their whole embedder output is shared.

use super::batch::ModelBatch;
use super::composite;
use super::ops;
use super::params::{GpoConfig, Params};
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

/// Which implementation of layer norm, attention softmax and the loss head to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpPath {
    /// Fused CPU custom ops with hand-written backward (fast; CPU only).
    Fused,
    /// Composite candle ops (reference; any device).
    Composite,
}

/// How a training step's gradient is computed on the fused path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    /// The hand-written backward ([`crate::model::tape`]) wherever it applies (the faithful
    /// module, f32 on the CPU), candle's autograd elsewhere. The default.
    Tape,
    /// candle's autograd over the fused ops always (the reference the tape is measured
    /// against, `gpo bench step --autograd`).
    Autograd,
}

/// The GPO module: configuration plus parameters.
#[derive(Debug, Clone)]
pub struct Gpo {
    /// Sizes.
    pub cfg: GpoConfig,
    /// Trainable parameters under official names.
    pub params: Params,
    /// Op implementation.
    pub path: OpPath,
    /// How training steps get their gradient.
    pub backward: Backward,
}

/// `x W^T + b` (then ReLU when `relu`) over the last dimension of a 3-D tensor.
fn linear_with(path: OpPath, x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let (g, n, i) = x.dims3()?;
    let x2 = x.reshape((g * n, i))?;
    let y = match path {
        OpPath::Fused => x2.contiguous()?.apply_op3_arc(
            &w.contiguous()?,
            &b.contiguous()?,
            Arc::new(Box::new(ops::Linear { relu })),
        )?,
        OpPath::Composite => {
            let y = x2.matmul(&w.t()?)?.broadcast_add(b)?;
            if relu {
                y.relu()?
            } else {
                y
            }
        }
    };
    y.reshape((g, n, w.dims()[0]))
}

impl Gpo {
    /// A freshly initialized module (PyTorch's default init, from `seed`).
    pub fn new(cfg: GpoConfig, seed: u64, device: &Device) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("invalid GPO config: {e}");
        }
        let params = Params::init(&cfg, seed, device)?;
        Ok(Gpo {
            cfg,
            params,
            path: default_path(device),
            backward: Backward::Tape,
        })
    }

    /// A module over given parameters.
    pub fn from_params(cfg: GpoConfig, params: Params) -> Self {
        let path = default_path(params.entries()[0].1.device());
        Gpo {
            cfg,
            params,
            path,
            backward: Backward::Tape,
        }
    }

    fn p(&self, name: &str) -> Tensor {
        self.params.get(name).as_tensor().clone()
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (g, b) = (
            self.p(&format!("{prefix}.weight")),
            self.p(&format!("{prefix}.bias")),
        );
        match self.path {
            OpPath::Fused => x.contiguous()?.apply_op3_arc(
                &g,
                &b,
                Arc::new(Box::new(ops::LayerNorm {
                    eps: self.cfg.layer_norm_eps as f32,
                })),
            ),
            OpPath::Composite => composite::layer_norm(x, &g, &b, self.cfg.layer_norm_eps),
        }
    }

    /// A linear layer by official name prefix, with ReLU fused when `relu`.
    fn linear(&self, x: &Tensor, name: &str, relu: bool) -> Result<Tensor> {
        linear_with(
            self.path,
            x,
            &self.p(&format!("{name}.weight")),
            &self.p(&format!("{name}.bias")),
            relu,
        )
    }

    /// The embedder MLP after its first layer's ReLU'd output `h1` (`[., N, d]`).
    fn embedder_tail(&self, h1: Tensor) -> Result<Tensor> {
        let mut h = h1;
        let last = self.cfg.emb_depth - 1;
        for k in 1..=last {
            h = self.linear(&h, &format!("embedder.{}", 2 * k), k < last)?;
        }
        Ok(h)
    }

    /// The embedder's first layer on the x-part: its weight columns of x, and its bias.
    fn embedder_x(&self) -> Result<(Tensor, Tensor)> {
        let wx = self.p("embedder.0.weight").narrow(1, 0, self.cfg.dim_x)?;
        Ok((wx, self.p("embedder.0.bias")))
    }

    /// The batch's population prior (context, targets) when the variant reads it: an error
    /// when it needs one and the batch has none.
    fn prior<'a>(&self, b: &'a ModelBatch) -> Result<Option<&'a (Tensor, Tensor)>> {
        let v = self.cfg.variant;
        if !v.reads_prior() {
            return Ok(None);
        }
        match &b.prior {
            Some(p) => Ok(Some(p)),
            None => candle_core::bail!(
                "the `{}` variant of GPO reads the population prior, and this batch has none \
                 (its point features were built without the meta-training groups' prior)",
                v.name()
            ),
        }
    }

    /// Column `col` of the embedder's first weight, as `[1, 1, d_model]`.
    fn embedder_column(&self, col: usize) -> Result<Tensor> {
        self.p("embedder.0.weight")
            .narrow(1, col, 1)?
            .reshape((1, 1, self.cfg.d_model))
    }

    /// Embeds the context points: `[G, Nc, d_model]` (the x-part once per distinct x, the
    /// y-part per group).
    fn embed_context(&self, b: &ModelBatch) -> Result<Tensor> {
        let (wx, b0) = self.embedder_x()?;
        let dx = self.cfg.dim_x;
        let prior = self.prior(b)?;
        let y = match prior {
            Some((pc, _)) if self.cfg.variant.residual_context() => (&b.yc - pc)?,
            _ => b.yc.clone(),
        };
        let mut hc = linear_with(self.path, &b.xc, &wx, &b0, false)?
            .broadcast_add(&y.broadcast_mul(&self.embedder_column(dx)?)?)?;
        if let (Some((pc, _)), 1) = (prior, self.cfg.variant.extra_inputs()) {
            hc = hc.broadcast_add(&pc.broadcast_mul(&self.embedder_column(dx + 1)?)?)?;
        }
        self.embedder_tail(hc.relu()?)
    }

    /// Embeds the target points: `[G, Nt, d_model]`. Their y is 0, so the whole embedder
    /// output depends on x alone (and on the prior, for `prior_input`).
    fn embed_targets(&self, b: &ModelBatch) -> Result<Tensor> {
        let (wx, b0) = self.embedder_x()?;
        if let (Some((_, pt)), 1) = (self.prior(b)?, self.cfg.variant.extra_inputs()) {
            let wp = self.embedder_column(self.cfg.dim_x + 1)?;
            let h = linear_with(self.path, &b.xt, &wx, &b0, false)?
                .broadcast_add(&pt.broadcast_mul(&wp)?)?;
            return self.embedder_tail(h.relu()?);
        }
        let ht = self.embedder_tail(linear_with(self.path, &b.xt, &wx, &b0, true)?)?;
        if ht.dims()[0] == b.groups {
            Ok(ht)
        } else {
            ht.broadcast_as((b.groups, b.nt, self.cfg.d_model))?
                .contiguous()
        }
    }

    /// Embeds context and target points: `[G, Nc + Nt, d_model]`.
    fn embed(&self, b: &ModelBatch) -> Result<Tensor> {
        Tensor::cat(&[&self.embed_context(b)?, &self.embed_targets(b)?], 1)
    }

    /// Layer `l`'s keys and values of the context rows `hc`: `[G, Nc, 2 d_model]`.
    fn keys_values(&self, l: usize, hc: &Tensor) -> Result<Tensor> {
        let pre = format!("encoder.layers.{l}.self_attn");
        let d = self.cfg.d_model;
        let w = self.p(&format!("{pre}.in_proj_weight"));
        let bias = self.p(&format!("{pre}.in_proj_bias"));
        linear_with(
            self.path,
            hc,
            &w.narrow(0, d, 2 * d)?,
            &bias.narrow(0, d, 2 * d)?,
            false,
        )
    }

    /// Multi-head attention of `hq`'s rows over the context's keys and values `kv`.
    fn attention(
        &self,
        l: usize,
        hq: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
        b: &ModelBatch,
    ) -> Result<Tensor> {
        let pre = format!("encoder.layers.{l}.self_attn");
        let (d, h) = (self.cfg.d_model, self.cfg.nhead);
        let dh = d / h;
        let w = self.p(&format!("{pre}.in_proj_weight"));
        let bias = self.p(&format!("{pre}.in_proj_bias"));
        let (g, nq, _) = hq.dims3()?;
        let nc = kv.dims()[1];
        let q = linear_with(
            self.path,
            hq,
            &w.narrow(0, 0, d)?,
            &bias.narrow(0, 0, d)?,
            false,
        )?;
        let scale = 1.0 / (dh as f64).sqrt();
        let o = match self.path {
            OpPath::Fused => q.apply_op2_arc(
                kv,
                Arc::new(Box::new(ops::Attention::new(
                    h,
                    scale as f32,
                    b.ctx_mask.clone(),
                ))),
            )?,
            OpPath::Composite => {
                let heads =
                    |t: Tensor, n: usize| t.reshape((g, n, h, dh))?.transpose(1, 2)?.contiguous();
                let q = heads(q, nq)?;
                let k = heads(kv.narrow(2, 0, d)?, nc)?;
                let v = heads(kv.narrow(2, d, d)?, nc)?;
                let scores = q.matmul(&k.t()?)?; // [G, H, Nq, Nc]
                let p = composite::masked_softmax(&scores, scale, mask)?;
                p.matmul(&v)?.transpose(1, 2)?.reshape((g, nq, d))?
            }
        };
        self.linear(&o, &format!("{pre}.out_proj"), false)
    }

    /// One post-LN encoder layer applied to the rows `hq` (all points, or the targets only),
    /// attending to the context rows' keys and values `kv` ([`Gpo::keys_values`]).
    fn layer(
        &self,
        l: usize,
        hq: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
        b: &ModelBatch,
    ) -> Result<Tensor> {
        let pre = format!("encoder.layers.{l}");
        let a = self.attention(l, hq, kv, mask, b)?;
        let x = self.layer_norm(&(hq + a)?, &format!("{pre}.norm1"))?;
        let f = self.linear(&x, &format!("{pre}.linear1"), true)?;
        let f = self.linear(&f, &format!("{pre}.linear2"), false)?;
        self.layer_norm(&(x + f)?, &format!("{pre}.norm2"))
    }

    /// The composite path's additive key mask, `[G, 1, 1, Nc]` (the fused ops read
    /// `ctx_mask` themselves).
    fn composite_mask(&self, b: &ModelBatch) -> Result<Option<Tensor>> {
        if b.nc == 0 {
            candle_core::bail!(
                "GPO needs at least one context point per group: every point attends only to \
                 context points"
            );
        }
        match (&b.ctx_mask, self.path) {
            (Some(m), OpPath::Composite) => Ok(Some(
                Tensor::from_slice(m.as_slice(), (b.groups, 1, 1, b.nc), b.device())?
                    .to_dtype(b.xc.dtype())?,
            )),
            _ => Ok(None),
        }
    }

    /// The predictor output for every target point: `[G, Nt, 2]` = (mean, raw std).
    pub fn forward(&self, b: &ModelBatch) -> Result<Tensor> {
        let mask = self.composite_mask(b)?;
        let mut h = self.embed(b)?;
        let last = self.cfg.num_layers - 1;
        for l in 0..last {
            let kv = self.keys_values(l, &h.narrow(1, 0, b.nc)?.contiguous()?)?;
            h = self.layer(l, &h, &kv, mask.as_ref(), b)?;
        }
        let kv = self.keys_values(last, &h.narrow(1, 0, b.nc)?.contiguous()?)?;
        let ht = h.narrow(1, b.nc, b.nt)?.contiguous()?;
        let z = self.layer(last, &ht, &kv, mask.as_ref(), b)?;
        self.predictor(&z, b)
    }

    /// The predictor on the target rows `z`; for the variants that predict a deviation
    /// from the prior, `log prior` is added to the means (before the per-question softmax).
    fn predictor(&self, z: &Tensor, b: &ModelBatch) -> Result<Tensor> {
        let f = self.linear(z, "predictor.0", true)?;
        let out = self.linear(&f, "predictor.2", false)?;
        match self.prior(b)? {
            Some((_, pt)) if self.cfg.variant.logit_offset() => {
                let lp = pt.log()?;
                out + Tensor::cat(&[&lp, &lp.zeros_like()?], 2)?
            }
            _ => Ok(out),
        }
    }

    /// Runs `b`'s context through the encoder alone, for [`Gpo::predict_encoded`], keeping
    /// each layer's keys and values. Every point attends only to context points, so the
    /// context rows of each layer never depend on the targets: a server can encode a group's context once and predict any targets
    /// against it, at the cost of the target rows only. Inference only (no gradient).
    pub fn encode_context(&self, b: &ModelBatch) -> Result<EncodedContext> {
        let mask = self.composite_mask(b)?;
        let mut hc = self.embed_context(b)?.detach();
        let mut layers = Vec::with_capacity(self.cfg.num_layers);
        for l in 0..self.cfg.num_layers {
            let kv = self.keys_values(l, &hc)?.detach();
            if l + 1 < self.cfg.num_layers {
                hc = self.layer(l, &hc, &kv, mask.as_ref(), b)?.detach();
            }
            layers.push(kv);
        }
        Ok(EncodedContext {
            layers,
            groups: b.groups,
            nc: b.nc,
            ctx_mask: b.ctx_mask.clone(),
        })
    }

    /// [`Gpo::predict`] of `b`'s targets against a context [`Gpo::encode_context`] encoded
    /// from a batch with the same context (same groups, points and padding): the same values,
    /// bitwise on CPU (each output row of the row-wise ops and of the matrix products is
    /// computed the same way whatever the other rows are; tested).
    pub fn predict_encoded(&self, ctx: &EncodedContext, b: &ModelBatch) -> Result<Vec<f32>> {
        if ctx.groups != b.groups || ctx.nc != b.nc || ctx.ctx_mask != b.ctx_mask {
            candle_core::bail!(
                "the encoded context has {} groups of {} context points, the batch {} of {} \
                 (or another padding)",
                ctx.groups,
                ctx.nc,
                b.groups,
                b.nc
            );
        }
        let mask = self.composite_mask(b)?;
        let mut ht = self.embed_targets(b)?;
        for (l, kv) in ctx.layers.iter().enumerate() {
            ht = self.layer(l, &ht, kv, mask.as_ref(), b)?;
        }
        let out = self.predictor(&ht, b)?.detach();
        self.distributions(&out, b)
    }

    fn distributions(&self, out: &Tensor, b: &ModelBatch) -> Result<Vec<f32>> {
        let mean = out.narrow(2, 0, 1)?.squeeze(2)?;
        let (p, valid) = composite::segment_softmax(&mean, b)?;
        (p * valid)?.flatten_all()?.to_vec1()
    }

    /// The official GPO loss of a batch: minus the Gaussian log-likelihood of every target
    /// slot, padded slots counting as 0, averaged over groups **and** the padded target
    /// slots (the mean over `G × Nt`, as the official `GPO.forward`'s
    /// `masked_log_probs.sum(-1).mean()`). A scalar that backpropagates to the parameters.
    pub fn loss(&self, b: &ModelBatch) -> Result<Tensor> {
        self.loss_over(b, (b.groups * b.nt).max(1) as f64)
    }

    /// The summed NLL of the real target points of `b`, divided by `denom`. A shard of a
    /// larger step passes the step's `G × Nt_max`, so that the shards' losses add up to the
    /// official loss of the whole step.
    pub fn loss_over(&self, b: &ModelBatch, denom: f64) -> Result<Tensor> {
        if !(denom > 0.0 && denom.is_finite()) {
            candle_core::bail!("the loss denominator must be positive, got {denom}");
        }
        let out = self.forward(b)?;
        match self.path {
            OpPath::Fused => out
                .contiguous()?
                .apply_op1_arc(Arc::new(Box::new(ops::SegmentNll {
                    y: b.yt.clone(),
                    segments: b.segments.clone(),
                    denom,
                }))),
            OpPath::Composite => composite::segment_nll(&out, b, denom),
        }
    }

    /// Predicted distribution of every target point (softmaxed means; 0 on padding),
    /// `G * Nt` values.
    pub fn predict(&self, b: &ModelBatch) -> Result<Vec<f32>> {
        let out = self.forward(b)?.detach();
        self.distributions(&out, b)
    }
}

/// A group context run through the encoder ([`Gpo::encode_context`]): each layer's keys and
/// values of the context rows, `[G, Nc, 2 d_model]`.
#[derive(Debug, Clone)]
pub struct EncodedContext {
    layers: Vec<Tensor>,
    groups: usize,
    nc: usize,
    ctx_mask: Option<Arc<Vec<f32>>>,
}

fn default_path(device: &Device) -> OpPath {
    if device.is_cpu() {
        OpPath::Fused
    } else {
        OpPath::Composite
    }
}
