//! TLS for `capsa serve --listen tls:HOST:PORT` and its clients, with
//! rustls (the `ring` provider).
//!
//! The server presents a certificate from PEM files, or one it generated
//! once and keeps in the user's state folder (0600), whose SHA-256
//! fingerprint it prints at start. A client trusts the server either
//! through a CA file (chain and name checked as a browser would) or by the
//! fingerprint it was told out of band (pinning: the certificate must be
//! exactly that one; its names and dates are not what is trusted). There
//! is no third way: a client never trusts a certificate because it saw it
//! first.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{}: {why}", path.display())]
    Pem { path: PathBuf, why: String },
    /// A private key or its folder is readable by others.
    #[error("{}: readable by others; `chmod {mode:o}` it", path.display())]
    NotPrivate { path: PathBuf, mode: u32 },
    /// rustls refused the configuration (a key that does not match its
    /// certificate, say).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The self-signed certificate could not be made.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A fingerprint that is not 32 bytes of hex.
    #[error("{0:?} is not a SHA-256 fingerprint: 64 hex digits, colons allowed")]
    Fingerprint(String),
    /// A server name that cannot be checked against a certificate.
    #[error("{0:?} is not a host name or IP address TLS can check")]
    Name(String),
}

fn file_error(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// rustls' `ring` provider: it builds with a C compiler alone (the
/// aws-lc-rs one wants CMake), at the price of no post-quantum key
/// exchange, which rustls flags by deprecating it.
#[expect(
    deprecated,
    reason = "ring has no post-quantum key exchange; aws-lc-rs needs CMake to build"
)]
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: as strong as this link needs, and a third less
    // work per byte than AES-256 on the stream.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The SHA-256 of a certificate's DER bytes, as `openssl x509 -fingerprint
/// -sha256` prints it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    /// 64 hex digits in either case, with or without colons, with or
    /// without a `SHA256:` or `sha256=` prefix.
    fn from_str(s: &str) -> Result<Fingerprint, TlsError> {
        let bad = || TlsError::Fingerprint(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        let hex = lower
            .strip_prefix("sha256:")
            .or_else(|| lower.strip_prefix("sha256="))
            .unwrap_or(&lower);
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// What a server presents: its certificate chain and key, ready for
/// `tokio-rustls`.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerTls({})", self.fingerprint)
    }
}

/// The names a generated certificate carries besides the listen host.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

impl ServerTls {
    /// A certificate chain and its private key from PEM files (the key
    /// must not be readable by group or others).
    pub fn from_pem(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_error(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert.to_path_buf(),
                why: "no CERTIFICATE block".into(),
            });
        }
        private(key, 0o600)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
        ServerTls::new(chain, key_der)
    }

    /// The certificate in `dir` (`cert.pem`, `key.pem`), made the first
    /// time: self-signed, for `host` and the loopback names. `dir` is
    /// created 0700 and must be this user's alone.
    pub fn load_or_generate(dir: &Path, host: &str) -> Result<ServerTls, TlsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_error(dir))?;
        private(dir, 0o700)?;
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if !cert.exists() || !key.exists() {
            let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let wildcard = matches!(host, "0.0.0.0" | "::" | "");
            if !wildcard && !names.iter().any(|n| n == host) {
                names.push(host.to_string());
            }
            let key_pair = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(names)?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "capsa serve");
            let generated = params.self_signed(&key_pair)?;
            write_private(&key, key_pair.serialize_pem().as_bytes())?;
            write_private(&cert, generated.pem().as_bytes())?;
            tracing::info!(
                "generated a self-signed TLS certificate in {}",
                dir.display()
            );
        }
        ServerTls::from_pem(&cert, &key)
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ServerTls, TlsError> {
        let fingerprint = Fingerprint::of(&chain[0]);
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(ServerTls {
            config: Arc::new(config),
            fingerprint,
        })
    }

    /// The fingerprint clients pin (`--tls-fingerprint`).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// The default folder of the generated certificate:
/// `$XDG_STATE_HOME/capsa/tls`, else `~/.local/state/capsa/tls`.
pub fn default_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".local/state"),
    };
    Some(base.join("capsa/tls"))
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::File {
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            why: format!("{other:?}"),
        },
    }
}

/// Refuses `path` if group or others have any access to it.
fn private(path: &Path, fix: u32) -> Result<(), TlsError> {
    let mode = fs::metadata(path)
        .map_err(file_error(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::NotPrivate {
            path: path.to_path_buf(),
            mode: fix,
        });
    }
    Ok(())
}

/// Writes `bytes` to a new file of mode 0600, whole or not at all.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let staged = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&staged, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staged);
    }
    result.map_err(file_error(path))
}

/// How a client decides the server is the one it meant.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The server's chain must lead to a certificate of this PEM file and
    /// name the host connected to.
    Ca(PathBuf),
    /// The server's certificate must be exactly this one.
    Fingerprint(Fingerprint),
}

/// A client's TLS configuration for `trust`.
pub fn connector(trust: &Trust) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match trust {
        Trust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| pem_error(path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(path, e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Pem {
                    path: path.clone(),
                    why: "no usable CA certificate".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pin: *pin,
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name a client checks the server's certificate against: the HOST of
/// `HOST:PORT` (an IP address or a DNS name).
pub fn server_name(hostport: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match hostport.rsplit_once(':') {
        Some((host, _)) => host,
        None => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::Name(host.to_string()))
}

/// Accepts exactly the pinned certificate. The handshake's signature is
/// still checked against it, so only the holder of its key gets through.
#[derive(Debug)]
struct Pinned {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        if seen == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has the SHA-256 fingerprint {seen}, not the pinned {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_printed_and_as_typed() {
        let f = Fingerprint([0xab; 32]);
        let printed = f.to_string();
        assert_eq!(printed.len(), 32 * 3 - 1);
        assert!(printed.starts_with("AB:AB:"));
        assert_eq!(printed.parse::<Fingerprint>().unwrap(), f);
        assert_eq!("ab".repeat(32).parse::<Fingerprint>().unwrap(), f);
        assert_eq!(
            format!("SHA256:{}", "AB".repeat(32))
                .parse::<Fingerprint>()
                .unwrap(),
            f
        );
        for bad in ["", "ab", &"ab".repeat(33), &"zz".repeat(32), "é"] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn server_names_come_from_host_port() {
        assert!(matches!(
            server_name("127.0.0.1:7070").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7070").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("capsa.example:443").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn a_generated_certificate_is_kept_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("capsa-tls-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = ServerTls::load_or_generate(&dir, "0.0.0.0").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let again = ServerTls::load_or_generate(&dir, "0.0.0.0").unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        // A key others can read is refused, naming the fix.
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = ServerTls::load_or_generate(&dir, "0.0.0.0").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
