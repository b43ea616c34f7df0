//! Who may act on the run, as the coordinator decides it: the credentials its port demands
//! (TLS, mTLS, the run token: [`Security`]), the per-registration secret that every
//! worker-scoped call must carry (so that knowing a run id and a worker id, which `Status`
//! shows, is not enough to send a `Leave` or a heartbeat in a worker's name), and the
//! length limits on what a request may ask the coordinator to keep.
//!
//! Refusals are logged and counted in [`gpo_ops::auth::AuthFailures`]; a refusal never
//! names a secret, nor the run's real id.

use gpo_ops::auth::{constant_time_eq, reason, AuthFailures};
use gpo_proto::v1 as pb;
use tonic::Status;

/// Default limit of a gRPC message, each way. The largest message is a state transfer
/// (`Membership.state`, `StepResult.state`): 12 bytes per parameter (parameters and both
/// Adam moments in f32). The paper's module at dim_x 4096 has 1,188,354 parameters, i.e.
/// 14.3 MB; at dim_x 8192 (the widest embedders) 1,712,642, i.e. 20.6 MB. 64 MiB leaves
/// room for three times that and refuses the 100 MB-and-up messages of an attack.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Longest worker name accepted.
pub const MAX_NAME_BYTES: usize = crate::machine::MAX_NAME_LEN;
/// Longest free-text field accepted (capabilities, addresses, digests, reasons).
pub const MAX_FIELD_BYTES: usize = 1024;
/// Most collective names a worker may offer.
pub const MAX_COLLECTIVES: usize = 16;

/// The credentials the coordinator's port demands, and the refusals' counters.
#[derive(Clone)]
pub struct Security {
    /// TLS files: with a certificate and key the port serves TLS; with `ca` as well it
    /// demands client certificates signed by that CA (mTLS).
    pub tls: gpo_ops::tls::TlsFiles,
    /// The run token every request must carry (`authorization: Bearer …`).
    pub token: Option<String>,
    /// Largest gRPC message either way.
    pub max_message_bytes: usize,
    /// Refusals by reason (`gpo_auth_failures_total`).
    pub failures: AuthFailures,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            tls: Default::default(),
            token: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            failures: AuthFailures::default(),
        }
    }
}

impl Security {
    /// What each of the coordinator's gRPC services (the run's, the embedding phase's)
    /// serves with: the TLS configuration, if any, and the interceptor that checks the run
    /// token and counts refusals.
    pub(crate) fn server_side(
        &self,
    ) -> anyhow::Result<(
        Option<std::sync::Arc<gpo_ops::tls_accept::ServerConfig>>,
        gpo_ops::auth::ServerAuth,
    )> {
        use anyhow::Context;
        gpo_ops::tls_accept::server_side(&self.tls, self.token.as_deref(), self.failures.clone())
            .context("the coordinator's TLS configuration (--tls-cert, --tls-key, --tls-ca)")
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

/// Refuses a request naming another run, without saying which run this is.
pub(crate) fn check_run(failures: &AuthFailures, real: &str, given: &str) -> Result<(), Status> {
    if constant_time_eq(real.as_bytes(), given.as_bytes()) {
        return Ok(());
    }
    failures.record(reason::WRONG_RUN);
    tracing::warn!(
        reason = reason::WRONG_RUN,
        "refused a request for another run"
    );
    let shown: String = given.chars().take(64).collect();
    Err(Status::failed_precondition(format!(
        "wrong run id `{shown}`: this coordinator runs another run"
    )))
}

/// Refuses a worker-scoped call whose secret is not the one its registration was given.
/// `expected` is `None` for an id the coordinator does not know (the machine then answers
/// NOT_FOUND, so that a dropped worker registers again).
pub(crate) fn check_worker(
    failures: &AuthFailures,
    id: u64,
    expected: Option<&String>,
    given: &str,
) -> Result<(), Status> {
    match expected {
        None => Ok(()),
        Some(e) if constant_time_eq(e.as_bytes(), given.as_bytes()) => Ok(()),
        Some(_) => {
            failures.record(reason::WORKER_SECRET);
            tracing::warn!(
                reason = reason::WORKER_SECRET,
                "refused a call in the name of worker {id}: wrong worker secret"
            );
            Err(Status::unauthenticated(format!(
                "refused: the call does not carry worker {id}'s registration secret"
            )))
        }
    }
}

fn too_long(field: &str, len: usize, max: usize) -> Status {
    Status::invalid_argument(format!("{field}: {len} bytes, more than the {max} allowed"))
}

/// Checks one field's length.
pub(crate) fn limit(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(too_long(field, value.len(), max));
    }
    Ok(())
}

/// Refuses a registration whose strings are over their limits, naming the field.
pub(crate) fn check_registration(req: &pb::RegisterRequest) -> Result<(), Status> {
    limit("name", &req.name, MAX_NAME_BYTES)?;
    limit("run_id", &req.run_id, MAX_FIELD_BYTES)?;
    limit("holds_sha256", &req.holds_sha256, MAX_FIELD_BYTES)?;
    if let Some(c) = &req.capabilities {
        for (field, v) in [
            ("capabilities.device", &c.device),
            ("capabilities.embedder", &c.embedder),
            ("capabilities.hostname", &c.hostname),
            ("capabilities.version", &c.version),
        ] {
            limit(field, v, MAX_FIELD_BYTES)?;
        }
        if c.collectives.len() > MAX_COLLECTIVES {
            return Err(Status::invalid_argument(format!(
                "capabilities.collectives: {} entries, more than the {MAX_COLLECTIVES} allowed",
                c.collectives.len()
            )));
        }
        for v in &c.collectives {
            limit("capabilities.collectives", v, MAX_FIELD_BYTES)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_run_id_is_refused_without_the_real_one() {
        let f = AuthFailures::default();
        let e = check_run(&f, "run-0123456789abcdef", "run-guess").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(!e.message().contains("0123456789abcdef"), "{}", e.message());
        assert!(e.message().contains("run-guess"));
        assert!(check_run(&f, "a", "a").is_ok());
        assert_eq!(f.count(reason::WRONG_RUN), 1);
    }

    #[test]
    fn worker_secrets_are_checked_for_known_workers() {
        let f = AuthFailures::default();
        let s = "secret".to_string();
        assert!(check_worker(&f, 1, Some(&s), "secret").is_ok());
        assert!(
            check_worker(&f, 1, None, "").is_ok(),
            "unknown: the machine answers"
        );
        let e = check_worker(&f, 1, Some(&s), "").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("secret`"));
        assert_eq!(f.count(reason::WORKER_SECRET), 1);
    }

    #[test]
    fn long_fields_are_refused_by_name() {
        let mut r = pb::RegisterRequest {
            name: "x".repeat(MAX_NAME_BYTES + 1),
            ..Default::default()
        };
        let e = check_registration(&r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("name: 129 bytes"),
            "{}",
            e.message()
        );
        r.name = "ok".into();
        r.capabilities = Some(pb::Capabilities {
            hostname: "h".repeat(5000),
            ..Default::default()
        });
        let e = check_registration(&r).unwrap_err();
        assert!(
            e.message().starts_with("capabilities.hostname"),
            "{}",
            e.message()
        );
        r.capabilities = None;
        assert!(check_registration(&r).is_ok());
    }
}
