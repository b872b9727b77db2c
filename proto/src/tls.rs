//! Mutual TLS for Tandem's internal planes: the router's gRPC channels to the
//! workers and the KV plane's TCP connections. Every process presents a
//! certificate signed by the cluster's CA and accepts only peers whose
//! certificate chains to that same CA; the crypto is rustls with ring.
//!
//! Owns: reading and checking the PEM files once, at start (a bad file is a
//! one-line error before anything listens), the rustls configurations of the
//! KV plane, and the checked PEM bytes that the gRPC servers and channels
//! (tonic) are built from. Does not: reload certificates (restart to rotate),
//! check revocation, or secure the KV plane's same-host Unix socket (see kvtransfer's `receiver`).
//!
//! Names: workers advertise IP addresses, and pod addresses change, so a client
//! verifies a worker's certificate against one configured DNS name
//! (`TlsFiles::server_name`, by default `tandem-worker`), never the address:
//! every worker's certificate carries that name as a subject alternative name.
//! A client certificate is checked for its chain to the CA only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name a worker's certificate is verified against when none is configured.
pub const DEFAULT_SERVER_NAME: &str = "tandem-worker";

/// Where one process's TLS material is: PEM files, and the name workers are verified by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain, its own certificate first.
    pub cert: PathBuf,
    /// The private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) every peer's certificate must chain to.
    pub ca: PathBuf,
    /// The DNS name clients verify a worker's certificate against.
    pub server_name: String,
}

impl TlsFiles {
    /// The three files, with the default server name.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> TlsFiles {
        TlsFiles { cert: cert.into(), key: key.into(), ca: ca.into(), server_name: DEFAULT_SERVER_NAME.into() }
    }
}

/// Why the TLS material cannot be used. Each message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS {what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the TLS {what} {}: {why}", path.display())]
    Pem { what: &'static str, path: PathBuf, why: String },
    #[error("TLS: {0}")]
    Invalid(String),
}

/// Checked TLS material of one process and the configurations built from it. Cheap to clone.
#[derive(Clone)]
pub struct MutualTls {
    files: TlsFiles,
    cert_pem: Arc<Vec<u8>>,
    key_pem: Arc<Vec<u8>>,
    ca_pem: Arc<Vec<u8>>,
    chain: Arc<Vec<CertificateDer<'static>>>,
    roots: Arc<RootCertStore>,
    server_name: ServerName<'static>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for MutualTls {
    /// Names the files; never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MutualTls").field("files", &self.files).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn certificates(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::Pem { what, path: path.to_path_buf(), why };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM CERTIFICATE block".into()));
    }
    Ok(certs)
}

impl MutualTls {
    /// Reads and checks the files: PEM that parses, a key that matches the certificate,
    /// and a certificate that chains to the CA (else no peer would accept it). Also makes
    /// ring the process's default rustls provider, which the gRPC servers then use.
    pub fn load(files: &TlsFiles) -> Result<MutualTls, TlsError> {
        // Fails only when a provider is already installed, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("private key", &files.key)?;
        let ca_pem = read("CA certificate", &files.ca)?;
        let chain = certificates("certificate", &files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            what: "private key",
            path: files.key.clone(),
            why: format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("CA certificate", &files.ca, &ca_pem)? {
            roots.add(ca).map_err(|e| TlsError::Pem {
                what: "CA certificate",
                path: files.ca.clone(),
                why: format!("is not a usable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let server_name = ServerName::try_from(files.server_name.clone())
            .map_err(|_| TlsError::Invalid(format!("server name {:?} is not a DNS name", files.server_name)))?;

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        client_verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map_err(|e| {
            TlsError::Invalid(format!(
                "the certificate {} does not verify against the CA {}: {e}",
                files.cert.display(),
                files.ca.display()
            ))
        })?;
        let mismatch = |e: rustls::Error| {
            TlsError::Invalid(format!(
                "the private key {} does not fit the certificate {}: {e}",
                files.key.display(),
                files.cert.display()
            ))
        };
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key)
            .map_err(mismatch)?;
        Ok(MutualTls {
            files: files.clone(),
            cert_pem: Arc::new(cert_pem),
            key_pem: Arc::new(key_pem),
            ca_pem: Arc::new(ca_pem),
            chain: Arc::new(chain),
            roots,
            server_name,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// A server (a worker) checks at start that clients will accept its certificate:
    /// it must carry the configured server name.
    pub fn check_server_name(&self) -> Result<(), TlsError> {
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        verifier
            .verify_server_cert(&self.chain[0], &self.chain[1..], &self.server_name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| {
                TlsError::Invalid(format!(
                    "the certificate {} is not valid for the server name {:?} that clients verify: {e}",
                    self.files.cert.display(),
                    self.files.server_name
                ))
            })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The certificate chain, PEM (checked), for a gRPC identity.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The private key, PEM (checked), for a gRPC identity.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    /// The CA certificate(s), PEM (checked): gRPC servers require client certificates
    /// chaining to it, gRPC channels verify servers with it.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The name a worker's certificate is verified against.
    pub fn server_name(&self) -> &str {
        &self.files.server_name
    }

    /// Accepts KV connections: requires a client certificate chaining to the CA.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// Opens KV connections: presents this certificate, verifies the receiver's.
    pub fn connector(&self) -> (tokio_rustls::TlsConnector, ServerName<'static>) {
        (tokio_rustls::TlsConnector::from(self.client.clone()), self.server_name.clone())
    }
}
