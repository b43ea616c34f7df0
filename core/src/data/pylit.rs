//! A small parser for Python literals, because OpinionQA and GlobalOpinionQA store lists and
//! dicts inside CSV cells as Python `repr` text (`['Very safe', 'Refused']`,
//! `{1.0: 'Yes', 99.0: 'Refused'}`, `defaultdict(<class 'list'>, {'Nigeria': [0.1, 0.9]})`),
//! which is not JSON: single-quoted strings with backslash escapes, `None`/`True`/`False`,
//! `nan`/`inf`, tuples and non-string dict keys.
//!
//! Supported: strings in single or double quotes (optional `u`/`r` prefix, Python escapes,
//! adjacent literals concatenated), ints, floats (`1.5`, `-1.5e-3`, `.5`, `nan`, `inf`),
//! `None`, `True`, `False`, lists, tuples, dicts with any literal keys, the
//! `defaultdict(<class '...'>, {...})` wrapper (read as its dict) and numpy scalar wrappers
//! such as `np.float64(0.5)` (read as their inner value), which numpy 2 writes in `repr`.
//! Not supported (an error): sets, bytes, triple-quoted strings, expressions.
//!
//! Pure: text in, [`PyValue`] out. Errors give the character (not byte) offset and what was
//! expected there.
//!
//! Layout: [`PyValue`] and its typed accessors live in `value`; the cursor and the
//! grammar of containers and words in `parser`; string and number literals in `literals`.

use std::fmt;

mod literals;
mod parser;
mod value;

pub use value::PyValue;

use parser::Parser;

/// Where and why parsing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyLitError {
    /// 0-based character offset into the input.
    pub offset: usize,
    /// What the parser expected at that offset.
    pub expected: String,
}

impl fmt::Display for PyLitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid Python literal at character {}: expected {}",
            self.offset, self.expected
        )
    }
}

impl std::error::Error for PyLitError {}

/// Parses one Python literal; surrounding whitespace is allowed, anything else is an error.
pub fn parse(text: &str) -> Result<PyValue, PyLitError> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    let v = p.value()?;
    p.skip_ws();
    if p.pos < p.chars.len() {
        return Err(p.err("end of input"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
