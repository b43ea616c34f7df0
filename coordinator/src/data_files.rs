//! The files of a run's data that the coordinator serves to workers without a shared
//! volume (the `FetchDataFile` RPC, whose handler is a thin adapter over this module).
//!
//! The list is fixed when the run starts: every regular file under the dataset path (or
//! the dataset file itself) and under the embedding store folder, each opened then and read
//! later through its handle, so the bytes served are those of the files the coordinator
//! loaded even if a path is replaced during the run. A request names a (root, path) pair
//! of that list or is refused: a path a client sends is never joined onto a folder, so no
//! traversal (`..`, absolute paths, links out of the tree) can reach another file.
//!
//! Names starting with `.` are left out (the temporary files of atomic writes), and so is
//! the store's folder when it lies inside the dataset's (it is served as its own root).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest chunk sent: far below any gRPC message limit.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Most files a run's data may have (a guard against serving a whole disk by mistake).
pub const MAX_FILES: usize = 10_000;
/// Deepest folder nesting walked (a guard against link cycles).
const MAX_DEPTH: usize = 16;

/// The root of the dataset path.
pub const ROOT_DATA: &str = "data";
/// The root of the embedding store folder.
pub const ROOT_EMBEDDINGS: &str = "embeddings";

/// One served file, as workers are told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// [`ROOT_DATA`] or [`ROOT_EMBEDDINGS`].
    pub root: String,
    /// Relative to the root, `/`-separated; for a dataset that is one file, its name.
    pub path: String,
    /// Size in bytes when opened.
    pub size: u64,
}

#[derive(Debug)]
struct Served {
    file: Arc<File>,
    size: u64,
    origin: PathBuf,
}

/// The served files of one run.
#[derive(Debug)]
pub struct DataFiles {
    files: BTreeMap<(String, String), Served>,
    data_is_file: bool,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The (root, path) pair is not one of the run's files.
    NotServed(String),
    /// Reading the file failed (it is named, with the cause).
    Io(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotServed(m) | Refusal::Io(m) => f.write_str(m),
        }
    }
}

fn walk(
    root: &Path,
    rel: &str,
    skip: Option<&Path>,
    depth: usize,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), String> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    if depth > MAX_DEPTH {
        return Err(format!(
            "{}: folders nested deeper than {MAX_DEPTH} (a link cycle?)",
            dir.display()
        ));
    }
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: cannot list the folder: {e}", dir.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: cannot list the folder: {e}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| format!("{}: a file name that is not UTF-8", e.path().display()))?;
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if skip.is_some_and(|s| std::fs::canonicalize(&path).ok().as_deref() == Some(s)) {
            continue;
        }
        let child = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if meta.is_dir() {
            walk(root, &child, skip, depth + 1, out)?;
        } else if meta.is_file() {
            out.push((child, path));
            if out.len() > MAX_FILES {
                return Err(format!(
                    "{}: more than {MAX_FILES} files to serve",
                    root.display()
                ));
            }
        }
    }
    Ok(())
}

impl DataFiles {
    /// Lists and opens the files of the dataset at `data` (a file or a folder) and of the
    /// embedding store folder `embeddings`. Errors name the file.
    pub fn open(data: &Path, embeddings: &Path) -> Result<DataFiles, String> {
        let mut files = BTreeMap::new();
        let store = std::fs::canonicalize(embeddings)
            .map_err(|e| format!("{}: {e}", embeddings.display()))?;
        let data_meta = std::fs::metadata(data).map_err(|e| format!("{}: {e}", data.display()))?;
        let data_is_file = data_meta.is_file();
        let mut listed: Vec<(&str, String, PathBuf)> = Vec::new();
        if data_is_file {
            let name = data
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("{}: no UTF-8 file name", data.display()))?;
            listed.push((ROOT_DATA, name.to_string(), data.to_path_buf()));
        } else {
            let mut v = Vec::new();
            walk(data, "", Some(&store), 0, &mut v)?;
            listed.extend(v.into_iter().map(|(r, p)| (ROOT_DATA, r, p)));
        }
        let mut v = Vec::new();
        walk(&store, "", None, 0, &mut v)?;
        listed.extend(v.into_iter().map(|(r, p)| (ROOT_EMBEDDINGS, r, p)));
        if listed.len() > MAX_FILES {
            return Err(format!(
                "{} and {}: more than {MAX_FILES} files to serve",
                data.display(),
                embeddings.display()
            ));
        }
        for (root, rel, origin) in listed {
            let file = File::open(&origin)
                .map_err(|e| format!("{}: cannot open: {e}", origin.display()))?;
            let size = file
                .metadata()
                .map_err(|e| format!("{}: {e}", origin.display()))?
                .len();
            files.insert(
                (root.to_string(), rel),
                Served {
                    file: Arc::new(file),
                    size,
                    origin,
                },
            );
        }
        Ok(DataFiles {
            files,
            data_is_file,
        })
    }

    /// The served files, in a fixed order.
    pub fn entries(&self) -> Vec<FileEntry> {
        self.files
            .iter()
            .map(|((root, path), s)| FileEntry {
                root: root.clone(),
                path: path.clone(),
                size: s.size,
            })
            .collect()
    }

    /// True when the dataset is one file (a CSV), not a folder.
    pub fn data_is_file(&self) -> bool {
        self.data_is_file
    }

    /// The chunks of a served file, or a refusal when (root, path) is not one.
    pub fn chunks(&self, root: &str, path: &str) -> Result<Chunks, Refusal> {
        let s = self
            .files
            .get(&(root.to_string(), path.to_string()))
            .ok_or_else(|| {
                Refusal::NotServed(format!(
                    "`{root}/{path}` is not one of the run's data files (only the files listed in its data source are served)"
                ))
            })?;
        Ok(Chunks {
            file: s.file.clone(),
            size: s.size,
            origin: s.origin.clone(),
            offset: 0,
            hasher: Some(Sha256::new()),
        })
    }
}

/// One piece of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where it starts.
    pub offset: u64,
    /// At most [`CHUNK_BYTES`].
    pub data: Vec<u8>,
    /// On the last chunk: the file's SHA-256 (hex).
    pub sha256: Option<String>,
    /// The file's size.
    pub size: u64,
}

/// The chunks of one file, read in order through its handle, with the SHA-256 of what
/// was read on the last one (an empty file is one empty last chunk).
pub struct Chunks {
    file: Arc<File>,
    size: u64,
    origin: PathBuf,
    offset: u64,
    hasher: Option<Sha256>,
}

impl Iterator for Chunks {
    type Item = Result<Chunk, Refusal>;

    fn next(&mut self) -> Option<Self::Item> {
        let hasher = self.hasher.as_mut()?;
        let n = (self.size - self.offset).min(CHUNK_BYTES as u64) as usize;
        let mut data = vec![0u8; n];
        if let Err(e) = self.file.read_exact_at(&mut data, self.offset) {
            self.hasher = None;
            return Some(Err(Refusal::Io(format!(
                "{}: cannot read {n} bytes at {} (the file changed during the run?): {e}",
                self.origin.display(),
                self.offset
            ))));
        }
        hasher.update(&data);
        let offset = self.offset;
        self.offset += n as u64;
        let sha256 = (self.offset == self.size)
            .then(|| self.hasher.take().map(|h| hex::encode(h.finalize())))
            .flatten();
        Some(Ok(Chunk {
            offset,
            data,
            sha256,
            size: self.size,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("embeddings")).unwrap();
        std::fs::create_dir_all(data.join("waves/w1")).unwrap();
        std::fs::write(data.join("survey.json"), b"{}").unwrap();
        std::fs::write(
            data.join("waves/w1/answers.csv"),
            vec![7u8; 3 * CHUNK_BYTES / 2],
        )
        .unwrap();
        std::fs::write(data.join(".survey.json.tmp-1"), b"partial").unwrap();
        std::fs::write(data.join("embeddings/index.json"), b"[]").unwrap();
        std::fs::write(data.join("embeddings/embeddings.safetensors"), b"").unwrap();
        std::fs::write(t.path().join("secret"), b"not data").unwrap();
        let store = data.join("embeddings");
        (t, data, store)
    }

    #[test]
    fn serves_the_listed_files_in_chunks_with_their_sha256() {
        let (_t, data, store) = tree();
        let f = DataFiles::open(&data, &store).unwrap();
        let names: Vec<String> = f
            .entries()
            .iter()
            .map(|e| format!("{}/{}", e.root, e.path))
            .collect();
        assert_eq!(
            names,
            [
                "data/survey.json",
                "data/waves/w1/answers.csv",
                "embeddings/embeddings.safetensors",
                "embeddings/index.json"
            ]
        );
        let chunks: Vec<Chunk> = f
            .chunks(ROOT_DATA, "waves/w1/answers.csv")
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].data.len(), CHUNK_BYTES);
        assert_eq!(chunks[1].offset, CHUNK_BYTES as u64);
        assert_eq!(chunks[0].sha256, None);
        let whole = std::fs::read(data.join("waves/w1/answers.csv")).unwrap();
        assert_eq!(
            chunks[1].sha256.as_deref(),
            Some(hex::encode(Sha256::digest(&whole)).as_str())
        );
        // An empty file is one empty, last chunk.
        let empty: Vec<_> = f
            .chunks(ROOT_EMBEDDINGS, "embeddings.safetensors")
            .unwrap()
            .collect();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].as_ref().unwrap().sha256.is_some());
    }

    #[test]
    fn paths_outside_the_list_are_refused() {
        let (_t, data, store) = tree();
        let f = DataFiles::open(&data, &store).unwrap();
        for (root, path) in [
            (ROOT_DATA, "../secret"),
            (ROOT_DATA, "/etc/passwd"),
            (ROOT_DATA, "waves/../survey.json"),
            (ROOT_DATA, "./survey.json"),
            (ROOT_DATA, ".survey.json.tmp-1"),
            (ROOT_DATA, "embeddings/index.json"),
            (ROOT_EMBEDDINGS, "../survey.json"),
            ("/", "etc/passwd"),
            ("", "survey.json"),
        ] {
            match f.chunks(root, path) {
                Err(Refusal::NotServed(m)) => assert!(m.contains(path), "{m}"),
                _ => panic!("{root}/{path} was served"),
            }
        }
    }

    #[test]
    fn the_bytes_opened_are_the_bytes_served() {
        let (_t, data, store) = tree();
        let f = DataFiles::open(&data, &store).unwrap();
        // Replaced the way atomic writes replace files: the old content is still served.
        std::fs::write(data.join("new"), b"{\"changed\": 1}").unwrap();
        std::fs::rename(data.join("new"), data.join("survey.json")).unwrap();
        let c: Vec<_> = f.chunks(ROOT_DATA, "survey.json").unwrap().collect();
        assert_eq!(c[0].as_ref().unwrap().data, b"{}");
    }

    #[test]
    fn a_file_dataset_is_served_under_its_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("counts.csv"), b"a,b\n").unwrap();
        std::fs::create_dir(t.path().join("embeddings")).unwrap();
        std::fs::write(t.path().join("embeddings/index.json"), b"[]").unwrap();
        let f =
            DataFiles::open(&t.path().join("counts.csv"), &t.path().join("embeddings")).unwrap();
        assert!(f.data_is_file());
        assert_eq!(f.entries()[0].path, "counts.csv");
        let e = DataFiles::open(&t.path().join("missing.csv"), &t.path().join("embeddings"))
            .unwrap_err();
        assert!(e.contains("missing.csv"), "{e}");
    }
}
