//! The sweep file (`sweep.toml`) and the trials it expands to.
//!
//! Why it exists: a sweep is declared, not scripted. The file names a base run
//! configuration (`[train]`, the same keys as `gpo train --config`), a search space
//! (`[space]`), the datasets and embedders the space may choose, and how the sweep runs
//! (`[sweep]`, `[early_stopping]`). Expansion is deterministic — the same file gives the same
//! trials with the same ids on every machine and after every restart — which is what lets a
//! resumed sweep recognise the trials it already ran.
//!
//! A space key is a dotted path into the run configuration (`adam.lr`,
//! `sampler.max_ctx`, `model.d_model`) or one of the short names of [`ALIASES`]; `context`
//! and `targets` take `[min, max]` pairs; `dataset` and `embedder` choose among
//! `[[datasets]]` and `[[embedders]]` by name.

use crate::space::{dim, draw, float, set, unit};
pub use crate::space::{show, Dim};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::{Table, Value};

/// Short names of the space and the configuration paths they set.
pub const ALIASES: &[(&str, &[&str])] = &[
    ("lr", &["adam.lr"]),
    ("d_model", &["model.d_model"]),
    ("layers", &["model.num_layers"]),
    ("heads", &["model.nhead"]),
    ("ffn", &["model.dim_feedforward"]),
    ("context", &["sampler.min_ctx", "sampler.max_ctx"]),
    ("targets", &["sampler.min_tgt", "sampler.max_tgt"]),
];

/// How trials are drawn from the space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Every combination of the listed values.
    Grid,
    /// `samples` independent draws (seeded by the sweep's `seed`).
    Random {
        /// How many trials.
        samples: usize,
    },
}

/// What ranks the trials: GPO's alignment on the validation groups (the default) or on
/// the held-out test groups, at each trial's selected checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// `summary.validation.gpo` (needs `selection = "validation"`, the default).
    Validation,
    /// `summary.methods.gpo`, the held-out groups' score.
    Test,
}

impl Metric {
    /// The name in the leaderboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Validation => "validation",
            Metric::Test => "test",
        }
    }
}

/// An early-stopping rule on evaluation scores (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EarlyStopping {
    /// Every trial runs to its last step.
    None,
    /// Asynchronous successive halving: rungs at `grace · reduction^k` steps; a trial that
    /// reaches a rung below the `1 − 1/reduction` quantile of the scores seen there stops.
    Asha {
        /// The first rung, in steps.
        grace: u64,
        /// η: the fraction `1/η` of trials passes each rung.
        reduction: f64,
    },
    /// The median rule: from `grace` steps on, a trial whose best score is below the median
    /// of the other trials' best scores at the same step stops (once `min_trials` others
    /// have reached that step).
    Median {
        /// The first step the rule applies at.
        grace: u64,
        /// Trials that must have reached a step before it is judged.
        min_trials: usize,
    },
}

/// One `[[datasets]]` entry (the keys of `gpo experiment`'s datasets).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// Name the space's `dataset` refers to.
    pub name: String,
    /// Dataset path (any layout `gpo train --data` takes); absent: the synthetic survey.
    #[serde(default)]
    pub data: Option<String>,
    /// Explicit layout.
    #[serde(default)]
    pub format: Option<String>,
    /// Embedding store (without an embedder: a finished store).
    #[serde(default)]
    pub embeddings: Option<String>,
}

/// One `[[embedders]]` entry: a model `gpo embed` runs, once per dataset, for every trial
/// that chooses it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Embedder {
    /// Name the space's `embedder` refers to.
    pub name: String,
    /// `gpo embed --model`: an HF folder, a GGUF, or a cached hub id.
    pub model: String,
    /// Prompt template.
    #[serde(default = "default_template")]
    pub template: String,
}

fn default_template() -> String {
    "plain".into()
}

/// A parsed sweep file.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// The sweep's name (its etcd pointer's key, the leaderboard's title).
    pub name: String,
    /// Grid or random.
    pub search: Search,
    /// Seed of random search.
    pub seed: u64,
    /// Trials that run at once.
    pub concurrent: usize,
    /// Workers per trial (a gang: a trial starts only with all of them).
    pub gang: usize,
    /// Workers of the pool (default: `concurrent × gang`).
    pub workers: usize,
    /// How many times a failed trial is run again before it is marked failed.
    pub max_retries: u32,
    /// What ranks the trials.
    pub metric: Metric,
    /// Early stopping.
    pub early_stopping: EarlyStopping,
    /// The base run configuration.
    pub train: Table,
    /// The search space, by key.
    pub space: BTreeMap<String, Dim>,
    /// Datasets the space may choose (none: the synthetic survey).
    pub datasets: Vec<Dataset>,
    /// Embedders the space may choose.
    pub embedders: Vec<Embedder>,
}

/// One trial: its id and the value of every space key.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// `t0000`, `t0001`, ... in expansion order.
    pub id: String,
    /// Space key → value.
    pub params: BTreeMap<String, Value>,
}

const SWEEP_KEYS: &[&str] = &[
    "name",
    "search",
    "samples",
    "seed",
    "concurrent",
    "gang",
    "workers",
    "max_retries",
    "metric",
];

fn int(t: &Table, key: &str, section: &str, default: i64, min: i64) -> Result<i64, String> {
    match t.get(key) {
        None => Ok(default),
        Some(Value::Integer(i)) if *i >= min => Ok(*i),
        Some(v) => Err(format!(
            "[{section}] `{key}` must be an integer of at least {min}, got {v}"
        )),
    }
}

impl SweepSpec {
    /// Parses a sweep file; errors name the section and key.
    pub fn parse(text: &str) -> Result<SweepSpec, String> {
        let doc: Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        for k in doc.keys() {
            if ![
                "sweep",
                "early_stopping",
                "train",
                "space",
                "datasets",
                "embedders",
            ]
            .contains(&k.as_str())
            {
                return Err(format!(
                    "unknown section `{k}` (expected sweep, early_stopping, train, space, datasets, embedders)"
                ));
            }
        }
        let table = |k: &str| -> Result<Table, String> {
            match doc.get(k) {
                None => Ok(Table::new()),
                Some(Value::Table(t)) => Ok(t.clone()),
                Some(_) => Err(format!("`{k}` must be a table")),
            }
        };
        let sweep = table("sweep")?;
        if let Some(k) = sweep.keys().find(|k| !SWEEP_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "[sweep] unknown key `{k}` (expected one of {})",
                SWEEP_KEYS.join(", ")
            ));
        }
        let name = match sweep.get("name") {
            None => "sweep".to_string(),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => s.clone(),
            Some(v) => {
                return Err(format!(
                    "[sweep] `name` must be a string of 1 to 64 characters, got {v}"
                ))
            }
        };
        let search = match sweep.get("search").and_then(|v| v.as_str()) {
            None | Some("grid") => {
                if sweep.contains_key("samples") {
                    return Err("[sweep] `samples` is for search = \"random\"".into());
                }
                Search::Grid
            }
            Some("random") => Search::Random {
                samples: int(&sweep, "samples", "sweep", 10, 1)? as usize,
            },
            Some(o) => {
                return Err(format!(
                    "[sweep] `search` must be \"grid\" or \"random\", got \"{o}\""
                ))
            }
        };
        let concurrent = int(&sweep, "concurrent", "sweep", 1, 1)? as usize;
        let gang = int(&sweep, "gang", "sweep", 1, 1)? as usize;
        let workers = int(&sweep, "workers", "sweep", (concurrent * gang) as i64, 1)? as usize;
        if workers < gang {
            return Err(format!(
                "[sweep] `workers` ({workers}) is smaller than one gang ({gang}): no trial could start"
            ));
        }
        let metric = match sweep.get("metric") {
            None => Metric::Validation,
            Some(v) => Metric::deserialize(v.clone()).map_err(|_| {
                format!("[sweep] `metric` must be \"validation\" or \"test\", got {v}")
            })?,
        };
        let es = table("early_stopping")?;
        let early_stopping = parse_stopping(&es)?;
        let mut space = BTreeMap::new();
        for (k, v) in table("space")? {
            space.insert(k.clone(), dim(&k, &v)?);
        }
        let list = |k: &str| -> Result<Vec<Value>, String> {
            match doc.get(k) {
                None => Ok(vec![]),
                Some(Value::Array(a)) => Ok(a.clone()),
                Some(_) => Err(format!("`{k}` must be an array of tables ([[{k}]])")),
            }
        };
        let datasets: Vec<Dataset> = list("datasets")?
            .into_iter()
            .enumerate()
            .map(|(i, v)| Dataset::deserialize(v).map_err(|e| format!("datasets[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        let embedders: Vec<Embedder> = list("embedders")?
            .into_iter()
            .enumerate()
            .map(|(i, v)| Embedder::deserialize(v).map_err(|e| format!("embedders[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        let spec = SweepSpec {
            name,
            search,
            seed: int(&sweep, "seed", "sweep", 0, 0)? as u64,
            concurrent,
            gang,
            workers,
            max_retries: int(&sweep, "max_retries", "sweep", 1, 0)? as u32,
            metric,
            early_stopping,
            train: table("train")?,
            space,
            datasets,
            embedders,
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), String> {
        let unique = |names: Vec<&str>, what: &str| -> Result<(), String> {
            let mut n = names.clone();
            n.sort_unstable();
            match n.windows(2).find(|w| w[0] == w[1]) {
                Some(w) => Err(format!("{what} name `{}` is used twice", w[0])),
                None => Ok(()),
            }
        };
        unique(
            self.datasets.iter().map(|d| d.name.as_str()).collect(),
            "dataset",
        )?;
        unique(
            self.embedders.iter().map(|d| d.name.as_str()).collect(),
            "embedder",
        )?;
        for (key, dim) in &self.space {
            if self.search == Search::Grid && !matches!(dim, Dim::Values(_)) {
                return Err(format!(
                    "[space] `{key}`: a distribution needs search = \"random\"; a grid takes a list"
                ));
            }
            let names: Vec<&str> = match key.as_str() {
                "dataset" => self.datasets.iter().map(|d| d.name.as_str()).collect(),
                "embedder" => self.embedders.iter().map(|d| d.name.as_str()).collect(),
                _ => continue,
            };
            let Dim::Values(vs) = dim else {
                return Err(format!("[space] `{key}` takes a list of names"));
            };
            for v in vs {
                match v.as_str() {
                    Some(n) if names.contains(&n) => {}
                    _ => {
                        return Err(format!(
                            "[space] `{key}`: {v} is not one of the [[{key}s]] names ({})",
                            names.join(", ")
                        ))
                    }
                }
            }
        }
        if !self.embedders.is_empty() && self.datasets.iter().any(|d| d.data.is_none()) {
            return Err(
                "an embedder needs datasets with `data` (the synthetic survey has no texts)".into(),
            );
        }
        Ok(())
    }

    /// The trials, in a fixed order with fixed ids.
    pub fn trials(&self) -> Vec<Trial> {
        let params: Vec<BTreeMap<String, Value>> = match self.search {
            Search::Grid => {
                let mut out = vec![BTreeMap::new()];
                for (key, dim) in &self.space {
                    let Dim::Values(vs) = dim else {
                        unreachable!("checked: a grid has only lists")
                    };
                    out = out
                        .into_iter()
                        .flat_map(|p| {
                            vs.iter().map(move |v| {
                                let mut p = p.clone();
                                p.insert(key.clone(), v.clone());
                                p
                            })
                        })
                        .collect();
                }
                out
            }
            Search::Random { samples } => (0..samples as u64)
                .map(|i| {
                    self.space
                        .iter()
                        .enumerate()
                        .map(|(d, (key, dim))| {
                            let u = unit(self.seed, i, d as u64);
                            (key.clone(), draw(dim, u))
                        })
                        .collect()
                })
                .collect(),
        };
        let width = params.len().saturating_sub(1).to_string().len().max(4);
        params
            .into_iter()
            .enumerate()
            .map(|(i, params)| Trial {
                id: format!("t{i:0width$}"),
                params,
            })
            .collect()
    }

    /// The run configuration of a trial: `[train]` with the trial's values set. `dataset`
    /// and `embedder` are not configuration keys; [`Trial::dataset`] reads them.
    pub fn config(&self, trial: &Trial) -> Result<Table, String> {
        let mut t = self.train.clone();
        for (key, v) in &trial.params {
            if key == "dataset" || key == "embedder" {
                continue;
            }
            let paths: Vec<&str> = ALIASES
                .iter()
                .find(|(a, _)| a == key)
                .map(|(_, p)| p.to_vec())
                .unwrap_or_else(|| vec![key.as_str()]);
            if paths.len() == 2 {
                let arr = v
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .ok_or_else(|| format!("[space] `{key}` takes [min, max] pairs, got {v}"))?;
                for (p, x) in paths.iter().zip(arr) {
                    set(&mut t, p, x.clone()).map_err(|e| format!("[space] `{key}`: {e}"))?;
                }
            } else {
                set(&mut t, paths[0], v.clone()).map_err(|e| format!("[space] `{key}`: {e}"))?;
            }
        }
        Ok(t)
    }

    /// The dataset a trial runs on (none: the synthetic survey, or the only dataset).
    pub fn dataset(&self, trial: &Trial) -> Option<&Dataset> {
        match trial.params.get("dataset").and_then(|v| v.as_str()) {
            Some(n) => self.datasets.iter().find(|d| d.name == n),
            None => self.datasets.first(),
        }
    }

    /// The embedder a trial's store comes from (none: the dataset's own store).
    pub fn embedder(&self, trial: &Trial) -> Option<&Embedder> {
        match trial.params.get("embedder").and_then(|v| v.as_str()) {
            Some(n) => self.embedders.iter().find(|e| e.name == n),
            None => self.embedders.first(),
        }
    }
}

fn parse_stopping(es: &Table) -> Result<EarlyStopping, String> {
    let keys: &[&str] = match es.get("rule").and_then(|v| v.as_str()) {
        None | Some("none") => &["rule"],
        Some("asha") => &["rule", "grace", "reduction"],
        Some("median") => &["rule", "grace", "min_trials"],
        Some(o) => {
            return Err(format!(
                "[early_stopping] `rule` must be \"asha\", \"median\" or \"none\", got \"{o}\""
            ))
        }
    };
    if let Some(k) = es.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!(
            "[early_stopping] `{k}` does not apply to this rule (its keys: {})",
            keys.join(", ")
        ));
    }
    let grace = int(es, "grace", "early_stopping", 1, 1)? as u64;
    Ok(match es.get("rule").and_then(|v| v.as_str()) {
        Some("asha") => {
            let reduction = match es.get("reduction") {
                None => 3.0,
                Some(v) => float(v)
                    .filter(|r| *r > 1.0 && r.is_finite())
                    .ok_or_else(|| {
                        format!("[early_stopping] `reduction` must be a number above 1, got {v}")
                    })?,
            };
            EarlyStopping::Asha { grace, reduction }
        }
        Some("median") => EarlyStopping::Median {
            grace,
            min_trials: int(es, "min_trials", "early_stopping", 3, 1)? as usize,
        },
        _ => EarlyStopping::None,
    })
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
