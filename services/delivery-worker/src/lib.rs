//! The delivery worker: takes accepted mail off the queue and puts it in local
//! mailboxes through the storage service, bouncing what cannot be delivered and
//! handing remote recipients to the outbound path, which relays them to their MX
//! hosts (`outbound`), retrying for days.

pub mod bodies;
pub mod dsn;
mod due;
mod metrics;
pub mod outbound;
pub mod worker;

use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::TelemetryConfig;
use mailmesh_objstore::ObjectStoreConfig;
use mailmesh_queue::QueueConfig;
use serde::Deserialize;

/// The `delivery-worker` binary's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    pub queue: QueueConfig,
    /// Where large message bodies are (the front doors write them there).
    pub object_store: ObjectStoreConfig,
    /// The storage service's gRPC endpoint, e.g. `http://mailmesh-storage:7001`.
    pub storage_endpoint: String,
    /// This workload's certificate and the internal CA, for the storage and
    /// auth-check services (mutual TLS, ADR 0006).
    pub internal_tls: mailmesh_kit::internal::InternalTlsConfig,
    #[serde(default)]
    pub worker: worker::WorkerConfig,
    /// Relaying to other domains (`[outbound]`).
    #[serde(default)]
    pub outbound: outbound::OutboundConfig,
    /// Decides which worker re-queues a due retry (Redis). Without it an in-process
    /// map is used: fine for one worker, duplicates retries with several.
    pub cache: Option<mailmesh_cache::CacheConfig>,
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.queue.validate()?;
        self.worker.validate()?;
        self.outbound.validate()?;
        self.internal_tls.validate()?;
        if !(self.storage_endpoint.starts_with("http://")
            || self.storage_endpoint.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "storage_endpoint",
                "must be an http(s) URL",
            ));
        }
        Ok(())
    }
}
