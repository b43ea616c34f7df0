//! The survey data model every loader produces and every consumer reads.
//!
//! A [`Survey`] is a set of multiple-choice questions, a set of groups, and for each
//! (group, question) pair that was asked, the group's answer distribution over the
//! question's *non-refusal* options. GPO's points are exactly those options, so the
//! distribution's length always equals [`Question::answerable`]'s length.

use serde::{Deserialize, Serialize};

/// How alignment is scored on a survey; it also tells the sampler how questions are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// OpinionQA: 1 − Wasserstein distance over ordinal values / (max − min ordinal).
    /// Every group answers the same questions, so a step shares one permutation.
    Wasserstein,
    /// GlobalOpinionQA: 1 − Jensen–Shannon distance (natural log). Groups answer
    /// different question subsets, so each group gets its own permutation, with padding.
    JensenShannon,
    /// Individual users: accuracy of the predicted top option against the chosen one.
    Accuracy,
}

impl MetricKind {
    /// Whether every group of such a survey answers the same questions (OpinionQA-style).
    pub fn shares_questions(self) -> bool {
        matches!(self, MetricKind::Wasserstein)
    }
}

/// One answer option of a question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerOption {
    /// The option's text as the survey shows it.
    pub text: String,
    /// Position on the question's ordinal scale; `None` for nominal options and refusals.
    #[serde(default)]
    pub ordinal: Option<f64>,
    /// A refusal ("Refused", "Don't know") option: never a GPO point, never in a distribution.
    #[serde(default)]
    pub refusal: bool,
}

/// A multiple-choice question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    /// Stable id, unique within a survey (e.g. `SAFECRIME_W26`).
    pub id: String,
    /// The question's text.
    pub text: String,
    /// All options in survey order, refusals included.
    pub options: Vec<AnswerOption>,
}

impl Question {
    /// The non-refusal options, in order: the question's GPO points.
    pub fn answerable(&self) -> impl Iterator<Item = &AnswerOption> {
        self.options.iter().filter(|o| !o.refusal)
    }

    /// Number of non-refusal options.
    pub fn n_answerable(&self) -> usize {
        self.answerable().count()
    }

    /// Ordinal values of the non-refusal options, when every one has a value and they are
    /// not all equal; `None` for a question with no order (skipped by the Wasserstein score).
    pub fn ordinals(&self) -> Option<Vec<f64>> {
        let v: Option<Vec<f64>> = self.answerable().map(|o| o.ordinal).collect();
        let v = v?;
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        (v.len() >= 2 && hi > lo).then_some(v)
    }
}

/// A group whose preferences GPO models (a demographic, a country, or one user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Display and lookup name, e.g. `SEX:Female` or `Nigeria`.
    pub name: String,
}

/// A whole survey: questions, groups, and the answer distributions.
#[derive(Debug, Clone, PartialEq)]
pub struct Survey {
    /// Human-readable dataset name.
    pub name: String,
    /// How alignment is scored (and whether groups share questions).
    pub metric: MetricKind,
    /// Questions, indexed by position.
    pub questions: Vec<Question>,
    /// Groups, indexed by position.
    pub groups: Vec<Group>,
    /// `answers[g][q]`: group g's distribution over question q's non-refusal options,
    /// or `None` where the group was not asked. Each present vector sums to 1.
    pub answers: Vec<Vec<Option<Vec<f32>>>>,
}

impl Survey {
    /// Question indices group `g` has answers for, in question order.
    pub fn answered(&self, g: usize) -> Vec<usize> {
        self.answers[g]
            .iter()
            .enumerate()
            .filter_map(|(q, a)| a.as_ref().map(|_| q))
            .collect()
    }

    /// Index of a group by name.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// Checks the invariants every loader must establish: shapes, finiteness, sums.
    /// Returns a message naming the offending group and question.
    pub fn validate(&self) -> Result<(), String> {
        if self.answers.len() != self.groups.len() {
            return Err(format!(
                "answers has {} rows but there are {} groups",
                self.answers.len(),
                self.groups.len()
            ));
        }
        for (g, row) in self.answers.iter().enumerate() {
            if row.len() != self.questions.len() {
                return Err(format!(
                    "group `{}` has {} answer slots, expected {}",
                    self.groups[g].name,
                    row.len(),
                    self.questions.len()
                ));
            }
            for (q, d) in row.iter().enumerate() {
                let Some(d) = d else { continue };
                let qn = &self.questions[q];
                check_distribution(d, qn.n_answerable()).map_err(|e| {
                    format!("group `{}`, question `{}`: {e}", self.groups[g].name, qn.id)
                })?;
            }
        }
        Ok(())
    }
}

/// Tolerance on a distribution's sum.
pub const SUM_TOLERANCE: f64 = 1e-3;

/// Checks one distribution: expected length, finite, non-negative, sums to 1 within 1e-3.
pub fn check_distribution(d: &[f32], expected_len: usize) -> Result<(), String> {
    if d.len() != expected_len {
        return Err(format!(
            "distribution has {} entries, expected {} (one per non-refusal option)",
            d.len(),
            expected_len
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
    let s: f64 = d.iter().map(|&p| p as f64).sum();
    if (s - 1.0).abs() > SUM_TOLERANCE {
        return Err(format!(
            "distribution sums to {s:.6}, expected 1 within {SUM_TOLERANCE}"
        ));
    }
    Ok(())
}
