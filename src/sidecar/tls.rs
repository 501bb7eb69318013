//! TLS for the sidecar (rustls, ring provider): from clients (`--tls-cert`/`--tls-key`,
//! optionally requiring client certificates signed by `--tls-client-ca`) and to the
//! brokers (`--upstream-tls`, trusting `--upstream-ca`, optionally presenting
//! `--upstream-cert`/`--upstream-key`). Either side may be on without the other: a
//! sidecar can terminate TLS for plaintext brokers, or add it in front of TLS-only ones.

use rustls::pki_types::ServerName;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Serve clients over TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Connect to the brokers over TLS.
    #[arg(long)]
    pub upstream_tls: bool,
    /// The CAs the brokers' certificates must chain to (PEM) [required with --upstream-tls].
    #[arg(long, requires = "upstream_tls")]
    pub upstream_ca: Option<PathBuf>,
    /// A client certificate chain to present to the brokers (PEM).
    #[arg(long, requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// The private key of `--upstream-cert` (PEM).
    #[arg(long, requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// The name the brokers' certificates must carry [default: the host connected to].
    #[arg(long, requires = "upstream_tls")]
    pub upstream_server_name: Option<String>,
}

pub use crate::tls::TlsError;
use crate::tls::{ClientFiles, ServerFiles, ServerTls};

impl TlsArgs {
    /// The files of the clients' side, if `--tls-cert` is given.
    pub fn server_files(&self) -> Option<ServerFiles> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return None };
        Some(ServerFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() })
    }
}

/// What accepts clients' TLS (reloadable), if `--tls-cert` is given.
pub fn server(a: &TlsArgs) -> Result<Option<ServerTls>, TlsError> {
    a.server_files().map(ServerTls::new).transpose()
}

/// How to reach brokers over TLS, if `--upstream-tls`.
pub struct Upstream {
    pub connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl Upstream {
    /// The name to check the certificate of `host` against.
    pub fn name_for(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        match &self.server_name {
            Some(n) => Ok(n.clone()),
            None => ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_string())
                .map_err(|e| TlsError::Config(format!("{host}: not a name to check a certificate against: {e}"))),
        }
    }
}

pub fn upstream(a: &TlsArgs) -> Result<Option<Upstream>, TlsError> {
    if !a.upstream_tls {
        return Ok(None);
    }
    let ca = a.upstream_ca.as_ref().ok_or_else(|| TlsError::Config("--upstream-tls needs --upstream-ca".into()))?;
    let cert_key = match (&a.upstream_cert, &a.upstream_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        _ => None,
    };
    let client = ClientFiles { ca: ca.clone(), cert_key }.load()?;
    let server_name = match &a.upstream_server_name {
        Some(n) => Some(
            ServerName::try_from(n.clone())
                .map_err(|e| TlsError::Config(format!("--upstream-server-name {n}: {e}")))?,
        ),
        None => None,
    };
    Ok(Some(Upstream { connector: tokio_rustls::TlsConnector::from(client), server_name }))
}
