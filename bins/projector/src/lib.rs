//! ordo-projector: accepts Service Bus sessions (one session = one aggregate) and applies each
//! aggregate's events, in order, to MongoDB read models.

pub mod config;

pub use config::ProjectorConfig;

/// Runs the projector until shutdown.
pub async fn run(cfg: ProjectorConfig) -> anyhow::Result<()> {
    let _ = cfg;
    anyhow::bail!("the projector loop is not built yet")
}
