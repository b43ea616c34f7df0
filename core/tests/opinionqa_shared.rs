//! Loads the real OpinionQA counts in the shared data folder (never copied into the repo),
//! because the parser's rules are only proven against the real files' quirks. Fails when
//! the folder is missing, unless `GPO_SKIP_SHARED_DATA=1`.

use std::path::PathBuf;

use gpo_core::data::{MetricKind, Survey};
use gpo_core::io::dataset::{self, Format};

fn human_resp() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/opinionqa/human_resp"
    ));
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("GPO_SKIP_SHARED_DATA").as_deref() == Ok("1") {
        eprintln!(
            "skipping: {} is missing and GPO_SKIP_SHARED_DATA=1",
            p.display()
        );
        return None;
    }
    panic!(
        "shared OpinionQA data missing at {}; set GPO_SKIP_SHARED_DATA=1 to skip this test",
        p.display()
    );
}

fn dist(s: &Survey, group: &str, qid: &str) -> Option<Vec<f32>> {
    let g = s
        .group_index(group)
        .unwrap_or_else(|| panic!("no group {group}"));
    let q = s
        .questions
        .iter()
        .position(|q| q.id == qid)
        .unwrap_or_else(|| panic!("no question {qid}"));
    s.answers[g][q].clone()
}

fn close(a: &[f32], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-6)
}

#[test]
fn loads_all_waves() {
    let Some(dir) = human_resp() else { return };
    assert_eq!(dataset::detect(&dir).unwrap(), Format::OpinionQa);
    let s = dataset::load(&dir).unwrap();
    assert_eq!(s.metric, MetricKind::Wasserstein);
    assert_eq!(s.groups.len(), 34);
    assert_eq!(s.questions.len(), 684);
    s.validate().unwrap();
    for name in [
        "SEX:Female",
        "SEX:Male",
        "AGE:65+",
        "EDUCATION:Associate's degree",
        "INCOME:$100,000 or more",
        "RACE:Mixed Race",
    ] {
        assert!(s.group_index(name).is_some(), "missing group {name}");
    }
    for bad in ["AGE:nan", "INCOME:Refused", "POLPARTY:Other", "RACE:Other"] {
        assert!(s.group_index(bad).is_none(), "{bad} should be left out");
    }
    let mut ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 684, "question ids unique");

    // Counts from SEX_data.json: Very safe 510, Somewhat 1243, Not too 289, Not at all 62,
    // Refused 6 (dropped).
    let d = dist(&s, "SEX:Female", "SAFECRIME_W26").unwrap();
    let n = 510.0 + 1243.0 + 289.0 + 62.0;
    assert!(
        close(&d, &[510.0 / n, 1243.0 / n, 289.0 / n, 62.0 / n]),
        "{d:?}"
    );
    // Option texts with commas and apostrophes come from info.csv, not MC_options.
    let gun = s.questions.iter().find(|q| q.id == "GUN_W26").unwrap();
    assert_eq!(gun.options[1].text, "No, I don't own any guns");
    assert_eq!(gun.n_answerable(), 2);
    // "neither better noR worse ..." in the counts matches the reference case-insensitively.
    let d = dist(&s, "SEX:Female", "POLICY3_W42").unwrap();
    let n = 1138.0 + 115.0 + 1231.0;
    assert!(close(&d, &[1138.0 / n, 115.0 / n, 1231.0 / n]), "{d:?}");
    // Options past the ordinal list ("Not sure") are refusals, as in OpinionQA.
    let q = s.questions.iter().find(|q| q.id == "WANTMOVE_W32").unwrap();
    assert_eq!(q.n_answerable(), 2);
    assert!(q.options[2].refusal && q.options[2].text == "Not sure");
    // Every group answers every question, except Mixed Race in wave 43 (empty counts).
    let mixed = s.group_index("RACE:Mixed Race").unwrap();
    for (g, row) in s.answers.iter().enumerate() {
        for (qi, a) in row.iter().enumerate() {
            let w43 = s.questions[qi].id.ends_with("_W43");
            assert_eq!(
                a.is_none(),
                g == mixed && w43,
                "group {} question {}",
                s.groups[g].name,
                s.questions[qi].id
            );
        }
    }
}

#[test]
fn loads_one_wave_and_round_trips_native() {
    let Some(dir) = human_resp() else { return };
    let w = dir.join("American_Trends_Panel_W26");
    let s = dataset::load(&w).unwrap();
    s.validate().unwrap();
    assert_eq!(s.questions.len(), 22);
    assert_eq!(s.groups.len(), 34);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("w26");
    dataset::write_native(&out, &s).unwrap();
    assert_eq!(dataset::load(&out).unwrap(), s);
}

#[test]
fn disagreement_folder_is_not_a_counts_wave() {
    let Some(dir) = human_resp() else { return };
    let d = dir.join("Pew_American_Trends_Panel_disagreement_500");
    assert!(dataset::load(&d).is_err());
}

#[test]
fn the_papers_opinionqa_preset_resolves_on_the_shared_data() {
    if std::env::var_os("GPO_SKIP_SHARED_DATA").is_some() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/opinionqa/human_resp");
    let s = gpo_core::io::dataset::load(&dir).unwrap();
    let groups = gpo_core::presets::resolve(&s, "opinionqa-paper").unwrap();
    assert_eq!(groups.len(), 17);
}
