//! Tests of [`super`], in their own file to keep the module under the ~600-line limit.

use std::collections::HashSet;

use super::catalogue::catalogue;
use super::*;
use crate::store::text_key;

#[test]
fn individuals_answer_one_option_each_and_are_scored_by_accuracy() {
    let cfg = SynthConfig {
        n_questions: 20,
        n_groups: 3,
        individuals_per_group: 4,
        ..Default::default()
    };
    let out = generate(&cfg);
    let s = &out.survey;
    assert_eq!(s.metric, MetricKind::Accuracy);
    assert_eq!(s.groups.len(), 12);
    assert!(s.validate().is_ok());
    for row in &s.answers {
        for d in row.iter().flatten() {
            assert_eq!(d.iter().filter(|&&x| x == 1.0).count(), 1);
        }
    }
    // Individuals of one group agree more with each other than with other groups.
    let agree = |a: usize, b: usize| {
        s.answers[a]
            .iter()
            .zip(&s.answers[b])
            .filter(|(x, y)| x == y)
            .count()
    };
    let within = agree(0, 1) + agree(0, 2) + agree(4, 5);
    let across = agree(0, 4) + agree(0, 8) + agree(4, 8);
    assert!(within > across, "within {within} across {across}");
    assert_eq!(generate(&cfg).survey, out.survey);
}

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        ..SynthConfig::default()
    }
}

/// Normalized 1-Wasserstein distance between two distributions on 1..K.
fn w1(p: &[f32], q: &[f32]) -> f64 {
    let k = p.len();
    let (mut cp, mut cq, mut d) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..k - 1 {
        cp += f64::from(p[i]);
        cq += f64::from(q[i]);
        d += (cp - cq).abs();
    }
    d / (k - 1) as f64
}

fn mean_dist(ds: &[&[f32]]) -> Vec<f32> {
    let k = ds[0].len();
    (0..k)
        .map(|i| ds.iter().map(|d| d[i]).sum::<f32>() / ds.len() as f32)
        .collect()
}

fn dist(s: &Survey, g: usize, q: usize) -> &[f32] {
    s.answers[g][q].as_deref().unwrap()
}

#[test]
fn default_config_and_serde_defaults() {
    let c = SynthConfig::default();
    assert_eq!(
        (c.n_questions, c.n_groups, c.dim, c.latent),
        (80, 24, 32, 4)
    );
    assert!(c.validate().is_ok());
    let d: SynthConfig = serde_json::from_str(r#"{"seed": 9, "dim": 16}"#).unwrap();
    assert_eq!(
        d,
        SynthConfig {
            seed: 9,
            dim: 16,
            ..SynthConfig::default()
        }
    );
    assert!(serde_json::from_str::<SynthConfig>(r#"{"dims": 16}"#).is_err());
    for bad in [
        SynthConfig {
            n_questions: 0,
            ..c.clone()
        },
        SynthConfig {
            n_groups: 0,
            ..c.clone()
        },
        SynthConfig {
            dim: 0,
            ..c.clone()
        },
        SynthConfig {
            latent: 0,
            ..c.clone()
        },
        SynthConfig {
            noise: f32::NAN,
            ..c.clone()
        },
        SynthConfig {
            noise: -1.0,
            ..c.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn survey_is_valid_and_complete() {
    let out = generate(&SynthConfig::default());
    let s = &out.survey;
    s.validate().unwrap();
    assert_eq!(s.metric, MetricKind::Wasserstein);
    assert_eq!(s.questions.len(), 80);
    assert_eq!(s.groups.len(), 24);
    assert_eq!(s.groups[6].name, "Synthetic:Group 07");
    assert_eq!(s.questions[0].id, "SYN001");
    assert_eq!(s.questions[79].id, "SYN080");
    for g in 0..s.groups.len() {
        assert_eq!(s.answered(g).len(), s.questions.len());
    }
    let mut sizes = HashSet::new();
    let mut refusals = 0;
    for q in &s.questions {
        let ords = q.ordinals().expect("every question is ordinal");
        assert_eq!(
            ords,
            (1..=q.n_answerable()).map(|k| k as f64).collect::<Vec<_>>()
        );
        sizes.insert(q.n_answerable());
        if q.options.iter().any(|o| o.refusal) {
            refusals += 1;
            let r = q.options.last().unwrap();
            assert!(r.refusal && r.ordinal.is_none() && r.text == "Refused");
        }
    }
    assert!(sizes.contains(&4) && sizes.contains(&5), "{sizes:?}");
    assert!(
        refusals > 5 && refusals < 60,
        "{refusals} questions with refusals"
    );
    let topics: HashSet<_> = out_topics(&SynthConfig::default());
    assert!(topics.len() >= 8, "{topics:?}");
}

fn out_topics(cfg: &SynthConfig) -> HashSet<usize> {
    build_world(cfg).params.iter().map(|p| p.topic).collect()
}

#[test]
fn embeddings_cover_every_answerable_option_with_unique_keys() {
    for cfg in [
        SynthConfig::default(),
        SynthConfig {
            n_questions: 450,
            n_groups: 3,
            seed: 5,
            ..SynthConfig::default()
        },
    ] {
        let out = generate(&cfg);
        let s = &out.survey;
        let texts: HashSet<&str> = s.questions.iter().map(|q| q.text.as_str()).collect();
        assert_eq!(texts.len(), s.questions.len(), "question texts repeat");
        let n: usize = s.questions.iter().map(|q| q.n_answerable()).sum();
        assert_eq!(out.embeddings.len(), n);
        let keys: HashSet<&str> = out.embeddings.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.len(), n, "keys repeat");
        let mut it = out.embeddings.iter();
        for q in &s.questions {
            for (i, o) in q.options.iter().enumerate() {
                if o.refusal {
                    continue;
                }
                let (k, x) = it.next().unwrap();
                let text = Template::Plain.render(q, i);
                assert_eq!(k, &text_key(EMBEDDER, "plain", &text));
                assert_eq!(x.len(), cfg.dim);
                assert!(x.iter().all(|v| v.is_finite()));
            }
        }
        assert_eq!(out.embedder, EMBEDDER);
        assert_eq!(out.template, Template::Plain);
        assert_eq!(out.store_meta().dim, cfg.dim);
    }
}

#[test]
fn question_texts_read_as_english() {
    let s = generate(&SynthConfig::default()).survey;
    for q in &s.questions {
        assert!(q.text.ends_with('.') || q.text.ends_with('?'), "{}", q.text);
        assert!(q.text.chars().next().unwrap().is_uppercase(), "{}", q.text);
        assert!(!q.text.contains("  "), "{}", q.text);
    }
    // The catalogue holds at least 80 distinct first-wave questions.
    assert!(catalogue().len() >= 80);
    let bodies: HashSet<&str> = catalogue().iter().map(|i| i.body).collect();
    assert_eq!(bodies.len(), catalogue().len());
}

#[test]
fn same_seed_same_output_different_seed_different_output() {
    let a = generate(&small(11));
    let b = generate(&small(11));
    assert_eq!(a.survey, b.survey);
    assert_eq!(a.embeddings, b.embeddings);
    let c = generate(&small(12));
    assert_ne!(a.survey.answers, c.survey.answers);
    assert_ne!(a.embeddings, c.embeddings);
    let qa: Vec<&str> = a.survey.questions.iter().map(|q| q.text.as_str()).collect();
    let qc: Vec<&str> = c.survey.questions.iter().map(|q| q.text.as_str()).collect();
    assert_ne!(qa, qc);
}

#[test]
fn more_groups_or_questions_keep_the_existing_ones() {
    let a = generate(&SynthConfig {
        n_questions: 30,
        n_groups: 5,
        ..small(3)
    });
    let b = generate(&SynthConfig {
        n_questions: 40,
        n_groups: 8,
        ..small(3)
    });
    assert_eq!(a.survey.questions[..], b.survey.questions[..30]);
    for g in 0..5 {
        assert_eq!(a.survey.answers[g][..], b.survey.answers[g][..30]);
    }
    assert_eq!(a.embeddings[..], b.embeddings[..a.embeddings.len()]);
}

#[test]
fn degenerate_configs_do_not_panic() {
    for cfg in [
        SynthConfig {
            n_questions: 0,
            ..SynthConfig::default()
        },
        SynthConfig {
            n_groups: 0,
            ..SynthConfig::default()
        },
        SynthConfig {
            dim: 0,
            ..SynthConfig::default()
        },
        SynthConfig {
            latent: 0,
            ..SynthConfig::default()
        },
        SynthConfig {
            noise: f32::NAN,
            ..SynthConfig::default()
        },
    ] {
        let out = generate(&cfg);
        out.survey.validate().unwrap();
        assert!(out
            .embeddings
            .iter()
            .all(|(_, x)| x.iter().all(|v| v.is_finite())));
    }
}

#[test]
fn embeddings_have_unit_scale_and_noise_is_small() {
    let out = generate(&SynthConfig::default());
    let xs: Vec<f64> = out
        .embeddings
        .iter()
        .flat_map(|(_, x)| x.iter().map(|&v| f64::from(v)))
        .collect();
    let var = xs.iter().map(|v| v * v).sum::<f64>() / xs.len() as f64;
    assert!((0.3..3.0).contains(&var), "mean square {var}");
    let clean = generate(&SynthConfig {
        noise: 0.0,
        ..SynthConfig::default()
    });
    let diff = out
        .embeddings
        .iter()
        .zip(&clean.embeddings)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)))
        .sum::<f64>()
        / xs.len() as f64;
    assert!(
        (diff.sqrt() - 0.05).abs() < 0.01,
        "noise rms {}",
        diff.sqrt()
    );
}

/// Groups differ: the mean over training groups is a poor predictor of a held-out
/// group, so there is something for context to add.
#[test]
fn groups_differ_substantially_from_the_train_mean() {
    let s = generate(&SynthConfig::default()).survey;
    let (train, test) = (0..18, 18..24);
    let mut total = 0.0;
    let mut n = 0;
    for q in 0..s.questions.len() {
        let ds: Vec<&[f32]> = train.clone().map(|g| dist(&s, g, q)).collect();
        let m = mean_dist(&ds);
        for g in test.clone() {
            total += w1(dist(&s, g, q), &m);
            n += 1;
        }
    }
    let mean = total / n as f64;
    assert!(
        mean > 0.1,
        "mean normalized W1 to the train mean is only {mean:.4}"
    );
}

/// Solves `(XᵀX + λI) w = Xᵀy` by Gaussian elimination with partial pivoting.
fn ridge(xs: &[Vec<f64>], ys: &[f64], lambda: f64) -> Vec<f64> {
    let d = xs[0].len();
    let mut a = vec![vec![0.0; d + 1]; d];
    for (x, &y) in xs.iter().zip(ys) {
        for i in 0..d {
            for j in 0..d {
                a[i][j] += x[i] * x[j];
            }
            a[i][d] += x[i] * y;
        }
    }
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += lambda;
    }
    for c in 0..d {
        let p = (c..d)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        for r in 0..d {
            if r != c {
                let f = a[r][c] / a[c][c];
                let pivot = a[c].clone();
                for (x, p) in a[r].iter_mut().zip(pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    (0..d).map(|i| a[i][d] / a[i][i]).collect()
}

fn centred_log(p: &[f32]) -> Vec<f64> {
    let l: Vec<f64> = p.iter().map(|&x| f64::from(x).ln()).collect();
    let m = l.iter().sum::<f64>() / l.len() as f64;
    l.iter().map(|x| x - m).collect()
}

fn softmax(l: &[f64]) -> Vec<f32> {
    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| (x / z) as f32).collect()
}

/// Learnability through the embeddings alone: for each held-out group, a ridge
/// regression from the embeddings of ~20 context questions to how the group's
/// log-probabilities deviate from the training mean predicts the other questions far
/// better than the training mean, which in turn beats the uniform distribution.
#[test]
fn context_answers_and_embeddings_predict_held_out_groups() {
    for seed in [0, 1, 2] {
        let out = generate(&small(seed));
        let s = &out.survey;
        let nq = s.questions.len();
        // Embedding rows per question, in option order.
        let mut rows: Vec<Vec<Vec<f64>>> = Vec::with_capacity(nq);
        let mut it = out.embeddings.iter();
        for q in &s.questions {
            rows.push(
                (0..q.n_answerable())
                    .map(|_| it.next().unwrap().1.iter().map(|&v| f64::from(v)).collect())
                    .collect(),
            );
        }
        let (train, test) = (0..18, 18..24);
        let means: Vec<Vec<f32>> = (0..nq)
            .map(|q| mean_dist(&train.clone().map(|g| dist(s, g, q)).collect::<Vec<_>>()))
            .collect();
        let (mut e_uniform, mut e_mean, mut e_ridge, mut n) = (0.0, 0.0, 0.0, 0);
        for g in test {
            let order = Rng::keyed(&[seed, 99, g as u64]).permutation(nq);
            let (ctx, tgt) = order.split_at(20);
            let mut xs = Vec::new();
            let mut ys = Vec::new();
            for &q in ctx {
                let dev: Vec<f64> = centred_log(dist(s, g, q))
                    .iter()
                    .zip(centred_log(&means[q]))
                    .map(|(a, b)| a - b)
                    .collect();
                for (x, y) in rows[q].iter().zip(dev) {
                    xs.push(x.clone());
                    ys.push(y);
                }
            }
            let w = ridge(&xs, &ys, 1.0);
            for &q in tgt {
                let truth = dist(s, g, q);
                let k = truth.len();
                let pred: Vec<f64> = centred_log(&means[q])
                    .iter()
                    .zip(&rows[q])
                    .map(|(m, x)| m + dot(&w, x))
                    .collect();
                e_uniform += w1(truth, &vec![1.0 / k as f32; k]);
                e_mean += w1(truth, &means[q]);
                e_ridge += w1(truth, &softmax(&pred));
                n += 1;
            }
        }
        let (u, m, r) = (e_uniform / n as f64, e_mean / n as f64, e_ridge / n as f64);
        eprintln!("seed {seed}: uniform {u:.4}  train-mean {m:.4}  context ridge {r:.4}");
        assert!(
            m < u,
            "seed {seed}: train mean {m:.4} not better than uniform {u:.4}"
        );
        assert!(
            r < 0.6 * m,
            "seed {seed}: context ridge {r:.4} vs train mean {m:.4}"
        );
    }
}
