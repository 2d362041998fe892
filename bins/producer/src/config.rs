//! `ordo-producer`'s configuration: the shared sections plus `[producer]`.

use serde::{Deserialize, Serialize};

use ordo_core::config::{
    ConfigError, MongoConfig, ServiceBusConfig, ShutdownConfig, TelemetryConfig, Validate,
};

/// The whole configuration file of `ordo-producer`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// Source events and ordo's own collections.
    pub mongodb: MongoConfig,
    /// The topic to publish to.
    pub servicebus: ServiceBusConfig,
    /// Logs, metrics, health port.
    pub telemetry: TelemetryConfig,
    /// SIGTERM handling.
    pub shutdown: ShutdownConfig,
}

impl Validate for ProducerConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.mongodb.validate()?;
        self.servicebus.validate()?;
        self.telemetry.validate()?;
        self.shutdown.validate()
    }
}
