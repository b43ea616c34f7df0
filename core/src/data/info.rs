//! A wave's `info.csv`, because both OpinionQA layouts (the counts of
//! [`super::opinionqa`] and the weighted CSV of [`super::weighted`]) take their questions
//! and options from it: its rows, looked up by key (several rows may share one), and the
//! [`Question`] of a row by the rules in [`super::opinionqa`]'s documentation.

use std::collections::HashMap;

use super::csvtext::{column, csv_error, csv_with_headers, Lines};
use super::opinionqa::REFUSAL_CODE;
use super::pylit::{self, PyValue};
use super::{AnswerOption, DataError, DataResult, Question};

/// One row of `info.csv`, literal columns still unparsed (see [`Info::question`]).
#[derive(Debug, Clone, PartialEq)]
pub struct InfoRow {
    /// Question id (`key` column).
    pub key: String,
    /// Question text (`question` column).
    pub text: String,
    /// `references` column: Python list of option texts.
    pub references: String,
    /// `option_mapping` column: Python dict from survey code to option text.
    pub option_mapping: String,
    /// `option_ordinal` column: Python list of ordinal values.
    pub option_ordinal: String,
    /// 1-based line of the row in the file.
    pub line: usize,
}

/// A parsed `info.csv`: its rows, looked up by key.
#[derive(Debug, Clone)]
pub struct Info {
    /// The file name, for error messages.
    pub file: String,
    /// The rows, in file order.
    pub rows: Vec<InfoRow>,
    by_key: HashMap<String, Vec<usize>>,
}

/// Questions met while reading rows, keyed by their `info.csv` row: each is parsed once,
/// on first use, and keeps a stable slot.
#[derive(Default)]
pub(crate) struct QuestionSlots {
    by_row: HashMap<usize, usize>,
    /// (info row, question) per slot, in first-use order.
    pub(crate) slots: Vec<(usize, Question)>,
}

impl QuestionSlots {
    /// The slot of the question on `row` of `info`, parsing it on first use.
    pub(crate) fn slot(&mut self, info: &Info, row: usize) -> DataResult<usize> {
        if let Some(&s) = self.by_row.get(&row) {
            return Ok(s);
        }
        let mut q = row_question(&info.rows[row], &info.file)?;
        q.id = info.row_id(row);
        self.slots.push((row, q));
        self.by_row.insert(row, self.slots.len() - 1);
        Ok(self.slots.len() - 1)
    }
}

impl Info {
    /// Parses `info.csv` text: CSV structure and required columns. The Python literals of a
    /// row are parsed when the row's question is asked for ([`Info::question`]), so rows of
    /// questions without counts cannot break a load.
    pub fn parse(text: &str, file: &str) -> DataResult<Info> {
        let (mut rdr, headers) = csv_with_headers(text, file)?;
        let layout =
            "an OpinionQA info.csv has key, question, references, option_mapping, option_ordinal";
        let col = |name: &str| column(&headers, name, file, layout);
        let (ck, cq, cr, cm, co) = (
            col("key")?,
            col("question")?,
            col("references")?,
            col("option_mapping")?,
            col("option_ordinal")?,
        );
        let mut rows = Vec::new();
        let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
        let mut lines = Lines::new(text);
        for rec in rdr.records() {
            let rec = rec.map_err(|e| csv_error(file, text, &headers, &e))?;
            let line = lines.of(&rec);
            let get = |i: usize| rec.get(i).unwrap_or("").to_string();
            let key = get(ck).trim().to_string();
            if key.is_empty() {
                return Err(DataError::at(
                    file,
                    Some(line),
                    Some("key"),
                    "empty question key",
                ));
            }
            by_key.entry(key.clone()).or_default().push(rows.len());
            rows.push(InfoRow {
                key,
                text: get(cq),
                references: get(cr),
                option_mapping: get(cm),
                option_ordinal: get(co),
                line,
            });
        }
        Ok(Info {
            file: file.to_string(),
            rows,
            by_key,
        })
    }

    /// Indices in [`Info::rows`] of the rows with this key (several when a wave's
    /// `info.csv` gives one key to sub-questions told apart only by their text); empty when
    /// the key is unknown.
    pub fn rows_of(&self, key: &str) -> &[usize] {
        self.by_key.get(key).map_or(&[], Vec::as_slice)
    }

    /// Index in [`Info::rows`] of the question with this key, or an error when the key is on
    /// several rows; `None` when the key is unknown.
    pub fn row_index(&self, key: &str) -> Option<DataResult<usize>> {
        let idx = self.by_key.get(key)?;
        if idx.len() > 1 {
            return Some(Err(self.ambiguous(key)));
        }
        Some(Ok(idx[0]))
    }

    /// The error (or warning) for a key on several rows.
    pub fn ambiguous(&self, key: &str) -> DataError {
        let idx = self.rows_of(key);
        let lines: Vec<String> = idx.iter().map(|&i| self.rows[i].line.to_string()).collect();
        DataError::at(
            &self.file,
            idx.get(1).map(|&i| self.rows[i].line),
            Some("key"),
            format!(
                "question key `{key}` is on {} rows (lines {}) that the data cannot tell apart",
                idx.len(),
                lines.join(", ")
            ),
        )
    }

    /// The row among those of `key` whose question text is `text` (whitespace-normalized),
    /// if exactly one is.
    pub fn row_by_text(&self, key: &str, text: &str) -> Option<usize> {
        let norm = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
        let want = norm(text);
        let mut hits = self
            .rows_of(key)
            .iter()
            .filter(|&&i| norm(&self.rows[i].text) == want);
        match (hits.next(), hits.next()) {
            (Some(&i), None) => Some(i),
            _ => None,
        }
    }

    /// The question id of row `row`: its key, or `KEY#k` (k-th row of the key, from 1) when
    /// the key is on several rows.
    pub fn row_id(&self, row: usize) -> String {
        let key = &self.rows[row].key;
        let idx = self.rows_of(key);
        if idx.len() > 1 {
            let k = idx.iter().position(|&i| i == row).unwrap_or(0) + 1;
            format!("{key}#{k}")
        } else {
            key.clone()
        }
    }

    /// The [`Question`] of a key (see the module's rules), or `None` for an unknown key.
    pub fn question(&self, key: &str) -> Option<DataResult<Question>> {
        Some(
            self.row_index(key)?
                .and_then(|i| row_question(&self.rows[i], &self.file)),
        )
    }
}

/// Parses an `info.csv` (see [`Info::parse`]).
pub fn parse_info(text: &str, file: &str) -> DataResult<Info> {
    Info::parse(text, file)
}

fn lit(text: &str, file: &str, line: usize, field: &str, what: &str) -> DataResult<PyValue> {
    pylit::parse(text).map_err(|e| {
        DataError::at(
            file,
            Some(line),
            Some(field),
            format!("{e}; expected {what}"),
        )
    })
}

/// Builds the question of one `info.csv` row.
pub fn row_question(row: &InfoRow, file: &str) -> DataResult<Question> {
    let at = |field: &str, msg: String| DataError::at(file, Some(row.line), Some(field), msg);
    let refs = lit(
        &row.references,
        file,
        row.line,
        "references",
        "a Python list of option texts",
    )?
    .to_str_list()
    .map_err(|m| at("references", m))?;
    if refs.is_empty() {
        return Err(at(
            "references",
            "no options; expected a non-empty list of option texts".into(),
        ));
    }
    for (i, r) in refs.iter().enumerate() {
        if refs[..i].contains(r) {
            return Err(at("references", format!("option `{r}` is listed twice")));
        }
    }
    let mapping = lit(
        &row.option_mapping,
        file,
        row.line,
        "option_mapping",
        "a Python dict from code to option text",
    )?;
    let entries = mapping.as_dict().ok_or_else(|| {
        at(
            "option_mapping",
            format!(
                "expected a dict from code to option text, found a {}",
                mapping.type_name()
            ),
        )
    })?;
    let mut refusal_text: Option<String> = None;
    for (k, v) in entries {
        let code = k.as_f64().ok_or_else(|| {
            at(
                "option_mapping",
                format!(
                    "key {k:?} is a {}, expected a numeric survey code",
                    k.type_name()
                ),
            )
        })?;
        if code == REFUSAL_CODE {
            let t = v.as_str().ok_or_else(|| {
                at(
                    "option_mapping",
                    format!(
                        "code 99.0 maps to a {}, expected an option text",
                        v.type_name()
                    ),
                )
            })?;
            if !refs.iter().any(|r| r == t) {
                return Err(at(
                    "option_mapping",
                    format!("code 99.0 maps to `{t}`, which is not one of the references {refs:?}"),
                ));
            }
            refusal_text = Some(t.to_string());
        }
    }
    let refusal_text = refusal_text.or_else(|| refs.iter().find(|r| *r == "Refused").cloned());
    let ordinal = lit(
        &row.option_ordinal,
        file,
        row.line,
        "option_ordinal",
        "a Python list of numbers",
    )?
    .to_f64_list()
    .map_err(|m| at("option_ordinal", m))?;
    if let Some(i) = ordinal.iter().position(|x| !x.is_finite()) {
        return Err(at(
            "option_ordinal",
            format!("value {i} is {}, expected a finite number", ordinal[i]),
        ));
    }
    let refusal_pos = refusal_text
        .as_ref()
        .and_then(|t| refs.iter().position(|r| r == t));
    let n_points = ordinal.len();
    let max_points = refusal_pos.unwrap_or(refs.len());
    if n_points == 0 || n_points > max_points {
        let what = match &refusal_text {
            Some(t) => format!("{max_points} options before the refusal option `{t}`"),
            None => format!("{max_points} options"),
        };
        return Err(at(
            "option_ordinal",
            format!(
                "ordinal list length mismatch: {n_points} ordinal values, but references has {what}; expected one value per non-refusal option (1 to {max_points})"
            ),
        ));
    }
    let options = refs
        .into_iter()
        .enumerate()
        .map(|(i, text)| AnswerOption {
            text,
            ordinal: ordinal.get(i).copied(),
            refusal: i >= n_points,
        })
        .collect();
    Ok(Question {
        id: row.key.clone(),
        text: row.text.clone(),
        options,
    })
}
