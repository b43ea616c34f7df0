//! Answer distributions: a stance's softmax over a question's ordinal options, and the
//! individual users sampled around each group, who answer one option per question.
//!
//! Its own module because it is the observation model (what the survey records), separate
//! from how the latent parameters are drawn (`world`) and from the embeddings (`embed`).

use super::world::{QuestionParams, World};
use super::{dot, SynthConfig, S_PERSON};
use crate::data::{Group, MetricKind};
use crate::rng::Rng;

/// Weight of the uniform distribution mixed into every answer distribution.
const UNIFORM_MIX: f64 = 0.01;
/// Spread of an individual's stance around their group's.
const PERSON_SD: f64 = 0.5;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Group answer distribution of a stance on a question, over its ordinal options.
pub(super) fn distribution(p: &QuestionParams, stance: &[f64]) -> Vec<f32> {
    let a = dot(&p.loading, stance) + p.bias;
    let kf = p.k as f64;
    let centre = 1.0 + (kf - 1.0) * sigmoid(-a);
    let logits: Vec<f64> = (1..=p.k)
        .map(|k| {
            let d = k as f64 - centre;
            -d * d / (2.0 * p.sigma * p.sigma)
        })
        .collect();
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let probs: Vec<f64> = e
        .iter()
        .map(|x| (1.0 - UNIFORM_MIX) * x / z + UNIFORM_MIX / kf)
        .collect();
    let s: f64 = probs.iter().sum();
    probs.iter().map(|x| (x / s) as f32).collect()
}

/// Individual users around each latent group: a stance near the group's, and one chosen
/// option per question sampled from the individual's own distribution.
#[allow(clippy::type_complexity)]
pub(super) fn individuals(
    cfg: &SynthConfig,
    world: &World,
) -> (Vec<Group>, Vec<Vec<Option<Vec<f32>>>>, MetricKind) {
    let mut groups = Vec::new();
    let mut answers = Vec::new();
    for (g, stance) in world.stances.iter().enumerate() {
        for i in 0..cfg.individuals_per_group {
            let mut rng = Rng::keyed(&[cfg.seed, S_PERSON, g as u64, i as u64]);
            let own: Vec<f64> = stance
                .iter()
                .map(|s| s + PERSON_SD * rng.normal())
                .collect();
            let row = world
                .params
                .iter()
                .map(|p| {
                    let d = distribution(p, &own);
                    let u = rng.f64() as f32;
                    let mut acc = 0f32;
                    let pick = d.iter().position(|&x| {
                        acc += x;
                        u < acc
                    });
                    let pick = pick.unwrap_or(d.len() - 1);
                    Some(
                        (0..d.len())
                            .map(|k| if k == pick { 1.0 } else { 0.0 })
                            .collect(),
                    )
                })
                .collect();
            groups.push(Group {
                name: format!("Synthetic:Group {:02} / user {:02}", g + 1, i + 1),
            });
            answers.push(row);
        }
    }
    (groups, answers, MetricKind::Accuracy)
}
