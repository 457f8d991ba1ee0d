//! What every service binary does around its own work: telemetry, the admin port,
//! health, and the SIGTERM drain.

use std::net::SocketAddr;

use tokio::task::JoinHandle;

use crate::admin::AdminServer;
use crate::config::{AdminConfig, ShutdownConfig};
use crate::telemetry::{TelemetryConfig, TelemetryError, TelemetryGuard};
use crate::{Health, Shutdown};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("binding the admin port {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin port: {0}")]
    AdminServe(std::io::Error),
}

/// A running service's shared parts. Dependencies register readiness checks on
/// `health`; work is tracked by `shutdown`.
pub struct Service {
    pub shutdown: Shutdown,
    pub health: Health,
    admin: JoinHandle<std::io::Result<()>>,
    _telemetry: TelemetryGuard,
}

impl Service {
    /// Installs telemetry for `name` and opens the admin port.
    pub async fn start(
        name: &'static str,
        admin: &AdminConfig,
        telemetry: &TelemetryConfig,
    ) -> Result<Self, ServiceError> {
        let guard = crate::telemetry::init(name, telemetry)?;
        let shutdown = Shutdown::new();
        let health = Health::new();
        // Live at once, ready only when `run` reaches `wait_and_drain` (its listeners
        // are open by then): a pod gets no traffic while it loads its state.
        health.set_starting();
        let server = AdminServer::bind(admin.listen, health.clone())
            .await
            .map_err(|source| ServiceError::Admin {
                addr: admin.listen,
                source,
            })?;
        let admin = tokio::spawn(server.serve(shutdown.clone()));
        Ok(Self {
            shutdown,
            health,
            admin,
            _telemetry: guard,
        })
    }

    /// Waits for SIGTERM/SIGINT, then drains (readiness off, listeners closed,
    /// sessions finished or cut) and closes the admin port.
    pub async fn wait_and_drain(self, config: &ShutdownConfig) -> Result<(), ServiceError> {
        self.health.set_started();
        crate::shutdown::signal().await;
        self.drain(config).await
    }

    /// Drains now (see [`Self::wait_and_drain`]).
    pub async fn drain(self, config: &ShutdownConfig) -> Result<(), ServiceError> {
        self.health.set_started();
        self.shutdown.drain(&self.health, config).await;
        match self.admin.await {
            Ok(served) => served.map_err(ServiceError::AdminServe),
            Err(e) => Err(ServiceError::AdminServe(std::io::Error::other(e))),
        }
    }
}

/// A service binary's `main`: reads its configuration (file + `MAILMESH_*`), starts
/// the runtime and runs `run` on it. Configuration errors stop it before anything
/// starts, naming the key.
pub fn main<C, F, Fut, E>(run: F) -> Result<(), E>
where
    C: serde::de::DeserializeOwned + crate::config::Validate,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: From<crate::ConfigError> + From<std::io::Error>,
{
    let config: C = crate::ConfigSource::from_process().load()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}
