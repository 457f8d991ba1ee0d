//! imap-pop3-gateway: how mail clients read their mail. Stateless: every session
//! reads and changes mailboxes through the storage service, and the only shared
//! session state (the POP3 maildrop lock, login-failure counters) lives in the cache
//! (Redis), so any pod serves any user.
//!
//! IMAP4rev1 (RFC 3501, see [`imap`] for the extensions) and POP3 (RFC 1939) with
//! CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN (RFC 5034), UIDL and TOP, each on a
//! STARTTLS-style port and an implicit-TLS port.

pub mod imap;
mod login;
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

pub use mailmesh_kit::proxy::ProxyConfig;
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
    /// What a failed login costs the client before the answer (five times that for
    /// an account with many recent failures).
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Logins checked at once for one client address (webmail servers and NATs log
    /// many users in together); more are asked to try again shortly.
    pub max_parallel_logins: u32,
    /// How long a maildrop lock lasts unless renewed; a live session renews it every
    /// third of this, so a crashed pod's lock frees itself after at most this long.
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// Largest message the gateway will hand out.
    pub max_message_bytes: usize,
    /// The time a connection has to log in (TLS handshake included), however it
    /// spends it.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// The longest a command line may take to arrive once begun.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long a reply may wait for the client to take any of it; then the session
    /// is closed (a client that stops reading held its session and the message
    /// being sent before). A slow client that keeps reading is never cut off.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// New connections one client address may open per minute, across all pods;
    /// 0 is no limit.
    pub connections_per_ip_per_minute: u32,
    /// Connections one client address (IPv6: its /64) may hold open at once, across
    /// all pods; 0 is no limit.
    pub max_connections_per_ip: u32,
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
            failure_delay: Duration::from_secs(1),
            max_parallel_logins: 64,
            lock_ttl: Duration::from_secs(120),
            max_message_bytes: 64 << 20,
            login_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(120),
            connections_per_ip_per_minute: 120,
            max_connections_per_ip: 50,
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
        if self.login_timeout.is_zero()
            || self.command_timeout.is_zero()
            || self.write_timeout.is_zero()
        {
            return Err(ConfigError::invalid(
                "pop3.login_timeout",
                "login_timeout, command_timeout and write_timeout must be above zero",
            ));
        }
        if self.lock_ttl < Duration::from_millis(300) {
            return Err(ConfigError::invalid(
                "pop3.lock_ttl",
                "at least 300ms (it is renewed every third of it)",
            ));
        }
        if self.max_errors == 0
            || self.max_connections == 0
            || self.max_auth_failures == 0
            || self.max_parallel_logins == 0
        {
            return Err(ConfigError::invalid(
                "pop3",
                "max_errors, max_connections, max_auth_failures and max_parallel_logins must be above zero",
            ));
        }
        if self.hostname.is_empty() || self.hostname.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid("pop3.hostname", "must be a host name"));
        }
        Ok(())
    }
}

/// IMAP limits; every one has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImapConfig {
    /// The name in the greeting.
    pub hostname: String,
    /// Longest command, literals included, for everything but APPEND.
    pub max_command_bytes: usize,
    /// Largest message APPEND accepts and FETCH hands out.
    pub max_message_bytes: usize,
    /// Idle time before a logged-in session is closed (RFC 3501: at least 30
    /// minutes, so IDLE clients that re-issue IDLE every 29 minutes stay).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed before login (and for the TLS handshake).
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// How long a reply may wait for the client to take any of it; then the session
    /// is closed (a client that stops reading held its session and the message
    /// being sent before). A slow client that keeps reading is never cut off.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Protocol errors before the session is closed.
    pub max_errors: u32,
    /// Concurrent sessions per process (both IMAP ports together).
    pub max_connections: usize,
    /// LOGIN and AUTHENTICATE without TLS. Off: LOGINDISABLED until STARTTLS.
    pub allow_plaintext_auth: bool,
    /// Failed logins per client address, and per account, in `failure_window`
    /// (counted in the cache across pods, together with POP3's).
    pub max_auth_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// What a failed login costs the client before the answer (five times that for
    /// an account with many recent failures).
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Logins checked at once for one client address (webmail servers and NATs log
    /// many users in together); more are asked to try again shortly.
    pub max_parallel_logins: u32,
    /// MIME nesting described by BODYSTRUCTURE and addressable by part numbers;
    /// deeper parts are opaque leaves.
    pub max_mime_depth: usize,
    /// MIME containers and boundary lines a message may have to be parsed at all;
    /// a message with more is served as one opaque part.
    pub max_mime_parts: usize,
    /// Bytes one message's FETCH reply may carry (identical items count once);
    /// beyond it the command ends with `NO [LIMIT]`. At least `max_message_bytes`.
    pub max_fetch_response_bytes: usize,
    /// Characters a LIST pattern (reference included) may have; longer: `BAD`.
    pub max_list_pattern_chars: usize,
    /// Bytes of messages all IMAP sessions of the process may hold in memory at once
    /// for FETCH and SEARCH (a message counts twice in FETCH: its stored bytes and
    /// the literal being written). Sessions beyond it wait their turn: many sessions
    /// fetching large messages slow down instead of growing the process.
    pub max_fetch_memory: usize,
    /// Bytes of recently read messages this pod keeps for FETCH and SEARCH (stored
    /// messages never change: a client that fetches a message's headers, then its
    /// structure, then its parts reads it from storage once); 0 keeps none. A
    /// message larger than 1/64 of it is never kept.
    pub message_cache_bytes: usize,
    /// The longest a command may take to arrive once it has begun (and an APPEND
    /// literal before `min_append_rate` applies): trickling cannot extend it.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Bytes per second an APPEND literal must keep arriving at after
    /// `command_timeout`.
    pub min_append_rate: u64,
    /// Sessions one user may hold at once on this pod; more logins are refused
    /// with `NO [UNAVAILABLE]`.
    pub max_sessions_per_user: usize,
    /// New connections one client address may open per minute, across all pods;
    /// 0 is no limit.
    pub connections_per_ip_per_minute: u32,
    /// Connections one client address (IPv6: its /64) may hold open at once, across
    /// all pods; 0 is no limit (a few addresses trickling bytes took every slot).
    pub max_connections_per_ip: u32,
}

/// The deepest MIME nesting `imap.max_mime_depth` may allow: BODYSTRUCTURE is
/// built and encoded by recursion, and this many levels fit a worker thread's stack.
pub const MAX_MIME_DEPTH: usize = 200;

impl ImapConfig {
    pub(crate) fn mime_limits(&self) -> imap::message::MimeLimits {
        imap::message::MimeLimits {
            max_depth: self.max_mime_depth,
            max_parts: self.max_mime_parts,
        }
    }
}

impl Default for ImapConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            max_command_bytes: 64 << 10,
            max_message_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(30 * 60),
            login_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(120),
            max_errors: 20,
            max_connections: 10_000,
            allow_plaintext_auth: false,
            max_auth_failures: 10,
            failure_window: Duration::from_secs(900),
            failure_delay: Duration::from_secs(1),
            max_parallel_logins: 64,
            max_mime_depth: 100,
            max_mime_parts: 10_000,
            max_fetch_response_bytes: 128 << 20,
            max_list_pattern_chars: 1024,
            max_fetch_memory: 256 << 20,
            message_cache_bytes: 64 << 20,
            command_timeout: Duration::from_secs(60),
            min_append_rate: 8 << 10,
            max_sessions_per_user: 50,
            connections_per_ip_per_minute: 120,
            max_connections_per_ip: 100,
        }
    }
}

impl Validate for ImapConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.idle_timeout < Duration::from_secs(30 * 60) {
            return Err(ConfigError::invalid(
                "imap.idle_timeout",
                "RFC 3501 requires at least 30 minutes",
            ));
        }
        if self.max_command_bytes < 1024 {
            return Err(ConfigError::invalid(
                "imap.max_command_bytes",
                "at least 1024",
            ));
        }
        if self.command_timeout.is_zero()
            || self.min_append_rate == 0
            || self.max_sessions_per_user == 0
            || self.max_list_pattern_chars < 16
        {
            return Err(ConfigError::invalid(
                "imap",
                "command_timeout, min_append_rate and max_sessions_per_user must be above zero, max_list_pattern_chars at least 16",
            ));
        }
        if self.max_fetch_memory < 1 << 20 {
            return Err(ConfigError::invalid(
                "imap.max_fetch_memory",
                "at least 1 MiB",
            ));
        }
        if self.max_fetch_response_bytes < self.max_message_bytes {
            return Err(ConfigError::invalid(
                "imap.max_fetch_response_bytes",
                "must be at least imap.max_message_bytes (a whole message must fit)",
            ));
        }
        if !(1..=MAX_MIME_DEPTH).contains(&self.max_mime_depth) || self.max_mime_parts == 0 {
            return Err(ConfigError::invalid(
                "imap.max_mime_depth",
                format!(
                    "max_mime_depth must be 1 to {MAX_MIME_DEPTH} (deeper structure costs stack) and max_mime_parts above zero"
                ),
            ));
        }
        if self.max_message_bytes < 1024 || self.max_message_bytes > u32::MAX as usize / 2 {
            return Err(ConfigError::invalid(
                "imap.max_message_bytes",
                "between 1 KiB and 2 GiB",
            ));
        }
        if self.max_errors == 0
            || self.max_connections == 0
            || self.max_auth_failures == 0
            || self.max_parallel_logins == 0
        {
            return Err(ConfigError::invalid(
                "imap",
                "max_errors, max_connections, max_auth_failures and max_parallel_logins must be above zero",
            ));
        }
        if self.login_timeout.is_zero() || self.write_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "imap.login_timeout",
                "login_timeout and write_timeout must be above zero",
            ));
        }
        if self.hostname.is_empty()
            || self
                .hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::invalid("imap.hostname", "must be a host name"));
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
    /// IMAP with STARTTLS (the Service maps 143 to it).
    #[serde(default = "default_imap")]
    pub imap_listen: SocketAddr,
    /// IMAP over implicit TLS (the Service maps 993 to it).
    #[serde(default = "default_imaps")]
    pub imaps_listen: SocketAddr,
    /// The storage service's gRPC endpoint.
    pub storage_endpoint: String,
    /// How long a mailbox write whose outcome is unknown (storage or the way to it
    /// failed without answering) is sent again, with the same request id, before
    /// the client hears `NO [UNAVAILABLE]`. Storage applies a request once, so a
    /// client is told NO only when the change did not happen, or when storage
    /// stayed unreachable this long.
    #[serde(default = "default_write_patience", with = "humantime_serde")]
    pub storage_write_patience: std::time::Duration,
    /// This pod's certificate (role `gateway`) and the internal CA, for storage
    /// (mutual TLS, ADR 0006).
    pub internal_tls: mailmesh_kit::internal::InternalTlsConfig,
    #[serde(default)]
    pub pop3: Pop3Config,
    #[serde(default)]
    pub imap: ImapConfig,
    /// PROXY protocol from trusted load balancers, on all four ports (`[proxy]`).
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// The certificate for STLS and the implicit-TLS port (reloaded when renewed).
    pub tls: mailmesh_kit::tls::TlsConfig,
    /// Maildrop locks and login-failure counters shared by the pods (Redis).
    pub cache: mailmesh_cache::CacheConfig,
}

fn default_write_patience() -> std::time::Duration {
    store::WRITE_PATIENCE
}

fn default_pop3() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1110))
}

fn default_pop3s() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1995))
}

fn default_imap() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1143))
}

fn default_imaps() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1993))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.tls.validate()?;
        self.internal_tls.validate()?;
        self.imap.validate()?;
        self.pop3.validate()
    }
}

/// What every session shares.
pub struct Gateway {
    pub(crate) store: Store,
    pub(crate) cache: Arc<dyn Cache>,
    pub(crate) tls: tokio_rustls::TlsAcceptor,
    pub(crate) config: Pop3Config,
    pub(crate) imap: ImapConfig,
    pub(crate) proxy: ProxyConfig,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) imap_slots: Arc<Semaphore>,
    /// `imap.max_fetch_memory` in KiB permits.
    pub(crate) fetch_memory: Arc<Semaphore>,
    pub(crate) fetch_memory_kib: u32,
    /// Storage change streams, one per user with IMAP sessions here.
    pub(crate) watches: Arc<imap::Watches>,
    /// Recently read messages (`imap.message_cache_bytes`).
    pub(crate) messages: imap::MessageCache,
}

impl Gateway {
    pub fn new(
        store: Store,
        cache: Arc<dyn Cache>,
        tls: Arc<rustls::ServerConfig>,
        config: Pop3Config,
        imap: ImapConfig,
        proxy: ProxyConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            cache,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            imap_slots: Arc::new(Semaphore::new(imap.max_connections)),
            fetch_memory: Arc::new(Semaphore::new(fetch_memory_kib(&imap) as usize)),
            fetch_memory_kib: fetch_memory_kib(&imap),
            watches: Arc::default(),
            messages: imap::MessageCache::new(imap.message_cache_bytes),
            config,
            imap,
            proxy,
        })
    }
}

fn fetch_memory_kib(imap: &ImapConfig) -> u32 {
    u32::try_from(imap.max_fetch_memory / 1024)
        .unwrap_or(u32::MAX)
        .min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX))
        .max(1)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Imap,
    Pop3,
}

/// Accepts IMAP sessions until the shutdown closes; `implicit_tls` for the 993 port.
pub async fn serve_imap(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    implicit_tls: bool,
    shutdown: Shutdown,
) {
    serve(gateway, listener, implicit_tls, shutdown, Protocol::Imap).await;
}

/// Accepts POP3 sessions until the shutdown closes; `implicit_tls` for the 995 port.
pub async fn serve_pop3(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    implicit_tls: bool,
    shutdown: Shutdown,
) {
    serve(gateway, listener, implicit_tls, shutdown, Protocol::Pop3).await;
}

async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    implicit_tls: bool,
    shutdown: Shutdown,
    protocol: Protocol,
) {
    let (name, slots, refusal, per_ip_refusal, handshake) = match protocol {
        Protocol::Imap => (
            "imap",
            gateway.imap_slots.clone(),
            &b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"[..],
            &b"* BYE [UNAVAILABLE] Too many connections from your address, try again later\r\n"[..],
            gateway.imap.login_timeout,
        ),
        Protocol::Pop3 => (
            "pop3",
            gateway.slots.clone(),
            &b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"[..],
            &b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"[..],
            gateway.config.login_timeout,
        ),
    };
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::metrics::event(name, "refused");
            if !implicit_tls && !gateway.proxy.trusts(peer.ip()) {
                let _ = stream.write_all(refusal).await;
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            // Behind a trusted load balancer the real client comes first, in a PROXY
            // header; it is the address every limit and log line uses.
            let client = if gateway.proxy.trusts(peer.ip()) {
                let timeout = gateway.proxy.timeout.unwrap_or(Duration::from_secs(10));
                match mailmesh_kit::proxy::read_header(&mut stream, peer, timeout).await {
                    Ok(client) => client,
                    Err(e) => {
                        crate::metrics::event(name, "proxy_header");
                        tracing::warn!(%peer, error = %e, "closing a connection from a load balancer");
                        return;
                    }
                }
            } else {
                peer
            };
            // Per client address, across every pod: new connections per minute and
            // connections held at once.
            let (per_minute, per_ip) = match protocol {
                Protocol::Imap => (
                    gateway.imap.connections_per_ip_per_minute,
                    gateway.imap.max_connections_per_ip,
                ),
                Protocol::Pop3 => (
                    gateway.config.connections_per_ip_per_minute,
                    gateway.config.max_connections_per_ip,
                ),
            };
            let key = format!(
                "{name}:conn:{}",
                mailmesh_cache::login::address_key(client.ip())
            );
            let rate_ok = per_minute == 0
                || gateway
                    .cache
                    .incr(&key, 1, Duration::from_secs(60))
                    .await
                    .map_or(true, |n| n <= i64::from(per_minute));
            let address_slot = if rate_ok {
                mailmesh_cache::slots::connection_slot(&gateway.cache, name, client.ip(), per_ip)
                    .await
            } else {
                None
            };
            let Some(_address_slot) = address_slot else {
                crate::metrics::event(name, "refused_per_ip");
                tracing::info!(%client, protocol = name, "too many connections from this address");
                if !implicit_tls {
                    let _ = stream.write_all(per_ip_refusal).await;
                }
                return;
            };
            let write_timeout = match protocol {
                Protocol::Imap => gateway.imap.write_timeout,
                Protocol::Pop3 => gateway.config.write_timeout,
            };
            let stream = mailmesh_kit::io::WriteStall::new(stream, write_timeout);
            // Each session's future is boxed on its own: one inline here would make
            // every connection as large as the largest protocol's and TLS variant's.
            if implicit_tls {
                let accept = Box::pin(gateway.tls.accept(stream));
                match tokio::time::timeout(handshake, accept).await {
                    Ok(Ok(tls)) => match protocol {
                        Protocol::Imap => {
                            Box::pin(imap::run(gateway.clone(), tls, client, true, &stop)).await
                        }
                        Protocol::Pop3 => {
                            Box::pin(pop3::run(&gateway, tls, client, true, &stop)).await
                        }
                    },
                    _ => crate::metrics::event(name, "tls_failed"),
                }
            } else {
                match protocol {
                    Protocol::Imap => {
                        Box::pin(imap::run(gateway.clone(), stream, client, false, &stop)).await
                    }
                    Protocol::Pop3 => {
                        Box::pin(pop3::run(&gateway, stream, client, false, &stop)).await
                    }
                }
            }
            drop(slot);
        });
    }
}
