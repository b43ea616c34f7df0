//! Issue 10 §3's attacks, each refused, against real `gpo` processes with certificates the
//! test makes (rcgen: a CA, a server certificate for 127.0.0.1/localhost, a client
//! certificate, and a second, foreign CA with its own client certificate):
//!
//! - no credentials, a client certificate from another CA, a wrong token: refused;
//! - a forged `Leave` and a forged heartbeat, by a client that knows the run id and the
//!   worker ids (from `Status`, with valid credentials): refused, and the run goes on;
//! - a wrong run id: refused without revealing the real one;
//! - an oversized message (a 100 MB name): refused, and the coordinator keeps serving;
//!   a name over its limit: refused, naming the field;
//! - a stranger on a worker's ring port: refused and logged, and the real ring forms;
//! - `gpo train --workers N` refuses a local process that is not one of its workers.
//!
//! And the positive claim: a 2-worker run with mTLS and a token ends with bitwise the
//! parameters of the same run without them.

#[path = "support/pki.rs"]
mod pki;
mod support;

use pki::{pki, Pki};

use gpo_proto::v1 as pb;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{content, gpo, small, Proc};
use tonic::transport::Channel;

const STEPS: u32 = 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Adds a bearer token, as any gRPC client can.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    }
}

type Raw = pb::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// A raw gRPC client, as an attacker would write one: TLS with a CA (`None`: plain), an
/// optional client identity, an optional token.
async fn raw(
    port: u16,
    tls: Option<(&Path, Option<(&Path, &Path)>)>,
    token: Option<&str>,
) -> Result<Raw, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ch = pki::endpoint(&format!("{scheme}://127.0.0.1:{port}"), tls)
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let header = token.map(|t| format!("Bearer {t}").parse().unwrap());
    Ok(
        pb::coordinator_client::CoordinatorClient::with_interceptor(ch, Bearer(header))
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(256 << 20),
    )
}

fn tls_flags(c: &mut Command, cert: &Path, key: &Path, p: &Pki) {
    c.arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--tls-ca")
        .arg(&p.ca)
        .arg("--token-file")
        .arg(&p.token);
}

/// `gpo train --workers 2`, the run without credentials of its own; while it runs, a local
/// process without the run's token is refused. Returns the output folder.
fn local_run_refusing_strangers(dir: &Path) -> PathBuf {
    let out = dir.join("local");
    let mut child = gpo()
        .arg("train")
        .arg("--config")
        .arg(small())
        .args(["--steps", &STEPS.to_string(), "--eval-every", "10"])
        .args(["--workers", "2", "--out"])
        .arg(&out)
        .env("GPO_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let l = lines
            .next()
            .expect("gpo train ended before it listened")
            .unwrap();
        if let Some(rest) = l.split(" listening on ").nth(1) {
            let addr = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(';');
            break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = raw(port, None, None).await.unwrap();
        let e = c
            .register(pb::RegisterRequest {
                name: "squatter".into(),
                fresh: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    });
    // Drain the rest of the log so the process never blocks on a full pipe.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "gpo train --workers 2 failed:\n{}",
        rest.join("\n")
    );
    let log = rest.join("\n");
    assert!(
        log.contains("missing_token"),
        "the refusal was not logged:\n{log}"
    );
    out
}

#[test]
fn a_secured_run_refuses_every_stranger_and_ends_as_the_plain_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let plain = local_run_refusing_strangers(dir.path());

    let port = free_port();
    let addr_file = dir.path().join("addr");
    let mut c = gpo();
    let metrics_port = free_port();
    c.arg("coordinator")
        .arg("--config")
        .arg(small())
        .args(["--steps", &STEPS.to_string(), "--eval-every", "10"])
        .args(["--workers", "2", "--heartbeat-ms", "200"])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--out"])
        .arg(dir.path().join("secured"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .arg("--addr-file")
        .arg(&addr_file);
    tls_flags(&mut c, &p.server_cert, &p.server_key, &p);
    let coord = Proc::spawn(&mut c, "the secured coordinator");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !addr_file.exists() {
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("https://localhost:{port}");
    let worker = |name: &str, ring: u16| {
        let mut c = gpo();
        c.args(["worker", "--coordinator", &url, "--name", name])
            .args(["--connect-timeout-s", "60", "--threads", "1"])
            .args(["--ring-bind", &format!("127.0.0.1:{ring}")]);
        tls_flags(&mut c, &p.client_cert, &p.client_key, &p);
        Proc::spawn(&mut c, &format!("worker {name}"))
    };
    let ring_a = free_port();
    let wa = worker("a", ring_a);
    let token = "the-run-token-0123456789";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client_id = Some((p.client_cert.as_path(), p.client_key.as_path()));
    let st = rt.block_on(async {
        // Valid credentials see the run (as an operator's `gpo status` does).
        let mut ok = raw(port, Some((&p.ca, client_id)), Some(token))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = ok.status(pb::StatusRequest {}).await.unwrap().into_inner();
            if !st.workers.is_empty() {
                break st;
            }
            assert!(Instant::now() < deadline, "worker a never registered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Worker a is registered, so its ring listener is bound: a stranger gets there first.
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", ring_a)).unwrap();
    stranger.write_all(&[0x5a; 256]).unwrap();
    let wb = worker("b", free_port());

    rt.block_on(async {
        let real_id = st.run_id.clone();
        let victim = st.workers[0].worker_id;
        // No credentials at all: a plain client cannot even speak to a TLS port.
        let refused = match raw(port, None, None).await {
            Err(_) => true,
            Ok(mut c) => c.status(pb::StatusRequest {}).await.is_err(),
        };
        assert!(refused, "a plain client was served");
        // TLS, but no client certificate and no token.
        let mut c = raw(port, Some((&p.ca, None)), None).await.unwrap();
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // A client certificate from another CA, with the right token: the handshake fails.
        let foreign = Some((p.foreign_cert.as_path(), p.foreign_key.as_path()));
        let refused = match raw(port, Some((&p.ca, foreign)), Some(token)).await {
            Err(_) => true,
            Ok(mut c) => c.status(pb::StatusRequest {}).await.is_err(),
        };
        assert!(refused, "a certificate of another CA was accepted");
        // The right certificate, a wrong token.
        let mut c = raw(port, Some((&p.ca, client_id)), Some("guess"))
            .await
            .unwrap();
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(!e.message().contains(token));

        // Full credentials, but not a worker's registration secret: forged calls in a
        // worker's name are refused.
        let mut c = raw(port, Some((&p.ca, client_id)), Some(token))
            .await
            .unwrap();
        let e = c
            .leave(pb::LeaveRequest {
                run_id: real_id.clone(),
                worker_id: victim,
                reason: "forged".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = c
            .heartbeat(pb::HeartbeatRequest {
                run_id: real_id.clone(),
                worker_id: victim,
                step: 0,
                worker_secret: "0".repeat(64),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // A wrong run id: refused, and the refusal does not give the real one away.
        let e = c
            .heartbeat(pb::HeartbeatRequest {
                run_id: "run-guess".into(),
                worker_id: victim,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(!e.message().contains(&real_id), "{}", e.message());
        // A name over its limit, and a 100 MB one (over the message limit).
        let e = c
            .register(pb::RegisterRequest {
                name: "n".repeat(1000),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("name: 1000 bytes"),
            "{}",
            e.message()
        );
        let t = Instant::now();
        let e = c
            .register(pb::RegisterRequest {
                name: "n".repeat(100 << 20),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{e:?}"
        );
        eprintln!(
            "security: a 100 MB registration refused in {:.2}s: {}",
            t.elapsed().as_secs_f64(),
            e.message()
        );
        // The coordinator keeps serving, and kept none of it.
        let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert!(st.workers.iter().all(|w| w.name.len() <= 128));
        // Counted, not only logged: the plain client's and the foreign CA's failed handshakes.
        let scrape = {
            use std::io::{Read, Write};
            let mut t = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
            t.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            t.read_to_string(&mut body).unwrap();
            body
        };
        let count = |reason: &str| -> f64 {
            let key = format!("gpo_auth_failures_total{{reason=\"{reason}\"}} ");
            scrape
                .lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .unwrap_or_else(|| panic!("no {key} in the scrape:\n{scrape}"))
                .trim()
                .parse()
                .unwrap()
        };
        assert!(count("bad_certificate") >= 2.0, "{scrape}");
        for why in [
            "missing_certificate",
            "bad_token",
            "worker_secret",
            "wrong_run",
        ] {
            assert!(count(why) >= 1.0, "{why} not counted:\n{scrape}");
        }
    });
    drop(stranger);
    let out = coord.finish(Duration::from_secs(180));
    let a = wa.finish(Duration::from_secs(30));
    wb.finish(Duration::from_secs(30));
    assert!(
        a.contains("refused a connection that did not prove it is rank 1 of this run"),
        "worker a did not log the stranger:\n{a}"
    );
    for why in [
        "bad_certificate",
        "missing_certificate",
        "bad_token",
        "worker_secret",
        "wrong_run",
    ] {
        assert!(
            out.contains(why),
            "the coordinator did not log {why}:\n{out}"
        );
    }
    assert!(
        content(&dir.path().join("secured/last.safetensors"))
            == content(&plain.join("last.safetensors")),
        "the run with mTLS and a token ended with other parameters than the plain run"
    );
}
