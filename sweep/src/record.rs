//! A trial's record: one small JSON file per trial (`DIR/trials/<id>/trial.json`), written
//! on every change of phase and read back when a sweep resumes.
//!
//! Why it exists: the sweep's state must survive its process, and must not live in one
//! value that grows with the trial count (etcd refuses values over 1.5 MiB; one file of
//! 10,000 trials rewritten on every event would cost quadratic I/O). A record per trial keeps
//! every write small and independent; the set of records *is* the sweep's state. This module
//! is the format only; the driver does the file I/O.

use crate::schedule::Phase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What is known of one trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialRecord {
    /// The trial's id (`t0000`).
    pub id: String,
    /// Space key → value, as the leaderboard prints it.
    pub params: BTreeMap<String, String>,
    /// Its phase.
    pub phase: Phase,
    /// Runs started.
    pub attempts: u32,
    /// The ranking score of its selected checkpoint (done or stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// GPO's alignment on the held-out test groups at that checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<f64>,
    /// The step of that checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// Steps it ran (its last run's; less than `planned_steps` when stopped early).
    pub steps_run: u64,
    /// Steps it would run unstopped.
    pub planned_steps: u64,
    /// Every evaluation reported: (step, ranking score).
    pub evals: Vec<(u64, f64)>,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds its runs took, all attempts together.
    pub seconds: f64,
}

impl TrialRecord {
    /// A pending trial.
    pub fn new(id: &str, params: BTreeMap<String, String>, planned_steps: u64) -> Self {
        TrialRecord {
            id: id.into(),
            params,
            phase: Phase::Pending,
            attempts: 0,
            score: None,
            test: None,
            best_step: None,
            steps_run: 0,
            planned_steps,
            evals: vec![],
            error: None,
            seconds: 0.0,
        }
    }

    /// Parses a record; `what` names the file in the error.
    pub fn parse(text: &str, what: &str) -> Result<Self, String> {
        serde_json::from_str(text)
            .map_err(|e| format!("{what}: line {}, column {}: {e}", e.line(), e.column()))
    }

    /// The record as written.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a record serializes") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_bad_one_names_its_file_and_line() {
        let mut r = TrialRecord::new("t0001", [("lr".into(), "0.001".into())].into(), 40);
        r.phase = Phase::Stopped;
        r.evals = vec![(10, 0.5), (20, 0.6)];
        r.score = Some(0.6);
        assert_eq!(TrialRecord::parse(&r.to_json(), "x").unwrap(), r);
        let e = TrialRecord::parse("{\n\"id\": 3}", "trials/t0001/trial.json").unwrap_err();
        assert!(e.starts_with("trials/t0001/trial.json: line 2"), "{e}");
    }
}
