//! The ring handshake's proof of membership: before any tensor byte flows between two
//! workers, each proves to the other that it knows the run's ring secret (which only the
//! coordinator hands out, over the authenticated gRPC channel), by an HMAC-SHA256 over
//! both sides' fresh nonces and the dialer's hello. A stranger who can reach a ring port
//! learns nothing it can replay: every proof covers a nonce the verifier just drew.
//!
//! The exchange, dialer D to acceptor A:
//! 1. D → A: hello ‖ nonce_D
//! 2. A → D: nonce_A ‖ HMAC(k, "gpo-ring-acceptor" ‖ hello ‖ nonce_D ‖ nonce_A)
//! 3. D → A: HMAC(k, "gpo-ring-dialer" ‖ hello ‖ nonce_A ‖ nonce_D)
//!
//! The labels differ, so neither proof can be reflected back as the other; MACs are
//! compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};

/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum RingAuthError {
    /// The connection failed or timed out mid-handshake.
    Io(std::io::Error),
    /// The other side's proof was wrong: it does not know the run's ring secret.
    BadProof,
    /// The secret is unusable (empty), or no nonce could be drawn.
    Setup(String),
}

impl std::fmt::Display for RingAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingAuthError::Io(e) => write!(f, "the ring handshake failed: {e}"),
            RingAuthError::BadProof => write!(
                f,
                "the peer could not prove it knows the run's ring secret (not a member of this run)"
            ),
            RingAuthError::Setup(m) => write!(f, "the ring handshake cannot start: {m}"),
        }
    }
}

impl std::error::Error for RingAuthError {}

impl From<std::io::Error> for RingAuthError {
    fn from(e: std::io::Error) -> Self {
        RingAuthError::Io(e)
    }
}

fn proof(secret: &[u8], label: &[u8], parts: [&[u8]; 3]) -> Result<Hmac<Sha256>, RingAuthError> {
    if secret.is_empty() {
        return Err(RingAuthError::Setup(
            "the run's ring secret is empty".into(),
        ));
    }
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .map_err(|e| RingAuthError::Setup(e.to_string()))?;
    m.update(label);
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    Ok(m)
}

fn nonce() -> Result<[u8; NONCE_LEN], RingAuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| RingAuthError::Setup(format!("random nonce: {e}")))?;
    Ok(n)
}

const ACCEPTOR: &[u8] = b"gpo-ring-acceptor";
const DIALER: &[u8] = b"gpo-ring-dialer";

/// The dialer's side: sends `hello` with a nonce, checks the acceptor's proof, then sends
/// its own. Returns once both sides are proven.
pub fn dial<S: Read + Write>(s: &mut S, secret: &[u8], hello: &[u8]) -> Result<(), RingAuthError> {
    let mine = nonce()?;
    let mut first = Vec::with_capacity(hello.len() + NONCE_LEN);
    first.extend_from_slice(hello);
    first.extend_from_slice(&mine);
    s.write_all(&first)?;
    s.flush()?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    s.read_exact(&mut answer)?;
    let (theirs, mac) = answer.split_at(NONCE_LEN);
    proof(secret, ACCEPTOR, [hello, &mine, theirs])?
        .verify_slice(mac)
        .map_err(|_| RingAuthError::BadProof)?;
    let back = proof(secret, DIALER, [hello, theirs, &mine])?
        .finalize()
        .into_bytes();
    s.write_all(&back)?;
    s.flush()?;
    Ok(())
}

/// The acceptor's side: reads a hello of `hello_len` bytes and the dialer's nonce, proves
/// itself, and checks the dialer's proof. Returns the hello, now authenticated.
pub fn accept<S: Read + Write>(
    s: &mut S,
    secret: &[u8],
    hello_len: usize,
) -> Result<Vec<u8>, RingAuthError> {
    // Check the secret before reading: a misconfigured member fails at once.
    proof(secret, ACCEPTOR, [b"", b"", b""])?;
    let mut first = vec![0u8; hello_len + NONCE_LEN];
    s.read_exact(&mut first)?;
    let (hello, theirs) = first.split_at(hello_len);
    let mine = nonce()?;
    let mac = proof(secret, ACCEPTOR, [hello, theirs, &mine])?
        .finalize()
        .into_bytes();
    let mut answer = Vec::with_capacity(NONCE_LEN + MAC_LEN);
    answer.extend_from_slice(&mine);
    answer.extend_from_slice(&mac);
    s.write_all(&answer)?;
    s.flush()?;
    let mut back = [0u8; MAC_LEN];
    s.read_exact(&mut back)?;
    proof(secret, DIALER, [hello, &mine, theirs])?
        .verify_slice(&back)
        .map_err(|_| RingAuthError::BadProof)?;
    Ok(hello.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair(
        dial_secret: &'static [u8],
        accept_secret: &'static [u8],
    ) -> (Result<(), RingAuthError>, Result<Vec<u8>, RingAuthError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let d = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            dial(&mut s, dial_secret, b"hello-bytes")
        });
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let a = accept(&mut s, accept_secret, 11);
        drop(s);
        (d.join().unwrap(), a)
    }

    #[test]
    fn members_with_the_secret_prove_themselves_to_each_other() {
        let (d, a) = pair(b"run-secret", b"run-secret");
        d.unwrap();
        assert_eq!(a.unwrap(), b"hello-bytes");
    }

    #[test]
    fn a_dialer_without_the_secret_is_refused_and_refuses() {
        let (d, a) = pair(b"guess", b"run-secret");
        // The dialer sees the acceptor's proof fail, so it never sends one of its own.
        assert!(matches!(d, Err(RingAuthError::BadProof)), "{d:?}");
        assert!(a.is_err(), "{a:?}");
    }

    #[test]
    fn a_replayed_proof_is_refused() {
        // A stranger that recorded a real dialer's last message cannot reuse it: the
        // acceptor's nonce is fresh, so the proof it expects is another.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut first = b"hello-bytes".to_vec();
            first.extend_from_slice(&[7u8; NONCE_LEN]);
            s.write_all(&first).unwrap();
            let mut answer = [0u8; NONCE_LEN + MAC_LEN];
            s.read_exact(&mut answer).unwrap();
            // An old proof, made for another acceptor nonce.
            let old = proof(
                b"run-secret",
                DIALER,
                [b"hello-bytes", &[1u8; NONCE_LEN], &[7u8; NONCE_LEN]],
            )
            .unwrap()
            .finalize()
            .into_bytes();
            s.write_all(&old).unwrap();
        });
        let (mut s, _) = l.accept().unwrap();
        let a = accept(&mut s, b"run-secret", 11);
        assert!(matches!(a, Err(RingAuthError::BadProof)), "{a:?}");
        t.join().unwrap();
    }

    #[test]
    fn an_empty_secret_is_an_error_not_an_open_door() {
        let mut buf = std::io::Cursor::new(Vec::new());
        assert!(matches!(
            accept(&mut buf, b"", 4),
            Err(RingAuthError::Setup(_))
        ));
    }
}
