//! Alignment evaluation on held-out groups: GPO's predictions from a few context answers,
//! next to the uniform and training-mean baselines, scored with the survey's metric.

use crate::data::{MetricKind, Survey};
use crate::features::{assemble, PointFeatures};
use crate::metrics::{pair_score, ScoreAccumulator};
use crate::model::Gpo;
use crate::sampler::EpisodeSpec;
use candle_core::Device;
use serde::Serialize;
use std::collections::BTreeMap;

/// Target questions per forward pass (targets never attend to each other, so chunking
/// them changes nothing but peak memory).
const TARGET_CHUNK: usize = 128;

/// Scores of every method on one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// How pairs were scored.
    pub metric: MetricKind,
    /// Mean alignment per method (`gpo`, `uniform`, `train_mean`).
    pub methods: BTreeMap<String, f64>,
    /// GPO's mean alignment per held-out group, by name.
    pub per_group: BTreeMap<String, f64>,
    /// (group, question) pairs scored.
    pub pairs: usize,
    /// Target pairs with an answer whose question no training group answered: `train_mean`
    /// is uniform there (common on GlobalOpinionQA-style data: countries answer few questions).
    pub no_train_answer: usize,
}

/// The training groups' mean distribution for every question (`None` where no training
/// group answered it).
pub fn train_mean(s: &Survey, train: &[usize]) -> Vec<Option<Vec<f64>>> {
    (0..s.questions.len())
        .map(|q| {
            let mut acc: Option<Vec<f64>> = None;
            let mut n = 0usize;
            for &g in train {
                if let Some(d) = &s.answers[g][q] {
                    let a = acc.get_or_insert_with(|| vec![0.0; d.len()]);
                    for (x, &p) in a.iter_mut().zip(d) {
                        *x += p as f64;
                    }
                    n += 1;
                }
            }
            acc.map(|a| a.into_iter().map(|x| x / n as f64).collect())
        })
        .collect()
}

/// Target pairs of `eps` with an answer whose question no group of `train` answered.
pub fn no_train_answer_pairs(s: &Survey, train: &[usize], eps: &[EpisodeSpec]) -> usize {
    eps.iter()
        .flat_map(|e| e.target.iter().map(move |&q| (e.group, q)))
        .filter(|&(g, q)| {
            s.answers[g][q].is_some() && train.iter().all(|&t| s.answers[t][q].is_none())
        })
        .count()
}

/// Baseline scores only (no model): `uniform` and `train_mean`.
pub fn baselines(s: &Survey, train: &[usize], eps: &[EpisodeSpec]) -> BTreeMap<String, f64> {
    let tm = train_mean(s, train);
    let mut uni = ScoreAccumulator::default();
    let mut mean = ScoreAccumulator::default();
    for e in eps {
        for &q in &e.target {
            let Some(truth) = &s.answers[e.group][q] else {
                continue;
            };
            let truth: Vec<f64> = truth.iter().map(|&p| p as f64).collect();
            let ord = s.questions[q].ordinals();
            let u = vec![1.0 / truth.len() as f64; truth.len()];
            if let Some(v) = pair_score(s.metric, ord.as_deref(), &u, &truth) {
                uni.add(e.group, v);
                let m = tm[q].clone().unwrap_or(u);
                mean.add(
                    e.group,
                    pair_score(s.metric, ord.as_deref(), &m, &truth).unwrap_or(v),
                );
            }
        }
    }
    BTreeMap::from([
        ("uniform".to_string(), uni.mean()),
        ("train_mean".to_string(), mean.mean()),
    ])
}

/// Evaluates GPO and the baselines on evaluation episodes (context answers are given,
/// every target is scored).
pub fn evaluate(
    model: &Gpo,
    s: &Survey,
    f: &PointFeatures,
    train: &[usize],
    eps: &[EpisodeSpec],
    device: &Device,
) -> candle_core::Result<EvalReport> {
    let mut gpo = ScoreAccumulator::default();
    let shared = eps
        .iter()
        .all(|e| e.context == eps[0].context && e.target == eps[0].target);
    // Shared questions: all groups in one batch per target chunk. Otherwise group by group.
    let batches: Vec<Vec<EpisodeSpec>> = if shared {
        vec![eps.to_vec()]
    } else {
        eps.iter().map(|e| vec![e.clone()]).collect()
    };
    for batch in batches {
        let n_tgt = batch[0].target.len();
        for chunk_start in (0..n_tgt.max(1)).step_by(TARGET_CHUNK) {
            let chunk: Vec<EpisodeSpec> = batch
                .iter()
                .map(|e| EpisodeSpec {
                    group: e.group,
                    context: e.context.clone(),
                    target: e.target[chunk_start.min(e.target.len())
                        ..(chunk_start + TARGET_CHUNK).min(e.target.len())]
                        .to_vec(),
                })
                .collect();
            if chunk.iter().all(|e| e.target.is_empty()) {
                continue;
            }
            let mb = assemble(s, f, &chunk, device)?;
            let pred = model.predict(&mb)?;
            for (gi, e) in chunk.iter().enumerate() {
                for (&q, &(start, n)) in e.target.iter().zip(&mb.segments[gi]) {
                    let Some(truth) = &s.answers[e.group][q] else {
                        continue;
                    };
                    let truth: Vec<f64> = truth.iter().map(|&p| p as f64).collect();
                    let p: Vec<f64> = pred[gi * mb.nt + start..gi * mb.nt + start + n]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    if let Some(v) =
                        pair_score(s.metric, s.questions[q].ordinals().as_deref(), &p, &truth)
                    {
                        gpo.add(e.group, v);
                    }
                }
            }
        }
    }
    let mut methods = baselines(s, train, eps);
    methods.insert("gpo".into(), gpo.mean());
    Ok(EvalReport {
        metric: s.metric,
        methods,
        per_group: gpo
            .per_group()
            .into_iter()
            .map(|(g, v)| (s.groups[g].name.clone(), v))
            .collect(),
        pairs: gpo.count(),
        no_train_answer: no_train_answer_pairs(s, train, eps),
    })
}
