//! Same-host transfer through a shared-memory segment, and the automatic choice
//! between shared memory and TCP.

use std::sync::Arc;
use std::time::Duration;

use tandem_kernels::BlockId;
use tandem_kvtransfer::wire;
use tandem_kvtransfer::{
    host_id, KvDtypeWire, KvLayout, KvReceiver, KvSender, KvTarget, LocalTarget, ShmKv, TcpConfig,
};
use tandem_proto::ids::ClusterRequestId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

fn smollm() -> KvLayout {
    KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16, dtype: KvDtypeWire::F16, fingerprint: 7 }
}

fn payload(l: &KvLayout, seed: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * l.layer_block_bytes()).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn uds_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tandem-kv-test-{}-{name}.sock", std::process::id()))
}

async fn setup() -> (Arc<KvReceiver>, Arc<ShmKv>, KvTarget) {
    let sink = Arc::new(ShmKv::create(smollm(), 32).unwrap());
    let rx = KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), TcpConfig::default()).await.unwrap();
    let uds = rx.listen_shm(TcpConfig::default()).unwrap();
    assert_eq!(uds, sink.socket_path());
    let target = KvTarget { tcp: rx.local_addr(), local: Some(LocalTarget { uds, host: host_id() }) };
    (rx, sink, target)
}

async fn send_all(tx: &KvSender, target: &KvTarget, req: u64, blocks: &[u32]) -> &'static str {
    let l = smollm();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = tx.open_target(target, ClusterRequestId(req), deadline).await.unwrap();
    let transport = s.transport();
    let blocks: Vec<BlockId> = blocks.iter().map(|&b| BlockId(b)).collect();
    for layer in 0..l.n_layers {
        s.send_layer(layer, &blocks, payload(&l, layer as u8, blocks.len())).await.unwrap();
    }
    s.finish(11, 32).await.unwrap();
    transport
}

#[tokio::test]
async fn same_host_senders_write_the_segment_in_place() {
    let l = smollm();
    let (rx, sink, target) = setup().await;
    let res =
        rx.reserve(ClusterRequestId(1), &[BlockId(3), BlockId(8)], Instant::now() + Duration::from_secs(5)).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    assert_eq!(send_all(&tx, &target, 1, &[3, 8]).await, "shm");
    assert_eq!(res.wait().await.unwrap().first_token, 11);
    let lbb = l.layer_block_bytes();
    for layer in 0..l.n_layers as usize {
        let p = payload(&l, layer as u8, 2);
        assert_eq!(sink.read_block(layer, 3), p[..lbb]);
        assert_eq!(sink.read_block(layer, 8), p[lbb..]);
    }
    assert_eq!(tx.fallbacks(), 0);
}

#[tokio::test]
async fn a_broken_local_endpoint_falls_back_to_tcp_and_another_host_uses_tcp() {
    let l = smollm();
    let (rx, sink, mut target) = setup().await;
    target.local.as_mut().unwrap().uds = uds_path("nobody-listens-here");
    let res = rx.reserve(ClusterRequestId(2), &[BlockId(1)], Instant::now() + Duration::from_secs(5)).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    assert_eq!(send_all(&tx, &target, 2, &[1]).await, "tcp");
    res.wait().await.unwrap();
    assert_eq!(tx.fallbacks(), 1);
    assert_eq!(sink.read_block(4, 1), payload(&l, 4, 1));

    target.local.as_mut().unwrap().host = "another-host".into();
    let res = rx.reserve(ClusterRequestId(3), &[BlockId(2)], Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(send_all(&tx, &target, 3, &[2]).await, "tcp");
    res.wait().await.unwrap();
    assert_eq!(tx.fallbacks(), 1, "no shared-memory attempt toward another host");
}

#[tokio::test]
async fn in_place_frames_are_refused_over_tcp() {
    let l = smollm();
    let (rx, _sink, _target) = setup().await;
    let _res = rx.reserve(ClusterRequestId(4), &[BlockId(0)], Instant::now() + Duration::from_secs(5)).unwrap();
    let mut sock = tokio::net::TcpStream::connect(rx.local_addr()).await.unwrap();
    sock.write_all(&wire::encode_hello(&l, None)).await.unwrap();
    let mut ok = [0u8; 16];
    sock.read_exact(&mut ok).await.unwrap();
    let p = payload(&l, 0, 1);
    let _ = &p;
    sock.write_all(&wire::encode_blocks_in_place(ClusterRequestId(4), 0, &[BlockId(0)])).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = sock.read(&mut buf).await.unwrap();
    let frame = wire::decode(&buf[..n], 1 << 16, 0).unwrap().unwrap().0;
    assert!(matches!(frame, wire::Frame::Error { .. }), "{frame:?}");
}
