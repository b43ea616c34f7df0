//! Request validation: a JSON document or a protobuf message becomes a typed few-shot task,
//! or a [`FieldError`] that names the offending field (`targets[2].options`). Pure: no I/O,
//! no async, no clock; the HTTP and gRPC adapters both call it, so the two protocols accept
//! and refuse exactly the same requests.

use gpo_proto::serve::v1 as pb;
use serde_json::{Map, Value};
use std::fmt;

/// A client error located at a field of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `targets[2].options`, or `body` for an unreadable document.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// What a request may hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Limits {
    /// Most context questions.
    pub max_context: usize,
    /// Most target questions (at most 128, `gpo eval`'s chunk, so a request is one forward).
    pub max_targets: usize,
    /// Most options of a question, and most rerank candidates.
    pub max_options: usize,
    /// Longest question, option, prompt or candidate, in characters (the embedder's token
    /// limit is checked too, when the text is embedded).
    pub max_text_chars: usize,
    /// How far a distribution's sum may be from 1.
    pub sum_tolerance: f32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_context: 100,
            max_targets: 100,
            max_options: 32,
            max_text_chars: 2000,
            sum_tolerance: 1e-3,
        }
    }
}

/// A question with its options.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The question's text.
    pub question: String,
    /// Its options, in order.
    pub options: Vec<String>,
}

/// A context question with the group's distribution over its options.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextItem {
    /// The question.
    pub item: Item,
    /// The group's probability of each option (sums to 1).
    pub distribution: Vec<f32>,
}

/// Where a request's group context comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Context {
    /// Given inline.
    Inline(Vec<ContextItem>),
    /// A stored session.
    Session(String),
}

/// A validated Predict request.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictTask {
    /// The group.
    pub context: Context,
    /// Questions to predict, in order.
    pub targets: Vec<Item>,
}

/// A validated Rerank request: the prompt is a question whose options are the candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankTask {
    /// The group.
    pub context: Context,
    /// The prompt as a question, the candidates as its options.
    pub item: Item,
}

/// Parses JSON bytes into an object, or `body` errors.
fn object(bytes: &[u8]) -> Result<Map<String, Value>, FieldError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| FieldError::new("body", format!("malformed JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(FieldError::new("body", "expected a JSON object")),
    }
}

fn no_other_keys(m: &Map<String, Value>, known: &[&str], at: &str) -> Result<(), FieldError> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        // An empty key names nothing: the refusal names the object that holds it (found by
        // the fuzz target, fuzz/fuzz_targets/handlers.rs).
        Some(k) if k.is_empty() => Err(FieldError::new(
            if at.is_empty() { "body" } else { at },
            format!("unknown field \"\" (known: {})", known.join(", ")),
        )),
        Some(k) => Err(FieldError::new(
            join(at, k),
            format!("unknown field (known: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

fn array<'a>(v: &'a Value, field: &str) -> Result<&'a Vec<Value>, FieldError> {
    v.as_array()
        .ok_or_else(|| FieldError::new(field, "expected an array"))
}

fn string(v: &Value, field: &str) -> Result<String, FieldError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| FieldError::new(field, "expected a string"))
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, FieldError> {
    array(v, field)?
        .iter()
        .enumerate()
        .map(|(i, s)| string(s, &format!("{field}[{i}]")))
        .collect()
}

fn numbers(v: &Value, field: &str) -> Result<Vec<f32>, FieldError> {
    array(v, field)?
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| FieldError::new(format!("{field}[{i}]"), "expected a number"))
        })
        .collect()
}

fn required<'a>(m: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a Value, FieldError> {
    m.get(key)
        .ok_or_else(|| FieldError::new(join(at, key), "required"))
}

/// A raw (unchecked) context item: question, options, distribution.
type RawContext = (String, Vec<String>, Vec<f32>);

fn json_context(v: &Value, field: &str) -> Result<Vec<RawContext>, FieldError> {
    array(v, field)?
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("{field}[{i}]");
            let m = c
                .as_object()
                .ok_or_else(|| FieldError::new(&at, "expected an object"))?;
            no_other_keys(m, &["question", "options", "distribution"], &at)?;
            Ok((
                string(required(m, "question", &at)?, &join(&at, "question"))?,
                strings(required(m, "options", &at)?, &join(&at, "options"))?,
                numbers(
                    required(m, "distribution", &at)?,
                    &join(&at, "distribution"),
                )?,
            ))
        })
        .collect()
}

fn json_group(m: &Map<String, Value>) -> Result<Option<String>, FieldError> {
    m.get("group_id").map(|v| string(v, "group_id")).transpose()
}

/// Checks a text's length and emptiness.
fn text(s: String, field: &str, l: &Limits) -> Result<String, FieldError> {
    if s.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    let n = s.chars().count();
    if n > l.max_text_chars {
        return Err(FieldError::new(
            field,
            format!(
                "text too long: {n} characters, at most {}",
                l.max_text_chars
            ),
        ));
    }
    Ok(s)
}

fn item(
    question: String,
    options: Vec<String>,
    at: &str,
    min_options: usize,
    l: &Limits,
) -> Result<Item, FieldError> {
    let question = text(question, &join(at, "question"), l)?;
    let of = join(at, "options");
    if options.len() < min_options || options.len() > l.max_options {
        return Err(FieldError::new(
            &of,
            format!(
                "{} options given, between {min_options} and {} allowed",
                options.len(),
                l.max_options
            ),
        ));
    }
    let options = options
        .into_iter()
        .enumerate()
        .map(|(k, o)| text(o, &format!("{of}[{k}]"), l))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Item { question, options })
}

/// Checks inline context items (at `field`): non-empty, bounded, distributions that match
/// their options and sum to 1.
pub fn check_context(
    raw: Vec<RawContext>,
    field: &str,
    l: &Limits,
) -> Result<Vec<ContextItem>, FieldError> {
    if raw.is_empty() {
        return Err(FieldError::new(
            field,
            "the context is empty: give at least one answered question (or a group_id)",
        ));
    }
    if raw.len() > l.max_context {
        return Err(FieldError::new(
            field,
            format!("{} context questions, at most {}", raw.len(), l.max_context),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, (q, opts, dist))| {
            let at = format!("{field}[{i}]");
            let item = item(q, opts, &at, 2, l)?;
            let df = join(&at, "distribution");
            if dist.len() != item.options.len() {
                return Err(FieldError::new(
                    &df,
                    format!("{} values for {} options", dist.len(), item.options.len()),
                ));
            }
            if let Some(k) = dist.iter().position(|p| !(p.is_finite() && *p >= 0.0)) {
                return Err(FieldError::new(
                    format!("{df}[{k}]"),
                    "must be a finite probability ≥ 0",
                ));
            }
            let sum: f32 = dist.iter().sum();
            if (sum - 1.0).abs() > l.sum_tolerance {
                return Err(FieldError::new(
                    &df,
                    format!("sums to {sum}, not 1 (±{})", l.sum_tolerance),
                ));
            }
            Ok(ContextItem {
                item,
                distribution: dist,
            })
        })
        .collect()
}

/// The group of a request: inline context, or a session id (not both, not neither).
fn context_of(
    raw: Vec<RawContext>,
    group: Option<String>,
    l: &Limits,
) -> Result<Context, FieldError> {
    match group.filter(|g| !g.is_empty()) {
        Some(g) if raw.is_empty() => Ok(Context::Session(g)),
        Some(_) => Err(FieldError::new(
            "group_id",
            "give either a context or a group_id, not both",
        )),
        None => Ok(Context::Inline(check_context(raw, "context", l)?)),
    }
}

fn check_targets(raw: Vec<(String, Vec<String>)>, l: &Limits) -> Result<Vec<Item>, FieldError> {
    if raw.is_empty() {
        return Err(FieldError::new("targets", "give at least one target"));
    }
    if raw.len() > l.max_targets {
        return Err(FieldError::new(
            "targets",
            format!("too many targets: {}, at most {}", raw.len(), l.max_targets),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, (q, o))| item(q, o, &format!("targets[{i}]"), 2, l))
        .collect()
}

fn rerank_item(prompt: String, candidates: Vec<String>, l: &Limits) -> Result<Item, FieldError> {
    let prompt = text(prompt, "prompt", l)?;
    if candidates.is_empty() || candidates.len() > l.max_options {
        return Err(FieldError::new(
            "candidates",
            format!(
                "{} candidates given, between 1 and {} allowed",
                candidates.len(),
                l.max_options
            ),
        ));
    }
    let options = candidates
        .into_iter()
        .enumerate()
        .map(|(k, c)| text(c, &format!("candidates[{k}]"), l))
        .collect::<Result<_, _>>()?;
    Ok(Item {
        question: prompt,
        options,
    })
}

/// A Predict request from JSON.
pub fn predict_from_json(bytes: &[u8], l: &Limits) -> Result<PredictTask, FieldError> {
    let m = object(bytes)?;
    no_other_keys(&m, &["context", "targets", "group_id"], "")?;
    let raw = match m.get("context") {
        Some(v) => json_context(v, "context")?,
        None => Vec::new(),
    };
    let targets = array(required(&m, "targets", "")?, "targets")?
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("targets[{i}]");
            let o = t
                .as_object()
                .ok_or_else(|| FieldError::new(&at, "expected an object"))?;
            no_other_keys(o, &["question", "options"], &at)?;
            Ok((
                string(required(o, "question", &at)?, &join(&at, "question"))?,
                strings(required(o, "options", &at)?, &join(&at, "options"))?,
            ))
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    let context = context_of(raw, json_group(&m)?, l)?;
    Ok(PredictTask {
        context,
        targets: check_targets(targets, l)?,
    })
}

/// A Rerank request from JSON.
pub fn rerank_from_json(bytes: &[u8], l: &Limits) -> Result<RerankTask, FieldError> {
    let m = object(bytes)?;
    no_other_keys(&m, &["context", "prompt", "candidates", "group_id"], "")?;
    let raw = match m.get("context") {
        Some(v) => json_context(v, "context")?,
        None => Vec::new(),
    };
    let prompt = string(required(&m, "prompt", "")?, "prompt")?;
    let candidates = strings(required(&m, "candidates", "")?, "candidates")?;
    let context = context_of(raw, json_group(&m)?, l)?;
    Ok(RerankTask {
        context,
        item: rerank_item(prompt, candidates, l)?,
    })
}

/// A CreateGroup request from JSON: the context to store.
pub fn group_from_json(bytes: &[u8], l: &Limits) -> Result<Vec<ContextItem>, FieldError> {
    let m = object(bytes)?;
    no_other_keys(&m, &["context"], "")?;
    check_context(
        json_context(required(&m, "context", "")?, "context")?,
        "context",
        l,
    )
}

fn pb_context(c: Vec<pb::ContextItem>) -> Vec<RawContext> {
    c.into_iter()
        .map(|c| (c.question, c.options, c.distribution))
        .collect()
}

/// A Predict request from its protobuf message.
pub fn predict_from_pb(r: pb::PredictRequest, l: &Limits) -> Result<PredictTask, FieldError> {
    let context = context_of(pb_context(r.context), Some(r.group_id), l)?;
    let targets = r
        .targets
        .into_iter()
        .map(|t| (t.question, t.options))
        .collect();
    Ok(PredictTask {
        context,
        targets: check_targets(targets, l)?,
    })
}

/// A Rerank request from its protobuf message.
pub fn rerank_from_pb(r: pb::RerankRequest, l: &Limits) -> Result<RerankTask, FieldError> {
    let context = context_of(pb_context(r.context), Some(r.group_id), l)?;
    Ok(RerankTask {
        context,
        item: rerank_item(r.prompt, r.candidates, l)?,
    })
}

/// A CreateGroup request from its protobuf message.
pub fn group_from_pb(
    r: pb::CreateGroupRequest,
    l: &Limits,
) -> Result<Vec<ContextItem>, FieldError> {
    check_context(pb_context(r.context), "context", l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        predict_from_json(s.as_bytes(), &Limits::default())
            .unwrap_err()
            .field
    }

    const CTX: &str = r#"[{"question":"q","options":["a","b"],"distribution":[0.3,0.7]}]"#;

    #[test]
    fn an_empty_key_is_refused_naming_its_object() {
        assert_eq!(err(r#"{"":1}"#), "body");
        let e = err(
            r#"{"context":[{"":1,"question":"q","options":["a","b"],"distribution":[0.3,0.7]}],"targets":[]}"#,
        );
        assert_eq!(e, "context[0]");
    }

    #[test]
    fn a_good_request_parses() {
        let t = predict_from_json(
            format!(
                r#"{{"context":{CTX},"targets":[{{"question":"t","options":["x","y","z"]}}]}}"#
            )
            .as_bytes(),
            &Limits::default(),
        )
        .unwrap();
        let Context::Inline(c) = &t.context else {
            panic!()
        };
        assert_eq!(c[0].distribution, vec![0.3, 0.7]);
        assert_eq!(t.targets[0].options.len(), 3);
    }

    #[test]
    fn each_bad_field_is_named() {
        let t = r#"[{"question":"t","options":["x","y"]}]"#;
        assert_eq!(err("{"), "body");
        assert_eq!(err("[]"), "body");
        assert_eq!(
            err(&format!(r#"{{"context":[],"targets":{t}}}"#)),
            "context"
        );
        assert_eq!(err(&format!(r#"{{"context":{CTX}}}"#)), "targets");
        assert_eq!(
            err(&format!(r#"{{"context":{CTX},"targets":[]}}"#)),
            "targets"
        );
        assert_eq!(
            err(&format!(
                r#"{{"context":[{{"question":"q","options":["a","b"],"distribution":[0.3]}}],"targets":{t}}}"#
            )),
            "context[0].distribution"
        );
        assert_eq!(
            err(&format!(
                r#"{{"context":[{{"question":"q","options":["a","b"],"distribution":[0.3,0.3]}}],"targets":{t}}}"#
            )),
            "context[0].distribution"
        );
        assert_eq!(
            err(&format!(
                r#"{{"context":{CTX},"targets":[{{"question":"t","options":["x"]}},{{"question":"t","options":["y","z"]}}]}}"#
            )),
            "targets[0].options"
        );
        assert_eq!(
            err(&format!(
                r#"{{"context":{CTX},"targets":[{{"question":"t","options":["x","y"]}},{{"question":"t","options":[1]}}]}}"#
            )),
            "targets[1].options[0]"
        );
        let long = "x".repeat(2001);
        assert_eq!(
            err(&format!(
                r#"{{"context":{CTX},"targets":[{{"question":"{long}","options":["x","y"]}}]}}"#
            )),
            "targets[0].question"
        );
        let many: Vec<String> = (0..101)
            .map(|_| r#"{"question":"t","options":["x","y"]}"#.to_string())
            .collect();
        assert_eq!(
            err(&format!(
                r#"{{"context":{CTX},"targets":[{}]}}"#,
                many.join(",")
            )),
            "targets"
        );
        assert_eq!(
            err(&format!(r#"{{"context":{CTX},"targets":{t},"extra":1}}"#)),
            "extra"
        );
        assert_eq!(
            err(&format!(
                r#"{{"context":{CTX},"group_id":"g-1","targets":{t}}}"#
            )),
            "group_id"
        );
    }

    #[test]
    fn rerank_and_groups_name_their_fields() {
        let l = Limits::default();
        let e = rerank_from_json(
            format!(r#"{{"context":{CTX},"prompt":"p","candidates":[]}}"#).as_bytes(),
            &l,
        )
        .unwrap_err();
        assert_eq!(e.field, "candidates");
        let e = rerank_from_json(
            format!(r#"{{"context":{CTX},"prompt":" ","candidates":["a"]}}"#).as_bytes(),
            &l,
        )
        .unwrap_err();
        assert_eq!(e.field, "prompt");
        let e = group_from_json(
            br#"{"context":[{"question":"q","options":["a","b"],"distribution":[1,-0.0001]}]}"#,
            &l,
        )
        .unwrap_err();
        assert_eq!(e.field, "context[0].distribution[1]");
        let t = rerank_from_pb(
            pb::RerankRequest {
                group_id: "g-1".into(),
                prompt: "p".into(),
                candidates: vec!["a".into()],
                ..Default::default()
            },
            &l,
        )
        .unwrap();
        assert_eq!(t.context, Context::Session("g-1".into()));
    }
}
