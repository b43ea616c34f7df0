//! What a worker and a coordinator must agree on beyond the protobuf messages: the data
//! fingerprint, the parameter checksum, f32 buffers as bytes, and episode specs.

use gpo_core::data::Survey;
use gpo_core::features::PointFeatures;
use gpo_core::sampler::EpisodeSpec;
use gpo_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// SHA-256 (hex) of a survey and its point features: everything a gradient depends on
/// besides the parameters. Workers compare it with the coordinator's before training.
pub fn data_fingerprint(s: &Survey, f: &PointFeatures) -> String {
    let mut h = Sha256::new();
    let mut text = |t: &str| {
        h.update((t.len() as u64).to_le_bytes());
        h.update(t.as_bytes());
    };
    text(&s.name);
    text(&format!("{:?}", s.metric));
    for q in &s.questions {
        text(&q.id);
        for o in &q.options {
            text(&o.text);
            text(&format!("{:?}/{}", o.ordinal, o.refusal));
        }
    }
    for g in &s.groups {
        text(&g.name);
    }
    for row in &s.answers {
        for a in row {
            match a {
                None => h.update([0u8]),
                Some(d) => {
                    h.update([1u8]);
                    h.update(f32_bytes(d));
                }
            }
        }
    }
    h.update((f.dim as u64).to_le_bytes());
    for (a, b) in f.start.iter().zip(&f.len) {
        h.update((*a as u64).to_le_bytes());
        h.update((*b as u64).to_le_bytes());
    }
    h.update(f32_bytes(&f.x));
    hex::encode(h.finalize())
}

/// SHA-256 (hex) of a flat parameter buffer: replicas that agree on it are bitwise equal.
pub fn params_sha256(params: &[f32]) -> String {
    hex::encode(Sha256::digest(f32_bytes(params)))
}

/// Little-endian bytes of an f32 buffer.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// An f32 buffer from little-endian bytes of exactly `n` values, or a message naming the
/// sizes.
pub fn f32_from_bytes(what: &str, b: &[u8], n: usize) -> Result<Vec<f32>, String> {
    if b.len() != n * 4 {
        return Err(format!(
            "{what} holds {} bytes, expected {} ({n} f32 values): wrong buffer size",
            b.len(),
            n * 4
        ));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

/// A replica's state from the wire: its parameters and Adam's state (with `cfg`, which the
/// wire does not carry), each buffer checked to hold `n` values.
pub fn state_from_pb(
    s: &pb::ReplicaState,
    n: usize,
    cfg: gpo_core::optim::AdamConfig,
) -> Result<(Vec<f32>, gpo_core::optim::Adam), String> {
    let params = f32_from_bytes("params", &s.params, n)?;
    let adam = gpo_core::optim::Adam {
        cfg,
        m: f32_from_bytes("adam_m", &s.adam_m, n)?,
        v: f32_from_bytes("adam_v", &s.adam_v, n)?,
        t: s.adam_t,
    };
    Ok((params, adam))
}

/// An episode spec as it travels.
pub fn episode_to_pb(e: &EpisodeSpec) -> pb::EpisodeSpec {
    pb::EpisodeSpec {
        group: e.group as u32,
        context: e.context.iter().map(|&q| q as u32).collect(),
        target: e.target.iter().map(|&q| q as u32).collect(),
    }
}

/// An episode spec from the wire, checked against the survey's sizes.
pub fn episode_from_pb(e: &pb::EpisodeSpec, s: &Survey) -> Result<EpisodeSpec, String> {
    let g = e.group as usize;
    if g >= s.groups.len() {
        return Err(format!(
            "episode names group {g}, the survey has {}",
            s.groups.len()
        ));
    }
    let qs = |v: &[u32]| -> Result<Vec<usize>, String> {
        v.iter()
            .map(|&q| {
                let q = q as usize;
                if q < s.questions.len() && s.answers[g][q].is_some() {
                    Ok(q)
                } else {
                    Err(format!(
                        "episode names question {q}, which group {g} did not answer (or does not exist)"
                    ))
                }
            })
            .collect()
    };
    Ok(EpisodeSpec {
        group: g,
        context: qs(&e.context)?,
        target: qs(&e.target)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_sizes_are_checked() {
        let v = vec![1.5f32, -0.0, f32::MAX];
        assert_eq!(f32_from_bytes("x", &f32_bytes(&v), 3).unwrap(), v);
        let e = f32_from_bytes("params", &f32_bytes(&v), 4).unwrap_err();
        assert!(
            e.contains("wrong buffer size") && e.contains("params"),
            "{e}"
        );
        assert_ne!(params_sha256(&v), params_sha256(&[1.5, 0.0, f32::MAX]));
    }
}
