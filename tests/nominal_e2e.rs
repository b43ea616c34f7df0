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

/// `gpo train` for 4 steps on `data` into `out`, with `extra` flags; it must succeed.
fn train_small(data: &std::path::Path, out: &std::path::Path, extra: &[&str]) {
    let res = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args([
            "train",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--group-split",
            "0.5",
        ])
        .args(extra)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
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
    train_small(&data, &out, &[]);
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

    // Two workers see only their own episodes, whose questions differ: the coordinator
    // names the step's padded target width, and the result is the single process's.
    let out2 = dir.path().join("run2");
    train_small(&data, &out2, &["--workers", "2"]);
    let tensors = |p: &std::path::Path| {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        b[8 + n..].to_vec()
    };
    assert!(
        tensors(&out.join("last.safetensors")) == tensors(&out2.join("last.safetensors")),
        "2 workers ended with other parameters than one process"
    );
}

/// A GlobalOpinionQA CSV as published: three-decimal distributions (sums 0.999–1.001),
/// an all-zero row, Windows line endings, and two countries that answered fewer questions
/// than the evaluation's 20 context questions. `gpo train` loads it (renormalizing and
/// warning), skips such countries from evaluation with a note instead of stopping, selects
/// the checkpoint on validation groups and reports both scores.
#[test]
fn published_global_csv_with_thin_countries_trains_with_validation_selection() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("global.csv");
    let mut text = String::from("question,selections,options,source\r\n");
    let countries: Vec<String> = (0..8).map(|c| format!("Country {c}")).collect();
    for q in 0..40 {
        let mut sel = Vec::new();
        for (c, name) in countries.iter().enumerate() {
            if c >= 6 && q >= 10 {
                continue; // thin countries: 10 answered questions
            }
            let d = match (q + c) % 4 {
                0 => "[0.333, 0.333, 0.333]".to_string(),
                1 => "[0.251, 0.25, 0.5]".to_string(),
                2 if q == 5 && c == 1 => "[0.0, 0.0, 0.0]".to_string(),
                _ => format!(
                    "[{:.3}, {:.3}, 0.5]",
                    0.1 + 0.01 * c as f64,
                    0.4 - 0.01 * c as f64
                ),
            };
            sel.push(format!("'{name}': {d}"));
        }
        text.push_str(&format!(
            "\"Question {q} about topic {}?\",\"defaultdict(<class 'list'>, {{{}}})\",\"['Yes', 'No', 'Maybe']\",WVS\r\n",
            q % 5,
            sel.join(", ")
        ));
    }
    std::fs::write(&csv, &text).unwrap();
    let s = gpo_core::data::global::parse(&text, "global.csv").unwrap();
    let meta = StoreMeta {
        embedder: "test-random".into(),
        template: "plain".into(),
        dim: 8,
        synthetic: true,
    };
    let mut w = StoreWriter::new(meta.clone());
    let mut r = Rng::new(3);
    for q in &s.questions {
        for k in 0..q.options.len() {
            let v: Vec<f32> = (0..8).map(|_| r.normal() as f32).collect();
            w.insert(meta.key(&Template::Plain.render(q, k)), &v)
                .unwrap();
        }
    }
    let store = dir.path().join("embeddings");
    w.write(&store).unwrap();

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
        ])
        .arg("--data")
        .arg(&csv)
        .arg("--embeddings")
        .arg(&store)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("global.csv:7: country `Country 1`: the distribution is all zero"),
        "{stderr}"
    );
    assert!(stderr.contains("renormalized"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["selection"], "validation");
    let names = |k: &str| -> Vec<String> {
        summary[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (train, val, test) = (
        names("train_groups"),
        names("validation_groups"),
        names("test_groups"),
    );
    assert_eq!(val.len(), 1, "{summary}");
    assert!(summary["validation"]["gpo"].as_f64().is_some(), "{summary}");
    let notes = names("plan_notes");
    for thin in ["Country 6", "Country 7"] {
        assert!(!test.contains(&thin.to_string()) && !val.contains(&thin.to_string()));
        if !train.contains(&thin.to_string()) {
            assert!(
                notes
                    .iter()
                    .any(|n| n.contains(&format!("`{thin}` answered 10 questions"))),
                "{notes:?}"
            );
        }
    }
    assert!(summary["no_train_answer_pairs"].as_u64().is_some());
    let hist = summary["eval_history"].as_array().unwrap();
    assert!(hist.iter().all(|e| e["validation"].as_f64().is_some()));
}
