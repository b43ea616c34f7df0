//! Issue 10 §1 and §5 against the real tools: a Debian `prometheus` on loopback scrapes a
//! running coordinator and two workers of a small distributed run (synthetic data) once a
//! second; the test checks values through its HTTP query API, runs every panel query of
//! the Grafana dashboard in `deploy/` against it (no blank panel), lints live scrapes with
//! `promtool check metrics`, and checks the probes and `gpo status`'s metrics column.
//!
//! Needs `prometheus` and `promtool` on PATH (scripts/setup.sh installs Debian's).

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{gpo, Proc};

fn tool(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not on PATH: run scripts/setup.sh (Debian package `prometheus`)"
    );
    name.to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// An instant query's result vector.
fn query(prom: SocketAddr, q: &str) -> Vec<Value> {
    let (code, body) = get(prom, &format!("/api/v1/query?query={}", encode(q))).unwrap();
    let v: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("query `{q}`: HTTP {code}, not JSON ({e}): {body}"));
    assert_eq!(v["status"], "success", "query `{q}`: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn scalar(r: &[Value]) -> Option<f64> {
    r.first()?["value"][1].as_str()?.parse().ok()
}

fn promtool_check(what: &str, text: &str) {
    let mut c = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool check metrics on {what}:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The standard gRPC health check of `service` at `addr`.
fn grpc_health(addr: &str, service: &str) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connecting to the coordinator's gRPC port");
        let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
        c.check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("the health check")
        .into_inner()
        .status
    })
}

fn spawn(name: &str, c: &mut Command, dir: &Path) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc {
        child: c
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}")),
        name: name.into(),
    }
}

fn wait_for(what: &str, within: Duration, dir: &Path, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            let logs: String = ["coordinator", "w0", "w1", "prometheus"]
                .iter()
                .map(|n| {
                    let t =
                        std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = t.lines().rev().take(15).collect();
                    format!(
                        "--- {n}.log (tail) ---\n{}\n",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            panic!("timed out waiting for {what}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_a_live_run_and_every_dashboard_panel_has_data() {
    let prometheus = tool("prometheus");
    tool("promtool");
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (cm, w0m, w1m, pm) = (free_port(), free_port(), free_port(), free_port());

    // A run long enough to outlast the test; it is stopped at the end.
    let addr_file = dir.join("addr");
    let mut c = gpo();
    c.arg("coordinator")
        .arg("--config")
        .arg(support::small())
        .args(["--steps", "100000", "--eval-every", "5", "--workers", "2"])
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--metrics-addr", &addr(cm).to_string()])
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--addr-file")
        .arg(&addr_file)
        .env("GPO_LOG", "info");
    let coord = spawn("coordinator", &mut c, dir);
    wait_for(
        "the coordinator's address",
        Duration::from_secs(60),
        dir,
        || addr_file.exists(),
    );
    let grpc = std::fs::read_to_string(&addr_file).unwrap();
    let workers: Vec<Proc> = [("w0", w0m), ("w1", w1m)]
        .iter()
        .map(|&(name, port)| {
            let mut w = gpo();
            w.args(["worker", "--coordinator", &grpc, "--name", name])
                .args(["--threads", "1", "--connect-timeout-s", "30"])
                .args(["--metrics-addr", &addr(port).to_string()]);
            spawn(name, &mut w, dir)
        })
        .collect();

    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         \x20 - job_name: gpo-coordinator\n    static_configs:\n      - targets: ['127.0.0.1:{cm}']\n        labels: {{namespace: e2e}}\n\
         \x20 - job_name: gpo-worker\n    static_configs:\n      - targets: ['127.0.0.1:{w0m}', '127.0.0.1:{w1m}']\n        labels: {{namespace: e2e}}\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut p = Command::new(prometheus);
    p.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("tsdb").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{pm}"));
    let _prom = spawn("prometheus", &mut p, dir);
    let prom = addr(pm);

    // Probes and live scrapes, while it trains.
    wait_for("the workers' /readyz", Duration::from_secs(60), dir, || {
        [w0m, w1m]
            .iter()
            .all(|&p| get(addr(p), "/readyz").is_ok_and(|r| r.0 == 200))
    });
    assert_eq!(get(addr(cm), "/healthz").unwrap().0, 200);
    assert_eq!(
        get(addr(cm), "/readyz").unwrap().0,
        200,
        "a leader that serves is ready"
    );
    wait_for("a committed step", Duration::from_secs(60), dir, || {
        get(addr(cm), "/metrics").is_ok_and(|(_, b)| !b.contains("gpo_episodes_total 0\n"))
    });
    promtool_check(
        "the coordinator's scrape",
        &get(addr(cm), "/metrics").unwrap().1,
    );
    promtool_check("a worker's scrape", &get(addr(w0m), "/metrics").unwrap().1);
    assert_eq!(
        grpc_health(&grpc, "gpo.v1.Coordinator"),
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "the leader's gRPC health must be SERVING"
    );
    let status = support::status(&grpc);
    for port in [w0m, w1m] {
        assert!(
            status.contains(&format!("http://127.0.0.1:{port}/metrics")),
            "gpo status must list each worker's metrics address:\n{status}"
        );
    }

    // Values through Prometheus' query API.
    wait_for(
        "Prometheus to see the run",
        Duration::from_secs(30),
        dir,
        || {
            scalar(&query(prom, "sum(up{namespace=\"e2e\"})")) == Some(3.0)
                && scalar(&query(prom, "gpo_workers{state=\"live\"}")) == Some(2.0)
                && scalar(&query(
                    prom,
                    "sum(rate(gpo_step_duration_seconds_count{phase=\"allreduce\"}[10s]))",
                ))
                .is_some_and(|v| v > 0.0)
                // Two scrapes of the coordinator, so its counters have a rate.
                && scalar(&query(prom, "rate(gpo_episodes_total[10s])"))
                    .is_some_and(|v| v > 0.0)
        },
    );
    assert_eq!(
        scalar(&query(prom, "gpo_workers{state=\"member\"}")),
        Some(2.0)
    );
    assert!(scalar(&query(prom, "gpo_episodes_total")).unwrap() > 0.0);
    assert!(scalar(&query(prom, "gpo_membership_generation")).unwrap() >= 1.0);
    for phase in ["dispatch", "compute", "allreduce", "optimizer"] {
        let n = scalar(&query(
            prom,
            &format!("sum(gpo_step_duration_seconds_count{{phase=\"{phase}\"}})"),
        ));
        assert!(n.unwrap_or(0.0) > 0.0, "no {phase} step durations");
    }
    assert!(scalar(&query(prom, "sum(gpo_allreduce_bytes_total)")).unwrap() > 0.0);
    let age = scalar(&query(prom, "time() - gpo_last_step_timestamp_seconds")).unwrap();
    assert!((0.0..30.0).contains(&age), "last step {age} s ago");
    let builds = query(prom, "gpo_build_info");
    let roles: Vec<&str> = builds
        .iter()
        .filter_map(|b| b["metric"]["role"].as_str())
        .collect();
    assert_eq!(builds.len(), 3, "{builds:?}");
    assert!(
        roles.contains(&"coordinator") && roles.iter().filter(|r| **r == "worker").count() == 2
    );
    assert!(query(prom, "gpo_alignment_score{split=\"test\"}").len() == 1);

    // Every panel query of the dashboard, as Grafana would send it.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards/gpo.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let var = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "namespace")
        .unwrap()["definition"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(var.starts_with("label_values(gpo_build_info"), "{var}");
    assert_eq!(
        query(prom, "count by (namespace) (gpo_build_info)").len(),
        1
    );
    let mut blank = Vec::new();
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        let id = panel["id"].as_u64().unwrap();
        let title = panel["title"].as_str().unwrap_or("");
        for t in panel["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "10s")
                .replace("$namespace", "e2e");
            if query(prom, &q).is_empty() {
                blank.push(format!("panel {id} ({title}): {q}"));
            } else {
                checked += 1;
            }
        }
    }
    assert!(blank.is_empty(), "blank panels:\n{}", blank.join("\n"));
    assert!(checked >= 15, "only {checked} panel queries checked");

    // SIGTERM: the coordinator writes a resume point and exits 0, its metrics port closes.
    coord.signal("TERM");
    let (ok, _) = coord.wait(Duration::from_secs(60));
    let tail = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(ok, "the coordinator failed after SIGTERM:\n{tail}");
    assert!(
        get(addr(cm), "/healthz").is_err(),
        "the metrics server outlived its process"
    );
    // JSON logs carry the run, the generation and the step.
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    let event = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            // The coordinator logs each generation it sets up (`generation N: ... set up`),
            // so a run that committed a step has at least that event with generation >= 1.
            v["generation"].as_u64().is_some_and(|g| g >= 1) && v["step"].is_u64()
        })
        .unwrap_or_else(|| panic!("no JSON event with a generation:\n{log}"));
    assert!(
        event["run_id"].as_str().unwrap().starts_with("run-"),
        "{event}"
    );
    assert!(event["step"].is_u64(), "{event}");

    for w in workers {
        let _ = w.wait(Duration::from_secs(30));
    }
    eprintln!(
        "prometheus e2e: {checked} panel queries with data in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `gpo train --workers 2 --metrics-addr`: the coordinator's metrics on the given port, each
/// spawned worker's on a free port of the same host, listed by `gpo status`.
#[test]
fn gpo_train_gives_each_worker_its_own_metrics_port_listed_in_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cm = free_port();
    let mut c = gpo();
    c.arg("train")
        .arg("--config")
        .arg(support::small())
        .args([
            "--steps",
            "100000",
            "--eval-every",
            "1000",
            "--workers",
            "2",
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{cm}")])
        .arg("--out")
        .arg(dir.join("run"))
        .env("GPO_LOG", "info");
    let train = spawn("coordinator", &mut c, dir);
    let log = dir.join("coordinator.log");
    let mut grpc = String::new();
    wait_for(
        "the coordinator's address",
        Duration::from_secs(60),
        dir,
        || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            match t.split(" listening on ").nth(1) {
                Some(rest) if t.contains(" --token-file ") => {
                    grpc = rest
                        .split(|c: char| c == ';' || c.is_whitespace())
                        .next()
                        .unwrap_or("")
                        .to_string();
                    true
                }
                _ => false,
            }
        },
    );
    // The run is closed to strangers: its log names the token file `gpo status` needs.
    let t = std::fs::read_to_string(&log).unwrap_or_default();
    let token = t
        .split(" --token-file ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the log names the run's token file")
        .to_string();
    let mut urls: Vec<String> = Vec::new();
    wait_for(
        "two workers' metrics in gpo status",
        Duration::from_secs(60),
        dir,
        || {
            let s = support::status_with(&grpc, &["--token-file", &token]);
            urls = s
                .split_whitespace()
                .filter(|w| w.starts_with("http://") && w.ends_with("/metrics"))
                .map(String::from)
                .collect();
            urls.len() == 2
        },
    );
    for u in &urls {
        let hostport = u.trim_start_matches("http://").trim_end_matches("/metrics");
        let a: SocketAddr = hostport.parse().unwrap();
        assert_eq!(a.ip().to_string(), "127.0.0.1", "{u}");
        assert_ne!(a.port(), cm, "{u}");
        let (code, body) = get(a, "/metrics").unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("role=\"worker\""), "{u}: {body}");
    }
    let (code, body) = get(format!("127.0.0.1:{cm}").parse().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("role=\"coordinator\""), "{body}");
    train.signal("TERM");
    let (ok, _) = train.wait(Duration::from_secs(60));
    assert!(
        ok,
        "gpo train failed after SIGTERM:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
}
