//! Same-host shared memory under attack (issue 15, item 2): no byte lands in a block
//! before the receiver has accepted the session for exactly those blocks, and a sender
//! maps only its receiver's own segment, never a file a peer names.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_kernels::BlockId;
use tandem_kvtransfer::shm::shm_dir;
use tandem_kvtransfer::wire::{self, Frame, HEADER_LEN};
use tandem_kvtransfer::{
    host_id, KvDtypeWire, KvLayout, KvReceiver, KvSender, KvTarget, LocalTarget, ShmKv, TcpConfig, TransferError,
};
use tandem_proto::ids::ClusterRequestId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

const N_BLOCKS: usize = 8;

fn layout() -> KvLayout {
    KvLayout { n_layers: 2, n_kv_heads: 1, head_dim: 8, block_size: 4, dtype: KvDtypeWire::F16, fingerprint: 9 }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

async fn setup() -> (Arc<KvReceiver>, Arc<ShmKv>, KvTarget) {
    let sink = Arc::new(ShmKv::create(layout(), N_BLOCKS).unwrap());
    let rx = KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), TcpConfig::default()).await.unwrap();
    let uds = rx.listen_shm(TcpConfig::default()).unwrap();
    let target = KvTarget { tcp: rx.local_addr(), local: Some(LocalTarget { uds, host: host_id() }) };
    (rx, sink, target)
}

#[tokio::test]
async fn a_session_for_an_unknown_reservation_leaves_the_segment_unchanged() {
    let l = layout();
    let (rx, sink, target) = setup().await;
    let before = std::fs::read(sink.path()).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    // No reservation for request 99: the receiver says so before the sender writes anything.
    match tx.open_target(&target, ClusterRequestId(99), soon()).await {
        Err(TransferError::UnknownRequest(ClusterRequestId(99))) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a session opened without a reservation"),
    }
    assert_eq!(tx.fallbacks(), 0, "a refusal is not a broken endpoint");
    assert_eq!(std::fs::read(sink.path()).unwrap(), before);

    // A raw client that skips `Open` gets its in-place frames refused, and the session fails.
    let res = rx.reserve(ClusterRequestId(5), &[BlockId(2)], soon()).unwrap();
    let mut sock = UnixStream::connect(&target.local.as_ref().unwrap().uds).await.unwrap();
    sock.write_all(&wire::encode_hello(&l, None)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !matches!(wire::decode(&got, 1 << 16, 0), Ok(Some((Frame::HelloOk, n))) if got.len() > n) {
        let n = sock.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    sock.write_all(&wire::encode_blocks_in_place(ClusterRequestId(5), 0, &[BlockId(2)])).await.unwrap();
    let mut ack = [0u8; HEADER_LEN + 12];
    sock.read_exact(&mut ack[..HEADER_LEN]).await.unwrap();
    let len = u32::from_le_bytes(ack[8..12].try_into().unwrap()) as usize;
    let mut frame = ack[..HEADER_LEN].to_vec();
    frame.resize(HEADER_LEN + len, 0);
    sock.read_exact(&mut frame[HEADER_LEN..]).await.unwrap();
    match wire::decode(&frame, 1 << 16, 0).unwrap().unwrap().0 {
        Frame::Ack { request_id: ClusterRequestId(5), code: wire::Code::Protocol, .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(res.wait().await.is_err());
}

#[tokio::test]
async fn blocks_outside_the_reservation_are_never_a_destination() {
    let l = layout();
    let lbb = l.layer_block_bytes();
    let (rx, sink, target) = setup().await;
    // Blocks 0..3 stand for a cached prefix the decode worker shares with other requests:
    // its reservation holds only the freshly allocated tail, 3 and 4.
    let before = std::fs::read(sink.path()).unwrap();
    let res = rx.reserve(ClusterRequestId(1), &[BlockId(3), BlockId(4)], soon()).unwrap();
    let tx = KvSender::new(l, TcpConfig::default());
    let mut s = tx.open_target(&target, ClusterRequestId(1), soon()).await.unwrap();
    assert_eq!(s.transport(), "shm");
    // A Prefill aimed at the cached block 0 (as a stranger's could be): refused before writing.
    let err = s.send_layer(0, &[BlockId(0), BlockId(3)], vec![0xAB; 2 * lbb]).await.unwrap_err();
    assert!(matches!(err, TransferError::BadBlock(_)), "{err}");
    assert_eq!(std::fs::read(sink.path()).unwrap(), before, "no byte of the refused layer landed");
    // The reserved blocks still take their KV.
    for layer in 0..l.n_layers {
        s.send_layer(layer, &[BlockId(3), BlockId(4)], vec![layer as u8 + 1; 2 * lbb]).await.unwrap();
    }
    s.finish(7, 20).await.unwrap();
    assert_eq!(res.wait().await.unwrap().first_token, 7);
    for layer in 0..l.n_layers as usize {
        for b in 0..3 {
            assert_eq!(sink.read_block(layer, b), vec![0u8; lbb], "cached block {b} of layer {layer} changed");
        }
        assert_eq!(sink.read_block(layer, 4), vec![layer as u8 + 1; lbb]);
    }

    // Over TCP the receiver itself refuses the block, before reading its payload into it.
    let res = rx.reserve(ClusterRequestId(2), &[BlockId(5)], soon()).unwrap();
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(2), soon()).await.unwrap();
    s.send_layer(0, &[BlockId(0)], vec![0xCD; lbb]).await.unwrap();
    assert!(matches!(s.finish(7, 4).await, Err(TransferError::BadBlock(_))));
    assert!(res.wait().await.is_err());
    assert_eq!(sink.read_block(0, 0), vec![0u8; lbb]);
}

/// A fake same-host "receiver" at `socket`: answers Hello with HelloOk and a ShmOffer of
/// `offered`, and accepts every session for every block.
fn fake_receiver(socket: &Path, offered: &Path) -> tokio::task::JoinHandle<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let offer = wire::encode_shm_offer(N_BLOCKS as u64, &offered.to_string_lossy());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut hello = [0u8; HEADER_LEN + 28];
            if sock.read_exact(&mut hello).await.is_err() {
                continue;
            }
            let _ = sock.write_all(&wire::encode_hello_ok()).await;
            let _ = sock.write_all(&offer).await;
            let mut open = [0u8; HEADER_LEN + 8];
            while sock.read_exact(&mut open).await.is_ok() {
                let rid = u64::from_le_bytes(open[HEADER_LEN..].try_into().unwrap());
                let all: Vec<BlockId> = (0..N_BLOCKS as u32).map(BlockId).collect();
                let _ = sock.write_all(&wire::encode_accept(ClusterRequestId(rid), &all)).await;
            }
        }
    })
}

/// A file of a segment's size with a recognisable pattern, mode 0600.
fn victim(path: &Path) -> Vec<u8> {
    let bytes: Vec<u8> = (0..N_BLOCKS * layout().block_bytes()).map(|i| (i % 251) as u8).collect();
    let _ = std::fs::remove_file(path);
    std::fs::write(path, &bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    bytes
}

fn name(what: &str) -> String {
    format!("tandem-kv-{}-abuse-{what}", std::process::id())
}

/// Points a sender at `socket` (TCP fallback: a closed port) and tries to write block 0.
/// Returns whether a shared-memory session was opened.
async fn attack(socket: &Path) -> bool {
    let l = layout();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let target = KvTarget { tcp: closed, local: Some(LocalTarget { uds: socket.to_path_buf(), host: host_id() }) };
    let tx = KvSender::new(l, TcpConfig::default());
    match tx.open_target(&target, ClusterRequestId(1), Instant::now() + Duration::from_secs(2)).await {
        Ok(mut s) if s.transport() == "shm" => {
            let _ = s.send_layer(0, &[BlockId(0)], vec![0xEE; l.layer_block_bytes()]).await;
            true
        }
        _ => false,
    }
}

#[tokio::test]
async fn a_sender_maps_only_its_receivers_own_segment() {
    let dir = shm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let mut cases: Vec<(&str, PathBuf, PathBuf, Vec<u8>)> = Vec::new();

    // 1. The registered segment is a symlink to another file.
    let target = tmp.path().join("victim-symlink");
    let bytes = victim(&target);
    let seg = dir.join(name("symlink"));
    let _ = std::fs::remove_file(&seg);
    std::os::unix::fs::symlink(&target, &seg).unwrap();
    cases.push(("symlink", seg.clone(), target, bytes));

    // 2. The offer names a path other than the registered one (a file of ours, right size).
    let target = dir.join(name("offered"));
    let bytes = victim(&target);
    cases.push(("offered path", dir.join(name("absent")), target, bytes));

    // 3. The registration itself names a file outside the segment directory.
    let target = tmp.path().join(name("outside"));
    let bytes = victim(&target);
    cases.push(("outside shm_dir", target.clone(), target, bytes));

    // 4. The segment may be read by others (mode 0644).
    let target = dir.join(name("mode"));
    let bytes = victim(&target);
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    cases.push(("mode 0644", target.clone(), target, bytes));

    // 5. A second link to one of our files.
    let target = dir.join(name("linked-original"));
    let bytes = victim(&target);
    let seg = dir.join(name("linked"));
    let _ = std::fs::remove_file(&seg);
    std::fs::hard_link(&target, &seg).unwrap();
    cases.push(("hard link", seg, target, bytes));

    // 6. Another user's file (only root can make one here).
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let target = dir.join(name("owner"));
        let bytes = victim(&target);
        std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
        cases.push(("owner", target.clone(), target, bytes));
    } else {
        eprintln!("not root: the wrong-owner case is skipped");
    }

    for (what, offered, target, bytes) in &cases {
        // The socket is registered next to the segment it names; case 2 offers another path.
        let registered = if *what == "offered path" { dir.join(name("absent")) } else { offered.clone() };
        let mut socket = registered.as_os_str().to_owned();
        socket.push(".sock");
        let socket = PathBuf::from(socket);
        let offer = if *what == "offered path" { target.clone() } else { offered.clone() };
        let fake = fake_receiver(&socket, &offer);
        assert!(!attack(&socket).await, "{what}: a shared-memory session was opened");
        assert_eq!(&std::fs::read(target).unwrap(), bytes, "{what}: the file changed");
        fake.abort();
        let _ = std::fs::remove_file(&socket);
    }
    for (_, offered, target, _) in &cases {
        let _ = std::fs::remove_file(offered);
        let _ = std::fs::remove_file(target);
    }
    let _ = std::fs::remove_file(dir.join(name("linked-original")));
}
