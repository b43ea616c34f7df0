//! What makes a gpo process operable rather than merely correct: the Prometheus metrics it
//! exports, the HTTP probes Kubernetes asks, the shape of its logs, and the credentials that
//! keep strangers off its gRPC and ring ports. Every process (coordinator, worker, serve)
//! uses the same pieces, so they live in one crate at the edge of the system; the pure crates
//! (`gpo-core`, the coordinator's state machine) never depend on it.

pub mod auth;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod ring_auth;
pub mod tls;
pub mod tls_accept;
