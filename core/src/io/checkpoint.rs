//! Checkpoint files: atomic writes (temporary file in the same folder, fsync, rename, fsync
//! of the folder) and loads whose errors name the file.

use crate::checkpoint::{decode, encode, Checkpoint};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a
/// partial write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Saves a checkpoint atomically.
pub fn save(path: &Path, c: &Checkpoint) -> Result<(), String> {
    let bytes =
        encode(c).map_err(|e| format!("{}: cannot encode checkpoint: {e}", path.display()))?;
    write_atomic(path, &bytes)
        .map_err(|e| format!("{}: cannot write checkpoint: {e}", path.display()))
}

/// Loads and verifies a checkpoint (or a plain safetensors file of parameters).
pub fn load(path: &Path) -> Result<Checkpoint, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{}: cannot read checkpoint: {e}", path.display()))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The file name of the resume point of `step` in a run's `checkpoints/` folder.
pub fn resume_point_name(step: u64) -> String {
    format!("step-{step:010}.safetensors")
}

/// The resume points in `dir`, newest (highest step) first.
pub fn resume_points(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut v: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.0));
    v
}

/// Loads the newest resume point of `dir` that decodes and verifies. A corrupt newer one
/// is skipped; its error is returned among the warnings, so the caller can say that it
/// fell back.
pub fn load_newest(dir: &Path) -> Result<(Checkpoint, std::path::PathBuf, Vec<String>), String> {
    let mut warnings = Vec::new();
    let points = resume_points(dir);
    if points.is_empty() {
        return Err(format!(
            "{}: no checkpoint to resume from (expected files step-NNNNNNNNNN.safetensors)",
            dir.display()
        ));
    }
    for (_, path) in points {
        match load(&path) {
            Ok(c) => return Ok((c, path, warnings)),
            Err(e) => warnings.push(e),
        }
    }
    Err(format!(
        "{}: every checkpoint is unreadable: {}",
        dir.display(),
        warnings.join("; ")
    ))
}

/// Deletes all but the newest `keep` resume points of `dir`.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    for (_, path) in resume_points(dir).into_iter().skip(keep.max(1)) {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::NamedArray;

    #[test]
    fn atomic_save_and_load_name_the_file_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/best.safetensors");
        let c = Checkpoint {
            params: vec![NamedArray {
                name: "a".into(),
                shape: vec![1],
                data: vec![2.0],
            }],
            adam: None,
            step: 1,
            config: serde_json::Value::Null,
            progress: None,
            data: None,
        };
        save(&p, &c).unwrap();
        assert_eq!(load(&p).unwrap(), c);
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file remains");
        std::fs::write(&p, b"garbage").unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.contains("best.safetensors"), "{e}");
        assert!(load(&dir.path().join("missing"))
            .unwrap_err()
            .contains("cannot read"));
    }

    #[test]
    fn the_newest_readable_resume_point_wins_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = |step| Checkpoint {
            params: vec![NamedArray {
                name: "a".into(),
                shape: vec![1],
                data: vec![step as f32],
            }],
            adam: None,
            step,
            config: serde_json::Value::Null,
            progress: Some(serde_json::json!({"step": step})),
            data: None,
        };
        for step in [10, 20, 30] {
            save(&dir.path().join(resume_point_name(step)), &ckpt(step)).unwrap();
        }
        // The newest is corrupt: the one before is loaded, with a warning naming the file.
        let newest = dir.path().join(resume_point_name(30));
        let mut bytes = std::fs::read(&newest).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 1;
        std::fs::write(&newest, bytes).unwrap();
        let (c, path, warnings) = load_newest(dir.path()).unwrap();
        assert_eq!(c.step, 20);
        assert!(path.ends_with(resume_point_name(20)));
        assert!(warnings[0].contains("step-0000000030") && warnings[0].contains("checksum"));
        prune(dir.path(), 2).unwrap();
        let left: Vec<u64> = resume_points(dir.path()).iter().map(|p| p.0).collect();
        assert_eq!(left, vec![30, 20]);
        assert!(load_newest(&dir.path().join("none")).is_err());
    }
}
