//! The experiment's outputs: `results.json` (mean ± std over seeds per dataset, split and
//! method), `fewshot.json`, PNG plots, and `report.md` tying them together.

use super::{plots, ExperimentConfig, FewShotPoint, RunRecord};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Mean, sample standard deviation and count of one method's scores over seeds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Agg {
    /// Mean over seeds.
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for a single seed.
    pub std: f64,
    /// Seeds.
    pub n: usize,
}

/// Aggregates values over seeds.
pub fn agg(v: &[f64]) -> Agg {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    let var = if n > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Agg {
        mean,
        std: var.sqrt(),
        n,
    }
}

type Results = BTreeMap<String, BTreeMap<String, BTreeMap<String, Agg>>>;

fn split_key(s: f64) -> String {
    format!("{s}")
}

/// The LLM baselines' methods (scored on the target subset only).
pub const LM_METHODS: [&str; 3] = ["lm_base", "lm_steered", "few_shot"];

/// The results key of a dataset's LLM-subset comparison.
pub fn subset_key(dataset: &str) -> String {
    format!("{dataset} (LLM subset)")
}

/// The results' name for GPO's score on the validation groups at the selected checkpoint.
pub const VALIDATION_METHOD: &str = "gpo (validation groups)";

/// `{dataset: {split: {method: {mean, std, n}}}}`. A dataset's entry holds GPO and the simple
/// baselines on every target, plus the LLM baselines (on their subset); `"<dataset> (LLM
/// subset)"` holds every method on that same subset.
pub fn results(records: &[RunRecord]) -> Results {
    let mut raw: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for r in records {
        let mut push = |d: String, m: &str, v: f64| {
            raw.entry((d, split_key(r.split), m.to_string()))
                .or_default()
                .push(v)
        };
        for (m, v) in &r.summary.methods {
            push(r.dataset.clone(), m, *v);
        }
        // GPO on the validation groups that selected its checkpoint (not held out groups).
        // Each variant's (`gpo+<variant>`) under its own name.
        for (m, v) in r.summary.validation.iter().flatten() {
            if m == "gpo" {
                push(r.dataset.clone(), VALIDATION_METHOD, *v);
            } else if m.starts_with("gpo+") {
                push(r.dataset.clone(), &format!("{m} (validation groups)"), *v);
            }
        }
        for (m, v) in &r.lm_subset {
            if LM_METHODS.contains(&m.as_str()) {
                push(r.dataset.clone(), m, *v);
            }
            push(subset_key(&r.dataset), m, *v);
        }
    }
    let mut out: Results = BTreeMap::new();
    for ((d, s, m), v) in raw {
        out.entry(d)
            .or_default()
            .entry(s)
            .or_default()
            .insert(m, agg(&v));
    }
    out
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The paper's OpinionQA figures (Alpaca-7B, read off its main figure), by split.
const PAPER_OPINIONQA: [(&str, [f64; 3]); 3] = [
    ("gpo", [0.920, 0.926, 0.946]),
    ("uniform", [0.824, 0.823, 0.823]),
    ("in-context finetune", [0.869, 0.862, 0.863]),
];

/// Writes every output file.
pub fn write(
    cfg: &ExperimentConfig,
    out: &Path,
    records: &[RunRecord],
    curve: &[FewShotPoint],
) -> Result<()> {
    let res = results(records);
    let json = serde_json::to_vec_pretty(&res)?;
    gpo_core::io::checkpoint::write_atomic(&out.join("results.json"), &json)
        .context("writing results.json")?;
    let fs = serde_json::to_vec_pretty(curve)?;
    gpo_core::io::checkpoint::write_atomic(&out.join("fewshot.json"), &fs)
        .context("writing fewshot.json")?;

    let mut md = String::new();
    writeln!(md, "# {}\n", cfg.name)?;
    let selection = match cfg.train.selection {
        gpo_coordinator::config::Selection::Validation => format!(
            "the checkpoint is selected by GPO's alignment on validation groups carved from the \
             meta-training groups ({} of them, by seed; they do not train) and the held-out test \
             groups' scores at that checkpoint are reported (`{VALIDATION_METHOD}` is the \
             validation score itself)",
            cfg.train.validation_split
        ),
        gpo_coordinator::config::Selection::Test => "the best checkpoint by held-out alignment is \
             kept and that same score reported, as in the paper (optimistic)"
            .to_string(),
    };
    writeln!(
        md,
        "Protocol: meta-train on a fraction of the groups (splits {:?}), seeds {:?}, {} steps each \
         (lr {}, evaluation every {} steps); held-out groups get {} context questions; {selection}. \
         Scores are mean ± std over seeds.\n",
        cfg.splits, cfg.seeds, cfg.train.steps, cfg.train.adam.lr, cfg.train.eval_every, cfg.train.eval_context
    )?;
    let no_train: usize = records
        .iter()
        .map(|r| r.summary.no_train_answer_pairs)
        .sum();
    let pairs: usize = records.iter().map(|r| r.summary.eval_pairs).sum();
    if no_train > 0 {
        writeln!(
            md,
            "On {no_train} of {pairs} scored (group, question) pairs (all runs together) no \
             meta-training group answered the question, so `train_mean` is the uniform \
             distribution there.\n"
        )?;
    }
    let notes: Vec<&String> = records.iter().flat_map(|r| &r.summary.plan_notes).collect();
    if !notes.is_empty() {
        writeln!(
            md,
            "Groups left out ({} notes over all runs):\n",
            notes.len()
        )?;
        let mut uniq: Vec<&String> = notes.clone();
        uniq.sort();
        uniq.dedup();
        for n in uniq.iter().take(20) {
            writeln!(md, "- {n}")?;
        }
        writeln!(md)?;
    }
    for (ds, by_split) in &res {
        let metric = records
            .iter()
            .find(|r| &r.dataset == ds)
            .map(|r| r.summary.metric);
        let metric = metric.or_else(|| {
            records
                .iter()
                .find(|r| subset_key(&r.dataset) == *ds)
                .map(|r| r.summary.metric)
        });
        writeln!(md, "## {ds}\n")?;
        if let Some(m) = metric {
            writeln!(md, "Metric: {m:?}.\n")?;
        }
        if let Some(d) = cfg
            .datasets
            .iter()
            .find(|d| d.lm_model.is_some() && (d.name == *ds || subset_key(&d.name) == *ds))
        {
            let n = if d.lm_targets == 0 {
                "every target question".to_string()
            } else {
                format!(
                    "at most {} target questions per held-out group",
                    d.lm_targets
                )
            };
            if d.name == *ds {
                writeln!(
                    md,
                    "`lm_base`, `lm_steered` and `few_shot` use `{}` and are scored on {n} (one fixed \
                     subset of the questions, the same for every split and seed); the other methods on \
                     every target. The next table compares all methods on that subset.\n",
                    d.lm_model.as_deref().unwrap_or_default()
                )?;
            } else {
                writeln!(md, "Every method on the same pairs: {n}.\n")?;
            }
        }
        let splits: Vec<String> = by_split.keys().cloned().collect();
        let mut methods: Vec<String> = by_split.values().flat_map(|m| m.keys().cloned()).collect();
        methods.sort();
        methods.dedup();
        writeln!(
            md,
            "| method | {} |",
            splits
                .iter()
                .map(|s| format!("split {s}"))
                .collect::<Vec<_>>()
                .join(" | ")
        )?;
        writeln!(md, "|---|{}", "---|".repeat(splits.len()))?;
        for m in &methods {
            let cells: Vec<String> = splits
                .iter()
                .map(|s| {
                    by_split[s]
                        .get(m)
                        .map_or("—".into(), |a| format!("{:.4} ± {:.4}", a.mean, a.std))
                })
                .collect();
            writeln!(md, "| {m} | {} |", cells.join(" | "))?;
        }
        if ds.to_lowercase().contains("opinionqa") {
            writeln!(
                md,
                "\nThe paper (Alpaca-7B embeddings; splits 0.4 / 0.6 / 0.8):\n"
            )?;
            writeln!(md, "| method | 0.4 | 0.6 | 0.8 |\n|---|---|---|---|")?;
            for (m, v) in PAPER_OPINIONQA {
                writeln!(md, "| {m} | {:.3} | {:.3} | {:.3} |", v[0], v[1], v[2])?;
            }
        }
        let stat: BTreeMap<(String, String), plots::Stat> = by_split
            .iter()
            .flat_map(|(s, ms)| {
                ms.iter()
                    .map(move |(m, a)| ((s.clone(), m.clone()), (a.mean, a.std)))
            })
            .collect();
        let bars = format!("bars_{}.png", file_safe(ds));
        plots::bars(
            &out.join(&bars),
            &format!("{ds}: alignment on held-out groups"),
            &splits,
            &methods,
            &stat,
        )?;
        writeln!(md, "\n![alignment by method and split]({bars})\n")?;

        let points: Vec<&FewShotPoint> = curve.iter().filter(|p| &p.dataset == ds).collect();
        if !points.is_empty() {
            let mut by_method: BTreeMap<String, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
            for p in &points {
                for (m, v) in &p.methods {
                    by_method
                        .entry(m.clone())
                        .or_default()
                        .entry(p.k)
                        .or_default()
                        .push(*v);
                }
            }
            let series: Vec<(String, Vec<(f64, f64)>)> = by_method
                .iter()
                .map(|(m, ks)| {
                    (
                        m.clone(),
                        ks.iter().map(|(&k, v)| (k as f64, agg(v).mean)).collect(),
                    )
                })
                .collect();
            let fname = format!("fewshot_{}.png", file_safe(ds));
            plots::lines(
                &out.join(&fname),
                &format!("{ds}: alignment vs context questions"),
                "context questions",
                "alignment",
                &series,
            )?;
            let ks: Vec<usize> = points
                .iter()
                .map(|p| p.k)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let on_subset = cfg
                .datasets
                .iter()
                .any(|d| d.name == *ds && d.lm_model.is_some());
            writeln!(
                md,
                "Few-shot curve (split {}; mean over seeds {:?}; GPO needs at least one context question{}):\n",
                cfg.few_shot_split.unwrap_or(cfg.splits[0]),
                cfg.few_shot_seeds.as_ref().unwrap_or(&cfg.seeds),
                if on_subset { "; every method on the LLM subset" } else { "" }
            )?;
            writeln!(
                md,
                "| method | {} |",
                ks.iter()
                    .map(|k| format!("k={k}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )?;
            writeln!(md, "|---|{}", "---|".repeat(ks.len()))?;
            for (m, by_k) in &by_method {
                let cells: Vec<String> = ks
                    .iter()
                    .map(|k| {
                        by_k.get(k)
                            .map_or("—".into(), |v| format!("{:.4}", agg(v).mean))
                    })
                    .collect();
                writeln!(md, "| {m} | {} |", cells.join(" | "))?;
            }
            writeln!(md, "\n![few-shot curve]({fname})\n")?;
        }

        let runs: Vec<&RunRecord> = records.iter().filter(|r| &r.dataset == ds).collect();
        if runs.is_empty() {
            continue;
        }
        let loss: Vec<(String, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|r| {
                // Mean loss over windows of 10 steps: single steps vary with episode sizes.
                let h = &r.summary.loss_history;
                let pts = h
                    .chunks(10)
                    .map(|c| {
                        (
                            c[c.len() - 1].0 as f64,
                            c.iter().map(|x| x.1).sum::<f64>() / c.len() as f64,
                        )
                    })
                    .collect();
                (format!("split {} seed {}", r.split, r.seed), pts)
            })
            .collect();
        let val: Vec<(String, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|r| {
                (
                    format!("split {} seed {}", r.split, r.seed),
                    r.summary
                        .eval_history
                        .iter()
                        .map(|e| (e.step as f64, e.gpo))
                        .collect(),
                )
            })
            .collect();
        let (lf, vf) = (
            format!("train_loss_{}.png", file_safe(ds)),
            format!("val_alignment_{}.png", file_safe(ds)),
        );
        plots::lines(
            &out.join(&lf),
            &format!("{ds}: training loss (10-step means)"),
            "step",
            "GPO loss",
            &loss,
        )?;
        plots::lines(
            &out.join(&vf),
            &format!("{ds}: held-out alignment during training"),
            "step",
            "alignment",
            &val,
        )?;
        writeln!(
            md,
            "![training loss]({lf})\n\n![validation alignment]({vf})\n"
        )?;
    }
    if cfg.datasets.iter().any(|d| d.lm_model.is_none()) {
        writeln!(
            md,
            "Datasets without `lm_model` have no LLM baselines (`lm_base`, `lm_steered`, `few_shot`).\n"
        )?;
    }
    writeln!(
        md,
        "Per-run details (summary.json, checkpoints) are under `<dataset>/split<s>/seed<n>/`.\n"
    )?;
    gpo_core::io::checkpoint::write_atomic(&out.join("report.md"), md.as_bytes())
        .context("writing report.md")
}

#[cfg(test)]
mod tests {
    use super::agg;

    #[test]
    fn aggregate_uses_sample_std() {
        let a = agg(&[1.0, 2.0, 3.0]);
        assert_eq!((a.mean, a.n), (2.0, 3));
        assert!((a.std - 1.0).abs() < 1e-12);
        assert_eq!(agg(&[0.5]).std, 0.0);
    }
}
