//! The search space: one dimension per swept key, and how a trial's value is drawn.
//!
//! Why it exists: a grid and a random search share the parsing of a dimension and differ in
//! how they pick from it; random draws are a pure function of (seed, trial, dimension), so
//! a trial's values never depend on the other trials or on the order of drawing.

use toml::{Table, Value};

/// One dimension of the space.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    /// Listed values (a grid axis, or a uniform choice in random search).
    Values(Vec<Value>),
    /// A float drawn uniformly from `[lo, hi]` (random search only).
    Uniform(f64, f64),
    /// A float drawn log-uniformly from `[lo, hi]` (random search only).
    LogUniform(f64, f64),
    /// An integer drawn uniformly from `lo..=hi` (random search only).
    Int(i64, i64),
}

pub(crate) fn float(v: &Value) -> Option<f64> {
    match v {
        Value::Float(f) => Some(*f),
        Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

pub(crate) fn pair(v: &Value) -> Option<(f64, f64)> {
    match v.as_array().map(|a| a.as_slice()) {
        Some([a, b]) => Some((float(a)?, float(b)?)),
        _ => None,
    }
}

pub(crate) fn dim(key: &str, v: &Value) -> Result<Dim, String> {
    let bad = |why: &str| format!("[space] `{key}`: {why}");
    match v {
        Value::Array(a) if a.is_empty() => Err(bad("an empty list")),
        Value::Array(a) => Ok(Dim::Values(a.clone())),
        Value::Table(t) if t.len() == 1 => {
            let (kind, range) = t.iter().next().expect("one entry");
            let (lo, hi) = pair(range)
                .ok_or_else(|| bad(&format!("`{kind}` takes [low, high], got {range}")))?;
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(bad(&format!("`{kind}` needs low <= high, got {range}")));
            }
            match kind.as_str() {
                "uniform" => Ok(Dim::Uniform(lo, hi)),
                "log_uniform" if lo > 0.0 => Ok(Dim::LogUniform(lo, hi)),
                "log_uniform" => Err(bad("`log_uniform` needs a positive low")),
                "int" if lo.fract() == 0.0 && hi.fract() == 0.0 => {
                    Ok(Dim::Int(lo as i64, hi as i64))
                }
                "int" => Err(bad("`int` takes integer bounds")),
                other => Err(bad(&format!(
                    "unknown distribution `{other}` (expected uniform, log_uniform or int)"
                ))),
            }
        }
        other => Err(bad(&format!(
            "expected a list of values or {{ uniform | log_uniform | int = [low, high] }}, got {other}"
        ))),
    }
}

/// Sets a dotted path of a table, creating the tables on the way.
pub(crate) fn set(t: &mut Table, path: &str, v: Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("split gives one part");
    let mut cur = t;
    for p in parts {
        let e = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = e
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` of `{path}` is not a table"))?;
    }
    if last.is_empty() {
        return Err(format!("`{path}` is not a key path"));
    }
    cur.insert(last.to_string(), v);
    Ok(())
}

/// A uniform draw in [0, 1) of (seed, trial, dimension): splitmix64, so a trial's values
/// depend on nothing else (not on the other trials, nor on the order they are drawn in).
pub(crate) fn unit(seed: u64, trial: u64, dim: u64) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(trial.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(dim.wrapping_mul(0x94D0_49BB_1331_11EB))
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

pub(crate) fn draw(dim: &Dim, u: f64) -> Value {
    match dim {
        Dim::Values(vs) => vs[((u * vs.len() as f64) as usize).min(vs.len() - 1)].clone(),
        Dim::Uniform(lo, hi) => Value::Float(lo + u * (hi - lo)),
        Dim::LogUniform(lo, hi) => Value::Float((lo.ln() + u * (hi.ln() - lo.ln())).exp()),
        Dim::Int(lo, hi) => {
            let n = (hi - lo + 1) as f64;
            Value::Integer(lo + ((u * n) as i64).min(hi - lo))
        }
    }
}

/// A value as the leaderboard prints it (strings bare, arrays as `[a, b]`).
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Float(f) => format!("{f}"),
        other => other.to_string(),
    }
}
