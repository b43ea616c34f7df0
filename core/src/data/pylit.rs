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

use std::fmt;

/// A parsed Python literal.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in `i64` (larger ones are read as [`PyValue::Float`]).
    Int(i64),
    /// A float, including `nan` and `inf`.
    Float(f64),
    /// A string, escapes resolved.
    Str(String),
    /// `[a, b, ...]`.
    List(Vec<PyValue>),
    /// `(a, b, ...)`, including `()` and `(a,)`.
    Tuple(Vec<PyValue>),
    /// `{k: v, ...}` (also `defaultdict(..., {...})`), entries in source order.
    Dict(Vec<(PyValue, PyValue)>),
}

impl PyValue {
    /// The Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float(_) => "float",
            PyValue::Str(_) => "str",
            PyValue::List(_) => "list",
            PyValue::Tuple(_) => "tuple",
            PyValue::Dict(_) => "dict",
        }
    }

    /// The string, if this is a `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number as `f64`, if this is an `int` or a `float` (NaN included).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            PyValue::Int(i) => Some(i as f64),
            PyValue::Float(f) => Some(f),
            _ => None,
        }
    }

    /// The items, if this is a list or a tuple.
    pub fn as_seq(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The entries, if this is a dict.
    pub fn as_dict(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(v) => Some(v),
            _ => None,
        }
    }

    /// A list/tuple of strings, or a message saying what was wrong.
    pub fn to_str_list(&self) -> Result<Vec<String>, String> {
        let items = self
            .as_seq()
            .ok_or_else(|| format!("expected a list of strings, found a {}", self.type_name()))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("item {i} is a {}, expected a string", v.type_name()))
            })
            .collect()
    }

    /// A list/tuple of numbers (NaN and infinities kept), or a message saying what was wrong.
    pub fn to_f64_list(&self) -> Result<Vec<f64>, String> {
        let items = self
            .as_seq()
            .ok_or_else(|| format!("expected a list of numbers, found a {}", self.type_name()))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .ok_or_else(|| format!("item {i} is a {}, expected a number", v.type_name()))
            })
            .collect()
    }
}

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

/// Nesting limit, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 256;

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn err(&self, expected: impl Into<String>) -> PyLitError {
        PyLitError {
            offset: self.pos,
            expected: expected.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<(), PyLitError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("`{c}`")))
        }
    }

    fn value(&mut self) -> Result<PyValue, PyLitError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err(format!("at most {MAX_DEPTH} levels of nesting")));
        }
        let v = self.value_inner();
        self.depth -= 1;
        v
    }

    fn value_inner(&mut self) -> Result<PyValue, PyLitError> {
        match self.peek() {
            None => Err(self.err("a value")),
            Some('\'' | '"') => self.string(),
            Some('[') => {
                self.pos += 1;
                Ok(PyValue::List(self.items(']')?))
            }
            Some('(') => self.tuple(),
            Some('{') => self.dict(),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => self.number(),
            Some(c) if c.is_alphabetic() || c == '_' => self.word(),
            Some(_) => {
                Err(self.err("a value (string, number, list, tuple, dict, None, True or False)"))
            }
        }
    }

    /// Comma-separated values up to `close`, trailing comma allowed; the opener is consumed.
    fn items(&mut self, close: char) -> Result<Vec<PyValue>, PyLitError> {
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(close) {
                return Ok(out);
            }
            out.push(self.value()?);
            self.skip_ws();
            if self.eat(',') {
                continue;
            }
            if self.eat(close) {
                return Ok(out);
            }
            return Err(self.err(format!("`,` or `{close}`")));
        }
    }

    fn tuple(&mut self) -> Result<PyValue, PyLitError> {
        self.expect('(')?;
        let mut out = Vec::new();
        let mut saw_comma = false;
        loop {
            self.skip_ws();
            if self.eat(')') {
                break;
            }
            out.push(self.value()?);
            self.skip_ws();
            if self.eat(',') {
                saw_comma = true;
                continue;
            }
            if self.eat(')') {
                break;
            }
            return Err(self.err("`,` or `)`"));
        }
        // `(x)` is just a parenthesized value; `()` and `(x,)` are tuples.
        if out.len() == 1 && !saw_comma {
            return Ok(out.pop().unwrap_or(PyValue::None));
        }
        Ok(PyValue::Tuple(out))
    }

    fn dict(&mut self) -> Result<PyValue, PyLitError> {
        self.expect('{')?;
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            if self.eat('}') {
                return Ok(PyValue::Dict(out));
            }
            let k = self.value()?;
            self.skip_ws();
            if !self.eat(':') {
                return Err(self.err("`:` after a dict key (sets are not supported)"));
            }
            self.skip_ws();
            let v = self.value()?;
            out.push((k, v));
            self.skip_ws();
            if self.eat(',') {
                continue;
            }
            if self.eat('}') {
                return Ok(PyValue::Dict(out));
            }
            return Err(self.err("`,` or `}`"));
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_alphanumeric() || c == '_' || c == '.') {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    fn word(&mut self) -> Result<PyValue, PyLitError> {
        let start = self.pos;
        // String prefixes: u'..', r'..', ur/ru variants.
        if let Some(q) = self.string_prefix() {
            return self.string_with_prefix(q);
        }
        let w = self.ident();
        match w.as_str() {
            "None" => Ok(PyValue::None),
            "True" => Ok(PyValue::Bool(true)),
            "False" => Ok(PyValue::Bool(false)),
            "nan" | "NaN" => Ok(PyValue::Float(f64::NAN)),
            "inf" | "Infinity" => Ok(PyValue::Float(f64::INFINITY)),
            "defaultdict" => self.defaultdict(),
            _ if is_numpy_scalar(&w) => self.numpy_scalar(),
            _ => {
                self.pos = start;
                Err(self.err("a value (string, number, list, tuple, dict, None, True or False)"))
            }
        }
    }

    /// If a string prefix (`u`, `r`, `ur`, `ru`, any case) followed by a quote starts here,
    /// returns whether it is raw, without consuming anything.
    fn string_prefix(&self) -> Option<bool> {
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

    fn string_with_prefix(&mut self, raw: bool) -> Result<PyValue, PyLitError> {
        while !matches!(self.peek(), Some('\'' | '"')) {
            self.pos += 1;
        }
        let mut s = self.one_string(raw)?;
        self.concat_adjacent(&mut s)?;
        Ok(PyValue::Str(s))
    }

    /// `defaultdict(<class 'list'>, {...})` (after the word): the dict.
    fn defaultdict(&mut self) -> Result<PyValue, PyLitError> {
        self.skip_ws();
        self.expect('(')?;
        self.skip_ws();
        if self.eat('<') {
            // `<class 'list'>` or `<function <lambda> at 0x...>`: skip to the matching `>`.
            let mut depth = 1;
            while depth > 0 {
                match self.peek() {
                    None => return Err(self.err("`>` closing the default factory")),
                    Some('<') => depth += 1,
                    Some('>') => depth -= 1,
                    Some(_) => {}
                }
                self.pos += 1;
            }
        } else if self.peek() == Some('N') {
            // defaultdict(None, {...})
            let w = self.ident();
            if w != "None" {
                return Err(self.err("a default factory such as `<class 'list'>`"));
            }
        } else {
            return Err(self.err("a default factory such as `<class 'list'>`"));
        }
        self.skip_ws();
        self.expect(',')?;
        self.skip_ws();
        if self.peek() != Some('{') {
            return Err(self.err("`{` starting the defaultdict's entries"));
        }
        let d = self.value()?;
        self.skip_ws();
        self.expect(')')?;
        Ok(d)
    }

    /// `np.float64(0.5)` and friends (after the name): the inner value.
    fn numpy_scalar(&mut self) -> Result<PyValue, PyLitError> {
        self.skip_ws();
        self.expect('(')?;
        self.skip_ws();
        let v = self.value()?;
        self.skip_ws();
        self.expect(')')?;
        Ok(v)
    }

    fn number(&mut self) -> Result<PyValue, PyLitError> {
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

    fn string(&mut self) -> Result<PyValue, PyLitError> {
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

fn is_numpy_scalar(name: &str) -> bool {
    let base = name
        .strip_prefix("np.")
        .or_else(|| name.strip_prefix("numpy."));
    matches!(
        base,
        Some(
            "float64"
                | "float32"
                | "float16"
                | "int64"
                | "int32"
                | "int16"
                | "int8"
                | "uint64"
                | "uint32"
                | "uint16"
                | "uint8"
                | "str_"
                | "bool_"
        )
    )
}

#[cfg(test)]
mod tests;
