//! A light unary load generator on raw HTTP/2 (the h2 crate) for calls h2load cannot make:
//! h2load sends one body for every call, while dropping live clients needs one call per client.
//! Bodies are gRPC frames encoded beforehand, so a call costs the client little more than
//! HTTP/2 itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Sends each of `bodies` once as a call of `path` (`/package.Service/Method`) with bearer
/// `token`, over `connections` connections with `in_flight` calls outstanding on each, and
/// returns how long they took. Panics on a call not answered with grpc-status 0.
pub async fn run(
    addr: SocketAddr,
    path: &str,
    token: &str,
    bodies: Vec<Bytes>,
    connections: usize,
    in_flight: usize,
) -> Duration {
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        senders.push(sender);
    }
    let uri = format!("http://{addr}{path}");
    let bearer = format!("Bearer {token}");
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for sender in &senders {
        for _ in 0..in_flight {
            let (mut sender, bodies, next) = (sender.clone(), bodies.clone(), next.clone());
            let (uri, bearer) = (uri.clone(), bearer.clone());
            workers.spawn(async move {
                while let Some(body) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let request = http::Request::post(&uri)
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .header("authorization", &bearer)
                        .body(())
                        .unwrap();
                    sender = sender.ready().await.unwrap();
                    let (response, mut stream) = sender.send_request(request, false).unwrap();
                    stream.send_data(body.clone(), true).unwrap();
                    let response = response.await.unwrap();
                    // An error comes trailers-only, with its status in the headers.
                    let early = response.headers().get("grpc-status").cloned();
                    let mut body = response.into_body();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.unwrap();
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    let trailers = body.trailers().await.unwrap();
                    let status = early.or_else(|| trailers?.get("grpc-status").cloned());
                    assert_eq!(
                        status.as_ref().and_then(|s| s.to_str().ok()),
                        Some("0"),
                        "{uri} answered {status:?}"
                    );
                }
            });
        }
    }
    while let Some(worker) = workers.join_next().await {
        worker.unwrap();
    }
    started.elapsed()
}
