//! The checkpoint format: one safetensors file holding the module's parameters under their
//! official names, Adam's moments (`optim.m`, `optim.v`), and in its metadata the step, the
//! run configuration and seed, and a SHA-256 checksum over everything else. Encoding and
//! decoding are pure; [`crate::io::checkpoint`] writes files atomically.
//!
//! A plain safetensors file of parameters (an official PyTorch `state_dict` export) also
//! decodes: it has no optimizer state, step or checksum.
//!
//! Checkpoints written since issue 10 also name the data they were trained on
//! ([`DataIdentity`]: the data fingerprint and the embedder id, metadata keys
//! `data_fingerprint` and `embedder`), so that evaluating them on other data is caught.
//! Older checkpoints decode with `data: None`.

use crate::optim::{Adam, AdamConfig};
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// Format tag in the metadata.
pub const FORMAT: &str = "gpo-checkpoint";
/// Format version.
pub const VERSION: &str = "1";

/// A named f32 array.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedArray {
    /// Official parameter name (or `optim.m` / `optim.v`).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Everything a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Parameters in `state_dict` order.
    pub params: Vec<NamedArray>,
    /// Optimizer state, when saved by gpo.
    pub adam: Option<Adam>,
    /// Optimizer steps taken.
    pub step: u64,
    /// The run's configuration (JSON), including the model sizes and the seed.
    pub config: serde_json::Value,
    /// The training loop's progress at this step (histories, best step), so that a run
    /// resumed from this checkpoint continues as if it had never stopped. `None` for
    /// checkpoints that are not resume points (the best one, or an exported state_dict).
    pub progress: Option<serde_json::Value>,
    /// The data the run trained on; `None` in checkpoints written before it was recorded
    /// (and in exported state_dicts).
    pub data: Option<DataIdentity>,
}

/// What a checkpoint records of its run's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIdentity {
    /// SHA-256 (hex) of the survey and the point features the run trained on (the one the
    /// coordinator and its workers compare, `gpo_worker::wire::data_fingerprint`).
    pub fingerprint: String,
    /// The embedding store's model identity (its `index.json` `embedder`); for the
    /// built-in synthetic survey, the synthetic embedder's id.
    pub embedder: String,
    /// Where the run read its data (absolute paths; empty: the built-in synthetic survey
    /// or not recorded), so `gpo eval --checkpoint C` needs nothing else. Metadata keys
    /// `data_path`, `data_format` and `embeddings_path`, written only when set.
    pub paths: DataPaths,
}

/// The data flags of the run that wrote a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPaths {
    pub data: String,
    pub format: String,
    pub embeddings: String,
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn checksum(
    tensors: &BTreeMap<String, (Vec<usize>, Vec<u8>)>,
    meta: &BTreeMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    for (name, (shape, data)) in tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(data);
    }
    for (k, v) in meta {
        if k != "checksum" {
            h.update((k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Serializes a checkpoint to safetensors bytes.
pub fn encode(c: &Checkpoint) -> Result<Vec<u8>, String> {
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for p in &c.params {
        tensors.insert(p.name.clone(), (p.shape.clone(), bytes_of(&p.data)));
    }
    let mut meta = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("step".to_string(), c.step.to_string()),
        ("config".to_string(), c.config.to_string()),
        (
            "param_order".to_string(),
            c.params
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]);
    if let Some(p) = &c.progress {
        meta.insert("progress".into(), p.to_string());
    }
    if let Some(d) = &c.data {
        meta.insert("data_fingerprint".into(), d.fingerprint.clone());
        meta.insert("embedder".into(), d.embedder.clone());
        for (k, v) in [
            ("data_path", &d.paths.data),
            ("data_format", &d.paths.format),
            ("embeddings_path", &d.paths.embeddings),
        ] {
            if !v.is_empty() {
                meta.insert(k.into(), v.clone());
            }
        }
    }
    if let Some(a) = &c.adam {
        tensors.insert("optim.m".into(), (vec![a.m.len()], bytes_of(&a.m)));
        tensors.insert("optim.v".into(), (vec![a.v.len()], bytes_of(&a.v)));
        meta.insert("adam_t".into(), a.t.to_string());
        meta.insert(
            "adam".into(),
            serde_json::to_string(&a.cfg).map_err(|e| e.to_string())?,
        );
    }
    meta.insert("checksum".into(), checksum(&tensors, &meta));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (s, d))| TensorView::new(Dtype::F32, s.clone(), d).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, Some(meta.into_iter().collect::<HashMap<_, _>>()))
        .map_err(|e| e.to_string())
}

/// Parses checkpoint bytes, verifying the checksum when there is one. Errors say what is
/// wrong (truncated file, bad checksum, missing optimizer tensor, wrong dtype).
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file (truncated or corrupt?): {e}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => view.data().to_vec(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .flat_map(|c| {
                    (f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).to_le_bytes()
                })
                .collect(),
            other => return Err(format!("tensor `{name}` has dtype {other:?}, expected F32")),
        };
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    let gpo_format = meta.get("format").map(String::as_str) == Some(FORMAT);
    if gpo_format {
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(format!(
                "checkpoint version {:?} is not supported (expected {VERSION})",
                meta.get("version")
            ));
        }
        let want = meta.get("checksum").ok_or("checkpoint has no checksum")?;
        let got = checksum(&tensors, &meta);
        if &got != want {
            return Err(format!(
                "checksum mismatch: the file is corrupt (stored {want}, computed {got})"
            ));
        }
    }
    let floats = |d: &[u8]| {
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let adam = match (tensors.remove("optim.m"), tensors.remove("optim.v")) {
        (Some((_, m)), Some((_, v))) => {
            let t = meta
                .get("adam_t")
                .and_then(|t| t.parse().ok())
                .ok_or("checkpoint has optimizer moments but no valid `adam_t`")?;
            let cfg: AdamConfig = match meta.get("adam") {
                Some(s) => serde_json::from_str(s).map_err(|e| format!("metadata `adam`: {e}"))?,
                None => AdamConfig::default(),
            };
            Some(Adam {
                cfg,
                m: floats(&m),
                v: floats(&v),
                t,
            })
        }
        (None, None) => None,
        _ => return Err("checkpoint has only one of `optim.m` and `optim.v`".into()),
    };
    // Keep state_dict order when recorded; otherwise sorted names.
    let order: Vec<String> = match meta.get("param_order") {
        Some(o) if !o.is_empty() => o.split(',').map(str::to_string).collect(),
        _ => tensors.keys().cloned().collect(),
    };
    let mut params = Vec::with_capacity(order.len());
    for name in order {
        let (shape, data) = tensors
            .remove(&name)
            .ok_or_else(|| format!("parameter `{name}` is listed but missing"))?;
        params.push(NamedArray {
            name,
            shape,
            data: floats(&data),
        });
    }
    let step = meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
    let config = match meta.get("config") {
        Some(s) => {
            serde_json::from_str(s).map_err(|e| format!("metadata `config` is not JSON: {e}"))?
        }
        None => serde_json::Value::Null,
    };
    let progress = match meta.get("progress") {
        Some(s) => Some(
            serde_json::from_str(s).map_err(|e| format!("metadata `progress` is not JSON: {e}"))?,
        ),
        None => None,
    };
    let data = meta.get("data_fingerprint").map(|f| DataIdentity {
        fingerprint: f.clone(),
        embedder: meta.get("embedder").cloned().unwrap_or_default(),
        paths: DataPaths {
            data: meta.get("data_path").cloned().unwrap_or_default(),
            format: meta.get("data_format").cloned().unwrap_or_default(),
            embeddings: meta.get("embeddings_path").cloned().unwrap_or_default(),
        },
    });
    Ok(Checkpoint {
        params,
        adam,
        step,
        config,
        progress,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            params: vec![
                NamedArray {
                    name: "embedder.0.weight".into(),
                    shape: vec![2, 3],
                    data: vec![1., 2., 3., 4., 5., 6.],
                },
                NamedArray {
                    name: "embedder.0.bias".into(),
                    shape: vec![2],
                    data: vec![-1., 0.5],
                },
            ],
            adam: Some(Adam {
                cfg: AdamConfig::default(),
                m: vec![0.1; 8],
                v: vec![0.2; 8],
                t: 7,
            }),
            step: 7,
            config: serde_json::json!({"seed": 3, "model": {"dim_x": 2}}),
            progress: Some(serde_json::json!({"step": 7, "loss_history": [[7, 0.5]]})),
            data: Some(DataIdentity {
                fingerprint: "ab".repeat(32),
                embedder: "test-embedder@0123".into(),
                paths: DataPaths {
                    data: "/data/survey".into(),
                    format: String::new(),
                    embeddings: "/data/store".into(),
                },
            }),
        }
    }

    #[test]
    fn the_data_identity_is_kept_and_checksummed() {
        let c = sample();
        let bytes = encode(&c).unwrap();
        assert_eq!(decode(&bytes).unwrap().data, c.data);
        // A checkpoint written before the field existed decodes with none.
        let old = Checkpoint {
            data: None,
            ..sample()
        };
        assert_eq!(decode(&encode(&old).unwrap()).unwrap().data, None);
        // The identity is covered by the checksum: editing it is detected.
        let fp = "ab".repeat(32);
        let pos = bytes
            .windows(fp.len())
            .position(|w| w == fp.as_bytes())
            .unwrap();
        let mut edited = bytes.clone();
        edited[pos] = b'c';
        assert!(decode(&edited).unwrap_err().contains("checksum mismatch"));
    }

    #[test]
    fn round_trip_keeps_everything_in_order() {
        let c = sample();
        let back = decode(&encode(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn corruption_is_detected() {
        let bytes = encode(&sample()).unwrap();
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0x40; // inside the tensor data
        assert!(decode(&flipped).unwrap_err().contains("checksum mismatch"));
        assert!(decode(&bytes[..bytes.len() / 2])
            .unwrap_err()
            .contains("not a valid safetensors"));
        assert!(decode(b"hello").is_err());
    }

    #[test]
    fn plain_state_dict_files_decode_without_optimizer() {
        let data = bytes_of(&[1.0, 2.0]);
        let view = TensorView::new(Dtype::F32, vec![2], &data).unwrap();
        let bytes =
            safetensors::serialize(vec![("predictor.2.bias".to_string(), view)], None).unwrap();
        let c = decode(&bytes).unwrap();
        assert!(c.adam.is_none());
        assert_eq!(c.params[0].data, vec![1.0, 2.0]);
    }
}
