//! What a client can tell of a failed connection that no retry fixes: TLS spoken to a
//! plaintext port or the other way round, a server certificate it refuses, a server that asks
//! for a client certificate it did not bring (or refuses the one it brought). Each is found in
//! what the transport said, or by a probe of the server's port made only after a call failed,
//! and told as what to change, pointing at the recipe of docs/operations.md where certificates
//! are concerned.
//!
//! It only looks: it never retries or changes a setting, and uses no other module of roomctl.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The server a failed call was made to, and how.
pub(super) struct Asked<'a> {
    /// `--server`.
    pub(super) server: &'a str,
    /// Whether the call brought a client certificate (`--cert`).
    pub(super) with_certificate: bool,
}

/// What is wrong with how the client speaks to the server, when the transport's refusal
/// (`message`, with its causes) says so, or a probe of the server's port does.
pub(super) async fn misconfigured(asked: &Asked<'_>, message: &str) -> Option<String> {
    let uri: http::Uri = asked.server.parse().ok()?;
    let host = uri.host()?.to_owned();
    let port = uri.port_u16()?;
    if let Some(why) = certificate_refused(message, &host) {
        return Some(why);
    }
    let https = uri.scheme_str() == Some("https");
    if message.contains("InvalidContentType") && https {
        return Some(format!(
            "the server at {host}:{port} does not speak TLS: use --server \
             http://{host}:{port}"
        ));
    }
    if !https && speaks_tls(&host, port).await {
        return Some(format!(
            "the server at {host}:{port} speaks TLS: use --server https://{host}:{port} \
             (with --ca for a certificate from a private CA, and --cert and --key if it asks \
             for a client certificate); {RECIPE}"
        ));
    }
    // Under TLS 1.3 a server refuses a client's certificate (or its lack) after the client
    // thinks the handshake done: the client sees only a closed connection.
    if https && asks_for_client_certificate(&host, port).await {
        return Some(if asked.with_certificate {
            "the server refused this client's certificate: it must be signed by the CA of the \
             server's --tls-client-ca"
                .to_owned()
        } else {
            "the server asks for a client certificate (mutual TLS): pass --cert and --key, a \
             certificate signed by the CA of the server's --tls-client-ca and its key"
                .to_owned()
        });
    }
    None
}

/// Where the docs show how to make certificates roomctl accepts.
const RECIPE: &str = "docs/operations.md, \"Certificates for TLS\", has a recipe";

/// What is wrong with a certificate, when rustls's refusal (`message`, as tonic words it with
/// its causes) names a mistake of how it was made or given; `host` is the one the client
/// connects to.
pub(super) fn certificate_refused(message: &str, host: &str) -> Option<String> {
    let says = |names: &[&str]| names.iter().any(|name| message.contains(name));
    let why = if says(&["CertificateRequired", "certificate required"]) {
        "the server asks for a client certificate (mutual TLS): pass --cert and --key, a \
         certificate signed by the CA of the server's --tls-client-ca and its key"
            .to_owned()
    } else if says(&[
        "alert: UnknownCA",
        "alert: BadCertificate",
        "alert: DecryptError",
    ]) {
        "the server refused this client's certificate: it must be signed by the CA of the \
         server's --tls-client-ca"
            .to_owned()
    } else if message.contains("CaUsedAsEndEntity") {
        "the server's certificate is a CA certificate (basicConstraints CA:TRUE, as `openssl \
         req -x509` makes by default) presented as the server's own, which roomctl's TLS \
         (rustls, like browsers) refuses: give the server a certificate signed by a CA and \
         pass that CA with --ca"
            .to_owned()
    } else if message.contains("UnsupportedCertVersion") {
        "a certificate is X.509 version 1 (`openssl x509 -req` without `-copy_extensions copy` \
         or `-extfile` makes one), which TLS refuses: reissue it with extensions"
            .to_owned()
    } else if says(&["UnknownIssuer", "unknown issuer"]) {
        "the server's certificate is not signed by a CA this client trusts: pass the PEM of \
         the CA that signed it with --ca"
            .to_owned()
    } else if says(&["NotValidForName", "not valid for name"]) {
        format!(
            "the server's certificate does not name {host:?}, the host of --server: call it by \
             a name the certificate holds, or give the certificate that name as a \
             subjectAltName"
        )
    } else {
        return None;
    };
    Some(format!("{why}; {RECIPE}"))
}

/// Whether the server at `host:port` answers the HTTP/2 preface of a plaintext client with a
/// TLS alert record (content type 21, version 3.x), as a TLS-only listener does.
async fn speaks_tls(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).await.ok()?;
        Some(head == [21, 3])
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Whether the TLS server at `host:port` asks for a client certificate: a handshake made to
/// find out only (its certificate taken unchecked, none offered), whose resolver notes the ask.
async fn asks_for_client_certificate(host: &str, port: u16) -> bool {
    let asked = Arc::new(AskedForCertificate {
        asked: AtomicBool::new(false),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(config) = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
    else {
        return false;
    };
    let mut config = config
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
        .with_client_cert_resolver(asked.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        return false;
    };
    let probe = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), probe).await;
    asked.asked.load(Ordering::Relaxed)
}

/// Notes whether the server asked for a client certificate, and offers none.
#[derive(Debug)]
struct AskedForCertificate {
    asked: AtomicBool,
}

impl ResolvesClientCert for AskedForCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Takes any server certificate: the probe wants to know what the server asks, not who it is.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
