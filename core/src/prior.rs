//! The population prior: each question's mean answer distribution over the meta-training
//! groups, which the model variants that read it ([`crate::model::Variant`]) take as an
//! input or as the point their predictions depart from.
//!
//! It exists because on survey data that mean (`train_mean` in the evaluation) is a strong
//! baseline that the faithful module does not beat. A meta-training group's prior leaves
//! the group itself out: in training, as at evaluation, a group's prior is what the *other*
//! groups answered, so the model never learns to lean on a prior that contains its target.
//! Pure: a function of the survey and the meta-training groups.

use crate::data::Survey;

/// Mixed into every prior so that no option has probability 0 (its log is taken):
/// `(1 − ε) · mean + ε · uniform`.
pub const SMOOTHING: f64 = 0.01;

/// The meta-training groups' answers, summed per question, for leave-one-out means.
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    /// The meta-training groups (indices into the survey's groups), sorted.
    groups: Vec<usize>,
    /// Per question: the sum of the meta-training groups' distributions, and how many
    /// answered it.
    sums: Vec<(Vec<f64>, usize)>,
}

impl Prior {
    /// The prior of `s` under the meta-training groups `train`.
    pub fn new(s: &Survey, train: &[usize]) -> Self {
        let mut groups = train.to_vec();
        groups.sort_unstable();
        groups.dedup();
        let sums = (0..s.questions.len())
            .map(|q| {
                let mut acc: Vec<f64> = Vec::new();
                let mut n = 0;
                for &g in &groups {
                    if let Some(d) = &s.answers[g][q] {
                        acc.resize(d.len(), 0.0);
                        for (a, &p) in acc.iter_mut().zip(d) {
                            *a += p as f64;
                        }
                        n += 1;
                    }
                }
                (acc, n)
            })
            .collect();
        Prior { groups, sums }
    }

    /// The meta-training groups it was computed from.
    pub fn groups(&self) -> &[usize] {
        &self.groups
    }

    /// The prior of group `g` on question `q`, over the question's `n` points: the mean of
    /// the other meta-training groups' answers (all of them for a group outside the
    /// meta-training set), smoothed by [`SMOOTHING`]; uniform where no other group answered.
    pub fn of(&self, s: &Survey, g: usize, q: usize, n: usize) -> Vec<f32> {
        let (sum, mut count) = (&self.sums[q].0, self.sums[q].1);
        let mut mean: Vec<f64> = if sum.len() == n {
            sum.clone()
        } else {
            count = 0;
            vec![0.0; n]
        };
        if count > 0 && self.groups.binary_search(&g).is_ok() {
            if let Some(own) = &s.answers[g][q] {
                for (m, &p) in mean.iter_mut().zip(own) {
                    *m -= p as f64;
                }
                count -= 1;
            }
        }
        let u = 1.0 / n.max(1) as f64;
        mean.iter()
            .map(|&m| {
                let p = if count > 0 {
                    (m / count as f64).max(0.0)
                } else {
                    u
                };
                ((1.0 - SMOOTHING) * p + SMOOTHING * u) as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{generate, SynthConfig};

    #[test]
    fn a_training_groups_prior_leaves_the_group_out() {
        let s = generate(&SynthConfig::default()).survey;
        let train = vec![0, 1, 2];
        let p = Prior::new(&s, &train);
        let q = (0..s.questions.len())
            .find(|&q| train.iter().all(|&g| s.answers[g][q].is_some()))
            .unwrap();
        let n = s.answers[0][q].as_ref().unwrap().len();
        let mean = |gs: &[usize]| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let m = gs
                        .iter()
                        .map(|&g| s.answers[g][q].as_ref().unwrap()[i] as f64)
                        .sum::<f64>()
                        / gs.len() as f64;
                    ((1.0 - SMOOTHING) * m + SMOOTHING / n as f64) as f32
                })
                .collect()
        };
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&p.of(&s, 0, q, n), &mean(&[1, 2])));
        assert!(close(&p.of(&s, 2, q, n), &mean(&[0, 1])));
        // A held-out group's prior is every meta-training group's mean: `train_mean`.
        let held = s.groups.len() - 1;
        assert!(close(&p.of(&s, held, q, n), &mean(&[0, 1, 2])));
        let sum: f32 = p.of(&s, held, q, n).iter().sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn no_other_answer_gives_the_uniform_prior() {
        let s = generate(&SynthConfig::default()).survey;
        let p = Prior::new(&s, &[0]);
        let n = s.answers[0][0].as_ref().map_or(3, |d| d.len());
        let u = p.of(&s, 0, 0, n);
        assert!(
            u.iter().all(|&x| (x - 1.0 / n as f32).abs() < 1e-6),
            "{u:?}"
        );
    }
}
