//! CSV text as every CSV parser here reads it, because the `csv` crate's positions are not
//! what a user needs in an error: its line numbers come out one too low in files with
//! Windows (CRLF) line endings (Python's csv writer makes those by default), and its
//! structure errors name no column. This module opens a CSV with a header, finds columns by
//! name, gives each record its real 1-based line, and turns `csv` errors into
//! [`DataError`]s that name the line and a column.

use super::DataError;

/// Opens CSV text whose first line is a header.
pub(crate) fn csv_with_headers<'a>(
    text: &'a str,
    file: &str,
) -> Result<(csv::Reader<&'a [u8]>, csv::StringRecord), DataError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| {
            DataError::at(
                file,
                Some(1),
                Some("header"),
                format!("malformed CSV header: {e}"),
            )
        })?
        .clone();
    Ok((rdr, headers))
}

/// Index of column `name`, or an error naming the file and the columns the layout needs.
pub(crate) fn column(
    headers: &csv::StringRecord,
    name: &str,
    file: &str,
    layout: &str,
) -> Result<usize, DataError> {
    headers
        .iter()
        .position(|h| h.trim() == name)
        .ok_or_else(|| {
            DataError::at(
                file,
                Some(1),
                Some(name),
                format!("missing column `{name}` ({layout})"),
            )
        })
}

/// The 1-based line of a record from its byte offset, counted incrementally (records come
/// in order, so the whole file is scanned once).
pub(crate) struct Lines<'a> {
    text: &'a [u8],
    byte: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    /// A counter over `text`.
    pub(crate) fn new(text: &'a str) -> Self {
        Lines {
            text: text.as_bytes(),
            byte: 0,
            line: 1,
        }
    }

    /// The line on which the record at byte offset `byte` starts. A record's offset may
    /// point at the line ending of the line before (the `\n` of a `\r\n`, or blank lines the
    /// reader skips), so line endings there are stepped over first.
    pub(crate) fn at(&mut self, byte: u64) -> usize {
        let mut b = (byte as usize).min(self.text.len());
        while b < self.text.len() && (self.text[b] == b'\r' || self.text[b] == b'\n') {
            b += 1;
        }
        if b < self.byte {
            // Out of order (an error position): count from the start.
            self.byte = 0;
            self.line = 1;
        }
        self.line += self.text[self.byte..b]
            .iter()
            .filter(|&&c| c == b'\n')
            .count();
        self.byte = b;
        self.line
    }

    /// The line of a record.
    pub(crate) fn of(&mut self, rec: &csv::StringRecord) -> usize {
        rec.position().map_or(0, |p| self.at(p.byte()))
    }
}

/// Turns a `csv` error into a [`DataError`] at the record's real line, naming the column:
/// for a row with too few fields the first missing column, for too many the first extra
/// one, for bad UTF-8 the column it is in.
pub(crate) fn csv_error(
    file: &str,
    text: &str,
    headers: &csv::StringRecord,
    e: &csv::Error,
) -> DataError {
    let line = e.position().map(|p| Lines::new(text).at(p.byte()));
    let name = |i: usize| {
        headers
            .get(i)
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("column {}", i + 1))
    };
    let (field, msg) = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            let (want, got) = (*expected_len as usize, *len as usize);
            if got < want {
                (
                    name(got),
                    format!(
                        "malformed CSV row: {got} fields, the header has {want}; `{}` and the columns after it are missing (a quote left open, or a missing delimiter?)",
                        name(got)
                    ),
                )
            } else {
                (
                    format!("column {}", want + 1),
                    format!(
                        "malformed CSV row: {got} fields, the header has {want}; the extra fields start after `{}` (an unquoted comma?)",
                        name(want.saturating_sub(1))
                    ),
                )
            }
        }
        csv::ErrorKind::Utf8 { err, .. } => (
            name(err.field()),
            format!("malformed CSV row: {err}; expected UTF-8 text"),
        ),
        _ => ("row".to_string(), format!("malformed CSV row: {e}")),
    };
    DataError::at(file, line, Some(&field), msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<usize> {
        let (mut rdr, _) = csv_with_headers(text, "f.csv").unwrap();
        let mut l = Lines::new(text);
        rdr.records().map(|r| l.of(&r.unwrap())).collect()
    }

    #[test]
    fn record_lines_are_right_with_lf_and_crlf() {
        let lf = "a,b\n1,2\n\"x\ny\",3\n\n4,5\n";
        assert_eq!(lines(lf), [2, 3, 6]);
        let crlf = lf.replace('\n', "\r\n");
        assert_eq!(lines(&crlf), [2, 3, 6]);
    }

    #[test]
    fn structure_errors_name_a_column_and_the_real_line() {
        for nl in ["\n", "\r\n"] {
            let text = ["a,b,c", "1,2,3", "1,2", "1,2,3,4", ""].join(nl);
            let (mut rdr, h) = csv_with_headers(&text, "f.csv").unwrap();
            let errs: Vec<DataError> = rdr
                .records()
                .filter_map(|r| r.err())
                .map(|e| csv_error("f.csv", &text, &h, &e))
                .collect();
            assert_eq!(errs[0].line, Some(3), "{nl:?}: {}", errs[0]);
            assert_eq!(errs[0].field.as_deref(), Some("c"));
            assert!(errs[0].message.contains("2 fields"), "{}", errs[0]);
            assert_eq!(errs[1].line, Some(4), "{nl:?}: {}", errs[1]);
            assert_eq!(errs[1].field.as_deref(), Some("column 4"));
            assert!(errs[1].message.contains("after `c`"), "{}", errs[1]);
        }
    }
}
