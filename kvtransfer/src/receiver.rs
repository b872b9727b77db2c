//! The receiving end of KV transfer (the decode side), over TCP and, for
//! same-host senders, a Unix socket.
//!
//! One task accepts connections; each connection's task checks the handshake,
//! then reads frames. A Blocks frame's header and block ids are read into a
//! small buffer and checked against the reservations; its payload is then read
//! with vectored reads straight into the reserved blocks' memory (no staging
//! copy), with the CRC32C computed over what landed there. On a Unix-socket
//! connection the receiver first offers its shared segment, and in-place frames
//! carry no payload at all.
//!
//! With TLS (`TcpConfig::tls`), a TCP connection's task first completes a mutual
//! handshake (the sender's certificate must chain to the CA; a refused or slow
//! handshake ends only that connection), and payloads are decrypted straight into
//! the blocks: one copy, out of rustls's record buffer. The Unix socket stays
//! plaintext: it never leaves the host, and its file is readable and writable by
//! the receiver's user alone (as is the shared segment it offers).
//!
//! A peer that is not a Tandem sender holds little: every frame kind's body is bounded
//! by what it can be (a Finish by 16 bytes, a Blocks frame by the pool), deadlines cover
//! the whole connection (`TcpConfig::idle_timeout` between frames, `frame_timeout` within
//! one), and `max_conns` / `max_conns_per_ip` cap the connections served, refusing more
//! at accept (counted: `refused_connections`). A peer whose layout differs is told only
//! "layout mismatch"; the differences are logged here.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_kernels::BlockId;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::TransferError;
use crate::layout::KvLayout;
use crate::session::{Admit, Arrived, Reservation, Sessions};
use crate::sink::KvSink;
use crate::wire::{self, Code, Frame, Kind, BLOCKS_FIXED, HEADER_LEN};

use crate::config::TcpConfig;

/// Receives KV into a sink; reservations say which request may write which blocks.
pub struct KvReceiver {
    sessions: Sessions,
    sink: Arc<dyn KvSink>,
    tasks: Mutex<JoinSet<()>>,
    local: SocketAddr,
    /// Connections served now, per peer IP (`None`: the Unix socket) and in total.
    conns: Arc<Mutex<ConnCount>>,
    /// Connections closed at accept because a cap was reached.
    refused: AtomicU64,
}

#[derive(Default)]
struct ConnCount {
    total: usize,
    per_peer: HashMap<Option<IpAddr>, usize>,
}

/// One served connection's place under the caps, given back when it ends.
struct ConnSlot {
    conns: Arc<Mutex<ConnCount>>,
    peer: Option<IpAddr>,
}

impl ConnSlot {
    /// A slot for a new connection from `peer`, unless a cap is reached.
    fn take(conns: &Arc<Mutex<ConnCount>>, peer: Option<IpAddr>, cfg: &TcpConfig) -> Option<ConnSlot> {
        let mut c = conns.lock().expect("conns");
        let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
        // Unix-socket peers are this user's own processes: only the total applies.
        if c.total >= cfg.max_conns || (peer.is_some() && mine >= cfg.max_conns_per_ip) {
            return None;
        }
        c.total += 1;
        *c.per_peer.entry(peer).or_default() += 1;
        Some(ConnSlot { conns: conns.clone(), peer })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.conns.lock().expect("conns");
        c.total -= 1;
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
    }
}

impl KvReceiver {
    /// Listens on `addr` (use port 0 for any).
    pub async fn bind(
        addr: SocketAddr,
        sink: Arc<dyn KvSink>,
        cfg: TcpConfig,
    ) -> Result<Arc<KvReceiver>, TransferError> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let rx = Arc::new(KvReceiver {
            sessions: Sessions::default(),
            sink,
            tasks: Mutex::new(JoinSet::new()),
            local,
            conns: Arc::default(),
            refused: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&rx);
        let tls = cfg.tls.as_ref().map(|t| t.acceptor());
        rx.tasks.lock().expect("tasks").spawn(accept_loop(listener, weak, 1, cfg, None, tls));
        Ok(rx)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Reserves `blocks` for `request_id` until `deadline` (a lease: it expires if the sender never comes).
    pub fn reserve(
        &self,
        request_id: ClusterRequestId,
        blocks: &[BlockId],
        deadline: Instant,
    ) -> Result<Reservation, TransferError> {
        self.sessions.reserve(request_id, blocks, self.sink.n_blocks(), deadline)
    }

    /// As `reserve`, taking frames only from a sender holding discovery lease `sender_lease`
    /// (announced in its Hello); frames from any other fail the session (`StaleSender`).
    /// `None`: from any sender.
    pub fn reserve_from(
        &self,
        request_id: ClusterRequestId,
        blocks: &[BlockId],
        deadline: Instant,
        sender_lease: Option<LeaseId>,
    ) -> Result<Reservation, TransferError> {
        self.sessions.reserve_from(request_id, blocks, self.sink.n_blocks(), deadline, sender_lease)
    }

    /// Also listens on a Unix socket for senders on this host, who then write straight
    /// into the sink's shared segment (the sink must be a `ShmKv`). Returns the socket's
    /// path, next to the segment (`shm::socket_for_segment`): the worker registers it, and
    /// a sender derives the segment from it. The socket is plaintext whatever `cfg.tls`
    /// says, and only this process's user may connect.
    pub fn listen_shm(self: &Arc<Self>, cfg: TcpConfig) -> Result<std::path::PathBuf, TransferError> {
        use std::os::unix::fs::PermissionsExt;
        let segment = self
            .sink
            .shm_segment()
            .ok_or_else(|| TransferError::Protocol("this receiver's blocks are not in shared memory".into()))?;
        let path = crate::shm::socket_for_segment(std::path::Path::new(&segment));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let offer = wire::encode_shm_offer(self.sink.n_blocks() as u64, &segment);
        let weak = Arc::downgrade(self);
        self.tasks.lock().expect("tasks").spawn(accept_loop(listener, weak, 1 << 32, cfg, Some(offer), None));
        Ok(path)
    }

    /// Payload writes into `request_id`'s blocks still in progress (see `Sessions`).
    pub fn writes_in_progress(&self, request_id: ClusterRequestId) -> usize {
        self.sessions.writes_in_progress(request_id)
    }

    /// Live reservations.
    pub fn active(&self) -> usize {
        self.sessions.len()
    }

    /// Connections being served now (TCP and Unix socket).
    pub fn connections(&self) -> usize {
        self.conns.lock().expect("conns").total
    }

    /// Connections closed at accept because `max_conns` or `max_conns_per_ip` was reached.
    pub fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.tasks.lock().expect("tasks").abort_all();
    }
}

/// A listener the receiver accepts KV connections from.
trait Acceptor: Send + 'static {
    type Stream: VectoredStream + 'static;
    /// The next connection and its peer's IP address (`None` on a Unix socket).
    fn accept_one(&self) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, Option<IpAddr>)>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> std::io::Result<(TcpStream, Option<IpAddr>)> {
        let (sock, peer) = self.accept().await?;
        sock.set_nodelay(true)?;
        Ok((sock, Some(peer.ip())))
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(tokio::net::UnixStream, Option<IpAddr>)> {
        Ok((self.accept().await?.0, None))
    }
}

/// A TLS handshake not done by then ends its connection.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// Ciphertext read from a TLS connection's socket at a time.
const TLS_READ_BUFFER: usize = 256 << 10;

/// Accepts connections until the receiver is dropped; each is served by its own task.
/// `offer`: the shared-segment offer made on same-host connections. `tls`: each
/// connection's task first completes a mutual handshake with it.
async fn accept_loop<L: Acceptor>(
    listener: L,
    receiver: std::sync::Weak<KvReceiver>,
    first_conn: u64,
    cfg: TcpConfig,
    offer: Option<Vec<u8>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut next_conn = first_conn;
    let mut conns = JoinSet::new();
    loop {
        let (sock, peer) = match listener.accept_one().await {
            Ok(accepted) => accepted,
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(rx) = receiver.upgrade() else { break };
        // Over a cap: closed at once, before a task or a buffer exists for it.
        let Some(slot) = ConnSlot::take(&rx.conns, peer, &cfg) else {
            rx.refused.fetch_add(1, Ordering::Relaxed);
            drop(sock);
            continue;
        };
        let (sessions, sink, cfg, offer, tls) =
            (rx.sessions.clone(), rx.sink.clone(), cfg.clone(), offer.clone(), tls.clone());
        let conn = next_conn;
        next_conn += 1;
        conns.spawn(async move {
            let _slot = slot;
            let served = match tls {
                None => serve_conn(sock, conn, &sessions, sink.as_ref(), &cfg, offer).await,
                // rustls reads 4 KiB per call: buffered, a payload takes few system calls.
                Some(tls) => match tokio::time::timeout(
                    TLS_HANDSHAKE,
                    tls.accept(BufReader::with_capacity(TLS_READ_BUFFER, sock)),
                )
                .await
                {
                    Ok(Ok(sock)) => serve_conn(sock, conn, &sessions, sink.as_ref(), &cfg, offer).await,
                    Ok(Err(e)) => Err(TransferError::Tls(e.to_string())),
                    Err(_) => Err(TransferError::Tls(format!("no handshake within {TLS_HANDSHAKE:?}"))),
                },
            };
            let why = match served {
                Ok(()) => "connection closed".to_string(),
                Err(e) => e.to_string(),
            };
            sessions.conn_lost(conn, &why);
        });
        while conns.try_join_next().is_some() {}
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn read_hello<S: AsyncRead + Unpin>(
    s: &mut S,
    max: usize,
) -> Result<(KvLayout, Option<LeaseId>, [u8; crate::auth::TAG_LEN]), TransferError> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).await?;
    let head = wire::parse_header(&h, max.min(256)).map_err(|e| TransferError::Protocol(e.to_string()))?;
    let mut buf = h.to_vec();
    buf.resize(HEADER_LEN + head.body_len, 0);
    s.read_exact(&mut buf[HEADER_LEN..]).await?;
    match wire::decode(&buf, 256, 0).map_err(|e| TransferError::Protocol(e.to_string()))? {
        Some((Frame::Hello { layout, lease, tag }, _)) => Ok((layout, lease, tag)),
        Some((Frame::Error { message, .. }, _)) => Err(TransferError::LayoutMismatch(message)),
        _ => Err(TransferError::Protocol("expected a Hello frame".into())),
    }
}

/// How long a new connection may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One receiving connection: handshake, then frames until EOF or a protocol error.
/// `offer`: on a shared-memory connection, the segment offer sent after `HelloOk`;
/// in-place Blocks frames are accepted only then.
pub(crate) async fn serve_conn<S: KvStream>(
    mut sock: S,
    conn: u64,
    sessions: &Sessions,
    sink: &dyn KvSink,
    cfg: &TcpConfig,
    offer: Option<Vec<u8>>,
) -> Result<(), TransferError> {
    let layout = sink.layout();
    // A connection that never says Hello (a stalled or foreign client) is not kept.
    let (theirs, lease, tag) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut sock, cfg.max_frame))
        .await
        .map_err(|_| TransferError::Protocol(format!("no Hello within {HELLO_TIMEOUT:?}")))??;
    let limit = cfg.frame_timeout;
    if let Some(auth) = &cfg.auth {
        if !auth.verify(&wire::hello_fields(&theirs, lease), &tag) {
            // Not one of the cluster's workers: it learns nothing else, and is not read again.
            tracing::warn!(conn, "KV sender refused: its Hello is not signed with the cluster's key");
            let _ = send_frame(&mut sock, &wire::encode_error(Code::Unauthenticated, UNAUTHENTICATED), limit).await;
            return Err(TransferError::Unauthenticated("the Hello is not signed with the cluster's key".into()));
        }
    }
    if let Some(why) = layout.mismatch(&theirs) {
        // The peer is not yet anyone: it learns that it does not fit, not what would.
        tracing::warn!(conn, %why, "KV sender refused");
        send_frame(&mut sock, &wire::encode_error(Code::LayoutMismatch, LAYOUT_MISMATCH), limit).await?;
        return Err(TransferError::LayoutMismatch(why));
    }
    sessions.connected(conn, lease);
    send_frame(&mut sock, &wire::encode_hello_ok(), limit).await?;
    let in_place = offer.is_some();
    if let Some(o) = offer {
        send_frame(&mut sock, &o, limit).await?;
    }
    let lbb = layout.layer_block_bytes();
    let half = layout.half_block_bytes();
    let mut small = Vec::new();
    let mut scratch = vec![0u8; 64 << 10];
    loop {
        let mut h = [0u8; HEADER_LEN];
        // Between frames: a connection silent past the idle deadline is closed.
        match tokio::time::timeout(cfg.idle_timeout, sock.read_exact(&mut h)).await {
            Err(_) => return Err(TransferError::Deadline(format!("no frame for {:?}", cfg.idle_timeout))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
        }
        // Within a frame: its body must arrive by then.
        let by = Instant::now() + cfg.frame_timeout;
        let head = match wire::parse_header(&h, cfg.max_frame) {
            Ok(head) => head,
            Err(e) => {
                let _ = send_frame(&mut sock, &wire::encode_error(Code::Protocol, &e.to_string()), limit).await;
                return Err(TransferError::Protocol(e.to_string()));
            }
        };
        if head.kind == Kind::Blocks {
            small.resize(BLOCKS_FIXED, 0);
            within(by, sock.read_exact(&mut small)).await?;
            let fixed = match wire::parse_blocks_fixed(&small, head.body_len, lbb) {
                Ok(f) if f.in_place && !in_place => {
                    Err("in-place blocks on a connection without a shared segment".into())
                }
                // No reservation is larger than the pool: the block ids are bounded before they are read.
                Ok(f) if f.n_blocks > sink.n_blocks() => {
                    Err(format!("{} blocks in a pool of {}", f.n_blocks, sink.n_blocks()))
                }
                Ok(f) => Ok(f),
                Err(e) => Err(e.to_string()),
            };
            let fixed = match fixed {
                Ok(f) => f,
                Err(why) => {
                    let _ = send_frame(&mut sock, &wire::encode_error(Code::Protocol, &why), limit).await;
                    return Err(TransferError::Protocol(why));
                }
            };
            let (request_id, layer, n) = (fixed.request_id, fixed.layer, fixed.n_blocks);
            small.resize(BLOCKS_FIXED + 4 * n, 0);
            within(by, sock.read_exact(&mut small[BLOCKS_FIXED..])).await?;
            let mut crc = crc32c::crc32c(&small);
            let ids = wire::block_ids(&small[BLOCKS_FIXED..]);
            match sessions.admit(conn, request_id, layer, layout.n_layers, &ids, fixed.in_place) {
                Admit::Ok(_writing) => {
                    // Addresses, not pointers, so the future stays Send. The blocks are reserved
                    // for this request alone (admit checked it), and the sink guarantees `half`
                    // writable bytes at each.
                    let parts: Vec<(usize, usize)> = ids
                        .iter()
                        .flat_map(|&b| {
                            let (k, v) = sink.block_ptrs(layer as usize, b.index());
                            [(k as usize, half), (v as usize, half)]
                        })
                        .collect();
                    if !fixed.in_place {
                        within(by, sock.read_parts(&parts)).await?;
                        for &(addr, len) in &parts {
                            // SAFETY: as above; the data is complete.
                            crc = crc32c::crc32c_append(crc, unsafe {
                                std::slice::from_raw_parts(addr as *const u8, len)
                            });
                        }
                    }
                    if crc != head.crc {
                        let err = TransferError::Checksum(format!("request {request_id} layer {layer}"));
                        sessions.fail(request_id, err.clone());
                        let ack = wire::encode_ack(request_id, Code::Checksum, &err.to_string());
                        send_frame(&mut sock, &ack, limit).await?;
                    } else {
                        sessions.received(request_id, layer, &ids);
                    }
                }
                Admit::Refuse(err) => {
                    // Consume the payload, tell the sender, keep the connection.
                    let mut left = if fixed.in_place { 0 } else { n * lbb };
                    while left > 0 {
                        let take = left.min(scratch.len());
                        within(by, sock.read_exact(&mut scratch[..take])).await?;
                        left -= take;
                    }
                    sessions.fail(request_id, err.clone());
                    send_frame(&mut sock, &wire::encode_ack(request_id, err.code(), &err.to_string()), limit).await?;
                }
            }
            continue;
        }
        // Every other kind is short (`Kind::max_body`, checked by `parse_header`).
        small.resize(HEADER_LEN + head.body_len, 0);
        small[..HEADER_LEN].copy_from_slice(&h);
        within(by, sock.read_exact(&mut small[HEADER_LEN..])).await?;
        let frame = match wire::decode(&small, cfg.max_frame, lbb) {
            Ok(Some((f, _))) => f,
            Ok(None) => unreachable!("the whole frame was read"),
            Err(e) => {
                let _ = send_frame(&mut sock, &wire::encode_error(Code::Protocol, &e.to_string()), limit).await;
                return Err(TransferError::Protocol(e.to_string()));
            }
        };
        match frame {
            Frame::Finish { request_id, first_token, num_tokens } => {
                let reply = match sessions.finish(request_id, layout.n_layers, Arrived { first_token, num_tokens }) {
                    Ok(()) => wire::encode_ack(request_id, Code::Ok, ""),
                    Err(e) => wire::encode_ack(request_id, e.code(), &e.to_string()),
                };
                send_frame(&mut sock, &reply, limit).await?;
            }
            Frame::Abort { request_id, message, .. } => sessions.fail(request_id, TransferError::Aborted(message)),
            // A granted renewal is not answered; a refused one is, and the sender stops.
            Frame::Renew { request_id, lease_ms } => {
                if let Err(e) = sessions.renew(conn, request_id, lease_ms) {
                    send_frame(&mut sock, &wire::encode_ack(request_id, e.code(), &e.to_string()), limit).await?;
                }
            }
            // Same host: the sender writes nothing in place before this answer.
            Frame::Open { request_id } if in_place => {
                let reply = match sessions.open(conn, request_id) {
                    Ok(blocks) => wire::encode_accept(request_id, &blocks),
                    Err(e) => wire::encode_ack(request_id, e.code(), &e.to_string()),
                };
                send_frame(&mut sock, &reply, limit).await?;
            }
            other => {
                let why = format!("unexpected {other:?} from a sender");
                let _ = send_frame(&mut sock, &wire::encode_error(Code::Protocol, &why), limit).await;
                return Err(TransferError::Protocol(why));
            }
        }
    }
}

/// What a sender whose layout differs is told (the differences are logged, not sent).
const LAYOUT_MISMATCH: &str = "layout mismatch";
/// What a sender without the cluster's key is told.
const UNAUTHENTICATED: &str = "unauthenticated";

/// Writes one frame to the sender, flushed: a TLS stream would otherwise keep the
/// records of a small frame (an Ack) while its socket is full. A peer that does not
/// read it within `limit` is given up.
async fn send_frame<S: AsyncWrite + Unpin>(sock: &mut S, frame: &[u8], limit: Duration) -> Result<(), TransferError> {
    let write = async {
        sock.write_all(frame).await?;
        sock.flush().await
    };
    Ok(tokio::time::timeout(limit, write).await.map_err(|_| TransferError::Deadline("peer does not read".into()))??)
}

/// A read of the current frame, which must be done by `by` (the frame deadline).
async fn within<T>(
    by: Instant,
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, TransferError> {
    match tokio::time::timeout_at(by, read).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(TransferError::Deadline("a frame did not arrive in time".into())),
    }
}

/// A connection the receiver serves: frames, and payloads read into the reserved blocks.
pub(crate) trait KvStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Fills every buffer in `parts` (address and length: disjoint writable ranges the
    /// caller owns for this read) from the stream.
    fn read_parts(&mut self, parts: &[(usize, usize)])
        -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// Plain sockets: many blocks per system call.
impl<S: VectoredStream> KvStream for S {
    fn read_parts(
        &mut self,
        parts: &[(usize, usize)],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        read_exact_vectored(self, parts)
    }
}

/// TLS: rustls decrypts a record into its own buffer; each block is copied out of it once.
impl<S: AsyncRead + AsyncWrite + Unpin + Send> KvStream for tokio_rustls::server::TlsStream<S> {
    async fn read_parts(&mut self, parts: &[(usize, usize)]) -> std::io::Result<()> {
        for &(addr, len) in parts {
            // SAFETY: the caller hands out disjoint writable ranges it owns for this read.
            let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
            self.read_exact(buf).await?;
        }
        Ok(())
    }
}

/// Sockets the receiver can read into many buffers with one system call.
pub(crate) trait VectoredStream: AsyncRead + AsyncWrite + Unpin + Send {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    fn try_read_vectored(&self, bufs: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<usize>;
}

impl VectoredStream for TcpStream {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        TcpStream::readable(self)
    }
    fn try_read_vectored(&self, bufs: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<usize> {
        TcpStream::try_read_vectored(self, bufs)
    }
}

impl VectoredStream for tokio::net::UnixStream {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        tokio::net::UnixStream::readable(self)
    }
    fn try_read_vectored(&self, bufs: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<usize> {
        tokio::net::UnixStream::try_read_vectored(self, bufs)
    }
}

/// Fills every buffer in `parts` (given as address and length, so the future stays Send)
/// from the stream, many buffers per system call.
async fn read_exact_vectored<S: VectoredStream>(s: &mut S, parts: &[(usize, usize)]) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        s.readable().await?;
        loop {
            let mut bufs: Vec<std::io::IoSliceMut<'_>> = parts[idx..]
                .iter()
                .take(512)
                .enumerate()
                .map(|(i, &(addr, len))| {
                    let skip = if i == 0 { off } else { 0 };
                    // SAFETY: the caller hands out disjoint writable ranges it owns for this read.
                    std::io::IoSliceMut::new(unsafe {
                        std::slice::from_raw_parts_mut((addr + skip) as *mut u8, len - skip)
                    })
                })
                .collect();
            match s.try_read_vectored(&mut bufs) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(mut n) => {
                    while n > 0 && idx < parts.len() {
                        let left = parts[idx].1 - off;
                        if n >= left {
                            n -= left;
                            idx += 1;
                            off = 0;
                        } else {
                            off += n;
                            n = 0;
                        }
                    }
                    if idx == parts.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
