//! submission: the message submission agent (RFC 6409). Users' mail programs send
//! here, on 587 after STARTTLS and on 465 with implicit TLS (RFC 8314), after AUTH.
//! The SMTP engine is smtp-ingress's (`mailmesh_ingress::Ingress::submission`):
//! what differs is in `mailmesh_ingress::submit` — authentication with limits
//! shared with IMAP and POP3, senders checked against the user's addresses, Date
//! and Message-ID added, Bcc removed, DKIM signatures with the domain's key.

use std::net::SocketAddr;

use mailmesh_ingress::IngressConfig;
use mailmesh_ingress::submit::SubmissionConfig;
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::TelemetryConfig;
use mailmesh_objstore::ObjectStoreConfig;
use mailmesh_queue::QueueConfig;
use serde::Deserialize;

/// The `submission` binary's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// STARTTLS port (container port; the Service maps 587 to it).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Implicit-TLS port (the Service maps 465 to it).
    #[serde(default = "default_listen_tls")]
    pub listen_tls: SocketAddr,
    pub queue: QueueConfig,
    pub object_store: ObjectStoreConfig,
    /// The storage service's gRPC endpoint (logins, addresses, DKIM keys).
    pub storage_endpoint: String,
    /// This workload's certificate and the internal CA, for the storage and
    /// auth-check services (mutual TLS, ADR 0006).
    pub internal_tls: mailmesh_kit::internal::InternalTlsConfig,
    /// Names and limits of the SMTP engine (hostname, size, recipients, timeouts,
    /// PROXY protocol from balancers …), as for smtp-ingress.
    #[serde(default)]
    pub smtp: IngressConfig,
    #[serde(default)]
    pub submission: SubmissionConfig,
    /// Required: AUTH is only offered over TLS.
    pub tls: mailmesh_kit::tls::TlsConfig,
    /// Login-failure and send-rate counters shared by the pods (Redis).
    pub cache: mailmesh_cache::CacheConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 2587))
}

fn default_listen_tls() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 2465))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.internal_tls.validate()?;
        self.queue.validate()?;
        self.tls.validate()?;
        self.smtp.validate()?;
        self.submission.validate()
    }
}
