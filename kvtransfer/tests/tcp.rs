//! KV transfer over real TCP on loopback: the data lands in the reserved
//! blocks, and every failure ends the session on both sides with a typed error.

use std::sync::Arc;
use std::time::Duration;

use tandem_kernels::BlockId;
use tandem_kvtransfer::wire::{self, Code};
use tandem_kvtransfer::{HostKv, KvDtypeWire, KvLayout, KvReceiver, KvSender, TcpConfig, TransferError};
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

fn smollm() -> KvLayout {
    KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16, dtype: KvDtypeWire::F16, fingerprint: 0xabc }
}

fn payload(l: &KvLayout, seed: u64, blocks: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..blocks * l.layer_block_bytes())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

async fn receiver(n_blocks: usize) -> (Arc<KvReceiver>, Arc<HostKv>) {
    let sink = Arc::new(HostKv::new(smollm(), n_blocks));
    let rx = KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), TcpConfig::default()).await.unwrap();
    (rx, sink)
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

#[tokio::test]
async fn layers_land_in_the_reserved_blocks() {
    let l = smollm();
    let (rx, sink) = receiver(64).await;
    let blocks = [BlockId(5), BlockId(2), BlockId(9)];
    let res = rx.reserve(ClusterRequestId(1), &blocks, soon(5_000)).unwrap();
    let tx = KvSender::new(l, TcpConfig { chunk_bytes: 10_000, ..TcpConfig::default() });
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.unwrap();
    let mut sent = Vec::new();
    for layer in 0..l.n_layers {
        let p = payload(&l, layer as u64, blocks.len());
        s.send_layer(layer, &blocks, p.clone()).await.unwrap();
        sent.push(p);
    }
    s.finish(42, 40).await.unwrap();
    let arrived = res.wait().await.unwrap();
    assert_eq!((arrived.first_token, arrived.num_tokens), (42, 40));
    let lbb = l.layer_block_bytes();
    for layer in 0..l.n_layers as usize {
        for (i, &b) in blocks.iter().enumerate() {
            assert_eq!(
                sink.read_block(layer, b.index()),
                sent[layer][i * lbb..(i + 1) * lbb],
                "layer {layer} block {b}"
            );
        }
        assert!(sink.read_block(layer, 0).iter().all(|&x| x == 0), "unreserved blocks are untouched");
    }
    assert_eq!(rx.active(), 0, "the reservation is released once waited on");
}

#[tokio::test]
async fn many_sessions_share_one_connection() {
    let l = smollm();
    let (rx, sink) = receiver(64).await;
    let tx = Arc::new(KvSender::new(l, TcpConfig::default()));
    let mut waits = Vec::new();
    let mut sends = Vec::new();
    for r in 0..16u64 {
        let blocks = vec![BlockId((r * 4) as u32), BlockId((r * 4 + 1) as u32), BlockId((r * 4 + 2) as u32)];
        waits.push(rx.reserve(ClusterRequestId(r), &blocks, soon(10_000)).unwrap());
        let (tx, addr) = (tx.clone(), rx.local_addr());
        sends.push(tokio::spawn(async move {
            let mut s = tx.open(addr, ClusterRequestId(r), soon(10_000)).await.unwrap();
            for layer in 0..l.n_layers {
                s.send_layer(layer, &blocks, payload(&l, r * 100 + layer as u64, 3)).await.unwrap();
            }
            s.finish(r as u32, 48).await
        }));
    }
    for s in sends {
        s.await.unwrap().unwrap();
    }
    for (r, w) in waits.into_iter().enumerate() {
        assert_eq!(w.wait().await.unwrap().first_token, r as u32);
    }
    let lbb = l.layer_block_bytes();
    assert_eq!(sink.read_block(7, 4 * 5 + 1), payload(&l, 5 * 100 + 7, 3)[lbb..2 * lbb]);
}

#[tokio::test]
async fn layout_mismatch_fails_before_any_kv() {
    let (rx, sink) = receiver(8).await;
    let other = KvLayout { head_dim: 128, ..smollm() };
    let tx = KvSender::new(other, TcpConfig::default());
    let err = tx.open(rx.local_addr(), ClusterRequestId(1), soon(2_000)).await.err().expect("handshake must fail");
    // The sender learns that it does not fit, not what the receiver expects (head dim 64).
    assert!(
        matches!(&err, TransferError::LayoutMismatch(m) if m.contains("layout mismatch") && !m.contains("64")),
        "{err}"
    );
    let fp = KvLayout { fingerprint: 1, ..smollm() };
    let err = KvSender::new(fp, TcpConfig::default())
        .open(rx.local_addr(), ClusterRequestId(1), soon(2_000))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), "layout_mismatch");
    assert!(sink.read_block(0, 0).iter().all(|&x| x == 0));
}

#[tokio::test]
async fn unknown_request_and_bad_blocks_are_refused_on_both_sides() {
    let l = smollm();
    let (rx, _sink) = receiver(8).await;
    let tx = KvSender::new(l, TcpConfig::default());
    // No reservation at all.
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(77), soon(2_000)).await.unwrap();
    s.send_layer(0, &[BlockId(1)], payload(&l, 1, 1)).await.unwrap();
    let err = s.finish(0, 1).await.unwrap_err();
    assert_eq!(err, TransferError::UnknownRequest(ClusterRequestId(77)));
    // A block outside the reservation.
    let res = rx.reserve(ClusterRequestId(5), &[BlockId(1), BlockId(2)], soon(2_000)).unwrap();
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(5), soon(2_000)).await.unwrap();
    s.send_layer(0, &[BlockId(3)], payload(&l, 2, 1)).await.unwrap();
    assert_eq!(s.finish(0, 1).await.unwrap_err().kind(), "bad_block");
    assert_eq!(res.wait().await.unwrap_err().kind(), "bad_block");
    // The connection survives for the next session.
    let res = rx.reserve(ClusterRequestId(6), &[BlockId(4)], soon(2_000)).unwrap();
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(6), soon(2_000)).await.unwrap();
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(4)], payload(&l, 3, 1)).await.unwrap();
    }
    s.finish(9, 16).await.unwrap();
    assert_eq!(res.wait().await.unwrap().first_token, 9);
}

#[tokio::test]
async fn a_lease_expires_when_the_sender_never_comes() {
    let (rx, _sink) = receiver(8).await;
    let res = rx.reserve(ClusterRequestId(1), &[BlockId(0), BlockId(1)], soon(100)).unwrap();
    assert_eq!(rx.active(), 1);
    let err = res.wait().await.unwrap_err();
    assert_eq!(err.kind(), "deadline");
    assert_eq!(rx.active(), 0, "the blocks are released");
    // Released blocks can be reserved again.
    rx.reserve(ClusterRequestId(2), &[BlockId(0), BlockId(1)], soon(100)).unwrap();
}

#[tokio::test]
async fn finish_before_all_layers_is_an_error_on_both_sides() {
    let l = smollm();
    let (rx, _sink) = receiver(8).await;
    let res = rx.reserve(ClusterRequestId(1), &[BlockId(0)], soon(2_000)).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(1), soon(2_000)).await.unwrap();
    s.send_layer(0, &[BlockId(0)], payload(&l, 1, 1)).await.unwrap();
    assert_eq!(s.finish(1, 16).await.unwrap_err().kind(), "protocol");
    assert_eq!(res.wait().await.unwrap_err().kind(), "protocol");
}

#[tokio::test]
async fn abort_and_a_vanished_sender_end_the_session() {
    let l = smollm();
    let (rx, _sink) = receiver(8).await;
    let res = rx.reserve(ClusterRequestId(1), &[BlockId(0)], soon(5_000)).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.unwrap();
    s.send_layer(0, &[BlockId(0)], payload(&l, 1, 1)).await.unwrap();
    s.abort("prefill failed").await;
    assert_eq!(res.wait().await.unwrap_err().kind(), "aborted");

    let res = rx.reserve(ClusterRequestId(2), &[BlockId(1)], soon(5_000)).unwrap();
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(2), soon(5_000)).await.unwrap();
    s.send_layer(0, &[BlockId(1)], payload(&l, 2, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::mem::forget(s); // no abort frame: the process "dies"
    tx.shutdown().await;
    let t0 = std::time::Instant::now();
    assert_eq!(res.wait().await.unwrap_err().kind(), "peer_gone");
    assert!(t0.elapsed() < Duration::from_secs(4), "noticed the lost peer before the deadline");
}

#[tokio::test]
async fn a_corrupted_payload_fails_the_checksum() {
    let l = smollm();
    let (rx, _sink) = receiver(8).await;
    let res = rx.reserve(ClusterRequestId(3), &[BlockId(2)], soon(5_000)).unwrap();
    let mut sock = tokio::net::TcpStream::connect(rx.local_addr()).await.unwrap();
    sock.write_all(&wire::encode_hello(&l, None)).await.unwrap();
    let mut ok = [0u8; 16];
    sock.read_exact(&mut ok).await.unwrap();
    let mut frame = wire::encode_blocks(ClusterRequestId(3), 0, &[BlockId(2)], &payload(&l, 1, 1));
    let last = frame.len() - 1;
    frame[last] ^= 1;
    sock.write_all(&frame).await.unwrap();
    let mut ack = vec![0u8; 256];
    let n = sock.read(&mut ack).await.unwrap();
    match wire::decode(&ack[..n], 1 << 16, 0).unwrap().unwrap().0 {
        wire::Frame::Ack { request_id: ClusterRequestId(3), code: Code::Checksum, .. } => {}
        other => panic!("expected a checksum ack, got {other:?}"),
    }
    assert_eq!(res.wait().await.unwrap_err().kind(), "checksum");
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_closes_only_that_connection() {
    let l = smollm();
    let (rx, _sink) = receiver(8).await;
    let mut sock = tokio::net::TcpStream::connect(rx.local_addr()).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf))
        .await
        .expect("the receiver closes the connection");
    // The receiver still serves real senders.
    let res = rx.reserve(ClusterRequestId(1), &[BlockId(0)], soon(5_000)).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.unwrap();
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(0)], payload(&l, 9, 1)).await.unwrap();
    }
    s.finish(1, 16).await.unwrap();
    res.wait().await.unwrap();
}

/// A reservation that names its sender's discovery lease takes KV only from a connection
/// whose Hello announced that lease: a fenced or replaced incarnation (another lease) has
/// its frames refused and the session fails, typed, on both sides; the right one lands.
#[tokio::test]
async fn a_sender_with_another_lease_is_refused_as_stale() {
    let l = smollm();
    let (rx, sink) = receiver(16).await;
    let (current, stale) = (LeaseId::from_wire(0x7f00_0000_0000_0042), LeaseId::from_wire(0x7f00_0000_0000_0017));

    let res = rx.reserve_from(ClusterRequestId(1), &[BlockId(3)], soon(5_000), current).unwrap();
    let old = KvSender::new(l, TcpConfig::default());
    old.set_lease(stale).await;
    let mut s = old.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.unwrap();
    let sent = s.send_layer(0, &[BlockId(3)], payload(&l, 1, 1)).await.and(s.finish(7, 16).await);
    assert!(matches!(sent, Err(TransferError::StaleSender(_))), "the sender hears why: {sent:?}");
    assert!(matches!(res.wait().await, Err(TransferError::StaleSender(_))));
    assert!(sink.read_block(0, 3).iter().all(|&x| x == 0), "nothing of the stale sender's landed");

    // The worker registered again: its sender now announces the new lease.
    let res = rx.reserve_from(ClusterRequestId(2), &[BlockId(4)], soon(5_000), current).unwrap();
    old.set_lease(current).await;
    let mut s = old.open(rx.local_addr(), ClusterRequestId(2), soon(5_000)).await.unwrap();
    let p = payload(&l, 2, 1);
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(4)], p.clone()).await.unwrap();
    }
    s.finish(9, 16).await.unwrap();
    assert_eq!(res.wait().await.unwrap().first_token, 9);
    assert_eq!(sink.read_block(0, 4), p);
    // A reservation that names no lease takes any sender (as before leases existed).
    let res = rx.reserve(ClusterRequestId(3), &[BlockId(5)], soon(5_000)).unwrap();
    let anyone = KvSender::new(l, TcpConfig::default());
    let mut s = anyone.open(rx.local_addr(), ClusterRequestId(3), soon(5_000)).await.unwrap();
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(5)], payload(&l, 3, 1)).await.unwrap();
    }
    s.finish(1, 16).await.unwrap();
    assert!(res.wait().await.is_ok());
    assert_eq!(rx.active(), 0);
}

/// A receiver that goes away (its worker died; a restarted one listens elsewhere) does not
/// stay in the sender's connections: the next session drops it with its buffers.
#[tokio::test]
async fn a_dead_receivers_connection_is_dropped_by_the_next_session() {
    let l = smollm();
    let tx = KvSender::new(l, TcpConfig::default());
    let send_one = |rx: Arc<KvReceiver>, id: u64| {
        let tx = &tx;
        async move {
            let res = rx.reserve(ClusterRequestId(id), &[BlockId(1)], soon(5_000)).unwrap();
            let mut s = tx.open(rx.local_addr(), ClusterRequestId(id), soon(5_000)).await.unwrap();
            for layer in 0..l.n_layers {
                s.send_layer(layer, &[BlockId(1)], payload(&l, id, 1)).await.unwrap();
            }
            s.finish(3, 16).await.unwrap();
            res.wait().await.unwrap();
        }
    };
    let (old, _) = receiver(4).await;
    send_one(old.clone(), 1).await;
    assert_eq!(tx.connections().await, 1);
    old.shutdown();
    drop(old);
    let (new, _) = receiver(4).await;
    // The old connection is dropped once its reader has seen the receiver go.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        send_one(new.clone(), 2).await;
        if tx.connections().await == 1 {
            break;
        }
        assert!(std::time::Instant::now() < end, "the dead receiver's connection stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sender still computing keeps its reservation by renewing it (the receiver's lease
/// is 300 ms; the KV comes after 1 s), and learns at once when the reservation is gone.
#[tokio::test]
async fn renewals_keep_a_slow_senders_reservation_and_a_gone_one_is_refused() {
    let l = smollm();
    let (rx, sink) = receiver(16).await;
    let res = rx.reserve(ClusterRequestId(1), &[BlockId(3)], soon(300)).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(1), soon(300)).await.unwrap();
    let renewer = s.renewer();
    let waiting = tokio::spawn(res.wait());
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        renewer.renew(Duration::from_millis(300)).unwrap();
    }
    assert!(!waiting.is_finished(), "the receiver still waits, 1 s into a 300 ms lease");
    assert!(renewer.deadline() > Instant::now(), "the sender's own deadline moved too");
    let p = payload(&l, 7, 1);
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(3)], p.clone()).await.unwrap();
    }
    s.finish(5, 16).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().first_token, 5);
    assert_eq!(sink.read_block(0, 3), p);

    // A reservation that ended (dropped here, as a cancel does): the next renewal is refused.
    let res = rx.reserve(ClusterRequestId(2), &[BlockId(4)], soon(5_000)).unwrap();
    let s = tx.open(rx.local_addr(), ClusterRequestId(2), soon(5_000)).await.unwrap();
    let renewer = s.renewer();
    drop(res);
    renewer.renew(Duration::from_millis(300)).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), renewer.refused()).await.expect("refused in time");
    assert!(matches!(refused, TransferError::UnknownRequest(ClusterRequestId(2))), "{refused:?}");
    assert!(renewer.renew(Duration::from_millis(300)).is_err(), "no renewal after the refusal");
    tx.shutdown().await;
}
