//! The embedding store on disk: a cache of LLM embeddings keyed by [`text_key`].
//!
//! Embedding every (question, option) text is the expensive part of preparing a dataset,
//! and training reads the same vectors over and over, so they live in a directory that is
//! written once (or appended to) and memory-mapped by every reader:
//!
//! - `index.json`: `{"format":"gpo-embeddings","version":1,"embedder":..,"template":..,
//!   "dim":..,"synthetic":..,"keys":[..]}`, the keys in row order;
//! - `embeddings.safetensors`: one f32 tensor `embeddings` of shape `[rows, dim]`.
//!
//! Writes are atomic per file (temporary file, fsync, rename; the index last), and the
//! safetensors header records a digest of the keys, so a reader never silently pairs an
//! index with rows from a different write.
//!
//! [`text_key`]: crate::store::text_key

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{is_key, StoreMeta};

/// File name of the index inside a store directory.
pub const INDEX_FILE: &str = "index.json";
/// File name of the tensor file inside a store directory.
pub const TENSOR_FILE: &str = "embeddings.safetensors";
/// Name of the one tensor in [`TENSOR_FILE`].
pub const TENSOR_NAME: &str = "embeddings";
/// The index's `format` field.
pub const FORMAT: &str = "gpo-embeddings";
/// The index format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Safetensors header metadata entry holding the digest of the index's keys.
const KEYS_DIGEST: &str = "keys_sha256";

/// Everything that can go wrong reading or writing a store; messages name the file and
/// what was expected.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read, written or renamed.
    #[error("`{}`: {io}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        io: std::io::Error,
    },
    /// A file exists but its content is not what a store holds (malformed, or inconsistent
    /// with the other file).
    #[error("`{}`: {message}", path.display())]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// What was found and what was expected.
        message: String,
    },
    /// The store's vectors do not have the dimension the caller needs.
    #[error(
        "`{}`: store holds {found}-dimensional embeddings (embedder `{embedder}`), \
         expected {expected}",
        path.display()
    )]
    WrongDim {
        /// The store's index file.
        path: PathBuf,
        /// Dimension in the store.
        found: usize,
        /// Dimension the caller expected.
        expected: usize,
        /// The store's embedder, to help spot a store built with another model.
        embedder: String,
    },
    /// A vector given to [`StoreWriter::insert`] has the wrong length.
    #[error("embedding for key `{key}` has {got} values, expected {expected} (the store's dim)")]
    InsertDim {
        /// The key being inserted.
        key: String,
        /// Its vector's length.
        got: usize,
        /// The store's dimension.
        expected: usize,
    },
    /// A vector given to [`StoreWriter::insert`] holds NaN or an infinity.
    #[error(
        "embedding for key `{key}` has value {value} at index {index}, expected finite values"
    )]
    NonFinite {
        /// The key being inserted.
        key: String,
        /// Position of the first bad value.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// [`StoreWriter::insert`] was given a key the store already holds.
    #[error("key `{key}` is already in the store (check `contains` before inserting)")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// [`StoreWriter::insert`] was given something that is not a [`text_key`].
    ///
    /// [`text_key`]: crate::store::text_key
    #[error("`{key}` is not a store key (expected 64 lowercase hex digits from text_key)")]
    BadKey {
        /// The rejected key.
        key: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |io| StoreError::Io {
        path: path.to_path_buf(),
        io,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `index.json` as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexFile {
    format: String,
    version: u32,
    embedder: String,
    template: String,
    dim: usize,
    synthetic: bool,
    keys: Vec<String>,
}

/// A length-prefixed SHA-256 of the keys in row order, recorded in the tensor file.
fn keys_digest(keys: &[String]) -> String {
    let mut h = Sha256::new();
    h.update((keys.len() as u64).to_le_bytes());
    for k in keys {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A read-only, memory-mapped embedding store.
///
/// The mapping stays valid while files are replaced, because writers rename new files into
/// place rather than modifying the mapped one.
pub struct EmbeddingStore {
    dir: PathBuf,
    meta: StoreMeta,
    keys: Vec<String>,
    rows: HashMap<String, usize>,
    mmap: Mmap,
    /// Byte range of the tensor's data inside `mmap`.
    data: Range<usize>,
}

impl EmbeddingStore {
    /// Opens the store in `dir`, checking that the two files agree.
    pub fn open(dir: &Path) -> Result<EmbeddingStore, StoreError> {
        let index_path = dir.join(INDEX_FILE);
        let tensor_path = dir.join(TENSOR_FILE);

        let text = fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
        let index: IndexFile = serde_json::from_str(&text)
            .map_err(|e| invalid(&index_path, format!("not a valid store index: {e}")))?;
        if index.format != FORMAT {
            return Err(invalid(
                &index_path,
                format!("format is `{}`, expected `{FORMAT}`", index.format),
            ));
        }
        if index.version != VERSION {
            return Err(invalid(
                &index_path,
                format!(
                    "version is {}, but this build reads version {VERSION}",
                    index.version
                ),
            ));
        }
        if index.dim == 0 {
            return Err(invalid(
                &index_path,
                "dim is 0, expected a positive dimension",
            ));
        }
        let mut rows = HashMap::with_capacity(index.keys.len());
        for (i, k) in index.keys.iter().enumerate() {
            if !is_key(k) {
                return Err(invalid(
                    &index_path,
                    format!("keys[{i}] is `{k}`, expected 64 lowercase hex digits"),
                ));
            }
            if let Some(j) = rows.insert(k.clone(), i) {
                return Err(invalid(
                    &index_path,
                    format!("keys[{i}] repeats keys[{j}] (`{k}`); keys must be unique"),
                ));
            }
        }

        if cfg!(target_endian = "big") {
            return Err(invalid(
                &tensor_path,
                "safetensors data is little-endian; this big-endian platform cannot map it",
            ));
        }
        let file = File::open(&tensor_path).map_err(io_err(&tensor_path))?;
        // SAFETY: the mapping is read-only and store writers never modify a published file
        // in place (they write a new file and rename it over the old one), so the bytes do
        // not change under us. A process truncating the file by hand is outside the contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&tensor_path))?;

        let (range, shape) = {
            let st = SafeTensors::deserialize(&mmap[..])
                .map_err(|e| invalid(&tensor_path, format!("not a valid safetensors file: {e}")))?;
            let view = st.tensor(TENSOR_NAME).map_err(|_| {
                invalid(
                    &tensor_path,
                    format!(
                        "no tensor named `{TENSOR_NAME}` (found: {})",
                        st.names().join(", ")
                    ),
                )
            })?;
            if view.dtype() != Dtype::F32 {
                return Err(invalid(
                    &tensor_path,
                    format!(
                        "tensor `{TENSOR_NAME}` has dtype {:?}, expected F32",
                        view.dtype()
                    ),
                ));
            }
            let bytes = view.data();
            let start = bytes.as_ptr() as usize - mmap.as_ptr() as usize;
            (start..start + bytes.len(), view.shape().to_vec())
        };
        if shape.len() != 2 {
            return Err(invalid(
                &tensor_path,
                format!("tensor `{TENSOR_NAME}` has shape {shape:?}, expected [rows, dim]"),
            ));
        }
        if shape[1] != index.dim {
            return Err(invalid(
                &index_path,
                format!(
                    "dim is {} but {TENSOR_FILE} has {} columns",
                    index.dim, shape[1]
                ),
            ));
        }
        if shape[0] != index.keys.len() {
            return Err(invalid(
                &index_path,
                format!(
                    "lists {} keys but {TENSOR_FILE} has {} rows",
                    index.keys.len(),
                    shape[0]
                ),
            ));
        }
        // The digest is optional so that stores written by other tools still open.
        if let Ok((_, md)) = SafeTensors::read_metadata(&mmap[..]) {
            if let Some(d) = md.metadata().as_ref().and_then(|m| m.get(KEYS_DIGEST)) {
                if *d != keys_digest(&index.keys) {
                    return Err(invalid(
                        &index_path,
                        format!(
                            "keys do not match the ones {TENSOR_FILE} was written with \
                             (the two files come from different writes; rewrite the store)"
                        ),
                    ));
                }
            }
        }

        let store = EmbeddingStore {
            dir: dir.to_path_buf(),
            meta: StoreMeta {
                embedder: index.embedder,
                template: index.template,
                dim: index.dim,
                synthetic: index.synthetic,
            },
            keys: index.keys,
            rows,
            mmap,
            data: range,
        };
        // Zero-copy access needs f32 alignment; safetensors pads its header to 8 bytes and
        // mappings are page-aligned, so this only fails for a hand-made file.
        if store.try_values().is_none() {
            return Err(invalid(
                &tensor_path,
                "tensor data is not 4-byte aligned in the file; rewrite the store",
            ));
        }
        Ok(store)
    }

    /// Opens the store in `dir` and checks its vectors have `dim` dimensions.
    pub fn open_expect_dim(dir: &Path, dim: usize) -> Result<EmbeddingStore, StoreError> {
        let store = EmbeddingStore::open(dir)?;
        if store.dim() != dim {
            return Err(StoreError::WrongDim {
                path: dir.join(INDEX_FILE),
                found: store.dim(),
                expected: dim,
                embedder: store.meta.embedder.clone(),
            });
        }
        Ok(store)
    }

    /// The whole tensor as f32s, if the mapped data is aligned and little-endian.
    fn try_values(&self) -> Option<&[f32]> {
        let bytes = self.mmap.get(self.data.clone())?;
        // SAFETY: every bit pattern is a valid f32, and `align_to` only yields the
        // correctly aligned middle part; we reject any unaligned prefix or suffix.
        let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
        (pre.is_empty() && post.is_empty()).then_some(mid)
    }

    /// All rows, row-major (`len() * dim()` values).
    pub fn values(&self) -> &[f32] {
        // Checked in `open`; the mapping does not move.
        self.try_values().unwrap_or(&[])
    }

    /// The embedding stored under `key`, as a view into the mapped file.
    pub fn get(&self, key: &str) -> Option<&[f32]> {
        let row = *self.rows.get(key)?;
        let d = self.meta.dim;
        self.values().get(row * d..(row + 1) * d)
    }

    /// Whether the store holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.rows.contains_key(key)
    }

    /// The store's metadata.
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }

    /// The keys, in row order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Number of stored embeddings.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Length of every embedding.
    pub fn dim(&self) -> usize {
        self.meta.dim
    }

    /// The directory the store was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl std::fmt::Debug for EmbeddingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the keys or the mapping: a store may hold millions of rows.
        f.debug_struct("EmbeddingStore")
            .field("dir", &self.dir)
            .field("meta", &self.meta)
            .field("len", &self.keys.len())
            .finish()
    }
}

/// Builds a store in memory and writes it atomically.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    meta: StoreMeta,
    keys: Vec<String>,
    rows: HashSet<String>,
    values: Vec<f32>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl StoreWriter {
    /// An empty store with the given metadata.
    pub fn new(meta: StoreMeta) -> StoreWriter {
        StoreWriter {
            meta,
            keys: Vec::new(),
            rows: HashSet::new(),
            values: Vec::new(),
        }
    }

    /// A writer holding a copy of `store`'s rows, to append to it and write it back.
    pub fn from_existing(store: &EmbeddingStore) -> StoreWriter {
        StoreWriter {
            meta: store.meta.clone(),
            keys: store.keys.clone(),
            rows: store.keys.iter().cloned().collect(),
            values: store.values().to_vec(),
        }
    }

    /// The metadata the store will be written with.
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }

    /// Whether `key` is already held.
    pub fn contains(&self, key: &str) -> bool {
        self.rows.contains(key)
    }

    /// Number of embeddings held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no embedding is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds one embedding; rejects malformed keys, repeated keys, wrong lengths and
    /// non-finite values.
    pub fn insert(&mut self, key: impl Into<String>, embedding: &[f32]) -> Result<(), StoreError> {
        let key = key.into();
        if !is_key(&key) {
            return Err(StoreError::BadKey { key });
        }
        if embedding.len() != self.meta.dim || self.meta.dim == 0 {
            return Err(StoreError::InsertDim {
                key,
                got: embedding.len(),
                expected: self.meta.dim,
            });
        }
        if let Some((index, &value)) = embedding.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(StoreError::NonFinite { key, index, value });
        }
        if self.rows.contains(&key) {
            return Err(StoreError::DuplicateKey { key });
        }
        self.values.extend_from_slice(embedding);
        self.rows.insert(key.clone());
        self.keys.push(key);
        Ok(())
    }

    /// Writes the store into `dir` (created if missing), replacing any store there.
    ///
    /// Each file is written to a temporary file in `dir`, fsynced, then renamed into
    /// place: the tensor file first, the index last, then the directory is fsynced.
    pub fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let index_path = dir.join(INDEX_FILE);
        let tensor_path = dir.join(TENSOR_FILE);
        if self.meta.dim == 0 {
            return Err(invalid(
                &index_path,
                "dim is 0, expected a positive dimension",
            ));
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;

        let mut bytes = Vec::with_capacity(self.values.len() * 4);
        for v in &self.values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let view = safetensors::tensor::TensorView::new(
            Dtype::F32,
            vec![self.keys.len(), self.meta.dim],
            &bytes,
        )
        .map_err(|e| invalid(&tensor_path, format!("cannot build tensor: {e}")))?;
        let header = HashMap::from([
            (KEYS_DIGEST.to_string(), keys_digest(&self.keys)),
            ("format".to_string(), FORMAT.to_string()),
        ]);
        let tensor_bytes = safetensors::serialize([(TENSOR_NAME, view)], Some(header))
            .map_err(|e| invalid(&tensor_path, format!("cannot serialize: {e}")))
            .and_then(|b| {
                canonical_header(&b)
                    .ok_or_else(|| invalid(&tensor_path, "cannot reorder the safetensors header"))
            })?;
        drop(bytes);

        let index = IndexFile {
            format: FORMAT.to_string(),
            version: VERSION,
            embedder: self.meta.embedder.clone(),
            template: self.meta.template.clone(),
            dim: self.meta.dim,
            synthetic: self.meta.synthetic,
            keys: self.keys.clone(),
        };
        let index_bytes = serde_json::to_vec_pretty(&index)
            .map_err(|e| invalid(&index_path, format!("cannot serialize: {e}")))?;

        write_atomic(dir, &tensor_path, &tensor_bytes)?;
        write_atomic(dir, &index_path, &index_bytes)?;
        // Make the renames durable; not every platform can fsync a directory.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The same safetensors file with its JSON header's keys sorted (safetensors writes the
/// metadata from a `HashMap`, in an order that changes from process to process), so equal
/// stores are equal files, byte for byte.
fn canonical_header(file: &[u8]) -> Option<Vec<u8>> {
    use std::collections::BTreeMap;
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = file.get(8..8 + n)?;
    let mut top: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    if let Some(m) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> = serde_json::from_value(m.take()).ok()?;
        *m = serde_json::to_value(sorted).ok()?;
    }
    let mut json = serde_json::to_vec(&top).ok()?;
    // The data starts 8-byte aligned, as safetensors pads it: with spaces.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + file.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&file[8 + n..]);
    Some(out)
}

/// Writes `bytes` to a fresh temporary file in `dir`, fsyncs it, and renames it to `dest`.
fn write_atomic(dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("store");
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, dest).map_err(io_err(dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
