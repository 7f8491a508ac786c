//! Mutual TLS for sites with a PKI: an x509 directory laid out as QEMU's `tls-creds-x509`
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`),
//! and a test CA with certificates for trying it (`pagewarden tls-certs`).
//!
//! TLS 1.3 only, AES-GCM or ChaCha20-Poly1305, certificates verified both ways against the
//! directory's CA; the server's certificate must name the host the client dials.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::secure::Security;
use crate::error::{Error, Result};

/// The CA that signs both ends' certificates.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain and key.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate chain.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// The test CA's private key (written by [`make_test_certificates`], never read).
pub const CA_KEY: &str = "ca-key.pem";

fn dir_error(dir: &Path, file: &str, why: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "x509 directory {}: {file}: {why} (the directory holds {CA_CERT}, {SERVER_CERT}, \
         {SERVER_KEY}, {CLIENT_CERT} and {CLIENT_KEY}, as QEMU's tls-creds-x509; \
         `pagewarden tls-certs DIR` makes a test set)",
        dir.display()
    ))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(dir: &Path, file: &str) -> Result<Vec<CertificateDer<'static>>> {
    let path = dir.join(file);
    let certs: Vec<_> = CertificateDer::pem_file_iter(&path)
        .map_err(|e| dir_error(dir, file, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| dir_error(dir, file, e))?;
    if certs.is_empty() {
        return Err(dir_error(dir, file, "no CERTIFICATE in it"));
    }
    Ok(certs)
}

fn private_key(dir: &Path, file: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(dir.join(file)).map_err(|e| dir_error(dir, file, e))
}

fn roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(dir, CA_CERT)? {
        roots.add(cert).map_err(|e| dir_error(dir, CA_CERT, e))?;
    }
    Ok(Arc::new(roots))
}

/// The server's end of mutual TLS from `dir`: its certificate and key, and the CA that client
/// certificates must chain to.
pub fn server_security(dir: &Path) -> Result<Security> {
    let provider = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider.clone())
            .build()
            .map_err(|e| dir_error(dir, CA_CERT, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(dir, SERVER_CERT)?,
            private_key(dir, SERVER_KEY)?,
        )
        .map_err(|e| dir_error(dir, SERVER_KEY, e))?;
    config.enable_secret_extraction = true;
    config.send_tls13_tickets = 0;
    Ok(Security::TlsServer {
        config: Arc::new(config),
    })
}

/// The client's end of mutual TLS from `dir`, verifying that the server's certificate names
/// `server_name` (a DNS name or an IP address, as dialled).
pub fn client_security(dir: &Path, server_name: &str) -> Result<Security> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
        Error::Config(format!(
            "TLS: {server_name:?} is not a host name or IP address to verify the page server's \
             certificate against ({e}); give tls_server_name"
        ))
    })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(
            certificates(dir, CLIENT_CERT)?,
            private_key(dir, CLIENT_KEY)?,
        )
        .map_err(|e| dir_error(dir, CLIENT_KEY, e))?;
    config.enable_secret_extraction = true;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Security::TlsClient {
        config: Arc::new(config),
        server_name: name,
    })
}

/// The host part of "host:port" ("[v6]:port" too), to verify a server's certificate against.
pub fn host_of(address: &str) -> &str {
    let host = match address.rfind(':') {
        Some(i) if !address[..i].is_empty() => &address[..i],
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::Config(format!("making a test certificate: {e}"))
}

fn write_new(path: &Path, text: &str, secret: bool, force: bool) -> Result<()> {
    let mut o = fs::OpenOptions::new();
    o.write(true).mode(if secret { 0o600 } else { 0o644 });
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    o.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| {
            Error::Config(format!(
                "{}: {e}{}",
                path.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (pass force to replace an existing set)"
                } else {
                    ""
                }
            ))
        })
}

/// Makes a test CA and a server and a client certificate signed by it in `dir` (created if
/// missing), valid for `days`. The server certificate names `hostnames` plus localhost,
/// 127.0.0.1 and ::1. Keys are ECDSA P-256, written mode 0600. Existing files are kept unless
/// `force`. Returns the paths written.
pub fn make_test_certificates(
    dir: &Path,
    hostnames: &[String],
    days: u32,
    force: bool,
) -> Result<Vec<PathBuf>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    if days == 0 {
        return Err(Error::Config("days must be at least 1".into()));
    }
    fs::create_dir_all(dir)
        .map_err(|e| Error::Config(format!("creating {}: {e}", dir.display())))?;
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(i64::from(days));
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "pagewarden test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_key = KeyPair::generate().map_err(rcgen_error)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(rcgen_error)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let mut names: Vec<String> = hostnames.to_vec();
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|h| h == n) {
            names.push(n.into());
        }
    }
    let mut server = CertificateParams::new(names).map_err(rcgen_error)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "pagewarden page server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut server);
    let server_key = KeyPair::generate().map_err(rcgen_error)?;
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .map_err(rcgen_error)?;

    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    client
        .distinguished_name
        .push(DnType::CommonName, "pagewarden destination");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut client);
    let client_key = KeyPair::generate().map_err(rcgen_error)?;
    let client_cert = client
        .signed_by(&client_key, &issuer)
        .map_err(rcgen_error)?;

    let files = [
        (CA_CERT, ca_cert.pem(), false),
        (CA_KEY, issuer.key().serialize_pem(), true),
        (SERVER_CERT, server_cert.pem(), false),
        (SERVER_KEY, server_key.serialize_pem(), true),
        (CLIENT_CERT, client_cert.pem(), false),
        (CLIENT_KEY, client_key.serialize_pem(), true),
    ];
    if !force {
        if let Some((name, _, _)) = files.iter().find(|(n, _, _)| dir.join(n).exists()) {
            return Err(Error::Config(format!(
                "{} exists; pass force to replace the set in {}",
                dir.join(name).display(),
                dir.display()
            )));
        }
    }
    let mut written = Vec::new();
    for (name, text, secret) in files {
        let path = dir.join(name);
        write_new(&path, &text, secret, force)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4000"), "::1");
        assert_eq!(host_of("pages.example:1"), "pages.example");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn a_test_set_loads_at_both_ends_and_is_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("pw-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let written = make_test_certificates(&dir, &["pages.example".into()], 2, false).unwrap();
        assert_eq!(written.len(), 6);
        server_security(&dir).unwrap();
        client_security(&dir, "pages.example").unwrap();
        let again = make_test_certificates(&dir, &[], 2, false).unwrap_err();
        assert!(again.to_string().contains("exists"), "{again}");
        fs::remove_file(dir.join(SERVER_KEY)).unwrap();
        let missing = server_security(&dir).unwrap_err().to_string();
        assert!(
            missing.contains(SERVER_KEY) && missing.contains("tls-certs"),
            "{missing}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
