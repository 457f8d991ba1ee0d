//! Running the storage service: its configuration and its gRPC listener, shared by
//! the `storage` binary and `mailctl dev`.

use std::net::SocketAddr;
use std::sync::Arc;

use mailmesh_kit::Shutdown;
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::internal::{AuthorizeLayer, InternalTls, InternalTlsConfig};
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
    /// This replica's certificate (role `storage`) and the internal CA: every
    /// caller must present a certificate from that CA (ADR 0006).
    pub internal_tls: InternalTlsConfig,
    /// Login failure counters shared by the replicas (Redis); in-process without.
    #[serde(default = "memory_cache")]
    pub cache: mailmesh_cache::CacheConfig,
}

fn memory_cache() -> mailmesh_cache::CacheConfig {
    mailmesh_cache::CacheConfig::Memory
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7001))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.queue.validate()?;
        self.internal_tls.validate()?;
        self.storage.validate()
    }
}

/// Serves the storage gRPC services on `listener` until the shutdown stops: mutual
/// TLS only, each call authorised by the caller's role ([`crate::grpc::policy`]).
pub async fn serve_grpc(
    service: StorageService,
    listener: TcpListener,
    tls: &InternalTls,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let stopped = shutdown.stopped_token();
    let incoming = tls.incoming(listener, &shutdown);
    tonic::transport::Server::builder()
        .max_connection_age(mailmesh_kit::internal::CONNECTION_AGE)
        .max_connection_age_grace(mailmesh_kit::internal::CONNECTION_GRACE)
        .layer(AuthorizeLayer::new(crate::grpc::policy))
        .layer(crate::request::RequestScopeLayer)
        .add_service(service.directory_server())
        .add_service(service.outbound_queue_server())
        .add_service(
            crate::forward::Routed::new(service.clone(), service.engine().clone(), tls.clone())
                .server(),
        )
        .serve_with_incoming_shutdown(incoming, async move { stopped.cancelled().await })
        .await
}

/// The storage service of `engine` with its session keys (from the configuration,
/// or random: fine for a `single_replica`, warned about otherwise) and login
/// counters.
pub fn service(
    engine: Arc<StorageEngine>,
    cache: Arc<dyn mailmesh_cache::Cache>,
    single_replica: bool,
) -> Result<StorageService, ConfigError> {
    let config = engine.config();
    let sessions = match &config.session_secret {
        Some(secret) => crate::session::SessionKeys::new(
            secret.expose(),
            config
                .session_secret_previous
                .as_ref()
                .map(|s| s.expose().as_str()),
            config.session_ttl,
        )
        .map_err(|e| ConfigError::invalid("storage.session_secret", e.to_string()))?,
        None if single_replica => crate::session::SessionKeys::random(config.session_ttl),
        None => {
            tracing::warn!(
                "no storage.session_secret: session tokens are valid on this replica only (set it when running several)"
            );
            crate::session::SessionKeys::random(config.session_ttl)
        }
    };
    Ok(StorageService::new(engine, Arc::new(sessions), cache))
}
