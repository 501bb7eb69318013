//! TLS settings shared by the broker's listeners (`dispatch`'s TLS layer) and the sidecar:
//! certificate and key files loaded into rustls configurations (ring provider), reloaded
//! whole on SIGHUP, and the Kafka principal of a client certificate.
//!
//! # Invariants
//! - A reload that fails leaves the configuration in use in place: a bad file never takes
//!   TLS down. Connections keep the configuration they were accepted with.

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS settings: {0}")]
    Config(String),
}

pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |reason: String| TlsError::File { path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(file("no PEM certificate in it".into()));
    }
    Ok(certs)
}

pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File { path: path.to_path_buf(), reason: e.to_string() })
}

pub fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| TlsError::File { path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(roots)
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files a TLS server is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// Certificate chain (PEM), the server's first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// With it, clients must present a certificate chaining to these CAs (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    /// Reads the files and builds a server configuration from them.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let server = builder.with_single_cert(certs(&self.cert)?, key(&self.key)?).map_err(config)?;
        Ok(Arc::new(server))
    }
}

/// The files a TLS client is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The CAs the server's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// A certificate chain and its key to present (PEM), if the server asks for one.
    pub cert_key: Option<(PathBuf, PathBuf)>,
}

impl ClientFiles {
    /// Reads the files and builds a client configuration from them.
    pub fn load(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots(&self.ca)?);
        let client = match &self.cert_key {
            Some((c, k)) => builder.with_client_auth_cert(certs(c)?, key(k)?).map_err(config)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(client))
    }
}

/// A server configuration that SIGHUP can replace.
pub struct ServerTls {
    files: ServerFiles,
    current: ArcSwap<rustls::ServerConfig>,
}

impl ServerTls {
    pub fn new(files: ServerFiles) -> Result<ServerTls, TlsError> {
        let current = ArcSwap::new(files.load()?);
        Ok(ServerTls { files, current })
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// Whether clients must present certificates.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again; on failure the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(self.files.load()?);
        Ok(())
    }
}

/// The Kafka principal name of a client certificate: its subject distinguished name in
/// RFC 2253 form, most specific attribute first (`CN=alice,OU=eng,O=example`), as Kafka's
/// default `ssl.principal.mapping.rules` gives it.
pub fn subject_name(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?;
    let mut rdns = Vec::new();
    for rdn in parsed.subject().iter() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type();
            let name = x509_parser::objects::oid2abbrev(oid, x509_parser::objects::oid_registry())
                .map(str::to_string)
                .unwrap_or_else(|_| oid.to_id_string());
            let value = atv.as_str().map(escape_rfc2253).unwrap_or_else(|_| {
                // Not a string type: RFC 2253's '#' and the hex of the DER value.
                let hex: String = atv.attr_value().data.iter().map(|b| format!("{b:02x}")).collect();
                format!("#{hex}")
            });
            parts.push(format!("{name}={value}"));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn escape_rfc2253(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i + 1 == v.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
