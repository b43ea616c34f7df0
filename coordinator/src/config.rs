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
    /// The embedder the run's embedding store must come from (its `index.json`
    /// `embedder`, as `gpo embed` prints it). A store made by another embedder is refused.
    /// Unset: any store of the right width (the checkpoints still record which one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedder: Option<String>,
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
            embedder: None,
        }
    }
}

impl RunConfig {
    /// Refuses an embedding store whose embedder is not the one the run names
    /// ([`RunConfig::embedder`]); `store` names the store in the message.
    pub fn check_embedder(&self, store_embedder: &str, store: &str) -> Result<(), String> {
        match &self.embedder {
            Some(want) if want != store_embedder => Err(format!(
                "the embedding store {store} was made by embedder `{store_embedder}`, but the run's configuration (`embedder`) names `{want}`: embed the data with that model, or change `embedder`"
            )),
            _ => Ok(()),
        }
    }

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
        if self
            .embedder
            .as_deref()
            .is_some_and(|e| e.trim().is_empty())
        {
            return Err("`embedder` must name an embedder id (or be left out)".into());
        }
        if s.batch_groups == Some(0) {
            return Err("`sampler.batch_groups` must be at least 1".into());
        }
        self.model.validate().map_err(|e| format!("`model`: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_of_another_embedder_is_refused() {
        let mut cfg = RunConfig::default();
        assert!(cfg.check_embedder("minilm@1", "store/").is_ok());
        cfg.embedder = Some("minilm@1".into());
        assert!(cfg.check_embedder("minilm@1", "store/").is_ok());
        let e = cfg.check_embedder("smollm2@2", "store/").unwrap_err();
        assert!(
            e.contains("store/") && e.contains("smollm2@2") && e.contains("minilm@1"),
            "{e}"
        );
        // Old configurations (no field) read back unchanged, and write no field.
        let old: RunConfig = serde_json::from_str(r#"{"seed": 3}"#).unwrap();
        assert_eq!(old.embedder, None);
        assert!(!serde_json::to_string(&old).unwrap().contains("embedder"));
        cfg.embedder = Some(" ".into());
        assert!(cfg.validate().unwrap_err().contains("embedder"));
    }
}
