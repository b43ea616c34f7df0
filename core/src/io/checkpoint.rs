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
}
