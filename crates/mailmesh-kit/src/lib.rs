//! What every mailmesh service stands on: typed configuration, telemetry, the admin
//! port (`/livez`, `/readyz`, `/metrics`), graceful shutdown, reloadable TLS and the
//! PROXY protocol of the load balancers in front of the mail ports.

pub mod admin;
pub mod config;
pub mod dns;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use config::{ConfigError, ConfigSource};
pub use health::{Health, ReadinessCheck};
pub use secret::Secret;
pub use shutdown::Shutdown;
