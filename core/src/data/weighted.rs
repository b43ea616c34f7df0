//! OpinionQA's *weighted layout* (`<wave>_default_human.csv`), because that is what
//! OpinionQA's own pipeline (and GPO's reference code) produce from the respondent-level
//! data: survey-weighted distributions per (question, group), which are closer to the
//! published numbers than the unweighted counts of [`super::opinionqa`].
//!
//! Columns (by name, in any order; others such as a pandas index column are ignored):
//! `qkey`, `attribute`, `group`, `D_H` and optionally `R_H` (the refusal rate, not used).
//! `D_H` is the group's distribution over the question's non-refusal options, in their
//! order: either a Python list (`[0.2, 0.8]`) or numpy's array text as pandas writes it
//! (`[0.2 0.8]`, whitespace-separated, possibly over several lines). The questions and
//! their options come from the wave's `info.csv`, read by [`super::opinionqa::Info`] with
//! the same rules (non-refusal options are the first `len(option_ordinal)` references).
//!
//! Group names are `attribute:group` (e.g. `SEX:Female`, `Overall:Overall`), in first-seen
//! order; every row is kept. Questions are those with at least one row, in `info.csv` order.
//! `D_H` is checked in f64 and may sum to 1 within the rounding of its values to three
//! decimals; such rows are renormalized and counted in the [`LoadReport`]; an all-zero row
//! is skipped with a warning.
//!
//! A wave's `info.csv` may give one key to several rows: sub-questions told apart only by
//! their text (W43's `IDIMPORT_W43`). A row of the CSV is matched to one of them by its
//! `question` column when it has one (whitespace-normalized text), and the question's id
//! becomes `KEY#k` (its k-th row); otherwise the rows of that key are skipped with one
//! warning naming it. Errors name the file, the CSV line and the column.

use std::collections::HashMap;

use std::collections::BTreeMap;

use super::csvtext::{column, csv_error, csv_with_headers, Lines};
use super::opinionqa::{GroupNames, Info, QuestionSlots};
use super::pylit;
use super::report::{published_distribution, Published};
use super::{DataError, DataResult, LoadReport, MetricKind, Question, Survey};

/// Parses a weighted CSV against its wave's `info.csv` text. The survey is named after
/// `csv_file`.
pub fn parse(
    csv_text: &str,
    csv_file: &str,
    info_csv: &str,
    info_file: &str,
) -> DataResult<Survey> {
    parse_report(csv_text, csv_file, info_csv, info_file).map(|(s, _)| s)
}

/// [`parse`], with what was renormalized or skipped.
pub fn parse_report(
    csv_text: &str,
    csv_file: &str,
    info_csv: &str,
    info_file: &str,
) -> DataResult<(Survey, LoadReport)> {
    let info = Info::parse(info_csv, info_file)?;
    parse_with_info_report(csv_text, csv_file, &info)
}

/// Parses a weighted CSV against an already parsed `info.csv`.
pub fn parse_with_info(csv_text: &str, csv_file: &str, info: &Info) -> DataResult<Survey> {
    parse_with_info_report(csv_text, csv_file, info).map(|(s, _)| s)
}

/// [`parse_with_info`], with what was renormalized or skipped.
pub fn parse_with_info_report(
    csv_text: &str,
    csv_file: &str,
    info: &Info,
) -> DataResult<(Survey, LoadReport)> {
    let file = csv_file;
    let (mut rdr, headers) = csv_with_headers(csv_text, file)?;
    let layout = "a weighted OpinionQA CSV has qkey, attribute, group, D_H";
    let col = |name: &str| column(&headers, name, file, layout);
    let (cq, ca, cg, cd) = (col("qkey")?, col("attribute")?, col("group")?, col("D_H")?);
    let ctext = col("question").ok();

    // Questions by info row.
    let mut qslots = QuestionSlots::default();
    let mut groups = GroupNames::default();
    // (group, slot) -> (distribution, line).
    let mut answers: HashMap<(usize, usize), (Vec<f32>, usize)> = HashMap::new();
    let mut report = LoadReport::default();
    // Keys on several info rows that a row could not be matched for: key -> (rows, first line).
    let mut unmatched: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut lines = Lines::new(csv_text);

    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_error(file, csv_text, &headers, &e))?;
        let line = lines.of(&rec);
        let at = |field: &str, msg: String| DataError::at(file, Some(line), Some(field), msg);
        let get = |i: usize| rec.get(i).unwrap_or("").trim();
        let (qkey, attr, gval, dh) = (get(cq), get(ca), get(cg), get(cd));
        if attr.is_empty() {
            return Err(at("attribute", "empty attribute".into()));
        }
        if gval.is_empty() {
            return Err(at("group", "empty group".into()));
        }
        let row = match info.rows_of(qkey) {
            [] => {
                return Err(at(
                    "qkey",
                    format!("unknown question key `{qkey}`: not in {}", info.file),
                ))
            }
            [r] => *r,
            _ => match ctext.and_then(|c| info.row_by_text(qkey, get(c))) {
                Some(r) => r,
                None => {
                    let e = unmatched.entry(qkey.to_string()).or_insert((0, line));
                    e.0 += 1;
                    continue;
                }
            },
        };
        let slot = qslots.slot(info, row)?;
        let q = &qslots.slots[slot].1;
        let d = parse_number_list(dh).map_err(|m| at("D_H", m))?;
        let n = q.n_answerable();
        if d.len() != n {
            let opts: Vec<&str> = q.answerable().map(|o| o.text.as_str()).collect();
            return Err(at(
                "D_H",
                format!(
                    "D_H has {} values but question `{qkey}` has {n} non-refusal options {opts:?}; expected one value per option",
                    d.len()
                ),
            ));
        }
        let gname = format!("{attr}:{gval}");
        let d = match published_distribution(&d, n).map_err(|m| at("D_H", m))? {
            Published::Exact(d) => d,
            Published::Renormalized(d) => {
                report.renormalized += 1;
                d
            }
            Published::AllZero => {
                report.all_zero += 1;
                report.warn(format!(
                    "{file}:{line}: group `{gname}`, question `{qkey}`: D_H is all zero; skipped (no answer)"
                ));
                continue;
            }
        };
        let (g, _) = groups.index(&gname);
        if let Some((_, prev)) = answers.insert((g, slot), (d, line)) {
            return Err(at(
                "group",
                format!("group `{gname}` already has a row for question `{qkey}` (line {prev})"),
            ));
        }
    }
    for (key, (n, first)) in unmatched {
        let how = if ctext.is_some() {
            "their `question` text matches none of them, or several"
        } else {
            "this file has no `question` column to tell them apart"
        };
        report.warn(format!(
            "{}; {n} rows of {file} (from line {first}) have that key and {how}, so they are skipped",
            info.ambiguous(&key)
        ));
    }

    let slots = qslots.slots;
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|&s| slots[s].0);
    let mut new_index = vec![0; slots.len()];
    for (k, &s) in order.iter().enumerate() {
        new_index[s] = k;
    }
    let mut matrix: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; slots.len()]; groups.groups.len()];
    for ((g, s), (d, _)) in answers {
        matrix[g][new_index[s]] = Some(d);
    }
    let mut qs: Vec<Option<Question>> = slots.into_iter().map(|(_, q)| Some(q)).collect();
    let questions = order.iter().filter_map(|&s| qs[s].take()).collect();
    let survey = Survey {
        name: csv_file.to_string(),
        metric: MetricKind::Wasserstein,
        questions,
        groups: groups.groups,
        answers: matrix,
    };
    Ok((survey, report))
}

/// Parses a list of numbers written either as a Python list (`[0.1, 0.9]`) or as numpy
/// array text (`[0.1 0.9]`).
pub fn parse_number_list(text: &str) -> Result<Vec<f64>, String> {
    let t = text.trim();
    if t.contains(',') {
        let v = pylit::parse(t).map_err(|e| format!("{e}; expected a list of numbers"))?;
        return v.to_f64_list();
    }
    let inner = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| {
            format!("`{t}` is not a list; expected `[p1, p2, ...]` or numpy's `[p1 p2 ...]`")
        })?;
    inner
        .split_whitespace()
        .map(|tok| {
            tok.parse::<f64>()
                .map_err(|_| format!("`{tok}` is not a number; expected a list of numbers"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"key,question,references,option_mapping,option_ordinal
SAFE_W1,How safe?,"['Very safe', 'Not safe', 'Refused']","{1.0: 'Very safe', 2.0: 'Not safe', 99.0: 'Refused'}","[1.0, 2.0]"
DEG_W1,Degree?,"[""Associate's degree"", 'College', 'Not sure', 'Refused']","{1.0: ""Associate's degree"", 2.0: 'College', 3.0: 'Not sure', 99.0: 'Refused'}","[1.0, 2.0]"
"#;

    const CSV: &str = r#",qkey,attribute,group,D_H,R_H
0,DEG_W1,SEX,Female,"[0.25 0.75]",0.01
1,SAFE_W1,SEX,Female,"[0.5, 0.5]",0.0
2,SAFE_W1,Overall,Overall,"[0.1
 0.9]",0.02
3,DEG_W1,EDUCATION,Associate's degree,"[1. 0.]",0.0
"#;

    fn err(csv: &str) -> DataError {
        parse(csv, "w.csv", INFO, "info.csv").unwrap_err()
    }

    #[test]
    fn parses_weighted_csv() {
        let s = parse(CSV, "w.csv", INFO, "info.csv").unwrap();
        s.validate().unwrap();
        assert_eq!(s.metric, MetricKind::Wasserstein);
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["SAFE_W1", "DEG_W1"]);
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "SEX:Female",
                "Overall:Overall",
                "EDUCATION:Associate's degree"
            ]
        );
        assert_eq!(
            s.answers[0],
            vec![Some(vec![0.5, 0.5]), Some(vec![0.25, 0.75])]
        );
        assert_eq!(s.answers[1], vec![Some(vec![0.1, 0.9]), None]);
        assert_eq!(s.answers[2][1], Some(vec![1.0, 0.0]));
        assert_eq!(s.questions[1].options[0].text, "Associate's degree");
        assert_eq!(s.questions[1].n_answerable(), 2);
    }

    #[test]
    fn bad_rows_are_located() {
        let hdr = "qkey,attribute,group,D_H\n";
        let e = err(&format!(
            "{hdr}SAFE_W1,SEX,Male,\"[0.5, 0.5]\"\nSAFE_W1,SEX,Female,\"[0.2, 0.3, 0.5]\"\n"
        ));
        assert_eq!(
            (e.file.as_str(), e.line, e.field.as_deref()),
            ("w.csv", Some(3), Some("D_H"))
        );
        assert!(e.message.contains("3 values"), "{e}");

        let e = err(&format!("{hdr}SAFE_W1,SEX,Female,\"[nan, 1.0]\"\n"));
        assert_eq!((e.line, e.field.as_deref()), (Some(2), Some("D_H")));
        assert!(e.message.contains("finite"), "{e}");

        let e = err(&format!("{hdr}SAFE_W1,SEX,Female,\"[-0.5 1.5]\"\n"));
        assert!(e.message.contains("negative"), "{e}");

        let e = err(&format!("{hdr}SAFE_W1,SEX,Female,\"[0.5, 0.49]\"\n"));
        assert!(e.message.contains("sums to"), "{e}");
        // Within 1e-3 is fine.
        parse(
            &format!("{hdr}SAFE_W1,SEX,Female,\"[0.5, 0.4995]\"\n"),
            "w.csv",
            INFO,
            "info.csv",
        )
        .unwrap();

        let e = err(&format!("{hdr}NOPE_W1,SEX,Female,\"[0.5, 0.5]\"\n"));
        assert_eq!((e.line, e.field.as_deref()), (Some(2), Some("qkey")));
        assert!(e.message.contains("NOPE_W1"));

        let e = err(&format!("{hdr}SAFE_W1,SEX,Female,\"[0.5, x]\"\n"));
        assert_eq!(e.field.as_deref(), Some("D_H"));
        let e = err(&format!("{hdr}SAFE_W1,SEX,Female,0.5\n"));
        assert!(e.message.contains("not a list"), "{e}");

        let e = err(&format!(
            "{hdr}SAFE_W1,SEX,Female,\"[0.5, 0.5]\"\nSAFE_W1,SEX,Female,\"[0.5, 0.5]\"\n"
        ));
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("group")));
        assert!(e.message.contains("line 2"), "{e}");

        let e = err(&format!("{hdr}SAFE_W1,SEX,Female\n"));
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("malformed CSV row"), "{e}");

        let e = err("qkey,attribute,D_H\n");
        assert_eq!(e.field.as_deref(), Some("group"));
    }

    #[test]
    fn number_lists() {
        assert_eq!(parse_number_list("[0.1, 0.9]").unwrap(), vec![0.1, 0.9]);
        assert_eq!(parse_number_list(" [0.1 0.9 ] ").unwrap(), vec![0.1, 0.9]);
        assert_eq!(
            parse_number_list("[1.5e-01\n 8.5e-01]").unwrap(),
            vec![0.15, 0.85]
        );
        assert_eq!(parse_number_list("[1]").unwrap(), vec![1.0]);
        assert!(parse_number_list("[nan 1.]").unwrap()[0].is_nan());
        assert!(parse_number_list("[0.1 zz]").is_err());
        assert!(parse_number_list("0.1 0.9").is_err());
    }

    /// W43's `IDIMPORT_W43`: one key on several info rows, sub-questions told apart only by
    /// their text.
    const INFO_DUP: &str = "key,question,references,option_mapping,option_ordinal\r\n\
        IMP_W43,How important is A?,\"['Very', 'Not']\",\"{}\",\"[1, 2]\"\r\n\
        IMP_W43,How important  is B?,\"['Very', 'Not']\",\"{}\",\"[1, 2]\"\r\n\
        OK_W43,Fine?,\"['Yes', 'No']\",\"{}\",\"[1, 2]\"\r\n";

    #[test]
    fn a_key_on_several_info_rows_is_told_apart_by_question_text() {
        let csv = "qkey,question,attribute,group,D_H\r\n\
            IMP_W43,How important is B?,SEX,Female,[0.2 0.8]\r\n\
            IMP_W43,How important is A?,SEX,Female,[0.6 0.4]\r\n\
            OK_W43,Fine?,SEX,Female,[0.5 0.5]\r\n";
        let (s, report) = parse_report(csv, "w.csv", INFO_DUP, "info.csv").unwrap();
        s.validate().unwrap();
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["IMP_W43#1", "IMP_W43#2", "OK_W43"]);
        assert_eq!(s.questions[1].text, "How important  is B?");
        assert_eq!(s.answers[0][0], Some(vec![0.6, 0.4]));
        assert_eq!(s.answers[0][1], Some(vec![0.2, 0.8]));
        assert!(report.is_empty(), "{report:?}");
    }

    #[test]
    fn a_key_on_several_info_rows_without_question_text_is_skipped_with_one_warning() {
        let csv = "qkey,attribute,group,D_H\r\n\
            IMP_W43,SEX,Female,[0.2 0.8]\r\n\
            IMP_W43,SEX,Female,[0.6 0.4]\r\n\
            OK_W43,SEX,Female,[0.5 0.5]\r\n";
        let (s, report) = parse_report(csv, "w.csv", INFO_DUP, "info.csv").unwrap();
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["OK_W43"]);
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        let w = &report.warnings[0];
        assert!(
            w.contains("IMP_W43")
                && w.contains("lines 2, 3")
                && w.contains("2 rows of w.csv (from line 2)"),
            "{w}"
        );
    }

    #[test]
    fn rounded_rows_are_renormalized_and_zero_rows_skipped() {
        let csv = "qkey,attribute,group,D_H\r\n\
            SAFE_W1,SEX,Female,[0.3335 0.666]\r\n\
            SAFE_W1,SEX,Male,[0. 0.]\r\n\
            SAFE_W1,AGE,65+,[0.5 0.5]\r\n\
            SAFE_W1,AGE,18-29,[0.5 0.7]\r\n";
        let e = err(csv);
        // CRLF: the bad row is on line 5.
        assert_eq!((e.line, e.field.as_deref()), (Some(5), Some("D_H")));
        let ok = csv.rsplit_once("SAFE_W1,AGE,18").unwrap().0;
        let (s, report) = parse_report(ok, "w.csv", INFO, "info.csv").unwrap();
        s.validate().unwrap();
        assert_eq!(report.renormalized, 1);
        assert_eq!(report.all_zero, 1);
        assert!(
            report.warnings[0].starts_with("w.csv:3: group `SEX:Male`"),
            "{report:?}"
        );
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["SEX:Female", "AGE:65+"]);
    }
}
