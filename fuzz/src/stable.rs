//! The stable-Rust fuzzing loop, shared by every `*_stable` binary (the KV frame decoder's and
//! the control messages'): a seeded mutation loop without libFuzzer, bounded in time and/or
//! executions. Inputs the target calls interesting (`keep`: they still decode) join the
//! pool, a crude stand-in for coverage feedback, so mutations build on each other.
//!
//!   NAME [--seconds S] [--max-execs N] [--seed X] [--corpus DIR] [--write-seeds DIR]
//!
//! `--corpus DIR` also runs every file of DIR (e.g. a cargo-fuzz corpus) first.
//! `--write-seeds DIR` writes the seeds into DIR (to start a libFuzzer corpus) and exits.
//! On a failed check the input is written to `artifacts/NAME-crash-<seed>-<n>` before the
//! panic propagates. Prints `executions: N` at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One fuzz target as the loop drives it.
pub struct Target {
    /// The binary's name: in its messages and crash files.
    pub name: &'static str,
    /// Valid inputs to start from (and splice material for `mutate`).
    pub seeds: Vec<Vec<u8>>,
    /// Applies random mutations to an input; the slice is the seeds.
    pub mutate: fn(&mut Rng, &mut Vec<u8>, &[Vec<u8>]),
    /// Panics when the code under test misbehaves on the input.
    pub check: fn(&[u8]),
    /// Whether a mutated input joins the pool.
    pub keep: fn(&[u8]) -> bool,
}

struct Args {
    seconds: f64,
    max_execs: u64,
    seed: u64,
    corpus: Option<PathBuf>,
    write_seeds: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args { seconds: 10.0, max_execs: u64::MAX, seed: 0x5eed, corpus: None, write_seeds: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => a.seconds = value().parse().expect("--seconds: a number"),
            "--max-execs" => a.max_execs = value().parse().expect("--max-execs: an integer"),
            "--seed" => a.seed = value().parse().expect("--seed: an integer"),
            "--corpus" => a.corpus = Some(PathBuf::from(value())),
            "--write-seeds" => a.write_seeds = Some(PathBuf::from(value())),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Runs `t.check`, saving the input if it panics.
fn run(t: &Target, data: &[u8], seed: u64, n: u64) {
    if let Err(e) = std::panic::catch_unwind(|| (t.check)(data)) {
        let dir = PathBuf::from("artifacts");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}-crash-{seed}-{n}", t.name));
        let _ = std::fs::write(&path, data);
        eprintln!("check failed on execution {n} (seed {seed}); input saved to {}", path.display());
        std::panic::resume_unwind(e);
    }
}

/// The binary's `main`: parses the command line above and runs `t`.
pub fn main(t: Target) {
    let args = parse_args();
    if let Some(dir) = &args.write_seeds {
        std::fs::create_dir_all(dir).expect("create the seed directory");
        for (i, s) in t.seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("write a seed");
        }
        println!("wrote {} seeds to {}", t.seeds.len(), dir.display());
        return;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut execs: u64 = 0;
    if let Some(dir) = &args.corpus {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Ok(data) = std::fs::read(e.path()) {
                    run(&t, &data, args.seed, execs);
                    execs += 1;
                }
            }
        }
        println!("corpus: {execs} inputs from {}", dir.display());
    }

    let base = &t.seeds;
    let mut pool = base.clone();
    const POOL_MAX: usize = 4096;
    let mut rng = Rng::new(args.seed);
    let mut kept: u64 = 0;
    let start = Instant::now();
    'outer: loop {
        // Check the clock every 256 executions.
        for _ in 0..256 {
            if execs >= args.max_execs {
                break 'outer;
            }
            let mut buf = pool[rng.below(pool.len())].clone();
            (t.mutate)(&mut rng, &mut buf, base);
            buf.truncate(1 << 16);
            run(&t, &buf, args.seed, execs);
            execs += 1;
            if (t.keep)(&buf) {
                kept += 1;
                if pool.len() < POOL_MAX {
                    pool.push(buf);
                } else {
                    let i = base.len() + rng.below(POOL_MAX - base.len());
                    pool[i] = buf;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}: seed {} ran {:.1} s, {} decodable inputs kept, {:.0} execs/s",
        t.name,
        args.seed,
        secs,
        kept,
        execs as f64 / secs.max(1e-9)
    );
    println!("executions: {execs}");
}

/// A small deterministic PRNG (xorshift64*), so that a run is reproducible from its seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}
