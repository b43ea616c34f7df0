//! The coordinator's TLS handshakes, done here instead of inside tonic so that a refused one
//! (a client certificate from another CA, a plain-text client on the TLS port, a handshake
//! that never finishes) is logged at `warn` and counted as
//! `gpo_auth_failures_total{reason="bad_certificate"}`: tonic's own acceptor reports those
//! only at `debug`, with no hook to count them. The configuration is tonic's (the same
//! verifier, ALPN `h2`), so a handshake tonic accepted is accepted here, and tonic still sees
//! the peer's certificates (`Request::peer_certs`) through the stream's connect info.

use crate::auth::{reason, AuthFailures};
use crate::tls::TlsFiles;
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::RootCertStore;
/// The TLS server configuration [`server_config`] builds.
pub use tokio_rustls::rustls::ServerConfig;
pub use tokio_rustls::server::TlsStream;

/// What every gRPC server of gpo serves with (the coordinator's run and embedding phase,
/// the sweep's worker pool, `gpo serve`): the TLS configuration of `files` (`None`: plain
/// text) and the interceptor that checks `token`, and a client certificate where `files`
/// demand one, counting refusals in `failures`.
pub fn server_side(
    files: &TlsFiles,
    token: Option<&str>,
    failures: AuthFailures,
) -> Result<(Option<Arc<ServerConfig>>, crate::auth::ServerAuth)> {
    let tls = server_config(files)?;
    let mtls = tls.is_some() && files.requires_client_cert();
    Ok((tls, crate::auth::ServerAuth::new(token, mtls, failures)))
}

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn certs(path: &std::path::Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{flag}: {} is not a PEM certificate file", path.display()))?;
    if v.is_empty() {
        bail!("{flag}: {} holds no certificate", path.display());
    }
    Ok(v)
}

/// The server configuration for `files`: `None` without TLS flags. With `--tls-ca`, client
/// certificates are asked for and must chain to it; one may be absent at the handshake
/// (the token-only clients of a TLS port), which [`crate::auth::ServerAuth`] then refuses
/// when mTLS is required.
pub fn server_config(files: &TlsFiles) -> Result<Option<Arc<ServerConfig>>> {
    if !files.any() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        bail!("a TLS server needs --tls-cert and --tls-key");
    };
    let chain = certs(cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key: {} is not a PEM private key", key.display()))?;
    let builder = ServerConfig::builder();
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs(ca, "--tls-ca")?);
            if added == 0 {
                bail!("--tls-ca: {} holds no usable CA certificate", ca.display());
            }
            let verifier = WebPkiClientVerifier::builder(roots.into())
                .allow_unauthenticated()
                .build()
                .context("--tls-ca: building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .context("--tls-cert/--tls-key: the key does not match the certificate")?;
    cfg.alpn_protocols.push(b"h2".to_vec());
    Ok(Some(Arc::new(cfg)))
}

/// Accepts connections on `listener` and yields those whose handshake succeeded; every
/// refused handshake is logged and counted. Runs until the receiver is dropped. Call from
/// inside a tokio runtime.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    failures: AuthFailures,
) -> mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor, failures) = (tx.clone(), acceptor.clone(), failures.clone());
            tokio::spawn(async move {
                let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                };
                failures.record(reason::BAD_CERTIFICATE);
                tracing::warn!(
                    reason = reason::BAD_CERTIFICATE,
                    %peer,
                    "refused a TLS handshake: {why}"
                );
            });
        }
    });
    rx
}

/// Serves `router` on `listener` until `shutdown`: over TLS through [`accept_loop`] when
/// `tls` is given (refused handshakes counted in `failures`), else plain TCP with
/// `TCP_NODELAY`. The one serving path of every gpo gRPC port (coordinator, sweep pool,
/// `gpo serve`).
pub async fn serve_router(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    failures: AuthFailures,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(cfg) => {
            let accepted = accept_loop(listener, cfg, failures);
            let incoming = tokio_stream::wrappers::ReceiverStream::new(accepted);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}
