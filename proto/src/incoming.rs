//! Accepted connections for Tandem's gRPC servers, with a deadline on the handshake.
//!
//! hyper's HTTP/2 server waits for a client's connection preface for as long as the socket
//! stays open, so a client that connects and stalls (or sends half a preface) holds a
//! socket and a task forever. [`incoming`] wraps every accepted TCP stream in a
//! [`Handshaking`] stream whose reads fail with `TimedOut` when the first
//! [`PREFACE_BYTES`] bytes have not arrived within the deadline; hyper then drops the
//! connection. Once they have, the stream is a plain TCP stream; idle or vanished peers
//! after that are found by HTTP/2 keepalive pings ([`server`]).
//!
//! With TLS, tonic's own handshake timeout covers the TLS handshake, and these bytes are
//! the TLS client hello's: a peer that completes mutual TLS (it holds a certificate of the
//! cluster's CA) and then stalls before its HTTP/2 preface is closed by no deadline here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// Length of HTTP/2's client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const PREFACE_BYTES: usize = 24;

/// How long a new connection may take to send its first [`PREFACE_BYTES`] bytes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 keepalive: a ping after this long without frames...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...that must be acknowledged within this long, or the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A tonic server builder with Tandem's connection settings: HTTP/2 keepalive pings so a
/// peer that vanished without closing (a killed host, a partition) frees its connection.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// `listener`'s connections (with `TCP_NODELAY`: small gRPC messages must not wait for
/// Nagle and delayed ACKs), each with `handshake` to send its first bytes.
pub fn incoming(
    listener: TcpListener,
    handshake: Duration,
) -> impl Stream<Item = io::Result<Handshaking<TcpStream>>> + Send + 'static {
    TcpIncoming::from(listener).with_nodelay(Some(true)).map(move |r| r.map(|s| Handshaking::new(s, handshake)))
}

/// A stream whose reads fail once `deadline` passes before [`PREFACE_BYTES`] bytes came.
pub struct Handshaking<S> {
    inner: S,
    /// Bytes still to read before the deadline no longer applies.
    left: usize,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Handshaking<S> {
    /// `inner`, which must deliver its first bytes within `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Handshaking { inner, left: PREFACE_BYTES, deadline: Some(Box::pin(tokio::time::sleep(timeout))) }
    }

    /// Whether the first bytes arrived (the deadline no longer applies).
    pub fn handshaken(&self) -> bool {
        self.deadline.is_none()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Handshaking<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.left = this.left.saturating_sub(buf.filled().len() - before);
                if this.left == 0 {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Polled only while the read waits, so its waker is this read's.
                let expired = this.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the connection sent no HTTP/2 preface within its handshake deadline",
                    )));
                }
                Poll::Pending
            }
            err => err,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handshaking<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for Handshaking<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stalls_before_its_preface_is_timed_out() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = Handshaking::new(server, Duration::from_secs(10));
        let mut client = client;
        client.write_all(b"PRI * HTTP").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 10);
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(!s.handshaken());
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_preface_a_quiet_peer_is_not_timed_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = Handshaking::new(server, Duration::from_secs(10));
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < PREFACE_BYTES {
            got += s.read(&mut buf[got..]).await.unwrap();
        }
        assert!(s.handshaken());
        // Long past the deadline, a read still waits for data rather than failing.
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 1);
    }
}
