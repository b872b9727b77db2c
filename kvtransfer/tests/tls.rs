//! KV transfer over mutual TLS on loopback: the blocks land as over plain TCP;
//! senders without a certificate from the CA, plaintext senders and receivers
//! without the configured name are refused; bad files fail at load, naming the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tandem_kernels::BlockId;
use tandem_kvtransfer::{HostKv, KvDtypeWire, KvLayout, KvReceiver, KvSender, TcpConfig, TransferError};
use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tls::{MutualTls, TlsFiles};
use tokio::time::Instant;

fn smollm() -> KvLayout {
    KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16, dtype: KvDtypeWire::F16, fingerprint: 0xabc }
}

fn payload(l: &KvLayout, seed: u64, blocks: usize) -> Vec<u8> {
    (0..blocks * l.layer_block_bytes()).map(|i| (i as u64 * 31 + seed * 7) as u8).collect()
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// A CA that issues certificates into a directory.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), issuer.pem()).unwrap();
        Ca { issuer, dir }
    }

    /// A certificate for `names` (subject alternative names), and the files to load it.
    fn issue(&self, who: &str, names: &[&str]) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer).unwrap();
        let (crt, pem) = (self.dir.join(format!("{who}.crt")), self.dir.join(format!("{who}.key")));
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&pem, key.serialize_pem()).unwrap();
        TlsFiles::new(crt, pem, self.dir.join("ca.crt"))
    }
}

fn tls_cfg(files: &TlsFiles) -> TcpConfig {
    TcpConfig { tls: Some(MutualTls::load(files).unwrap()), ..TcpConfig::default() }
}

async fn receiver(cfg: TcpConfig) -> (Arc<KvReceiver>, Arc<HostKv>) {
    let sink = Arc::new(HostKv::new(smollm(), 16));
    let rx = KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), cfg).await.unwrap();
    (rx, sink)
}

#[tokio::test]
async fn layers_land_in_the_reserved_blocks_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let (rx, sink) = receiver(tls_cfg(&ca.issue("decode", &["tandem-worker"]))).await;
    let l = smollm();
    let blocks = [BlockId(3), BlockId(7), BlockId(1)];
    let res = rx.reserve(ClusterRequestId(1), &blocks, soon(10_000)).unwrap();
    // Small chunks: many frames, each payload split over TLS records.
    let cfg = TcpConfig { chunk_bytes: 10_000, ..tls_cfg(&ca.issue("prefill", &["prefill"])) };
    let tx = KvSender::new(l, cfg);
    let mut s = tx.open(rx.local_addr(), ClusterRequestId(1), soon(10_000)).await.unwrap();
    for layer in 0..l.n_layers {
        s.send_layer(layer, &blocks, payload(&l, layer as u64, blocks.len())).await.unwrap();
    }
    s.finish(42, 48).await.unwrap();
    assert_eq!(res.wait().await.unwrap().first_token, 42);
    let lbb = l.layer_block_bytes();
    for layer in 0..l.n_layers as usize {
        for (i, &b) in blocks.iter().enumerate() {
            let sent = payload(&l, layer as u64, blocks.len());
            assert_eq!(sink.read_block(layer, b.index()), sent[i * lbb..(i + 1) * lbb], "layer {layer} block {b}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_fill_the_socket_all_get_their_verdicts() {
    // The sender outruns the receiver: the socket fills, and each session's last frames
    // (Finish, and the receiver's Acks) must still leave rustls's buffers.
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let l = smollm();
    let sink = Arc::new(HostKv::new(l, 256));
    let cfg = tls_cfg(&ca.issue("decode", &["tandem-worker"]));
    let rx = KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), cfg).await.unwrap();
    let tx = Arc::new(KvSender::new(l, tls_cfg(&ca.issue("prefill", &["prefill"]))));
    let mut sessions = Vec::new();
    for r in 0..4u32 {
        let blocks: Vec<BlockId> = (r * 64..(r + 1) * 64).map(BlockId).collect();
        let res = rx.reserve(ClusterRequestId(r as u64), &blocks, soon(30_000)).unwrap();
        let (tx, addr) = (tx.clone(), rx.local_addr());
        let send = tokio::spawn(async move {
            let mut s = tx.open(addr, ClusterRequestId(r as u64), soon(30_000)).await?;
            for layer in 0..l.n_layers {
                s.send_layer(layer, &blocks, payload(&l, (r * 100) as u64 + layer as u64, blocks.len())).await?;
            }
            s.finish(r, 1024).await
        });
        sessions.push((res, send));
    }
    for (r, (res, send)) in sessions.into_iter().enumerate() {
        send.await.unwrap().unwrap_or_else(|e| panic!("session {r}: {e}"));
        assert_eq!(res.wait().await.unwrap().first_token, r as u32);
    }
    let lbb = l.layer_block_bytes();
    assert_eq!(sink.read_block(29, 3 * 64 + 5), payload(&l, 300 + 29, 64)[5 * lbb..6 * lbb]);
    // One session at a time on the same connection: each burst ends with its Finish alone.
    let blocks: Vec<BlockId> = (0..16).map(BlockId).collect();
    let layer = payload(&l, 9, blocks.len());
    for r in 10..60u64 {
        let res = rx.reserve(ClusterRequestId(r), &blocks, soon(5_000)).unwrap();
        let mut s = tx.open(rx.local_addr(), ClusterRequestId(r), soon(5_000)).await.unwrap();
        for li in 0..l.n_layers {
            s.send_layer_from(li, &blocks, &layer).await.unwrap();
        }
        s.finish(r as u32, 256).await.unwrap_or_else(|e| panic!("session {r}: {e}"));
        res.wait().await.unwrap();
    }
}

#[tokio::test]
async fn senders_without_a_certificate_from_the_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let rogue = Ca::new(dir.path(), "rogue");
    let (rx, sink) = receiver(tls_cfg(&ca.issue("decode", &["tandem-worker"]))).await;
    let l = smollm();
    let _res = rx.reserve(ClusterRequestId(1), &[BlockId(0)], soon(10_000)).unwrap();

    // A certificate from another CA, by a sender that trusts the receiver's CA.
    let mut files = rogue.issue("intruder", &["intruder"]);
    files.ca = ca.dir.join("ca.crt");
    let intruder = MutualTls::load(&files);
    assert!(
        intruder.as_ref().is_err_and(|e| e.to_string().contains("does not verify against the CA")),
        "a certificate from another CA is refused at load: {intruder:?}"
    );
    // A sender of another cluster (its own CA, its own trust): no session either way.
    let tx = KvSender::new(l, tls_cfg(&rogue.issue("intruder", &["tandem-worker"])));
    let err = tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.err().expect("refused");
    assert_eq!(err.kind(), "tls", "{err}");

    // Plaintext to a TLS receiver: no handshake, no session.
    let tx = KvSender::new(l, TcpConfig::default());
    let err = tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.err().expect("refused");
    assert!(!matches!(err, TransferError::LayoutMismatch(_)), "never reached the Hello: {err}");

    // TLS to a plaintext receiver.
    let (plain, _) = receiver(TcpConfig::default()).await;
    let tx = KvSender::new(l, tls_cfg(&ca.issue("prefill", &["prefill"])));
    let err = tx.open(plain.local_addr(), ClusterRequestId(1), soon(5_000)).await.err().expect("refused");
    assert_eq!(err.kind(), "tls", "{err}");
    assert!(sink.read_block(0, 0).iter().all(|&x| x == 0), "nothing was written");
}

/// What a raw TLS client that trusts the cluster's CA gets for its Hello: the receiver's
/// answer (a frame header), or the error that ended the connection.
async fn hello_as(rx: &KvReceiver, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<[u8; 16], String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let sock = tokio::net::TcpStream::connect(rx.local_addr()).await.unwrap();
    let name = ServerName::try_from("tandem-worker").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, sock).await.map_err(|e| e.to_string())?;
    tls.write_all(&tandem_kvtransfer::wire::encode_hello(&smollm(), None)).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 16];
    tls.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    Ok(answer)
}

#[tokio::test]
async fn the_receiver_refuses_clients_without_a_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let rogue = Ca::new(dir.path(), "rogue");
    let (rx, _) = receiver(tls_cfg(&ca.issue("decode", &["tandem-worker"]))).await;
    let ca_file = ca.dir.join("ca.crt");
    let member = ca.issue("prefill", &["prefill"]);
    let answer = hello_as(&rx, &ca_file, Some((&member.cert, &member.key))).await.expect("a member is answered");
    assert_eq!(answer, tandem_kvtransfer::wire::encode_hello_ok()[..16], "HelloOk");
    let intruder = rogue.issue("intruder", &["tandem-worker"]);
    let err = hello_as(&rx, &ca_file, Some((&intruder.cert, &intruder.key))).await.expect_err("another CA's client");
    assert!(err.contains("UnknownCA"), "{err}");
    let err = hello_as(&rx, &ca_file, None).await.expect_err("a client without a certificate");
    assert!(err.contains("CertificateRequired") || err.contains("HandshakeFailure"), "{err}");
}

#[tokio::test]
async fn a_receiver_whose_certificate_lacks_the_server_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let files = ca.issue("decode", &["somebody-else"]);
    let tls = MutualTls::load(&files).unwrap();
    let err = tls.check_server_name().unwrap_err().to_string();
    assert!(err.contains("not valid for the server name \"tandem-worker\""), "{err}");
    let (rx, _) = receiver(TcpConfig { tls: Some(tls), ..TcpConfig::default() }).await;
    let tx = KvSender::new(smollm(), tls_cfg(&ca.issue("prefill", &["prefill"])));
    let err = tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.err().expect("refused");
    assert_eq!(err.kind(), "tls", "{err}");
    // The same receiver, verified by the name its certificate has.
    let mut named = ca.issue("prefill", &["prefill"]);
    named.server_name = "somebody-else".into();
    let tx = KvSender::new(smollm(), tls_cfg(&named));
    let _res = rx.reserve(ClusterRequestId(1), &[BlockId(0)], soon(5_000)).unwrap();
    tx.open(rx.local_addr(), ClusterRequestId(1), soon(5_000)).await.expect("accepted by name");
}

#[test]
fn bad_files_fail_at_load_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let good = ca.issue("worker", &["tandem-worker"]);
    MutualTls::load(&good).unwrap().check_server_name().unwrap();

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let other = ca.issue("other", &["tandem-worker"]);
    let cases = [
        (TlsFiles { cert: dir.path().join("nope.crt"), ..good.clone() }, "reading the TLS certificate", "nope.crt"),
        (TlsFiles { ca: garbage.clone(), ..good.clone() }, "no PEM CERTIFICATE", "garbage.pem"),
        (TlsFiles { key: garbage.clone(), ..good.clone() }, "no usable PEM private key", "garbage.pem"),
        (TlsFiles { key: other.key, ..good.clone() }, "does not fit the certificate", "other.key"),
        (TlsFiles { server_name: "not a name!".into(), ..good }, "is not a DNS name", "not a name!"),
    ];
    for (files, what, names) in cases {
        let err = MutualTls::load(&files).unwrap_err().to_string();
        assert!(err.contains(what) && err.contains(names), "{files:?}: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
