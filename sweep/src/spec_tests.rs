//! Tests of [`super`] (kept apart so the module stays readable).
use super::*;

const GRID: &str = r#"
[sweep]
name = "g"
concurrent = 2
gang = 2
max_retries = 2
[train]
steps = 40
[train.model]
d_model = 32
[space]
lr = [1e-3, 3e-4]
seed = [0, 1, 2]
context = [[10, 20], [10, 50]]
"#;

#[test]
fn a_grid_is_every_combination_with_stable_ids_and_configs() {
    let s = SweepSpec::parse(GRID).unwrap();
    assert_eq!(
        (s.concurrent, s.gang, s.workers, s.max_retries),
        (2, 2, 4, 2)
    );
    let t = s.trials();
    assert_eq!(t.len(), 12);
    assert_eq!(t[0].id, "t0000");
    assert_eq!(t[11].id, "t0011");
    assert_eq!(t, SweepSpec::parse(GRID).unwrap().trials());
    let mut seen: Vec<String> = t.iter().map(|t| format!("{:?}", t.params)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 12, "no combination twice");
    let c = s.config(&t[5]).unwrap();
    assert_eq!(
        c["model"]["d_model"].as_integer(),
        Some(32),
        "the base stays"
    );
    assert_eq!(c["steps"].as_integer(), Some(40));
    let lr = c["adam"]["lr"].as_float().unwrap();
    assert!(lr == 1e-3 || lr == 3e-4);
    assert_eq!(c["sampler"]["min_ctx"].as_integer(), Some(10));
    assert!(c["sampler"]["max_ctx"].as_integer().is_some());
}

#[test]
fn random_search_draws_inside_each_range_and_is_seeded() {
    let text = r#"
[sweep]
search = "random"
samples = 50
seed = 7
[space]
lr = { log_uniform = [1e-4, 1e-2] }
group_split = { uniform = [0.4, 0.8] }
steps = { int = [10, 20] }
heads = [2, 4]
"#;
    let s = SweepSpec::parse(text).unwrap();
    let t = s.trials();
    assert_eq!(t.len(), 50);
    for tr in &t {
        let lr = tr.params["lr"].as_float().unwrap();
        assert!((1e-4..=1e-2).contains(&lr), "{lr}");
        let g = tr.params["group_split"].as_float().unwrap();
        assert!((0.4..=0.8).contains(&g));
        let st = tr.params["steps"].as_integer().unwrap();
        assert!((10..=20).contains(&st));
    }
    let steps: std::collections::BTreeSet<i64> = t
        .iter()
        .map(|t| t.params["steps"].as_integer().unwrap())
        .collect();
    assert!(steps.len() > 5, "draws spread: {steps:?}");
    assert_eq!(t, SweepSpec::parse(text).unwrap().trials());
    let other = SweepSpec::parse(&text.replace("seed = 7", "seed = 8")).unwrap();
    assert_ne!(t, other.trials());
}

#[test]
fn bad_files_are_refused_naming_the_section_and_key() {
    let cases = [
        ("[sweep]\nconcurent = 2", "[sweep] unknown key `concurent`"),
        (
            "[sweep]\ngang = 0",
            "[sweep] `gang` must be an integer of at least 1",
        ),
        ("[sweep]\ngang = 3\nworkers = 2", "smaller than one gang"),
        ("[space]\nlr = []", "[space] `lr`: an empty list"),
        (
            "[space]\nlr = { uniform = [0, 1] }",
            "needs search = \"random\"",
        ),
        (
            "[sweep]\nsearch=\"random\"\n[space]\nlr = { uniform = [1, 0] }",
            "`uniform` needs low <= high",
        ),
        (
            "[sweep]\nsearch=\"random\"\n[space]\nlr = { normal = [0, 1] }",
            "unknown distribution `normal`",
        ),
        (
            "[space]\ndataset = [\"x\"]",
            "[space] `dataset`: \"x\" is not one of",
        ),
        (
            "[early_stopping]\nrule = \"asha\"\nreduction = 1",
            "`reduction` must be a number above 1",
        ),
        (
            "[early_stopping]\nrule = \"median\"\nreduction = 2",
            "`reduction` does not apply",
        ),
        (
            "[sweep]\nmetric = \"loss\"",
            "`metric` must be \"validation\" or \"test\"",
        ),
        ("[trian]\nsteps = 1", "unknown section `trian`"),
        (
            "[[datasets]]\nname = \"a\"\n[[datasets]]\nname = \"a\"",
            "dataset name `a` is used twice",
        ),
    ];
    for (text, want) in cases {
        let e = SweepSpec::parse(text).unwrap_err();
        assert!(e.contains(want), "{text:?}: {e}");
    }
    let s = SweepSpec::parse("[space]\ncontext = [10, 20]").unwrap();
    let e = s.config(&s.trials()[0]).unwrap_err();
    assert!(
        e.contains("[space] `context` takes [min, max] pairs"),
        "{e}"
    );
}

#[test]
fn datasets_and_embedders_are_chosen_by_name() {
    let text = r#"
[[datasets]]
name = "a"
data = "a.csv"
[[datasets]]
name = "b"
data = "b.csv"
[[embedders]]
name = "minilm"
model = "m"
[space]
dataset = ["a", "b"]
embedder = ["minilm"]
"#;
    let s = SweepSpec::parse(text).unwrap();
    let t = s.trials();
    assert_eq!(t.len(), 2);
    assert_eq!(s.dataset(&t[1]).unwrap().name, "b");
    assert_eq!(s.embedder(&t[1]).unwrap().template, "plain");
    assert!(s.config(&t[0]).unwrap().get("dataset").is_none());
}
