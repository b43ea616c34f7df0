//! The parser's cursor over the input's characters and the grammar of values: dispatch,
//! lists, tuples, dicts, the bare words (`None`, `True`, `nan`, ...) and the
//! `defaultdict(...)` / numpy-scalar wrappers.
//!
//! Its own module so the structure of a literal (what nests in what) reads apart from the
//! character-level lexing of strings and numbers in `literals`.

use super::{PyLitError, PyValue};

/// Nesting limit, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 256;

/// The parse state: the input as characters (so offsets count characters), the cursor and
/// the current nesting depth.
pub(super) struct Parser {
    pub(super) chars: Vec<char>,
    pub(super) pos: usize,
    pub(super) depth: usize,
}

impl Parser {
    pub(super) fn err(&self, expected: impl Into<String>) -> PyLitError {
        PyLitError {
            offset: self.pos,
            expected: expected.into(),
        }
    }

    pub(super) fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    pub(super) fn peek_at(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).copied()
    }

    pub(super) fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_whitespace()) {
            self.pos += 1;
        }
    }

    pub(super) fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    pub(super) fn expect(&mut self, c: char) -> Result<(), PyLitError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("`{c}`")))
        }
    }

    pub(super) fn value(&mut self) -> Result<PyValue, PyLitError> {
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

    pub(super) fn ident(&mut self) -> String {
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
