//! The test's public-key infrastructure (rcgen): a CA, a server certificate for
//! 127.0.0.1/localhost, a client certificate, a second, foreign CA with its own client
//! certificate, and a token file. Shared by the coordinator's and the server's security tests.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::path::{Path, PathBuf};

/// PEM files of the test's public-key infrastructure.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub foreign_cert: PathBuf,
    pub foreign_key: PathBuf,
    pub token: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn pki(dir: &Path) -> Pki {
    let real = ca("gpo test CA");
    let foreign = ca("someone else's CA");
    let (sc, sk) = leaf(
        &real,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (cc, ck) = leaf(&real, &["gpo-worker"], ExtendedKeyUsagePurpose::ClientAuth);
    let (fc, fk) = leaf(
        &foreign,
        &["gpo-worker"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let w = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    Pki {
        ca: w("ca.pem", &real.pem()),
        server_cert: w("server.pem", &sc),
        server_key: w("server.key", &sk),
        client_cert: w("client.pem", &cc),
        client_key: w("client.key", &ck),
        foreign_cert: w("foreign.pem", &fc),
        foreign_key: w("foreign.key", &fk),
        token: w("token", "the-run-token-0123456789\n"),
    }
}

/// A TLS client's credentials: the CA to trust and, for mTLS, a (certificate, key) pair.
pub type ClientTls<'a> = (&'a Path, Option<(&'a Path, &'a Path)>);

/// A gRPC endpoint for `url`: over TLS when `tls` names the CA (and maybe a client identity),
/// the server's name checked as 127.0.0.1.
pub fn endpoint(url: &str, tls: Option<ClientTls<'_>>) -> tonic::transport::Endpoint {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut ep = Endpoint::from_shared(url.to_string()).unwrap();
    if let Some((ca, id)) = tls {
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
            .domain_name("127.0.0.1");
        if let Some((c, k)) = id {
            cfg = cfg.identity(Identity::from_pem(
                std::fs::read(c).unwrap(),
                std::fs::read(k).unwrap(),
            ));
        }
        ep = ep.tls_config(cfg).unwrap();
    }
    ep
}
