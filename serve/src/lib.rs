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
//! - [`metrics`]: the Prometheus registry.

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
pub mod service;
pub mod sessions;
pub mod task;

use std::sync::Arc;

/// Serves `server` over HTTP on `http` and gRPC on `grpc` until `shutdown` resolves.
pub async fn run(
    server: Arc<service::Server>,
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = Arc::new(metrics::registry(&server.metrics));
    let state = http::HttpState {
        server: server.clone(),
        metrics: Arc::new(move || metrics::encode(&registry)),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let mut grpc_stop = stop_rx;
    let app = http::router(state);
    let h = tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let g = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(grpc::service(server))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                async move {
                    let _ = grpc_stop.wait_for(|s| *s).await;
                },
            )
            .await
    });
    shutdown.await;
    let _ = stop_tx.send(true);
    h.await??;
    g.await??;
    Ok(())
}
