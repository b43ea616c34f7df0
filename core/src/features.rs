//! Point features and batch assembly: maps each (question, non-refusal option) to its
//! embedding x, and turns episode specs into the module's [`ModelBatch`].

use crate::data::{Question, Survey};
use crate::model::{build_batch, ModelBatch};
use crate::prior::Prior;
use crate::sampler::EpisodeSpec;
use candle_core::Device;
use std::sync::Arc;

/// The x of every point of a survey, laid out question by question.
#[derive(Debug, Clone, PartialEq)]
pub struct PointFeatures {
    /// Embedding width.
    pub dim: usize,
    /// `n_points × dim` values.
    pub x: Vec<f32>,
    /// First point of each question.
    pub start: Vec<usize>,
    /// Points (non-refusal options) of each question.
    pub len: Vec<usize>,
    /// The population prior of the run's meta-training groups, for the model variants that
    /// read it (`None`: batches carry none, as the faithful module needs).
    pub prior: Option<Arc<Prior>>,
}

impl PointFeatures {
    /// Builds the features by looking up each non-refusal option's embedding.
    /// `lookup(question, option index into question.options)` returns the vector, or `None`
    /// when the store lacks it (an error naming the question and option).
    pub fn build<'a>(
        s: &Survey,
        dim: usize,
        mut lookup: impl FnMut(&Question, usize) -> Option<&'a [f32]>,
    ) -> Result<Self, String> {
        let mut f = PointFeatures {
            dim,
            x: Vec::new(),
            start: Vec::new(),
            len: Vec::new(),
            prior: None,
        };
        for q in &s.questions {
            f.start.push(f.x.len() / dim);
            let mut n = 0;
            for (k, o) in q.options.iter().enumerate().filter(|(_, o)| !o.refusal) {
                let v = lookup(q, k).ok_or_else(|| {
                    format!("no embedding for question `{}`, option `{}` (run `gpo embed` for this dataset)", q.id, o.text)
                })?;
                if v.len() != dim {
                    return Err(format!(
                        "embedding of question `{}` has width {}, expected {dim}",
                        q.id,
                        v.len()
                    ));
                }
                f.x.extend_from_slice(v);
                n += 1;
            }
            f.len.push(n);
        }
        Ok(f)
    }

    /// The x rows of question `q`.
    pub fn question(&self, q: usize) -> &[f32] {
        &self.x[self.start[q] * self.dim..(self.start[q] + self.len[q]) * self.dim]
    }

    /// These features with the population prior of the meta-training groups `train`.
    pub fn with_prior(mut self, s: &Survey, train: &[usize]) -> Self {
        self.prior = Some(Arc::new(Prior::new(s, train)));
        self
    }

    /// Points of a list of questions.
    pub fn points(&self, qs: &[usize]) -> usize {
        qs.iter().map(|&q| self.len[q]).sum()
    }
}

/// Assembles episodes into one batch. When every episode has the same context and target
/// questions (OpinionQA-style steps), x is stored once and shared; otherwise groups are
/// padded to the longest context and target (padding is masked out of attention and loss).
/// With a prior in `f`, each point also carries its prior probability (context padding 0,
/// target padding 1).
pub fn assemble(
    s: &Survey,
    f: &PointFeatures,
    eps: &[EpisodeSpec],
    device: &Device,
) -> candle_core::Result<ModelBatch> {
    let g = eps.len();
    let d = f.dim;
    let shared = g > 1
        && eps
            .iter()
            .all(|e| e.context == eps[0].context && e.target == eps[0].target);
    let nc = eps.iter().map(|e| f.points(&e.context)).max().unwrap_or(0);
    let nt = eps.iter().map(|e| f.points(&e.target)).max().unwrap_or(0);
    let gx = if shared { 1 } else { g };
    let mut xc = vec![0f32; gx * nc * d];
    let mut xt = vec![0f32; gx * nt * d];
    let mut yc = vec![0f32; g * nc];
    let mut yt = vec![0f32; g * nt];
    let mut ctx_valid = vec![false; g * nc];
    let prior = f.prior.as_deref();
    let mut pc = vec![0f32; if prior.is_some() { g * nc } else { 0 }];
    let mut pt = vec![1f32; if prior.is_some() { g * nt } else { 0 }];
    let mut segments = Vec::with_capacity(g);
    for (gi, e) in eps.iter().enumerate() {
        let answers = &s.answers[e.group];
        let write_x = !shared || gi == 0;
        let mut off = 0;
        for &q in &e.context {
            let n = f.len[q];
            if write_x {
                xc[(gi * nc + off) * d..(gi * nc + off + n) * d].copy_from_slice(f.question(q));
            }
            if let Some(dist) = &answers[q] {
                yc[gi * nc + off..gi * nc + off + n].copy_from_slice(dist);
            }
            ctx_valid[gi * nc + off..gi * nc + off + n].fill(true);
            if let Some(p) = prior {
                pc[gi * nc + off..gi * nc + off + n].copy_from_slice(&p.of(s, e.group, q, n));
            }
            off += n;
        }
        let mut segs = Vec::with_capacity(e.target.len());
        let mut off = 0;
        for &q in &e.target {
            let n = f.len[q];
            if write_x {
                xt[(gi * nt + off) * d..(gi * nt + off + n) * d].copy_from_slice(f.question(q));
            }
            if let Some(dist) = &answers[q] {
                yt[gi * nt + off..gi * nt + off + n].copy_from_slice(dist);
            }
            if let Some(p) = prior {
                pt[gi * nt + off..gi * nt + off + n].copy_from_slice(&p.of(s, e.group, q, n));
            }
            segs.push((off, n));
            off += n;
        }
        segments.push(segs);
    }
    let b = build_batch(g, d, xc, xt, yc, yt, &ctx_valid, segments, device)?;
    match prior {
        Some(_) => b.with_prior(pc, pt),
        None => Ok(b),
    }
}
