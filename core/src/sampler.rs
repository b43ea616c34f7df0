//! Episode sampling for meta-training and evaluation.
//!
//! Every episode is a pure function of (run seed, step, episode index): any process can
//! regenerate any episode without shared state or a global RNG, which is what lets a
//! coordinator send only episode *specs* to workers.

use crate::data::Survey;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

const STREAM_GROUPS: u64 = 1;
const STREAM_QUESTIONS: u64 = 2;
const STREAM_SPLIT: u64 = 3;
const STREAM_EVAL: u64 = 4;
const STREAM_SUBSET: u64 = 5;
const STREAM_VALIDATION: u64 = 6;

/// Context/target sizes (in questions) and the meta-batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// Fewest context questions per episode.
    pub min_ctx: usize,
    /// Most context questions per episode.
    pub max_ctx: usize,
    /// Fewest target questions per episode.
    pub min_tgt: usize,
    /// Most target questions per episode.
    pub max_tgt: usize,
    /// Groups per step; `None` means every training group.
    pub batch_groups: Option<usize>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            min_ctx: 10,
            max_ctx: 100,
            min_tgt: 10,
            max_tgt: 100,
            batch_groups: None,
        }
    }
}

/// One meta-learning episode: a group, its context questions and its target questions
/// (question indices into the survey; disjoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeSpec {
    /// Group index.
    pub group: usize,
    /// Context question indices.
    pub context: Vec<usize>,
    /// Target question indices.
    pub target: Vec<usize>,
}

/// Splits groups into (meta-train, held-out) with `frac` of them for training
/// (`floor(n · frac)`, as the official code), chosen by `seed`. Both lists are sorted.
pub fn group_split(
    n_groups: usize,
    frac: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    if !(frac > 0.0 && frac < 1.0) {
        return Err(format!("group split must be in (0, 1), got {frac}"));
    }
    let n_train = (n_groups as f64 * frac).floor() as usize;
    if n_train == 0 || n_train == n_groups {
        return Err(format!(
            "group split {frac} of {n_groups} groups leaves {n_train} for training: need at least one on each side"
        ));
    }
    let perm = Rng::keyed(&[seed, STREAM_SPLIT]).permutation(n_groups);
    let mut train = perm[..n_train].to_vec();
    let mut test = perm[n_train..].to_vec();
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}

/// Carves validation groups out of the meta-training groups `train`: `floor(n · frac)` of
/// them (at least 1), chosen by `seed` on a stream of their own, so the checkpoint can be
/// selected on groups that neither trained it nor are the reported test groups. Returns
/// (train, validation), both sorted.
pub fn validation_split(
    train: &[usize],
    frac: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    if !(frac > 0.0 && frac < 1.0) {
        return Err(format!("validation split must be in (0, 1), got {frac}"));
    }
    let n = train.len();
    let n_val = ((n as f64 * frac).floor() as usize).max(1);
    if n_val >= n {
        return Err(format!(
            "a validation split of {frac} of {n} meta-training groups leaves none to train on; \
             use more groups, or `selection = \"test\"` (the paper's way)"
        ));
    }
    let perm = Rng::keyed(&[seed, STREAM_VALIDATION]).permutation(n);
    let mut val: Vec<usize> = perm[..n_val].iter().map(|&i| train[i]).collect();
    let mut rest: Vec<usize> = perm[n_val..].iter().map(|&i| train[i]).collect();
    val.sort_unstable();
    rest.sort_unstable();
    Ok((rest, val))
}

/// Splits `groups` into those that answered more than `n_ctx` questions (an evaluation
/// gives them `n_ctx` as context and scores the rest) and those that did not, with their
/// answered counts.
pub fn evaluable_groups(
    s: &Survey,
    groups: &[usize],
    n_ctx: usize,
) -> (Vec<usize>, Vec<(usize, usize)>) {
    let mut keep = Vec::new();
    let mut skip = Vec::new();
    for &g in groups {
        let n = s.answered(g).len();
        if n > n_ctx {
            keep.push(g);
        } else {
            skip.push((g, n));
        }
    }
    (keep, skip)
}

/// Questions every one of `groups` has answers for (the shared pool of OpinionQA-style data).
pub fn common_questions(s: &Survey, groups: &[usize]) -> Vec<usize> {
    (0..s.questions.len())
        .filter(|&q| groups.iter().all(|&g| s.answers[g][q].is_some()))
        .collect()
}

/// The groups of step `step`: all of `train` in order, or `batch` of them drawn without
/// replacement from (seed, step).
pub fn step_groups(seed: u64, step: u64, train: &[usize], batch: Option<usize>) -> Vec<usize> {
    match batch {
        Some(b) if b < train.len() => {
            let perm = Rng::keyed(&[seed, step, STREAM_GROUPS]).permutation(train.len());
            perm[..b].iter().map(|&i| train[i]).collect()
        }
        _ => train.to_vec(),
    }
}

/// Draws (context, target) question lists from `pool`, sizes as the official collate
/// function: n_ctx ∈ [min_ctx, min(max_ctx, n − min_tgt)], n_tgt ∈ [min_tgt, min(max_tgt, n − n_ctx)].
pub fn draw_questions(
    rng: &mut Rng,
    pool: &[usize],
    cfg: &SamplerConfig,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let n = pool.len();
    if n < cfg.min_ctx + cfg.min_tgt || cfg.min_ctx == 0 || cfg.min_tgt == 0 {
        return Err(format!(
            "an episode needs at least {} + {} questions (min context + min target, both ≥ 1), the pool has {n}",
            cfg.min_ctx, cfg.min_tgt
        ));
    }
    let perm = rng.permutation(n);
    let n_ctx = rng.range(
        cfg.min_ctx,
        cfg.max_ctx.max(cfg.min_ctx).min(n - cfg.min_tgt),
    );
    let n_tgt = rng.range(cfg.min_tgt, cfg.max_tgt.max(cfg.min_tgt).min(n - n_ctx));
    let ctx = perm[..n_ctx].iter().map(|&i| pool[i]).collect();
    let tgt = perm[n_ctx..n_ctx + n_tgt]
        .iter()
        .map(|&i| pool[i])
        .collect();
    Ok((ctx, tgt))
}

/// Episode `index` of step `step`. On OpinionQA-style data (`shared`), every episode of a
/// step uses the same questions (one permutation per step over `pool`); otherwise each
/// group draws from the questions it answered.
pub fn episode(
    s: &Survey,
    seed: u64,
    step: u64,
    index: usize,
    group: usize,
    shared_pool: Option<&[usize]>,
    cfg: &SamplerConfig,
) -> Result<EpisodeSpec, String> {
    let (context, target) = match shared_pool {
        Some(pool) => draw_questions(&mut Rng::keyed(&[seed, step, STREAM_QUESTIONS]), pool, cfg)?,
        None => {
            let pool = s.answered(group);
            draw_questions(
                &mut Rng::keyed(&[seed, step, STREAM_QUESTIONS, index as u64]),
                &pool,
                cfg,
            )
            .map_err(|e| format!("group `{}`: {e}", s.groups[group].name))?
        }
    };
    Ok(EpisodeSpec {
        group,
        context,
        target,
    })
}

/// All episodes of one meta-training step.
pub fn step_episodes(
    s: &Survey,
    seed: u64,
    step: u64,
    train: &[usize],
    shared_pool: Option<&[usize]>,
    cfg: &SamplerConfig,
) -> Result<Vec<EpisodeSpec>, String> {
    step_groups(seed, step, train, cfg.batch_groups)
        .into_iter()
        .enumerate()
        .map(|(i, g)| episode(s, seed, step, i, g, shared_pool, cfg))
        .collect()
}

/// Evaluation episodes for held-out `groups`: `n_ctx` context questions (shared by all
/// groups when `shared_pool` is given) and every other answered question as a target.
pub fn eval_episodes(
    s: &Survey,
    seed: u64,
    groups: &[usize],
    shared_pool: Option<&[usize]>,
    n_ctx: usize,
) -> Result<Vec<EpisodeSpec>, String> {
    let pick = |rng: &mut Rng, pool: &[usize]| -> Result<Vec<usize>, String> {
        if pool.len() <= n_ctx {
            return Err(format!(
                "evaluation needs more than {n_ctx} questions, the pool has {}",
                pool.len()
            ));
        }
        let perm = rng.permutation(pool.len());
        let mut c: Vec<usize> = perm[..n_ctx].iter().map(|&i| pool[i]).collect();
        c.sort_unstable();
        Ok(c)
    };
    let shared_ctx = match shared_pool {
        Some(p) => Some(pick(&mut Rng::keyed(&[seed, STREAM_EVAL]), p)?),
        None => None,
    };
    groups
        .iter()
        .map(|&g| {
            let answered = s.answered(g);
            let context = match &shared_ctx {
                Some(c) => c.clone(),
                None => pick(&mut Rng::keyed(&[seed, STREAM_EVAL, g as u64]), &answered)
                    .map_err(|e| format!("group `{}`: {e}", s.groups[g].name))?,
            };
            let target = answered
                .into_iter()
                .filter(|q| !context.contains(q))
                .collect();
            Ok(EpisodeSpec {
                group: g,
                context,
                target,
            })
        })
        .collect()
}

/// Keeps at most `max` targets per episode (all when `max` is 0): those ranked first by one
/// fixed permutation of the survey's `n_questions` questions (keyed by `key`, not by the run's
/// seed), so every split and seed scores the same questions where they are targets, and a
/// per-question cache (the LLM baselines') is reused. Contexts are unchanged; targets stay
/// sorted.
pub fn subsample_targets(
    eps: &[EpisodeSpec],
    n_questions: usize,
    max: usize,
    key: u64,
) -> Vec<EpisodeSpec> {
    let perm = Rng::keyed(&[key, STREAM_SUBSET]).permutation(n_questions);
    let mut rank = vec![usize::MAX; n_questions];
    for (r, &q) in perm.iter().enumerate() {
        rank[q] = r;
    }
    eps.iter()
        .map(|e| {
            let mut t = e.target.clone();
            if max > 0 && t.len() > max {
                t.sort_by_key(|&q| rank.get(q).copied().unwrap_or(usize::MAX));
                t.truncate(max);
                t.sort_unstable();
            }
            EpisodeSpec {
                group: e.group,
                context: e.context.clone(),
                target: t,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{AnswerOption, Group, MetricKind, Question};

    fn survey(nq: usize, ng: usize, metric: MetricKind) -> Survey {
        let q = |i: usize| Question {
            id: format!("Q{i}"),
            text: format!("q{i}"),
            options: (0..3)
                .map(|k| AnswerOption {
                    text: format!("o{k}"),
                    ordinal: Some(k as f64),
                    refusal: false,
                })
                .collect(),
        };
        Survey {
            name: "t".into(),
            metric,
            questions: (0..nq).map(q).collect(),
            groups: (0..ng)
                .map(|g| Group {
                    name: format!("g{g}"),
                })
                .collect(),
            answers: (0..ng)
                .map(|g| {
                    (0..nq)
                        .map(|q| {
                            ((q + g) % 5 != 0 || metric.shares_questions())
                                .then(|| vec![0.2, 0.3, 0.5])
                        })
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn episodes_are_pure_functions_of_seed_step_index() {
        let s = survey(300, 6, MetricKind::Wasserstein);
        let pool = common_questions(&s, &[0, 1, 2]);
        let cfg = SamplerConfig::default();
        let a = step_episodes(&s, 9, 4, &[0, 1, 2], Some(&pool), &cfg).unwrap();
        let b = step_episodes(&s, 9, 4, &[0, 1, 2], Some(&pool), &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[1], episode(&s, 9, 4, 1, 1, Some(&pool), &cfg).unwrap());
        assert_ne!(
            a,
            step_episodes(&s, 9, 5, &[0, 1, 2], Some(&pool), &cfg).unwrap()
        );
        assert_ne!(
            a,
            step_episodes(&s, 10, 4, &[0, 1, 2], Some(&pool), &cfg).unwrap()
        );
    }

    #[test]
    fn sizes_disjointness_and_sharing() {
        let s = survey(300, 6, MetricKind::Wasserstein);
        let pool = common_questions(&s, &[0, 1, 2, 3]);
        let cfg = SamplerConfig::default();
        for step in 0..200 {
            let eps = step_episodes(&s, 1, step, &[0, 1, 2, 3], Some(&pool), &cfg).unwrap();
            for e in &eps {
                assert!(
                    (10..=100).contains(&e.context.len()) && (10..=100).contains(&e.target.len())
                );
                assert!(e.context.iter().all(|q| !e.target.contains(q)));
                assert_eq!(
                    (&e.context, &e.target),
                    (&eps[0].context, &eps[0].target),
                    "shared permutation"
                );
            }
        }
        // Small pool: targets bounded by what is left after the context.
        let small = survey(25, 2, MetricKind::Wasserstein);
        let pool = common_questions(&small, &[0, 1]);
        for step in 0..100 {
            let e = &step_episodes(&small, 1, step, &[0, 1], Some(&pool), &cfg).unwrap()[0];
            assert!(
                e.context.len() >= 10
                    && e.target.len() >= 10
                    && e.context.len() + e.target.len() <= 25
            );
        }
        assert!(step_episodes(
            &survey(15, 2, MetricKind::Wasserstein),
            1,
            0,
            &[0],
            Some(&[0, 1, 2]),
            &cfg
        )
        .is_err());
    }

    #[test]
    fn nominal_data_draws_per_group_from_answered_questions() {
        let s = survey(200, 4, MetricKind::JensenShannon);
        let cfg = SamplerConfig::default();
        let eps = step_episodes(&s, 3, 0, &[0, 1, 2, 3], None, &cfg).unwrap();
        assert_ne!(eps[0].context, eps[1].context);
        for e in &eps {
            assert!(e
                .context
                .iter()
                .chain(&e.target)
                .all(|&q| s.answers[e.group][q].is_some()));
        }
    }

    #[test]
    fn batch_groups_and_split() {
        let g = step_groups(1, 2, &[3, 5, 7, 9], Some(2));
        assert_eq!(g.len(), 2);
        assert_eq!(g, step_groups(1, 2, &[3, 5, 7, 9], Some(2)));
        assert_eq!(step_groups(1, 2, &[3, 5], None), vec![3, 5]);
        let (tr, te) = group_split(34, 0.4, 0).unwrap();
        assert_eq!((tr.len(), te.len()), (13, 21));
        assert!(tr.iter().all(|g| !te.contains(g)));
        assert_ne!(group_split(34, 0.4, 1).unwrap().0, tr);
        assert!(group_split(3, 0.2, 0).is_err() && group_split(3, 1.0, 0).is_err());
    }

    #[test]
    fn eval_context_is_shared_on_ordinal_data_and_targets_are_the_rest() {
        let s = survey(60, 4, MetricKind::Wasserstein);
        let pool = common_questions(&s, &[0, 1, 2, 3]);
        let eps = eval_episodes(&s, 0, &[1, 3], Some(&pool), 20).unwrap();
        assert_eq!(eps[0].context, eps[1].context);
        assert_eq!(eps[0].context.len(), 20);
        assert_eq!(eps[0].target.len(), 40);
    }

    #[test]
    fn target_subsets_are_fixed_and_shared() {
        let s = survey(40, 4, MetricKind::Wasserstein);
        let eps = eval_episodes(
            &s,
            3,
            &[0, 1, 2],
            Some(&common_questions(&s, &[0, 1, 2])),
            5,
        )
        .unwrap();
        let sub = subsample_targets(&eps, 40, 10, 0);
        for (a, b) in eps.iter().zip(&sub) {
            assert_eq!(a.context, b.context);
            assert_eq!(b.target.len(), 10);
            assert!(b.target.iter().all(|q| a.target.contains(q)));
            assert!(b.target.windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(sub[0].target, sub[1].target);
        // Without a cap, nothing changes; the choice follows the key, not the episodes' seed.
        assert_eq!(subsample_targets(&eps, 40, 0, 0)[0].target, eps[0].target);
        assert_eq!(subsample_targets(&eps, 40, 10, 0)[2].target, sub[2].target);
        assert_ne!(subsample_targets(&eps, 40, 10, 1)[0].target, sub[0].target);
    }

    #[test]
    fn validation_is_carved_from_training_groups_by_seed() {
        let train = [1, 3, 4, 7, 9, 12];
        let (rest, val) = validation_split(&train, 0.2, 5).unwrap();
        assert_eq!(val.len(), 1);
        assert_eq!(rest.len(), 5);
        let mut all: Vec<usize> = rest.iter().chain(&val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, train);
        assert_eq!(validation_split(&train, 0.2, 5).unwrap(), (rest, val));
        let picks: std::collections::BTreeSet<Vec<usize>> = (0..20)
            .map(|s| validation_split(&train, 0.34, s).unwrap().1)
            .collect();
        assert!(picks.len() > 3, "the seed must choose: {picks:?}");
        assert_eq!(validation_split(&train, 0.5, 0).unwrap().1.len(), 3);
        assert!(validation_split(&[2], 0.2, 0).is_err());
        assert!(validation_split(&train, 0.0, 0).is_err());
    }
}
