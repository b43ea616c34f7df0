//! The lexing of scalar literals: numbers (ints, floats, signed `inf`/`nan`) and strings
//! (quotes, `u`/`r` prefixes, escapes, adjacent-literal concatenation).
//!
//! Its own module because these are character-level rules, independent of how values nest
//! (the grammar in `parser`).

use super::parser::Parser;
use super::{PyLitError, PyValue};

impl Parser {
    /// If a string prefix (`u`, `r`, `ur`, `ru`, any case) followed by a quote starts here,
    /// returns whether it is raw, without consuming anything.
    pub(super) fn string_prefix(&self) -> Option<bool> {
        let a = self.peek()?.to_ascii_lowercase();
        let b = self.peek_at(1);
        let is_quote = |c: Option<char>| matches!(c, Some('\'' | '"'));
        if (a == 'u' || a == 'r') && is_quote(b) {
            return Some(a == 'r');
        }
        let b = b?.to_ascii_lowercase();
        if ((a == 'u' && b == 'r') || (a == 'r' && b == 'u')) && is_quote(self.peek_at(2)) {
            return Some(true);
        }
        None
    }

    pub(super) fn string_with_prefix(&mut self, raw: bool) -> Result<PyValue, PyLitError> {
        while !matches!(self.peek(), Some('\'' | '"')) {
            self.pos += 1;
        }
        let mut s = self.one_string(raw)?;
        self.concat_adjacent(&mut s)?;
        Ok(PyValue::Str(s))
    }

    pub(super) fn number(&mut self) -> Result<PyValue, PyLitError> {
        let start = self.pos;
        let mut neg = false;
        if matches!(self.peek(), Some('-' | '+')) {
            neg = self.peek() == Some('-');
            self.pos += 1;
            self.skip_ws();
            if matches!(self.peek(), Some(c) if c.is_alphabetic()) {
                let w = self.ident();
                let sign = if neg { -1.0 } else { 1.0 };
                return match w.as_str() {
                    "inf" | "Infinity" => Ok(PyValue::Float(sign * f64::INFINITY)),
                    "nan" | "NaN" => Ok(PyValue::Float(f64::NAN)),
                    _ => {
                        self.pos = start;
                        Err(self.err("a number after the sign"))
                    }
                };
            }
        }
        let digits_start = self.pos;
        let mut is_float = false;
        let mut mantissa_digits = 0;
        while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
            self.pos += 1;
            mantissa_digits += 1;
        }
        if self.eat('.') {
            is_float = true;
            while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
                self.pos += 1;
                mantissa_digits += 1;
            }
        }
        if mantissa_digits == 0 {
            self.pos = digits_start;
            return Err(self.err("a digit"));
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            is_float = true;
            self.pos += 1;
            if matches!(self.peek(), Some('-' | '+')) {
                self.pos += 1;
            }
            let exp_start = self.pos;
            while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
                self.pos += 1;
            }
            if self.pos == exp_start {
                return Err(self.err("exponent digits"));
            }
        }
        if matches!(self.peek(), Some(c) if c.is_alphanumeric() || c == '_') {
            return Err(self.err("the end of the number"));
        }
        let body: String = self.chars[digits_start..self.pos].iter().collect();
        let text = if neg { format!("-{body}") } else { body };
        if !is_float {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(PyValue::Int(i));
            }
        }
        text.parse::<f64>()
            .map(PyValue::Float)
            .map_err(|_| PyLitError {
                offset: start,
                expected: "a number".to_string(),
            })
    }

    pub(super) fn string(&mut self) -> Result<PyValue, PyLitError> {
        let mut s = self.one_string(false)?;
        self.concat_adjacent(&mut s)?;
        Ok(PyValue::Str(s))
    }

    /// Python joins adjacent string literals: `'a' "b"` is `'ab'`.
    fn concat_adjacent(&mut self, s: &mut String) -> Result<(), PyLitError> {
        loop {
            let save = self.pos;
            self.skip_ws();
            if matches!(self.peek(), Some('\'' | '"')) {
                s.push_str(&self.one_string(false)?);
            } else if let Some(raw) = self.string_prefix() {
                while !matches!(self.peek(), Some('\'' | '"')) {
                    self.pos += 1;
                }
                s.push_str(&self.one_string(raw)?);
            } else {
                self.pos = save;
                return Ok(());
            }
        }
    }

    /// One quoted string at the cursor (which is on the quote).
    fn one_string(&mut self, raw: bool) -> Result<String, PyLitError> {
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.err("a quote")),
        };
        let open = self.pos;
        self.pos += 1;
        if self.peek() == Some(quote) && self.peek_at(1) == Some(quote) {
            return Err(
                self.err("a single-quoted string (triple-quoted strings are not supported)")
            );
        }
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(PyLitError {
                    offset: open,
                    expected: format!("a closing `{quote}` for the string starting here"),
                });
            };
            if c == quote {
                self.pos += 1;
                return Ok(out);
            }
            if c == '\n' {
                return Err(self.err(format!("`{quote}` before the end of the line")));
            }
            if c != '\\' {
                out.push(c);
                self.pos += 1;
                continue;
            }
            // Backslash.
            let Some(e) = self.peek_at(1) else {
                self.pos += 1;
                return Err(self.err("a character after `\\`"));
            };
            if raw {
                // In raw strings the backslash stays, and it only protects the next char.
                out.push('\\');
                out.push(e);
                self.pos += 2;
                continue;
            }
            let esc_at = self.pos;
            self.pos += 2;
            match e {
                '\n' => {}
                '\\' => out.push('\\'),
                '\'' => out.push('\''),
                '"' => out.push('"'),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'a' => out.push('\u{07}'),
                'b' => out.push('\u{08}'),
                'f' => out.push('\u{0C}'),
                'v' => out.push('\u{0B}'),
                'x' => out.push(self.hex_escape(2, esc_at)?),
                'u' => out.push(self.hex_escape(4, esc_at)?),
                'U' => out.push(self.hex_escape(8, esc_at)?),
                '0'..='7' => {
                    let mut v = e.to_digit(8).unwrap_or(0);
                    for _ in 0..2 {
                        match self.peek().and_then(|c| c.to_digit(8)) {
                            Some(d) => {
                                v = v * 8 + d;
                                self.pos += 1;
                            }
                            None => break,
                        }
                    }
                    out.push(char::from_u32(v).unwrap_or('\u{FFFD}'));
                }
                // Python keeps unknown escapes verbatim.
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }

    fn hex_escape(&mut self, n: usize, esc_at: usize) -> Result<char, PyLitError> {
        let mut v: u32 = 0;
        for _ in 0..n {
            match self.peek().and_then(|c| c.to_digit(16)) {
                Some(d) => {
                    v = v * 16 + d;
                    self.pos += 1;
                }
                None => return Err(self.err(format!("{n} hex digits in the escape"))),
            }
        }
        char::from_u32(v).ok_or(PyLitError {
            offset: esc_at,
            expected: "an escape naming a valid Unicode character".to_string(),
        })
    }
}
