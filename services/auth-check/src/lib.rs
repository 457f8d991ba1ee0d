//! auth-check: judges where mail comes from. For a client address it finds iprev
//! (RFC 8601 §3) and DNS block/allow list membership; for a message, SPF (RFC 7208),
//! DKIM (RFC 6376), ARC (RFC 8617) and DMARC with alignment, recorded in an RFC 8601
//! `Authentication-Results` header. The verdict carries no decision: what happens to
//! a failing message is the recipient tenant's policy, applied by the front door.
//!
//! The checks are `mail-auth`'s; DNS answers come from a hickory resolver (system
//! configuration or the configured servers) and are cached in this process up to
//! their TTL.

pub mod checker;
pub mod grpc;
mod metrics;
pub mod sign;
pub mod srs;
pub mod verdict;

use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
pub use checker::{AuthConfig, Checker, DnsConfig};
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::TelemetryConfig;
use serde::Deserialize;
pub use verdict::{AuthResult, ClientVerdict, DmarcPolicy, MessageVerdict};

/// One message as auth-check needs it.
#[derive(Debug, Clone, Copy)]
pub struct MessageFacts<'a> {
    pub ip: IpAddr,
    /// EHLO/HELO argument as given.
    pub helo: &'a str,
    /// Reverse-path without angle brackets; empty is the null sender.
    pub mail_from: &'a str,
    /// Headers and body as received, CRLF line ends.
    pub message: &'a [u8],
    /// Seal the message (ARC) for forwarding: some recipient forwards it.
    pub arc_seal: bool,
}

/// auth-check did not answer; the caller defers the mail (`451`).
#[derive(Debug, thiserror::Error)]
#[error("auth-check unavailable: {0}")]
pub struct Unavailable(pub String);

/// The auth-check service as its callers see it: in this process (`mailctl dev`)
/// or over gRPC.
#[async_trait]
pub trait AuthCheck: Send + Sync {
    async fn check_client(&self, ip: IpAddr) -> Result<ClientVerdict, Unavailable>;
    async fn check_message(&self, facts: MessageFacts<'_>) -> Result<MessageVerdict, Unavailable>;
}

/// The `auth-check` binary's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The gRPC port.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Where client verdicts are shared between pods (Redis); in-process by default.
    #[serde(default = "memory_cache")]
    pub cache: mailmesh_cache::CacheConfig,
    /// This pod's certificate (role `auth-check`) and the internal CA: callers
    /// must present a certificate from it (ADR 0006).
    pub internal_tls: mailmesh_kit::internal::InternalTlsConfig,
}

fn memory_cache() -> mailmesh_cache::CacheConfig {
    mailmesh_cache::CacheConfig::Memory
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7002))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.internal_tls.validate()?;
        self.auth.validate()
    }
}
