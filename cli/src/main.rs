//! The `tandem` command.
//!
//! - `tandem up`: router + prefill and decode workers on this machine (a pool per model),
//!   serving gRPC and HTTP.
//! - `tandem router` / `tandem prefill` / `tandem decode`: one role per process (etcd).
//! - `tandem worker set-role`: changes an elastic worker's role while it runs.
//! - `tandem generate`: one prompt through the engine, text or JSON out.
//! - `tandem bench engine`: prefill and decode throughput of the engine.
//! - `tandem bench kvtransfer`: KV transfer over TCP and shared memory.
//!
//! Every command logs to stderr (`--log-level`, `--log-format`, `RUST_LOG`: `logging`).

mod bench;
mod bench_guide;
mod bench_index;
mod bench_kv;
mod bench_migrate;
mod bench_overlap;
mod bench_serve;
mod cluster_token;
mod generate;
mod logging;
mod model_flags;
mod predictor;
mod profile;
mod prompt_mix;
mod serve;
mod sim;
mod up;
mod worker_admin;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Tandem: disaggregated prefill/decode LLM serving")]
struct Cli {
    #[command(flatten)]
    log: logging::LogFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a router with prefill and decode workers on this machine and serve until SIGTERM.
    Up(up::UpArgs),
    /// Run the router alone: the public gRPC API, finding workers through etcd.
    Router(serve::RouterArgs),
    /// Run one prefill worker, registered in etcd.
    Prefill(serve::WorkerArgs),
    /// Run one decode worker (role decode, or both), registered in etcd.
    Decode(serve::WorkerArgs),
    /// Calls on one running worker (change an elastic worker's role).
    Worker {
        #[command(subcommand)]
        what: worker_admin::WorkerCommand,
    },
    /// Generate text from one prompt.
    Generate(generate::GenerateArgs),
    /// The router's output-length predictor (for shortest-job-first scheduling).
    Predictor {
        #[command(subcommand)]
        what: predictor::PredictorCommand,
    },
    /// Measure this machine's cost models (engine steps, KV transfer, the router) for `tandem sim`.
    Profile(profile::ProfileArgs),
    /// Simulate a cluster on cost models: a workload's TTFT, TPOT and goodput, or (--search)
    /// the prefill/decode split with the most goodput per worker.
    Sim(Box<sim::SimArgs>),
    /// Measure performance.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = cli.log.install().and_then(|()| match cli.command {
        Command::Up(args) => up::up(args),
        Command::Router(args) => serve::router(args),
        Command::Prefill(args) => serve::worker(args, tandem_cluster::Role::Prefill),
        Command::Decode(args) => serve::worker(args, tandem_cluster::Role::Decode),
        Command::Worker { what } => worker_admin::run(what),
        Command::Generate(args) => generate::run(args),
        Command::Predictor { what } => predictor::run(what),
        Command::Bench { what } => bench::run(what),
        Command::Profile(args) => profile::run(args),
        Command::Sim(args) => sim::run(*args),
    });
    if let Err(e) = result {
        // One line, no backtrace: the message names what was wrong.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
