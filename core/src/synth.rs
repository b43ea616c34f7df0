//! The seeded synthetic survey: the project's built-in default dataset.
//!
//! Real survey data (OpinionQA, GlobalOpinionQA) and LLM embeddings are large, licensed and
//! slow to produce; every test, demo and smoke run instead needs a dataset that exists
//! everywhere, is identical on every machine for a seed, and is *learnable* in GPO's sense.
//! This module generates one from a small latent model:
//!
//! - each group g has a stance `s_g ∈ R^latent`, drawn `N(0, 1.5²)` per dimension;
//! - each question q belongs to a topic, has a unit loading `t_q` near its topic's
//!   direction, a polarity `p_q = ±1` (how its statement is framed) and a small bias `b_q`;
//! - the group's attitude is `a = p_q (s_g · t_q) + b_q`; its answer distribution over the
//!   K ordinal options (1 = most positive) is `softmax_k(-(k − c(a))² / 2σ_q²)` with
//!   centre `c(a) = 1 + (K − 1)·sigmoid(−a)`, mixed with 1% uniform;
//! - the "embedding" of option k of q is a fixed random projection of features of
//!   (`p_q t_q`, the option's centred ordinal position and its products with `p_q t_q`,
//!   `b_q` and `1/σ_q²`, the topic and the kind of scale), plus small Gaussian noise.
//!
//! So a model that sees a group's answers to a few context questions can infer `s_g` and
//! predict the rest, while the mean over training groups cannot. The question texts are
//! real English sentences so that the same survey can also be embedded by a real LLM.
//!
//! Layout: `config` holds [`SynthConfig`] and its validation; `catalogue` the English
//! question bodies, wordings and answer scales; `world` the latent model (topic directions,
//! question loadings, group stances); `answers` the answer distributions of groups and
//! sampled individuals; `embed` the option features and their random projection. This root
//! ties them together in [`generate`] and holds what they share: the RNG stream tags and
//! small vector helpers.

use crate::data::{Group, MetricKind, Survey};
use crate::prompt::Template;
use crate::rng::Rng;
use crate::store::StoreMeta;

mod answers;
mod catalogue;
mod config;
mod embed;
mod world;

pub use config::SynthConfig;

use answers::{distribution, individuals};
use world::build_world;

/// The embedder name of synthetic embeddings (part of every key they are stored under).
pub const EMBEDDER: &str = "synthetic-latent/v1";

// RNG stream tags: each independent piece of the world draws from its own keyed stream,
// so e.g. adding groups never changes the questions.
const S_ORDER: u64 = 1;
const S_TOPIC: u64 = 2;
const S_QUESTION: u64 = 3;
const S_GROUP: u64 = 4;
const S_PROJECTION: u64 = 5;
const S_NOISE: u64 = 6;
const S_SCALE: u64 = 7;
const S_PERSON: u64 = 8;

/// A generated survey with its embeddings.
#[derive(Debug, Clone)]
pub struct SynthOutput {
    /// The survey (Wasserstein metric; every group answers every question).
    pub survey: Survey,
    /// Embedder name of the vectors: [`EMBEDDER`].
    pub embedder: String,
    /// Template the keys were computed with: [`Template::Plain`].
    pub template: Template,
    /// Length of every vector.
    pub dim: usize,
    /// One `(text_key, vector)` per answerable (question, option), in question then
    /// option order.
    pub embeddings: Vec<(String, Vec<f32>)>,
}

impl SynthOutput {
    /// The metadata of an embedding store holding these vectors.
    pub fn store_meta(&self) -> StoreMeta {
        StoreMeta {
            embedder: self.embedder.clone(),
            template: self.template.name().to_string(),
            dim: self.dim,
            synthetic: true,
        }
    }
}

fn normals(rng: &mut Rng, n: usize, sd: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * sd).collect()
}

fn normalized(v: Vec<f64>) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 && n.is_finite() {
        v.into_iter().map(|x| x / n).collect()
    } else {
        v.into_iter().map(|_| 0.0).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Generates the survey and its embeddings. Pure: same config, same output. A config
/// failing [`SynthConfig::validate`] yields a degenerate (possibly empty) survey rather
/// than a panic; a non-finite or negative `noise` counts as 0.
pub fn generate(cfg: &SynthConfig) -> SynthOutput {
    let world = build_world(cfg);
    let (groups, answers, metric) = if cfg.individuals_per_group > 0 {
        individuals(cfg, &world)
    } else {
        let answers: Vec<Vec<Option<Vec<f32>>>> = world
            .stances
            .iter()
            .map(|s| {
                world
                    .params
                    .iter()
                    .map(|p| Some(distribution(p, s)))
                    .collect()
            })
            .collect();
        let groups = (0..cfg.n_groups)
            .map(|g| Group {
                name: format!("Synthetic:Group {:02}", g + 1),
            })
            .collect();
        (groups, answers, MetricKind::Wasserstein)
    };
    let survey = Survey {
        name: format!("synthetic (seed {})", cfg.seed),
        metric,
        questions: world.questions,
        groups,
        answers,
    };

    let template = Template::Plain;
    let embeddings = embed::embeddings(cfg, &survey.questions, &world.params, template);

    SynthOutput {
        survey,
        embedder: EMBEDDER.to_string(),
        template,
        dim: cfg.dim,
        embeddings,
    }
}

#[cfg(test)]
mod tests;
