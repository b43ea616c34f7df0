//! The parsed value, [`PyValue`], and the typed accessors consumers read it with.
//!
//! Its own module because it is the part of the parser's API every consumer (OpinionQA,
//! GlobalOpinionQA, the weighted CSV) depends on, while the parsing itself is internal.

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
