//! A stranger on the KV port (issue 15, item 1): frame headers claiming huge bodies,
//! stalled sessions, connection floods, and what a refused handshake gives away.
//! Each test performs the attack over real TCP and checks the receiver holds up and
//! still serves a real sender afterwards.

use std::sync::Arc;
use std::time::Duration;

use tandem_kernels::BlockId;
use tandem_kvtransfer::wire::{self, Frame, HEADER_LEN};
use tandem_kvtransfer::{HostKv, KvAuth, KvDtypeWire, KvLayout, KvReceiver, KvSender, TcpConfig, TransferError};
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn layout() -> KvLayout {
    KvLayout { n_layers: 2, n_kv_heads: 2, head_dim: 8, block_size: 4, dtype: KvDtypeWire::F16, fingerprint: 0xfeed }
}

/// Short deadlines so the tests see them act; caps a little above what the tests open.
fn cfg() -> TcpConfig {
    TcpConfig {
        idle_timeout: Duration::from_millis(600),
        frame_timeout: Duration::from_millis(300),
        max_conns: 64,
        max_conns_per_ip: 12,
        ..TcpConfig::default()
    }
}

async fn receiver(cfg: TcpConfig) -> (Arc<KvReceiver>, Arc<HostKv>) {
    let sink = Arc::new(HostKv::new(layout(), 16));
    let rx = KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), cfg).await.unwrap();
    (rx, sink)
}

/// This process's resident set, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
}

/// A connection past the handshake: Hello sent, HelloOk read.
async fn handshaken(rx: &KvReceiver) -> TcpStream {
    let mut sock = TcpStream::connect(rx.local_addr()).await.unwrap();
    sock.write_all(&wire::encode_hello(&layout(), None)).await.unwrap();
    let mut ok = [0u8; HEADER_LEN];
    sock.read_exact(&mut ok).await.unwrap();
    assert!(matches!(wire::decode(&ok, 0, 0), Ok(Some((Frame::HelloOk, _)))));
    sock
}

/// Reads until the receiver closes the connection (within `within`); returns what it sent.
async fn until_closed(sock: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, sock.read(&mut buf)).await {
            Err(_) => panic!("the receiver kept the connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A Finish header (valid magic, version, kind) that claims a body of `len` bytes.
fn finish_header_claiming(len: u32) -> Vec<u8> {
    let mut h = wire::encode_finish(ClusterRequestId(1), 2, 3)[..HEADER_LEN].to_vec();
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// A real sender still gets its KV through.
async fn a_transfer_works(rx: &KvReceiver, sink: &HostKv, request_id: ClusterRequestId) {
    a_transfer_works_with(rx, sink, request_id, TcpConfig::default()).await
}

/// As `a_transfer_works`, from a sender configured by `cfg`.
async fn a_transfer_works_with(rx: &KvReceiver, sink: &HostKv, request_id: ClusterRequestId, cfg: TcpConfig) {
    let l = layout();
    let res = rx.reserve(request_id, &[BlockId(5)], Instant::now() + Duration::from_secs(5)).unwrap();
    let tx = KvSender::new(l, cfg);
    let mut s = tx.open(rx.local_addr(), request_id, Instant::now() + Duration::from_secs(5)).await.unwrap();
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(5)], vec![layer as u8 + 7; l.layer_block_bytes()]).await.unwrap();
    }
    s.finish(42, 3).await.unwrap();
    assert_eq!(res.wait().await.unwrap().first_token, 42);
    assert_eq!(sink.read_block(1, 5), vec![8u8; l.layer_block_bytes()]);
    tx.shutdown().await;
}

#[tokio::test]
async fn headers_claiming_64_mib_bodies_are_refused_without_allocating_them() {
    let (rx, sink) = receiver(cfg()).await;
    const N: usize = 10;
    let before = rss();
    let mut socks = Vec::new();
    for _ in 0..N {
        let mut sock = handshaken(&rx).await;
        // The header alone, then nothing: the old receiver zero-filled 64 MiB for it and waited.
        sock.write_all(&finish_header_claiming(64 << 20)).await.unwrap();
        socks.push(sock);
    }
    // Let every connection's task act on its header.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let grown = rss().saturating_sub(before);
    assert!(grown < 32 << 20, "{N} connections claiming 64 MiB each grew the receiver by {} MiB", grown >> 20);
    for sock in &mut socks {
        let said = until_closed(sock, Duration::from_secs(5)).await;
        let frame = wire::decode(&said, 1 << 16, 0).unwrap().unwrap().0;
        assert!(matches!(frame, Frame::Error { code: wire::Code::Protocol, .. }), "{frame:?}");
    }
    drop(socks);
    a_transfer_works(&rx, &sink, ClusterRequestId(1)).await;
}

#[tokio::test]
async fn stalled_connections_are_closed_by_the_read_deadlines() {
    let (rx, sink) = receiver(cfg()).await;
    // Within a frame: a header, part of its body, then silence (frame deadline, 300 ms).
    let mut mid_frame = handshaken(&rx).await;
    let finish = wire::encode_finish(ClusterRequestId(1), 2, 3);
    mid_frame.write_all(&finish[..HEADER_LEN + 4]).await.unwrap();
    // Between frames: nothing after the handshake (idle deadline, 600 ms).
    let mut idle = handshaken(&rx).await;
    // Mid-header: half a header, then silence.
    let mut mid_header = handshaken(&rx).await;
    mid_header.write_all(&finish[..8]).await.unwrap();
    for sock in [&mut mid_frame, &mut idle, &mut mid_header] {
        until_closed(sock, Duration::from_secs(5)).await;
    }
    a_transfer_works(&rx, &sink, ClusterRequestId(2)).await;
}

#[tokio::test]
async fn connections_past_the_caps_are_refused_at_accept() {
    for (per_ip, total) in [(3, 64), (64, 3)] {
        let (rx, sink) = receiver(TcpConfig { max_conns_per_ip: per_ip, max_conns: total, ..cfg() }).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(handshaken(&rx).await);
        }
        assert_eq!(rx.connections(), 3);
        // The fourth is accepted by the kernel and closed at once, before a Hello is read.
        let mut extra = TcpStream::connect(rx.local_addr()).await.unwrap();
        let said = until_closed(&mut extra, Duration::from_secs(5)).await;
        assert!(said.is_empty(), "a refused connection is told nothing");
        assert_eq!(rx.refused_connections(), 1, "per ip {per_ip}, total {total}");
        drop(held);
        let gone = Instant::now() + Duration::from_secs(5);
        while rx.connections() > 0 {
            assert!(Instant::now() < gone, "closed connections still counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a_transfer_works(&rx, &sink, ClusterRequestId(3)).await;
    }
}

#[tokio::test]
async fn a_refused_hello_learns_nothing_of_the_expected_layout() {
    let (rx, sink) = receiver(cfg()).await;
    let mut sock = TcpStream::connect(rx.local_addr()).await.unwrap();
    let guess = KvLayout { head_dim: 64, fingerprint: 0x1234, ..layout() };
    sock.write_all(&wire::encode_hello(&guess, None)).await.unwrap();
    let said = until_closed(&mut sock, Duration::from_secs(5)).await;
    match wire::decode(&said, 1 << 16, 0).unwrap().unwrap().0 {
        Frame::Error { code: wire::Code::LayoutMismatch, message } => {
            assert_eq!(message, "layout mismatch");
        }
        other => panic!("{other:?}"),
    }
    a_transfer_works(&rx, &sink, ClusterRequestId(4)).await;
}

/// Issue 15, item 3: a receiver with the cluster's key refuses every Hello not signed with
/// it (unsigned, signed with another key, or a replayed tag on other fields) before it
/// looks at the layout, and tells the stranger nothing but that.
#[tokio::test]
async fn a_hello_without_the_clusters_key_is_refused_before_anything_else() {
    let key = || Some(KvAuth::from_secret(b"this cluster's secret, 32 bytes+"));
    let (rx, sink) = receiver(TcpConfig { auth: key(), ..cfg() }).await;
    let stranger = KvAuth::from_secret(b"a guess at the secret, 32 bytes+");
    let right = key().unwrap();
    let attempts = [
        ("unsigned", wire::encode_hello(&layout(), None)),
        ("another key", wire::encode_hello_signed(&layout(), None, Some(&stranger))),
        ("a wrong layout, unsigned", wire::encode_hello(&KvLayout { head_dim: 64, ..layout() }, None)),
        // A real tag, lifted from another sender's Hello, on a lease of the stranger's choice.
        (
            "a tag of other fields",
            wire::encode_hello_tagged(
                &layout(),
                LeaseId::from_wire(9),
                &right.tag(&wire::hello_fields(&layout(), None)),
            ),
        ),
    ];
    for (what, hello) in attempts {
        let mut sock = TcpStream::connect(rx.local_addr()).await.unwrap();
        sock.write_all(&hello).await.unwrap();
        let said = until_closed(&mut sock, Duration::from_secs(5)).await;
        match wire::decode(&said, 1 << 16, 0).unwrap().unwrap().0 {
            Frame::Error { code: wire::Code::Unauthenticated, message } => {
                assert_eq!(message, "unauthenticated", "{what}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A sender without the key learns why it failed; one with it gets its KV through.
    let res = rx.reserve(ClusterRequestId(5), &[BlockId(5)], Instant::now() + Duration::from_secs(5)).unwrap();
    let tx = KvSender::new(layout(), TcpConfig::default());
    let err = tx.open(rx.local_addr(), ClusterRequestId(5), Instant::now() + Duration::from_secs(5)).await.err();
    assert!(matches!(err, Some(TransferError::Unauthenticated(_))), "{err:?}");
    tx.shutdown().await;
    drop(res);
    a_transfer_works_with(&rx, &sink, ClusterRequestId(6), TcpConfig { auth: key(), ..TcpConfig::default() }).await;
}
