//! Finding and opening a model: a local Hugging Face folder, a GGUF file, or a hub id
//! resolved through the standard Hugging Face cache folder (no network access here: a hub
//! model must have been downloaded, e.g. with `huggingface-cli download ORG/NAME`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::bert::BertEmbedder;
use crate::decoder::DecoderEmbedder;
use crate::error::{invalid, io_err, EmbedError, Result};
use crate::{Embedder, LoadOptions};

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Whether `spec` has the shape of a hub id (`org/name`, optionally `@revision`).
fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or("");
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves a model argument to a local path: an existing path as is, or a hub id
/// (`org/name[@revision]`) to its snapshot folder in `cache` (the HF cache layout:
/// `models--org--name/refs/<revision>` names the snapshot in `snapshots/`).
pub fn resolve(spec: &str, cache: Option<&Path>) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if !looks_like_hub_id(spec) {
        return Err(EmbedError::Missing {
            path: p.to_path_buf(),
            what: "model".into(),
            hint: "; pass a Hugging Face model folder, a .gguf file, or a hub id ORG/NAME".into(),
        });
    }
    let (id, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    let Some(cache) = cache else {
        return Err(EmbedError::Unsupported(format!(
            "hub id `{spec}`: no Hugging Face cache folder (set HF_HOME or HF_HUB_CACHE)"
        )));
    };
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let hint =
        format!("; download it first (`huggingface-cli download {id}`): gpo does not fetch models");
    if !repo.exists() {
        return Err(EmbedError::Missing {
            path: repo,
            what: format!("hub model `{id}` in the Hugging Face cache"),
            hint,
        });
    }
    let snapshots = repo.join("snapshots");
    let refp = repo.join("refs").join(rev);
    let snap = if refp.exists() {
        let hash = std::fs::read_to_string(&refp).map_err(io_err(&refp))?;
        snapshots.join(hash.trim())
    } else {
        // A commit hash given directly.
        snapshots.join(rev)
    };
    if !snap.is_dir() {
        return Err(EmbedError::Missing {
            path: snap,
            what: format!("snapshot `{rev}` of hub model `{id}`"),
            hint,
        });
    }
    Ok(snap)
}

/// The `*.safetensors` weight files of a folder, sorted.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        let has_bin = dir.join("pytorch_model.bin").exists();
        return Err(EmbedError::Missing {
            path: dir.to_path_buf(),
            what: "weights (*.safetensors)".into(),
            hint: if has_bin {
                "; only pytorch_model.bin is there: convert it to safetensors".into()
            } else {
                String::new()
            },
        });
    }
    Ok(files)
}

/// A short fingerprint of model files: SHA-256 over each file's name, size, first and last
/// 256 KiB (the whole file when smaller). Cheap on multi-GB weights, and it changes when the
/// config, tokenizer or weights do.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    const CHUNK: u64 = 256 * 1024;
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(f).map_err(io_err(f))?;
        let len = file.metadata().map_err(io_err(f))?.len();
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        let mut buf = Vec::new();
        if len <= 2 * CHUNK {
            file.read_to_end(&mut buf).map_err(io_err(f))?;
        } else {
            buf.resize(CHUNK as usize, 0);
            file.read_exact(&mut buf).map_err(io_err(f))?;
            h.update(&buf);
            file.seek(SeekFrom::End(-(CHUNK as i64)))
                .map_err(io_err(f))?;
            file.read_exact(&mut buf).map_err(io_err(f))?;
        }
        h.update(&buf);
    }
    Ok(hex::encode(h.finalize())[..12].to_string())
}

/// A readable model name for ids: the hub id, the GGUF file stem, or the folder's name
/// (skipping generic names such as `model` and snapshot hashes).
fn display_name(spec: &str, path: &Path) -> String {
    if !Path::new(spec).exists() && looks_like_hub_id(spec) {
        return spec.to_string();
    }
    if path.is_file() {
        return path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
    }
    let generic = |s: &str| {
        matches!(s, "model" | "models" | "." | "")
            || (s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit()))
    };
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    canon
        .components()
        .rev()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .find(|s| !generic(s) && s != "snapshots")
        .unwrap_or_else(|| "model".into())
}

/// A resolved model: its path, display name, and (for folders) the parsed `config.json`.
enum Resolved {
    Gguf {
        path: PathBuf,
        id: String,
    },
    Folder {
        path: PathBuf,
        cfg: serde_json::Value,
        model_type: String,
        id: String,
    },
}

fn resolve_model(spec: &str) -> Result<Resolved> {
    let path = resolve(spec, hf_cache_dir().as_deref())?;
    let name = display_name(spec, &path);
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        {
            let id = format!("{name}@{}", fingerprint(std::slice::from_ref(&path))?);
            return Ok(Resolved::Gguf { path, id });
        }
        return Err(invalid(
            &path,
            "a model file must be a .gguf; otherwise pass the model's folder",
        ));
    }
    let cfg_path = path.join("config.json");
    if !cfg_path.exists() {
        return Err(EmbedError::Missing {
            path: cfg_path,
            what: "config.json".into(),
            hint: "; a model folder needs the Hugging Face config.json".into(),
        });
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| invalid(&cfg_path, format!("not valid JSON: {e}")))?;
    let model_type = cfg
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| invalid(&cfg_path, "no `model_type` field"))?
        .to_string();
    let mut files = vec![cfg_path.clone(), path.join("tokenizer.json")];
    files.retain(|f| f.exists());
    files.extend(safetensors_files(&path)?);
    let id = format!("{name}@{}", fingerprint(&files)?);
    Ok(Resolved::Folder {
        path,
        cfg,
        model_type,
        id,
    })
}

/// Loads the embedder for `spec` (a folder, a `.gguf` file, or a hub id), picking the family
/// from the GGUF metadata or the folder's `config.json` (`model_type`).
pub fn load(spec: &str, opts: &LoadOptions) -> Result<Box<dyn Embedder>> {
    match resolve_model(spec)? {
        Resolved::Gguf { path, id } => Ok(Box::new(DecoderEmbedder::load_gguf(&path, opts, &id)?)),
        Resolved::Folder {
            path,
            cfg,
            model_type,
            id,
        } => match model_type.as_str() {
            "bert" => Ok(Box::new(BertEmbedder::load(&path, &cfg, opts, &id)?)),
            t if DECODERS.contains(&t) => {
                Ok(Box::new(DecoderEmbedder::load_hf(&path, &cfg, opts, &id)?))
            }
            other => Err(unknown(&path, other)),
        },
    }
}

/// What `spec` would embed with under `opts`: the embedder id (the fingerprint every
/// vector is keyed by), the width and the tokenizer, read from the config, tokenizer and
/// metadata without loading any weights. The id equals [`load`]'s. A coordinator that
/// plans embedding batches for its workers needs only this.
pub fn describe(spec: &str, opts: &LoadOptions) -> Result<crate::Description> {
    match resolve_model(spec)? {
        Resolved::Gguf { path, id } => DecoderEmbedder::describe_gguf(&path, opts, &id),
        Resolved::Folder {
            path,
            cfg,
            model_type,
            id,
        } => match model_type.as_str() {
            "bert" => BertEmbedder::describe(&path, &cfg, opts, &id),
            t if DECODERS.contains(&t) => DecoderEmbedder::describe_hf(&path, &cfg, opts, &id),
            other => Err(unknown(&path, other)),
        },
    }
}

/// The `model_type`s of the decoder families.
const DECODERS: [&str; 3] = ["llama", "mistral", "qwen2"];

fn unknown(dir: &Path, arch: &str) -> EmbedError {
    EmbedError::UnknownArchitecture {
        path: dir.join("config.json"),
        arch: arch.to_string(),
    }
}

/// Loads a decoder LLM (a folder, a `.gguf` file, or a hub id) as itself, for next-token
/// scoring; an encoder or unknown family is an error naming its `config.json`.
pub fn load_decoder(spec: &str, opts: &LoadOptions) -> Result<DecoderEmbedder> {
    match resolve_model(spec)? {
        Resolved::Gguf { path, id } => DecoderEmbedder::load_gguf(&path, opts, &id),
        Resolved::Folder {
            path,
            cfg,
            model_type,
            id,
        } => {
            if !DECODERS.contains(&model_type.as_str()) {
                return Err(unknown(&path, &model_type));
            }
            DecoderEmbedder::load_hf(&path, &cfg, opts, &id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_resolve_through_the_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--tiny-model");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(resolve("org/tiny-model", Some(tmp.path())).unwrap(), snap);
        assert_eq!(
            resolve("org/tiny-model@abc123", Some(tmp.path())).unwrap(),
            snap
        );
        let e = resolve("org/other", Some(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("huggingface-cli download org/other"), "{e}");
        let e = resolve("org/tiny-model@v2", Some(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshot `v2`"), "{e}");
        let e = resolve("./no/such/dir/x", Some(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model not found"), "{e}");
        assert_eq!(display_name("org/tiny-model", &snap), "org/tiny-model");
    }

    #[test]
    fn fingerprints_follow_content() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a.json");
        std::fs::write(&a, "one").unwrap();
        let f1 = fingerprint(std::slice::from_ref(&a)).unwrap();
        assert_eq!(f1, fingerprint(std::slice::from_ref(&a)).unwrap());
        std::fs::write(&a, "two").unwrap();
        assert_ne!(f1, fingerprint(std::slice::from_ref(&a)).unwrap());
        let big = tmp.path().join("big.bin");
        let mut data = vec![7u8; 1 << 20];
        std::fs::write(&big, &data).unwrap();
        let g1 = fingerprint(std::slice::from_ref(&big)).unwrap();
        data[(1 << 20) - 1] = 8;
        std::fs::write(&big, &data).unwrap();
        assert_ne!(g1, fingerprint(std::slice::from_ref(&big)).unwrap());
    }
}
