//! Who may talk to a gpo gRPC port: the shared run token (`--token-file`), carried as
//! `authorization: Bearer …` metadata by a client interceptor and checked in constant time
//! by a server interceptor, which also demands a verified client certificate under mTLS.
//! Every refusal is logged (the reason, never the secret) and counted in
//! `gpo_auth_failures_total{reason}`, whose reasons are a fixed, bounded set.
//!
//! It also makes the secrets themselves: random tokens and per-registration secrets from
//! the operating system's generator.

use anyhow::{bail, Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The bounded set of reasons a refusal is counted under.
pub mod reason {
    /// A request without the run token, where one is required.
    pub const MISSING_TOKEN: &str = "missing_token";
    /// A request with a token that is not the run's.
    pub const BAD_TOKEN: &str = "bad_token";
    /// A connection without a verified client certificate, where mTLS is required.
    pub const MISSING_CERTIFICATE: &str = "missing_certificate";
    /// A TLS handshake refused (a certificate from another CA, or none).
    pub const BAD_CERTIFICATE: &str = "bad_certificate";
    /// A worker-scoped call whose per-registration secret is missing or wrong.
    pub const WORKER_SECRET: &str = "worker_secret";
    /// A call naming another run.
    pub const WRONG_RUN: &str = "wrong_run";
    /// A ring connection that could not prove it knows the run's ring secret.
    pub const RING_HANDSHAKE: &str = "ring_handshake";
    /// A field over its length limit (a name, a reason, a request).
    pub const OVERSIZED: &str = "oversized";
    /// Every reason, so each can be exported at 0 before the first refusal.
    pub const ALL: [&str; 8] = [
        MISSING_TOKEN,
        BAD_TOKEN,
        MISSING_CERTIFICATE,
        BAD_CERTIFICATE,
        WORKER_SECRET,
        WRONG_RUN,
        RING_HANDSHAKE,
        OVERSIZED,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Refused requests and connections by reason: `gpo_auth_failures_total{reason}`.
/// Cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct AuthFailures {
    family: Family<ReasonLabel, Counter>,
}

impl AuthFailures {
    /// Counts one refusal. `reason` should be one of [`reason`]'s constants.
    pub fn record(&self, reason: &'static str) {
        self.family.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Refusals counted under `reason` so far.
    pub fn count(&self, reason: &'static str) -> u64 {
        self.family.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Registers the counters as `gpo_auth_failures` (exported with `_total`), every
    /// reason at 0 from the start so rates and the dashboard's panel have data.
    pub fn register(&self, registry: &mut Registry) {
        for r in reason::ALL {
            drop(self.family.get_or_create(&ReasonLabel { reason: r }));
        }
        registry.register(
            "gpo_auth_failures",
            "Requests and connections refused for want of valid credentials, by reason",
            self.family.clone(),
        );
    }
}

/// Compares two secrets in time that depends on neither's content nor length (both are
/// hashed first, then every byte of the digests is compared).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("the system's random source: {e}"))?;
    Ok(b)
}

/// `n` random bytes from the operating system, as 2n hex digits.
pub fn random_hex(n: usize) -> Result<String> {
    Ok(hex::encode(random_bytes(n)?))
}

/// A fresh random secret of 256 bits, as 64 hex digits (a run token, a worker secret).
pub fn random_token() -> Result<String> {
    random_hex(32)
}

/// Longest token accepted (a token file is a secret, not a document).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Reads a token file: its content without surrounding whitespace, which must be
/// non-empty printable ASCII (it travels as gRPC metadata).
pub fn read_token_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    if meta.len() > MAX_TOKEN_BYTES as u64 {
        bail!(
            "token file {}: {} bytes, more than the {MAX_TOKEN_BYTES} a token may have",
            path.display(),
            meta.len()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!(
            "token file {}: the token must be printable ASCII without spaces",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Adds the run token to every request of a client (a no-op without one).
#[derive(Clone, Debug, Default)]
pub struct ClientToken {
    header: Option<MetadataValue<Ascii>>,
}

impl ClientToken {
    /// A client that sends `token` (or nothing, for `None`).
    pub fn new(token: Option<&str>) -> Result<ClientToken> {
        let header = token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| anyhow::anyhow!("the token is not valid gRPC metadata"))
            })
            .transpose()?;
        Ok(ClientToken { header })
    }
}

impl tonic::service::Interceptor for ClientToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The server's check of every request: the run token (when the server has one) and a
/// verified client certificate (under mTLS). Cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct ServerAuth {
    token: Option<Arc<[u8]>>,
    require_client_cert: bool,
    failures: AuthFailures,
}

impl ServerAuth {
    /// A check for `token` (`None`: no token needed) and, when `require_client_cert`, a
    /// client certificate the TLS layer verified; refusals are counted in `failures`.
    pub fn new(token: Option<&str>, require_client_cert: bool, failures: AuthFailures) -> Self {
        ServerAuth {
            token: token.map(|t| Arc::from(t.as_bytes())),
            require_client_cert,
            failures,
        }
    }

    /// Whether this check lets every request through (no token, no client certificate).
    pub fn is_open(&self) -> bool {
        self.token.is_none() && !self.require_client_cert
    }

    /// The counters refusals go to.
    pub fn failures(&self) -> &AuthFailures {
        &self.failures
    }

    /// Whether a client certificate is demanded (mTLS).
    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert
    }

    /// Counts and logs one refusal.
    pub fn record_refusal(&self, why: &'static str, peer: Option<std::net::SocketAddr>) {
        self.failures.record(why);
        let peer = peer.map_or_else(|| "unknown peer".to_string(), |p| p.to_string());
        tracing::warn!(reason = why, %peer, "refused a request: {why}");
    }

    /// Counts and logs one refusal, and returns its status.
    pub fn refuse(&self, why: &'static str, peer: Option<std::net::SocketAddr>) -> Status {
        self.record_refusal(why, peer);
        Status::unauthenticated(format!("refused: {why}"))
    }

    /// Checks an `authorization` value (`Bearer TOKEN`, in constant time) against the
    /// token; `Err` is the refusal's reason, not yet counted. Any value passes without one.
    pub fn check_bearer(&self, authorization: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let Some(value) = authorization else {
            return Err(reason::MISSING_TOKEN);
        };
        let given = value.strip_prefix(b"Bearer ").unwrap_or(b"");
        if !constant_time_eq(given, token) {
            return Err(reason::BAD_TOKEN);
        }
        Ok(())
    }

    fn check_metadata(&self, req: &Request<()>) -> Result<(), Status> {
        if self.require_client_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(self.refuse(reason::MISSING_CERTIFICATE, req.remote_addr()));
        }
        let value = req.metadata().get("authorization").map(|v| v.as_bytes());
        self.check_bearer(value)
            .map_err(|why| self.refuse(why, req.remote_addr()))
    }
}

impl tonic::service::Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check_metadata(&req)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_auth(v: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", MetadataValue::try_from(v).unwrap());
        r
    }

    #[test]
    fn the_token_is_checked_and_refusals_are_counted_by_reason() {
        let f = AuthFailures::default();
        let mut auth = ServerAuth::new(Some("s3cret"), false, f.clone());
        assert!(auth.call(with_auth("Bearer s3cret")).is_ok());
        let e = auth.call(with_auth("Bearer s3cre")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("s3cret"), "{}", e.message());
        assert!(auth.call(with_auth("s3cret")).is_err(), "no Bearer prefix");
        assert!(auth.call(Request::new(())).is_err());
        assert_eq!(f.count(reason::BAD_TOKEN), 2);
        assert_eq!(f.count(reason::MISSING_TOKEN), 1);
    }

    #[test]
    fn mtls_without_a_peer_certificate_is_refused() {
        let f = AuthFailures::default();
        let mut auth = ServerAuth::new(None, true, f.clone());
        assert!(auth.call(Request::new(())).is_err());
        assert_eq!(f.count(reason::MISSING_CERTIFICATE), 1);
        assert!(ServerAuth::default().is_open());
    }

    #[test]
    fn the_client_sends_what_the_server_expects() {
        let mut c = ClientToken::new(Some("abc")).unwrap();
        let r = c.call(Request::new(())).unwrap();
        let mut auth = ServerAuth::new(Some("abc"), false, AuthFailures::default());
        assert!(auth.call(r).is_ok());
        let r = ClientToken::default().call(Request::new(())).unwrap();
        assert!(r.metadata().get("authorization").is_none());
    }

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn tokens_are_random_and_token_files_are_checked() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, format!("  {a}\n")).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), a);
        std::fs::write(&p, "\n").unwrap();
        let e = read_token_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("empty") && e.contains(&p.display().to_string()),
            "{e}"
        );
        std::fs::write(&p, "a b").unwrap();
        assert!(read_token_file(&p).is_err());
        let e = format!("{:#}", read_token_file(&d.path().join("nope")).unwrap_err());
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn the_counter_is_exported_with_its_total_suffix() {
        let f = AuthFailures::default();
        f.record(reason::RING_HANDSHAKE);
        let mut reg = Registry::default();
        f.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("gpo_auth_failures_total{reason=\"ring_handshake\"} 1"),
            "{out}"
        );
    }
}
