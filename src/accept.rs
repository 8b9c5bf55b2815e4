//! Accepting connections: what tonic's own accept loop does not guard against.
//!
//! - **Out of file descriptors.** `accept` fails with `EMFILE` for as long as the process is at
//!   its limit, and the listening socket stays readable, so a plain loop spins on one core.
//!   Here a resource error backs off (10 ms doubling to 1 s), is logged once per episode, and
//!   connections already open go on being served.
//! - **Connections that never speak.** A connection must complete its TLS handshake (with
//!   `--tls-cert`) and send the HTTP/2 client preface within the handshake timeout or it is
//!   closed, so idle sockets cannot pile up until the limit. Waiting for them happens beside the
//!   accept loop, never in its way.
//!
//! - **HTTP/1.1 peers that hang up unseen.** While hyper streams a response on an HTTP/1.1
//!   connection (gRPC-Web's `Events`) and holds bytes of a next request, it stops reading the
//!   socket, so it never sees the peer close it: in a quiet room the stream, its slot and the
//!   socket would live on. A copy of the socket's descriptor is watched for the hang-up
//!   instead, and the connection's streams are ended when it comes.
//!
//! Each accepted connection carries a [`ConnInfo`] that tonic puts in every request's
//! extensions: the per-connection stream count and what ends its streams live there.
//!
//! It deals in sockets and bytes only: it reads no request and knows nothing of the service; of
//! roomctl it uses only [`crate::tls`]'s acceptor.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::server::Connected;

use crate::backoff::Backoff;
use crate::tls::TlsAcceptor;

/// The bytes every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long the accept loop waits while out of file descriptors: from 10 ms, doubling,
/// jittered, always under a second.
fn starved_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(10), Duration::from_millis(500))
}
/// Admitted connections waiting for tonic to pick them up.
const ADMITTED: usize = 64;

/// What the server knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// `Events` streams open on this connection now.
    pub streams: Arc<AtomicUsize>,
    /// Cancelled when the server shuts down, or when the connection is gone: ends its streams.
    pub ends: CancellationToken,
}

/// The transport of a connection: plain TCP, or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection that has sent the HTTP/2 preface. The preface was read to check it,
/// so it is handed to hyper again first.
pub struct Accepted {
    io: Io,
    preface: Vec<u8>,
    replayed: usize,
    info: ConnInfo,
    /// Cancels `info.ends` when hyper drops the connection (which stops the hang-up watch).
    _gone: DropGuard,
}

impl Connected for Accepted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.preface.len() {
            let rest = &this.preface[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener` that complete their handshake (TLS with `tls`, then the
/// HTTP/2 preface) within `handshake_timeout`, as tonic's incoming stream; each one's streams
/// end with `shutdown`, or when it is gone. Dropping the stream (on shutdown) stops accepting
/// and closes the listening socket.
pub fn incoming(
    listener: TcpListener,
    handshake_timeout: Duration,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Accepted>> {
    let (admitted, incoming) = mpsc::channel(ADMITTED);
    tokio::spawn(accept_loop(
        listener,
        handshake_timeout,
        tls,
        shutdown,
        admitted,
    ));
    ReceiverStream::new(incoming)
}

async fn accept_loop(
    listener: TcpListener,
    handshake_timeout: Duration,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    admitted: mpsc::Sender<io::Result<Accepted>>,
) {
    let mut backoff = starved_backoff();
    let mut starved = false;
    loop {
        let attempt = tokio::select! {
            attempt = listener.accept() => attempt,
            _ = admitted.closed() => return,
        };
        match attempt {
            Ok((stream, remote)) => {
                if starved {
                    tracing::info!("accepting connections again");
                    starved = false;
                }
                backoff.reset();
                let handshake = handshake(stream, tls.as_ref().map(TlsAcceptor::current));
                tokio::spawn(admit(
                    handshake,
                    remote,
                    handshake_timeout,
                    shutdown.child_token(),
                    admitted.clone(),
                ));
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
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = admitted.closed() => return,
                }
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

/// Hands the connection `handshake` yields to tonic, or closes it at the deadline.
async fn admit(
    handshake: impl std::future::Future<Output = io::Result<(Io, Vec<u8>)>>,
    remote: SocketAddr,
    handshake_timeout: Duration,
    ends: CancellationToken,
    admitted: mpsc::Sender<io::Result<Accepted>>,
) {
    let (io, preface) = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(done)) => done,
        Ok(Err(err)) => return tracing::debug!(%remote, %err, "handshake failed; closing"),
        Err(_) => {
            return tracing::debug!(%remote, ?handshake_timeout, "no handshake in time; closing")
        }
    };
    if preface != PREFACE {
        // HTTP/1.1 (or garbage hyper refuses): watched for a hang-up hyper may not see.
        let fd = match &io {
            Io::Plain(tcp) => tcp.as_raw_fd(),
            Io::Tls(tls) => tls.get_ref().0.as_raw_fd(),
        };
        if let Some(copy) = duplicate(fd) {
            tokio::spawn(watch_hang_up(copy, ends.clone()));
        }
    }
    let accepted = Accepted {
        io,
        preface,
        replayed: 0,
        info: ConnInfo {
            remote: Some(remote),
            streams: Arc::default(),
            ends: ends.clone(),
        },
        _gone: ends.drop_guard(),
    };
    // Fails only when the server is shutting down; the connection is then dropped.
    let _ = admitted.send(Ok(accepted)).await;
}

/// A second descriptor of the socket `fd`, to watch beside its owner; None when the process is
/// out of descriptors (the connection is then served unwatched).
fn duplicate(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: `fd` is an open socket, owned by the connection, for the length of this call.
    let copy = unsafe { libc::dup(fd) };
    // SAFETY: a descriptor `dup` just made is owned by nobody else.
    (copy >= 0).then(|| unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Cancels `ends` when the peer of the socket `copy` is a copy of hangs up (or the socket
/// fails); returns when `ends` is cancelled otherwise, closing the copy so that the socket
/// closes with its connection. Only readiness is watched, never a byte read: the bytes are
/// hyper's.
async fn watch_hang_up(copy: OwnedFd, ends: CancellationToken) {
    // SAFETY: the OwnedFd, moved in, stays open and the same until the AsyncFd drops it.
    let Ok(watched) = (unsafe { AsyncFd::register_with_interest(copy, Interest::READABLE) }) else {
        return;
    };
    loop {
        let ready = tokio::select! {
            ready = watched.readable() => ready,
            _ = ends.cancelled() => return,
        };
        match ready {
            Ok(guard) if guard.ready().is_read_closed() || guard.ready().is_error() => break,
            // Bytes hyper will read when it reads: wait for the next change.
            Ok(mut guard) => guard.clear_ready(),
            Err(_) => break,
        }
    }
    ends.cancel();
}

/// TLS (when `tls`), then the HTTP/2 preface: the transport, and the bytes read to check the
/// preface.
async fn handshake(
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> io::Result<(Io, Vec<u8>)> {
    // Events are small and latency-bound: never wait to coalesce them.
    let _ = tcp.set_nodelay(true);
    let mut io = match tls {
        Some(acceptor) => Io::Tls(Box::new(acceptor.accept(tcp).await?)),
        None => Io::Plain(tcp),
    };
    let preface = match &mut io {
        Io::Plain(tcp) => preface(tcp).await?,
        Io::Tls(tls) => preface(tls.as_mut()).await?,
    };
    Ok((io, preface))
}

/// Reads until the peer has sent the HTTP/2 preface, or anything that is not one (an HTTP/1.1
/// request, gRPC-Web's or the start of one, which hyper then reads within its own 30 s for
/// the whole head; or garbage, which hyper refuses with a proper error); returns what was read.
async fn preface(io: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let mut read = Vec::with_capacity(PREFACE.len());
    let mut buf = [0u8; PREFACE.len()];
    while read.len() < PREFACE.len() && read[..] == PREFACE[..read.len()] {
        let n = io.read(&mut buf[..PREFACE.len() - read.len()]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        read.extend_from_slice(&buf[..n]);
    }
    Ok(read)
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
