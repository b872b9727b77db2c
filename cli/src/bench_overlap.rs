//! `tandem bench kvtransfer --overlap`: how much of a prefill's KV transfer
//! stays hidden behind its compute.
//!
//! For a prompt of N tokens it times: the prefill alone (T_c); the transfer of
//! that prompt's KV alone (T_t); and the prefill with each layer shipped as
//! soon as it is computed, until the receiver's verdict (T_o). The transfer
//! time that was not hidden is T_o - T_c; hidden = 1 - (T_o - T_c) / T_t.
//!
//! Each time is the best of `--repetitions` runs (a prefill varies by more
//! than a whole transfer takes on this machine).
//!
//! `--serve ADDR` runs only the receiving side (for a run across network
//! namespaces): it reserves request 1, 2, 3, ... in turn, sized by the same
//! schedule the sender follows (so give both the same `--tokens` and
//! `--repetitions`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_engine::kv_cache::{BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};
use tandem_kvtransfer::{HostKv, KvLayout, KvReceiver, KvSender, TcpConfig};
use tandem_prefill_worker::LayerShipper;
use tandem_proto::ids::ClusterRequestId;

pub struct OverlapArgs {
    pub repetitions: usize,
    pub model: std::path::PathBuf,
    pub threads: Option<usize>,
    pub connect: Option<std::net::SocketAddr>,
    pub serve: Option<std::net::SocketAddr>,
    pub tokens: Vec<usize>,
    pub json: bool,
}

const BLOCK: usize = 16;

fn layout_of(m: &Model) -> KvLayout {
    tandem_prefill_worker::kv_layout(m, BLOCK)
}

fn blocks_for(max_tokens: usize) -> usize {
    max_tokens.div_ceil(BLOCK)
}

/// Tokens of the transfer with request id `id` (1-based): per size, `2 * reps` sessions.
fn schedule(tokens: &[usize], reps: usize, id: u64) -> Option<usize> {
    tokens.get((id as usize - 1) / (2 * reps.max(1))).copied()
}

/// The receiving side: reserve request ids 1, 2, ... one after another.
pub fn serve(a: &OverlapArgs, addr: std::net::SocketAddr) -> Result<()> {
    let m = load(a)?;
    let n = blocks_for(*a.tokens.iter().max().context("a token count")?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let rx = KvReceiver::bind(addr, Arc::new(HostKv::new(layout_of(&m), n)), TcpConfig::default()).await?;
        eprintln!("serving KV on {}", rx.local_addr());
        for id in 1.. {
            let Some(t) = schedule(&a.tokens, a.repetitions, id) else { break };
            let blocks: Vec<BlockId> = (0..blocks_for(t) as u32).map(BlockId).collect();
            let res =
                rx.reserve(ClusterRequestId(id), &blocks, tokio::time::Instant::now() + Duration::from_secs(3600))?;
            match res.wait().await {
                Ok(a) => eprintln!("request {id}: {} tokens arrived", a.num_tokens),
                Err(e) => eprintln!("request {id}: {e}"),
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}

fn load(a: &OverlapArgs) -> Result<Model> {
    let mut opts = ModelOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    Ok(Model::load(&a.model, &opts)?)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 7919) % 40_000).collect()
}

pub fn run(a: &OverlapArgs) -> Result<()> {
    if let Some(addr) = a.serve {
        return serve(a, addr);
    }
    let m = load(a)?;
    let layout = layout_of(&m);
    let max_tokens = *a.tokens.iter().max().context("a token count")?;
    let n = blocks_for(max_tokens);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // A local receiver unless one was given (each reservation is made by `serve` there).
    let (local_rx, addr) = match a.connect {
        Some(addr) => (None, addr),
        None => {
            let rx = rt.block_on(KvReceiver::bind(
                "127.0.0.1:0".parse()?,
                Arc::new(HostKv::new(layout, n)),
                TcpConfig::default(),
            ))?;
            let addr = rx.local_addr();
            (Some(rx), addr)
        }
    };
    let sender = KvSender::new(layout, TcpConfig::default());
    let mut next_id = 1u64;
    let mut rows = Vec::new();
    if !a.json {
        println!(
            "| tokens | KV MB | prefill alone ms | transfer alone ms | prefill + layer-wise transfer ms | hidden |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    }
    for &t in &a.tokens {
        let nb = blocks_for(t);
        let src: Vec<BlockId> = (0..nb as u32).map(BlockId).collect();
        let dst = src.clone();
        let toks = tokens(t);
        let mut kv = KvCache::new(m.kv_shape(BLOCK), m.config.n_layers, n, KvDtype::F16)?;
        let mut scratch = Scratch::default();
        let mut batch = ForwardBatch::default();
        let s = batch.add_seq(&src);
        batch.add_tokens(s, &toks, 0, LogitsWanted::Last);
        let deadline = || tokio::time::Instant::now() + Duration::from_secs(600);
        let reserve = |id: u64| -> Result<Option<tandem_kvtransfer::Reservation>> {
            Ok(match &local_rx {
                Some(rx) => Some(rx.reserve(ClusterRequestId(id), &dst, deadline())?),
                None => None,
            })
        };

        // Prefill alone (after a warm-up run).
        m.forward(&batch, &mut kv, &mut scratch)?;
        let (mut t_c, mut t_t, mut t_o, mut bytes) = (f64::MAX, f64::MAX, f64::MAX, 0);
        for _ in 0..a.repetitions.max(1) {
            let t0 = Instant::now();
            m.forward(&batch, &mut kv, &mut scratch)?;
            t_c = t_c.min(t0.elapsed().as_secs_f64());

            // Transfer alone: the same layers, already computed.
            let res = reserve(next_id)?;
            let t0 = Instant::now();
            let mut shipper = LayerShipper::start(
                rt.handle(),
                rt.block_on(sender.open(addr, ClusterRequestId(next_id), deadline()))?,
                src.clone(),
                dst.clone(),
            );
            for layer in 0..m.config.n_layers {
                shipper.on_layer(layer, kv.layer_bytes(layer));
            }
            bytes = shipper.bytes;
            shipper.finish(rt.handle(), 1, t as u32)?;
            t_t = t_t.min(t0.elapsed().as_secs_f64());
            if let Some(r) = res {
                rt.block_on(r.wait())?;
            }
            next_id += 1;

            // Prefill with layer-wise transfer, until the receiver's verdict.
            let res = reserve(next_id)?;
            let t0 = Instant::now();
            let mut shipper = LayerShipper::start(
                rt.handle(),
                rt.block_on(sender.open(addr, ClusterRequestId(next_id), deadline()))?,
                src.clone(),
                dst.clone(),
            );
            m.forward_with_hook(&batch, &mut kv, &mut scratch, &mut |l, view| shipper.on_layer(l, view))?;
            shipper.finish(rt.handle(), 1, t as u32)?;
            t_o = t_o.min(t0.elapsed().as_secs_f64());
            if let Some(r) = res {
                rt.block_on(r.wait())?;
            }
            next_id += 1;
        }
        let hidden = (1.0 - (t_o - t_c).max(0.0) / t_t).clamp(0.0, 1.0);
        if !a.json {
            println!(
                "| {t} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0}% |",
                bytes as f64 / 1e6,
                t_c * 1e3,
                t_t * 1e3,
                t_o * 1e3,
                100.0 * hidden
            );
        }
        rows.push(serde_json::json!({
            "tokens": t, "kv_bytes": bytes, "prefill_ms": t_c * 1e3, "transfer_ms": t_t * 1e3,
            "overlapped_ms": t_o * 1e3, "hidden": hidden, "repetitions": a.repetitions,
        }));
    }
    if a.json {
        println!("{}", serde_json::json!({ "overlap": rows }));
    }
    Ok(())
}
