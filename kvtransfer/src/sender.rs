//! The sending end of KV transfer (the prefill side).
//!
//! One persistent connection per receiver, shared by every session to it: TCP,
//! or a Unix socket plus the receiver's mapped segment when both ends share a
//! host (chosen by `open_target`, with a counted fallback to TCP). A writer task
//! drains a bounded queue (the queue is the backpressure: a sender that
//! outruns the network waits), a reader task routes the receiver's Acks to the
//! sessions. `TCP_NODELAY` is set. With TLS (`TcpConfig::tls`) a TCP connection
//! presents this worker's certificate and verifies the receiver's against the CA
//! and the configured server name before the Hello.
//!
//! On a same-host connection a session first asks the receiver (`Open`) and writes
//! into the shared segment only after its `Accept`, and only the blocks it lists: no
//! byte lands in a block the receiver has not accepted this session for. The segment
//! is the one the receiver's registered socket names (`shm::segment_for_socket`), and
//! the socket's peer must run as this user; the `ShmOffer` must agree.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_kernels::BlockId;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::TransferError;
use crate::layout::KvLayout;
use crate::shm::{host_id, our_uid, segment_for_socket, ShmMap};
use crate::wire::{self, Code, Frame, HEADER_LEN};

use crate::config::TcpConfig;

enum Outgoing {
    Bytes(Vec<u8>),
    Blocks { head: Vec<u8>, payload: Arc<Vec<u8>>, range: std::ops::Range<usize> },
}

/// What the receiver said of a session: nothing yet, its verdict after `Finish`, or a
/// refusal (an error `Ack`) at any time.
type Verdict = Option<Result<(), TransferError>>;
type Pending = Arc<Mutex<HashMap<ClusterRequestId, watch::Sender<Verdict>>>>;
/// Same-host sessions waiting for the receiver's `Accept` (the blocks they may write).
type Opening = Arc<Mutex<HashMap<ClusterRequestId, oneshot::Sender<Result<Vec<BlockId>, TransferError>>>>>;

/// Payload buffers the writer hands back once written, so steady sending reuses memory
/// instead of faulting in fresh pages for every layer.
#[derive(Clone, Default)]
pub struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// Buffers kept at most.
    const KEEP: usize = 64;

    /// An empty buffer, reusing a returned one when there is one.
    pub fn take(&self) -> Vec<u8> {
        let mut v = self.0.lock().expect("pool").pop().unwrap_or_default();
        v.clear();
        v
    }

    fn give(&self, v: Vec<u8>) {
        let mut pool = self.0.lock().expect("pool");
        if pool.len() < Self::KEEP {
            pool.push(v);
        }
    }
}

struct Conn {
    tx: mpsc::Sender<Outgoing>,
    pool: BufferPool,
    pending: Pending,
    opening: Opening,
    /// When a session last opened on it: one idle for half the receiver's idle deadline
    /// is not reused (the receiver may be closing it).
    last_used: Instant,
    /// Set when the connection failed; new sessions reconnect.
    dead: Arc<Mutex<Option<TransferError>>>,
    tasks: JoinSet<()>,
    /// The receiver's segment, on a same-host connection.
    shm: Option<Arc<ShmMap>>,
}

/// Sends Hello and checks the answer; on a same-host connection also reads the segment offer.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    layout: &KvLayout,
    lease: Option<LeaseId>,
    auth: Option<&crate::auth::KvAuth>,
    expect_offer: bool,
) -> Result<Option<(u64, String)>, TransferError> {
    sock.write_all(&wire::encode_hello_signed(layout, lease, auth)).await?;
    sock.flush().await?;
    let mut offer = None;
    for step in 0..1 + usize::from(expect_offer) {
        let mut h = [0u8; HEADER_LEN];
        sock.read_exact(&mut h).await?;
        let head = wire::parse_header(&h, 4096).map_err(|e| TransferError::Protocol(e.to_string()))?;
        let mut buf = h.to_vec();
        buf.resize(HEADER_LEN + head.body_len, 0);
        sock.read_exact(&mut buf[HEADER_LEN..]).await?;
        match wire::decode(&buf, 4096, 0).map_err(|e| TransferError::Protocol(e.to_string()))? {
            Some((Frame::HelloOk, _)) if step == 0 => {}
            Some((Frame::ShmOffer { n_blocks, path }, _)) if step == 1 => offer = Some((n_blocks, path)),
            // The receiver does not say what it expects (it logs that); say what we sent.
            Some((Frame::Error { code: Code::LayoutMismatch, message }, _)) => {
                return Err(TransferError::LayoutMismatch(format!("{message}: the receiver refused {layout:?}")))
            }
            Some((Frame::Error { code: Code::Unauthenticated, message }, _)) => {
                return Err(TransferError::Unauthenticated(message))
            }
            Some((Frame::Error { message, .. }, _)) => return Err(TransferError::Protocol(message)),
            _ => return Err(TransferError::Protocol("unexpected answer to Hello".into())),
        }
    }
    Ok(offer)
}

/// Starts the writer and reader tasks of a handshaken connection.
fn start_conn<R, W>(mut rd: R, mut wr: W, cfg: &TcpConfig, shm: Option<Arc<ShmMap>>) -> Conn
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Outgoing>(cfg.queue_frames);
    let pool = BufferPool::default();
    let writer_pool = pool.clone();
    let pending: Pending = Arc::default();
    let opening: Opening = Arc::default();
    let dead: Arc<Mutex<Option<TransferError>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let fail_all =
        move |pending: &Pending, opening: &Opening, dead: &Arc<Mutex<Option<TransferError>>>, err: TransferError| {
            *dead.lock().expect("dead") = Some(err.clone());
            for (_, tx) in pending.lock().expect("pending").drain() {
                tx.send_replace(Some(Err(err.clone())));
            }
            for (_, tx) in opening.lock().expect("opening").drain() {
                let _ = tx.send(Err(err.clone()));
            }
        };
    let (p2, o2, d2) = (pending.clone(), opening.clone(), dead.clone());
    tasks.spawn(async move {
        while let Some(out) = rx.recv().await {
            let mut r = match out {
                Outgoing::Bytes(b) => wr.write_all(&b).await,
                Outgoing::Blocks { head, payload, range } => {
                    let r = match wr.write_all(&head).await {
                        Ok(()) => wr.write_all(&payload[range]).await,
                        Err(e) => Err(e),
                    };
                    if let Ok(v) = Arc::try_unwrap(payload) {
                        writer_pool.give(v);
                    }
                    r
                }
            };
            // Before waiting for more: a TLS stream may still hold the last frame's records
            // (its socket was full); a plain socket's flush does nothing.
            if r.is_ok() && rx.is_empty() {
                r = wr.flush().await;
            }
            if let Err(e) = r {
                fail_all(&p2, &o2, &d2, e.into());
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let (p3, o3, d3, max) = (pending.clone(), opening.clone(), dead.clone(), cfg.max_frame);
    tasks.spawn(async move {
        let err = loop {
            let mut h = [0u8; HEADER_LEN];
            if let Err(e) = rd.read_exact(&mut h).await {
                break TransferError::from(e);
            }
            let head = match wire::parse_header(&h, max.min(1 << 16)) {
                Ok(x) => x,
                Err(e) => break TransferError::Protocol(e.to_string()),
            };
            let mut buf = h.to_vec();
            buf.resize(HEADER_LEN + head.body_len, 0);
            if let Err(e) = rd.read_exact(&mut buf[HEADER_LEN..]).await {
                break e.into();
            }
            match wire::decode(&buf, 1 << 16, 0) {
                Ok(Some((Frame::Accept { request_id, block_ids }, _))) => {
                    if let Some(tx) = o3.lock().expect("opening").remove(&request_id) {
                        let _ = tx.send(Ok(block_ids));
                    }
                }
                Ok(Some((Frame::Ack { request_id, code, message }, _))) => {
                    if let Some(tx) = o3.lock().expect("opening").remove(&request_id) {
                        let _ = tx.send(Err(TransferError::from_code(code, request_id, message.clone())));
                    }
                    if let Some(tx) = p3.lock().expect("pending").remove(&request_id) {
                        tx.send_replace(Some(if code == Code::Ok {
                            Ok(())
                        } else {
                            Err(TransferError::from_code(code, request_id, message))
                        }));
                    }
                }
                // A connection-level error names no request (request 0 in the rare `UnknownRequest`).
                Ok(Some((Frame::Error { code, message }, _))) => {
                    break TransferError::from_code(code, ClusterRequestId(0), message)
                }
                Ok(_) => break TransferError::Protocol("unexpected frame from a receiver".into()),
                Err(e) => break TransferError::Protocol(e.to_string()),
            }
        };
        fail_all(&p3, &o3, &d3, err);
    });
    Conn { tx, pool, pending, opening, last_used: Instant::now(), dead, tasks, shm }
}

/// Where a receiver listens: always TCP; also a Unix socket for senders on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvTarget {
    pub tcp: SocketAddr,
    pub local: Option<LocalTarget>,
}

/// A receiver's same-host endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTarget {
    pub uds: PathBuf,
    /// The receiver's `host_id()`; shared memory is used only when it equals the sender's.
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ConnKey {
    Tcp(SocketAddr),
    Uds(PathBuf),
}

/// Sends KV to receivers; one persistent connection per receiver.
pub struct KvSender {
    layout: KvLayout,
    cfg: TcpConfig,
    conns: tokio::sync::Mutex<HashMap<ConnKey, Arc<Mutex<Conn>>>>,
    fallbacks: AtomicU64,
    /// This worker's discovery lease, announced in every connection's Hello.
    lease: Mutex<Option<LeaseId>>,
}

impl KvSender {
    /// The handshake on a new connection: this sender's layout, lease and signature.
    async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        sock: &mut S,
        expect_offer: bool,
    ) -> Result<Option<(u64, String)>, TransferError> {
        let lease = *self.lease.lock().expect("lease");
        handshake(sock, &self.layout, lease, self.cfg.auth.as_ref(), expect_offer).await
    }

    pub fn new(layout: KvLayout, cfg: TcpConfig) -> Self {
        KvSender {
            layout,
            cfg,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            fallbacks: AtomicU64::new(0),
            lease: Mutex::new(None),
        }
    }

    /// Connections kept open to receivers (failed ones are dropped when the next session opens).
    pub async fn connections(&self) -> usize {
        self.conns.lock().await.len()
    }

    /// Announces discovery lease `lease` from now on. After a change, sessions open new
    /// connections (whose Hello carries it); sessions already open finish on the old ones.
    pub async fn set_lease(&self, lease: Option<LeaseId>) {
        let before = std::mem::replace(&mut *self.lease.lock().expect("lease"), lease);
        if before != lease {
            self.conns.lock().await.clear();
        }
    }

    async fn conn(&self, key: &ConnKey, deadline: Instant) -> Result<Arc<Mutex<Conn>>, TransferError> {
        let mut conns = self.conns.lock().await;
        // Failed connections go (a receiver that died does not come back at the same
        // address; keeping them would keep their buffers and a dead receiver's segment mapped).
        // So are idle ones, before the receiver's idle deadline closes them under a new
        // session; their tasks are let run until the sessions still on them end.
        let idle = self.cfg.idle_timeout / 2;
        conns.retain(|_, c| {
            let mut c = c.lock().expect("conn");
            let keep = c.dead.lock().expect("dead").is_none() && c.last_used.elapsed() < idle;
            if !keep {
                c.tasks.detach_all();
            }
            keep
        });
        if let Some(c) = conns.get(key) {
            let mut conn = c.lock().expect("conn");
            if conn.dead.lock().expect("dead").is_none() {
                conn.last_used = Instant::now();
                return Ok(c.clone());
            }
        }
        let timeout = || TransferError::Deadline(format!("connecting to {key:?}"));
        let c = match key {
            ConnKey::Tcp(addr) => {
                let mut sock =
                    tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await.map_err(|_| timeout())??;
                sock.set_nodelay(true)?;
                match &self.cfg.tls {
                    None => {
                        tokio::time::timeout_at(deadline, self.hello(&mut sock, false))
                            .await
                            .map_err(|_| timeout())??;
                        let (rd, wr) = sock.into_split();
                        start_conn(rd, wr, &self.cfg, None)
                    }
                    Some(tls) => {
                        let (connector, name) = tls.connector();
                        let mut sock = tokio::time::timeout_at(deadline, connector.connect(name, sock))
                            .await
                            .map_err(|_| timeout())?
                            .map_err(|e| TransferError::Tls(format!("with {addr}: {e}")))?;
                        // With TLS 1.3 a refused client certificate shows here: the
                        // receiver's alert (an i/o error) comes in place of its answer to Hello.
                        tokio::time::timeout_at(deadline, self.hello(&mut sock, false))
                            .await
                            .map_err(|_| timeout())?
                            .map_err(|e| match e {
                            TransferError::Io(m) => TransferError::Tls(format!("with {addr}: {m}")),
                            other => other,
                        })?;
                        let (rd, wr) = tokio::io::split(sock);
                        start_conn(rd, wr, &self.cfg, None)
                    }
                }
            }
            ConnKey::Uds(path) => {
                let segment = segment_for_socket(path)
                    .ok_or_else(|| TransferError::Protocol(format!("{} is not a KV socket", path.display())))?;
                let mut sock = tokio::time::timeout_at(deadline, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| timeout())??;
                // Only a receiver run by this user serves a segment this sender may write.
                let peer = sock.peer_cred()?.uid();
                if peer != our_uid() {
                    return Err(TransferError::Protocol(format!("{} is served by uid {peer}", path.display())));
                }
                let offer =
                    tokio::time::timeout_at(deadline, self.hello(&mut sock, true)).await.map_err(|_| timeout())??;
                let (n_blocks, offered) =
                    offer.ok_or_else(|| TransferError::Protocol("no shared segment offered".into()))?;
                // The registration names the segment; an offer of another path is not followed.
                if std::path::Path::new(&offered) != segment {
                    return Err(TransferError::Protocol(format!(
                        "offered segment {offered} is not the registered {}",
                        segment.display()
                    )));
                }
                let map = ShmMap::open(&segment, self.layout, n_blocks)?;
                let (rd, wr) = sock.into_split();
                start_conn(rd, wr, &self.cfg, Some(Arc::new(map)))
            }
        };
        let c = Arc::new(Mutex::new(c));
        conns.insert(key.clone(), c.clone());
        Ok(c)
    }

    /// Opens a session toward `target`: through shared memory when the receiver is on this
    /// host and offers it, else over TCP (a failed shared-memory attempt falls back to TCP).
    pub async fn open_target(
        &self,
        target: &KvTarget,
        request_id: ClusterRequestId,
        deadline: Instant,
    ) -> Result<SendSession, TransferError> {
        if let Some(local) = target.local.as_ref().filter(|l| l.host == host_id()) {
            match self.open_key(&ConnKey::Uds(local.uds.clone()), request_id, deadline).await {
                Ok(s) => return Ok(s),
                // The receiver answered, and would answer the same over TCP.
                Err(
                    e @ (TransferError::LayoutMismatch(_)
                    | TransferError::UnknownRequest(_)
                    | TransferError::StaleSender(_)),
                ) => return Err(e),
                Err(_) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.open_key(&ConnKey::Tcp(target.tcp), request_id, deadline).await
    }

    /// Times a shared-memory attempt failed and TCP was used instead.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Opens a session for `request_id` toward the receiver at `addr`, over TCP.
    pub async fn open(
        &self,
        addr: SocketAddr,
        request_id: ClusterRequestId,
        deadline: Instant,
    ) -> Result<SendSession, TransferError> {
        self.open_key(&ConnKey::Tcp(addr), request_id, deadline).await
    }

    async fn open_key(
        &self,
        key: &ConnKey,
        request_id: ClusterRequestId,
        deadline: Instant,
    ) -> Result<SendSession, TransferError> {
        let conn = self.conn(key, deadline).await?;
        let (tx, rx) = watch::channel(None);
        let (queue, dead, shm, pool, pending, opening) = {
            let c = conn.lock().expect("conn");
            c.pending.lock().expect("pending").insert(request_id, tx);
            (c.tx.clone(), c.dead.clone(), c.shm.clone(), c.pool.clone(), c.pending.clone(), c.opening.clone())
        };
        let accepted = match shm {
            None => HashSet::new(),
            Some(_) => match open_in_place(&queue, &opening, request_id, deadline).await {
                Ok(blocks) => blocks.into_iter().collect(),
                Err(e) => {
                    pending.lock().expect("pending").remove(&request_id);
                    return Err(e);
                }
            },
        };
        Ok(SendSession {
            request_id,
            deadline: Arc::new(Mutex::new(deadline)),
            queue,
            dead,
            verdict: Some(rx),
            layout: self.layout,
            chunk_bytes: self.cfg.chunk_bytes,
            done: false,
            shm,
            accepted,
            pool,
        })
    }

    /// Closes every connection.
    pub async fn shutdown(&self) {
        for (_, c) in self.conns.lock().await.drain() {
            c.lock().expect("conn").tasks.abort_all();
        }
    }
}

/// Asks a same-host receiver for `request_id`'s blocks (`Open`) and waits for its answer:
/// the blocks this session may write in place, or why not.
async fn open_in_place(
    queue: &mpsc::Sender<Outgoing>,
    opening: &Opening,
    request_id: ClusterRequestId,
    deadline: Instant,
) -> Result<Vec<BlockId>, TransferError> {
    let (tx, rx) = oneshot::channel();
    opening.lock().expect("opening").insert(request_id, tx);
    let late = || TransferError::Deadline(format!("request {request_id}: the receiver did not accept it in time"));
    let asked = tokio::time::timeout_at(deadline, queue.send(Outgoing::Bytes(wire::encode_open(request_id)))).await;
    let answer = match asked {
        Err(_) => Err(late()),
        Ok(Err(_)) => Err(TransferError::PeerGone("connection closed".into())),
        Ok(Ok(())) => match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(TransferError::PeerGone("connection closed".into())),
            Err(_) => Err(late()),
        },
    };
    opening.lock().expect("opening").remove(&request_id);
    answer
}

/// One request's transfer from the sending side.
pub struct SendSession {
    pub request_id: ClusterRequestId,
    /// Moves later with each renewal (`Renewer`).
    deadline: Arc<Mutex<Instant>>,
    queue: mpsc::Sender<Outgoing>,
    dead: Arc<Mutex<Option<TransferError>>>,
    verdict: Option<watch::Receiver<Verdict>>,
    layout: KvLayout,
    chunk_bytes: usize,
    done: bool,
    shm: Option<Arc<ShmMap>>,
    /// On a same-host connection: the blocks the receiver accepted this session for.
    accepted: HashSet<BlockId>,
    pool: BufferPool,
}

impl SendSession {
    /// The connection's buffer pool: fill `pool.take()` and pass it to `send_layer`.
    pub fn buffers(&self) -> BufferPool {
        self.pool.clone()
    }

    /// "shm" or "tcp".
    pub fn transport(&self) -> &'static str {
        if self.shm.is_some() {
            "shm"
        } else {
            "tcp"
        }
    }

    /// Keeps this session's reservation alive from elsewhere while the session itself is
    /// busy or idle (a queued prefill): see `Renewer`.
    pub fn renewer(&self) -> Renewer {
        Renewer {
            request_id: self.request_id,
            queue: self.queue.clone(),
            deadline: self.deadline.clone(),
            verdict: self.verdict.clone(),
            dead: self.dead.clone(),
        }
    }

    fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("deadline")
    }

    fn early_error(&mut self) -> Result<(), TransferError> {
        let refused = self.verdict.as_ref().and_then(|rx| match &*rx.borrow() {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        });
        if let Some(e) = refused {
            self.verdict = None;
            return Err(e);
        }
        if let Some(e) = self.dead.lock().expect("dead").clone() {
            return Err(e);
        }
        Ok(())
    }

    async fn push(&mut self, out: Outgoing) -> Result<(), TransferError> {
        match tokio::time::timeout_at(self.deadline(), self.queue.send(out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TransferError::PeerGone("connection closed".into())),
            Err(_) => Err(TransferError::Deadline(format!("request {}: the send queue stayed full", self.request_id))),
        }
    }

    /// Like `send_layer`, from borrowed memory: on a same-host connection the blocks are
    /// written into the receiver's segment straight from `payload`, with no copy of our own.
    pub async fn send_layer_from(
        &mut self,
        layer: u16,
        block_ids: &[BlockId],
        payload: &[u8],
    ) -> Result<(), TransferError> {
        if let Some(shm) = self.shm.clone() {
            self.early_error()?;
            if payload.len() != block_ids.len() * self.layout.layer_block_bytes() {
                return Err(TransferError::Protocol(format!(
                    "payload of {} bytes for {} blocks",
                    payload.len(),
                    block_ids.len()
                )));
            }
            shm.write(&self.accepted, layer, block_ids, payload)?;
            let frame = wire::encode_blocks_in_place(self.request_id, layer, block_ids);
            return self.push(Outgoing::Bytes(frame)).await;
        }
        let mut buf = self.pool.take();
        buf.extend_from_slice(payload);
        self.send_layer(layer, block_ids, buf).await
    }

    /// Queues one layer of K/V for `block_ids` (payload: per block K then V). Waits while
    /// the connection's queue is full; fails at once if the receiver already refused the session.
    pub async fn send_layer(
        &mut self,
        layer: u16,
        block_ids: &[BlockId],
        payload: Vec<u8>,
    ) -> Result<(), TransferError> {
        self.early_error()?;
        let lbb = self.layout.layer_block_bytes();
        if payload.len() != block_ids.len() * lbb {
            return Err(TransferError::Protocol(format!(
                "payload of {} bytes for {} blocks",
                payload.len(),
                block_ids.len()
            )));
        }
        if let Some(shm) = &self.shm {
            // Same host: write the blocks in place, then ring the doorbell.
            shm.write(&self.accepted, layer, block_ids, &payload)?;
            let frame = wire::encode_blocks_in_place(self.request_id, layer, block_ids);
            return self.push(Outgoing::Bytes(frame)).await;
        }
        let per_frame = (self.chunk_bytes / lbb).max(1);
        let payload = Arc::new(payload);
        for (i, ids) in block_ids.chunks(per_frame).enumerate() {
            let range = i * per_frame * lbb..(i * per_frame + ids.len()) * lbb;
            let head = wire::encode_blocks_head(self.request_id, layer, ids, &[&payload[range.clone()]]);
            self.push(Outgoing::Blocks { head, payload: payload.clone(), range }).await?;
        }
        Ok(())
    }

    /// Sends the final frame with the first sampled token and waits for the receiver's verdict.
    pub async fn finish(mut self, first_token: u32, num_tokens: u32) -> Result<(), TransferError> {
        self.early_error()?;
        self.push(Outgoing::Bytes(wire::encode_finish(self.request_id, first_token, num_tokens))).await?;
        self.done = true;
        let mut rx = self.verdict.take().ok_or_else(|| TransferError::Protocol("session already failed".into()))?;
        let verdict = async { rx.wait_for(Option::is_some).await.map(|v| v.clone()) };
        match tokio::time::timeout_at(self.deadline(), verdict).await {
            Ok(Ok(r)) => r.expect("waited for a verdict"),
            Ok(Err(_)) => Err(TransferError::PeerGone("connection closed before the verdict".into())),
            Err(_) => {
                Err(TransferError::Deadline(format!("request {}: no verdict from the receiver", self.request_id)))
            }
        }
    }

    /// Tells the receiver to drop the session (its blocks are freed there).
    pub async fn abort(mut self, why: &str) {
        self.done = true;
        let _ = self.queue.try_send(Outgoing::Bytes(wire::encode_abort(self.request_id, Code::Aborted, why)));
    }
}

/// Renews a session's reservation on the receiver (a `Renew` frame) while the sender
/// still works on the request, and tells when the receiver has refused the session.
#[derive(Clone)]
pub struct Renewer {
    request_id: ClusterRequestId,
    queue: mpsc::Sender<Outgoing>,
    deadline: Arc<Mutex<Instant>>,
    verdict: Option<watch::Receiver<Verdict>>,
    dead: Arc<Mutex<Option<TransferError>>>,
}

impl Renewer {
    /// Asks for the reservation to last `lease` more, and moves this side's deadline as
    /// far. A full send queue skips this renewal (KV is flowing; the next one goes out).
    pub fn renew(&self, lease: Duration) -> Result<(), TransferError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let ms = lease.as_millis().min(u32::MAX as u128) as u32;
        match self.queue.try_send(Outgoing::Bytes(wire::encode_renew(self.request_id, ms))) {
            Ok(()) => {
                let mut d = self.deadline.lock().expect("deadline");
                *d = (*d).max(Instant::now() + lease);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TransferError::PeerGone("connection closed".into())),
        }
    }

    /// When the session must be given up now: the deadline as renewals have moved it.
    pub fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("deadline")
    }

    /// The receiver's refusal of the session, or the connection's death, if either came.
    pub fn failed(&self) -> Option<TransferError> {
        if let Some(Some(Err(e))) = self.verdict.as_ref().map(|rx| rx.borrow().clone()) {
            return Some(e);
        }
        self.dead.lock().expect("dead").clone()
    }

    /// Waits until the receiver refuses the session or the connection dies (forever if
    /// neither happens).
    pub async fn refused(&self) -> TransferError {
        if let Some(mut rx) = self.verdict.clone() {
            if let Ok(v) = rx.wait_for(|v| matches!(v, Some(Err(_)))).await {
                if let Some(Err(e)) = &*v {
                    return e.clone();
                }
            }
        }
        // The verdict came and was not a refusal (or never can come): nothing to wait for.
        std::future::pending().await
    }
}

impl Drop for SendSession {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.queue.try_send(Outgoing::Bytes(wire::encode_abort(
                self.request_id,
                Code::Aborted,
                "sender dropped the session",
            )));
        }
    }
}
