//! GlobalOpinionQA (Anthropic's `llm_global_opinions` CSV), because it is GPO's second
//! benchmark: cross-national survey questions (Pew Global Attitudes, World Values Survey)
//! with per-country answer distributions. Countries are the groups, and each country
//! answers a different subset of questions, so the metric is
//! [`MetricKind::JensenShannon`].
//!
//! Columns (by name): `question`, `selections` (Python text
//! `defaultdict(<class 'list'>, {'Nigeria': [0.1, 0.9], ...})` or a plain dict), `options`
//! (a Python list) and `source` (ignored). Row `i` (0-based, header excluded) becomes
//! question id `q{i}`. Options have no order (ordinal `None`) and none is a refusal: the
//! distribution is given over all listed options, `Don't know/Refused` included. A country
//! missing from a row has no answer (`None`) for that question. Each distribution must have
//! one value per option, be finite and non-negative and sum to 1 within what rounding its
//! values to three decimals can do (`n × 0.0005`, at least 1e-3), checked in f64: the
//! published files round, and 0.999 is 0.99899997 in f32. Such a distribution is
//! renormalized and counted in the [`LoadReport`]; an all-zero one is skipped (no answer)
//! with a warning naming the row and the country.
//!
//! Errors name the file, the CSV line and the column.

use super::csvtext::{column, csv_error, csv_with_headers, Lines};
use super::opinionqa::GroupNames;
use super::pylit::{self, PyValue};
use super::report::{published_distribution, Published};
use super::{AnswerOption, DataError, DataResult, LoadReport, MetricKind, Question, Survey};

/// Parses a GlobalOpinionQA CSV. The survey is named after `file`.
pub fn parse(csv_text: &str, file: &str) -> DataResult<Survey> {
    parse_report(csv_text, file).map(|(s, _)| s)
}

/// [`parse`], with what was renormalized or skipped.
pub fn parse_report(csv_text: &str, file: &str) -> DataResult<(Survey, LoadReport)> {
    let (mut rdr, headers) = csv_with_headers(csv_text, file)?;
    let mut report = LoadReport::default();
    let mut lines = Lines::new(csv_text);
    let layout = "a GlobalOpinionQA CSV has question, selections, options, source";
    let col = |name: &str| column(&headers, name, file, layout);
    let (cq, cs, co) = (col("question")?, col("selections")?, col("options")?);

    let mut questions: Vec<Question> = Vec::new();
    let mut groups = GroupNames::default();
    let mut answers: Vec<(usize, usize, Vec<f32>)> = Vec::new();

    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| csv_error(file, csv_text, &headers, &e))?;
        let line = lines.of(&rec);
        let at = |field: &str, msg: String| DataError::at(file, Some(line), Some(field), msg);
        let get = |c: usize| rec.get(c).unwrap_or("");
        let opts_v = pylit::parse(get(co)).map_err(|e| {
            at(
                "options",
                format!("{e}; expected a Python list of option texts"),
            )
        })?;
        let items = opts_v.as_seq().ok_or_else(|| {
            at(
                "options",
                format!(
                    "expected a list of option texts, found a {}",
                    opts_v.type_name()
                ),
            )
        })?;
        if items.is_empty() {
            return Err(at(
                "options",
                "no options; expected a non-empty list".into(),
            ));
        }
        let options = items
            .iter()
            .enumerate()
            .map(|(k, v)| {
                option_text(v)
                    .map(|text| AnswerOption {
                        text,
                        ordinal: None,
                        refusal: false,
                    })
                    .ok_or_else(|| {
                        at(
                            "options",
                            format!("option {k} is a {}, expected a string", v.type_name()),
                        )
                    })
            })
            .collect::<DataResult<Vec<_>>>()?;
        let n = options.len();
        let sel = pylit::parse(get(cs)).map_err(|e| {
            at(
                "selections",
                format!(
                    "{e}; expected `defaultdict(<class 'list'>, {{'Country': [p1, ...], ...}})`"
                ),
            )
        })?;
        let entries = sel.as_dict().ok_or_else(|| {
            at(
                "selections",
                format!(
                    "expected a dict from country to distribution, found a {}",
                    sel.type_name()
                ),
            )
        })?;
        let qi = questions.len();
        let mut seen: Vec<usize> = Vec::new();
        for (k, v) in entries {
            let country = k.as_str().ok_or_else(|| {
                at(
                    "selections",
                    format!("key {k:?} is a {}, expected a country name", k.type_name()),
                )
            })?;
            let d = v
                .to_f64_list()
                .map_err(|m| at("selections", format!("country `{country}`: {m}")))?;
            if d.len() != n {
                return Err(at(
                    "selections",
                    format!("country `{country}` has {} values but the question has {n} options; expected one value per option", d.len()),
                ));
            }
            let d = match published_distribution(&d, n)
                .map_err(|m| at("selections", format!("country `{country}`: {m}")))?
            {
                Published::Exact(d) => d,
                Published::Renormalized(d) => {
                    report.renormalized += 1;
                    d
                }
                Published::AllZero => {
                    report.all_zero += 1;
                    report.warn(format!(
                        "{file}:{line}: country `{country}`: the distribution is all zero; skipped (no answer)"
                    ));
                    continue;
                }
            };
            let (g, _) = groups.index(country);
            if seen.contains(&g) {
                return Err(at(
                    "selections",
                    format!("country `{country}` appears twice"),
                ));
            }
            seen.push(g);
            answers.push((g, qi, d));
        }
        questions.push(Question {
            id: format!("q{i}"),
            text: get(cq).to_string(),
            options,
        });
    }

    let mut matrix: Vec<Vec<Option<Vec<f32>>>> =
        vec![vec![None; questions.len()]; groups.groups.len()];
    for (g, q, d) in answers {
        matrix[g][q] = Some(d);
    }
    let survey = Survey {
        name: file.to_string(),
        metric: MetricKind::JensenShannon,
        questions,
        groups: groups.groups,
        answers: matrix,
    };
    Ok((survey, report))
}

/// An option's text: strings as they are, numbers as Python's `str` writes them.
fn option_text(v: &PyValue) -> Option<String> {
    match v {
        PyValue::Str(s) => Some(s.clone()),
        PyValue::Int(i) => Some(i.to_string()),
        PyValue::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
            Some(format!("{f:.1}"))
        }
        PyValue::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(s: &str) -> String {
        format!("\"{}\"", s.replace('"', "\"\""))
    }

    fn row(q: &str, sel: &str, opts: &str) -> String {
        format!("{},{},{},src\n", field(q), field(sel), field(opts))
    }

    const HDR: &str = "question,selections,options,source\n";

    #[test]
    fn parses_global_csv() {
        let csv = format!(
            "{HDR}{}{}{}",
            row(
                "Do you think it's \"good\"?",
                "defaultdict(<class 'list'>, {'Nigeria': [0.1, 0.9], \"Cote d'Ivoire\": [0.5, 0.5]})",
                "['Yes', \"Don't know/Refused\"]"
            ),
            row("Rate it", "defaultdict(<class 'list'>, {'Japan': [0.2, 0.3, 0.4995], 'Nigeria': [1.0, 0.0, 0.0]})", "[1, 2, 'No answer']"),
            row("Nobody", "defaultdict(<class 'list'>, {})", "['a']"),
        );
        let (s, report) = parse_report(&csv, "g.csv").unwrap();
        s.validate().unwrap();
        assert_eq!(report.renormalized, 1);
        assert_eq!(s.metric, MetricKind::JensenShannon);
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["Nigeria", "Cote d'Ivoire", "Japan"]);
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["q0", "q1", "q2"]);
        assert_eq!(s.questions[0].text, "Do you think it's \"good\"?");
        assert_eq!(s.questions[0].options[1].text, "Don't know/Refused");
        assert!(s.questions[0]
            .options
            .iter()
            .all(|o| !o.refusal && o.ordinal.is_none()));
        assert_eq!(s.questions[1].options[0].text, "1");
        assert_eq!(s.answers[0][0], Some(vec![0.1, 0.9]));
        assert_eq!(s.answers[0][1], Some(vec![1.0, 0.0, 0.0]));
        assert_eq!(s.answers[1][1], None);
        assert_eq!(s.answers[2][0], None);
        let japan = s.answers[2][1].as_ref().unwrap();
        let want = [0.2 / 0.9995, 0.3 / 0.9995, 0.4995 / 0.9995];
        for (a, b) in japan.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-7, "{japan:?}");
        }
        assert_eq!(s.answered(2), vec![1]);
    }

    fn err(sel: &str, opts: &str) -> DataError {
        let csv = format!(
            "{HDR}{}{}",
            row("ok", "{'A': [1.0]}", "['x']"),
            row("Q", sel, opts)
        );
        parse(&csv, "g.csv").unwrap_err()
    }

    #[test]
    fn bad_rows_are_located() {
        let e = err(
            "defaultdict(<class 'list'>, {'A': [0.5, 0.5, 0.0]})",
            "['x', 'y']",
        );
        assert_eq!(
            (e.file.as_str(), e.line, e.field.as_deref()),
            ("g.csv", Some(3), Some("selections"))
        );
        assert!(e.message.contains("`A` has 3 values"), "{e}");

        let e = err("{'A': [0.5, 0.4]}", "['x', 'y']");
        assert!(e.message.contains("sums to"), "{e}");
        let e = err("{'A': [nan, 1.0]}", "['x', 'y']");
        assert!(e.message.contains("finite"), "{e}");
        let e = err("{'A': [-0.5, 1.5]}", "['x', 'y']");
        assert!(e.message.contains("negative"), "{e}");
        let e = err("{'A': [0.5, 0.5], 'A': [0.5, 0.5]}", "['x', 'y']");
        assert!(e.message.contains("twice"), "{e}");
        let e = err("defaultdict(<class 'list'>, {'A': [0.5, 0.5]", "['x', 'y']");
        assert_eq!(e.field.as_deref(), Some("selections"));
        assert!(e.message.contains("character"), "{e}");
        let e = err("{'A': [1.0]}", "['x'");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("options")));
        let e = err("{'A': [1.0]}", "[]");
        assert_eq!(e.field.as_deref(), Some("options"));
        let e = err("[1.0]", "['x']");
        assert!(e.message.contains("expected a dict"), "{e}");

        let e = parse("question,options,source\n", "g.csv").unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("selections")));
        let e = parse(&format!("{HDR}a,b\n"), "g.csv").unwrap_err();
        assert!(e.message.contains("malformed CSV row"), "{e}");
    }

    /// The published files: 3-decimal distributions that sum to 0.998–1.002 (0.999 is
    /// 0.99899997 in f32), an all-zero one, and Windows line endings.
    #[test]
    fn rounded_published_rows_load_and_are_counted() {
        let csv = format!(
            "{HDR}{}{}{}",
            row(
                "A",
                "defaultdict(<class 'list'>, {'Peru': [0.333, 0.333, 0.333], 'Chile': [0.0, 0.0, 0.0]})",
                "['a', 'b', 'c']"
            ),
            row(
                "B",
                "defaultdict(<class 'list'>, {'Peru': [0.251, 0.25, 0.25, 0.251], 'Chile': [0.4, 0.6, 0.0, 0.0]})",
                "['a', 'b', 'c', 'd']"
            ),
            row("C", "{'Peru': [0.5, 0.4]}", "['a', 'b']"),
        )
        .replace('\n', "\r\n");
        let e = parse(&csv, "g.csv").unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(4), Some("selections")));
        let ok = csv.rsplit_once("\"C\"").unwrap().0;
        let (s, report) = parse_report(ok, "g.csv").unwrap();
        s.validate().unwrap();
        assert_eq!(report.renormalized, 2);
        assert_eq!(report.all_zero, 1);
        assert_eq!(
            report.warnings,
            ["g.csv:2: country `Chile`: the distribution is all zero; skipped (no answer)"]
        );
        let peru = s.answers[0][0].as_ref().unwrap();
        assert!((peru[0] - 1.0 / 3.0).abs() < 1e-7, "{peru:?}");
        assert_eq!(s.answers[1][0], None);
        assert_eq!(s.answers[1][1], Some(vec![0.4, 0.6, 0.0, 0.0]));
    }
}
