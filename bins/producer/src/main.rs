// The release build computes the layout of the readiness probe's future, generic over the
// publisher factory, deeper than the default limit of 128 queries.
#![recursion_limit = "256"]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ordo_core::cli::{config_path, load_config, Loaded};

/// The change-stream reader and the senders allocate and free many small buffers per event:
/// with glibc malloc the producer spent 18-25 % more CPU per event (`ordo-bench`, hot and churn
/// shapes, 2 cores). Built with `no_thp`: mimalloc then does not ask for transparent huge pages,
/// which back its arena in 2 MiB pages and raised the producer's peak RSS from 39-43 MiB to
/// 54-58 MiB in the same runs, at the same CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tails the MongoDB change stream of the events collection and publishes every event to a
/// partitioned Service Bus topic (SessionId = PartitionKey = aggregateId).
#[derive(Debug, Parser)]
#[command(name = "ordo-producer", version)]
struct Cli {
    /// TOML configuration file (also `ORDO_CONFIG`); `ORDO__SECTION__KEY` overrides it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it with secrets as ***, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match load_config::<ordo_producer::ProducerConfig>(
        "ordo-producer",
        config_path(cli.config).as_deref(),
        cli.check_config,
    ) {
        Loaded::Run(cfg) => cfg,
        Loaded::Exit(code) => return code,
    };
    let runtime = ordo_core::cli::runtime().expect("tokio runtime");
    match runtime.block_on(ordo_producer::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ordo-producer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
