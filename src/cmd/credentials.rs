//! The credential flags shared by `gpo coordinator`, `gpo worker` and `gpo status`: TLS
//! files, the run token file, and the gRPC message-size limit. One struct, flattened into
//! each, so that the three agree on names, environment variables and meaning.

use anyhow::Result;
use gpo_coordinator::Security;
use gpo_ops::tls::{ClientCredentials, TlsFiles};
use std::path::{Path, PathBuf};

/// TLS, token and message-size flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// This process's TLS certificate (PEM). On the coordinator and `gpo serve` it turns
    /// TLS on (with --tls-key); on a worker or `gpo status` it is the client certificate
    /// for mTLS.
    #[arg(long, env = "GPO_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "GPO_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A CA certificate (PEM). On the coordinator and `gpo serve`: demand client
    /// certificates signed by it (mTLS). On a worker or `gpo status`: the CA the coordinator's certificate must
    /// chain to (and connect over TLS).
    #[arg(long, env = "GPO_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A file holding the run token: the coordinator (and `gpo serve`, on every route but
    /// its probes and docs) refuses every request that does not carry it as `Authorization:
    /// Bearer TOKEN`; workers and `gpo status` send it.
    #[arg(long, env = "GPO_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Largest gRPC message accepted or sent, in bytes. The default (64 MiB) holds the
    /// state transfer of the widest module (12 bytes per parameter) with room to spare.
    #[arg(long, env = "GPO_MAX_MESSAGE_BYTES", default_value_t = gpo_coordinator::security::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

impl Flags {
    fn tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
    }

    fn checked_max(&self) -> Result<usize> {
        anyhow::ensure!(
            self.max_message_bytes >= 1 << 20,
            "--max-message-bytes: {} is below 1 MiB, too small for any state transfer",
            self.max_message_bytes
        );
        Ok(self.max_message_bytes)
    }

    /// `gpo serve`'s side: the same files, token and limit, for its HTTP and gRPC ports.
    /// The flags again, for a child process that serves with the same credentials.
    pub fn pass_through(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        for (flag, p) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
            ("--token-file", &self.token_file),
        ] {
            if let Some(p) = p {
                v.push(flag.into());
                v.push(p.into());
            }
        }
        v.push("--max-message-bytes".into());
        v.push(self.max_message_bytes.to_string().into());
        v
    }

    pub fn serve(&self) -> Result<gpo_serve::security::Security> {
        let token = self
            .token_file
            .as_deref()
            .map(gpo_ops::auth::read_token_file)
            .transpose()?;
        gpo_serve::security::Security::from_files(
            &self.tls(),
            token.as_deref(),
            Default::default(),
            self.checked_max()?,
        )
    }

    /// The coordinator's side. The TLS files are checked here, so that a bad one fails
    /// at start with its flag's name.
    pub fn server(&self) -> Result<Security> {
        let tls = self.tls();
        tls.server()?;
        Ok(Security {
            tls,
            token: self
                .token_file
                .as_deref()
                .map(gpo_ops::auth::read_token_file)
                .transpose()?,
            max_message_bytes: self.checked_max()?,
            failures: Default::default(),
        })
    }

    /// A client's side (a worker, `gpo status`).
    pub fn client(&self) -> Result<(ClientCredentials, usize)> {
        let tls = self.tls();
        tls.client("localhost")?;
        Ok((
            ClientCredentials::from_flags(tls, self.token_file.as_deref())?,
            self.checked_max()?,
        ))
    }
}

/// A run token in a file only its owner can read, removed when dropped: `gpo train
/// --workers N` hands it to its own worker processes, so that other local processes
/// cannot join or steer the run.
pub struct LocalToken {
    /// The token.
    pub token: String,
    /// The file holding it (mode 0600).
    pub path: PathBuf,
}

impl LocalToken {
    /// A fresh random token, written to a new 0600 file in the temporary directory.
    pub fn create() -> Result<LocalToken> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let token = gpo_ops::auth::random_token()?;
        let name = format!("gpo-run-token-{}-{}", std::process::id(), &token[..8]);
        let path = std::env::temp_dir().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("creating the run token file {}: {e}", path.display()))?;
        f.write_all(token.as_bytes())?;
        Ok(LocalToken { token, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalToken {
    fn drop(&mut self) {
        // Gone already (a cleaner of /tmp): nothing to remove.
        let _ = std::fs::remove_file(&self.path);
    }
}
