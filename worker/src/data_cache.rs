//! The worker's local copy of a run's data, for workers without a shared volume: where a
//! fetched dataset lives (`<cache>/<fingerprint>/data` and `…/embeddings`), the checks
//! every fetched file passes before it is kept, and the atomic commit of a complete copy.
//!
//! No I/O over the network here: [`crate::data_fetch`] streams the chunks in. What arrives
//! is trusted for nothing: every path the coordinator lists is checked to stay inside the
//! copy (no `..`, no absolute path), chunks must come in order and add up to the listed
//! size, and the file's SHA-256 must be the one sent with its last chunk. A copy is
//! written under a temporary name and renamed into place only when every file passed, so
//! a crash never leaves a half copy that looks complete. Whether its content is the run's
//! is decided by the data fingerprint of what loads from it (the caller's check).

use gpo_proto::v1 as pb;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// A path the coordinator sent, as a relative path that cannot leave its folder.
pub fn safe_relative(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(format!(
            "the coordinator listed the data file `{path}`, which is not a plain relative path: refused"
        ))
    }
}

/// A data fingerprint usable as a folder name (64 hex digits), or why not.
fn checked_fingerprint(fp: &str) -> Result<&str, String> {
    if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(fp)
    } else {
        Err(format!(
            "the coordinator's data fingerprint `{fp}` is not a SHA-256 (64 hex digits)"
        ))
    }
}

/// The worker's cache of fetched data, one folder per data fingerprint.
#[derive(Debug, Clone)]
pub struct DataCache {
    dir: PathBuf,
}

/// A copy being written: files land under a temporary folder until [`Staging::commit`].
#[derive(Debug)]
pub struct Staging {
    tmp: PathBuf,
    dest: PathBuf,
}

impl DataCache {
    /// The cache under `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DataCache { dir: dir.into() }
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of the copy of the data with fingerprint `fp`.
    pub fn copy_dir(&self, fp: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join(checked_fingerprint(fp)?))
    }

    /// The complete copy of `fp`, when the cache holds one.
    pub fn lookup(&self, fp: &str) -> Option<PathBuf> {
        let d = self.copy_dir(fp).ok()?;
        d.is_dir().then_some(d)
    }

    /// Throws a copy away (its content did not load as the run's data).
    pub fn evict(&self, fp: &str) -> Result<(), String> {
        let d = self.copy_dir(fp)?;
        match std::fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "{}: cannot remove the cached copy: {e}",
                d.display()
            )),
        }
    }

    /// Starts a new copy of `fp`.
    pub fn stage(&self, fp: &str) -> Result<Staging, String> {
        let dest = self.copy_dir(fp)?;
        let tmp = self
            .dir
            .join(format!(".partial-{fp}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| format!("{}: cannot create the data cache: {e}", tmp.display()))?;
        Ok(Staging { tmp, dest })
    }
}

impl Staging {
    /// Where the file `root/path` of the copy goes (checked to stay inside it).
    pub fn path_of(&self, root: &str, path: &str) -> Result<PathBuf, String> {
        if root != "data" && root != "embeddings" {
            return Err(format!(
                "the coordinator listed a data file under `{root}`, which is neither `data` nor `embeddings`: refused"
            ));
        }
        Ok(self.tmp.join(root).join(safe_relative(path)?))
    }

    /// A writer for the file `entry`, which checks the chunks as they come.
    pub fn file(&self, entry: &pb::DataFileEntry) -> Result<FileWriter, String> {
        let path = self.path_of(&entry.root, &entry.path)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("{}: cannot create: {e}", parent.display()))?;
        }
        let out = std::fs::File::create(&path)
            .map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
        Ok(FileWriter {
            name: format!("{}/{}", entry.root, entry.path),
            out,
            path,
            expected: entry.size,
            offset: 0,
            hasher: Sha256::new(),
            done: false,
        })
    }

    /// Moves the complete copy into place and returns its folder. When another process
    /// of this host committed the same fingerprint first, its copy is kept and this one
    /// dropped (both passed the same checks).
    pub fn commit(self) -> Result<PathBuf, String> {
        match std::fs::rename(&self.tmp, &self.dest) {
            Ok(()) => {
                if let Some(d) = self.dest.parent().and_then(|p| std::fs::File::open(p).ok()) {
                    let _ = d.sync_all();
                }
                Ok(self.dest.clone())
            }
            Err(_) if self.dest.is_dir() => {
                let _ = std::fs::remove_dir_all(&self.tmp);
                Ok(self.dest.clone())
            }
            Err(e) => Err(format!(
                "{}: cannot move the fetched data into the cache: {e}",
                self.dest.display()
            )),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Not committed (a failed fetch): leave no partial copy behind.
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Writes one fetched file, checking each chunk: in order, within the listed size, and
/// the whole file's SHA-256 against the one sent with the last chunk.
#[derive(Debug)]
pub struct FileWriter {
    name: String,
    out: std::fs::File,
    path: PathBuf,
    expected: u64,
    offset: u64,
    hasher: Sha256,
    done: bool,
}

impl FileWriter {
    /// Takes the next chunk. Errors name the file and what was wrong.
    pub fn push(&mut self, c: &pb::DataFileChunk) -> Result<(), String> {
        let name = &self.name;
        if self.done {
            return Err(format!("{name}: a chunk after the last one"));
        }
        if c.offset != self.offset {
            return Err(format!(
                "{name}: a chunk at offset {} where {} was expected",
                c.offset, self.offset
            ));
        }
        let end = self.offset + c.data.len() as u64;
        if end > self.expected {
            return Err(format!(
                "{name}: {end} bytes received, but the file is listed with {}",
                self.expected
            ));
        }
        self.hasher.update(&c.data);
        self.out
            .write_all(&c.data)
            .map_err(|e| format!("{}: cannot write: {e}", self.path.display()))?;
        self.offset = end;
        if c.last {
            self.done = true;
            if c.size != self.expected || end != self.expected {
                return Err(format!(
                    "{name}: {end} bytes received of a file of {} bytes (listed with {})",
                    c.size, self.expected
                ));
            }
            let got = hex::encode(self.hasher.clone().finalize());
            if got != c.sha256 {
                return Err(format!(
                    "{name}: the received bytes hash to {got}, the coordinator's file to {}: corrupted in transit, refused",
                    c.sha256
                ));
            }
        }
        Ok(())
    }

    /// Ends the file: it must have been complete and verified.
    pub fn finish(self) -> Result<(), String> {
        if !self.done {
            return Err(format!(
                "{}: the stream ended after {} of {} bytes",
                self.name, self.offset, self.expected
            ));
        }
        self.out
            .sync_all()
            .map_err(|e| format!("{}: cannot write: {e}", self.path.display()))
    }
}

/// The data source that reads the copy at `copy` (the coordinator's `ds` relocated).
pub fn local_source(ds: &pb::DatasetPath, copy: &Path) -> Result<pb::DatasetPath, String> {
    let data = if ds.data_is_file {
        let f = ds
            .files
            .iter()
            .find(|f| f.root == "data")
            .ok_or("the coordinator listed no dataset file")?;
        copy.join("data").join(safe_relative(&f.path)?)
    } else {
        copy.join("data")
    };
    Ok(pb::DatasetPath {
        data: data.display().to_string(),
        format: ds.format.clone(),
        embeddings: copy.join("embeddings").display().to_string(),
        files: Vec::new(),
        data_is_file: ds.data_is_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn entry(root: &str, path: &str, size: u64) -> pb::DataFileEntry {
        pb::DataFileEntry {
            root: root.into(),
            path: path.into(),
            size,
        }
    }

    fn chunks(data: &[u8], size: usize) -> Vec<pb::DataFileChunk> {
        let sha = hex::encode(Sha256::digest(data));
        let mut v: Vec<_> = data
            .chunks(size)
            .enumerate()
            .map(|(i, c)| pb::DataFileChunk {
                offset: (i * size) as u64,
                data: c.to_vec(),
                last: false,
                size: data.len() as u64,
                sha256: String::new(),
            })
            .collect();
        let last = v.last_mut().unwrap();
        last.last = true;
        last.sha256 = sha;
        v
    }

    #[test]
    fn traversal_in_a_listed_path_is_refused() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "",
            "a//b",
            "./a",
            "a/.",
            "a\\..\\b",
            "..",
        ] {
            assert!(safe_relative(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            safe_relative("waves/w1/a.csv").unwrap(),
            Path::new("waves/w1/a.csv")
        );
        let t = tempfile::tempdir().unwrap();
        let s = DataCache::new(t.path()).stage(FP).unwrap();
        assert!(s.file(&entry("data", "../../escape", 1)).is_err());
        assert!(s.file(&entry("..", "x", 1)).is_err());
        assert!(DataCache::new(t.path()).stage("../x").is_err());
        assert!(!t.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn a_verified_file_is_kept_and_a_corrupted_chunk_refused() {
        let t = tempfile::tempdir().unwrap();
        let cache = DataCache::new(t.path().join("cache"));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let e = entry("embeddings", "index.json", data.len() as u64);

        let s = cache.stage(FP).unwrap();
        let mut w = s.file(&e).unwrap();
        for c in chunks(&data, 4096) {
            w.push(&c).unwrap();
        }
        w.finish().unwrap();
        assert!(cache.lookup(FP).is_none(), "visible before the commit");
        let dir = s.commit().unwrap();
        assert_eq!(
            std::fs::read(dir.join("embeddings/index.json")).unwrap(),
            data
        );
        assert_eq!(cache.lookup(FP), Some(dir));

        // One flipped byte in the middle chunk.
        let s = cache.stage(FP).unwrap();
        let mut w = s.file(&e).unwrap();
        let mut cs = chunks(&data, 4096);
        cs[1].data[17] ^= 1;
        let err = cs.iter().try_for_each(|c| w.push(c)).unwrap_err();
        assert!(
            err.contains("corrupted") && err.contains("index.json"),
            "{err}"
        );

        // Out of order, too long, cut short.
        let mut w = s.file(&e).unwrap();
        assert!(w
            .push(&chunks(&data, 4096)[1])
            .unwrap_err()
            .contains("offset"));
        let mut w = s.file(&entry("data", "a", 10)).unwrap();
        assert!(w
            .push(&chunks(&data, 4096)[0])
            .unwrap_err()
            .contains("listed"));
        let mut w = s.file(&e).unwrap();
        w.push(&chunks(&data, 4096)[0]).unwrap();
        assert!(w.finish().unwrap_err().contains("ended after 4096"));
        drop(s);
        let left: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().collect();
        assert_eq!(left.len(), 1, "a failed copy left files behind");
    }

    #[test]
    fn a_cached_copy_is_found_again_and_relocated() {
        let t = tempfile::tempdir().unwrap();
        let cache = DataCache::new(t.path());
        assert!(cache.lookup(FP).is_none());
        let s = cache.stage(FP).unwrap();
        let mut w = s.file(&entry("data", "counts.csv", 3)).unwrap();
        w.push(&chunks(b"a,b", 8)[0]).unwrap();
        w.finish().unwrap();
        s.commit().unwrap();
        // The next join (a new process) finds it by fingerprint.
        let copy = DataCache::new(t.path()).lookup(FP).unwrap();
        let ds = pb::DatasetPath {
            data: "/nowhere/counts.csv".into(),
            format: "weighted".into(),
            embeddings: "/nowhere/embeddings".into(),
            files: vec![entry("data", "counts.csv", 3)],
            data_is_file: true,
        };
        let local = local_source(&ds, &copy).unwrap();
        assert_eq!(std::fs::read(&local.data).unwrap(), b"a,b");
        assert_eq!(local.format, "weighted");
        assert!(local.embeddings.ends_with("embeddings"));
        cache.evict(FP).unwrap();
        assert!(cache.lookup(FP).is_none());
        // A second copy of the same data committed after the first is dropped, not an error.
        for _ in 0..2 {
            let s = cache.stage(FP).unwrap();
            s.file(&entry("data", "x", 0)).unwrap();
            assert!(s.commit().is_ok());
        }
    }
}
