//! What the HTTP front door bounds, and the listener that enforces it.
//!
//! Every bound is explicit rather than a library default, so that it is documented
//! and configurable (docs/operations.md, "Front-door limits"):
//! - request line and headers: at most [`HttpLimits::max_header_bytes`] bytes and
//!   [`HttpLimits::max_headers`] fields (hyper answers 431 and closes), read within
//!   [`HttpLimits::header_read_timeout`] (a client trickling its headers, or a kept-alive
//!   connection left idle, is closed);
//! - the body: at most [`MAX_BODY`] bytes (413), read within
//!   [`HttpLimits::body_read_timeout`] once the headers are in (408);
//! - the whole request: [`HttpLimits::request_timeout`], or less when the client asks
//!   with an `x-request-timeout` header (504; the generation is cancelled and its blocks
//!   freed);
//! - open connections: at most [`HttpLimits::max_connections`] in total and
//!   [`HttpLimits::max_connections_per_ip`] per client (`conns`); one over either cap is
//!   closed at accept, before a task is spawned or a byte read, and counted.
//!
//! Each connection is served by its own task, so a client stuck at any of these stages
//! holds nothing but its socket and never delays another client. Only HTTP/1.1 is
//! served: OpenAI clients speak it on plain TCP, and HTTP/2 by prior knowledge would
//! get no header-read deadline.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conns::ConnGate;
use crate::openai::ApiError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

/// How much of a too-large body is still read (and dropped) before its 413, and for how long.
const MAX_DRAIN: usize = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// The request header with which a client shortens its own deadline: seconds, e.g. `30` or `2.5`.
pub const REQUEST_TIMEOUT_HEADER: &str = "x-request-timeout";

/// The HTTP front door's bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpLimits {
    /// Bytes of request line and headers at most; beyond, 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// Header fields at most; beyond, 431 and the connection is closed.
    pub max_headers: usize,
    /// Time a client has to send its request line and headers; past it (or after this
    /// long idle between kept-alive requests) the connection is closed.
    pub header_read_timeout: Duration,
    /// Time a client has to send its whole body once its headers are in; past it, 408.
    pub body_read_timeout: Duration,
    /// Longest a request runs, from its headers to its last token; past it, 504 (an
    /// error event when streaming). A client may ask for less with `x-request-timeout`.
    pub request_timeout: Duration,
    /// Connections open at once at most; one more is closed at accept.
    pub max_connections: usize,
    /// Connections one client (an IPv4 address, an IPv6 /64) holds open at most; one more
    /// is closed at accept.
    pub max_connections_per_ip: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_bytes: 64 << 10,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            max_connections: 1024,
            max_connections_per_ip: 128,
        }
    }
}

/// Serves `app` on `listener` under `limits` until `stop` is cancelled, then lets the
/// open connections finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The read buffer must hold the largest header block (hyper's minimum is 8 KiB).
        .max_buf_size(limits.max_header_bytes.max(8 << 10) * 2)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    let graceful = GracefulShutdown::new();
    let gate = ConnGate::new(limits.max_connections, limits.max_connections_per_ip);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let (sock, permit) = match accepted {
            // Over a cap: dropping the socket closes it, unread.
            Ok((sock, peer)) => match gate.admit(peer.ip()) {
                Ok(permit) => (sock, permit),
                Err(refusal) => {
                    crate::metrics::http_connection_refused(refusal.kind());
                    drop(sock);
                    continue;
                }
            },
            // A connection reset before it was accepted, or out of descriptors: back off
            // briefly instead of spinning, and keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Streamed tokens are small writes: no Nagle delay.
        let _ = sock.set_nodelay(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(sock), TowerToHyperService::new(app.clone())));
        // A connection's error (a client gone, a header timeout) concerns that client alone.
        // Its permit is given back however the task ends.
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// When the request must be done: [`HttpLimits::request_timeout`] from now, or sooner if
/// its `x-request-timeout` header asks.
pub fn request_deadline(headers: &HeaderMap, limits: &HttpLimits) -> Result<Instant, ApiError> {
    let mut within = limits.request_timeout;
    if let Some(v) = headers.get(REQUEST_TIMEOUT_HEADER) {
        let secs = v.to_str().ok().and_then(|s| s.trim().parse::<f64>().ok());
        match secs {
            Some(s) if s.is_finite() && s > 0.0 => within = within.min(Duration::from_secs_f64(s.min(1e9))),
            _ => {
                return Err(ApiError::bad(REQUEST_TIMEOUT_HEADER, format!("{v:?} is not a positive number of seconds")))
            }
        }
    }
    Ok(Instant::now() + within)
}

/// The whole body, at most [`MAX_BODY`] bytes, read within [`HttpLimits::body_read_timeout`].
///
/// A larger body is refused (413) only after the rest of it has been read and dropped, up to
/// [`MAX_DRAIN`] more bytes within [`DRAIN_TIME`]: closing the connection with the client's
/// bytes unread makes the kernel reset it, and a client still sending would see a broken
/// connection instead of the 413. Draining holds no memory; past those bounds the connection
/// is closed anyway.
pub async fn read_body(body: Body, limits: &HttpLimits) -> Result<Bytes, ApiError> {
    let err = |status: u16, message: String| ApiError {
        status,
        kind: "invalid_request_error",
        message,
        param: None,
        code: None,
        retry_after: None,
    };
    let mut body = body;
    let mut bytes = Vec::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| err(400, format!("the request body could not be read: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            if bytes.len() + data.len() > MAX_BODY {
                return Ok(false);
            }
            bytes.extend_from_slice(&data);
        }
        Ok(true)
    };
    match tokio::time::timeout(limits.body_read_timeout, read).await {
        Ok(Ok(true)) => Ok(Bytes::from(bytes)),
        Ok(Ok(false)) => {
            drop(bytes);
            let mut drained = 0usize;
            let drain = async {
                while let Some(Ok(frame)) = body.frame().await {
                    drained += frame.data_ref().map_or(0, |d| d.len());
                    if drained > MAX_DRAIN {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            Err(err(413, format!("the request body is larger than {MAX_BODY} bytes")))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(err(
            408,
            format!(
                "the request body did not arrive within {} s of its headers",
                limits.body_read_timeout.as_secs_f64()
            ),
        )),
    }
}

/// `fut`, or a 504 if `deadline` passes first.
pub async fn within<T>(deadline: Instant, fut: impl std::future::Future<Output = T>) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline, fut).await.map_err(|_| ApiError::deadline())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_timeout_header_only_shortens_the_deadline() {
        let limits = HttpLimits { request_timeout: Duration::from_secs(60), ..HttpLimits::default() };
        let at = |v: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(REQUEST_TIMEOUT_HEADER, HeaderValue::from_static(v));
            }
            request_deadline(&h, &limits).map(|d| d.duration_since(Instant::now()))
        };
        let default = at(None).unwrap();
        assert!(default > Duration::from_secs(59) && default <= Duration::from_secs(60));
        assert!(at(Some("2.5")).unwrap() <= Duration::from_millis(2500));
        assert!(at(Some("3600")).unwrap() <= Duration::from_secs(60), "a longer ask is capped");
        for bad in ["0", "-1", "soon", "NaN", "inf"] {
            let e = at(Some(bad)).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(REQUEST_TIMEOUT_HEADER)), "{bad}");
        }
    }

    #[tokio::test]
    async fn bodies_are_bounded_in_size_and_time() {
        let limits = HttpLimits { body_read_timeout: Duration::from_millis(50), ..HttpLimits::default() };
        let ok = read_body(Body::from("{}"), &limits).await.unwrap();
        assert_eq!(&ok[..], b"{}");
        let e = read_body(Body::from(vec![b' '; MAX_BODY + 1]), &limits).await.unwrap_err();
        assert_eq!(e.status, 413);
        // A body that never ends: the client stalled after its headers.
        let stalled = Body::from_stream(futures_pending());
        let e = read_body(stalled, &limits).await.unwrap_err();
        assert_eq!(e.status, 408, "{}", e.message);
    }

    /// A too-large body is read to its end (and dropped) before the 413, so the client
    /// is not reset while it is still sending; one past the drain bound is cut off.
    #[tokio::test]
    async fn a_too_large_body_is_drained_before_its_413_within_bounds() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let limits = HttpLimits::default();
        let chunk = 64 << 10;
        for (total, all_read) in [(MAX_BODY + (1 << 20), true), (MAX_BODY + MAX_DRAIN + (4 << 20), false)] {
            let pulled = Arc::new(AtomicUsize::new(0));
            let counter = pulled.clone();
            let chunks = tokio_stream::iter((0..total / chunk).map(move |_| {
                counter.fetch_add(chunk, Ordering::Relaxed);
                Ok::<_, std::io::Error>(Bytes::from(vec![b' '; chunk]))
            }));
            let e = read_body(Body::from_stream(chunks), &limits).await.unwrap_err();
            assert_eq!(e.status, 413);
            let read = pulled.load(Ordering::Relaxed);
            assert_eq!(read == total, all_read, "{read} of {total} bytes read");
            assert!(read <= MAX_BODY + MAX_DRAIN + 2 * chunk, "{read} bytes read");
        }
    }

    fn futures_pending() -> impl tokio_stream::Stream<Item = Result<Bytes, std::io::Error>> {
        tokio_stream::pending()
    }
}
