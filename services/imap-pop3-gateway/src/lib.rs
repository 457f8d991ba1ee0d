//! imap-pop3-gateway: how mail clients read their mail. Stateless: every session
//! reads and changes mailboxes through the storage service, and the only shared
//! session state (the POP3 maildrop lock, login-failure counters) lives in the cache
//! (Redis), so any pod serves any user.
//!
//! Built so far: POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN
//! (RFC 5034), UIDL and TOP, on a STARTTLS-style port and an implicit-TLS port. IMAP
//! is not built yet.

mod metrics;
pub mod pop3;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailmesh_cache::Cache;
use mailmesh_kit::Shutdown;
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::TelemetryConfig;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use store::Store;

/// POP3 limits; every one has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pop3Config {
    /// The name in the greeting.
    pub hostname: String,
    /// Longest command line, CRLF included (RFC 2449 allows 255; AUTH needs more).
    pub max_line: usize,
    /// Idle time before the session is closed (RFC 1939: at least 10 minutes).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Protocol errors before the session is closed.
    pub max_errors: u32,
    /// Concurrent sessions per process (both POP3 ports together).
    pub max_connections: usize,
    /// USER/PASS and AUTH without TLS. Off: credentials never cross in clear.
    pub allow_plaintext_auth: bool,
    /// Failed logins per client address, and per account, in `failure_window`
    /// (counted in the cache across pods) before logins are refused for a while.
    pub max_auth_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// How long a maildrop lock lasts unless renewed; a live session renews it every
    /// third of this, so a crashed pod's lock frees itself after at most this long.
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// Largest message the gateway will hand out.
    pub max_message_bytes: usize,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            max_line: 1024,
            idle_timeout: Duration::from_secs(600),
            max_errors: 10,
            max_connections: 2000,
            allow_plaintext_auth: false,
            max_auth_failures: 10,
            failure_window: Duration::from_secs(900),
            lock_ttl: Duration::from_secs(120),
            max_message_bytes: 64 << 20,
        }
    }
}

impl Validate for Pop3Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_line < 255 {
            return Err(ConfigError::invalid(
                "pop3.max_line",
                "RFC 2449 requires at least 255",
            ));
        }
        if self.idle_timeout < Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "pop3.idle_timeout",
                "RFC 1939 requires at least 10 minutes",
            ));
        }
        if self.lock_ttl < Duration::from_millis(300) {
            return Err(ConfigError::invalid(
                "pop3.lock_ttl",
                "at least 300ms (it is renewed every third of it)",
            ));
        }
        if self.max_errors == 0 || self.max_connections == 0 || self.max_auth_failures == 0 {
            return Err(ConfigError::invalid(
                "pop3",
                "max_errors, max_connections and max_auth_failures must be above zero",
            ));
        }
        if self.hostname.is_empty() || self.hostname.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid("pop3.hostname", "must be a host name"));
        }
        Ok(())
    }
}

/// The `imap-pop3-gateway` binary's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// POP3 with STLS (the Service maps 110 to it).
    #[serde(default = "default_pop3")]
    pub pop3_listen: SocketAddr,
    /// POP3 over implicit TLS (the Service maps 995 to it).
    #[serde(default = "default_pop3s")]
    pub pop3s_listen: SocketAddr,
    /// The storage service's gRPC endpoint.
    pub storage_endpoint: String,
    #[serde(default)]
    pub pop3: Pop3Config,
    /// The certificate for STLS and the implicit-TLS port (reloaded when renewed).
    pub tls: mailmesh_kit::tls::TlsConfig,
    /// Maildrop locks and login-failure counters shared by the pods (Redis).
    pub cache: mailmesh_cache::CacheConfig,
}

fn default_pop3() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1110))
}

fn default_pop3s() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1995))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.tls.validate()?;
        self.pop3.validate()
    }
}

/// What every session shares.
pub struct Gateway {
    pub(crate) store: Store,
    pub(crate) cache: Arc<dyn Cache>,
    pub(crate) tls: tokio_rustls::TlsAcceptor,
    pub(crate) config: Pop3Config,
    pub(crate) slots: Arc<Semaphore>,
}

impl Gateway {
    pub fn new(
        store: Store,
        cache: Arc<dyn Cache>,
        tls: Arc<rustls::ServerConfig>,
        config: Pop3Config,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            cache,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
        })
    }
}

/// Accepts POP3 sessions until the shutdown closes; `implicit_tls` for the 995 port.
pub async fn serve_pop3(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    implicit_tls: bool,
    shutdown: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.closing() => return,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = gateway.slots.clone().try_acquire_owned() else {
            crate::metrics::session_refused();
            if !implicit_tls {
                let _ = stream
                    .write_all(b"-ERR [SYS/TEMP] Too many connections, try again later\r\n")
                    .await;
            }
            continue;
        };
        let gateway = gateway.clone();
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            if implicit_tls {
                let timeout = gateway.config.idle_timeout;
                match tokio::time::timeout(timeout, gateway.tls.accept(stream)).await {
                    Ok(Ok(tls)) => pop3::run(&gateway, tls, peer, true, &stop).await,
                    _ => crate::metrics::tls_failed(),
                }
            } else {
                pop3::run(&gateway, stream, peer, false, &stop).await;
            }
            drop(slot);
        });
    }
}
