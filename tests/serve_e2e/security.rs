//! `gpo serve` secured as the coordinator is (issue 14 with issue 10's layer): a token on every
//! route but the probes, over both protocols; TLS and mTLS on both ports; refusals counted in
//! `gpo_auth_failures_total{reason}`; session ids that cannot be guessed. Real processes, real
//! certificates (the shared rcgen PKI), real TLS clients.

use super::clients::request;
use super::pki::{endpoint, pki, Pki};
use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

const TOKEN: &str = "the-run-token-0123456789";

/// One HTTP/1.1 request over TLS with `ca` as the only root, an optional client identity and
/// an optional token: (status, body), or why no response came.
fn https(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => b.with_no_client_auth(),
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await;
        match read {
            Err(_) => return Err("no response within 60 s".into()),
            Ok(Err(e)) if out.is_empty() => return Err(format!("read: {e}")),
            _ => {}
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.len() < 12 {
            return Err(format!("no HTTP response: {text:?}"));
        }
        let status = text[9..12].parse().map_err(|_| text.clone())?;
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((status, body.to_string()))
    })
}

fn post_auth(addr: &str, path: &str, v: &Value, authorization: Option<&str>) -> (u16, Value) {
    let (st, b) = request(addr, "POST", path, v.to_string().as_bytes(), authorization).unwrap();
    (st, serde_json::from_str(&b).unwrap_or(Value::Null))
}

/// A gRPC Predict: over TLS when `tls` names the CA (and maybe a client identity).
fn grpc_predict(
    url: &str,
    tls: Option<(&Path, Option<(&Path, &Path)>)>,
    token: Option<&str>,
    req: pb::PredictRequest,
) -> Result<Vec<Vec<f32>>, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = endpoint(url, tls)
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut c = pb::serve_client::ServeClient::new(ch);
        let mut r = tonic::Request::new(req);
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let p = c.predict(r).await.map_err(|e| format!("{:?}", e.code()))?;
        Ok(p.into_inner()
            .predictions
            .into_iter()
            .map(|p| p.distribution)
            .collect())
    })
}

fn count(metrics: &str, reason: &str) -> u64 {
    let key = format!("gpo_auth_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("{key} is not exported:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

fn tls_args(p: &Pki) -> Vec<String> {
    [
        ("--tls-cert", &p.server_cert),
        ("--tls-key", &p.server_key),
        ("--tls-ca", &p.ca),
        ("--token-file", &p.token),
    ]
    .iter()
    .flat_map(|(f, v)| [f.to_string(), s(v).to_string()])
    .collect()
}

#[test]
fn a_token_and_mtls_guard_both_protocols_and_refusals_are_counted() {
    let f = fixture();
    let p = pki(&f.dir);
    let (req, expected) = eval_case(&f, 2, 10, 6);

    // A token on plain text.
    let srv = serve(
        &f.dir,
        "token",
        &f.ckpt,
        &f.store,
        &["--token-file", s(&p.token)],
    );
    let (st, _) = http(&srv.http, "GET", "/healthz", b"");
    assert_eq!(st, 200, "probes need no token");
    let (st, e) = post_auth(&srv.http, "/v1/predict", &req, None);
    assert_eq!(
        (st, e["field"].as_str()),
        (401, Some("authorization")),
        "{e}"
    );
    let (st, e) = post_auth(&srv.http, "/v1/predict", &req, Some("Bearer guess"));
    assert_eq!(st, 401, "{e}");
    assert!(!e.to_string().contains(TOKEN), "{e}");
    let bearer = format!("Bearer {TOKEN}");
    let (st, got) = post_auth(&srv.http, "/v1/predict", &req, Some(&bearer));
    assert_eq!(st, 200, "{got}");
    assert_eq!(bits(&dists(&got)), bits(&expected));
    let e = grpc_predict(&srv.grpc, None, None, pb_request(&req)).unwrap_err();
    assert_eq!(e, "Unauthenticated");
    let got = grpc_predict(&srv.grpc, None, Some(TOKEN), pb_request(&req)).unwrap();
    assert_eq!(bits(&got), bits(&expected));

    // Session ids are 128 random bits, not a counter.
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let (st, g) = post_auth(
                &srv.http,
                "/v1/groups",
                &json!({"context": req["context"]}),
                Some(&bearer),
            );
            assert_eq!(st, 200, "{g}");
            g["group_id"].as_str().unwrap().to_string()
        })
        .collect();
    for id in &ids {
        let hex = id.strip_prefix("g-").unwrap();
        assert!(
            hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
    assert_ne!(ids[0][2..18], ids[1][2..18], "{ids:?}");

    let (st, _) = request(&srv.http, "GET", "/metrics", b"", None).unwrap();
    assert_eq!(st, 401, "/metrics needs the token");
    let (st, m) = request(&srv.http, "GET", "/info", b"", Some(&bearer)).unwrap();
    assert_eq!(st, 200, "{m}");
    assert!(m.contains("\"embedder\""), "{m}");
    // At the official module's widths the encoded-context path is exact, so it is on.
    assert!(m.contains("\"encoded_context\":true"), "{m}");
    drop(srv);

    // mTLS and the token, on both ports.
    let args = tls_args(&p);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let srv = serve(&f.dir, "mtls", &f.ckpt, &f.store, &args);
    let grpc = srv.grpc.replace("http://", "https://");
    let me = Some((p.client_cert.as_path(), p.client_key.as_path()));
    let body = req.to_string();
    let (st, got) = https(
        &srv.http,
        &p.ca,
        me,
        Some(TOKEN),
        "POST",
        "/v1/predict",
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(st, 200, "{got}");
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(bits(&dists(&got)), bits(&expected));
    let got = grpc_predict(&grpc, Some((&p.ca, me)), Some(TOKEN), pb_request(&req)).unwrap();
    assert_eq!(bits(&got), bits(&expected));

    // Refused: no client certificate (HTTP closes the connection; gRPC answers
    // UNAUTHENTICATED), a foreign CA's certificate (the handshake), plain text on a TLS port.
    let r = https(
        &srv.http,
        &p.ca,
        None,
        Some(TOKEN),
        "POST",
        "/v1/predict",
        body.as_bytes(),
    );
    assert!(r.is_err(), "no client certificate was served: {r:?}");
    let e = grpc_predict(&grpc, Some((&p.ca, None)), Some(TOKEN), pb_request(&req)).unwrap_err();
    assert_eq!(e, "Unauthenticated");
    let foreign = Some((p.foreign_cert.as_path(), p.foreign_key.as_path()));
    let r = https(&srv.http, &p.ca, foreign, Some(TOKEN), "GET", "/info", b"");
    assert!(r.is_err(), "a foreign certificate was served: {r:?}");
    let r = request(&srv.http, "GET", "/healthz", b"", None);
    assert!(r.is_err(), "plain text on the TLS port: {r:?}");
    let r = https(
        &srv.http,
        &p.ca,
        me,
        None,
        "POST",
        "/v1/predict",
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.0, 401, "{r:?}");

    // Every refusal above is counted, by reason.
    let (st, m) = https(&srv.http, &p.ca, me, Some(TOKEN), "GET", "/metrics", b"").unwrap();
    assert_eq!(st, 200);
    assert!(count(&m, "missing_certificate") >= 2, "{m}");
    assert!(count(&m, "bad_certificate") >= 2, "{m}");
    assert_eq!(count(&m, "missing_token"), 1, "{m}");
}
