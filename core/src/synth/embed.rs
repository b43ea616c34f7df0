//! The synthetic embeddings: each ordinal option's feature vector (the question's loading,
//! the option's centred position, bias, spread, topic and kind of scale) and its fixed random
//! projection to `dim` coordinates plus noise.
//!
//! Its own module because the embeddings are a separate view of the world from the answers:
//! they carry the structure a model must learn to read.

use super::catalogue::TOPICS;
use super::world::QuestionParams;
use super::{dot, normals, SynthConfig, EMBEDDER, S_NOISE, S_PROJECTION};
use crate::data::Question;
use crate::prompt::Template;
use crate::rng::Rng;
use crate::store::text_key;

/// Number of embedding features for a latent dimension.
fn n_features(latent: usize) -> usize {
    2 * latent + 7 + TOPICS.len() + 3
}

/// Features of option `k` (0-based among the ordinal options) of a question. The option's
/// centred position `r` enters divided by σ², the way it enters the answer logits.
fn features(p: &QuestionParams, k: usize) -> Vec<f64> {
    let r = k as f64 - (p.k as f64 - 1.0) / 2.0;
    let inv_var = 1.0 / (p.sigma * p.sigma);
    let mut f = Vec::with_capacity(n_features(p.loading.len()));
    f.extend(p.loading.iter().copied());
    f.extend(p.loading.iter().map(|l| 0.5 * r * l * inv_var));
    f.push(0.5 * r * inv_var);
    f.push(0.25 * r * r * inv_var);
    f.push(p.bias);
    f.push(0.5 * r * p.bias * inv_var);
    f.push(inv_var);
    f.push(if p.k == 5 { 1.0 } else { 0.0 });
    f.push(1.0);
    f.extend((0..TOPICS.len()).map(|t| if t == p.topic { 1.0 } else { 0.0 }));
    f.extend((0..3).map(|c| if c == p.kind.index() { 1.0 } else { 0.0 }));
    f
}

/// One `(text_key, vector)` per answerable (question, option) of `questions`, in question
/// then option order; `params` are the questions' latent parameters.
pub(super) fn embeddings(
    cfg: &SynthConfig,
    questions: &[Question],
    params: &[QuestionParams],
    template: Template,
) -> Vec<(String, Vec<f32>)> {
    let nf = n_features(cfg.latent);
    // Row scale keeps coordinates near unit variance for typical feature vectors.
    let scale = 1.0 / (nf as f64 / 4.0).sqrt().max(1.0);
    let projection: Vec<Vec<f64>> = (0..cfg.dim)
        .map(|i| {
            normals(
                &mut Rng::keyed(&[cfg.seed, S_PROJECTION, i as u64]),
                nf,
                scale,
            )
        })
        .collect();
    let noise = if cfg.noise.is_finite() && cfg.noise > 0.0 {
        f64::from(cfg.noise)
    } else {
        0.0
    };

    let mut embeddings = Vec::new();
    for (qi, (q, p)) in questions.iter().zip(params).enumerate() {
        let ordinal = q.options.iter().enumerate().filter(|(_, o)| !o.refusal);
        for (k, (oi, _)) in ordinal.enumerate() {
            let f = features(p, k);
            let mut rng = Rng::keyed(&[cfg.seed, S_NOISE, qi as u64, k as u64]);
            let x: Vec<f32> = projection
                .iter()
                .map(|row| (dot(row, &f) + noise * rng.normal()) as f32)
                .collect();
            let key = text_key(EMBEDDER, template.name(), &template.render(q, oi));
            embeddings.push((key, x));
        }
    }
    embeddings
}
