//! Locating things in JSON text for error messages, because serde_json reports a syntax
//! error by line and column only and a user fixing a large counts file needs to know
//! *where in the structure* it is: every JSON error names a JSON path such as
//! `SAFECRIME_W26["Female"]["Very safe"]`.

use super::DataError;

/// A located error for a serde_json failure: the line, the JSON path of the value being
/// read where it failed, and a clearer message for the non-JSON `NaN`/`Infinity` tokens
/// Python's `json.dump` writes.
pub(crate) fn json_error(file: &str, text: &str, e: &serde_json::Error) -> DataError {
    let line = e.line();
    let mut msg = format!("invalid JSON: {e}");
    if line > 0 {
        if let Some(l) = text.lines().nth(line - 1) {
            let col = e.column().saturating_sub(1);
            let lo = col.saturating_sub(2);
            let window = l.get(lo..(col + 10).min(l.len())).unwrap_or("");
            if window.contains("NaN") || window.contains("Infinity") {
                msg = format!(
                    "a count is NaN or infinite (written as a bare `NaN`/`Infinity`, which is not JSON); expected a non-negative number ({e})"
                );
            }
        }
    }
    let path = if line > 0 {
        path_at(text, offset_of(text, line, e.column()))
    } else {
        TOP.to_string()
    };
    DataError::at(file, (line > 0).then_some(line), Some(&path), msg)
}

/// How [`path_at`] names the top level.
pub(crate) const TOP: &str = "(top level)";

/// Byte offset of 1-based `line` and `column` (serde_json's column counts bytes; 0 means
/// the line's start).
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(i) => start += i + 1,
            None => return text.len(),
        }
    }
    (start + column.saturating_sub(1)).min(text.len())
}

enum Frame {
    /// An object: the key whose value is being read, if one was read yet.
    Object(Option<String>),
    /// An array: the index of the element being read.
    Array(usize),
}

/// The JSON path of the value being read at byte `offset`: object keys and array indices
/// from the top level, the first key bare (`KEY["inner"][2]`). Works on text that is
/// malformed from `offset` on, which is the point: it only scans what comes before.
pub(crate) fn path_at(text: &str, offset: usize) -> String {
    let bytes = text.as_bytes();
    let end = offset.min(bytes.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < end {
        match bytes[i] {
            b'"' => {
                let (s, next) = read_string(text, i);
                if expect_key {
                    if let Some(Frame::Object(k)) = stack.last_mut() {
                        *k = Some(s);
                    }
                    expect_key = false;
                }
                i = next;
                continue;
            }
            b'{' => {
                stack.push(Frame::Object(None));
                expect_key = true;
            }
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array(n)) => *n += 1,
                Some(Frame::Object(_)) => expect_key = true,
                None => {}
            },
            _ => {}
        }
        i += 1;
    }
    let mut out = String::new();
    for f in &stack {
        match f {
            Frame::Object(Some(k)) if out.is_empty() => out.push_str(k),
            Frame::Object(Some(k)) => out.push_str(&format!(
                "[{}]",
                serde_json::to_string(k).unwrap_or_else(|_| format!("\"{k}\""))
            )),
            Frame::Object(None) => break,
            Frame::Array(n) => out.push_str(&format!("[{n}]")),
        }
    }
    if out.is_empty() {
        TOP.to_string()
    } else {
        out
    }
}

/// The string starting at the quote at `start` (escapes decoded where simple) and the
/// offset after its closing quote (or the text's end when it is unterminated).
fn read_string(text: &str, start: usize) -> (String, usize) {
    let mut out = String::new();
    let mut chars = text[start + 1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, start + 1 + i + 1),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'u')) => {
                    let hex: String = (0..4)
                        .filter_map(|_| chars.next().map(|(_, h)| h))
                        .collect();
                    match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        Some(ch) => out.push(ch),
                        None => out.push('\u{fffd}'),
                    }
                }
                Some((_, other)) => out.push(other),
                None => break,
            },
            c => out.push(c),
        }
    }
    (out, text.len())
}

/// Best-effort line of a JSON path: searches for each key (as a JSON string followed by `:`)
/// after the previous one. `None` when the first key is not found.
pub(crate) fn locate_line(text: &str, path: &[&str]) -> Option<usize> {
    let mut pos = 0;
    let mut found = None;
    for key in path {
        let needle = serde_json::to_string(key).ok()?;
        let mut from = pos;
        let hit = loop {
            let Some(i) = text.get(from..).and_then(|t| t.find(&needle)) else {
                break None;
            };
            let at = from + i;
            let after = text[at + needle.len()..].trim_start();
            if after.starts_with(':') {
                break Some(at);
            }
            from = at + needle.len();
        };
        match hit {
            Some(at) => {
                pos = at + needle.len();
                found = Some(at);
            }
            None => break,
        }
    }
    found.map(|at| text[..at].matches('\n').count() + 1)
}

/// A JSON path for error messages: `QKEY["group"]["option"]`.
pub(crate) fn json_path(qkey: &str, rest: &[&str]) -> String {
    let mut s = qkey.to_string();
    for k in rest {
        s.push_str(&format!(
            "[{}]",
            serde_json::to_string(k).unwrap_or_else(|_| format!("\"{k}\""))
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_path(text: &str) -> (Option<usize>, String) {
        let e = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
        let d = json_error("f.json", text, &e);
        (d.line, d.field.unwrap())
    }

    #[test]
    fn syntax_errors_name_a_json_path() {
        let t = "{\"Q_W1\": {\"Female\": {\"Very safe\": 1.0,\n \"Not safe\": 2.0 3}}}";
        assert_eq!(
            err_path(t),
            (Some(2), "Q_W1[\"Female\"][\"Not safe\"]".into())
        );
        let t = "{\"A\": {\"x\": [1, 2, oops]}}";
        assert_eq!(err_path(t).1, "A[\"x\"][2]");
        let t = "{\"A\": 1,\n \"B\": {\"it\\\"s\": tru}}";
        assert_eq!(err_path(t), (Some(2), "B[\"it\\\"s\"]".into()));
        assert_eq!(err_path("nope").1, TOP);
        assert_eq!(err_path("{\"A\": {\"b\": NaN}}").1, "A[\"b\"]");
    }

    #[test]
    fn locate_line_finds_nested_keys() {
        let t = "{\"A\": {\"x\": 1},\n \"B\": {\n  \"x\": 2}}";
        assert_eq!(locate_line(t, &["A", "x"]), Some(1));
        assert_eq!(locate_line(t, &["B", "x"]), Some(3));
        assert_eq!(locate_line(t, &["C"]), None);
    }
}
