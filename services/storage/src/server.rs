//! Running the storage service: its configuration and its gRPC listener, shared by
//! the `storage` binary and `mailctl dev`.

use std::net::SocketAddr;
use std::sync::Arc;

use mailmesh_kit::Shutdown;
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::TelemetryConfig;
use mailmesh_objstore::ObjectStoreConfig;
use mailmesh_queue::QueueConfig;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::engine::{StorageConfig, StorageEngine};
use crate::grpc::StorageService;

/// The `storage` binary's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The gRPC port (directory and mailboxes).
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    pub queue: QueueConfig,
    pub object_store: ObjectStoreConfig,
    #[serde(default)]
    pub storage: StorageConfig,
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7001))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.queue.validate()?;
        self.storage.validate()
    }
}

/// Serves the storage gRPC services on `listener` until the shutdown stops.
pub async fn serve_grpc(
    engine: Arc<StorageEngine>,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let service = StorageService::new(engine);
    let stopped = shutdown.stopped_token();
    tonic::transport::Server::builder()
        .add_service(service.directory_server())
        .add_service(service.outbound_queue_server())
        .add_service(service.mailboxes_server())
        .serve_with_incoming_shutdown(mailmesh_kit::grpc::incoming(listener), async move {
            stopped.cancelled().await
        })
        .await
}
