//! Mutual TLS across real processes: a router, a prefill worker and a decode
//! worker started with certificates from one CA (made here with rcgen) against
//! a real etcd. Greedy text through the cluster equals `tandem generate`'s, and
//! the KV crossed the TLS'd TCP plane (the decode worker offers no shared
//! memory; its metrics count the sessions). Plaintext clients, clients without a
//! certificate and clients with another CA's certificate are refused on the
//! workers' gRPC and KV ports; bad files stop a process at start with one line.

mod harness;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The cluster's CA and its certificates, plus a rogue CA's, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap() };
        let cluster = pki.ca("ca");
        pki.issue(&cluster, "router", &["tandem-router"]);
        pki.issue(&cluster, "worker", &["tandem-worker"]);
        pki.issue(&cluster, "misnamed", &["somewhere-else"]);
        let rogue = pki.ca("rogue-ca");
        pki.issue(&rogue, "intruder", &["tandem-worker"]);
        pki
    }

    fn ca(&self, name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} (tandem e2e)"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(self.path(&format!("{name}.crt")), ca.pem()).unwrap();
        ca
    }

    fn issue(&self, ca: &CertifiedIssuer<'static, KeyPair>, who: &str, names: &[&str]) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, ca).unwrap();
        std::fs::write(self.path(&format!("{who}.crt")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{who}.key")), key.serialize_pem()).unwrap();
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// `--tls-cert/--tls-key` of `who`, `--tls-ca` of the cluster.
    fn flags(&self, who: &str) -> Vec<String> {
        let p = |f: String| self.path(&f).to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            p(format!("{who}.crt")),
            "--tls-key".into(),
            p(format!("{who}.key")),
            "--tls-ca".into(),
            p("ca.crt".into()),
        ]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// A worker's stats over gRPC with TLS, trusting the cluster's CA and presenting `who`'s
/// certificate (none: no client certificate).
async fn stats_over_tls(pki: &Pki, addr: &str, who: Option<&str>) -> Result<pb::StatsResponse, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.read("ca.crt"))).domain_name("tandem-worker");
    if let Some(who) = who {
        tls = tls.identity(Identity::from_pem(pki.read(&format!("{who}.crt")), pki.read(&format!("{who}.key"))));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    // A member holds the cluster token too: TLS says who may connect, the token who may call.
    let reply = tandem_proto::auth::worker_client(channel, Some(cluster_token())).stats(pb::StatsRequest {}).await;
    reply.map(|r| r.into_inner()).map_err(|s| format!("stats: {s}"))
}

/// What the KV port answers a Hello with over TLS (the cluster's CA trusted, `who`'s
/// certificate presented, none: no certificate): the answer's frame header, or the error.
async fn kv_hello_over_tls(pki: &Pki, addr: &str, who: Option<&str>) -> Result<[u8; 16], String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&pki.read("ca.crt")).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match who {
        Some(who) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&pki.read(&format!("{who}.crt"))).unwrap()],
                PrivateKeyDer::from_pem_slice(&pki.read(&format!("{who}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("tandem-worker").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, sock);
    let tls = tokio::time::timeout(Duration::from_secs(10), tls).await.expect("handshake in time");
    hello(tls.map_err(|e| format!("handshake: {e}"))?).await
}

/// Sends a Hello (of a layout no worker has) and reads the 16-byte header of the answer.
async fn hello<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> Result<[u8; 16], String> {
    use tandem_kvtransfer::{KvDtypeWire, KvLayout};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let layout =
        KvLayout { n_layers: 1, n_kv_heads: 1, head_dim: 8, block_size: 16, dtype: KvDtypeWire::F16, fingerprint: 0 };
    s.write_all(&tandem_kvtransfer::wire::encode_hello(&layout, None)).await.map_err(|e| format!("write: {e}"))?;
    let mut answer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer)).await;
    read.expect("an answer or an error in time").map_err(|e| format!("read: {e}"))?;
    Ok(answer)
}

/// `name value` of the first sample line of `metrics` containing every fragment.
fn sample(metrics: &str, fragments: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| fragments.iter().all(|f| l.contains(f)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (addr, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The one `error:` line a process that refused to start printed.
fn start_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "exit code; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    errors[0].to_string()
}

#[test]
fn bad_tls_flags_and_files_stop_a_process_at_start_with_one_line() {
    let _one = serial();
    let pki = Pki::new();
    let etcd = Etcd::start();
    let base = ["--etcd", &etcd.url, "--cluster", "tls-refused"];
    let run = |role: &str, tls: &[&str]| {
        let mut args = vec![role];
        args.extend_from_slice(&base);
        args.extend_from_slice(tls);
        tandem(&args).output().unwrap()
    };
    let cert = pki.path("worker.crt");
    let cert = cert.to_str().unwrap();
    let err = start_error(&run("router", &["--tls-cert", cert]));
    assert!(err.contains("--tls-cert, --tls-key and --tls-ca go together"), "{err}");

    let mut missing = pki.flags("worker");
    missing[1] = pki.path("absent.crt").to_string_lossy().into_owned();
    let err = start_error(&run("prefill", &strs(&missing)));
    assert!(err.contains("reading the TLS certificate") && err.contains("absent.crt"), "{err}");

    let err = start_error(&run("decode", &strs(&pki.flags("misnamed"))));
    assert!(err.contains("not valid for the server name \"tandem-worker\""), "{err}");

    let err = start_error(&run("router", &strs(&pki.flags("intruder"))));
    assert!(err.contains("does not verify against the CA"), "{err}");
}

#[test]
fn a_mutual_tls_cluster_serves_the_same_text_and_refuses_strangers() {
    let _one = serial();
    let pki = Pki::new();
    let etcd = Etcd::start();
    let cluster = format!("tls{}", free_port());
    let worker_flags = pki.flags("worker");
    let (prefill, prefill_addr) = start_worker(&etcd, &cluster, "prefill", "prefill-0", &strs(&worker_flags));
    let mut decode_flags = worker_flags.clone();
    decode_flags
        .extend(["--no-shm", "--health-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"].map(String::from));
    let (decode, decode_addr) = start_worker(&etcd, &cluster, "decode", "decode-0", &strs(&decode_flags));
    let kv_addr = decode.addr_after("tandem: worker", "kv");
    let health_addr = decode.addr_after("tandem: health", "health");
    let metrics_url = decode.addr_after("tandem: metrics", "metrics");
    decode.wait_line("tandem: mutual TLS on gRPC and KV", Duration::from_secs(5));
    let (router, router_addr) = start_router(&etcd, &cluster, &strs(&pki.flags("router")));
    router.wait_line("tandem: mutual TLS to the workers", Duration::from_secs(5));
    for id in ["prefill-0", "decode-0"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // The same greedy text as one process without TLS, the KV over the TLS'd TCP plane.
        let mut c = client(&router_addr).await;
        let prompts = ["Name three primary colors.", "Why is the sky blue?"];
        for p in prompts {
            let got = stream(&mut c, chat(p, 32)).await.unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert_eq!(got.text, generate_reference(Some(p), None, 32), "chat {p:?}");
        }
        let metrics = http_get(&metrics_url);
        let received =
            sample(&metrics, &["tandem_kv_transfer_sessions_total{", "direction=\"received\"", "outcome=\"ok\""]);
        assert!(received.is_some_and(|n| n >= prompts.len() as f64), "KV sessions received: {received:?}\n{metrics}");
        let bytes = sample(&metrics, &["tandem_kv_transfer_bytes_total{", "direction=\"received\""]);
        assert!(bytes.is_some_and(|b| b > 0.0), "KV bytes received: {bytes:?}");
        assert_eq!(sample(&metrics, &["tandem_kv_transfer_failures_total{"]), None, "no failed transfer");

        // gRPC: a member's certificate is served; no certificate, another CA's, or plaintext is not.
        for addr in [&prefill_addr, &decode_addr] {
            stats_over_tls(&pki, addr, Some("router")).await.unwrap_or_else(|e| panic!("{addr}: a member: {e}"));
            let err = stats_over_tls(&pki, addr, Some("intruder")).await.expect_err("another CA's certificate");
            eprintln!("{addr}, another CA's certificate: {err}");
            let err = stats_over_tls(&pki, addr, None).await.expect_err("no client certificate");
            eprintln!("{addr}, no client certificate: {err}");
            let plain = match WorkerClient::connect(format!("http://{addr}")).await {
                Ok(mut w) => w.stats(pb::StatsRequest {}).await.map(|_| ()).map_err(|s| s.to_string()),
                Err(e) => Err(e.to_string()),
            };
            assert!(plain.is_err(), "{addr}: a plaintext client was served");
        }

        // The generic client (grpcurl's TLS flags) with a member's certificate is served; with
        // the cluster's CA but no certificate of its own it is refused.
        let p = |f: &str| pki.path(f).to_string_lossy().into_owned();
        let (ca, cert, key) = (p("ca.crt"), p("router.crt"), p("router.key"));
        let tls_flags = ["--cacert", &ca, "--servername", "tandem-worker", "--timeout", "20"];
        let stats_call = [&decode_addr[..], "tandem.worker.v1.Worker/Stats"];
        let token = format!("{}: {}", tandem_proto::auth::TOKEN_METADATA, cluster_token().expose());
        let member: Vec<&str> = tls_flags
            .iter()
            .chain(&["--cert", &cert, "--key", &key, "-H", &token])
            .chain(&stats_call)
            .copied()
            .collect();
        let (ok, out, err) = grpc_call(&member);
        assert!(ok && out.contains("\"kv_blocks_total\""), "grpc-call with a member's certificate: {out} {err}");
        let stranger: Vec<&str> = tls_flags.iter().chain(&stats_call).copied().collect();
        let (ok, out, err) = grpc_call(&stranger);
        assert!(!ok && err.contains("ERROR: "), "grpc-call without a client certificate: {out} {err}");

        // KV: the same. A member gets the receiver's answer (its layout differs: an Error frame).
        let answer = kv_hello_over_tls(&pki, &kv_addr, Some("worker")).await.expect("a member is answered");
        assert!(tandem_kvtransfer::wire::parse_header(&answer, 1 << 16).is_ok(), "a frame header: {answer:?}");
        let err = kv_hello_over_tls(&pki, &kv_addr, Some("intruder")).await.expect_err("another CA's certificate");
        assert!(err.contains("UnknownCA"), "{err}");
        let err = kv_hello_over_tls(&pki, &kv_addr, None).await.expect_err("no client certificate");
        assert!(err.contains("CertificateRequired"), "{err}");
        let sock = tokio::net::TcpStream::connect(&kv_addr).await.unwrap();
        assert!(hello(sock).await.is_err(), "a plaintext sender was answered");

        // Probes: plaintext grpc.health.v1, and nothing else, on the health port.
        let channel = Endpoint::from_shared(format!("http://{health_addr}")).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        assert_eq!(status.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        let other = WorkerClient::new(channel).stats(pb::StatsRequest {}).await;
        assert_eq!(other.expect_err("only health").code(), tonic::Code::Unimplemented);

        // Nothing is left behind on either worker.
        let end = Instant::now() + Duration::from_secs(10);
        for addr in [&prefill_addr, &decode_addr] {
            loop {
                let s = stats_over_tls(&pki, addr, Some("router")).await.unwrap();
                if (s.running, s.waiting, s.waiting_for_kv, s.kv_blocks_used) == (0, 0, 0, 0) {
                    break;
                }
                assert!(Instant::now() < end, "{addr} still holds something: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    drop((router, decode, prefill, etcd));
}
