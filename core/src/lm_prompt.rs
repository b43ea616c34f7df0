//! The LLM baselines' prompts, rendered in one place (pure text, no model).
//!
//! The paper's LM baseline reads an LLM's next-token probabilities over the option letters
//! after a multiple-choice prompt, renormalized over the options. Three prompts share one
//! question block:
//!
//! ```text
//! Question: {question}
//! A. {first non-refusal option}
//! B. {second}
//! Answer:
//! ```
//!
//! - `lm_base`: the block alone;
//! - `lm_steered`: a persona line first, `Answer as if you were {group}.`, then a blank line;
//! - `few_shot`: the group's context questions first, each block closed by its answer
//!   distribution in percentages (`Answer: A. 35%, B. 65%`) and a blank line.
//!
//! The scored continuations are the letters with a leading space (`" A"`, `" B"`, …), the
//! token a model writes after `Answer:`. Prefixes end before the whitespace that joins them
//! to what follows, so a prefix tokenized on its own is a prefix of the joint tokenization in
//! byte-level BPE (callers still check).

use crate::data::Question;
use crate::prompt::letter;

/// `"Question: …\nA. …\nB. …\nAnswer:"` for the non-refusal options.
pub fn question(q: &Question) -> String {
    let mut s = format!("Question: {}", q.text);
    for (i, o) in q.answerable().enumerate() {
        s.push_str(&format!("\n{}. {}", letter(i), o.text));
    }
    s.push_str("\nAnswer:");
    s
}

/// The persona line of `lm_steered` (the prompt then continues with `"\n\n"` and the
/// question): `Answer as if you were {group}.` An OpinionQA name `ATTRIBUTE:Value` reads as
/// `Value (attribute)`, e.g. `Democrat (political party)`.
pub fn persona(group: &str) -> String {
    format!("Answer as if you were {}.", describe_group(group))
}

/// A group name as prose: OpinionQA's `ATTRIBUTE:Value` becomes `Value (attribute)` with the
/// attribute in words; any other name is kept.
pub fn describe_group(name: &str) -> String {
    let Some((attr, value)) = name.split_once(':') else {
        return name.to_string();
    };
    let words = match attr.trim() {
        "CREGION" => "region",
        "POLPARTY" => "political party",
        "POLIDEOLOGY" => "political ideology",
        "EDUCATION" => "education",
        "INCOME" => "income",
        "RACE" => "race or ethnicity",
        "SEX" => "sex",
        "AGE" => "age",
        "RELIG" => "religion",
        "RELIGATTEND" => "religious attendance",
        "CITIZEN" => "citizenship",
        "MARITAL" => "marital status",
        other => {
            return format!(
                "{} ({})",
                value.trim(),
                other.to_lowercase().replace('_', " ")
            )
        }
    };
    format!("{} ({words})", value.trim())
}

/// One answered context question of `few_shot`: the question block, then the group's
/// distribution over its non-refusal options in whole percentages.
pub fn shot(q: &Question, dist: &[f32]) -> String {
    let total: f64 = dist.iter().map(|&p| p as f64).sum();
    let parts: Vec<String> = dist
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let pct = if total > 0.0 {
                100.0 * p as f64 / total
            } else {
                0.0
            };
            format!("{}. {:.0}%", letter(i), pct)
        })
        .collect();
    format!("{} {}", question(q), parts.join(", "))
}

/// The separator between prompt parts.
pub const SEP: &str = "\n\n";

/// The few-shot prefix: `shots` joined by [`SEP`] (the target question follows after one
/// more [`SEP`]).
pub fn few_shot_prefix<'a>(shots: impl IntoIterator<Item = (&'a Question, &'a [f32])>) -> String {
    shots
        .into_iter()
        .map(|(q, d)| shot(q, d))
        .collect::<Vec<_>>()
        .join(SEP)
}

/// The scored continuations for `n` options: `" A"`, `" B"`, ….
pub fn answer_letters(n: usize) -> Vec<String> {
    (0..n).map(|i| format!(" {}", letter(i))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::AnswerOption;

    fn q() -> Question {
        let o = |t: &str, r: bool| AnswerOption {
            text: t.into(),
            ordinal: None,
            refusal: r,
        };
        Question {
            id: "Q".into(),
            text: "Is it good?".into(),
            options: vec![o("Yes", false), o("No", false), o("Refused", true)],
        }
    }

    #[test]
    fn renders_the_documented_prompts() {
        assert_eq!(
            question(&q()),
            "Question: Is it good?\nA. Yes\nB. No\nAnswer:"
        );
        assert_eq!(persona("Democrat"), "Answer as if you were Democrat.");
        assert_eq!(
            persona("POLPARTY:Democrat"),
            "Answer as if you were Democrat (political party)."
        );
        assert_eq!(describe_group("NEW_ATTR:x"), "x (new attr)");
        assert_eq!(
            shot(&q(), &[0.354, 0.646]),
            "Question: Is it good?\nA. Yes\nB. No\nAnswer: A. 35%, B. 65%"
        );
        let qq = q();
        let d1 = [0.5f32, 0.5];
        let d2 = [1.0f32, 0.0];
        assert_eq!(
            few_shot_prefix([(&qq, &d1[..]), (&qq, &d2[..])]),
            format!("{}{SEP}{}", shot(&qq, &d1), shot(&qq, &d2))
        );
        assert_eq!(answer_letters(3), vec![" A", " B", " C"]);
    }
}
