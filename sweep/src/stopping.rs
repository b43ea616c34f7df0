//! Early stopping: which running trial is not worth finishing, judged on the evaluation
//! scores the trials have reported so far (higher is better).
//!
//! Why it exists: most of a sweep's compute goes to trials that lose. Both rules here are
//! asynchronous — a trial is judged the moment it reports, against whoever has reported at
//! that point — so no trial ever waits for another, which is what keeps a gang scheduler
//! busy. A trial is judged on its best score so far, the score its checkpoint selection
//! would keep.
//!
//! - **ASHA** (Li et al., 2020): rungs at `grace · η^k` steps. A trial reaching a rung is
//!   stopped when its score is below the `1 − 1/η` quantile of the scores recorded at that
//!   rung (its own included), so about `1/η` of the trials pass each rung.
//! - **The median rule** (Golovin et al., 2017): from `grace` steps on, a trial whose best
//!   score is below the median of the other trials' best scores at the same step is stopped,
//!   once `min_trials` other trials have reached that step.

use crate::spec::EarlyStopping;
use std::collections::BTreeMap;

/// The stopping rule's memory: what every trial reported.
#[derive(Debug, Clone)]
pub struct Stopper {
    rule: EarlyStopping,
    /// ASHA: rung step → scores recorded there.
    rungs: BTreeMap<u64, Vec<f64>>,
    /// Trial → (step, best score up to that step), in step order.
    history: BTreeMap<usize, Vec<(u64, f64)>>,
}

/// The `q` quantile (0..=1) of `v`, linearly interpolated (numpy's default).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

impl Stopper {
    /// A stopper with nothing reported.
    pub fn new(rule: EarlyStopping) -> Self {
        Stopper {
            rule,
            rungs: BTreeMap::new(),
            history: BTreeMap::new(),
        }
    }

    /// The ASHA rungs up to `max_step`.
    pub fn rungs_upto(&self, max_step: u64) -> Vec<u64> {
        let EarlyStopping::Asha { grace, reduction } = self.rule else {
            return vec![];
        };
        let mut out = Vec::new();
        let mut r = grace as f64;
        while r.round() as u64 <= max_step {
            let step = r.round() as u64;
            if out.last() != Some(&step) {
                out.push(step);
            }
            r *= reduction;
        }
        out
    }

    /// The best score trial `trial` reported.
    pub fn best(&self, trial: usize) -> Option<f64> {
        self.history.get(&trial).and_then(|h| h.last()).map(|p| p.1)
    }

    /// Trial `trial` scored `score` at `step` (steps of one trial only grow; a report at or
    /// below its last step is ignored). Returns whether the trial should stop now.
    pub fn report(&mut self, trial: usize, step: u64, score: f64) -> bool {
        let prev = self.history.get(&trial).and_then(|h| h.last()).copied();
        if prev.is_some_and(|(s, _)| step <= s) || !score.is_finite() {
            return false;
        }
        let best = prev.map_or(score, |(_, b)| b.max(score));
        self.history.entry(trial).or_default().push((step, best));
        match self.rule {
            EarlyStopping::None => false,
            EarlyStopping::Asha { reduction, .. } => {
                let prev_step = prev.map_or(0, |p| p.0);
                let crossed: Vec<u64> = self
                    .rungs_upto(step)
                    .into_iter()
                    .filter(|r| *r > prev_step)
                    .collect();
                let mut stop = false;
                for r in crossed {
                    let scores = self.rungs.entry(r).or_default();
                    scores.push(best);
                    stop |= best < quantile(scores, 1.0 - 1.0 / reduction);
                }
                stop
            }
            EarlyStopping::Median { grace, min_trials } => {
                if step < grace {
                    return false;
                }
                let others: Vec<f64> = self
                    .history
                    .iter()
                    .filter(|(t, h)| **t != trial && h.last().is_some_and(|p| p.0 >= step))
                    .filter_map(|(_, h)| h.iter().rev().find(|p| p.0 <= step).map(|p| p.1))
                    .collect();
                others.len() >= min_trials && best < quantile(&others, 0.5)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        assert_eq!(quantile(&[1.0], 0.5), 1.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0], 2.0 / 3.0) - 3.0).abs() < 1e-12);
        assert_eq!(quantile(&[1.0, 2.0], 0.0), 1.0);
    }

    #[test]
    fn asha_rungs_grow_geometrically() {
        let s = Stopper::new(EarlyStopping::Asha {
            grace: 10,
            reduction: 3.0,
        });
        assert_eq!(s.rungs_upto(100), vec![10, 30, 90]);
    }

    #[test]
    fn asha_stops_the_trials_below_the_rungs_top_third() {
        let mut s = Stopper::new(EarlyStopping::Asha {
            grace: 10,
            reduction: 3.0,
        });
        // The first trial at a rung always passes (it is its own quantile).
        assert!(!s.report(0, 10, 0.5));
        // Below the 2/3 quantile of {0.5, 0.4}: stopped.
        assert!(s.report(1, 10, 0.4));
        // Above it: goes on.
        assert!(!s.report(2, 10, 0.9));
        // Evaluations between rungs never stop a trial.
        assert!(!s.report(2, 20, 0.1));
        // A trial judged on its best score so far: 0.9 at rung 30 passes.
        assert!(!s.report(2, 30, 0.2));
        // A report at an old step is ignored.
        assert!(!s.report(2, 30, 0.0));
    }

    #[test]
    fn the_median_rule_compares_with_others_at_the_same_step() {
        let mut s = Stopper::new(EarlyStopping::Median {
            grace: 20,
            min_trials: 2,
        });
        for t in 0..2 {
            assert!(!s.report(t, 10, 0.6 + t as f64 * 0.1));
            assert!(!s.report(t, 20, 0.65 + t as f64 * 0.1));
        }
        // Before the grace step: never.
        assert!(!s.report(2, 10, 0.1));
        // At step 20: median of {0.65, 0.75} = 0.7 > 0.3: stopped.
        assert!(s.report(2, 20, 0.3));
        // A good one is not.
        assert!(!s.report(3, 10, 0.9));
        assert!(!s.report(3, 20, 0.5), "best 0.9 so far beats the median");
        // Too few others at a step: not judged.
        assert!(!s.report(4, 40, 0.0));
    }
}
