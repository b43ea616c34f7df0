//! The configuration of one training run, as read from TOML, flags and the environment.

use gpo_core::model::GpoConfig;
use gpo_core::optim::AdamConfig;
use gpo_core::sampler::SamplerConfig;
use serde::{Deserialize, Serialize};

/// Everything that determines a run (together with the data and embeddings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run seed: group split, initialization, every episode.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Fraction of groups used for meta-training (the rest are held out).
    pub group_split: f64,
    /// Evaluate (and maybe checkpoint) every this many steps; the last step always evaluates.
    pub eval_every: u64,
    /// Context questions given to each held-out group at evaluation.
    pub eval_context: usize,
    /// Episode sizes and meta-batch size.
    pub sampler: SamplerConfig,
    /// Module sizes (`dim_x` is taken from the embeddings).
    pub model: GpoConfig,
    /// Optimizer.
    pub adam: AdamConfig,
    /// Episodes per gradient shard. Shards are computed separately and summed in f64, and
    /// a distributed run hands each worker whole shards, so runs with any number of
    /// workers or threads take the same steps. A larger shard batches more work per graph
    /// (on OpinionQA-style steps its groups share the embedder's x-part and the targets'
    /// embedder output); a smaller one spreads over more workers and threads. The default
    /// 4 gives the official 8-group step two shards, one per core of a 2-core machine.
    pub shard_groups: usize,
    /// How the reported checkpoint is chosen: `"validation"` (default) by the alignment of
    /// validation groups carved from the meta-training groups, reporting the test groups'
    /// score at that checkpoint; `"test"` by the test groups' own alignment, as the paper
    /// does (optimistic: the same score selects and is reported).
    pub selection: Selection,
    /// With `selection = "validation"`: the fraction of the meta-training groups carved out
    /// for validation (`floor(n · f)`, at least 1), chosen by the seed; they do not train.
    pub validation_split: f64,
    /// Groups that answered fewer questions than this are left out of the run (training
    /// and evaluation), with a note in the summary. Held-out groups that answered no more
    /// questions than `eval_context` are skipped from evaluation with a warning either way.
    pub min_questions: usize,
}

/// How a run selects its reported checkpoint (see [`RunConfig::selection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// By validation groups carved from the meta-training groups.
    #[default]
    Validation,
    /// By the held-out test groups (the paper's way).
    Test,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 0,
            steps: 1000,
            group_split: 0.6,
            eval_every: 100,
            eval_context: 20,
            sampler: SamplerConfig::default(),
            model: GpoConfig::default(),
            adam: AdamConfig::default(),
            shard_groups: 4,
            selection: Selection::Validation,
            validation_split: 0.2,
            min_questions: 0,
        }
    }
}

impl RunConfig {
    /// Rejects settings no run can use, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 {
            return Err("`steps` must be at least 1".into());
        }
        if self.eval_every == 0 {
            return Err("`eval_every` must be at least 1".into());
        }
        if !(self.group_split > 0.0 && self.group_split < 1.0) {
            return Err(format!(
                "`group_split` must be in (0, 1), got {}",
                self.group_split
            ));
        }
        if !(self.adam.lr > 0.0 && self.adam.lr.is_finite()) {
            return Err(format!("`adam.lr` must be positive, got {}", self.adam.lr));
        }
        let s = &self.sampler;
        if s.min_ctx == 0 || s.min_tgt == 0 || s.min_ctx > s.max_ctx || s.min_tgt > s.max_tgt {
            return Err(format!(
                "`sampler` sizes must satisfy 1 ≤ min ≤ max (context {}..{}, target {}..{})",
                s.min_ctx, s.max_ctx, s.min_tgt, s.max_tgt
            ));
        }
        if !(self.validation_split > 0.0 && self.validation_split < 1.0) {
            return Err(format!(
                "`validation_split` must be in (0, 1), got {}",
                self.validation_split
            ));
        }
        if self.shard_groups == 0 {
            return Err("`shard_groups` must be at least 1".into());
        }
        if s.batch_groups == Some(0) {
            return Err("`sampler.batch_groups` must be at least 1".into());
        }
        self.model.validate().map_err(|e| format!("`model`: {e}"))
    }
}
