//! Outbound delivery: consumes the outbound topic (remote recipients handed over by
//! the local path, bounces to remote senders), finds each domain's MX hosts and
//! relays over SMTP. A temporary failure puts the message in a due-time index in
//! object storage (`schedule`) and lets the partition move on; a scanner publishes
//! due entries again. Permanent failures, and temporary ones past the lifetime, go
//! back to the sender as RFC 3464 reports; a delay notice goes out once after
//! `delay_notify_after`. Null senders never get either.

pub mod client;
pub mod route;
pub use mailmesh_storage::retry_index as schedule;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use mailmesh_cache::Cache;
use mailmesh_kit::Shutdown;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_proto::decode_envelope;
use mailmesh_queue::{Queue, Record};
use mailmesh_types::{Envelope, EnvelopeLimits, Recipient};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::dsn::{Failure, delay_report, failure_report};
use crate::worker::{BodyError, NotDone, WorkerConfig, publish_envelope, publish_raw, read_body};
use client::{ClientConfig, Connection, RecipientResult, SessionError};
use route::{RouteError, Router};

/// `[outbound]`: relaying to other domains' MX hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Consume the outbound topic in this process.
    pub enabled: bool,
    pub group: String,
    /// Records relayed at once.
    pub concurrency: usize,
    /// Connections to one destination domain at once.
    pub per_destination: usize,
    /// The port MX hosts listen on (25; tests point it elsewhere).
    pub port: u16,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// STARTTLS whenever offered (encrypted, server not authenticated).
    pub opportunistic_tls: bool,
    /// An idle connection is kept this long for the next message to its host.
    #[serde(with = "humantime_serde")]
    pub reuse_connections_for: Duration,
    /// MX hosts tried per domain, best first.
    pub max_mx_hosts: usize,
    /// Waits before each further attempt; the last one repeats until the worker's
    /// `max_lifetime`.
    #[serde(deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// After this long undelivered, the sender gets one delay notice.
    #[serde(with = "humantime_serde")]
    pub delay_notify_after: Duration,
    /// Object-store prefix of the due-time index.
    pub retry_prefix: String,
    /// How often the due-time index is looked at.
    #[serde(with = "humantime_serde")]
    pub retry_scan_interval: Duration,
    /// Accept MX hosts on loopback addresses (tests; in production a sign of a
    /// misconfiguration or a loop).
    pub allow_loopback: bool,
    pub dns: route::DnsConfig,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(n * 60);
        Self {
            enabled: true,
            group: "delivery-worker-outbound".into(),
            concurrency: 64,
            per_destination: 10,
            port: 25,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            opportunistic_tls: true,
            reuse_connections_for: Duration::from_secs(30),
            max_mx_hosts: 5,
            retry_schedule: vec![m(5), m(10), m(30), m(60), m(120), m(240)],
            delay_notify_after: m(240),
            retry_prefix: schedule::DEFAULT_PREFIX.into(),
            retry_scan_interval: Duration::from_secs(5),
            allow_loopback: false,
            dns: route::DnsConfig::default(),
        }
    }
}

impl mailmesh_kit::config::Validate for OutboundConfig {
    fn validate(&self) -> Result<(), mailmesh_kit::ConfigError> {
        use mailmesh_kit::ConfigError;
        if !(1..=10_000).contains(&self.concurrency) || self.per_destination == 0 {
            return Err(ConfigError::invalid(
                "outbound.concurrency",
                "concurrency must be 1 to 10000 and per_destination above zero",
            ));
        }
        if self.retry_schedule.is_empty() || self.retry_schedule.iter().any(Duration::is_zero) {
            return Err(ConfigError::invalid(
                "outbound.retry_schedule",
                "needs at least one wait, none of them zero",
            ));
        }
        if self.max_mx_hosts == 0 || self.retry_scan_interval.is_zero() {
            return Err(ConfigError::invalid(
                "outbound",
                "max_mx_hosts and retry_scan_interval must be above zero",
            ));
        }
        Ok(())
    }
}

/// A list of durations written as humantime strings (`["5m", "1h"]`).
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let list: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(d)?;
    Ok(list
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

/// Record headers of a message coming back from the due-time index.
const ATTEMPTS: &str = "mailmesh-attempts";
const DELAY_NOTIFIED: &str = "mailmesh-delay-notified";

/// How one recipient fared.
enum Outcome {
    Delivered,
    Temporary { status: String, diagnostic: String },
    Permanent { status: String, diagnostic: String },
}

pub struct Outbound {
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    cache: Arc<dyn Cache>,
    config: OutboundConfig,
    worker: WorkerConfig,
    router: Router,
    client: Arc<ClientConfig>,
    tls: Arc<rustls::ClientConfig>,
    idle: Mutex<HashMap<SocketAddr, Vec<(Instant, Connection)>>>,
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
    limits: EnvelopeLimits,
}

impl Outbound {
    pub fn new(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        cache: Arc<dyn Cache>,
        config: OutboundConfig,
        worker: WorkerConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let router = Router::new(&config.dns)?;
        let client = Arc::new(ClientConfig {
            hostname: worker.hostname.clone(),
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            data_timeout: config.data_timeout,
            opportunistic_tls: config.opportunistic_tls,
        });
        Ok(Arc::new(Self {
            queue,
            objects,
            cache,
            config,
            worker,
            router,
            client,
            tls: mailmesh_kit::tls::opportunistic_client_config(),
            idle: Mutex::new(HashMap::new()),
            destinations: Mutex::new(HashMap::new()),
            limits: EnvelopeLimits::default(),
        }))
    }

    /// Consumes the outbound topic and scans the due-time index until the shutdown
    /// closes; records in flight then finish within the drain.
    pub async fn run(
        self: Arc<Self>,
        shutdown: Shutdown,
    ) -> Result<(), mailmesh_queue::QueueError> {
        let topic = self.worker.outbound_topic.clone();
        for t in [&topic, &self.worker.topic, &self.worker.dead_letter_topic] {
            self.queue
                .ensure_topic(t, self.worker.topic_partitions)
                .await?;
        }
        let scanner = tokio::spawn(self.clone().scan(shutdown.clone()));
        let mut consumer = self.queue.consumer(&self.config.group, &[&topic]).await?;
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        loop {
            let delivery = tokio::select! {
                _ = shutdown.closing() => break,
                d = consumer.recv() => d,
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "receiving from the outbound topic failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            let stop = shutdown.clone();
            let span = tracing::info_span!(
                "relay_record",
                partition = delivery.record.partition,
                offset = delivery.record.offset
            );
            let carrier: BTreeMap<String, String> = delivery
                .record
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.to_vec()).ok()?)))
                .collect();
            mailmesh_kit::telemetry::extract_context(&span, &carrier);
            shutdown.spawn(
                async move {
                    if this.finish(&delivery.record, &stop).await {
                        delivery.ack.done();
                    }
                    drop(slot);
                }
                .instrument(span),
            );
        }
        let all = u32::try_from(self.config.concurrency).unwrap_or(u32::MAX);
        tokio::select! {
            _ = slots.acquire_many(all) => {}
            _ = shutdown.stopped() => {}
        }
        scanner.abort();
        consumer.close().await
    }

    /// Handles a record until its outcomes are durable; false if the process stops
    /// first (the record comes again).
    async fn finish(&self, record: &Record, shutdown: &Shutdown) -> bool {
        let mut backoff = self.worker.retry_initial;
        loop {
            match self.handle(record).await {
                Ok(()) => return true,
                Err(NotDone(reason)) => {
                    tracing::warn!(%reason, retry_in = ?backoff, "outbound record not finished");
                    tokio::select! {
                        _ = shutdown.stopped() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.worker.retry_max);
                }
            }
        }
    }

    async fn handle(&self, record: &Record) -> Result<(), NotDone> {
        let envelope = match decode_envelope(&record.payload, &self.limits) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "parking an outbound record that cannot be decoded");
                return publish_raw(
                    &*self.queue,
                    &self.worker.dead_letter_topic,
                    record.key.clone(),
                    record.payload.clone(),
                    &e.to_string(),
                )
                .await;
            }
        };
        let header = |name: &str| {
            record
                .header(name)
                .and_then(|v| std::str::from_utf8(v).ok().map(str::to_owned))
        };
        let attempts: u32 = header(ATTEMPTS).and_then(|v| v.parse().ok()).unwrap_or(0);
        let delay_notified = header(DELAY_NOTIFIED).is_some_and(|v| v == "1");
        let message = match read_body(&*self.objects, &envelope).await {
            Ok(m) => m,
            Err(BodyError::Missing(reason)) => {
                tracing::error!(%reason, "parking an outbound record without a body");
                return publish_raw(
                    &*self.queue,
                    &self.worker.dead_letter_topic,
                    record.key.clone(),
                    record.payload.clone(),
                    &reason,
                )
                .await;
            }
            Err(BodyError::Unavailable(reason)) => return Err(NotDone(reason)),
        };
        self.relay(&envelope, &message, attempts, delay_notified)
            .await
    }

    /// One attempt for every recipient of `envelope`, then what follows from it.
    async fn relay(
        &self,
        envelope: &Envelope,
        message: &Bytes,
        attempts: u32,
        delay_notified: bool,
    ) -> Result<(), NotDone> {
        let mut by_domain: BTreeMap<String, Vec<&Recipient>> = BTreeMap::new();
        for r in &envelope.recipients {
            by_domain
                .entry(r.address.domain().as_str().to_ascii_lowercase())
                .or_default()
                .push(r);
        }
        let attempts_here = by_domain
            .iter()
            .map(|(domain, rcpts)| self.deliver_domain(domain, rcpts, envelope, message));
        let results = futures::future::join_all(attempts_here).await;

        let expired = envelope
            .received_at
            .elapsed()
            .is_ok_and(|age| age > self.worker.max_lifetime);
        let mut failures = Vec::new();
        let mut retry: Vec<Failure> = Vec::new();
        for (recipient, outcome) in results.into_iter().flatten() {
            match outcome {
                Outcome::Delivered => crate::metrics::relayed("delivered"),
                Outcome::Permanent { status, diagnostic } => {
                    crate::metrics::relayed("failed");
                    failures.push(Failure {
                        recipient,
                        status,
                        diagnostic,
                    });
                }
                Outcome::Temporary { diagnostic, .. } if expired => {
                    crate::metrics::relayed("expired");
                    failures.push(Failure {
                        recipient,
                        status: "4.4.7".into(),
                        diagnostic: format!("delivery time expired; last error: {diagnostic}"),
                    });
                }
                Outcome::Temporary { status, diagnostic } => {
                    crate::metrics::relayed("deferred");
                    retry.push(Failure {
                        recipient,
                        status,
                        diagnostic,
                    });
                }
            }
        }
        let mta = &self.worker.hostname;
        if let Some(bounce) = failure_report(envelope, message, &failures, mta) {
            publish_envelope(&*self.queue, &self.worker.topic, &bounce, Vec::new()).await?;
        }
        if retry.is_empty() {
            return Ok(());
        }
        let wait = self.config.retry_schedule
            [(attempts as usize).min(self.config.retry_schedule.len() - 1)];
        let due = SystemTime::now() + wait;
        let until = envelope.received_at + self.worker.max_lifetime;
        let mut notified = delay_notified;
        let late = envelope
            .received_at
            .elapsed()
            .is_ok_and(|age| age >= self.config.delay_notify_after);
        if late && !delay_notified {
            if let Some(notice) = delay_report(envelope, message, &retry, mta, until) {
                publish_envelope(&*self.queue, &self.worker.topic, &notice, Vec::new()).await?;
            }
            notified = true;
        }
        let last_error = retry
            .first()
            .map(|f| f.diagnostic.clone())
            .unwrap_or_default();
        let again = Envelope {
            recipients: retry.into_iter().map(|f| f.recipient).collect(),
            ..envelope.clone()
        };
        schedule::put(
            &*self.objects,
            &self.config.retry_prefix,
            due.min(until.max(SystemTime::now())),
            &again,
            attempts + 1,
            notified,
            &last_error,
        )
        .await
        .map_err(|e| NotDone(format!("writing the retry entry: {e}")))?;
        tracing::info!(queue_id = %envelope.queue_id, recipients = again.recipients.len(), retry_in = ?wait, %last_error, "delivery deferred");
        Ok(())
    }

    /// Publishes due entries of the index to the outbound topic again. The cache
    /// decides which worker takes an entry; without the cache nothing is taken (a
    /// retry waits rather than going out twice).
    async fn scan(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.closing() => return,
                _ = tokio::time::sleep(self.config.retry_scan_interval) => {}
            }
            let keys = match schedule::due(
                &*self.objects,
                &self.config.retry_prefix,
                SystemTime::now(),
                1000,
            )
            .await
            {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the retry index failed");
                    continue;
                }
            };
            for key in keys {
                if shutdown.is_closing() {
                    return;
                }
                if let Err(e) = self.requeue(&key).await {
                    tracing::warn!(%key, error = %e, "re-queueing a due message failed");
                }
            }
        }
    }

    async fn requeue(&self, key: &str) -> anyhow::Result<()> {
        let lock = format!("outbound:retry:{key}");
        let Some(token) = self.cache.try_lock(&lock, Duration::from_secs(300)).await? else {
            return Ok(());
        };
        let result = async {
            let Some(waiting) = schedule::get(&*self.objects, key).await? else {
                return Ok(());
            };
            let headers = vec![
                (
                    ATTEMPTS.to_owned(),
                    Bytes::from(waiting.attempts.to_string()),
                ),
                (
                    DELAY_NOTIFIED.to_owned(),
                    Bytes::from_static(if waiting.delay_notified { b"1" } else { b"0" }),
                ),
            ];
            publish_envelope(
                &*self.queue,
                &self.worker.outbound_topic,
                &waiting.envelope,
                headers,
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.0))?;
            schedule::remove(&*self.objects, key).await?;
            anyhow::Ok(())
        }
        .await;
        let _ = self.cache.unlock(&lock, &token).await;
        result
    }

    fn destination(&self, domain: &str) -> Arc<Semaphore> {
        let mut all = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() > 10_000 {
            // Forget destinations nobody is sending to.
            let max = self.config.per_destination;
            all.retain(|_, s| s.available_permits() < max);
        }
        all.entry(domain.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.per_destination)))
            .clone()
    }

    /// Tries the domain's hosts in order until one gives an answer for the
    /// recipients; every recipient gets an outcome.
    async fn deliver_domain(
        &self,
        domain: &str,
        recipients: &[&Recipient],
        envelope: &Envelope,
        message: &Bytes,
    ) -> Vec<(Recipient, Outcome)> {
        let all = |outcome: &dyn Fn() -> Outcome| {
            recipients
                .iter()
                .map(|r| (Recipient::clone(r), outcome()))
                .collect::<Vec<_>>()
        };
        let Ok(_permit) = self.destination(domain).acquire_owned().await else {
            return all(&|| Outcome::Temporary {
                status: "4.3.0".into(),
                diagnostic: "shutting down".into(),
            });
        };
        let hosts = match self.router.hosts(domain).await {
            Ok(hosts) => hosts,
            Err(RouteError::Permanent { status, reason }) => {
                return all(&|| Outcome::Permanent {
                    status: status.into(),
                    diagnostic: format!("550 {status} {reason}"),
                });
            }
            Err(RouteError::Temporary(reason)) => {
                return all(&|| Outcome::Temporary {
                    status: "4.4.3".into(),
                    diagnostic: reason.clone(),
                });
            }
        };
        let mut last = format!("no MX host of {domain} could be reached");
        for host in hosts.iter().take(self.config.max_mx_hosts) {
            let addresses = match self.router.addresses(host).await {
                Ok(a) => a,
                Err(RouteError::Temporary(reason)) => {
                    last = reason;
                    continue;
                }
                Err(RouteError::Permanent { reason, .. }) => {
                    last = reason;
                    continue;
                }
            };
            if addresses.is_empty() {
                last = format!("MX host {host} has no address");
            }
            for ip in addresses.into_iter().take(2) {
                if !self.config.allow_loopback && (ip.is_loopback() || ip.is_unspecified()) {
                    last = format!("MX host {host} points at a local address ({ip})");
                    continue;
                }
                let peer = SocketAddr::new(ip, self.config.port);
                match self
                    .attempt(peer, host, envelope, recipients, message)
                    .await
                {
                    Ok(results) => {
                        return recipients
                            .iter()
                            .zip(results)
                            .map(|(r, result)| (Recipient::clone(r), outcome(host, peer, result)))
                            .collect();
                    }
                    Err(e) => {
                        tracing::info!(%host, %peer, error = %e, "MX host failed; trying the next");
                        last = format!("{host}[{}]: {e}", peer.ip());
                    }
                }
            }
        }
        all(&|| Outcome::Temporary {
            status: "4.4.1".into(),
            diagnostic: last.clone(),
        })
    }

    /// One transaction with `peer`, on an idle connection if there is one (a
    /// connection that fails then is replaced by a new one once).
    async fn attempt(
        &self,
        peer: SocketAddr,
        host: &str,
        envelope: &Envelope,
        recipients: &[&Recipient],
        message: &[u8],
    ) -> Result<Vec<RecipientResult>, SessionError> {
        if let Some(mut conn) = self.take_idle(peer)
            && let Ok(results) = conn.transaction(envelope, recipients, message).await
        {
            self.put_idle(conn);
            return Ok(results);
        }
        let mut conn = Connection::open(peer, host, self.client.clone(), Some(&self.tls)).await?;
        let results = conn.transaction(envelope, recipients, message).await?;
        self.put_idle(conn);
        Ok(results)
    }

    fn take_idle(&self, peer: SocketAddr) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&peer)?;
        while let Some((since, conn)) = list.pop() {
            if since.elapsed() < self.config.reuse_connections_for {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: Connection) {
        if self.config.reuse_connections_for.is_zero() {
            tokio::spawn(conn.quit());
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Stale connections are dropped (servers time them out anyway).
        let keep = self.config.reuse_connections_for;
        idle.retain(|_, list| {
            list.retain(|(since, _)| since.elapsed() < keep);
            !list.is_empty()
        });
        let list = idle.entry(conn.peer).or_default();
        if list.len() < self.config.per_destination {
            list.push((Instant::now(), conn));
        }
    }
}

fn outcome(host: &str, peer: SocketAddr, result: RecipientResult) -> Outcome {
    match result {
        RecipientResult::Delivered(reply) => {
            tracing::info!(%host, %peer, %reply, "relayed");
            Outcome::Delivered
        }
        RecipientResult::Failed(reply) if reply.is_permanent() => Outcome::Permanent {
            status: reply.status(),
            diagnostic: format!("{reply} (from {host}[{}])", peer.ip()),
        },
        RecipientResult::Failed(reply) => Outcome::Temporary {
            status: reply.status(),
            diagnostic: format!("{reply} (from {host}[{}])", peer.ip()),
        },
    }
}
