//! The model variants of an experiment (`variants = [...]`): each trains as its own run per
//! (dataset, split, seed), and its results are folded into that run's record under the
//! method name `gpo+<variant>` (the faithful module stays `gpo`), so the report lists them
//! next to GPO and the baselines, which every variant's run scores identically.

use super::{FewShotPoint, RunRecord};
use gpo_core::model::Variant;
use std::collections::BTreeMap;

/// Renames GPO's entries of `m` (`gpo`) to `method`.
fn rename(m: &mut BTreeMap<String, f64>, method: &str) {
    if let Some(v) = m.remove("gpo") {
        m.insert(method.to_string(), v);
    }
}

/// Takes every `gpo+…` entry of `from` into `into`.
fn take_variants(into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>) {
    for (k, v) in from.iter().filter(|(k, _)| k.starts_with("gpo+")) {
        into.insert(k.clone(), *v);
    }
}

/// One record per (dataset, split, seed) and one curve point per (dataset, seed, k), with
/// each variant's GPO under `gpo+<variant>`. The first record of each run is the base (its
/// baselines, curves and details are the report's); records come in grid order.
pub fn merge(
    records: Vec<RunRecord>,
    curve: Vec<FewShotPoint>,
) -> (Vec<RunRecord>, Vec<FewShotPoint>) {
    let mut out: Vec<RunRecord> = Vec::new();
    for mut r in records {
        let method = r.variant.method();
        if r.variant != Variant::Faithful {
            rename(&mut r.summary.methods, &method);
            if let Some(v) = r.summary.validation.as_mut() {
                rename(v, &method);
            }
            rename(&mut r.lm_subset, &method);
        }
        let same = |b: &RunRecord| b.dataset == r.dataset && b.split == r.split && b.seed == r.seed;
        match out.iter_mut().find(|b| same(b)) {
            Some(base) => {
                take_variants(&mut base.summary.methods, &r.summary.methods);
                if let (Some(bv), Some(rv)) =
                    (base.summary.validation.as_mut(), &r.summary.validation)
                {
                    take_variants(bv, rv);
                }
                take_variants(&mut base.lm_subset, &r.lm_subset);
            }
            None => out.push(r),
        }
    }
    let mut points: Vec<FewShotPoint> = Vec::new();
    for mut p in curve {
        let variant = p.variant;
        if variant != Variant::Faithful {
            rename(&mut p.methods, &variant.method());
        }
        match points
            .iter_mut()
            .find(|b| b.dataset == p.dataset && b.seed == p.seed && b.k == p.k)
        {
            Some(base) => take_variants(&mut base.methods, &p.methods),
            None => points.push(p),
        }
    }
    (out, points)
}
