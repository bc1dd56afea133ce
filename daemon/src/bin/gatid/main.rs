//! `gatid`: the gati node daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatid::node::{self, NodeError};

mod bench;

#[derive(Parser)]
#[command(name = "gatid", version, about = "gati per-node DNN serving daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a config file until SIGTERM.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and report every problem; exit 78 if invalid.
    CheckConfig { config: PathBuf },
    /// Run a benchmark (prints a table, writes JSON under bench/results/).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Socket floor vs gatid ping vs model through gatid vs ORT in-process.
    Serving(bench::serving::Args),
    /// No cache vs learned vs k-NN caches on real streams, through the socket.
    Caches(bench::caches::Args),
    /// Deadline-aware DAG dispatch vs an OpenWhisk-style baseline, open-loop trace.
    Dispatch(bench::dispatch::Args),
    /// Max-softmax vs the learned selector, replaying recorded streams offline.
    Selector(bench::selector::Args),
    /// Themis GPU auctions vs fair share, LAS, packing, Gavel FTF on cluster traces (simulated).
    Auction(bench::auction::Args),
    /// A long mixed load with hostile clients: every answer checked, RSS and fds watched.
    Soak(bench::soak::Args),
    /// UDP DAG round trips: kernel (eBPF) vs userspace steering vs one SGS; in-kernel cost.
    Steer(bench::steer::Args),
    /// The GPU path against its CPU references and ONNX Runtime (tests/hil/gpu.sh).
    Gpu(bench::gpu::Args),
    /// The socket-floor echo server the serving benchmark starts (internal).
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    gatid::node::tune_allocator();
    gatid::telemetry::init_logging();
    let cli = Cli::parse();
    match main_exec(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(MainError::Node(e)) => {
            eprintln!("gatid: {e}");
            ExitCode::from(match e {
                NodeError::Config(_) => gatid::EXIT_CONFIG,
                NodeError::Models(_) => gatid::EXIT_MODEL,
                NodeError::Runtime(_) => gatid::EXIT_RUNTIME,
                NodeError::ThreadDied(_) => gatid::EXIT_SOFTWARE,
                _ => 1,
            })
        }
        Err(MainError::Other(e)) => {
            eprintln!("gatid: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum MainError {
    Node(NodeError),
    Other(anyhow::Error),
}

fn main_exec(cli: Cli) -> Result<(), MainError> {
    match cli.command {
        Command::Serve { config } => node::serve(&config).map_err(MainError::Node),
        Command::CheckConfig { config } => {
            let c = gatid::config::load(&config).map_err(|e| MainError::Node(e.into()))?;
            println!("{}: OK ({} model(s))", config.display(), c.models.len());
            Ok(())
        }
        Command::Bench { which: BenchCommand::Serving(args) } => bench::serving::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Caches(args) } => bench::caches::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Dispatch(args) } => bench::dispatch::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Selector(args) } => bench::selector::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Soak(args) } => bench::soak::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Steer(args) } => bench::steer::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Gpu(args) } => bench::gpu::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::Auction(args) } => bench::auction::run(args).map_err(MainError::Other),
        Command::Bench { which: BenchCommand::EchoServer { socket } } => {
            bench::serving::echo_server(&socket).map_err(MainError::Other)
        }
    }
}
