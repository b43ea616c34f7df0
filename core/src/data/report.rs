//! What a load skipped, repaired or could not find, because published survey files are
//! imperfect (distributions rounded to three decimals, a question key on several rows, an
//! attribute's file missing) and refusing a whole file for one such flaw helps nobody,
//! while changing data silently would mislead: every change is counted or named here and
//! shown to the user.

use serde::Serialize;

/// Warnings and counts of one load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// One line per thing skipped or missing, naming the file and what.
    pub warnings: Vec<String>,
    /// Distributions rescaled to sum to exactly 1 (published values are rounded).
    pub renormalized: usize,
    /// Distributions that were all zero and were left out (no answer).
    pub all_zero: usize,
}

impl LoadReport {
    /// Adds a warning.
    pub fn warn(&mut self, w: impl Into<String>) {
        self.warnings.push(w.into());
    }

    /// Adds another report's warnings and counts.
    pub fn merge(&mut self, other: LoadReport) {
        self.warnings.extend(other.warnings);
        self.renormalized += other.renormalized;
        self.all_zero += other.all_zero;
    }

    /// Whether there is anything to tell.
    pub fn is_empty(&self) -> bool {
        self.warnings.is_empty() && self.renormalized == 0 && self.all_zero == 0
    }

    /// One line of counts (`renormalized 69 distributions, ...`), or `None` when clean.
    pub fn counts_line(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.renormalized > 0 {
            parts.push(format!(
                "renormalized {} distributions that summed to 1 only within rounding",
                self.renormalized
            ));
        }
        if self.all_zero > 0 {
            parts.push(format!("skipped {} all-zero distributions", self.all_zero));
        }
        if !self.warnings.is_empty() {
            parts.push(format!("{} warnings", self.warnings.len()));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Half a unit of the third decimal: the most one value rounded to three decimals is off.
pub const ROUNDING_PER_VALUE: f64 = 5e-4;

/// How far from 1 the sum of `n` published values may be: what rounding each to three
/// decimals can do (`n × 0.0005`), and never less than [`super::survey::SUM_TOLERANCE`].
pub fn published_sum_tolerance(n: usize) -> f64 {
    (n as f64 * ROUNDING_PER_VALUE).max(super::survey::SUM_TOLERANCE) + 1e-9
}

/// A published distribution, checked in f64.
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    /// It summed to 1 (within 1e-6); stored as given.
    Exact(Vec<f32>),
    /// It summed to 1 within rounding and was rescaled to sum to 1.
    Renormalized(Vec<f32>),
    /// Every value is 0: no answer.
    AllZero,
}

/// Checks a published distribution of `n` values: finite, non-negative, summing to 1
/// within [`published_sum_tolerance`] (checked in f64, before any rounding to f32: 0.999
/// is 0.99899997 in f32). An error says what is wrong.
pub fn published_distribution(d: &[f64], n: usize) -> Result<Published, String> {
    if d.len() != n {
        return Err(format!(
            "distribution has {} entries, expected {n} (one per option)",
            d.len()
        ));
    }
    for (i, &p) in d.iter().enumerate() {
        if !p.is_finite() {
            return Err(format!("entry {i} is {p}, expected a finite probability"));
        }
        if p < 0.0 {
            return Err(format!("entry {i} is negative ({p})"));
        }
    }
    let s: f64 = d.iter().sum();
    if s == 0.0 {
        return Ok(Published::AllZero);
    }
    let tol = published_sum_tolerance(n);
    if (s - 1.0).abs() > tol {
        return Err(format!(
            "distribution sums to {s:.6}, expected 1 within {tol:.4} (rounding of {n} values to three decimals)"
        ));
    }
    if (s - 1.0).abs() <= 1e-6 {
        Ok(Published::Exact(d.iter().map(|&p| p as f32).collect()))
    } else {
        Ok(Published::Renormalized(
            d.iter().map(|&p| (p / s) as f32).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounded_sums_are_renormalized_in_f64() {
        // 0.999 is 0.99899997 in f32, just outside 1e-3; in f64 it is inside.
        let d = [0.333, 0.333, 0.333];
        match published_distribution(&d, 3).unwrap() {
            Published::Renormalized(v) => {
                let s: f32 = v.iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{v:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            published_distribution(&[0.5, 0.501], 2).unwrap(),
            Published::Renormalized(_)
        ));
        assert!(matches!(
            published_distribution(&[0.25, 0.75], 2).unwrap(),
            Published::Exact(_)
        ));
        // 4 values rounded to 3 decimals can be 0.002 off; 0.003 cannot.
        published_distribution(&[0.25, 0.25, 0.25, 0.248], 4).unwrap();
        let e = published_distribution(&[0.25, 0.25, 0.25, 0.247], 4).unwrap_err();
        assert!(e.contains("sums to 0.997"), "{e}");
        assert_eq!(
            published_distribution(&[0.0, 0.0], 2).unwrap(),
            Published::AllZero
        );
        assert!(published_distribution(&[f64::NAN, 1.0], 2).is_err());
        assert!(published_distribution(&[-0.1, 1.1], 2).is_err());
        assert!(published_distribution(&[1.0], 2).is_err());
    }
}
