//! `tandem bench kvtransfer`: KV transfer throughput and latency over TCP
//! loopback and shared memory, next to this machine's memcpy bandwidth; with
//! `--tls-cert/--tls-key/--tls-ca`, also over TCP with mutual TLS (`tcp+tls`).
//!
//! KV is SmolLM2-shaped (30 layers, 3 KV heads, head dim 64, f16, blocks of
//! 16 tokens). Each session sends every layer of its blocks, then Finish, and
//! waits for the receiver's verdict; the receiver's reservation waits for the
//! arrival. Throughput counts KV bytes delivered per second of wall time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use tandem_kernels::BlockId;
use tandem_kvtransfer::{
    host_id, HostKv, KvDtypeWire, KvLayout, KvReceiver, KvSender, KvSink, KvTarget, LocalTarget, ShmKv, TcpConfig,
};
use tandem_proto::ids::ClusterRequestId;

#[derive(Args, Debug)]
pub struct KvBenchArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Repetitions per measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Largest request size in tokens.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Measure how much of a real prefill's layer-wise transfer hides behind its compute.
    #[arg(long)]
    pub overlap: bool,
    /// With --overlap: prompt sizes in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub tokens: Vec<usize>,
    /// With --overlap: send to a receiver started with --serve elsewhere.
    #[arg(long)]
    pub connect: Option<std::net::SocketAddr>,
    /// With --overlap: run only the receiving side on this address.
    #[arg(long)]
    pub serve: Option<std::net::SocketAddr>,
    /// Model (for --overlap).
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: std::path::PathBuf,
    /// Kernel threads (for --overlap).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also measure TCP with mutual TLS, both ends presenting this certificate (it must
    /// name --tls-server-name).
    #[command(flatten)]
    pub tls: crate::serve::TlsFlags,
}

pub(crate) fn layout() -> KvLayout {
    KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16, dtype: KvDtypeWire::F16, fingerprint: 1 }
}

/// Single-threaded memcpy bandwidth of a 256 MiB buffer, GB/s.
fn memcpy_gbps() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&dst);
    best
}

pub(crate) struct Setup {
    pub(crate) rx: Arc<KvReceiver>,
    target: KvTarget,
}

pub(crate) async fn setup(shm: bool, n_blocks: usize, cfg: &TcpConfig) -> Result<Setup> {
    let l = layout();
    let sink: Arc<dyn KvSink> =
        if shm { Arc::new(ShmKv::create(l, n_blocks)?) } else { Arc::new(HostKv::new(l, n_blocks)) };
    let rx = KvReceiver::bind("127.0.0.1:0".parse()?, sink, cfg.clone()).await?;
    let local = if shm {
        let uds = rx.listen_shm(TcpConfig::default())?;
        Some(LocalTarget { uds, host: host_id() })
    } else {
        None
    };
    Ok(Setup { target: KvTarget { tcp: rx.local_addr(), local }, rx })
}

/// Sends `sessions` requests of `tokens` tokens at once; returns (seconds, bytes).
pub(crate) async fn run_once(
    s: &Setup,
    tx: &Arc<KvSender>,
    sessions: usize,
    tokens: usize,
    base_id: u64,
) -> Result<(f64, usize)> {
    let l = layout();
    let blocks_per = tokens.div_ceil(l.block_size as usize);
    let layer_bytes = blocks_per * l.layer_block_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut waits = Vec::new();
    let mut sends = Vec::new();
    let t0 = Instant::now();
    for i in 0..sessions {
        let id = ClusterRequestId(base_id + i as u64);
        let blocks: Vec<BlockId> = (0..blocks_per).map(|b| BlockId((i * blocks_per + b) as u32)).collect();
        waits.push(s.rx.reserve(id, &blocks, deadline)?);
        let (tx, target) = (tx.clone(), s.target.clone());
        sends.push(tokio::spawn(async move {
            let mut sess = tx.open_target(&target, id, deadline).await?;
            // The prefill worker's gathered layer: borrowed, as the engine would lend it.
            let layer = vec![7u8; layer_bytes];
            for li in 0..l.n_layers {
                sess.send_layer_from(li, &blocks, &layer).await?;
            }
            sess.finish(1, tokens as u32).await
        }));
    }
    for h in sends {
        h.await?.context("send")?;
    }
    for w in waits {
        w.wait().await.context("receive")?;
    }
    Ok((t0.elapsed().as_secs_f64(), sessions * blocks_per * l.block_bytes()))
}

pub fn run(a: KvBenchArgs) -> Result<()> {
    if a.overlap || a.serve.is_some() {
        return crate::bench_overlap::run(&crate::bench_overlap::OverlapArgs {
            model: a.model.clone(),
            threads: a.threads,
            connect: a.connect,
            serve: a.serve,
            tokens: a.tokens.clone(),
            json: a.json,
            repetitions: a.repetitions,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: KvBenchArgs) -> Result<()> {
    let mut transports = vec![("tcp", false, TcpConfig::default()), ("shm", true, TcpConfig::default())];
    if let Some(files) = a.tls.files()? {
        let tls = tandem_proto::tls::MutualTls::load(&files)?;
        tls.check_server_name()?;
        transports.push(("tcp+tls", false, TcpConfig { tls: Some(tls), ..TcpConfig::default() }));
    }
    let memcpy = memcpy_gbps();
    let sizes: Vec<usize> = [256, 1024, 4096].into_iter().filter(|&t| t <= a.max_tokens).collect();
    let max_blocks = 16 * a.max_tokens.div_ceil(16);
    let mut json = serde_json::json!({ "memcpy_gbps": memcpy });
    if !a.json {
        println!("memcpy: {memcpy:.2} GB/s (one thread)");
        println!("| transport | tokens | sessions | GB/s | % memcpy | ms per request |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    }
    let mut next_id = 1u64;
    for (name, shm, cfg) in transports {
        let s = setup(shm, max_blocks, &cfg).await?;
        let tx = Arc::new(KvSender::new(layout(), cfg));
        let mut entry = serde_json::Map::new();
        for &tokens in &sizes {
            for sessions in [1usize, 16] {
                let mut best: Option<(f64, usize)> = None;
                for _ in 0..a.repetitions.max(1) {
                    let r = run_once(&s, &tx, sessions, tokens, next_id).await?;
                    next_id += sessions as u64;
                    if best.is_none_or(|b| r.0 < b.0) {
                        best = Some(r);
                    }
                }
                let (secs, bytes) = best.expect("at least one repetition");
                let gbps = bytes as f64 / secs / 1e9;
                let ms = secs * 1e3 / if sessions == 1 { 1.0 } else { sessions as f64 };
                if !a.json {
                    println!(
                        "| {name} | {tokens} | {sessions} | {gbps:.2} | {:.0}% | {:.2}{} |",
                        100.0 * gbps / memcpy,
                        if sessions == 1 { secs * 1e3 } else { ms },
                        if sessions == 1 { "" } else { " (amortized)" }
                    );
                }
                if sessions == 16 && tokens == *sizes.last().expect("a size") {
                    entry.insert("gbps".into(), gbps.into());
                }
                if sessions == 1 && tokens == 1024 {
                    entry.insert("latency_ms_1024".into(), (secs * 1e3).into());
                }
                entry.insert(format!("gbps_{tokens}_x{sessions}"), gbps.into());
            }
        }
        if let Some(src) = tx.fallbacks().checked_sub(0).filter(|&f| f > 0) {
            entry.insert("fallbacks".into(), src.into());
        }
        json[name] = entry.into();
        tx.shutdown().await;
        s.rx.shutdown();
    }
    if a.json {
        println!("{json}");
    }
    Ok(())
}
