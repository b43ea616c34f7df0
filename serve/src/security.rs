//! TLS, mTLS and the bearer token for `gpo serve`, from the operations layer (`gpo-ops`), so
//! the server is secured the way the coordinator is: the same flags, the same handshake
//! code, the same constant-time token check and the same `gpo_auth_failures_total{reason}`.
//!
//! - gRPC: [`ServerAuth`] as a tonic interceptor (token, and a verified client certificate
//!   under mTLS), TLS through [`gpo_ops::tls_accept`].
//! - HTTP: [`require_token`] as an axum middleware on every route but the probes and the API
//!   document (`/healthz`, `/readyz`, `/docs`, `/openapi.json`), TLS through [`TlsListener`],
//!   which under mTLS closes a connection that presented no client certificate.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gpo_ops::auth::{reason, AuthFailures, ServerAuth};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// What secures both listeners. `Default` is open: no TLS, no token.
#[derive(Clone, Default)]
pub struct Security {
    /// The TLS configuration (`None`: plain text).
    pub tls: Option<Arc<ServerConfig>>,
    /// The token and client-certificate check; its counters are the server's.
    pub auth: ServerAuth,
    /// Largest gRPC message accepted or sent (`None`: tonic's 4 MiB).
    pub max_message_bytes: Option<usize>,
}

impl Security {
    /// From the flags' files: a bad file fails here, naming its flag.
    pub fn from_files(
        files: &gpo_ops::tls::TlsFiles,
        token: Option<&str>,
        failures: AuthFailures,
        max_message_bytes: usize,
    ) -> anyhow::Result<Security> {
        let (tls, auth) = gpo_ops::tls_accept::server_side(files, token, failures)?;
        Ok(Security {
            tls,
            auth,
            max_message_bytes: Some(max_message_bytes),
        })
    }

    /// The HTTP side's TLS configuration: the gRPC one, offering HTTP/1.1 as well as h2 (curl
    /// and most clients speak HTTP/1.1 to a JSON API).
    pub fn http_tls(&self) -> Option<Arc<ServerConfig>> {
        self.tls.as_ref().map(|c| {
            let mut c = (**c).clone();
            c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(c)
        })
    }

    /// One line for the start-up message.
    pub fn describe(&self) -> &'static str {
        match (
            self.tls.is_some(),
            self.auth.requires_client_cert(),
            self.auth.is_open(),
        ) {
            (true, true, _) => "mTLS",
            (true, false, true) => "TLS, no token",
            (true, false, false) => "TLS and a token",
            (false, _, false) => "plain text with a token",
            (false, _, true) => "plain text, no token",
        }
    }
}

/// The axum middleware: a request without the token (`Authorization: Bearer TOKEN`) is
/// refused with 401 and `{"error", "field": "authorization"}`, and counted.
pub async fn require_token(State(auth): State<ServerAuth>, req: Request, next: Next) -> Response {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match auth.check_bearer(value) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            let peer = req
                .extensions()
                .get::<axum::extract::ConnectInfo<Peer>>()
                .map(|c| c.0 .0);
            auth.record_refusal(why, peer);
            let body =
                serde_json::json!({"error": format!("refused: {why}"), "field": "authorization"});
            (
                StatusCode::UNAUTHORIZED,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::WWW_AUTHENTICATE, "Bearer"),
                ],
                body.to_string(),
            )
                .into_response()
        }
    }
}

/// The client's address, as the refusal log names it, over plain text and TLS alike.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*s.remote_addr())
    }
}

/// An axum listener whose connections have passed the TLS handshake (refused handshakes are
/// logged and counted by [`gpo_ops::tls_accept::accept_loop`]); under mTLS, a connection with
/// no client certificate is counted as `missing_certificate` and closed.
pub struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>>,
    local: SocketAddr,
    auth: ServerAuth,
}

impl TlsListener {
    /// Starts the handshakes on `listener`. Call inside a tokio runtime.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        auth: ServerAuth,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let accepted = gpo_ops::tls_accept::accept_loop(listener, config, auth.failures().clone());
        Ok(TlsListener {
            accepted,
            local,
            auth,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(r) = self.accepted.recv().await else {
                // The accept loop ended (its runtime is shutting down): no more connections.
                std::future::pending::<()>().await;
                unreachable!()
            };
            let stream = match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accepting an HTTP connection: {e}");
                    continue;
                }
            };
            let (tcp, conn) = stream.get_ref();
            let peer = tcp.peer_addr().unwrap_or(self.local);
            let has_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
            if self.auth.requires_client_cert() && !has_cert {
                self.auth
                    .record_refusal(reason::MISSING_CERTIFICATE, Some(peer));
                continue;
            }
            return (stream, peer);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
