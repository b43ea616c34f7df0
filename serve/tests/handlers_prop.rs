//! Property test of the request handlers' front (JSON and protobuf decoding and validation,
//! shared by the HTTP and gRPC adapters): random and malformed requests never panic, and
//! every refusal names a field that exists in the request's schema. Bounded (a few hundred
//! cases per property) so it runs in seconds; this is the CI form of the fuzz target in
//! `fuzz/fuzz_targets/handlers.rs` (cargo-fuzz, nightly), which CI does not build.

use gpo_proto::serve::v1 as pb;
use gpo_serve::task::{self, FieldError, Limits};
use proptest::prelude::*;
use prost::Message;
use serde_json::{json, Value};

/// A refusal names `body`, or a path whose first segment is one of the request's keys, and
/// says what is wrong.
fn known_root(e: &FieldError, keys: &[&str]) -> bool {
    let root = e.field.split(['.', '[']).next().unwrap_or_default();
    !e.message.is_empty()
        && !e.field.is_empty()
        && (e.field == "body" || keys.contains(&root) || e.message.starts_with("unknown field"))
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<f64>().prop_map(|f| json!(f)),
        (-3i64..5).prop_map(|i| json!(i)),
        "[a-z ]{0,12}".prop_map(Value::String),
        Just(json!("")),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("question".to_string()),
                    Just("options".to_string()),
                    Just("distribution".to_string()),
                    Just("context".to_string()),
                    Just("targets".to_string()),
                    "[a-z]{1,6}".prop_map(String::from),
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn context_item() -> impl Strategy<Value = Value> {
    (
        "[a-z ]{0,8}",
        prop::collection::vec("[a-z]{0,4}", 0..4),
        prop::collection::vec(-0.2f64..1.2, 0..4),
    )
        .prop_map(|(q, o, d)| json!({"question": q, "options": o, "distribution": d}))
}

fn target() -> impl Strategy<Value = Value> {
    ("[a-z ]{0,8}", prop::collection::vec("[a-z]{0,4}", 0..4))
        .prop_map(|(q, o)| json!({"question": q, "options": o}))
}

/// Near-valid requests: the right shape with random sizes, values and an occasional stray.
fn request() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(context_item(), 0..4),
        prop::collection::vec(target(), 0..4),
        prop::option::of(value()),
        prop::option::of("[a-z-]{0,6}"),
    )
        .prop_map(|(c, t, stray, g)| {
            let mut v =
                json!({"context": c, "targets": t, "prompt": "p", "candidates": ["a", "b"]});
            if let Some(s) = stray {
                v["extra"] = s;
            }
            if let Some(g) = g {
                v["group_id"] = json!(g);
            }
            v
        })
}

fn check_all(bytes: &[u8]) {
    let l = Limits::default();
    if let Err(e) = task::predict_from_json(bytes, &l) {
        assert!(
            known_root(
                &e,
                &[
                    "context",
                    "targets",
                    "group_id",
                    "prompt",
                    "candidates",
                    "extra"
                ]
            ),
            "{e:?}"
        );
    }
    if let Err(e) = task::rerank_from_json(bytes, &l) {
        assert!(
            known_root(
                &e,
                &[
                    "context",
                    "targets",
                    "group_id",
                    "prompt",
                    "candidates",
                    "extra"
                ]
            ),
            "{e:?}"
        );
    }
    if let Err(e) = task::group_from_json(bytes, &l) {
        assert!(
            known_root(
                &e,
                &[
                    "context",
                    "targets",
                    "group_id",
                    "prompt",
                    "candidates",
                    "extra"
                ]
            ),
            "{e:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_as_json(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_all(&bytes);
    }

    #[test]
    fn random_json_documents(v in value()) {
        check_all(v.to_string().as_bytes());
    }

    #[test]
    fn near_valid_json_requests(v in request(), cut in 0usize..400) {
        let text = v.to_string();
        check_all(text.as_bytes());
        // The same document cut short is malformed JSON.
        let cut = cut.min(text.len());
        check_all(&text.as_bytes()[..cut]);
    }

    #[test]
    fn random_protobuf(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let l = Limits::default();
        if let Ok(r) = pb::PredictRequest::decode(bytes.as_slice()) {
            if let Err(e) = task::predict_from_pb(r, &l) {
                prop_assert!(known_root(&e, &["context", "targets", "group_id"]), "{e:?}");
            }
        }
        if let Ok(r) = pb::RerankRequest::decode(bytes.as_slice()) {
            if let Err(e) = task::rerank_from_pb(r, &l) {
                prop_assert!(known_root(&e, &["context", "prompt", "candidates", "group_id"]), "{e:?}");
            }
        }
        if let Ok(r) = pb::CreateGroupRequest::decode(bytes.as_slice()) {
            if let Err(e) = task::group_from_pb(r, &l) {
                prop_assert!(known_root(&e, &["context"]), "{e:?}");
            }
        }
    }

    #[test]
    fn near_valid_protobuf(v in request(), flip in any::<usize>()) {
        let l = Limits::default();
        let strs = |x: &Value| -> Vec<String> {
            x.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
        };
        let r = pb::PredictRequest {
            context: v["context"].as_array().unwrap().iter().map(|c| pb::ContextItem {
                question: c["question"].as_str().unwrap_or_default().into(),
                options: strs(&c["options"]),
                distribution: c["distribution"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            }).collect(),
            targets: v["targets"].as_array().unwrap().iter().map(|t| pb::Target {
                question: t["question"].as_str().unwrap_or_default().into(),
                options: strs(&t["options"]),
            }).collect(),
            group_id: v["group_id"].as_str().unwrap_or_default().into(),
        };
        let mut bytes = r.encode_to_vec();
        if let Err(e) = task::predict_from_pb(r, &l) {
            prop_assert!(known_root(&e, &["context", "targets", "group_id"]), "{e:?}");
        }
        // One flipped byte: decodes to something, or is refused by the decoder.
        if !bytes.is_empty() {
            let i = flip % bytes.len();
            bytes[i] ^= 0x80;
            if let Ok(r) = pb::PredictRequest::decode(bytes.as_slice()) {
                if let Err(e) = task::predict_from_pb(r, &l) {
                    prop_assert!(known_root(&e, &["context", "targets", "group_id"]), "{e:?}");
                }
            }
        }
    }
}
