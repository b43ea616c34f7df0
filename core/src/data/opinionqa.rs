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
mod tests;
