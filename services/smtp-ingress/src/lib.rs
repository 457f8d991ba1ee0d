//! smtp-ingress: the MX front door (RFC 5321). It accepts mail for local domains only,
//! checks each recipient against the directory, and answers `250` only once the
//! message is durable in the queue (DESIGN invariant 1).
//!
//! It speaks SMTP with PIPELINING, 8BITMIME, SMTPUTF8, SIZE, ENHANCEDSTATUSCODES,
//! CHUNKING, DSN and (with a certificate) STARTTLS, PROXY protocol from trusted
//! balancers, and rate limits shared through the cache. With auth-check configured,
//! each message gets an `Authentication-Results` header and the recipient tenant's
//! inbound policy (reject, Junk, tag) is applied to DMARC failures and block-listed
//! clients.

mod metrics;
pub use mailmesh_kit::proxy;
pub mod session;
pub mod submit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailmesh_auth::AuthCheck;
use mailmesh_cache::Cache;
use mailmesh_kit::Shutdown;
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::TelemetryConfig;
use mailmesh_objstore::ObjectStoreConfig;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_queue::{Queue, QueueConfig};
use mailmesh_storage::client::Mailstore;
use mailmesh_types::EmailAddress;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits and names of the SMTP service; every limit has a sane default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressConfig {
    /// The name in the greeting, EHLO and Received headers.
    pub hostname: String,
    /// The topic accepted mail is written to.
    pub topic: String,
    /// Partitions of `topic` if this service is the first to create it.
    pub topic_partitions: i32,
    /// Largest message accepted (advertised as SIZE).
    pub max_message_bytes: usize,
    /// Recipients per transaction (RFC 5321 requires accepting at least 100).
    pub max_recipients: usize,
    /// Protocol errors before the session is closed with `421`.
    pub max_errors: u32,
    /// Longest command line, CRLF included; longer ones get `500 5.5.2`.
    pub max_command_line: usize,
    /// Concurrent sessions per process; more are answered `421` and closed.
    pub max_connections: usize,
    /// Bodies up to this size travel inside the queue record; larger ones are
    /// written to object storage first.
    pub inline_body_bytes: usize,
    /// RFC 5321 4.5.3.2: 5 minutes per command.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The whole TLS handshake (implicit TLS and after STARTTLS); a client that
    /// connects and says nothing must not hold a session for a command timeout.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// RFC 5321 4.5.3.2 "data block": the longest wait for more message data.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// The longest one DATA message or one BDAT chunk may take to arrive, however
    /// steadily it trickles in: slow clients must not hold a session for ever.
    #[serde(with = "humantime_serde")]
    pub max_data_duration: Duration,
    /// PROXY protocol from trusted load balancers (`[smtp.proxy]`).
    pub proxy: proxy::ProxyConfig,
    /// New connections one client address may open per minute, across all pods
    /// (counted in the cache); 0 turns the limit off.
    pub connections_per_ip_per_minute: u32,
    /// Connections one client address (IPv6: its /64) may hold open at once, across
    /// all pods (counted in the cache); 0 turns the limit off. Slow clients from a
    /// few addresses took every connection slot before.
    pub max_connections_per_ip: u32,
    /// Messages one tenant may receive per minute, across all pods; 0 is no limit.
    pub messages_per_tenant_per_minute: u32,
    /// Where `RCPT TO:<Postmaster>` (RFC 5321 4.5.1) delivers; it must be a local
    /// address. Default `postmaster@<hostname>`.
    pub postmaster: Option<String>,
    /// The authserv-id this deployment's Authentication-Results carry (auth-check's
    /// `authserv_id`, the MX name); fields from outside that claim it are removed
    /// on both ports. Default: `hostname`.
    pub authserv_id: Option<String>,
    /// `[smtp.srs]`: bounces to the addresses the delivery workers rewrite forwarded
    /// senders to (the same secret as `[worker.srs]`) are taken and sent back to the
    /// original sender; forged or expired ones are refused. Without it, such
    /// addresses are unknown users.
    pub srs: Option<mailmesh_auth::srs::SrsConfig>,
    /// Bounces one original sender may receive through its SRS addresses per
    /// minute, across all pods (more wait with `450 4.7.1`); 0 is no limit. A valid
    /// SRS address stays valid for days, so it must not become a relay to its
    /// original sender.
    pub max_srs_bounces_per_minute: u32,
    /// Received fields a message may carry; more are refused with `554 5.4.6` as a
    /// mail loop (RFC 5321 §6.3), so a forwarding loop ends instead of growing.
    pub max_received_fields: usize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            topic: "mail.queue".into(),
            topic_partitions: 12,
            max_message_bytes: 25 << 20,
            max_recipients: 100,
            max_errors: 20,
            max_command_line: 1000,
            max_connections: 1000,
            inline_body_bytes: 256 << 10,
            command_timeout: Duration::from_secs(300),
            tls_handshake_timeout: Duration::from_secs(30),
            data_timeout: Duration::from_secs(180),
            // 25 MiB at 256 kbit/s takes about 14 minutes.
            max_data_duration: Duration::from_secs(1800),
            proxy: proxy::ProxyConfig::default(),
            connections_per_ip_per_minute: 120,
            messages_per_tenant_per_minute: 0,
            postmaster: None,
            authserv_id: None,
            max_connections_per_ip: 50,
            srs: None,
            max_srs_bounces_per_minute: 30,
            max_received_fields: 100,
        }
    }
}

impl IngressConfig {
    pub fn postmaster_address(&self) -> Result<EmailAddress, ConfigError> {
        let address = match &self.postmaster {
            Some(a) => a.clone(),
            None => format!("postmaster@{}", self.hostname),
        };
        address
            .parse()
            .map_err(|e| ConfigError::invalid("smtp.postmaster", format!("{address:?}: {e}")))
    }
}

impl Validate for IngressConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(srs) = &self.srs {
            srs.build()
                .map_err(|e| ConfigError::invalid("smtp.srs.secret", e.to_string()))?;
        }
        if self.max_recipients < 100 {
            return Err(ConfigError::invalid(
                "smtp.max_recipients",
                "RFC 5321 requires at least 100",
            ));
        }
        // Queue records carrying more would be refused by the delivery workers.
        let carried = mailmesh_types::EnvelopeLimits::default().max_recipients;
        if self.max_recipients > carried {
            return Err(ConfigError::invalid(
                "smtp.max_recipients",
                format!("at most {carried} (what a queue record may carry)"),
            ));
        }
        if self.max_command_line < 512 {
            return Err(ConfigError::invalid(
                "smtp.max_command_line",
                "RFC 5321 requires at least 512",
            ));
        }
        if self.max_message_bytes == 0 || self.max_connections == 0 || self.max_errors == 0 {
            return Err(ConfigError::invalid(
                "smtp",
                "max_message_bytes, max_connections and max_errors must be above zero",
            ));
        }
        if self.hostname.is_empty() || self.hostname.chars().any(|c| c.is_whitespace()) {
            return Err(ConfigError::invalid("smtp.hostname", "must be a host name"));
        }
        if self.tls_handshake_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "smtp.tls_handshake_timeout",
                "must be above zero",
            ));
        }
        self.postmaster_address()?;
        Ok(())
    }
}

/// The `smtp-ingress` binary's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The SMTP listener (container port; the Service maps 25 to it).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub queue: QueueConfig,
    pub object_store: ObjectStoreConfig,
    /// The storage service's gRPC endpoint (recipient lookups).
    pub storage_endpoint: String,
    /// This workload's certificate and the internal CA, for the storage and
    /// auth-check services (mutual TLS, ADR 0006).
    pub internal_tls: mailmesh_kit::internal::InternalTlsConfig,
    /// The auth-check service's gRPC endpoint. Without it no SPF/DKIM/DMARC checks
    /// run, no Authentication-Results header is added and no policy applies.
    pub auth_check_endpoint: Option<String>,
    #[serde(default)]
    pub smtp: IngressConfig,
    /// Certificate for STARTTLS (reloaded when renewed); no STARTTLS without it.
    pub tls: Option<mailmesh_kit::tls::TlsConfig>,
    /// Rate-limit counters shared by the pods (Redis); losing them only resets limits.
    pub cache: mailmesh_cache::CacheConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 2525))
}

impl Validate for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.queue.validate()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        self.smtp.validate()
    }
}

/// What every session shares.
pub struct Ingress {
    /// STARTTLS, when a certificate is configured.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) cache: Arc<dyn Cache>,
    pub(crate) queue: Arc<dyn Queue>,
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) directory: Arc<dyn Mailstore>,
    pub(crate) auth: Option<Arc<dyn AuthCheck>>,
    pub(crate) postmaster: EmailAddress,
    pub(crate) config: IngressConfig,
    /// Set on the submission ports: AUTH, sender checks, header fix-ups, signing.
    pub(crate) submission: Option<submit::SubmissionConfig>,
    pub(crate) keys: submit::KeyCache,
    /// Decodes bounces to rewritten (SRS) senders.
    pub(crate) srs: Option<mailmesh_auth::srs::Srs>,
}

impl Ingress {
    pub fn new(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        directory: Arc<dyn Mailstore>,
        config: IngressConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
        cache: Arc<dyn Cache>,
        auth: Option<Arc<dyn AuthCheck>>,
    ) -> Arc<Self> {
        let postmaster = config
            .postmaster_address()
            .expect("a validated configuration");
        Arc::new(Self {
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            cache,
            queue,
            objects,
            directory,
            auth,
            postmaster,
            srs: config
                .srs
                .as_ref()
                .map(|c| c.build().expect("a validated configuration")),
            config,
            submission: None,
            keys: submit::KeyCache::default(),
        })
    }

    /// The submission service (RFC 6409): same engine, authenticated users only.
    pub fn submission(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        directory: Arc<dyn Mailstore>,
        config: IngressConfig,
        submission: submit::SubmissionConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
        cache: Arc<dyn Cache>,
    ) -> Arc<Self> {
        let postmaster = config
            .postmaster_address()
            .expect("a validated configuration");
        Arc::new(Self {
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            cache,
            queue,
            objects,
            directory,
            auth: None,
            postmaster,
            srs: None,
            config,
            submission: Some(submission),
            keys: submit::KeyCache::default(),
        })
    }
}

impl Ingress {
    /// Follows storage's announcements of DKIM key changes
    /// ([`mailmesh_storage::client::DKIM_KEYS_CHANNEL`]) until `shutdown`: a new,
    /// activated or removed key signs (or stops signing) the next message, not the
    /// first after `key_cache_ttl`. Without the cache the TTL alone applies; after a
    /// lost subscription every cached key is forgotten (announcements may have been
    /// missed).
    pub fn follow_key_changes(self: &Arc<Self>, shutdown: Shutdown) {
        let ingress = Arc::downgrade(self);
        let cache = self.cache.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            loop {
                let subscribed = tokio::select! {
                    _ = shutdown.closing() => return,
                    s = cache.subscribe(mailmesh_storage::client::DKIM_KEYS_CHANNEL) => s,
                };
                match subscribed {
                    Ok(mut changes) => {
                        if let Some(ingress) = ingress.upgrade() {
                            ingress.keys.forget(None);
                        }
                        loop {
                            let change = tokio::select! {
                                _ = shutdown.closing() => return,
                                c = changes.next() => c,
                            };
                            let Some(change) = change else { break };
                            let Some(ingress) = ingress.upgrade() else {
                                return;
                            };
                            match std::str::from_utf8(&change)
                                .ok()
                                .and_then(|d| d.parse().ok())
                            {
                                Some(domain) => {
                                    tracing::info!(%domain, "DKIM key changed; asking storage again");
                                    ingress.keys.forget(Some(&domain));
                                }
                                None => ingress.keys.forget(None),
                            }
                        }
                        tracing::warn!("the DKIM key announcements ended; subscribing again");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no DKIM key announcements (the cache is away); keys are asked for again after key_cache_ttl");
                    }
                }
                tokio::select! {
                    _ = shutdown.closing() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    /// Counts one event against a per-minute `limit` shared by all pods; true while
    /// within it. An unreachable cache lets everything through (limits are a
    /// courtesy; losing the cache must never lose mail).
    pub(crate) async fn within_limit(&self, key: &str, limit: u32) -> bool {
        self.within(key, limit, Duration::from_secs(60)).await
    }

    /// Counts one event against `limit` per `window` (fixed windows in the cache).
    pub(crate) async fn within(&self, key: &str, limit: u32, window: Duration) -> bool {
        if limit == 0 {
            return true;
        }
        match self.cache.incr(key, 1, window).await {
            Ok(n) => n <= i64::from(limit),
            Err(e) => {
                tracing::warn!(error = %e, "rate-limit counter unavailable; not limiting");
                true
            }
        }
    }
}

/// Accepts sessions until the shutdown closes; open sessions are tracked by it and
/// end with `421` when they reach their next command after that.
pub async fn serve(ingress: Arc<Ingress>, listener: TcpListener, shutdown: Shutdown) {
    serve_port(ingress, listener, shutdown, false).await;
}

/// As [`serve`], with TLS from the first byte (submissions on 465, RFC 8314).
pub async fn serve_implicit_tls(ingress: Arc<Ingress>, listener: TcpListener, shutdown: Shutdown) {
    serve_port(ingress, listener, shutdown, true).await;
}

async fn serve_port(
    ingress: Arc<Ingress>,
    listener: TcpListener,
    shutdown: Shutdown,
    implicit_tls: bool,
) {
    // The first message must not wait for the topic to be created by a publish.
    if let Err(e) = ingress
        .queue
        .ensure_topic(&ingress.config.topic, ingress.config.topic_partitions)
        .await
    {
        tracing::warn!(error = %e, "creating the mail topic failed; publishing will retry it");
    }
    let slots = Arc::new(Semaphore::new(ingress.config.max_connections));
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
            crate::metrics::rejected("too_many_connections");
            let _ = stream
                .write_all(b"421 4.7.0 Too many connections, try again later\r\n")
                .await;
            continue;
        };
        // Replies are single small writes, and after a TLS handshake one follows the
        // session ticket: with Nagle's algorithm it would wait for the client's
        // delayed ACK (40 ms on Linux) — STARTTLS + EHLO took 44 ms at p50 before.
        let _ = stream.set_nodelay(true);
        let ingress = ingress.clone();
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            if implicit_tls {
                handle_implicit_tls(&ingress, stream, peer, &stop).await;
            } else {
                handle(&ingress, stream, peer, &stop).await;
            }
            drop(slot);
        });
    }
}

/// One connection: the PROXY header first if the peer is a trusted load balancer,
/// then the SMTP session with the real client address.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    ingress: &Ingress,
    mut stream: S,
    peer: SocketAddr,
    shutdown: &Shutdown,
) {
    let Some((client, _slot)) = admit(ingress, &mut stream, peer, true).await else {
        return;
    };
    let session = session::Session::new(ingress, client);
    if let Err(e) = session.run(stream, shutdown).await {
        tracing::debug!(%client, error = %e, "session ended with an error");
    }
}

/// One connection on an implicit-TLS port: PROXY header, handshake, then SMTP.
pub async fn handle_implicit_tls<S: AsyncRead + AsyncWrite + Unpin>(
    ingress: &Ingress,
    mut stream: S,
    peer: SocketAddr,
    shutdown: &Shutdown,
) {
    // Before the handshake a refusal cannot be said in a way the client reads.
    let Some((client, _slot)) = admit(ingress, &mut stream, peer, false).await else {
        return;
    };
    let Some(acceptor) = ingress.tls.clone() else {
        return;
    };
    let timeout = ingress.config.tls_handshake_timeout;
    let Ok(Ok(tls)) = tokio::time::timeout(timeout, acceptor.accept(stream)).await else {
        crate::metrics::rejected("tls_handshake");
        return;
    };
    let session = session::Session::new(ingress, client).over_tls();
    if let Err(e) = session.run(tls, shutdown).await {
        tracing::debug!(%client, error = %e, "session ended with an error");
    }
}

/// The real client address (after a trusted balancer's PROXY header) and its
/// connection slot if the connection may go on; refusals are answered here when
/// `reply`.
async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
    ingress: &Ingress,
    stream: &mut S,
    peer: SocketAddr,
    reply: bool,
) -> Option<(SocketAddr, mailmesh_cache::slots::Slot)> {
    let proxy = &ingress.config.proxy;
    let client = if proxy.trusts(peer.ip()) {
        let timeout = proxy.timeout.unwrap_or(Duration::from_secs(10));
        match proxy::read_header(stream, peer, timeout).await {
            Ok(client) => client,
            Err(e) => {
                crate::metrics::rejected("proxy_header");
                tracing::warn!(%peer, error = %e, "closing a connection from a load balancer");
                return None;
            }
        }
    } else {
        peer
    };
    if !ingress
        .within_limit(
            &format!("smtp:conn:{}", client.ip()),
            ingress.config.connections_per_ip_per_minute,
        )
        .await
    {
        crate::metrics::rejected("connection_rate");
        if reply {
            let _ = stream
                .write_all(b"421 4.7.0 Too many connections from your address, try again later\r\n")
                .await;
        }
        return None;
    }
    let scope = if ingress.submission.is_some() {
        "submission"
    } else {
        "smtp"
    };
    let Some(slot) = mailmesh_cache::slots::connection_slot(
        &ingress.cache,
        scope,
        client.ip(),
        ingress.config.max_connections_per_ip,
    )
    .await
    else {
        crate::metrics::rejected("connections_per_ip");
        tracing::info!(%client, "too many connections from this address");
        if reply {
            let _ = stream
                .write_all(b"421 4.7.0 Too many connections from your address, try again later\r\n")
                .await;
        }
        return None;
    };
    Some((client, slot))
}

#[cfg(test)]
mod tests {
    use mailmesh_kit::config::Validate;

    use super::*;

    #[test]
    fn limits_are_checked_at_start_up() {
        assert!(IngressConfig::default().validate().is_ok());
        for bad in [
            IngressConfig {
                max_recipients: 99,
                ..IngressConfig::default()
            },
            IngressConfig {
                max_recipients: 5000,
                ..IngressConfig::default()
            },
            IngressConfig {
                max_command_line: 100,
                ..IngressConfig::default()
            },
            IngressConfig {
                hostname: "two words".into(),
                ..IngressConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
