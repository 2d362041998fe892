//! ordo-producer: tails the change stream of the events collection and publishes every event
//! to a partitioned Service Bus topic, keyed by aggregate.

pub mod config;

pub use config::ProducerConfig;

/// Runs the producer until shutdown.
pub async fn run(cfg: ProducerConfig) -> anyhow::Result<()> {
    let _ = cfg;
    anyhow::bail!("the producer loop is not built yet")
}
