//! `gpo loss` against the PyTorch reference (tools/reference/gpo_reference.py).
//!
//! Each folder under tests/fixtures/reference/ holds a PyTorch state_dict
//! (`weights.safetensors`), a padded batch in the official layout (`batch.safetensors`)
//! and the loss the reference computed in float64 (`expected.json`): the official reduction,
//! the mean over groups × padded target slots. CI has no torch: the committed fixtures are
//! the reference. Regenerate them as tools/reference/README.md says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

/// Every fixture folder, sorted; the two the reference is specified for must be there.
fn fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture_root())
        .expect("tests/fixtures/reference exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    for want in ["tiny", "official"] {
        assert!(
            dirs.iter().any(|d| d.file_name().unwrap() == want),
            "fixture `{want}` is missing from {}",
            fixture_root().display()
        );
    }
    dirs
}

fn expected(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn gpo_loss(weights: &Path, batch: &Path, heads: u64, composite: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpo"));
    cmd.arg("loss")
        .arg("--checkpoint")
        .arg(weights)
        .arg("--batch")
        .arg(batch)
        .arg("--heads")
        .arg(heads.to_string());
    if composite {
        cmd.arg("--composite");
    }
    cmd.output().expect("run gpo loss")
}

fn parse_loss(out: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpo loss failed ({}): stdout {stdout} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("loss="))
        .unwrap_or_else(|| panic!("no `loss=` line in {stdout:?}"));
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad loss {line:?}: {e}"))
}

fn check_fixtures(composite: bool) {
    for dir in fixtures() {
        let exp = expected(&dir);
        let want = exp["loss"].as_f64().expect("expected.json has `loss`");
        let heads = exp["config"]["nhead"]
            .as_u64()
            .expect("expected.json has config.nhead");
        let out = gpo_loss(
            &dir.join("weights.safetensors"),
            &dir.join("batch.safetensors"),
            heads,
            composite,
        );
        let got = parse_loss(&out);
        // The official loss is a mean over G × Nt_max slots; within 1e-5 relative.
        let tol = 1e-5 * want.abs();
        eprintln!(
            "{} (composite {composite}): gpo {got} reference f64 {want} f32 {} |diff| {:.3e}",
            dir.display(),
            exp["loss_f32"],
            (got - want).abs()
        );
        assert!(
            (got - want).abs() <= tol,
            "{} (composite {composite}): gpo loss {got}, reference {want} (tolerance {tol})",
            dir.display()
        );
    }
}

#[test]
fn loss_matches_pytorch_reference_fused() {
    check_fixtures(false);
}

#[test]
fn loss_matches_pytorch_reference_composite() {
    check_fixtures(true);
}

/// Writes a copy of `src` without the tensor `drop` (metadata is not kept).
fn copy_without(src: &Path, dst: &Path, drop: &str) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    assert_eq!(
        kept.len() + 1,
        st.len(),
        "{} has no tensor `{drop}`",
        src.display()
    );
    safetensors::serialize_to_file(kept, None, dst).unwrap();
}

fn assert_names_missing(fixture: &str, drop: &str) {
    let dir = fixture_root().join(fixture);
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("weights.safetensors");
    copy_without(&dir.join("weights.safetensors"), &weights, drop);
    for composite in [false, true] {
        let out = gpo_loss(&weights, &dir.join("batch.safetensors"), 4, composite);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "gpo loss accepted weights without `{drop}`"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("loss="),
            "gpo loss printed a loss without `{drop}`"
        );
        assert!(
            stderr.contains(&format!("missing parameter `{drop}`")),
            "error does not name the missing `{drop}`: {stderr}"
        );
    }
}

#[test]
fn missing_parameter_is_named() {
    assert_names_missing("official", "encoder.layers.3.linear2.bias");
    assert_names_missing("official", "encoder.layers.0.self_attn.in_proj_weight");
    assert_names_missing("tiny", "embedder.0.weight");
    assert_names_missing("tiny", "predictor.2.weight");
}

/// The config inference counts layers by `encoder.layers.{l}.linear1.weight` and embedder
/// depth by `embedder.{2k}.weight`, so dropping one of those from the *last* layer makes
/// it infer a smaller model and report the orphaned bias as "unexpected" instead.
#[test]
fn missing_last_layer_weight_is_named() {
    assert_names_missing("official", "encoder.layers.5.linear1.weight");
    assert_names_missing("official", "embedder.6.weight");
}
