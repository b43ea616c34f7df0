//! The request handlers' front under libFuzzer: the first byte picks a handler (Predict,
//! Rerank or CreateGroup, from JSON or from protobuf), the rest is its body. No input may
//! panic, and every refusal must name a field and say what is wrong.
#![no_main]

use gpo_proto::serve::v1 as pb;
use gpo_serve::task::{self, FieldError, Limits};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn located<T>(r: Result<T, FieldError>) {
    if let Err(e) = r {
        assert!(!e.field.is_empty(), "a refusal without a field: {e:?}");
        assert!(!e.message.is_empty(), "a refusal without a message: {e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let l = Limits::default();
    match which % 6 {
        0 => located(task::predict_from_json(body, &l)),
        1 => located(task::rerank_from_json(body, &l)),
        2 => located(task::group_from_json(body, &l)),
        3 => {
            if let Ok(r) = pb::PredictRequest::decode(body) {
                located(task::predict_from_pb(r, &l));
            }
        }
        4 => {
            if let Ok(r) = pb::RerankRequest::decode(body) {
                located(task::rerank_from_pb(r, &l));
            }
        }
        _ => {
            if let Ok(r) = pb::CreateGroupRequest::decode(body) {
                located(task::group_from_pb(r, &l));
            }
        }
    }
});
