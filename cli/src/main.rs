//! The `tandem` command.
//!
//! - `tandem generate`: one prompt through the engine, text or JSON out.
//! - `tandem bench engine`: prefill and decode throughput of the engine.
//! - `tandem bench kvtransfer`: KV transfer over TCP and shared memory.

mod bench;
mod bench_kv;
mod bench_overlap;
mod generate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Tandem: disaggregated prefill/decode LLM serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from one prompt.
    Generate(generate::GenerateArgs),
    /// Measure performance.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench { what } => bench::run(what),
    };
    if let Err(e) = result {
        // One line, no backtrace: the message names what was wrong.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
