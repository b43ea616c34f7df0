//! Errors for bad input data: every one names the file, the line (when the format has
//! lines) and the field, plus what was expected, so a user can fix the input directly.

use std::fmt;

/// A located data error. `Display` gives `file:line: field `f`: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    /// The file the bad input came from (as the user named it).
    pub file: String,
    /// 1-based line number, when the format has lines.
    pub line: Option<usize>,
    /// The field or column, when one is to blame.
    pub field: Option<String>,
    /// What was wrong and what was expected.
    pub message: String,
}

impl DataError {
    /// An error about a whole file.
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        DataError {
            file: file.into(),
            line: None,
            field: None,
            message: message.into(),
        }
    }

    /// An error at a line and field of a file.
    pub fn at(
        file: impl Into<String>,
        line: Option<usize>,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        DataError {
            file: file.into(),
            line,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for DataError {}

/// Result alias for data parsing.
pub type DataResult<T> = Result<T, DataError>;
