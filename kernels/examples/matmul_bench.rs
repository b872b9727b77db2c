//! Quantized matmul throughput per compute layout: one matmul of Qwen2.5-0.5B's FFN
//! shapes (4864x896 and 896x4864) at n = 1 (decode) and n = 64 (prefill), median of
//! many runs. Each run reads a different copy of the matrix, and the copies together
//! exceed the last-level cache, so n = 1 measures what decode pays: weight bytes
//! streamed from memory.
//!
//! `cargo run --release -p tandem-kernels --example matmul_bench -- [TYPE] [ISA] [THREADS]`
//! (defaults: Q5_0, the best ISA, 2 threads). Prints, per layout the type fits, the
//! median time, bits per weight, the weight bytes read per second, and for scale the
//! plain read bandwidth of the pool's threads summing as many bytes.

use std::time::{Duration, Instant};

use half::f16;
use tandem_kernels::packed::Bits;
use tandem_kernels::quant::SUPPORTED;
use tandem_kernels::{matmul, GgmlType, Isa, QuantizedActs, ThreadPool, Weights};

/// Bytes the runs cycle through: eight times the last-level cache (32 MiB here).
/// A fourth argument sets it in MiB (small values measure cache-resident speed).
const WORKING_SET: usize = 256 << 20;
/// Time spent per layout and batch size.
const BUDGET: Duration = Duration::from_millis(1500);

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// Random blocks of `t` with plausible f16 scales where the format keeps them.
fn tensor(t: GgmlType, rows: usize, cols: usize, rng: &mut Lcg) -> Vec<u8> {
    let (be, bb) = t.block();
    let scales: &[usize] = match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::F32 | GgmlType::F16 => panic!("{} is not quantized", t.name()),
    };
    let mut out = vec![0u8; rows * cols / be * bb];
    for blk in out.chunks_exact_mut(bb) {
        for b in blk.iter_mut() {
            *b = rng.next() as u8;
        }
        for &at in scales {
            let v = 0.001 + (rng.next() % 1000) as f32 * 1e-5;
            blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    out
}

/// Sums `bytes` as u64 words split over the pool: the plain read bandwidth the
/// kernels are measured against.
fn read_all(pool: &ThreadPool, threads: usize, bytes: &[u8]) -> u64 {
    let words: Vec<std::sync::atomic::AtomicU64> = (0..threads).map(|_| Default::default()).collect();
    pool.run(|tid, nt| {
        let chunk = bytes.len().div_ceil(nt);
        let part = &bytes[(tid * chunk).min(bytes.len())..((tid + 1) * chunk).min(bytes.len())];
        let sum = part.chunks_exact(8).fold(0u64, |a, c| a.wrapping_add(u64::from_le_bytes(c.try_into().unwrap())));
        words[tid].store(sum, std::sync::atomic::Ordering::Relaxed);
    });
    words.iter().map(|w| w.load(std::sync::atomic::Ordering::Relaxed)).fold(0, u64::wrapping_add)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let t = match args.first() {
        Some(name) => *SUPPORTED.iter().find(|t| t.name().eq_ignore_ascii_case(name)).expect("unknown type"),
        None => GgmlType::Q5_0,
    };
    let isa = args.get(1).map(|s| Isa::parse(s).expect("isa: scalar, avx2 or avx512")).unwrap_or_else(Isa::detect);
    let isa = isa.or_best();
    let threads: usize = args.get(2).map(|s| s.parse().expect("threads")).unwrap_or(2);
    let working_set = args.get(3).map_or(WORKING_SET, |s| s.parse::<usize>().expect("MiB") << 20);
    let pool = ThreadPool::new(threads);
    println!(
        "{} on {}, {threads} threads; median of runs over a {} MiB working set",
        t.name(),
        isa.name(),
        working_set >> 20
    );
    println!(
        "{:>10} {:>6} {:>4} {:>10} {:>7} {:>7} {:>7} {:>11}",
        "shape", "layout", "n", "median", "bits/w", "GB/s", "GMAC/s", "read GB/s"
    );
    let buf: Vec<u8> = (0..working_set.max(16 << 20)).map(|i| i as u8).collect();
    let mut rng = Lcg(1);
    for (rows, cols) in [(4864, 896), (896, 4864)] {
        let raw = tensor(t, rows, cols, &mut rng);
        // Per layout the type fits: its copies and the bytes of one.
        let mut layouts = Vec::new();
        for bits in [Bits::Four, Bits::Five, Bits::Eight] {
            let Ok(first) = Weights::from_ggml_as(t, &raw, rows, cols, bits) else { continue };
            let bytes = first.nbytes();
            let mut ws = vec![first];
            while ws.len() < working_set.div_ceil(bytes) {
                let raw = tensor(t, rows, cols, &mut rng);
                ws.push(Weights::from_ggml_as(t, &raw, rows, cols, bits).unwrap());
            }
            layouts.push((bits, ws, bytes));
        }
        for n in [1, 64] {
            let x: Vec<f32> = (0..n * cols).map(|_| (rng.next() % 2000) as f32 / 1000.0 - 1.0).collect();
            let mut xq = QuantizedActs::new();
            xq.quantize(&pool, isa, &x, n, cols);
            let mut out = vec![0f32; n * rows];
            // Round robin over (layout, matmul or plain read) so that whatever else
            // runs on the machine slows every variant alike.
            let mut times = vec![(Vec::new(), Vec::new()); layouts.len()];
            let start = Instant::now();
            let (mut i, mut read_at) = (0, 0);
            while start.elapsed() < BUDGET * layouts.len() as u32 * 2 || i < 11 {
                for ((_, ws, bytes), (mm, rd)) in layouts.iter().zip(&mut times) {
                    let t0 = Instant::now();
                    matmul(&pool, isa, &ws[i % ws.len()], &x, &xq, n, &mut out);
                    mm.push(t0.elapsed());
                    // The next `bytes` of the buffer, so that no read finds its bytes cached.
                    if read_at + bytes > buf.len() {
                        read_at = 0;
                    }
                    let t0 = Instant::now();
                    std::hint::black_box(read_all(&pool, threads, &buf[read_at..read_at + bytes]));
                    read_at += bytes;
                    rd.push(t0.elapsed());
                }
                i += 1;
            }
            for ((bits, _, bytes), (mm, rd)) in layouts.iter().zip(times) {
                let (m, read) = (median(mm).as_secs_f64(), median(rd).as_secs_f64());
                println!(
                    "{:>10} {:>6} {n:>4} {:>8.1}us {:>7.2} {:>7.2} {:>7.1} {:>11.2}",
                    format!("{rows}x{cols}"),
                    format!("{bits:?}"),
                    m * 1e6,
                    *bytes as f64 * 8.0 / (rows * cols) as f64,
                    *bytes as f64 / m / 1e9,
                    (rows * cols * n) as f64 / m / 1e9,
                    *bytes as f64 / read / 1e9,
                );
            }
        }
    }
}
