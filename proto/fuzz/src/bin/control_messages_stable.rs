//! The `control_messages` fuzz target on stable Rust, without libFuzzer: a seeded
//! mutation loop over valid encoded requests (see `tandem_proto_fuzz`), bounded in
//! time and/or executions. Mutated inputs that still decode as a `GenerateRequest`
//! join the pool (a crude stand-in for coverage feedback), so mutations build on each other.
//!
//!   control_messages_stable [--seconds S] [--max-execs N] [--seed X] [--corpus DIR] [--write-seeds DIR]
//!
//! `--corpus DIR` also runs every file of DIR (e.g. a cargo-fuzz corpus) first.
//! `--write-seeds DIR` writes the seeds into DIR (to start a libFuzzer corpus) and exits.
//! On a failed check the input is written to `artifacts/control_messages_stable-crash-<seed>-<n>`
//! before the panic propagates. Prints `executions: N` at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use prost::Message;
use tandem_proto::tandem::v1 as api;
use tandem_proto_fuzz::{check, facts, mutate, seeds, Rng};

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

/// Runs `check`, saving the input if it panics.
fn run(data: &[u8], seed: u64, n: u64) {
    if let Err(e) = std::panic::catch_unwind(|| check(data)) {
        let dir = PathBuf::from("artifacts");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("control_messages_stable-crash-{seed}-{n}"));
        let _ = std::fs::write(&path, data);
        eprintln!("check failed on execution {n} (seed {seed}); input saved to {}", path.display());
        std::panic::resume_unwind(e);
    }
}

fn main() {
    let args = parse_args();
    let base = seeds();
    if let Some(dir) = &args.write_seeds {
        std::fs::create_dir_all(dir).expect("create the seed directory");
        for (i, s) in base.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("write a seed");
        }
        println!("wrote {} seeds to {}", base.len(), dir.display());
        return;
    }
    println!("validation with the model: {}", if facts().is_some() { "yes" } else { "no (model file missing)" });
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut execs: u64 = 0;
    if let Some(dir) = &args.corpus {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Ok(data) = std::fs::read(e.path()) {
                    run(&data, args.seed, execs);
                    execs += 1;
                }
            }
        }
        println!("corpus: {execs} inputs from {}", dir.display());
    }

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
            mutate(&mut rng, &mut buf, &base);
            buf.truncate(1 << 16);
            run(&buf, args.seed, execs);
            execs += 1;
            // Keep inputs that still decode as a request: new material for later mutations.
            if api::GenerateRequest::decode(&buf[..]).is_ok() {
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
        "control_messages_stable: seed {} ran {:.1} s, {} decodable inputs kept, {:.0} execs/s",
        args.seed,
        secs,
        kept,
        execs as f64 / secs.max(1e-9)
    );
    println!("executions: {execs}");
}
