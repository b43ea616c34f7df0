//! The HTTP edge of a gpo process at `--metrics-addr`: `/metrics` (the Prometheus plain
//! text format), `/healthz` (the process is live) and `/readyz` (it can do its job:
//! a worker once its data and embeddings are loaded, a coordinator once it leads and
//! serves; a standby coordinator is live but not ready, so Kubernetes keeps it out of the
//! Service).
//!
//! Why it exists: Kubernetes probes and Prometheus scrapes need an HTTP/1.1 port that
//! stays up while the process campaigns, loads data or trains, whatever its gRPC server
//! does. The server runs on its own small tokio runtime, so it serves from the moment the
//! process starts, and it stops when the [`MetricsServer`] is dropped (the process exits,
//! SIGTERM included).

use crate::metrics::{encode_text, TEXT_CONTENT_TYPE};
use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Whether the process is ready, and why not. Clones share one state.
#[derive(Clone, Debug)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    /// Not ready yet, for `why`.
    pub fn not_ready(why: impl Into<String>) -> Health {
        Health(Arc::new(Mutex::new(Some(why.into()))))
    }

    /// The process can do its job now.
    pub fn set_ready(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// It cannot any more (or not yet), for `why`.
    pub fn set_not_ready(&self, why: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
    }

    /// `None` when ready, else why not.
    pub fn why_not(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A running `/metrics`, `/healthz`, `/readyz` server. Dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// The routes, for a server or a test.
pub fn router(registry: Arc<Registry>, health: Health) -> Router {
    let metrics = move || {
        let r = registry.clone();
        async move { ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], encode_text(&r)) }
    };
    let ready = move || {
        let h = health.clone();
        async move {
            match h.why_not() {
                None => (StatusCode::OK, "ready\n".to_string()),
                Some(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }
        }
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this port serves /metrics, /healthz and /readyz\n",
            )
                .into_response()
        })
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port) now, so a taken port is an error here, and
    /// serves `registry` and `health` in the background.
    pub fn start(addr: SocketAddr, registry: Registry, health: Health) -> Result<MetricsServer> {
        let std_listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        std_listener.set_nonblocking(true)?;
        let bound = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gpo-metrics")
            .enable_all()
            .build()
            .context("starting the metrics server's runtime")?;
        let listener = {
            let _g = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let app = router(Arc::new(registry), health);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("the metrics server on {bound} stopped: {e}");
            }
        });
        tracing::info!("serving /metrics, /healthz and /readyz on http://{bound}");
        Ok(MetricsServer {
            addr: bound,
            shutdown: Some(tx),
            runtime: Some(runtime),
        })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{registry, CoordinatorMetrics, Role};
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out[9..12].parse().unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (code, head.to_lowercase(), body.to_string())
    }

    #[test]
    fn serves_metrics_as_plain_text_and_readiness_as_it_changes_then_stops_on_drop() {
        let mut r = registry(Role::Coordinator);
        let m = CoordinatorMetrics::default();
        m.register(&mut r);
        m.committed(0.5, 3, 12.0);
        let health = Health::not_ready("campaigning in etcd");
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), r, health.clone()).unwrap();
        let addr = srv.addr();
        let (code, head, body) = get(addr, "/metrics");
        assert_eq!(code, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(body.contains("gpo_episodes_total 3\n"), "{body}");
        assert_eq!(get(addr, "/healthz").0, 200);
        let (code, _, body) = get(addr, "/readyz");
        assert_eq!(code, 503);
        assert!(body.contains("campaigning in etcd"), "{body}");
        health.set_ready();
        assert_eq!(get(addr, "/readyz").0, 200);
        assert_eq!(get(addr, "/nothing").0, 404);
        // The port is taken while it serves: a second server fails with the address.
        let e = MetricsServer::start(addr, Registry::default(), Health::not_ready("x"))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
        drop(srv);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the server must stop with its owner"
        );
    }
}
