//! The `ordo-projector` command line, as a function: the shipped binary calls it with no custom
//! projections, and a binary of your own calls it with projections written in Rust (see
//! `examples/custom_projection.rs`), keeping every subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ordo_core::cli::{config_path, load_config, Loaded};
use ordo_projection::Projection;

use crate as ordo_projector;
use crate::ProjectorError;

/// Accepts Service Bus sessions (one session = one aggregate) and applies each aggregate's
/// events, in order, to MongoDB read models.
#[derive(Debug, Parser)]
#[command(name = "ordo-projector", version)]
struct Cli {
    /// TOML configuration file (also `ORDO_CONFIG`); `ORDO__SECTION__KEY` overrides it.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration, print it with secrets as ***, and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Re-project one aggregate (or every blocked one) from the events collection and unblock
    /// it.
    #[command(group(
        clap::ArgGroup::new("which").required(true).args(["aggregate", "all_blocked"])
    ))]
    Repair {
        /// The aggregate id.
        #[arg(long)]
        aggregate: Option<String>,
        /// Every aggregate in `ordo_blocked`, one at a time; those that still fail stay blocked
        /// and are listed, and the command then exits non-zero.
        #[arg(long)]
        all_blocked: bool,
        /// Only this projection (default: every projection that selects the aggregate).
        #[arg(long)]
        projection: Option<String>,
    },
    /// Show checkpoint age, producer lag, projectors and sessions held, blocked aggregates,
    /// parked events and the dead-letter depth of a running deployment.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay the events collection into a shadow collection and swap it in.
    Rebuild {
        /// The projection to rebuild.
        #[arg(long)]
        projection: String,
        /// Swap in even when some aggregates could not be folded; they are blocked for
        /// `repair`. Without it such a rebuild changes nothing and fails, naming them.
        #[arg(long)]
        allow_blocked: bool,
    },
    /// Catch up every aggregate whose read model is behind the events collection (blocked ones are
    /// reported, not touched). Incremental after the first run.
    Reconcile {
        /// Check every aggregate, not only those with events since the last run.
        #[arg(long)]
        full: bool,
    },
}

/// The application name of the one-shot subcommands, so they can be told apart from the daemon
/// in the server's logs and `currentOp`.
const ADMIN_APP_NAME: &str = "ordo-projector-admin";

/// Runs the command line with the declarative projections of `projections_file` plus
/// `custom` ones written in Rust; returns the process's exit status.
pub fn main_with(custom: Vec<Arc<dyn Projection>>) -> ExitCode {
    let cli = Cli::parse();
    let cfg = match load_config::<ordo_projector::ProjectorConfig>(
        "ordo-projector",
        config_path(cli.config).as_deref(),
        false,
    ) {
        Loaded::Run(cfg) => cfg,
        Loaded::Exit(code) => return code,
    };
    if cli.check_config {
        return check_config(&cfg, custom);
    }
    let runtime = ordo_core::cli::runtime().expect("tokio runtime");
    match runtime.block_on(run_command(cli.command, cfg, custom)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ordo-projector: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the daemon (no subcommand) or one subcommand to its end.
async fn run_command(
    command: Option<Command>,
    cfg: ordo_projector::ProjectorConfig,
    custom: Vec<Arc<dyn Projection>>,
) -> Result<(), ProjectorError> {
    match command {
        None => ordo_projector::run_with(cfg, custom).await,
        Some(Command::Status { json }) => ordo_projector::status(&cfg, json).await,
        Some(Command::Repair {
            aggregate: Some(aggregate),
            projection,
            ..
        }) => {
            let admin = Admin::open(&cfg, custom).await?;
            let (store, projections) = (&admin.store, &admin.projections);
            let done = ordo_projector::repair::repair(
                store,
                projections,
                &aggregate,
                projection.as_deref(),
            )
            .await;
            if done.is_ok() {
                clear_session_states(&cfg, &[aggregate]).await;
            }
            admin.finish(done).await
        }
        Some(Command::Repair {
            aggregate: None,
            projection,
            ..
        }) => {
            let admin = Admin::open(&cfg, custom).await?;
            let (store, projections) = (&admin.store, &admin.projections);
            let done =
                ordo_projector::repair::repair_blocked(store, projections, projection.as_deref())
                    .await;
            let done = match done {
                Ok(report) => {
                    let lifted = report.repaired.clone();
                    let done = print_still_blocked(report);
                    clear_session_states(&cfg, &lifted).await;
                    done
                }
                Err(e) => Err(e),
            };
            admin.finish(done).await
        }
        Some(Command::Rebuild {
            projection,
            allow_blocked,
        }) => {
            let admin = Admin::open(&cfg, custom).await?;
            let (store, projections) = (&admin.store, &admin.projections);
            let blocked = &cfg.projector.blocked_collection;
            let done = ordo_projector::rebuild::rebuild(
                store,
                projections,
                &projection,
                blocked,
                allow_blocked,
            )
            .await
            .map(|rebuilt| print!("{rebuilt}"));
            admin.finish(done).await
        }
        Some(Command::Reconcile { full }) => {
            let admin = Admin::open(&cfg, custom).await?;
            let done = ordo_projector::reconcile::reconcile(&admin.store, &admin.projections, full)
                .await
                .map(|report| print!("{report}"))
                .map_err(ProjectorError::from);
            admin.finish(done).await
        }
    }
}

/// Clears the session state of the aggregates whose block was lifted; one that cannot be
/// cleared is reported, and the repair stands (`ordo_blocked` is the record, the state only
/// mirrors it).
async fn clear_session_states(cfg: &ordo_projector::ProjectorConfig, lifted: &[String]) {
    for (id, e) in ordo_projector::blocked_state::clear(cfg, lifted).await {
        eprintln!(
            "ordo-projector: {id}: the block is lifted, but its session state could not be \
             cleared and may still say blocked ({e}); it is only informational"
        );
    }
}

/// Prints what `repair --all-blocked` did; an error when some aggregates are still blocked.
fn print_still_blocked(
    report: ordo_projector::repair::BlockedRepair,
) -> Result<(), ProjectorError> {
    print!("{report}");
    match report.failed.len() {
        0 => Ok(()),
        n => Err(ProjectorError::StillBlocked(n)),
    }
}

/// What a one-shot subcommand (`repair`, `rebuild`, `reconcile`) works with: the projections,
/// and a store on a client of its own, named [`ADMIN_APP_NAME`].
struct Admin {
    client: mongodb::Client,
    store: ordo_projector::Store,
    projections: Vec<Arc<dyn Projection>>,
}

impl Admin {
    /// Starts logging, loads the projections and connects.
    async fn open(
        cfg: &ordo_projector::ProjectorConfig,
        custom: Vec<Arc<dyn Projection>>,
    ) -> Result<Self, ProjectorError> {
        ordo_core::telemetry::init_logging(&cfg.telemetry);
        let projections = ordo_projector::load_projections_with(cfg, custom)?;
        let client = ordo_core::mongo::connect(&cfg.mongodb, ADMIN_APP_NAME)
            .await
            .map_err(ProjectorError::Connect)?;
        let store = ordo_projector::Store::new(
            client.database(cfg.mongodb.database()),
            &cfg.mongodb.events_collection,
            &cfg.projector.blocked_collection,
            cfg.mongodb.fields.clone(),
        );
        Ok(Self {
            client,
            store,
            projections,
        })
    }

    /// Closes the client and returns what the subcommand came to.
    async fn finish(self, done: Result<(), ProjectorError>) -> Result<(), ProjectorError> {
        ordo_core::mongo::close(self.client).await;
        done
    }
}

/// `--check-config`: the configuration and the projections file it names, both validated
/// without opening a connection, so a broken projections file fails the check, not the start.
fn check_config(
    cfg: &ordo_projector::ProjectorConfig,
    custom: Vec<Arc<dyn Projection>>,
) -> ExitCode {
    match ordo_projector::load_projections_with(cfg, custom) {
        Ok(projections) => {
            println!("# ordo-projector: configuration is valid");
            print!("{}", ordo_core::config::render(cfg));
            let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
            println!(
                "# projections ({} and custom): {}",
                cfg.projector.projections_file.display(),
                names.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ordo-projector: config error: {e}");
            ExitCode::from(ordo_core::cli::EXIT_CONFIG)
        }
    }
}
