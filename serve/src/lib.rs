//! gpo-serve: `gpo serve`, a server that answers the question GPO was built for: given a
//! group's answers to a few questions, how will it answer these new ones, and which of these
//! candidate responses will it prefer?
//!
//! Shaped after TEI (router, core, backends):
//! - pure core: [`task`] (requests validated into typed tasks, errors naming the field),
//!   [`forward`] (the GPO forward through `gpo eval`'s own functions, rerank scoring),
//!   [`cache`] (the LRU), [`admission`]'s rule;
//! - [`embedding`]: the LRU in front of the embedding store and the embedder;
//! - [`batcher`]: dynamic batching to a budget, for the embedder and the forward pass;
//! - [`admission`]: concurrency and queue limits, deadlines;
//! - [`service`]: one request end to end; [`sessions`]: stored group contexts;
//! - thin adapters: [`http`] (axum), [`grpc`] (tonic, `gpo.v1.Serve`), [`openapi`];
//! - [`metrics`]: the Prometheus registry; [`security`]: TLS, mTLS and the token.

pub mod admission;
pub mod batcher;
pub mod cache;
pub mod embedding;
pub mod forward;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod security;
pub mod service;
pub mod sessions;
pub mod task;

use std::sync::Arc;

/// Serves `server` over HTTP on `http` and gRPC on `grpc`, secured by `security`, until
/// `shutdown` resolves.
pub async fn run(
    server: Arc<service::Server>,
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    security: security::Security,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut registry = metrics::registry(&server.metrics);
    security.auth.failures().register(&mut registry);
    let registry = Arc::new(registry);
    let state = http::HttpState {
        server: server.clone(),
        metrics: Arc::new(move || metrics::encode(&registry)),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let mut grpc_stop = stop_rx;
    let app = http::router(state, security.auth.clone())
        .into_make_service_with_connect_info::<security::Peer>();
    let http_tls = security.http_tls();
    let auth = security.auth.clone();
    let h = tokio::spawn(async move {
        let stop = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        match http_tls {
            Some(cfg) => {
                let l = security::TlsListener::new(http, cfg, auth)?;
                axum::serve(l, app).with_graceful_shutdown(stop).await
            }
            None => axum::serve(http, app).with_graceful_shutdown(stop).await,
        }
    });
    let mut svc = grpc::service(server);
    if let Some(n) = security.max_message_bytes {
        svc = svc
            .max_decoding_message_size(n)
            .max_encoding_message_size(n);
    }
    let svc = tonic::service::interceptor::InterceptedService::new(svc, security.auth.clone());
    let grpc_tls = security.tls.clone();
    let failures = security.auth.failures().clone();
    let g = tokio::spawn(async move {
        let router = tonic::transport::Server::builder().add_service(svc);
        let stop = async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        };
        gpo_ops::tls_accept::serve_router(router, grpc, grpc_tls, failures, stop).await
    });
    shutdown.await;
    let _ = stop_tx.send(true);
    h.await??;
    g.await??;
    Ok(())
}
