//! gpo's own survey format, because the benchmark layouts (OpinionQA, GlobalOpinionQA) each
//! carry quirks and can't hold a user's own groups: this is the one documented format any
//! survey can be converted to, that `gpo` writes, and that a user can produce by hand.
//!
//! # The `gpo-survey` format, version 1
//!
//! A survey is a **directory** holding two UTF-8 files.
//!
//! ## `survey.json`
//!
//! One JSON object:
//!
//! ```json
//! {
//!   "format": "gpo-survey",
//!   "version": 1,
//!   "name": "OpinionQA (34 groups)",
//!   "metric": "wasserstein",
//!   "questions": [
//!     {
//!       "id": "SAFECRIME_W26",
//!       "text": "How safe, if at all, would you say your local community is from crime?",
//!       "options": [
//!         {"text": "Very safe", "ordinal": 1.0, "refusal": false},
//!         {"text": "Not safe", "ordinal": 2.0, "refusal": false},
//!         {"text": "Refused", "ordinal": null, "refusal": true}
//!       ]
//!     }
//!   ],
//!   "groups": [{"name": "SEX:Female"}, {"name": "SEX:Male"}]
//! }
//! ```
//!
//! * `format` must be `"gpo-survey"` and `version` must be `1`.
//! * `name`: free text describing the dataset.
//! * `metric`: how alignment is scored, one of
//!   - `"wasserstein"`: 1 − Wasserstein distance over the options' ordinal values, divided by
//!     (max − min ordinal); every group is expected to answer the same questions (OpinionQA);
//!   - `"jensen_shannon"`: 1 − Jensen–Shannon distance; groups may answer different
//!     questions (GlobalOpinionQA);
//!   - `"accuracy"`: accuracy of the predicted top option (individual users).
//! * `questions`: in order; a question's position is its index everywhere else in gpo.
//!   - `id`: unique within the survey; answers refer to it.
//!   - `text`: the question as asked.
//!   - `options`: all answer options in survey order. `text` is required; `ordinal`
//!     (a number or `null`, default `null`) is the option's position on the question's
//!     ordinal scale, used by the Wasserstein metric (a question whose non-refusal options
//!     lack ordinals or all share one is skipped by that metric); `refusal` (default `false`)
//!     marks options such as "Refused" or "Not sure" that are never a GPO point and never
//!     part of a distribution. A question needs at least one non-refusal option.
//! * `groups`: the groups, each `{"name": ...}` with a unique name, in order.
//!
//! Other keys are ignored.
//!
//! ## `answers.jsonl`
//!
//! One JSON object per line, one line per (group, question) pair that has an answer;
//! blank lines are ignored and lines may come in any order:
//!
//! ```json
//! {"group": "SEX:Female", "question": "SAFECRIME_W26", "dist": [0.25, 0.75]}
//! ```
//!
//! * `group`: a group name from `survey.json`.
//! * `question`: a question id from `survey.json`.
//! * `dist`: the group's answer distribution over the question's **non-refusal** options,
//!   in option order: one finite, non-negative number per such option, summing to 1 within
//!   1e-3. Values are stored as 32-bit floats.
//!
//! A pair may appear at most once; a pair with no line has no answer (the group was not
//! asked). [`to_strings`] writes groups in order and, within a group, questions in order,
//! with numbers in their shortest exact form, so writing and reading back gives the same
//! [`Survey`].
//!
//! ## Errors
//!
//! Every error names the file, the line (for `answers.jsonl`, and for JSON syntax errors in
//! `survey.json`) and the field (`format`, `version`, `questions[3].id`, `groups[0].name`,
//! `group`, `question`, `dist`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::jsontext::json_error;
use super::{check_distribution, DataError, DataResult, Group, MetricKind, Question, Survey};

/// The value of the `format` key.
pub const FORMAT: &str = "gpo-survey";
/// The format version this code reads and writes.
pub const VERSION: u64 = 1;
/// The survey file's name inside the directory.
pub const SURVEY_FILE: &str = "survey.json";
/// The answers file's name inside the directory.
pub const ANSWERS_FILE: &str = "answers.jsonl";

#[derive(Serialize, Deserialize)]
struct SurveyFile {
    format: String,
    version: u64,
    name: String,
    metric: MetricKind,
    questions: Vec<Question>,
    groups: Vec<Group>,
}

#[derive(Serialize)]
struct AnswerOut<'a> {
    group: &'a str,
    question: &'a str,
    dist: &'a [f32],
}

#[derive(Deserialize)]
struct AnswerIn {
    group: String,
    question: String,
    dist: Vec<f64>,
}

/// The two files' contents: (`survey.json`, `answers.jsonl`).
pub fn to_strings(s: &Survey) -> (String, String) {
    let file = SurveyFile {
        format: FORMAT.to_string(),
        version: VERSION,
        name: s.name.clone(),
        metric: s.metric,
        questions: s.questions.clone(),
        groups: s.groups.clone(),
    };
    // Serializing plain structs of strings, numbers and vectors cannot fail.
    let mut survey = serde_json::to_string_pretty(&file).unwrap_or_default();
    survey.push('\n');
    let mut answers = String::new();
    for (g, row) in s.groups.iter().zip(&s.answers) {
        for (q, a) in s.questions.iter().zip(row) {
            let Some(d) = a else { continue };
            let line = AnswerOut {
                group: &g.name,
                question: &q.id,
                dist: d,
            };
            answers.push_str(&serde_json::to_string(&line).unwrap_or_default());
            answers.push('\n');
        }
    }
    (survey, answers)
}

/// Parses the two files' contents; the file names are used in error messages.
pub fn parse(
    survey_json: &str,
    survey_file: &str,
    answers: &str,
    answers_file: &str,
) -> DataResult<Survey> {
    let sf = survey_file;
    let head: serde_json::Value =
        serde_json::from_str(survey_json).map_err(|e| json_error(sf, survey_json, &e))?;
    let obj = head.as_object().ok_or_else(|| {
        DataError::file(sf, "expected a JSON object with \"format\": \"gpo-survey\"")
    })?;
    match obj.get("format").and_then(|v| v.as_str()) {
        Some(FORMAT) => {}
        other => {
            return Err(DataError::at(
                sf,
                None,
                Some("format"),
                format!(
                    "format is {}, expected \"{FORMAT}\"",
                    other.map_or("missing".to_string(), |s| format!("\"{s}\""))
                ),
            ))
        }
    }
    match obj.get("version") {
        Some(v) if v.as_u64() == Some(VERSION) => {}
        other => {
            return Err(DataError::at(
                sf,
                None,
                Some("version"),
                format!(
                "version is {}, expected {VERSION} (this gpo reads gpo-survey version {VERSION})",
                other.map_or("missing".to_string(), |v| v.to_string())
            ),
            ))
        }
    }
    let file: SurveyFile =
        serde_json::from_str(survey_json).map_err(|e| json_error(sf, survey_json, &e))?;

    let mut qidx: HashMap<&str, usize> = HashMap::new();
    for (i, q) in file.questions.iter().enumerate() {
        if qidx.insert(q.id.as_str(), i).is_some() {
            return Err(DataError::at(
                sf,
                None,
                Some(&format!("questions[{i}].id")),
                format!(
                    "duplicate question id `{}`; expected ids unique within the survey",
                    q.id
                ),
            ));
        }
        if q.n_answerable() == 0 {
            return Err(DataError::at(
                sf,
                None,
                Some(&format!("questions[{i}].options")),
                format!(
                    "question `{}` has no non-refusal option; expected at least one",
                    q.id
                ),
            ));
        }
    }
    let mut gidx: HashMap<&str, usize> = HashMap::new();
    for (i, g) in file.groups.iter().enumerate() {
        if gidx.insert(g.name.as_str(), i).is_some() {
            return Err(DataError::at(
                sf,
                None,
                Some(&format!("groups[{i}].name")),
                format!("duplicate group name `{}`", g.name),
            ));
        }
    }

    let af = answers_file;
    let mut matrix: Vec<Vec<Option<Vec<f32>>>> =
        vec![vec![None; file.questions.len()]; file.groups.len()];
    let mut first_line: HashMap<(usize, usize), usize> = HashMap::new();
    for (k, text) in answers.lines().enumerate() {
        let line = k + 1;
        if text.trim().is_empty() {
            continue;
        }
        let at = |field: Option<&str>, msg: String| DataError::at(af, Some(line), field, msg);
        let a: AnswerIn = serde_json::from_str(text).map_err(|e| {
            let located = json_error(af, text, &e);
            at(
                located.field.as_deref(),
                format!("{e}; expected {{\"group\": ..., \"question\": ..., \"dist\": [...]}}"),
            )
        })?;
        let g = *gidx.get(a.group.as_str()).ok_or_else(|| {
            at(
                Some("group"),
                format!("unknown group `{}`: not in {sf}", a.group),
            )
        })?;
        let q = *qidx.get(a.question.as_str()).ok_or_else(|| {
            at(
                Some("question"),
                format!("unknown question `{}`: not in {sf}", a.question),
            )
        })?;
        if let Some(prev) = first_line.insert((g, q), line) {
            return Err(at(
                Some("question"),
                format!(
                    "duplicate answer for group `{}`, question `{}` (first on line {prev})",
                    a.group, a.question
                ),
            ));
        }
        let d: Vec<f32> = a.dist.iter().map(|&x| x as f32).collect();
        check_distribution(&d, file.questions[q].n_answerable())
            .map_err(|m| at(Some("dist"), format!("question `{}`: {m}", a.question)))?;
        matrix[g][q] = Some(d);
    }
    Ok(Survey {
        name: file.name,
        metric: file.metric,
        questions: file.questions,
        groups: file.groups,
        answers: matrix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::AnswerOption;

    fn sample() -> Survey {
        let opt = |t: &str, o: Option<f64>, r: bool| AnswerOption {
            text: t.into(),
            ordinal: o,
            refusal: r,
        };
        Survey {
            name: "tiny \"sample\"".into(),
            metric: MetricKind::Wasserstein,
            questions: vec![
                Question {
                    id: "Q1".into(),
                    text: "Is it \"safe\"? It's fine".into(),
                    options: vec![
                        opt("Associate's degree", Some(1.0), false),
                        opt("Not \"quite\"", Some(2.5), false),
                        opt("Refused", None, true),
                    ],
                },
                Question {
                    id: "Q2".into(),
                    text: "Other".into(),
                    options: vec![opt("a", None, false)],
                },
            ],
            groups: vec![
                Group {
                    name: "SEX:Female".into(),
                },
                Group {
                    name: "Côte d'Ivoire".into(),
                },
            ],
            answers: vec![
                vec![Some(vec![0.1, 0.9]), None],
                vec![Some(vec![1.0 / 3.0, 2.0 / 3.0]), Some(vec![1.0])],
            ],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        s.validate().unwrap();
        let (sj, aj) = to_strings(&s);
        assert!(sj.contains("\"format\": \"gpo-survey\""));
        assert!(sj.contains("\"metric\": \"wasserstein\""));
        assert_eq!(aj.lines().count(), 3);
        let back = parse(&sj, "survey.json", &aj, "answers.jsonl").unwrap();
        assert_eq!(back, s);
        for m in [MetricKind::JensenShannon, MetricKind::Accuracy] {
            let mut s2 = s.clone();
            s2.metric = m;
            let (sj, aj) = to_strings(&s2);
            assert_eq!(parse(&sj, "s", &aj, "a").unwrap(), s2);
        }
    }

    #[test]
    fn hand_written_defaults_and_blank_lines() {
        let sj = r#"{"format": "gpo-survey", "version": 1, "name": "n", "metric": "jensen_shannon", "extra": 1,
            "questions": [{"id": "q", "text": "t", "options": [{"text": "a"}, {"text": "b"}]}],
            "groups": [{"name": "g"}]}"#;
        let s = parse(
            sj,
            "survey.json",
            "\n{\"group\": \"g\", \"question\": \"q\", \"dist\": [0.5, 0.5]}\n\n",
            "a",
        )
        .unwrap();
        assert_eq!(
            s.questions[0].options[1],
            AnswerOption {
                text: "b".into(),
                ordinal: None,
                refusal: false
            }
        );
        assert_eq!(s.answers, vec![vec![Some(vec![0.5, 0.5])]]);
    }

    fn answers_err(lines: &str) -> DataError {
        let (sj, _) = to_strings(&sample());
        parse(&sj, "survey.json", lines, "answers.jsonl").unwrap_err()
    }

    #[test]
    fn answer_errors_are_located() {
        let ok = "{\"group\": \"SEX:Female\", \"question\": \"Q1\", \"dist\": [0.5, 0.5]}\n";
        let e = answers_err(&format!(
            "{ok}{{\"group\": \"Nope\", \"question\": \"Q1\", \"dist\": [0.5, 0.5]}}\n"
        ));
        assert_eq!(
            (e.file.as_str(), e.line, e.field.as_deref()),
            ("answers.jsonl", Some(2), Some("group"))
        );
        let e = answers_err(&format!(
            "{ok}\n{{\"group\": \"SEX:Female\", \"question\": \"Q9\", \"dist\": [1]}}\n"
        ));
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("question")));
        let e = answers_err(&format!("{ok}{ok}"));
        assert_eq!((e.line, e.field.as_deref()), (Some(2), Some("question")));
        assert!(
            e.message.contains("duplicate answer") && e.message.contains("line 1"),
            "{e}"
        );
        let e = answers_err(
            "{\"group\": \"SEX:Female\", \"question\": \"Q1\", \"dist\": [0.5, 0.5, 0.0]}\n",
        );
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("dist")));
        assert!(e.message.contains("3 entries"), "{e}");
        let e = answers_err(
            "{\"group\": \"SEX:Female\", \"question\": \"Q1\", \"dist\": [0.5, 0.4]}\n",
        );
        assert!(e.message.contains("sums to"), "{e}");
        let e = answers_err(
            "{\"group\": \"SEX:Female\", \"question\": \"Q1\", \"dist\": [-0.5, 1.5]}\n",
        );
        assert!(e.message.contains("negative"), "{e}");
        let e = answers_err(
            "{\"group\": \"SEX:Female\", \"question\": \"Q1\", \"dist\": [1e300, 0]}\n",
        );
        assert!(e.message.contains("finite"), "{e}");
        let e =
            answers_err("{\"group\": \"SEX:Female\", \"question\": \"Q1\", \"dist\": [NaN, 1]}\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("dist[0]")));
        let e = answers_err("{\"group\": \"SEX:Female\", \"dist\": [1]}\n");
        assert!(e.message.contains("question"), "{e}");
    }

    fn survey_err(sj: &str) -> DataError {
        parse(sj, "survey.json", "", "answers.jsonl").unwrap_err()
    }

    #[test]
    fn survey_errors_are_located() {
        let (sj, _) = to_strings(&sample());
        let e = survey_err(&sj.replace("gpo-survey", "other"));
        assert_eq!(
            (e.file.as_str(), e.field.as_deref()),
            ("survey.json", Some("format"))
        );
        let e = survey_err(&sj.replace("\"version\": 1", "\"version\": 2"));
        assert_eq!(e.field.as_deref(), Some("version"));
        assert!(e.message.contains("version is 2"), "{e}");
        let e = survey_err(&sj.replace("\"id\": \"Q2\"", "\"id\": \"Q1\""));
        assert_eq!(e.field.as_deref(), Some("questions[1].id"));
        let e = survey_err(&sj.replace("Côte d'Ivoire", "SEX:Female"));
        assert_eq!(e.field.as_deref(), Some("groups[1].name"));
        let e = survey_err(&sj.replace("\"wasserstein\"", "\"euclid\""));
        assert!(e.line.is_some(), "{e}");
        assert!(e.message.contains("euclid"), "{e}");
        let e = survey_err("{\"format\": \"gpo-survey\",\n \"version\": 1,\n}");
        assert_eq!(e.line, Some(3));
        let e = survey_err("{\"format\": \"gpo-survey\", \"groups\": [{\"name\": x}]}");
        assert_eq!(e.field.as_deref(), Some("groups[0][\"name\"]"));
        let e = survey_err(
            r#"{"format": "gpo-survey", "version": 1, "name": "n", "metric": "accuracy",
            "questions": [{"id": "q", "text": "t", "options": [{"text": "R", "refusal": true}]}], "groups": []}"#,
        );
        assert_eq!(e.field.as_deref(), Some("questions[0].options"));
    }
}
