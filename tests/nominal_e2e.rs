//! End to end on GlobalOpinionQA-style (nominal) data: groups answer different questions,
//! so each group draws its own permutation with padding, and alignment is 1 − JSD.

use gpo_core::data::{AnswerOption, Group, MetricKind, Question, Survey};
use gpo_core::io::dataset::write_native;
use gpo_core::io::store::StoreWriter;
use gpo_core::prompt::Template;
use gpo_core::rng::Rng;
use gpo_core::store::StoreMeta;
use std::process::Command;

fn nominal_survey(seed: u64) -> Survey {
    let mut r = Rng::new(seed);
    let questions: Vec<Question> = (0..60)
        .map(|i| Question {
            id: format!("q{i}"),
            text: format!(
                "In country surveys, question number {i} asks about topic {}.",
                i % 7
            ),
            options: (0..r.range(2, 4))
                .map(|k| AnswerOption {
                    text: format!("Answer {k} to {i}"),
                    ordinal: None,
                    refusal: false,
                })
                .collect(),
        })
        .collect();
    let groups: Vec<Group> = (0..8)
        .map(|g| Group {
            name: format!("Country {g}"),
        })
        .collect();
    let answers = (0..8)
        .map(|g| {
            questions
                .iter()
                .enumerate()
                .map(|(q, qq)| {
                    // Each country skips a different fifth of the questions.
                    ((q + g) % 5 != 0).then(|| {
                        let v: Vec<f32> = (0..qq.options.len())
                            .map(|_| r.f64() as f32 + 0.1)
                            .collect();
                        let s: f32 = v.iter().sum();
                        v.into_iter().map(|x| x / s).collect()
                    })
                })
                .collect()
        })
        .collect();
    Survey {
        name: "nominal".into(),
        metric: MetricKind::JensenShannon,
        questions,
        groups,
        answers,
    }
}

#[test]
fn trains_and_scores_nominal_data_with_jensen_shannon() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("global");
    let s = nominal_survey(1);
    write_native(&data, &s).unwrap();
    let meta = StoreMeta {
        embedder: "test-random".into(),
        template: "plain".into(),
        dim: 8,
        synthetic: true,
    };
    let mut w = StoreWriter::new(meta.clone());
    let mut r = Rng::new(2);
    for q in &s.questions {
        for k in 0..q.options.len() {
            let v: Vec<f32> = (0..8).map(|_| r.normal() as f32).collect();
            w.insert(meta.key(&Template::Plain.render(q, k)), &v)
                .unwrap();
        }
    }
    w.write(&data.join("embeddings")).unwrap();

    let out = dir.path().join("run");
    let res = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args([
            "train",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--group-split",
            "0.5",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["metric"], "jensen_shannon");
    for m in ["gpo", "uniform", "train_mean"] {
        let v = summary["methods"][m].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{m} = {v}");
    }
    // 4 held-out groups × (their answered questions − 20 context questions each).
    let answered: usize = summary["test_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let g = s.group_index(n.as_str().unwrap()).unwrap();
            s.answered(g).len() - 20
        })
        .sum();
    assert_eq!(summary["eval_pairs"].as_u64().unwrap() as usize, answered);
}
