//! Tests of [`super`], in their own file to keep the module under the ~600-line limit.

use super::*;
use crate::store::text_key;

fn meta(dim: usize) -> StoreMeta {
    StoreMeta {
        embedder: "test-embedder".into(),
        template: "plain".into(),
        dim,
        synthetic: true,
    }
}

fn vec_for(i: usize, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|j| i as f32 * 10.0 + j as f32 * 0.5 - 3.0)
        .collect()
}

fn key(i: usize) -> String {
    text_key("test-embedder", "plain", &format!("text {i}"))
}

fn write_store(dir: &Path, n: usize, dim: usize) {
    let mut w = StoreWriter::new(meta(dim));
    for i in 0..n {
        w.insert(key(i), &vec_for(i, dim)).unwrap();
    }
    w.write(dir).unwrap();
}

#[test]
fn round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    write_store(tmp.path(), 5, 7);
    let s = EmbeddingStore::open(tmp.path()).unwrap();
    assert_eq!(s.len(), 5);
    assert_eq!(s.dim(), 7);
    assert_eq!(s.meta(), &meta(7));
    for i in 0..5 {
        assert_eq!(s.get(&key(i)).unwrap(), vec_for(i, 7).as_slice());
        assert!(s.contains(&key(i)));
    }
    assert!(s.get(&key(99)).is_none());
    assert_eq!(s.keys()[3], key(3));
    // Only the two store files remain: temporaries were renamed away.
    let mut names: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![TENSOR_FILE.to_string(), INDEX_FILE.to_string()]);
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["format"], "gpo-embeddings");
    assert_eq!(index["version"], 1);
    assert_eq!(index["dim"], 7);
    assert_eq!(index["synthetic"], true);
    assert_eq!(index["keys"].as_array().unwrap().len(), 5);
}

#[test]
fn empty_store_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    StoreWriter::new(meta(4)).write(tmp.path()).unwrap();
    let s = EmbeddingStore::open(tmp.path()).unwrap();
    assert!(s.is_empty());
    assert_eq!(s.dim(), 4);
}

#[test]
fn expected_dimension_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    write_store(tmp.path(), 2, 8);
    assert!(EmbeddingStore::open_expect_dim(tmp.path(), 8).is_ok());
    let e = EmbeddingStore::open_expect_dim(tmp.path(), 16).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            StoreError::WrongDim {
                found: 8,
                expected: 16,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("index.json") && msg.contains("test-embedder"),
        "{msg}"
    );
}

#[test]
fn index_dim_disagreeing_with_tensor_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write_store(tmp.path(), 3, 32);
    let p = tmp.path().join(INDEX_FILE);
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    v["dim"] = 64.into();
    fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    let msg = EmbeddingStore::open(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains("index.json`: dim is 64 but embeddings.safetensors has 32 columns"),
        "{msg}"
    );
}

#[test]
fn equal_stores_are_equal_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = StoreWriter::new(meta(3));
    w.insert(key(0), &[1.0, 2.0, 3.0]).unwrap();
    let mut files = Vec::new();
    for i in 0..6 {
        // Each write builds its metadata map afresh (a new hash order).
        let d = dir.path().join(format!("s{i}"));
        w.write(&d).unwrap();
        files.push(std::fs::read(d.join(TENSOR_FILE)).unwrap());
        let s = EmbeddingStore::open(&d).unwrap();
        assert_eq!(s.get(&key(0)).unwrap(), &[1.0, 2.0, 3.0]);
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]));
    let n = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0);
}

#[test]
fn insert_rejects_bad_vectors_and_keys() {
    let mut w = StoreWriter::new(meta(3));
    assert!(matches!(
        w.insert(key(0), &[1.0, 2.0]),
        Err(StoreError::InsertDim {
            got: 2,
            expected: 3,
            ..
        })
    ));
    assert!(matches!(
        w.insert(key(0), &[1.0, f32::NAN, 2.0]),
        Err(StoreError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        w.insert(key(0), &[f32::INFINITY, 0.0, 2.0]),
        Err(StoreError::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        w.insert("raw text", &[0.0; 3]),
        Err(StoreError::BadKey { .. })
    ));
    w.insert(key(0), &[0.0; 3]).unwrap();
    assert!(matches!(
        w.insert(key(0), &[1.0; 3]),
        Err(StoreError::DuplicateKey { .. })
    ));
    assert_eq!(w.len(), 1);
    assert!(w.contains(&key(0)));
}

#[test]
fn missing_and_corrupt_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Nothing there.
    let msg = EmbeddingStore::open(dir).unwrap_err().to_string();
    assert!(msg.contains("index.json"), "{msg}");

    // Index but no tensor file.
    write_store(dir, 3, 4);
    fs::remove_file(dir.join(TENSOR_FILE)).unwrap();
    let msg = EmbeddingStore::open(dir).unwrap_err().to_string();
    assert!(msg.contains(TENSOR_FILE), "{msg}");

    type Corruption = (&'static str, Box<dyn Fn(&Path)>);
    let corruptions: Vec<Corruption> = vec![
        (
            "garbage index",
            Box::new(|d| fs::write(d.join(INDEX_FILE), "{not json").unwrap()),
        ),
        (
            "wrong format",
            Box::new(|d| {
                let p = d.join(INDEX_FILE);
                let s = fs::read_to_string(&p)
                    .unwrap()
                    .replace("gpo-embeddings", "other");
                fs::write(p, s).unwrap()
            }),
        ),
        (
            "empty tensor file",
            Box::new(|d| fs::write(d.join(TENSOR_FILE), b"").unwrap()),
        ),
        (
            "truncated tensor file",
            Box::new(|d| {
                let p = d.join(TENSOR_FILE);
                let b = fs::read(&p).unwrap();
                fs::write(&p, &b[..b.len() - 3]).unwrap()
            }),
        ),
        (
            "garbage tensor file",
            Box::new(|d| fs::write(d.join(TENSOR_FILE), vec![0xffu8; 64]).unwrap()),
        ),
        (
            "dropped key",
            Box::new(|d| {
                let p = d.join(INDEX_FILE);
                let mut v: serde_json::Value =
                    serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
                v["keys"].as_array_mut().unwrap().pop();
                fs::write(p, v.to_string()).unwrap()
            }),
        ),
        (
            "swapped keys",
            Box::new(|d| {
                let p = d.join(INDEX_FILE);
                let mut v: serde_json::Value =
                    serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
                v["keys"].as_array_mut().unwrap().swap(0, 1);
                fs::write(p, v.to_string()).unwrap()
            }),
        ),
        (
            "bad key",
            Box::new(|d| {
                let p = d.join(INDEX_FILE);
                let mut v: serde_json::Value =
                    serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
                v["keys"][0] = "hello".into();
                fs::write(p, v.to_string()).unwrap()
            }),
        ),
    ];
    for (what, corrupt) in corruptions {
        write_store(dir, 3, 4);
        corrupt(dir);
        match EmbeddingStore::open(dir) {
            Ok(_) => panic!("{what}: opened a corrupt store"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(INDEX_FILE) || msg.contains(TENSOR_FILE),
                    "{what}: {msg}"
                );
            }
        }
    }
}

#[test]
fn wrong_dtype_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_store(tmp.path(), 2, 2);
    let bytes = vec![0u8; 2 * 2 * 8];
    let view = safetensors::tensor::TensorView::new(Dtype::F64, vec![2, 2], &bytes).unwrap();
    let st = safetensors::serialize([(TENSOR_NAME, view)], None).unwrap();
    fs::write(tmp.path().join(TENSOR_FILE), st).unwrap();
    let msg = EmbeddingStore::open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("F64") && msg.contains("F32"), "{msg}");
}

#[test]
fn resume_appends_rows() {
    let tmp = tempfile::tempdir().unwrap();
    write_store(tmp.path(), 3, 5);
    let old = EmbeddingStore::open(tmp.path()).unwrap();
    let mut w = StoreWriter::from_existing(&old);
    assert_eq!(w.len(), 3);
    for i in 0..6 {
        if !w.contains(&key(i)) {
            w.insert(key(i), &vec_for(i, 5)).unwrap();
        }
    }
    w.write(tmp.path()).unwrap();
    // The old mapping still reads the old rows after the files were replaced.
    assert_eq!(old.len(), 3);
    assert_eq!(old.get(&key(2)).unwrap(), vec_for(2, 5).as_slice());
    let new = EmbeddingStore::open(tmp.path()).unwrap();
    assert_eq!(new.len(), 6);
    for i in 0..6 {
        assert_eq!(
            new.get(&key(i)).unwrap(),
            vec_for(i, 5).as_slice(),
            "row {i}"
        );
        assert_eq!(new.keys()[i], key(i));
    }
}
