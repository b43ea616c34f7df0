//! Prompt templates: how a (question, option) pair becomes the text an LLM embeds.
//!
//! GPO's points are LLM embeddings of a question together with one of its answer options.
//! The exact text matters twice: it decides what the embedder sees, and (through
//! [`crate::store::text_key`]) it is part of the embedding's cache key. Templates are
//! therefore named, closed, and rendered in exactly one place.
//!
//! Three templates exist: `plain` for encoders, and the paper's two formats for decoder LLMs,
//! `alpaca` and `llama2-chat` (see [`Template::Alpaca`]). Adding one means adding a variant,
//! its entry in [`Template::ALL`], its arm in [`Template::name`] and in
//! [`Template::render`]; parsing, error messages and serde follow from those.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::data::Question;

/// A named way of rendering a (question, option) pair as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Template {
    /// `"{question text}\n{option text}"`: for encoders.
    Plain,
    /// The paper's Alpaca prompt (Stanford Alpaca's template with an input):
    ///
    /// ```text
    /// Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
    ///
    /// ### Instruction:
    /// Answer the following question by picking ONE of the given options
    ///
    /// ### Input:
    /// {question}
    ///
    /// Options:
    /// A. {first option}
    /// B. {second option}
    ///
    /// ### Response:
    /// B. {second option}
    /// ```
    ///
    /// The options listed are the question's non-refusal options (GPO's points), lettered in
    /// survey order; the rendered option follows the response marker with its letter.
    Alpaca,
    /// The Llama-2 chat format with the same instruction, input and answer:
    /// `"[INST] {instruction}\n\n{input} [/INST] {letter}. {option}"`. The tokenizer adds
    /// the BOS token, so the text carries no `<s>`.
    Llama2Chat,
}

/// The instruction of the paper's prompts.
pub const INSTRUCTION: &str = "Answer the following question by picking ONE of the given options";

/// Stanford Alpaca's preamble for prompts with an input.
const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";

/// Option letters: A…Z, then AA, AB, … (bijective base 26).
pub fn letter(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'A' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

impl Template {
    /// Every template, in the order error messages list them.
    pub const ALL: &'static [Template] = &[Template::Plain, Template::Alpaca, Template::Llama2Chat];

    /// The template's stable name, as used in configs and in embedding keys.
    pub fn name(&self) -> &'static str {
        match self {
            Template::Plain => "plain",
            Template::Alpaca => "alpaca",
            Template::Llama2Chat => "llama2-chat",
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
            Template::Alpaca => format!(
                "{ALPACA_PREAMBLE}\n\n### Instruction:\n{INSTRUCTION}\n\n### Input:\n{}\n\n### Response:\n{}",
                Self::input(q),
                Self::answer(q, option)
            ),
            Template::Llama2Chat => format!(
                "[INST] {INSTRUCTION}\n\n{} [/INST] {}",
                Self::input(q),
                Self::answer(q, option)
            ),
        }
    }

    /// `"{question}\n\nOptions:\nA. …\nB. …"` over the non-refusal options.
    fn input(q: &Question) -> String {
        let mut s = format!("{}\n\nOptions:", q.text);
        for (i, o) in q.answerable().enumerate() {
            s.push_str(&format!("\n{}. {}", letter(i), o.text));
        }
        s
    }

    /// `"{letter}. {option text}"`; the letter is the option's position among the
    /// non-refusal options (a refusal, which is never listed, gets the letters after them).
    fn answer(q: &Question, option: usize) -> String {
        let opt = &q.options[option];
        let before = q.options[..option]
            .iter()
            .filter(|o| o.refusal == opt.refusal)
            .count();
        let i = if opt.refusal {
            q.n_answerable() + before
        } else {
            before
        };
        format!("{}. {}", letter(i), opt.text)
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
    fn alpaca_is_the_papers_text_exactly() {
        let mut q = question();
        q.options.push(AnswerOption {
            text: "Refused".into(),
            ordinal: None,
            refusal: true,
        });
        let want = "Below is an instruction that describes a task, paired with an input that \
provides further context. Write a response that appropriately completes the request.\n\n\
### Instruction:\nAnswer the following question by picking ONE of the given options\n\n\
### Input:\nDo you agree?\n\nOptions:\nA. Yes\nB. No\n\n### Response:\nB. No";
        assert_eq!(Template::Alpaca.render(&q, 1), want);
        assert!(Template::Alpaca
            .render(&q, 0)
            .ends_with("### Response:\nA. Yes"));
        // The refusal is never listed.
        assert!(!Template::Alpaca.render(&q, 0).contains("Refused"));
        assert!(Template::Alpaca.render(&q, 2).ends_with("\nC. Refused"));
    }

    #[test]
    fn llama2_chat_wraps_the_same_prompt() {
        let q = question();
        assert_eq!(
            Template::Llama2Chat.render(&q, 0),
            "[INST] Answer the following question by picking ONE of the given options\n\n\
Do you agree?\n\nOptions:\nA. Yes\nB. No [/INST] A. Yes"
        );
    }

    #[test]
    fn letters_go_past_z() {
        assert_eq!(letter(0), "A");
        assert_eq!(letter(25), "Z");
        assert_eq!(letter(26), "AA");
        assert_eq!(letter(27), "AB");
        assert_eq!(letter(26 + 26 * 26), "AAA");
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
        assert!(e.contains("known: plain, alpaca, llama2-chat"), "{e}");
        assert_eq!(
            serde_json::to_string(&Template::Llama2Chat).unwrap(),
            "\"llama2-chat\""
        );
    }
}
