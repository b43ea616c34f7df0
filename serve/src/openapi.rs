//! The OpenAPI 3 document of the HTTP API and the `/docs` page. There is no network to fetch
//! Swagger UI's JavaScript from and no assets are vendored, so `/docs` is a self-contained
//! HTML page (a few lines of inline script) that renders `/openapi.json`: each route, its
//! request and response schemas, and the error shape.

use serde_json::{json, Value};

/// The OpenAPI document.
pub fn document() -> Value {
    let item = json!({"type": "object", "required": ["question", "options"], "properties": {
        "question": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"}, "minItems": 2}}});
    let ctx = json!({"type": "object", "required": ["question", "options", "distribution"], "properties": {
        "question": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "distribution": {"type": "array", "items": {"type": "number", "minimum": 0},
            "description": "The group's probability of each option; as many as options, summing to 1."}}});
    let error = json!({"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"},
        "field": {"type": ["string", "null"], "description": "The offending field, e.g. targets[2].options"}}});
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let ok = |schema: &str| json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let errors = |mut r: Value| {
        for (code, what) in [
            ("400", "Bad input; `field` names it"),
            ("404", "Unknown group_id"),
            ("429", "Over the concurrency and queue limits"),
            ("504", "Deadline passed"),
        ] {
            r[code] = json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        }
        r
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "gpo serve", "version": env!("CARGO_PKG_VERSION"),
            "description": "Few-shot prediction of a group's answer distributions (GPO) and reranking of candidate responses by the group's predicted preference. gRPC twin: gpo.v1.Serve (proto/gpo/v1/serve.proto)."},
        "paths": {
            "/v1/predict": {"post": {"summary": "Predict a group's distribution over each target's options",
                "requestBody": body("PredictRequest"), "responses": errors(json!({"200": ok("PredictResponse")}))}},
            "/v1/rerank": {"post": {"summary": "Rank candidate responses to a prompt by the group's predicted preference",
                "requestBody": body("RerankRequest"), "responses": errors(json!({"200": ok("RerankResponse")}))}},
            "/v1/groups": {"post": {"summary": "Store a group's context; later calls send group_id and targets only",
                "requestBody": body("GroupRequest"), "responses": errors(json!({"200": ok("GroupResponse")}))}},
            "/info": {"get": {"summary": "Model, embedder, template and limits", "responses": {"200": {"description": "OK"}}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "OK"}}}},
            "/readyz": {"get": {"summary": "Readiness (after a warm-up request)", "responses": {"200": {"description": "Ready"}, "503": {"description": "Warming up"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}}
        },
        "components": {"schemas": {
            "Target": item,
            "ContextItem": ctx,
            "Error": error,
            "PredictRequest": {"type": "object", "required": ["targets"], "properties": {
                "context": {"type": "array", "items": {"$ref": "#/components/schemas/ContextItem"}, "minItems": 1},
                "group_id": {"type": "string", "description": "Instead of context"},
                "targets": {"type": "array", "items": {"$ref": "#/components/schemas/Target"}, "minItems": 1}}},
            "PredictResponse": {"type": "object", "properties": {"predictions": {"type": "array", "items": {
                "type": "object", "properties": {"distribution": {"type": "array", "items": {"type": "number"}}}}}}},
            "RerankRequest": {"type": "object", "required": ["prompt", "candidates"], "properties": {
                "context": {"type": "array", "items": {"$ref": "#/components/schemas/ContextItem"}},
                "group_id": {"type": "string"},
                "prompt": {"type": "string"},
                "candidates": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
            "RerankResponse": {"type": "object", "properties": {"results": {"type": "array", "items": {
                "type": "object", "properties": {"index": {"type": "integer"}, "score": {"type": "number"}}}}}},
            "GroupRequest": {"type": "object", "required": ["context"], "properties": {
                "context": {"type": "array", "items": {"$ref": "#/components/schemas/ContextItem"}, "minItems": 1}}},
            "GroupResponse": {"type": "object", "properties": {"group_id": {"type": "string"}, "context_size": {"type": "integer"}}}
        }}
    })
}

/// `/docs`: renders `/openapi.json` without external assets.
pub const DOCS_HTML: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>gpo serve API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:.5em;overflow:auto}h2{border-bottom:1px solid #ccc}</style>
</head><body><h1>gpo serve API</h1><p>The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>
(load it into any OpenAPI viewer). This page renders it without external scripts.</p><div id="api">loading…</div>
<script>
fetch('/openapi.json').then(r=>r.json()).then(d=>{
 const esc=s=>String(s).replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));
 let h='<p>'+esc(d.info.description)+'</p>';
 for(const [p,ops] of Object.entries(d.paths)) for(const [m,o] of Object.entries(ops)){
  h+='<h2>'+m.toUpperCase()+' '+esc(p)+'</h2><p>'+esc(o.summary)+'</p>';
  if(o.requestBody) h+='<p>Request: <code>'+esc(o.requestBody.content['application/json'].schema['$ref'].split('/').pop())+'</code></p>';
  h+='<p>Responses: '+Object.entries(o.responses).map(([c,r])=>esc(c)+' '+esc(r.description)).join('; ')+'</p>';
 }
 h+='<h2>Schemas</h2>';
 for(const [n,s] of Object.entries(d.components.schemas)) h+='<h3>'+esc(n)+'</h3><pre>'+esc(JSON.stringify(s,null,2))+'</pre>';
 document.getElementById('api').innerHTML=h;
}).catch(e=>{document.getElementById('api').textContent='could not load /openapi.json: '+e});
</script></body></html>
"#;
