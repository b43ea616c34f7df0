//! The synthetic survey's parameters, [`SynthConfig`]: defaults, serde (a config names only
//! the fields it changes) and validation.
//!
//! Its own module because it is the part other crates and config files see; the generator
//! behind it is internal.

use serde::{Deserialize, Serialize};

/// How far a question's loading strays from its topic's direction (before normalizing), by
/// default.
const LOADING_SPREAD: f64 = 0.7;

/// Parameters of the synthetic survey. Every field has a default, so a config may name
/// only the fields it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Seed of everything; same seed, same survey.
    pub seed: u64,
    /// Number of questions.
    pub n_questions: usize,
    /// Number of groups.
    pub n_groups: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Dimension of the groups' latent stances.
    pub latent: usize,
    /// Standard deviation of the Gaussian noise added to every embedding coordinate
    /// (coordinates have roughly unit scale).
    pub noise: f32,
    /// When above 0, the survey's "groups" are individual users instead: this many per
    /// latent group, each with a stance drawn around the group's, answering one option per
    /// question (a one-hot distribution sampled from their own); scored by accuracy.
    pub individuals_per_group: usize,
    /// How far each question's loading strays from its topic's direction (before
    /// normalizing). The stray part is visible to the labelled-synthetic embeddings but not
    /// in the question's text, so a lower spread leaves more of the structure to a text
    /// embedder.
    pub loading_spread: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            n_questions: 80,
            n_groups: 24,
            dim: 32,
            latent: 4,
            noise: 0.05,
            individuals_per_group: 0,
            loading_spread: LOADING_SPREAD,
        }
    }
}

impl SynthConfig {
    /// Rejects configs that would produce an empty or meaningless survey.
    /// [`generate`](super::generate) never panics, but only a valid config gives a useful dataset.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("synthetic `{name}` is {v}, expected {lo}..={hi}"))
            }
        };
        check("n_questions", self.n_questions, 1, 100_000)?;
        check("n_groups", self.n_groups, 1, 100_000)?;
        check("dim", self.dim, 1, 65_536)?;
        check("latent", self.latent, 1, 1_024)?;
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(format!(
                "synthetic `noise` is {}, expected a finite value >= 0",
                self.noise
            ));
        }
        if !(self.loading_spread.is_finite() && self.loading_spread >= 0.0) {
            return Err(format!(
                "synthetic `loading_spread` is {}, expected a finite value >= 0",
                self.loading_spread
            ));
        }
        Ok(())
    }
}
