//! Named group sets: the paper's OpinionQA and GlobalOpinionQA groups, and "all".
//!
//! The paper's OpinionQA set has 22 groups; the five religion groups have no counts in the
//! OpinionQA release we load, so the preset holds the other 17.

use crate::data::Survey;

/// The paper's OpinionQA groups that the counts layout has, as `ATTR:value` names.
pub const OPINIONQA_PAPER: [&str; 17] = [
    "CREGION:Northeast",
    "CREGION:South",
    "SEX:Female",
    "SEX:Male",
    "EDUCATION:College graduate/some postgrad",
    "EDUCATION:Less than high school",
    "POLPARTY:Democrat",
    "POLPARTY:Republican",
    "INCOME:$100,000 or more",
    "INCOME:Less than $30,000",
    "POLIDEOLOGY:Conservative",
    "POLIDEOLOGY:Liberal",
    "POLIDEOLOGY:Moderate",
    "RACE:Asian",
    "RACE:Black",
    "RACE:Hispanic",
    "RACE:White",
];

/// The paper's GlobalOpinionQA countries.
pub const GLOBALQA_PAPER: [&str; 14] = [
    "Nigeria",
    "Egypt",
    "India (Current national sample)",
    "China",
    "Japan",
    "Germany",
    "France",
    "Spain",
    "United States",
    "Canada",
    "Brazil",
    "Argentina",
    "Australia",
    "New Zealand",
];

/// Preset names accepted by [`resolve`].
pub const NAMES: [&str; 3] = ["all", "opinionqa-paper", "globalqa-paper"];

/// Group indices of a preset in a survey; every named group must exist.
pub fn resolve(s: &Survey, preset: &str) -> Result<Vec<usize>, String> {
    let names: &[&str] = match preset {
        "all" => return Ok((0..s.groups.len()).collect()),
        "opinionqa-paper" => &OPINIONQA_PAPER,
        "globalqa-paper" => &GLOBALQA_PAPER,
        other => {
            return Err(format!(
                "unknown group preset `{other}` (known: {})",
                NAMES.join(", ")
            ))
        }
    };
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| s.group_index(n).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "preset `{preset}`: dataset `{}` has no group(s) {}",
            s.name,
            missing.join(", ")
        ));
    }
    Ok(names.iter().filter_map(|n| s.group_index(n)).collect())
}

/// The survey restricted to the given groups (in that order).
pub fn restrict(s: &Survey, groups: &[usize]) -> Survey {
    Survey {
        name: s.name.clone(),
        metric: s.metric,
        questions: s.questions.clone(),
        groups: groups.iter().map(|&g| s.groups[g].clone()).collect(),
        answers: groups.iter().map(|&g| s.answers[g].clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{generate, SynthConfig};

    #[test]
    fn presets_resolve_and_restrict() {
        let s = generate(&SynthConfig {
            n_questions: 12,
            n_groups: 5,
            ..Default::default()
        })
        .survey;
        assert_eq!(resolve(&s, "all").unwrap(), vec![0, 1, 2, 3, 4]);
        let e = resolve(&s, "opinionqa-paper").unwrap_err();
        assert!(e.contains("SEX:Female"), "{e}");
        assert!(resolve(&s, "nope").unwrap_err().contains("known"));
        let r = restrict(&s, &[3, 1]);
        assert_eq!(r.groups[0], s.groups[3]);
        assert_eq!(r.answers[1], s.answers[1]);
        assert!(r.validate().is_ok());
    }
}
