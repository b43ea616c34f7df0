//! The GPO forward for served requests, through the very functions `gpo eval` uses:
//! requests become a small [`Survey`] (one group per request) with its [`PointFeatures`],
//! episodes name each request's context and target questions, and
//! [`gpo_core::features::assemble`] + [`Gpo::predict`] compute the distributions. A batch of
//! one request is therefore exactly `gpo eval`'s computation for that group. Rerank scores a
//! prompt whose options are the candidates. Pure: no I/O, no async, no clock.

use crate::task::Item;
use candle_core::Device;
use gpo_core::data::{AnswerOption, MetricKind, Question, Survey};
use gpo_core::features::{assemble, PointFeatures};
use gpo_core::model::{EncodedContext, Gpo};
use gpo_core::prompt::Template;
use gpo_core::sampler::EpisodeSpec;
use std::sync::Arc;

/// A question as a survey question (all options answerable, no ordinals).
pub fn question(id: String, item: &Item) -> Question {
    Question {
        id,
        text: item.question.clone(),
        options: item
            .options
            .iter()
            .map(|o| AnswerOption {
                text: o.clone(),
                ordinal: None,
                refusal: false,
            })
            .collect(),
    }
}

/// The texts the embedder sees for `q`'s options, rendered as the embedding store renders
/// them.
pub fn texts(template: Template, q: &Question) -> Vec<String> {
    (0..q.options.len())
        .map(|k| template.render(q, k))
        .collect()
}

/// A question with one embedding per option.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The question.
    pub question: Question,
    /// `x` of each option, in order.
    pub x: Vec<Arc<[f32]>>,
}

/// A group's embedded context: questions and the group's distributions, and, once a request
/// alone has run against it, the context encoded by the model ([`Gpo::encode_context`]), so
/// later requests pay for their target rows only.
#[derive(Debug, Clone)]
pub struct GroupContext {
    /// Context questions.
    pub questions: Vec<Embedded>,
    /// The group's distribution over each question's options.
    pub distributions: Vec<Vec<f32>>,
    /// The encoded context of a one-request batch (filled by the first).
    pub encoded: std::sync::OnceLock<EncodedContext>,
}

impl GroupContext {
    /// A context not yet encoded.
    pub fn new(questions: Vec<Embedded>, distributions: Vec<Vec<f32>>) -> GroupContext {
        GroupContext {
            questions,
            distributions,
            encoded: Default::default(),
        }
    }
}

impl GroupContext {
    /// Context points (options of all context questions): the forward's Nc.
    pub fn points(&self) -> usize {
        self.questions.iter().map(|q| q.x.len()).sum()
    }
}

/// One request's forward: a group context and embedded targets.
#[derive(Debug, Clone)]
pub struct Job {
    /// The group.
    pub context: Arc<GroupContext>,
    /// Target questions.
    pub targets: Vec<Embedded>,
}

impl Job {
    /// Points of the job (context and targets), the forward batcher's cost.
    pub fn points(&self) -> usize {
        self.context.points() + self.targets.iter().map(|t| t.x.len()).sum::<usize>()
    }
}

/// Predicts every job's targets in one forward pass (jobs are groups of one batch, padded
/// by `assemble` as `gpo eval` pads groups that answer different questions). Returns, per
/// job, one distribution per target. A job alone runs against its context's encoding
/// (computed by the first such job): bitwise the same predictions, for the target rows'
/// cost only.
pub fn predict(model: &Gpo, jobs: &[&Job]) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    predict_with(model, jobs, true)
}

/// [`predict`], with the encoded-context path for a job alone only when `encoded`.
pub fn predict_with(
    model: &Gpo,
    jobs: &[&Job],
    encoded: bool,
) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    let dim = model.cfg.dim_x;
    let mut s = Survey {
        name: "served".into(),
        metric: MetricKind::JensenShannon,
        questions: Vec::new(),
        groups: Vec::new(),
        answers: Vec::new(),
    };
    let mut f = PointFeatures {
        dim,
        x: Vec::new(),
        start: Vec::new(),
        len: Vec::new(),
        prior: None,
    };
    let mut eps = Vec::with_capacity(jobs.len());
    let mut answers: Vec<(usize, usize, Vec<f32>)> = Vec::new();
    for (g, job) in jobs.iter().enumerate() {
        s.groups.push(gpo_core::data::Group {
            name: format!("request-{g}"),
        });
        let mut add = |e: &Embedded| -> candle_core::Result<usize> {
            let q = s.questions.len();
            f.start.push(f.x.len() / dim);
            f.len.push(e.x.len());
            for v in &e.x {
                if v.len() != dim {
                    candle_core::bail!("an embedding has width {}, the model reads {dim}", v.len());
                }
                f.x.extend_from_slice(v);
            }
            s.questions.push(e.question.clone());
            Ok(q)
        };
        let mut ep = EpisodeSpec {
            group: g,
            context: Vec::new(),
            target: Vec::new(),
        };
        for (e, d) in job.context.questions.iter().zip(&job.context.distributions) {
            let q = add(e)?;
            ep.context.push(q);
            answers.push((g, q, d.clone()));
        }
        for e in &job.targets {
            ep.target.push(add(e)?);
        }
        eps.push(ep);
    }
    s.answers = vec![vec![None; s.questions.len()]; jobs.len()];
    for (g, q, d) in answers {
        s.answers[g][q] = Some(d);
    }
    let mb = assemble(&s, &f, &eps, &Device::Cpu)?;
    let pred = match jobs {
        [job] if encoded => {
            let enc = match job.context.encoded.get() {
                Some(e) => e,
                None => {
                    let e = model.encode_context(&mb)?;
                    job.context.encoded.get_or_init(|| e)
                }
            };
            model.predict_encoded(enc, &mb)?
        }
        _ => model.predict(&mb)?,
    };
    Ok(eps
        .iter()
        .enumerate()
        .map(|(g, e)| {
            e.target
                .iter()
                .zip(&mb.segments[g])
                .map(|(_, &(start, n))| pred[g * mb.nt + start..g * mb.nt + start + n].to_vec())
                .collect()
        })
        .collect())
}

/// Whether the encoded-context path reproduces the whole forward bit for bit for `model` on
/// this CPU, on probes of the served shape (20 context and 10 target questions of 4 options,
/// and a smaller one). It does at the official module's widths (tested in core); at toy
/// widths gemm's small-matrix path can round a product of fewer rows differently, and the
/// server then runs every request through the whole forward.
pub fn encoded_path_is_exact(model: &Gpo) -> bool {
    let dim = model.cfg.dim_x;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut emb = |name: String| {
        let item = Item {
            question: name,
            options: (0..4).map(|k| format!("option {k}")).collect(),
        };
        Embedded {
            question: question("probe".into(), &item),
            x: (0..4)
                .map(|_| (0..dim).map(|_| next()).collect::<Vec<f32>>().into())
                .collect(),
        }
    };
    [(20, 10), (3, 2)].into_iter().all(|(nc, nt)| {
        let questions: Vec<Embedded> = (0..nc).map(|i| emb(format!("c{i}"))).collect();
        let job = Job {
            context: Arc::new(GroupContext::new(
                questions,
                vec![vec![0.1, 0.2, 0.3, 0.4]; nc],
            )),
            targets: (0..nt).map(|i| emb(format!("t{i}"))).collect(),
        };
        let bits = |p: candle_core::Result<Vec<Vec<Vec<f32>>>>| {
            p.map(|p| {
                p.into_iter()
                    .flatten()
                    .flatten()
                    .map(f32::to_bits)
                    .collect::<Vec<_>>()
            })
        };
        match (
            bits(predict_with(model, &[&job], false)),
            bits(predict_with(model, &[&job], true)),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    })
}

/// Rerank results from the predicted distribution over the candidates: `(index, score)`,
/// best first (ties by index).
pub fn rank(distribution: &[f32]) -> Vec<(usize, f32)> {
    let mut r: Vec<(usize, f32)> = distribution.iter().copied().enumerate().collect();
    r.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpo_core::model::GpoConfig;

    fn model() -> Gpo {
        let cfg = GpoConfig {
            dim_x: 8,
            d_model: 16,
            dim_feedforward: 16,
            nhead: 2,
            num_layers: 2,
            ..Default::default()
        };
        Gpo::new(cfg, 7, &Device::Cpu).unwrap()
    }

    fn emb(seed: u32, n: usize) -> Embedded {
        let item = Item {
            question: format!("q{seed}"),
            options: (0..n).map(|k| format!("o{k}")).collect(),
        };
        Embedded {
            question: question("q".into(), &item),
            x: (0..n)
                .map(|k| {
                    (0..8)
                        .map(|i| ((seed as usize * 31 + k * 7 + i) % 13) as f32 / 13.0 - 0.4)
                        .collect::<Vec<f32>>()
                        .into()
                })
                .collect(),
        }
    }

    fn job(seed: u32, ctx: &[usize], tgt: &[usize]) -> Job {
        let questions: Vec<Embedded> = ctx
            .iter()
            .enumerate()
            .map(|(i, &n)| emb(seed + i as u32, n))
            .collect();
        let distributions = ctx
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|k| (k + 1) as f32 * 2.0 / (n * (n + 1)) as f32)
                    .collect()
            })
            .collect();
        Job {
            context: Arc::new(GroupContext::new(questions, distributions)),
            targets: tgt
                .iter()
                .enumerate()
                .map(|(i, &n)| emb(seed + 100 + i as u32, n))
                .collect(),
        }
    }

    #[test]
    fn predictions_are_distributions_per_target() {
        let m = model();
        let j = job(1, &[2, 3], &[4, 2]);
        let p = predict(&m, &[&j]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 2]);
        for d in &p[0] {
            assert!((d.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{d:?}");
        }
    }

    /// Merged passes are close to, not bitwise, each request's own pass (the server merges
    /// only under `--merge-forward`); a pass of one request is repeatable bit for bit.
    #[test]
    fn a_merged_batch_is_within_an_ulp_of_each_request_alone() {
        let m = model();
        // Same context width (the batcher batches only those), different targets.
        let a = job(1, &[2, 3], &[4, 2]);
        let b = job(5, &[3, 2], &[2]);
        let c = job(9, &[5], &[3, 3, 2]);
        let alone: Vec<_> = [&a, &b, &c]
            .iter()
            .map(|j| predict(&m, &[j]).unwrap().remove(0))
            .collect();
        let batched = predict(&m, &[&a, &b, &c]).unwrap();
        for (x, y) in batched
            .iter()
            .flatten()
            .flatten()
            .zip(alone.iter().flatten().flatten())
        {
            assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
        }
        assert_eq!(predict(&m, &[&a]).unwrap()[0], alone[0]);
    }

    #[test]
    fn ranks_best_first() {
        assert_eq!(rank(&[0.2, 0.5, 0.3]), vec![(1, 0.5), (2, 0.3), (0, 0.2)]);
        assert_eq!(rank(&[0.5, 0.5]), vec![(0, 0.5), (1, 0.5)]);
    }
}
