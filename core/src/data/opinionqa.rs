//! OpinionQA's *counts layout* (the `human_resp/American_Trends_Panel_W*` folders), because
//! that is the form in which the OpinionQA benchmark GPO's paper uses is distributed: per
//! wave an `info.csv` describing the questions and one `<ATTR>_data.json` per demographic
//! attribute holding unweighted answer counts per group. This module turns that text into a
//! [`Survey`] (metric [`MetricKind::Wasserstein`]); reading the files is left to
//! [`crate::io::dataset`].
//!
//! # Rules
//!
//! * **Questions** come from `info.csv` (`key`, `question`, `references`, `option_mapping`,
//!   `option_ordinal`; other columns are ignored). Only questions that have counts in at least
//!   one of the attribute files given are kept (an `info.csv` lists many more questions than
//!   have counts), in `info.csv` order.
//! * **Options** are `references`, in order. The *points* (non-refusal options) are the first
//!   `len(option_ordinal)` references, each with its ordinal value; every later option is a
//!   refusal. This is OpinionQA's own rule (`ordinal_refs = references[:len(ordinal)]`), and
//!   it matters: besides the option mapped from code `99.0` (`Refused`), options such as
//!   `Not sure` or `Other view` have no ordinal and are dropped from the distribution. The
//!   code-99 option (or, without one, an option named `Refused`) must come after the points,
//!   otherwise the ordinal list does not match the options and that is an error.
//!   `MC_options` in the JSON files is ignored: it was produced by splitting on commas and is
//!   wrong for every option text that contains one.
//! * **Groups** are `ATTR:value`, in first-seen order; the values in
//!   [`EXCLUDED_GROUP_VALUES`] are not demographic groups and are left out.
//! * **Distributions**: a group's counts over the points, normalized to sum to 1; an option
//!   without a count counts 0. A group with an empty count object, or with counts on refusal
//!   options only, has no answer for that question (`None`). A count object whose counts are
//!   all zero is an error. Count keys are matched to `references` exactly, or else
//!   case-insensitively when that match is unique (the real data spells one option
//!   `neither better noR worse` in the counts).
//!
//! * **Keys on several rows.** A wave's `info.csv` may give one key to several sub-questions
//!   (W43's `IDIMPORT_W43`); the counts file then has one entry for all of them, which
//!   cannot be matched to one, so that question is skipped with one warning naming it
//!   ([`parse_wave_report`]); the rest of the wave loads.
//!
//! Errors name the file, the line (CSV line; for JSON the line of the syntax error, or of the
//! offending key found by search) and the field (a CSV column, or a JSON path starting with
//! the question key, such as `SAFECRIME_W26["Female"]["Very safe"]`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

pub(crate) use super::info::QuestionSlots;
pub use super::info::{parse_info, row_question, Info, InfoRow};
use super::jsontext::{json_error, json_path, locate_line};
use super::{DataError, DataResult, Group, LoadReport, MetricKind, Question, Survey};

/// The attributes whose files cover every question with counts in every wave:
/// 34 groups once [`EXCLUDED_GROUP_VALUES`] are left out.
pub const DEFAULT_ATTRIBUTES: [&str; 8] = [
    "AGE",
    "CREGION",
    "EDUCATION",
    "INCOME",
    "POLIDEOLOGY",
    "POLPARTY",
    "RACE",
    "SEX",
];

/// Attribute values that are not demographic groups.
pub const EXCLUDED_GROUP_VALUES: [&str; 4] = ["nan", "Refused", "marginals", "Other"];

/// The survey code of the refusal option in `option_mapping`.
pub const REFUSAL_CODE: f64 = 99.0;

/// Keys of a question entry in `<ATTR>_data.json` that are not groups.
const NON_GROUP_KEYS: [&str; 2] = ["MC_options", "question_text"];

/// One attribute's counts file for a wave.
#[derive(Debug, Clone, Copy)]
pub struct AttributeFile<'a> {
    /// The attribute, e.g. `SEX`: group names become `SEX:<value>`.
    pub attribute: &'a str,
    /// The file's name, for error messages.
    pub file: &'a str,
    /// The file's JSON text.
    pub json: &'a str,
}

/// Groups in first-seen order, looked up by name: every parser meets group names row by
/// row and needs a stable index for each.
#[derive(Default)]
pub(crate) struct GroupNames {
    index: HashMap<String, usize>,
    /// The groups, in first-seen order.
    pub(crate) groups: Vec<Group>,
}

impl GroupNames {
    /// The index of group `name` and whether it was first seen now.
    pub(crate) fn index(&mut self, name: &str) -> (usize, bool) {
        if let Some(&g) = self.index.get(name) {
            return (g, false);
        }
        self.groups.push(Group {
            name: name.to_string(),
        });
        self.index.insert(name.to_string(), self.groups.len() - 1);
        (self.groups.len() - 1, true)
    }
}

/// A JSON object read with its keys in file order (serde_json's map sorts them).
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Ordered<V>, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = m.next_entry::<String, V>()? {
                    v.push((k, x));
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

/// Index of the option a count key names: exact match, else a unique case-insensitive one.
fn match_option(q: &Question, key: &str) -> Option<usize> {
    if let Some(i) = q.options.iter().position(|o| o.text == key) {
        return Some(i);
    }
    let lower = key.to_lowercase();
    let mut hits = q
        .options
        .iter()
        .enumerate()
        .filter(|(_, o)| o.text.to_lowercase() == lower);
    match (hits.next(), hits.next()) {
        (Some((i, _)), None) => Some(i),
        _ => None,
    }
}

/// Parses one wave: `info.csv` plus the given attribute files. `name` becomes the survey's
/// name (and names the wave in merge errors).
pub fn parse_wave(
    name: &str,
    info_csv: &str,
    info_file: &str,
    attributes: &[AttributeFile],
) -> DataResult<Survey> {
    parse_wave_report(name, info_csv, info_file, attributes).map(|(s, _)| s)
}

/// [`parse_wave`], with what it skipped: a question whose key is on several `info.csv`
/// rows has one count entry for all of them, which cannot be told apart, so it is left out
/// with one warning naming it (the rest of the wave loads).
pub fn parse_wave_report(
    name: &str,
    info_csv: &str,
    info_file: &str,
    attributes: &[AttributeFile],
) -> DataResult<(Survey, LoadReport)> {
    let info = Info::parse(info_csv, info_file)?;
    let mut report = LoadReport::default();
    let mut warned: HashSet<String> = HashSet::new();
    // Questions by info row, built on first use.
    let mut qslots = QuestionSlots::default();
    let mut groups = GroupNames::default();
    // (group, slot) -> distribution.
    let mut answers: HashMap<(usize, usize), Vec<f32>> = HashMap::new();

    for af in attributes {
        let file = af.file;
        let text = af.json;
        let data: Ordered<Ordered<serde_json::Value>> =
            serde_json::from_str(text).map_err(|e| json_error(file, text, &e))?;
        let mut seen_keys: HashSet<&str> = HashSet::new();
        for (qkey, entry) in &data.0 {
            let loc = |path: &[&str]| {
                let mut p = vec![qkey.as_str()];
                p.extend_from_slice(path);
                locate_line(text, &p)
            };
            if !seen_keys.insert(qkey.as_str()) {
                return Err(DataError::at(
                    file,
                    loc(&[]),
                    Some(qkey),
                    format!("question key `{qkey}` appears twice"),
                ));
            }
            let row = match info.row_index(qkey) {
                None => {
                    return Err(DataError::at(
                        file,
                        loc(&[]),
                        Some(qkey),
                        format!("question key `{qkey}` is not in {}", info.file),
                    ))
                }
                Some(Err(_)) => {
                    if warned.insert(qkey.clone()) {
                        report.warn(format!(
                            "{}; its counts in {file} cannot be matched to one of them, so the question is skipped",
                            info.ambiguous(qkey)
                        ));
                    }
                    continue;
                }
                Some(Ok(r)) => r,
            };
            let slot = qslots.slot(&info, row)?;
            let q = &qslots.slots[slot].1;
            for (gval, counts) in &entry.0 {
                if NON_GROUP_KEYS.contains(&gval.as_str())
                    || EXCLUDED_GROUP_VALUES.contains(&gval.as_str())
                {
                    continue;
                }
                let gfield = json_path(qkey, &[gval]);
                let obj = counts.as_object().ok_or_else(|| {
                    DataError::at(
                        file,
                        loc(&[gval]),
                        Some(&gfield),
                        format!("expected an object mapping option text to count, found {counts}"),
                    )
                })?;
                if obj.is_empty() {
                    continue;
                }
                let mut c = vec![0f64; q.options.len()];
                let mut has = vec![false; q.options.len()];
                for (opt, n) in obj {
                    let ofield = json_path(qkey, &[gval, opt]);
                    let oloc = || loc(&[gval, opt]);
                    let i = match_option(q, opt).ok_or_else(|| {
                        let known: Vec<&str> = q.options.iter().map(|o| o.text.as_str()).collect();
                        DataError::at(
                            file,
                            oloc(),
                            Some(&ofield),
                            format!("unknown option `{opt}`; expected one of the question's references {known:?}"),
                        )
                    })?;
                    if has[i] {
                        return Err(DataError::at(
                            file,
                            oloc(),
                            Some(&ofield),
                            format!(
                                "option `{}` has two counts (keys differ only in case)",
                                q.options[i].text
                            ),
                        ));
                    }
                    has[i] = true;
                    let v = match n {
                        serde_json::Value::Number(x) => x.as_f64().unwrap_or(f64::NAN),
                        serde_json::Value::Null => f64::NAN,
                        other => {
                            return Err(DataError::at(
                                file,
                                oloc(),
                                Some(&ofield),
                                format!("count is {other}, expected a non-negative number"),
                            ))
                        }
                    };
                    if !v.is_finite() || v < 0.0 {
                        return Err(DataError::at(
                            file,
                            oloc(),
                            Some(&ofield),
                            format!(
                                "count is {}, expected a non-negative number",
                                if n.is_null() {
                                    "null (NaN)".to_string()
                                } else {
                                    v.to_string()
                                }
                            ),
                        ));
                    }
                    c[i] = v;
                }
                let total: f64 = c.iter().sum();
                if total <= 0.0 {
                    return Err(DataError::at(
                        file,
                        loc(&[gval]),
                        Some(&gfield),
                        "all counts are zero; expected at least one positive count (or an empty object for no answer)",
                    ));
                }
                let n_points = q.n_answerable();
                let point_sum: f64 = c[..n_points].iter().sum();
                if point_sum <= 0.0 {
                    // Only refusals: the group gave no substantive answer.
                    continue;
                }
                let dist: Vec<f32> = c[..n_points]
                    .iter()
                    .map(|&x| (x / point_sum) as f32)
                    .collect();
                let gname = format!("{}:{gval}", af.attribute);
                let (g, _) = groups.index(&gname);
                if answers.insert((g, slot), dist).is_some() {
                    return Err(DataError::at(
                        file,
                        loc(&[gval]),
                        Some(&gfield),
                        format!("group `{gname}` already has counts for question `{qkey}` (attribute given twice?)"),
                    ));
                }
            }
        }
    }

    // Keep answered questions only, in info.csv order.
    let slots = qslots.slots;
    let mut answered = vec![false; slots.len()];
    for &(_, s) in answers.keys() {
        answered[s] = true;
    }
    let mut order: Vec<usize> = (0..slots.len()).filter(|&s| answered[s]).collect();
    order.sort_by_key(|&s| slots[s].0);
    let mut new_index = vec![usize::MAX; slots.len()];
    for (k, &s) in order.iter().enumerate() {
        new_index[s] = k;
    }
    let mut matrix: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; order.len()]; groups.groups.len()];
    for ((g, s), d) in answers {
        matrix[g][new_index[s]] = Some(d);
    }
    let mut slot_opts: Vec<Option<Question>> = slots.into_iter().map(|(_, q)| Some(q)).collect();
    let questions = order.iter().filter_map(|&s| slot_opts[s].take()).collect();
    let survey = Survey {
        name: name.to_string(),
        metric: MetricKind::Wasserstein,
        questions,
        groups: groups.groups,
        answers: matrix,
    };
    Ok((survey, report))
}

/// Merges waves into one survey named `name`: questions concatenated in the order given,
/// groups united in first-seen order, `None` where a group has no answers in a wave. Errors
/// when a question id is in two waves or the metrics differ (the error's file is the later
/// wave's survey name).
pub fn merge_waves(name: &str, waves: Vec<Survey>) -> DataResult<Survey> {
    let mut out = Survey {
        name: name.to_string(),
        metric: waves.first().map_or(MetricKind::Wasserstein, |w| w.metric),
        questions: Vec::new(),
        groups: Vec::new(),
        answers: Vec::new(),
    };
    let mut qwave: HashMap<String, String> = HashMap::new();
    let mut gidx = GroupNames::default();
    for w in waves {
        if w.metric != out.metric {
            return Err(DataError::file(
                &w.name,
                format!(
                    "metric {:?} differs from the first wave's {:?}",
                    w.metric, out.metric
                ),
            ));
        }
        for q in &w.questions {
            if let Some(prev) = qwave.insert(q.id.clone(), w.name.clone()) {
                return Err(DataError::at(
                    &w.name,
                    None,
                    Some("key"),
                    format!(
                        "question id `{}` is also in wave {prev}; expected ids unique across waves",
                        q.id
                    ),
                ));
            }
        }
        let base = out.questions.len();
        let nq = w.questions.len();
        for row in &mut out.answers {
            row.resize(base + nq, None);
        }
        for (g, row) in w.groups.iter().zip(w.answers) {
            let (gi, new) = gidx.index(&g.name);
            if new {
                out.answers.push(vec![None; base + nq]);
            }
            for (k, a) in row.into_iter().enumerate() {
                out.answers[gi][base + k] = a;
            }
        }
        out.questions.extend(w.questions);
    }
    out.groups = gidx.groups;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#",Unnamed: 0,key,option_mapping,question,references,option_ordinal
0,0,SAFE_W1,"{1.0: 'Very safe', 2.0: 'Not safe', 99.0: 'Refused'}","How safe is it?","['Very safe', 'Not safe', 'Refused']","[1.0, 2.0]"
1,1,GUN_W1,"{1.0: 'Yes, I own a gun', 2.0: ""No, I don't own any guns"", 99.0: 'Refused'}","Do you own a gun?","['Yes, I own a gun', ""No, I don't own any guns"", 'Refused']","[1.0, 2.0]"
2,2,MOVE_W1,"{1.0: 'Would move', 2.0: 'Would not', 3.0: 'Not sure', 99.0: 'Refused'}","Move?","['Would move', 'Would not', 'Not sure', 'Refused']","[1.0, 2.0]"
3,3,UNUSED_W1,"{1.0: 'A'}","Unused","['A', broken","[1.0]"
"#;

    const SEX: &str = r#"{"SAFE_W1": {"MC_options": ["Very safe", "Not safe", "Refused"], "question_text": "How safe is it?",
 "Female": {"Very safe": 3.0, "Not safe": 1.0, "Refused": 5.0},
 "Male": {"Very safe": 1.0},
 "Refused": {"Very safe": 1.0}},
"GUN_W1": {"MC_options": ["Yes", "I own a gun", "\"No", "I don't own any guns\"", "Refused"],
 "Female": {"No, I don't own any guns": 3.0, "yes, i own a gun": 1.0},
 "Male": {},
 "nan": {}},
"MOVE_W1": {"Female": {"Would move": 1.0, "Not sure": 7.0}, "Male": {"Not sure": 2.0, "Refused": 1.0}}
}"#;

    const AGE: &str = r#"{"SAFE_W1": {"18-29": {"Very safe": 1.0, "Not safe": 1.0}, "Other": {"Very safe": 1.0}}}"#;

    fn wave(attrs: &[AttributeFile]) -> DataResult<Survey> {
        parse_wave("W1", INFO, "info.csv", attrs)
    }

    fn ok_wave() -> Survey {
        wave(&[
            AttributeFile {
                attribute: "SEX",
                file: "SEX_data.json",
                json: SEX,
            },
            AttributeFile {
                attribute: "AGE",
                file: "AGE_data.json",
                json: AGE,
            },
        ])
        .unwrap()
    }

    #[test]
    fn parses_a_wave() {
        let s = ok_wave();
        s.validate().unwrap();
        assert_eq!(s.metric, MetricKind::Wasserstein);
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["SAFE_W1", "GUN_W1", "MOVE_W1"]);
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["SEX:Female", "SEX:Male", "AGE:18-29"]);
        // Refusal dropped and normalized over points.
        assert_eq!(s.answers[0][0], Some(vec![0.75, 0.25]));
        // Missing option counts 0.
        assert_eq!(s.answers[1][0], Some(vec![1.0, 0.0]));
        // Apostrophes, commas; case-insensitive match of "yes, i own a gun".
        let gun = &s.questions[1];
        assert_eq!(gun.options[1].text, "No, I don't own any guns");
        assert_eq!(s.answers[0][1], Some(vec![0.25, 0.75]));
        // Empty counts: no answer.
        assert_eq!(s.answers[1][1], None);
        // "Not sure" beyond the ordinal list is a refusal; Male answered only refusals.
        let mv = &s.questions[2];
        assert_eq!(mv.n_answerable(), 2);
        assert!(mv.options[2].refusal && mv.options[3].refusal);
        assert_eq!(mv.options[1].ordinal, Some(2.0));
        assert_eq!(mv.options[2].ordinal, None);
        assert_eq!(s.answers[0][2], Some(vec![1.0, 0.0]));
        assert_eq!(s.answers[1][2], None);
        assert_eq!(s.answers[2][0], Some(vec![0.5, 0.5]));
        assert_eq!(s.answers[2][1], None);
        assert_eq!(s.questions[0].ordinals(), Some(vec![1.0, 2.0]));
    }

    #[test]
    fn merges_waves() {
        let a = ok_wave();
        let info2 = "key,question,references,option_mapping,option_ordinal\nX_W2,Q?,\"['a', 'b']\",\"{1: 'a', 2: 'b'}\",\"[1, 2]\"\n";
        let j = r#"{"X_W2": {"Female": {"a": 1.0}, "Other": {"a": 2.0}}}"#;
        let b = parse_wave(
            "W2",
            info2,
            "w2/info.csv",
            &[AttributeFile {
                attribute: "SEX",
                file: "w2/SEX_data.json",
                json: j,
            }],
        )
        .unwrap();
        let m = merge_waves("all", vec![a.clone(), b.clone()]).unwrap();
        m.validate().unwrap();
        assert_eq!(m.questions.len(), 4);
        assert_eq!(m.groups.len(), 3);
        assert_eq!(m.answers[0][3], Some(vec![1.0, 0.0]));
        assert_eq!(m.answers[1][3], None);
        assert_eq!(m.answers[2][3], None);
        let e = merge_waves("all", vec![a.clone(), a]).unwrap_err();
        assert_eq!(e.file, "W1");
        assert_eq!(e.field.as_deref(), Some("key"));
        assert!(e.message.contains("SAFE_W1"));
    }

    fn one(json: &str) -> DataError {
        wave(&[AttributeFile {
            attribute: "SEX",
            file: "SEX_data.json",
            json,
        }])
        .unwrap_err()
    }

    #[test]
    fn unknown_option_is_located() {
        let e =
            one("{\"SAFE_W1\": {\n \"Female\": {\n  \"Very safe\": 1.0,\n  \"Kinda safe\": 2.0}}}");
        assert_eq!(e.file, "SEX_data.json");
        assert_eq!(e.line, Some(4));
        assert_eq!(
            e.field.as_deref(),
            Some(r#"SAFE_W1["Female"]["Kinda safe"]"#)
        );
        assert!(e.message.contains("unknown option `Kinda safe`"), "{e}");
    }

    #[test]
    fn bad_counts_are_located() {
        let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": -1.0}}}");
        assert_eq!((e.file.as_str(), e.line), ("SEX_data.json", Some(1)));
        assert_eq!(
            e.field.as_deref(),
            Some(r#"SAFE_W1["Female"]["Very safe"]"#)
        );
        assert!(e.message.contains("-1"), "{e}");

        let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": null}}}");
        assert!(e.message.contains("NaN"), "{e}");
        assert_eq!(
            e.field.as_deref(),
            Some(r#"SAFE_W1["Female"]["Very safe"]"#)
        );

        let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": \"3\"}}}");
        assert!(e.message.contains("expected a non-negative number"), "{e}");

        // Python's json.dump writes NaN, which is not JSON: a syntax error with a clear message.
        let e = one("{\"SAFE_W1\":\n {\"Female\": {\"Very safe\": NaN}}}");
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("NaN"), "{e}");

        let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": 0.0, \"Refused\": 0}}}");
        assert_eq!(e.field.as_deref(), Some(r#"SAFE_W1["Female"]"#));
        assert!(e.message.contains("all counts are zero"), "{e}");

        let e = one("{\"SAFE_W1\": {\"Female\": [1, 2]}}");
        assert_eq!(e.field.as_deref(), Some(r#"SAFE_W1["Female"]"#));
    }

    #[test]
    fn bad_json_and_keys() {
        let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": 1.0}\n,}");
        assert_eq!(e.line, Some(2));
        assert!(e.message.starts_with("invalid JSON"), "{e}");
        let e = one("{\"NOPE_W1\": {}}");
        assert_eq!(e.field.as_deref(), Some("NOPE_W1"));
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("not in info.csv"));
        let e = one("{\"SAFE_W1\": 3}");
        assert!(e.message.contains("JSON object"), "{e}");
        let e = one("{\"SAFE_W1\": {}, \"SAFE_W1\": {}}");
        assert!(e.message.contains("twice"), "{e}");
        // The unused row's broken literal is only an error once the question is used.
        let e = one("{\"UNUSED_W1\": {\"Female\": {\"A\": 1}}}");
        assert_eq!((e.file.as_str(), e.line), ("info.csv", Some(5)));
        assert_eq!(e.field.as_deref(), Some("references"));
        assert!(e.message.contains("character"), "{e}");
    }

    fn info_err(info: &str) -> DataError {
        let j = r#"{"Q": {"Female": {"a": 1.0}}}"#;
        parse_wave(
            "W",
            info,
            "info.csv",
            &[AttributeFile {
                attribute: "SEX",
                file: "SEX_data.json",
                json: j,
            }],
        )
        .unwrap_err()
    }

    fn csv_field(s: &str) -> String {
        format!("\"{}\"", s.replace('"', "\"\""))
    }

    const HDR: &str = "key,question,references,option_mapping,option_ordinal\n";

    #[test]
    fn info_errors_are_located() {
        // Malformed CSV row (wrong number of fields).
        let e = info_err(&format!("{HDR}Q,text,\"['a']\",\"{{}}\"\n"));
        assert_eq!((e.file.as_str(), e.line), ("info.csv", Some(2)));
        assert!(e.message.contains("malformed CSV row"), "{e}");
        // Missing column.
        let e = info_err("key,question,references,option_mapping\nQ,t,x,y\n");
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(1), Some("option_ordinal"))
        );
        // Ordinal list too long.
        let e = info_err(&format!(
            "{HDR}Q,t,\"['a', 'Refused']\",\"{{1.0: 'a', 99.0: 'Refused'}}\",\"[1.0, 2.0]\"\n"
        ));
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(2), Some("option_ordinal"))
        );
        assert!(e.message.contains("length mismatch"), "{e}");
        // Empty ordinal list.
        let e = info_err(&format!("{HDR}Q,t,\"['a']\",\"{{}}\",\"[]\"\n"));
        assert!(e.message.contains("length mismatch"), "{e}");
        // Refusal code naming an unknown option.
        let e = info_err(&format!(
            "{HDR}Q,t,\"['a', 'b']\",\"{{99.0: 'Refused'}}\",\"[1.0]\"\n"
        ));
        assert_eq!(e.field.as_deref(), Some("option_mapping"));
        // Bad ordinal values.
        let e = info_err(&format!(
            "{HDR}Q,t,\"['a', 'b']\",\"{{}}\",\"[1.0, 'x']\"\n"
        ));
        assert_eq!(e.field.as_deref(), Some("option_ordinal"));
        let e = info_err(&format!(
            "{HDR}Q,t,\"['a', 'b']\",\"{{}}\",\"[1.0, nan]\"\n"
        ));
        assert!(e.message.contains("finite"), "{e}");
        // Duplicate option texts.
        let e = info_err(&format!("{HDR}Q,t,\"['a', 'a']\",\"{{}}\",\"[1]\"\n"));
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn multiline_csv_rows_keep_line_numbers() {
        let info = format!("{HDR}A,\"two\nlines\",\"['a']\",\"{{}}\",\"[1]\"\nQ,t,\"['a', 'b']\",\"{{}}\",\"[1.0, 'x']\"\n");
        let e = info_err(&info);
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn no_refusal_option_and_escaped_quotes() {
        let refs = r#"['Associate\'s degree', "It's \"fine\""]"#;
        let info = format!("{HDR}Q,t,{},\"{{1: 'x'}}\",\"[1, 2]\"\n", csv_field(refs));
        let j = r#"{"Q": {"Female": {"Associate's degree": 1.0, "It's \"fine\"": 3.0}}}"#;
        let s = parse_wave(
            "W",
            &info,
            "info.csv",
            &[AttributeFile {
                attribute: "SEX",
                file: "f",
                json: j,
            }],
        )
        .unwrap();
        assert_eq!(s.questions[0].options[0].text, "Associate's degree");
        assert_eq!(s.questions[0].options[1].text, "It's \"fine\"");
        assert!(s.questions[0].options.iter().all(|o| !o.refusal));
        assert_eq!(s.answers[0][0], Some(vec![0.25, 0.75]));
    }

    /// A wave whose info.csv gives one key to two sub-questions (IDIMPORT_W43-style): the
    /// one count entry cannot be matched to either, so that question is skipped with one
    /// warning naming it, and the rest of the wave loads.
    #[test]
    fn a_key_on_several_info_rows_is_skipped_with_one_warning() {
        let info = format!(
            "{HDR}IMP_W1,How important is A?,\"['Very', 'Not']\",\"{{}}\",\"[1, 2]\"\r\n\
             IMP_W1,How important is B?,\"['Very', 'Not']\",\"{{}}\",\"[1, 2]\"\r\n\
             OK_W1,Fine?,\"['Yes', 'No']\",\"{{}}\",\"[1, 2]\"\r\n"
        );
        let j = r#"{"IMP_W1": {"Female": {"Very": 1.0}}, "OK_W1": {"Female": {"Yes": 1.0, "No": 3.0}}}"#;
        let files = [
            AttributeFile {
                attribute: "SEX",
                file: "SEX_data.json",
                json: j,
            },
            AttributeFile {
                attribute: "AGE",
                file: "AGE_data.json",
                json: j,
            },
        ];
        let (s, report) = parse_wave_report("W", &info, "info.csv", &files).unwrap();
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["OK_W1"]);
        assert_eq!(s.answers[0][0], Some(vec![0.25, 0.75]));
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        let w = &report.warnings[0];
        // CRLF line endings: the rows are on lines 2 and 3.
        assert!(
            w.contains("IMP_W1") && w.contains("lines 2, 3") && w.contains("skipped"),
            "{w}"
        );
    }

    #[test]
    fn crlf_info_errors_have_the_right_line() {
        let info = format!(
            "{HDR}A,t,\"['a']\",\"{{}}\",\"[1]\"\nQ,t,\"['a', 'b']\",\"{{}}\",\"[1.0, 'x']\"\n"
        );
        assert_eq!(info_err(&info).line, Some(3));
        assert_eq!(info_err(&info.replace('\n', "\r\n")).line, Some(3));
        // A structure error names the first missing column.
        let e = info_err(&format!("{HDR}Q,text,\"['a']\",\"{{}}\"\r\n"));
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(2), Some("option_ordinal"))
        );
    }

    #[test]
    fn json_syntax_errors_name_a_path() {
        let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": 1.0 2.0}}}");
        assert_eq!(
            e.field.as_deref(),
            Some("SAFE_W1[\"Female\"][\"Very safe\"]")
        );
    }
}
