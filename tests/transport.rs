//! The transport under abuse: a process out of file descriptors keeps serving and recovers
//! without spinning; HTTP/2 rapid resets and PING or SETTINGS floods on one connection do not
//! starve other clients; keepalive reaps a peer that stopped answering.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::proc::cpu_of;
use common::*;
use roomctl::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn list(room: &str) -> pb::ListParticipantsRequest {
    pb::ListParticipantsRequest {
        room_id: room.into(),
    }
}

/// One HTTP/2 frame: a 9-byte header (length, type, flags, stream 0) and its payload.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut bytes = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    bytes.extend_from_slice(payload);
    bytes
}

/// `calls` unary calls by a well-behaved client, all of which must succeed in good time.
async fn others_are_served(client: &mut Client, calls: usize) {
    let work = async {
        for _ in 0..calls {
            client.list_participants(list("r")).await.unwrap();
        }
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .expect("a well-behaved client is served while another misbehaves");
}

/// `roomctl serve` limited to 64 file descriptors, flooded with idle connections: it logs that
/// it cannot accept, does not spin (a spinning accept loop burns a whole core), keeps serving
/// the connection it already had, and accepts again once the idle connections are gone.
#[tokio::test]
async fn running_out_of_file_descriptors_is_survived() {
    let mut command =
        node_process::serve(&["--listen", "127.0.0.1:0", "--handshake-timeout", "1h"]);
    // SAFETY: setrlimit is async-signal-safe and touches nothing but the child's limits.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, addr, mut lines) = node_process::start(command).await;
    let pid = child.id().unwrap();
    let mut ops = client_with_token(addr, &token("ops", "r", "service")).await;
    join(&mut ops, "r", "x").await;

    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let warned = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("cannot accept connections") {
                return;
            }
        }
    });
    warned.await.expect("the server says it cannot accept");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let before = cpu_of(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burnt = cpu_of(pid) - before;
    assert!(
        burnt < Duration::from_millis(500),
        "spinning: {burnt:?} of CPU in 1 s"
    );
    others_are_served(&mut ops, 10).await;

    drop(idle);
    let recovered = async {
        loop {
            let attempt = async {
                let mut fresh = client_with_token(addr, &token("ops", "r", "service")).await;
                fresh.list_participants(list("r")).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, recovered)
        .await
        .expect("new connections are served once descriptors are free");
    child.kill().await.unwrap();
}

/// The rapid-reset attack (CVE-2023-44487): one connection opens streams and cancels them at
/// once, thousands of times. Other clients are served throughout.
// Several threads, as a server has: the flood and the well-behaved client are not made to
// share one thread with the server by the test itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_resets_do_not_starve_others() {
    let server = TestServer::start(Backend::Memory).await;
    let mut ops = server.client("ops", "r", "service").await;
    join(&mut ops, "r", "x").await;
    let mut attacker = bare::connect(server.addr).await;
    let bearer = format!("Bearer {}", token("ops", "r", "service"));
    let attack = tokio::spawn(async move {
        for _ in 0..20_000 {
            let (head, _) = bare::request(
                "/roomcontrol.v1.RoomControl/ListParticipants",
                &[("authorization", &bearer)],
                &list("r"),
            );
            let Ok(ready) = attacker.ready().await else {
                return; // the server closed the connection: the defence worked
            };
            attacker = ready;
            match attacker.send_request(head, false) {
                Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
                Err(_) => return,
            }
        }
    });
    others_are_served(&mut ops, 50).await;
    attack.await.unwrap();
    others_are_served(&mut ops, 5).await;
}

/// A connection that floods PING or SETTINGS frames (reading every answer, so it is never
/// slowed by its own backlog) does not starve other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_do_not_starve_others() {
    let server = TestServer::start(Backend::Memory).await;
    let mut ops = server.client("ops", "r", "service").await;
    join(&mut ops, "r", "x").await;
    for flood in [frame(0x6, 0, &[7; 8]), frame(0x4, 0, &[])] {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (mut read, mut write) = tcp.into_split();
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flooding = stop.clone();
        let flooder = tokio::spawn(async move {
            let mut burst = PREFACE.to_vec();
            burst.extend(frame(0x4, 0, &[]));
            let _ = write.write_all(&burst).await;
            let many: Vec<u8> = flood
                .iter()
                .copied()
                .cycle()
                .take(flood.len() * 512)
                .collect();
            while !flooding.load(Ordering::Relaxed) {
                if write.write_all(&many).await.is_err() {
                    return; // the server closed the connection: also a defence
                }
            }
        });
        others_are_served(&mut ops, 20).await;
        stop.store(true, Ordering::Relaxed);
        flooder.await.unwrap();
        drain.abort();
    }
}

/// A TCP stream that can be frozen: once frozen, it neither reads nor writes (nor closes), as a
/// peer whose host vanished looks from the other end.
struct Freezable {
    inner: TcpStream,
    frozen: Arc<AtomicBool>,
}

impl AsyncRead for Freezable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Freezable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client that stops answering (its socket stays open, nothing comes back) is found by the
/// server's keepalive pings and its connection closed, so its Events stream is released.
#[tokio::test]
async fn keepalive_reaps_a_peer_that_stopped_answering() {
    let server = TestServer::start_with(Backend::Memory, |c| {
        c.limits.keepalive_interval = Duration::from_millis(300);
        c.limits.keepalive_timeout = Duration::from_millis(300);
    })
    .await;
    let mut ops = server.client("ops", "r", "service").await;
    join(&mut ops, "r", "x").await;

    let frozen = Arc::new(AtomicBool::new(false));
    let io = Freezable {
        inner: TcpStream::connect(server.addr).await.unwrap(),
        frozen: frozen.clone(),
    };
    let (send, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.unwrap();
    let bearer = format!("Bearer {}", token("ops", "r", "service"));
    let (head, body) = bare::request(
        "/roomcontrol.v1.RoomControl/Events",
        &[("authorization", &bearer)],
        &pb::EventsRequest {
            room_id: "r".into(),
            ..Default::default()
        },
    );
    let (response, mut stream) = send.send_request(head, false).unwrap();
    stream.send_data(body, true).unwrap();
    response.await.unwrap();
    assert_eq!(server.subscriptions(), 1);

    frozen.store(true, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.subscriptions() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent peer's stream was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    others_are_served(&mut ops, 1).await;
}
