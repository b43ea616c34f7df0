//! Alignment scores between a predicted and a true answer distribution, with SciPy's
//! conventions (`scipy.stats.wasserstein_distance`, `scipy.spatial.distance.jensenshannon`),
//! and their aggregation over (group, question) pairs as the paper reports them.

use crate::data::MetricKind;

/// 1-D Wasserstein distance between two weighted distributions on the same support
/// `values` (need not be sorted). Weights are normalized to sum 1, as SciPy does.
pub fn wasserstein(values: &[f64], u: &[f64], v: &[f64]) -> f64 {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let (su, sv): (f64, f64) = (u.iter().sum(), v.iter().sum());
    let (mut cu, mut cv, mut d) = (0.0, 0.0, 0.0);
    for w in idx.windows(2) {
        cu += u[w[0]] / su;
        cv += v[w[0]] / sv;
        d += (cu - cv).abs() * (values[w[1]] - values[w[0]]);
    }
    d
}

/// The OpinionQA alignment of one question: 1 − WD / (max ordinal − min ordinal).
/// `None` when the question has no order (all ordinals equal).
pub fn wasserstein_alignment(ordinals: &[f64], pred: &[f64], truth: &[f64]) -> Option<f64> {
    let (lo, hi) = ordinals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    (hi > lo).then(|| 1.0 - wasserstein(ordinals, pred, truth) / (hi - lo))
}

/// Jensen–Shannon *distance* (the square root of the divergence), natural log, with
/// inputs normalized to sum 1 (SciPy's `jensenshannon(p, q)`).
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    let rel = |a: f64, b: f64| if a > 0.0 { a * (a / b).ln() } else { 0.0 };
    let mut js = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        let (a, b) = (a / sp, b / sq);
        let m = 0.5 * (a + b);
        js += 0.5 * (rel(a, m) + rel(b, m));
    }
    js.max(0.0).sqrt()
}

/// 1 if the predicted top option is the chosen one (the truth's top option), else 0.
/// Ties in the prediction go to the first option, like `argmax`.
pub fn top1_accuracy(pred: &[f64], truth: &[f64]) -> f64 {
    let argmax = |v: &[f64]| {
        v.iter()
            .enumerate()
            .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
    };
    if argmax(pred) == argmax(truth) {
        1.0
    } else {
        0.0
    }
}

/// The alignment score of one (group, question) pair under a metric; `None` when the
/// question does not count (no order under the Wasserstein score).
pub fn pair_score(
    kind: MetricKind,
    ordinals: Option<&[f64]>,
    pred: &[f64],
    truth: &[f64],
) -> Option<f64> {
    match kind {
        MetricKind::Wasserstein => wasserstein_alignment(ordinals?, pred, truth),
        MetricKind::JensenShannon => Some(1.0 - jensen_shannon(pred, truth)),
        MetricKind::Accuracy => Some(top1_accuracy(pred, truth)),
    }
}

/// Running mean of pair scores, overall and per group.
#[derive(Debug, Clone, Default)]
pub struct ScoreAccumulator {
    sum: f64,
    n: usize,
    per_group: std::collections::BTreeMap<usize, (f64, usize)>,
}

impl ScoreAccumulator {
    /// Adds one (group, question) pair's score.
    pub fn add(&mut self, group: usize, score: f64) {
        self.sum += score;
        self.n += 1;
        let e = self.per_group.entry(group).or_insert((0.0, 0));
        e.0 += score;
        e.1 += 1;
    }

    /// Mean over all pairs (NaN when empty).
    pub fn mean(&self) -> f64 {
        self.sum / self.n as f64
    }

    /// Pairs scored.
    pub fn count(&self) -> usize {
        self.n
    }

    /// Mean per group, by group index.
    pub fn per_group(&self) -> Vec<(usize, f64)> {
        self.per_group
            .iter()
            .map(|(&g, &(s, n))| (g, s / n as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn wasserstein_by_hand_and_scipy_conventions() {
        // Point masses at 1 and 4: distance 3; alignment 0.
        assert!(close(
            wasserstein(&[1., 2., 3., 4.], &[1., 0., 0., 0.], &[0., 0., 0., 1.]),
            3.0
        ));
        assert!(close(
            wasserstein_alignment(&[1., 2., 3., 4.], &[1., 0., 0., 0.], &[0., 0., 0., 1.]).unwrap(),
            0.0
        ));
        // scipy.stats.wasserstein_distance([1,2,3],[1,2,3],[.5,.5,0],[0,.5,.5]) == 1.0
        assert!(close(
            wasserstein(&[1., 2., 3.], &[0.5, 0.5, 0.], &[0., 0.5, 0.5]),
            1.0
        ));
        // Unnormalized weights are normalized: [1,1,0] vs [0,2,2] is the same as above.
        assert!(close(
            wasserstein(&[1., 2., 3.], &[1., 1., 0.], &[0., 2., 2.]),
            1.0
        ));
        // Unsorted support, as OpinionQA's [1, 2, 1.5]: masses at 1 and 1.5 → 0.5.
        assert!(close(
            wasserstein(&[1., 2., 1.5], &[1., 0., 0.], &[0., 0., 1.]),
            0.5
        ));
        // CDF gaps: u=[.2,.3,.5], v=[.5,.3,.2] on 1,2,3 → |.2−.5|+|.5−.8| = 0.6.
        assert!(close(
            wasserstein(&[1., 2., 3.], &[0.2, 0.3, 0.5], &[0.5, 0.3, 0.2]),
            0.6
        ));
        assert!(close(
            wasserstein_alignment(&[1., 2., 3.], &[0.2, 0.3, 0.5], &[0.5, 0.3, 0.2]).unwrap(),
            0.7
        ));
        // No order: skipped.
        assert!(wasserstein_alignment(&[1., 1.], &[0.5, 0.5], &[1., 0.]).is_none());
    }

    #[test]
    fn jensen_shannon_by_hand_and_scipy_conventions() {
        assert!(close(jensen_shannon(&[0.3, 0.7], &[0.3, 0.7]), 0.0));
        // Disjoint supports: JS divergence = ln 2, distance = √ln 2 (natural log).
        assert!(close(
            jensen_shannon(&[1., 0.], &[0., 1.]),
            std::f64::consts::LN_2.sqrt()
        ));
        // scipy.spatial.distance.jensenshannon([1.0, 0.0], [0.5, 0.5]) = 0.4645014...
        let m = [0.75, 0.25];
        let js = 0.5 * ((1.0f64 / m[0]).ln())
            + 0.5 * (0.5 * (0.5f64 / m[0]).ln() + 0.5 * (0.5f64 / m[1]).ln());
        assert!(close(jensen_shannon(&[1., 0.], &[0.5, 0.5]), js.sqrt()));
        assert!((jensen_shannon(&[1., 0.], &[0.5, 0.5]) - 0.464_501_4).abs() < 1e-6);
        // Inputs are normalized first.
        assert!(close(
            jensen_shannon(&[2., 0.], &[1., 1.]),
            jensen_shannon(&[1., 0.], &[0.5, 0.5])
        ));
    }

    #[test]
    fn accuracy_and_aggregation() {
        assert_eq!(top1_accuracy(&[0.1, 0.6, 0.3], &[0., 1., 0.]), 1.0);
        assert_eq!(top1_accuracy(&[0.5, 0.5], &[0., 1.]), 0.0);
        let mut acc = ScoreAccumulator::default();
        acc.add(0, 1.0);
        acc.add(0, 0.0);
        acc.add(3, 1.0);
        assert!(close(acc.mean(), 2.0 / 3.0));
        assert_eq!(acc.per_group(), vec![(0, 0.5), (3, 1.0)]);
        assert!(pair_score(MetricKind::Wasserstein, None, &[1.], &[1.]).is_none());
    }
}
