//! The latent world behind a generated survey: the topic directions, each question's
//! wording, scale, loading, bias and spread, and the groups' stances.
//!
//! Its own module because it is the one place the seeded draws of the model's parameters
//! happen; answers and embeddings are both computed from the [`World`] it builds.

use std::collections::HashSet;

use super::catalogue::{catalogue, Kind, REFUSED, TOPICS};
use super::{normalized, normals, SynthConfig, S_GROUP, S_ORDER, S_QUESTION, S_SCALE, S_TOPIC};
use crate::data::{AnswerOption, Question};
use crate::rng::Rng;

/// Standard deviation of each stance coordinate: large, so groups differ substantially.
const STANCE_SD: f64 = 1.5;
/// Standard deviation of the per-question bias.
const BIAS_SD: f64 = 0.4;
/// Range of the per-question answer spread σ, in ordinal steps.
const SIGMA_RANGE: (f64, f64) = (0.55, 1.1);
/// Share of questions that offer a "Refused" option.
const REFUSAL_SHARE: f64 = 0.3;

/// Latent parameters of one question.
#[derive(Debug, Clone)]
pub(super) struct QuestionParams {
    pub(super) topic: usize,
    pub(super) kind: Kind,
    /// Polarity times the unit loading: `p_q t_q`.
    pub(super) loading: Vec<f64>,
    pub(super) bias: f64,
    pub(super) sigma: f64,
    /// Number of ordinal (non-refusal) options.
    pub(super) k: usize,
}

/// The whole latent world behind a generated survey.
#[derive(Debug, Clone)]
pub(super) struct World {
    pub(super) questions: Vec<Question>,
    pub(super) params: Vec<QuestionParams>,
    pub(super) stances: Vec<Vec<f64>>,
}

/// Draws the latent world of `cfg`: questions in a seeded order over the catalogue (later
/// rounds reworded, then marked by wave), their parameters, and one stance per group.
pub(super) fn build_world(cfg: &SynthConfig) -> World {
    let seed = cfg.seed;
    let items = catalogue();
    let order = Rng::keyed(&[seed, S_ORDER]).permutation(items.len());
    let topic_dirs: Vec<Vec<f64>> = (0..TOPICS.len())
        .map(|t| {
            normalized(normals(
                &mut Rng::keyed(&[seed, S_TOPIC, t as u64]),
                cfg.latent,
                1.0,
            ))
        })
        .collect();
    let width = cfg.n_questions.to_string().len().max(3);

    let mut questions = Vec::with_capacity(cfg.n_questions);
    let mut params = Vec::with_capacity(cfg.n_questions);
    let mut seen = HashSet::with_capacity(cfg.n_questions);
    for i in 0..cfg.n_questions {
        let slot = order[i % items.len()];
        let item = items[slot];
        let variant = (i / items.len()) % 2;
        let wave = i / (2 * items.len());

        let mut text = item
            .kind
            .wording(variant, TOPICS[item.topic].name, item.body);
        if wave > 0 {
            text.push_str(&format!(" (Wave {})", wave + 1));
        }
        if !seen.insert(text.clone()) {
            // The catalogue's bodies are distinct, so this never happens; keep keys unique
            // regardless.
            text.push_str(&format!(" (Question {})", i + 1));
            seen.insert(text.clone());
        }

        let first = usize::from(Rng::keyed(&[seed, S_SCALE, slot as u64]).f64() < 0.5);
        let scale = item.kind.scales()[(first + variant) % 2];

        let mut rng = Rng::keyed(&[seed, S_QUESTION, i as u64]);
        let eps = normals(&mut rng, cfg.latent, cfg.loading_spread);
        let t: Vec<f64> = topic_dirs[item.topic]
            .iter()
            .zip(&eps)
            .map(|(u, e)| u + e)
            .collect();
        let loading: Vec<f64> = normalized(t)
            .into_iter()
            .map(|x| x * item.polarity)
            .collect();
        let bias = rng.normal() * BIAS_SD;
        let sigma = SIGMA_RANGE.0 + (SIGMA_RANGE.1 - SIGMA_RANGE.0) * rng.f64();
        let refusal = rng.f64() < REFUSAL_SHARE;

        let mut options: Vec<AnswerOption> = scale
            .iter()
            .enumerate()
            .map(|(k, &o)| AnswerOption {
                text: o.to_string(),
                ordinal: Some((k + 1) as f64),
                refusal: false,
            })
            .collect();
        if refusal {
            options.push(AnswerOption {
                text: REFUSED.to_string(),
                ordinal: None,
                refusal: true,
            });
        }
        questions.push(Question {
            id: format!("SYN{:0width$}", i + 1),
            text,
            options,
        });
        params.push(QuestionParams {
            topic: item.topic,
            kind: item.kind,
            loading,
            bias,
            sigma,
            k: scale.len(),
        });
    }

    let stances = (0..cfg.n_groups)
        .map(|g| {
            normals(
                &mut Rng::keyed(&[seed, S_GROUP, g as u64]),
                cfg.latent,
                STANCE_SD,
            )
        })
        .collect();
    World {
        questions,
        params,
        stances,
    }
}
