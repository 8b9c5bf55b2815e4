//! Accepting connections: what tonic's own accept loop does not guard against.
//!
//! - **Out of file descriptors.** `accept` fails with `EMFILE` for as long as the process is at
//!   its limit, and the listening socket stays readable, so a plain loop spins on one core.
//!   Here a resource error backs off (10 ms doubling to 1 s), is logged once per episode, and
//!   connections already open go on being served.
//! - **Connections that never speak.** A connection must send the HTTP/2 client preface within
//!   the handshake timeout or it is closed, so idle sockets cannot pile up until the limit.
//!   Waiting for it happens beside the accept loop, never in its way.
//!
//! Each accepted connection carries a [`ConnInfo`] that tonic puts in every request's
//! extensions: the per-connection stream count lives there.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// The bytes every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// First and longest pause after an accept error caused by a lack of resources.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Admitted connections waiting for tonic to pick them up.
const ADMITTED: usize = 64;

/// What the server knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// `Events` streams open on this connection now.
    pub streams: Arc<AtomicUsize>,
}

/// An accepted TCP connection that has sent the HTTP/2 preface.
pub struct Conn {
    stream: TcpStream,
    info: ConnInfo,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections of `listener` that send the HTTP/2 preface within `handshake_timeout`, as
/// tonic's incoming stream. Dropping the stream (on shutdown) stops accepting and closes the
/// listening socket.
pub fn incoming(
    listener: TcpListener,
    handshake_timeout: Duration,
) -> ReceiverStream<io::Result<Conn>> {
    let (admitted, incoming) = mpsc::channel(ADMITTED);
    tokio::spawn(accept_loop(listener, handshake_timeout, admitted));
    ReceiverStream::new(incoming)
}

async fn accept_loop(
    listener: TcpListener,
    handshake_timeout: Duration,
    admitted: mpsc::Sender<io::Result<Conn>>,
) {
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut starved = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = admitted.closed() => return,
        };
        match accepted {
            Ok((stream, remote)) => {
                if starved {
                    tracing::info!("accepting connections again");
                    starved = false;
                }
                backoff = ACCEPT_BACKOFF.0;
                tokio::spawn(admit(stream, remote, handshake_timeout, admitted.clone()));
            }
            Err(err) if lacks_resources(&err) => {
                if !starved {
                    tracing::warn!(
                        %err,
                        "cannot accept connections: out of file descriptors or memory; \
                         serving open connections and retrying (raise `ulimit -n`)"
                    );
                    starved = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = admitted.closed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
            // The peer gave up between SYN and accept (ECONNABORTED and the like): nothing to do.
            Err(err) => tracing::debug!(%err, "accept failed"),
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or the system is at a limit, and retrying at
/// once fails the same way.
fn lacks_resources(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Hands `stream` to tonic once it has sent the HTTP/2 preface, or closes it at the deadline.
async fn admit(
    stream: TcpStream,
    remote: SocketAddr,
    handshake_timeout: Duration,
    admitted: mpsc::Sender<io::Result<Conn>>,
) {
    match tokio::time::timeout(handshake_timeout, preface(&stream)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            return tracing::debug!(%remote, %err, "connection closed before its preface")
        }
        Err(_) => {
            return tracing::debug!(%remote, ?handshake_timeout, "no HTTP/2 preface in time; closing")
        }
    }
    // Events are small and latency-bound: never wait to coalesce them.
    let _ = stream.set_nodelay(true);
    let conn = Conn {
        stream,
        info: ConnInfo {
            remote: Some(remote),
            streams: Arc::default(),
        },
    };
    // Fails only when the server is shutting down; the connection is then dropped.
    let _ = admitted.send(Ok(conn)).await;
}

/// Waits until the peer has sent the HTTP/2 preface, or anything that is not one (hyper then
/// refuses it with a proper error). Peeking leaves the bytes for hyper to read.
async fn preface(stream: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if n == PREFACE.len() || buf[..n] != PREFACE[..n] {
            return Ok(());
        }
        // Part of the preface: the rest is on its way (peek returns at once while data waits).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_told_apart() {
        assert!(lacks_resources(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(lacks_resources(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!lacks_resources(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
