//! TLS on the gRPC listener (rustls): a certificate and key from PEM files, and with a client
//! CA, mutual TLS (a client without a certificate signed by that CA cannot connect).
//!
//! The handshake runs in roomctl's own accept loop ([`crate::accept`]), within
//! `--handshake-timeout`, with the configuration current at that moment: [`TlsAcceptor::reload`]
//! (on SIGHUP) swaps in newly read files for the connections that come next, while open
//! connections and their streams go on with the certificate they started with.
//!
//! It loads and swaps TLS configuration only: accepting connections is [`crate::accept`]'s, and
//! it uses no other module of roomctl.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Where the listener's TLS material is (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM certificates of the CAs whose client certificates are accepted; when set, every
    /// client must present one (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Why TLS files could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{0}")]
    Unreadable(String),
    /// The files were read but do not make a TLS configuration (no certificate, a key that is
    /// not the certificate's, a bad client CA).
    #[error("{0}")]
    Invalid(String),
}

impl TlsFiles {
    /// Reads the files into a rustls configuration that speaks HTTP/2 only.
    pub fn load(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let read = |what: &str, path: &PathBuf, err: &rustls::pki_types::pem::Error| {
            let said = format!("cannot read the TLS {what} {}: {err}", path.display());
            match err {
                rustls::pki_types::pem::Error::Io(_) => TlsError::Unreadable(said),
                _ => TlsError::Invalid(said),
            }
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| read("certificate", &self.cert, &e))?;
        if chain.is_empty() {
            return Err(TlsError::Invalid(format!(
                "no certificate in {}",
                self.cert.display()
            )));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| read("key", &self.key, &e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(format!("TLS setup: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| read("client CA", path, &e))?
                {
                    let cert = cert.map_err(|e| read("client CA", path, &e))?;
                    roots.add(cert).map_err(|e| {
                        TlsError::Invalid(format!("bad client CA in {}: {e}", path.display()))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| {
                            TlsError::Invalid(format!("client CA {}: {e}", path.display()))
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Invalid(format!("TLS certificate and key do not fit: {e}")))?;
        // gRPC is HTTP/2; clients (grpc-go in grpcurl among them) ask for it by ALPN. gRPC-Web
        // may also come over HTTP/1.1, from a client that offers nothing else.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The listener's TLS acceptor, replaceable while serving. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor(Arc<RwLock<tokio_rustls::TlsAcceptor>>);

impl TlsAcceptor {
    /// An acceptor for `config`.
    pub fn new(config: rustls::ServerConfig) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(config).into())))
    }

    /// Handshakes from now on use `config`; connections already open keep theirs.
    pub fn reload(&self, config: rustls::ServerConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config).into();
    }

    /// The acceptor for the next handshake.
    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
