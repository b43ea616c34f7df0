//! The leaderboard: finished trials ranked by the sweep's metric, as CSV (for tools) and
//! Markdown (for people).
//!
//! Why it exists: a sweep's answer is its ranking, and both `gpo sweep status` and the
//! files in the sweep folder must show the same one. Trials that ran (to the end or stopped
//! early) are ranked by score, highest first, ties by id; failed trials follow, unranked,
//! with their error.

use crate::record::TrialRecord;
use crate::schedule::Phase;

/// The records on the board, in rank order: scored trials, then failed ones.
pub fn ranked(records: &[TrialRecord]) -> Vec<&TrialRecord> {
    let mut scored: Vec<&TrialRecord> = records
        .iter()
        .filter(|r| matches!(r.phase, Phase::Done | Phase::Stopped))
        .collect();
    scored.sort_by(|a, b| {
        let (x, y) = (
            a.score.unwrap_or(f64::NEG_INFINITY),
            b.score.unwrap_or(f64::NEG_INFINITY),
        );
        y.total_cmp(&x).then_with(|| a.id.cmp(&b.id))
    });
    scored.extend(records.iter().filter(|r| r.phase == Phase::Failed));
    scored
}

/// The first of [`ranked`] that ran (not failed), without sorting: the best score, ties to
/// the lower id.
pub fn best(records: &[TrialRecord]) -> Option<&TrialRecord> {
    records
        .iter()
        .filter(|r| matches!(r.phase, Phase::Done | Phase::Stopped) && r.score.is_some())
        .min_by(|a, b| {
            let (x, y) = (
                a.score.unwrap_or(f64::NEG_INFINITY),
                b.score.unwrap_or(f64::NEG_INFINITY),
            );
            y.total_cmp(&x).then_with(|| a.id.cmp(&b.id))
        })
}

fn keys(records: &[TrialRecord]) -> Vec<String> {
    let mut k: Vec<String> = records
        .iter()
        .flat_map(|r| r.params.keys().cloned())
        .collect();
    k.sort();
    k.dedup();
    k
}

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_default()
}

/// The CSV: `rank,trial,state,score,test,best_step,steps_run,planned_steps,attempts,
/// seconds,<params...>,error`; `score` is the sweep's ranking metric (validation or test
/// alignment), `test` the held-out groups' alignment either way.
pub fn csv(records: &[TrialRecord]) -> String {
    let keys = keys(records);
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut head: Vec<String> = [
        "rank",
        "trial",
        "state",
        "score",
        "test",
        "best_step",
        "steps_run",
        "planned_steps",
        "attempts",
        "seconds",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    head.extend(keys.iter().cloned());
    head.push("error".into());
    w.write_record(&head).expect("writing to memory");
    for (i, r) in ranked(records).into_iter().enumerate() {
        let rank = if r.phase == Phase::Failed {
            String::new()
        } else {
            (i + 1).to_string()
        };
        let mut row = vec![
            rank,
            r.id.clone(),
            r.phase.as_str().into(),
            num(r.score),
            num(r.test),
            r.best_step.map(|s| s.to_string()).unwrap_or_default(),
            r.steps_run.to_string(),
            r.planned_steps.to_string(),
            r.attempts.to_string(),
            format!("{:.1}", r.seconds),
        ];
        row.extend(
            keys.iter()
                .map(|k| r.params.get(k).cloned().unwrap_or_default()),
        );
        row.push(r.error.clone().unwrap_or_default());
        w.write_record(&row).expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("flushing to memory")).expect("utf-8 in, utf-8 out")
}

/// The Markdown file: a title over [`table`] (the top `limit` rows, and every failed trial).
pub fn markdown(records: &[TrialRecord], metric: &str, title: &str, limit: usize) -> String {
    format!("# {title}\n\n{}", table(records, metric, limit))
}

/// The table of [`markdown`], without its title (`gpo sweep status`).
pub fn table(records: &[TrialRecord], metric: &str, limit: usize) -> String {
    let keys = keys(records);
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = format!("| rank | trial | state | {metric} | test | best step | steps |");
    for k in &keys {
        out.push_str(&format!(" {} |", cell(k)));
    }
    out.push_str(" error |\n|---|---|---|---|---|---|---|");
    out.push_str(&"---|".repeat(keys.len() + 1));
    out.push('\n');
    for (i, r) in ranked(records).into_iter().enumerate() {
        if i >= limit && r.phase != Phase::Failed {
            continue;
        }
        let rank = if r.phase == Phase::Failed {
            "".into()
        } else {
            (i + 1).to_string()
        };
        out.push_str(&format!(
            "| {rank} | {} | {} | {} | {} | {} | {}/{} |",
            r.id,
            r.phase.as_str(),
            num(r.score),
            num(r.test),
            r.best_step.map(|s| s.to_string()).unwrap_or_default(),
            r.steps_run,
            r.planned_steps
        ));
        for k in &keys {
            out.push_str(&format!(
                " {} |",
                cell(r.params.get(k).map_or("", |s| s.as_str()))
            ));
        }
        out.push_str(&format!(" {} |\n", cell(r.error.as_deref().unwrap_or(""))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, phase: Phase, score: Option<f64>) -> TrialRecord {
        let mut r = TrialRecord::new(id, [("lr".into(), id.into())].into(), 10);
        r.phase = phase;
        r.score = score;
        if phase == Phase::Failed {
            r.error = Some("exit 1, \"boom\"".into());
        }
        r
    }

    #[test]
    fn ranks_by_score_then_lists_failures_with_their_error() {
        let rs = vec![
            rec("t0", Phase::Done, Some(0.5)),
            rec("t1", Phase::Failed, None),
            rec("t2", Phase::Stopped, Some(0.7)),
            rec("t3", Phase::Pending, None),
        ];
        let ids: Vec<&str> = ranked(&rs).iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["t2", "t0", "t1"]);
        assert_eq!(best(&rs).map(|r| r.id.as_str()), Some("t2"));
        let c = csv(&rs);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 4, "a header and one row per ended trial:\n{c}");
        assert!(lines[0].starts_with("rank,trial,state,score,test"));
        assert!(lines[0].ends_with(",lr,error"));
        assert!(lines[1].starts_with("1,t2,stopped,0.7000"));
        assert!(lines[3].starts_with(",t1,failed,"));
        assert!(
            lines[3].ends_with("\"exit 1, \"\"boom\"\"\""),
            "quoted: {}",
            lines[3]
        );
        let md = markdown(&rs, "validation", "quick", 1);
        assert!(md.contains("| 1 | t2 | stopped |"));
        assert!(!md.contains("| t0 |"), "beyond the limit");
        assert!(md.contains("| t1 | failed |"));
    }
}
