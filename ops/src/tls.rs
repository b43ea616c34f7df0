//! TLS on the gRPC ports (rustls through tonic's `tls-ring`): the coordinator's server
//! configuration (`--tls-cert`, `--tls-key`, and `--tls-ca` to demand client certificates
//! signed by that CA, i.e. mTLS) and the clients' (workers and `gpo status`: `--tls-ca` to
//! verify the server, `--tls-cert`/`--tls-key` as their client certificate), plus the run
//! token each client sends. Files are read here, with errors that name the file and flag.

use crate::auth::ClientToken;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read_pem(path: &Path, flag: &str) -> Result<Vec<u8>> {
    let b =
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    if !b.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!(
            "{flag}: {} is not a PEM file (no -----BEGIN line)",
            path.display()
        );
    }
    Ok(b)
}

/// The TLS files of one process, as its flags name them.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// `--tls-cert`: this process's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// `--tls-key`: its private key (PEM).
    pub key: Option<PathBuf>,
    /// `--tls-ca`: the CA (PEM) that signs the other side's certificate. On a server it
    /// turns mTLS on; on a client it is the root the server's certificate must chain to.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any TLS flag is set.
    pub fn any(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(
                read_pem(c, "--tls-cert")?,
                read_pem(k, "--tls-key")?,
            ))),
            (None, None) => Ok(None),
            (Some(_), None) => bail!("--tls-cert needs --tls-key (the certificate's private key)"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert (the key's certificate)"),
        }
    }

    /// The server's configuration: `None` without TLS flags. With `--tls-ca` the server
    /// asks for client certificates: the handshake refuses one that does not chain to
    /// that CA, and [`crate::auth::ServerAuth`] refuses a request that brought none.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>> {
        if !self.any() {
            return Ok(None);
        }
        let id = self
            .identity()?
            .context("a TLS server needs --tls-cert and --tls-key")?;
        let mut cfg = ServerTlsConfig::new().identity(id);
        if let Some(ca) = &self.ca {
            cfg = cfg
                .client_ca_root(Certificate::from_pem(read_pem(ca, "--tls-ca")?))
                .client_auth_optional(true);
        }
        Ok(Some(cfg))
    }

    /// Whether a server with these files demands client certificates.
    pub fn requires_client_cert(&self) -> bool {
        self.ca.is_some()
    }

    /// A client's configuration for a server named `domain`: `None` without TLS flags.
    pub fn client(&self, domain: &str) -> Result<Option<ClientTlsConfig>> {
        if !self.any() {
            return Ok(None);
        }
        let ca = self.ca.as_ref().context(
            "a TLS client needs --tls-ca (the CA that signed the coordinator's certificate)",
        )?;
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_pem(ca, "--tls-ca")?))
            .domain_name(domain);
        if let Some(id) = self.identity()? {
            cfg = cfg.identity(id);
        }
        Ok(Some(cfg))
    }
}

/// What a client of the coordinator presents: TLS files (optional) and the run token
/// (optional).
#[derive(Debug, Clone, Default)]
pub struct ClientCredentials {
    /// The TLS files.
    pub tls: TlsFiles,
    /// The run token, read from `--token-file`.
    pub token: Option<String>,
}

impl ClientCredentials {
    /// Reads `--token-file` (when given) next to the TLS files.
    pub fn from_flags(tls: TlsFiles, token_file: Option<&Path>) -> Result<ClientCredentials> {
        let token = token_file.map(crate::auth::read_token_file).transpose()?;
        Ok(ClientCredentials { tls, token })
    }

    /// The interceptor that adds the token to every request.
    pub fn interceptor(&self) -> Result<ClientToken> {
        ClientToken::new(self.token.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tls_flags_are_named() {
        let d = tempfile::tempdir().unwrap();
        let not_pem = d.path().join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let f = TlsFiles {
            cert: Some(not_pem.clone()),
            key: None,
            ca: None,
        };
        let e = format!("{:#}", f.server().unwrap_err());
        assert!(e.contains("--tls-key"), "{e}");
        let f = TlsFiles {
            cert: Some(not_pem.clone()),
            key: Some(not_pem.clone()),
            ca: None,
        };
        let e = format!("{:#}", f.server().unwrap_err());
        assert!(
            e.contains("--tls-cert") && e.contains("x.pem") && e.contains("PEM"),
            "{e}"
        );
        let f = TlsFiles {
            ca: Some(d.path().join("missing.pem")),
            ..Default::default()
        };
        let e = format!("{:#}", f.client("localhost").unwrap_err());
        assert!(e.contains("--tls-ca") && e.contains("missing.pem"), "{e}");
        let f = TlsFiles {
            cert: Some(not_pem),
            ..Default::default()
        };
        let e = format!("{:#}", f.client("localhost").unwrap_err());
        assert!(e.contains("--tls-ca"), "{e}");
        assert!(TlsFiles::default().server().unwrap().is_none());
    }
}
