//! A webhook receiver for the tests: a real HTTP/1.1 server on 127.0.0.1 (or https, with a
//! certificate of the test's own CA) that records every request it answers, answers as the test tells it (a status, after a delay), and can go down
//! (its listener and every connection closed) and come back on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
};
use tokio_rustls::TlsAcceptor;

/// A request the receiver answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub content_type: String,
    pub body: String,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a webhook body is JSON")
    }

    /// Whether the sender counts it delivered.
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How the receiver answers a request: its status, and how long it waits first.
pub type Answer = Arc<dyn Fn(&Received) -> (u16, Duration) + Send + Sync>;

struct Shared {
    log: Mutex<Vec<Received>>,
    changed: Notify,
    answer: Mutex<Answer>,
}

pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    /// With https: the TLS it answers with.
    tls: Option<TlsAcceptor>,
}

impl Receiver {
    /// A receiver on a free port that answers 204 at once.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A receiver over https, with the PEM certificate `cert` and its `key`.
    pub async fn start_https(cert: &str, key: &str) -> Self {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Self::start_with(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            changed: Notify::new(),
            answer: Mutex::new(Arc::new(|_: &Received| (204, Duration::ZERO))),
        });
        let server = Some(tokio::spawn(serve(listener, shared.clone(), tls.clone())));
        Self {
            addr,
            shared,
            server,
            tls,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/hook", self.addr)
    }

    /// Answers from now on as `answer` says.
    pub fn answer_with(
        &self,
        answer: impl Fn(&Received) -> (u16, Duration) + Send + Sync + 'static,
    ) {
        *self.shared.answer.lock().unwrap() = Arc::new(answer);
    }

    /// Goes down: the listener and every open connection close.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Comes back on the same port.
    pub async fn resume(&mut self) {
        self.stop();
        // The aborted task may still hold the port for a moment: binding is retried.
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        let tls = self.tls.clone();
        self.server = Some(tokio::spawn(serve(listener, self.shared.clone(), tls)));
    }

    /// Every request answered so far, in the order answered.
    pub fn received(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Waits (at most `patience`) until `done` holds of what was received; panics naming
    /// `what` otherwise.
    pub async fn until(
        &self,
        what: &str,
        patience: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let waiting = async {
            loop {
                let changed = self.shared.changed.notified();
                let received = self.received();
                if done(&received) {
                    return received;
                }
                changed.await;
            }
        };
        match tokio::time::timeout(patience, waiting).await {
            Ok(received) => received,
            Err(_) => panic!(
                "the receiver never saw {what}; it got {:#?}",
                self.received()
                    .iter()
                    .map(|r| format!("{} {} {}", r.status, r.id, r.body))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    // Dropped with this task: aborting it closes every connection too.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (shared, tls) = (shared.clone(), tls.clone());
        connections.spawn(async move {
            let service = service_fn(move |request| answer(request, shared.clone()));
            let http = http1::Builder::new();
            let _ = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                    Err(_) => return,
                },
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
        });
    }
}

async fn answer(
    request: hyper::Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let mut received = Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        content_type: header("content-type"),
        body: String::new(),
        status: 0,
    };
    let body = request.into_body().collect().await?.to_bytes();
    received.body = String::from_utf8(body.to_vec()).unwrap();
    let answer = shared.answer.lock().unwrap().clone();
    let (status, delay) = answer(&received);
    tokio::time::sleep(delay).await;
    received.status = status;
    shared.log.lock().unwrap().push(received);
    shared.changed.notify_waiters();
    Ok(hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap())
}
