//! Prompt templates: how a (question, option) pair becomes the text an LLM embeds.
//!
//! GPO's points are LLM embeddings of a question together with one of its answer options.
//! The exact text matters twice: it decides what the embedder sees, and (through
//! [`crate::store::text_key`]) it is part of the embedding's cache key. Templates are
//! therefore named, closed, and rendered in exactly one place.
//!
//! Adding a template (e.g. the paper's Alpaca or Llama-2 chat formats) means adding a
//! variant, its entry in [`Template::ALL`], its arm in [`Template::name`] and in
//! [`Template::render`]; parsing, error messages and serde follow from those.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::data::Question;

/// A named way of rendering a (question, option) pair as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Template {
    /// `"{question text}\n{option text}"`.
    Plain,
}

impl Template {
    /// Every template, in the order error messages list them.
    pub const ALL: &'static [Template] = &[Template::Plain];

    /// The template's stable name, as used in configs and in embedding keys.
    pub fn name(&self) -> &'static str {
        match self {
            Template::Plain => "plain",
        }
    }

    /// The template called `name`; the error lists the known names.
    pub fn parse(name: &str) -> Result<Template, String> {
        Template::ALL
            .iter()
            .copied()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Template::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown prompt template `{name}` (known: {})",
                    known.join(", ")
                )
            })
    }

    /// The text to embed for option `option` of `q`, where `option` indexes `q.options`
    /// (refusals included, though callers normally only render answerable options).
    ///
    /// # Panics
    /// If `option >= q.options.len()`, like slice indexing: the index is computed by the
    /// caller from `q` itself, never read from input.
    pub fn render(&self, q: &Question, option: usize) -> String {
        let opt = &q.options[option];
        match self {
            Template::Plain => format!("{}\n{}", q.text, opt.text),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

impl TryFrom<String> for Template {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Template::parse(&s)
    }
}

impl From<Template> for String {
    fn from(t: Template) -> String {
        t.name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::AnswerOption;

    fn question() -> Question {
        Question {
            id: "Q1".into(),
            text: "Do you agree?".into(),
            options: vec![
                AnswerOption {
                    text: "Yes".into(),
                    ordinal: Some(1.0),
                    refusal: false,
                },
                AnswerOption {
                    text: "No".into(),
                    ordinal: Some(2.0),
                    refusal: false,
                },
            ],
        }
    }

    #[test]
    fn plain_renders_question_then_option() {
        let q = question();
        assert_eq!(Template::Plain.render(&q, 0), "Do you agree?\nYes");
        assert_eq!(Template::Plain.render(&q, 1), "Do you agree?\nNo");
    }

    #[test]
    fn names_round_trip_and_unknown_lists_known() {
        for &t in Template::ALL {
            assert_eq!(Template::parse(t.name()), Ok(t));
            assert_eq!(t.to_string().parse::<Template>(), Ok(t));
        }
        let e = Template::parse("alpaca-ish").unwrap_err();
        assert!(e.contains("alpaca-ish") && e.contains("plain"), "{e}");
    }

    #[test]
    fn serde_uses_the_name() {
        assert_eq!(
            serde_json::to_string(&Template::Plain).unwrap(),
            "\"plain\""
        );
        let t: Template = serde_json::from_str("\"plain\"").unwrap();
        assert_eq!(t, Template::Plain);
        let e = serde_json::from_str::<Template>("\"nope\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("known: plain"), "{e}");
    }
}
