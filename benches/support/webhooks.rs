//! What webhooks cost a node: events delivered per second to a local receiver (in this process,
//! answering 204 at once) from busy rooms, and the node's CPU per delivered event, against the
//! same load on a node with webhooks off.

use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::*;

/// A receiver on 127.0.0.1 that counts the requests it answered.
async fn receiver() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let counted = counted.clone();
                    async move {
                        request.into_body().collect().await?;
                        counted.fetch_add(1, Ordering::Relaxed);
                        let mut answer = hyper::Response::new(Full::new(Bytes::new()));
                        *answer.status_mut() = hyper::StatusCode::NO_CONTENT;
                        Ok::<_, hyper::Error>(answer)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, count)
}

/// One load: `rooms` rooms, each joined once and then locked and unlocked `pairs` times, by 16
/// gateway clients; returns the events it logged.
async fn load(node: &Node, rooms: usize, pairs: usize) -> u64 {
    let mut gateways = Vec::new();
    for _ in 0..16 {
        gateways.push(node.client("gw", "*", "service").await);
    }
    let gateways = Arc::new(tokio::sync::Mutex::new(gateways));
    for_each_gateway(
        &gateways,
        0..rooms,
        move |mut gateway, room_id| async move {
            gateway.join(join_request(&room_id)).await.unwrap();
            lock_and_unlock(&mut gateway, &room_id, pairs).await;
            (gateway, Vec::<()>::new())
        },
    )
    .await;
    (rooms * (1 + 2 * pairs)) as u64
}

/// Webhooks off, then on, under the same load.
pub(super) async fn webhooks(size: Size) {
    let (rooms, pairs) = match size {
        Size::Smoke => (50, 1),
        Size::Quick => (1_000, 5),
        Size::Full => (1_000, 20),
    };
    let (addr, received) = receiver().await;
    let dir = std::env::temp_dir().join(format!("roomctl-bench-webhooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    let url = format!("http://{addr}/hook");
    let secret = secret.to_string_lossy().into_owned();
    println!(
        "\nwebhooks: {rooms} rooms, each joined then locked and unlocked {pairs} times by 16 \
         gateways, one node on the memory store, presence off; the receiver answers 204 at once"
    );
    let mut cpu_per_event = Vec::new();
    for on in [false, true] {
        let mut extra = vec!["--presence-timeout", "0"];
        if on {
            extra.extend(["--webhook-url", &url, "--webhook-secret-file", &secret]);
        }
        let node = Node::start_with("memory", &extra).await;
        let (cpu, started, before) = (node.cpu(), Instant::now(), received.load(Ordering::Relaxed));
        let events = load(&node, rooms, pairs).await;
        let loaded = started.elapsed();
        if on {
            while received.load(Ordering::Relaxed) - before < events {
                assert!(
                    started.elapsed() < Duration::from_secs(600),
                    "the receiver got {} of {events} events",
                    received.load(Ordering::Relaxed) - before
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let delivered = started.elapsed();
        let per_event = (node.cpu() - cpu).as_secs_f64() * 1e6 / events as f64;
        cpu_per_event.push(per_event);
        let state = if on { "on " } else { "off" };
        println!(
            "  webhooks {state}: {events} events logged in {:.2} s ({:.0} changes/s){}; server CPU \
             {per_event:.1} us per event",
            loaded.as_secs_f64(),
            events as f64 / loaded.as_secs_f64(),
            if on {
                format!(
                    ", all delivered {:.2} s after the start ({:.0} events/s)",
                    delivered.as_secs_f64(),
                    events as f64 / delivered.as_secs_f64()
                )
            } else {
                String::new()
            }
        );
    }
    println!(
        "  server CPU per delivered event (on - off): {:.1} us",
        cpu_per_event[1] - cpu_per_event[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
