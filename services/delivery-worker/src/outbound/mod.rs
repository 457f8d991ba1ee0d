//! Outbound delivery: consumes the outbound topic (remote recipients handed over by
//! the local path, bounces to remote senders), finds each domain's MX hosts and
//! relays over SMTP. A temporary failure puts the message in a due-time index in
//! object storage (`schedule`) and lets the partition move on; a scanner publishes
//! due entries again. Permanent failures, and temporary ones past the lifetime, go
//! back to the sender as RFC 3464 reports; a delay notice goes out once after
//! `delay_notify_after`. Null senders never get either. Domains with an MTA-STS
//! policy in `enforce` mode get their mail only over authenticated TLS to the MX
//! hosts the policy names (`mta_sts`).

pub mod client;
pub mod mta_sts;
pub mod route;
pub use mailmesh_storage::retry_index as schedule;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
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

use crate::dsn::{Failure, Success, delay_report, failure_report, success_report};
use crate::worker::{
    BodyError, NotDone, Source, Subscribed, WorkerConfig, consume, publish_envelope, publish_raw,
    read_body,
};
use client::{ClientConfig, Connection, RecipientResult, SessionError, Tls};
use mta_sts::{Mode, MtaSts, Policy};
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
    /// Deliver to MX hosts on loopback, private, link-local and other non-public
    /// addresses (tests, or a relay inside your network). Off: a domain's MX
    /// cannot point the workers at internal services or back at this cluster.
    pub allow_private_destinations: bool,
    /// PEM files of trust anchors for authenticated TLS (MTA-STS policy and MX
    /// hosts), in addition to the system's.
    pub tls_ca_files: Vec<PathBuf>,
    pub dns: route::DnsConfig,
    pub mta_sts: mta_sts::MtaStsConfig,
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
            allow_private_destinations: false,
            tls_ca_files: Vec::new(),
            dns: route::DnsConfig::default(),
            mta_sts: mta_sts::MtaStsConfig::default(),
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

/// What a due entry's record carries of its waits: attempts made, notice sent.
fn retry_headers(waiting: &schedule::Waiting) -> Vec<(String, Bytes)> {
    vec![
        (
            ATTEMPTS.to_owned(),
            Bytes::from(waiting.attempts.to_string()),
        ),
        (
            DELAY_NOTIFIED.to_owned(),
            Bytes::from_static(if waiting.delay_notified { b"1" } else { b"0" }),
        ),
    ]
}

/// A record ready for its attempt.
struct Job {
    envelope: Envelope,
    message: Bytes,
    /// Attempts made before this one.
    attempts: u32,
    delay_notified: bool,
}

/// What an attempt leaves to make durable.
struct Settled {
    bounce: Option<Envelope>,
    notice: Option<Envelope>,
    /// "Relayed" notices for NOTIFY=SUCCESS to servers without DSN.
    relayed: Option<Envelope>,
    again: Option<Again>,
}

struct Again {
    envelope: Envelope,
    due: SystemTime,
    wait: Duration,
    notified: bool,
    last_error: String,
}

/// How one recipient fared.
enum Outcome {
    /// The MX host, its address and its reply; `notifies`: whether that server
    /// takes over delivery notices (DSN).
    Delivered {
        reply: String,
        host: String,
        ip: std::net::IpAddr,
        notifies: bool,
    },
    /// `remote`: the MX host whose reply `diagnostic` is (none for local causes).
    Temporary {
        status: String,
        diagnostic: String,
        remote: Option<String>,
    },
    Permanent {
        status: String,
        diagnostic: String,
        remote: Option<String>,
    },
}

pub struct Outbound {
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    cache: Arc<dyn Cache>,
    config: OutboundConfig,
    worker: WorkerConfig,
    router: Arc<Router>,
    client: Arc<ClientConfig>,
    tls: Arc<rustls::ClientConfig>,
    /// Verifies certificates (MTA-STS).
    verified: Arc<rustls::ClientConfig>,
    mta_sts: MtaSts,
    idle: Mutex<HashMap<SocketAddr, Vec<(Instant, Connection)>>>,
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
    limits: EnvelopeLimits,
    subscribed: Subscribed,
}

impl Outbound {
    pub fn new(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        cache: Arc<dyn Cache>,
        config: OutboundConfig,
        worker: WorkerConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let router = Arc::new(Router::new(&config.dns)?);
        let verified = mailmesh_kit::tls::verified_client_config(&config.tls_ca_files)?;
        let mta_sts = MtaSts::new(
            config.mta_sts.clone(),
            cache.clone(),
            router.clone(),
            &verified,
            config.allow_private_destinations,
        )?;
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
            verified,
            mta_sts,
            idle: Mutex::new(HashMap::new()),
            destinations: Mutex::new(HashMap::new()),
            limits: EnvelopeLimits::default(),
            subscribed: Subscribed::default(),
        }))
    }

    /// Completes once [`Self::run`] has created its group consumer.
    pub fn subscribed(&self) -> tokio::sync::oneshot::Receiver<()> {
        self.subscribed.receiver()
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
        let scanner = tokio::spawn(
            crate::due::DueScan {
                objects: self.objects.clone(),
                cache: self.cache.clone(),
                queue: self.queue.clone(),
                prefix: self.config.retry_prefix.clone(),
                topic: topic.clone(),
                lock: "outbound:retry",
                every: self.config.retry_scan_interval,
                headers: retry_headers,
            }
            .run(shutdown.clone()),
        );
        let sweeper = tokio::spawn(self.clone().sweep(shutdown.clone()));
        let this = self.clone();
        let consumed = consume(
            Source {
                queue: &*self.queue,
                subscribed: &self.subscribed,
                group: &self.config.group,
                topic: &topic,
            },
            self.config.concurrency,
            &shutdown,
            |r| tracing::info_span!("relay_record", partition = r.partition, offset = r.offset),
            move |record, stop| {
                let this = this.clone();
                async move { this.finish(&record, &stop).await }
            },
        )
        .await;
        scanner.abort();
        sweeper.abort();
        consumed
    }

    /// Handles a record: one delivery attempt, then its outcomes made durable
    /// (retried until they are, without sending again); false if the process stops
    /// first (the record comes again, and recipients already done are skipped).
    async fn finish(&self, record: &Record, shutdown: &Shutdown) -> bool {
        let mut backoff = self.worker.retry_initial;
        let mut pause = async |reason: String| {
            tracing::warn!(%reason, retry_in = ?backoff, "outbound record not finished");
            let stopped = tokio::select! {
                _ = shutdown.stopped() => true,
                _ = tokio::time::sleep(backoff) => false,
            };
            backoff = (backoff * 2).min(self.worker.retry_max);
            stopped
        };
        let job = loop {
            match self.prepare(record).await {
                Ok(Some(job)) => break job,
                Ok(None) => return true,
                Err(NotDone(reason)) => {
                    if pause(reason).await {
                        return false;
                    }
                }
            }
        };
        let outcomes = self.attempt_all(&job).await;
        // Failed for good: remembered only once the report is durable, so a record
        // that comes back before then is tried (and reported) again.
        let failed: Vec<Recipient> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Permanent { .. }))
            .map(|(r, _)| r.clone())
            .collect();
        let settled = self.settle(&job, outcomes);
        loop {
            match self.persist(&job, &settled).await {
                Ok(()) => {
                    self.mark_done(&job.envelope, failed.iter()).await;
                    // A message waiting in the due-time index keeps its claim there.
                    if settled.again.is_none() {
                        crate::bodies::release_body(&*self.objects, &job.envelope.body).await;
                    }
                    return true;
                }
                Err(NotDone(reason)) => {
                    if pause(reason).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Decodes the record and reads its message; `None` when it was parked as
    /// undeliverable (undecodable, or its body is gone).
    async fn prepare(&self, record: &Record) -> Result<Option<Job>, NotDone> {
        let park = async |reason: String| {
            tracing::error!(%reason, "parking an outbound record");
            publish_raw(
                &*self.queue,
                &self.worker.dead_letter_topic,
                record.key.clone(),
                record.payload.clone(),
                &reason,
            )
            .await
            .map(|()| None)
        };
        let envelope = match decode_envelope(&record.payload, &self.limits) {
            Ok(e) => e,
            Err(e) => return park(e.to_string()).await,
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
            Err(BodyError::Missing(reason)) => return park(reason).await,
            Err(BodyError::Finished(reason)) => {
                tracing::info!(queue_id = %envelope.queue_id, %reason, "a finished outbound record came again; nothing to do");
                crate::metrics::relayed("replayed");
                return Ok(None);
            }
            Err(BodyError::Unavailable(reason)) => return Err(NotDone(reason)),
        };
        Ok(Some(Job {
            envelope,
            message,
            attempts,
            delay_notified,
        }))
    }

    /// The cache key saying a recipient of a message needs nothing more.
    fn done_key(envelope: &Envelope, recipient: &Recipient) -> String {
        format!(
            "outbound:done:{}:{}",
            envelope.queue_id,
            recipient.address.to_string().to_lowercase()
        )
    }

    /// One attempt for every recipient not already done (a record seen again after
    /// a crash or a redelivery), grouped by domain, the domains at once.
    async fn attempt_all(&self, job: &Job) -> Vec<(Recipient, Outcome)> {
        let mut by_domain: BTreeMap<String, Vec<&Recipient>> = BTreeMap::new();
        for r in &job.envelope.recipients {
            let key = Self::done_key(&job.envelope, r);
            // An unreachable cache only means the check is skipped.
            if matches!(self.cache.get(&key).await, Ok(Some(_))) {
                tracing::info!(queue_id = %job.envelope.queue_id, recipient = %r.address, "already done; not sent again");
                continue;
            }
            by_domain
                .entry(r.address.domain().as_str().to_ascii_lowercase())
                .or_default()
                .push(r);
        }
        let per_domain = by_domain
            .iter()
            .map(|(domain, rcpts)| self.deliver_domain(domain, rcpts, &job.envelope, &job.message));
        let outcomes: Vec<(Recipient, Outcome)> = futures::future::join_all(per_domain)
            .await
            .into_iter()
            .flatten()
            .collect();
        // Sent: never again, even if the record comes back before its outcomes
        // are durable (a notice may then be lost, never a message sent twice).
        let sent = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Delivered { .. }))
            .map(|(r, _)| r);
        self.mark_done(&job.envelope, sent).await;
        outcomes
    }

    /// Remembers recipients with a final outcome for the message's lifetime.
    async fn mark_done<'a>(&self, envelope: &Envelope, done: impl Iterator<Item = &'a Recipient>) {
        let remember = self.worker.max_lifetime + Duration::from_secs(24 * 3600);
        for r in done {
            let key = Self::done_key(envelope, r);
            let _ = self
                .cache
                .set(&key, Bytes::from_static(b"1"), Some(remember))
                .await;
        }
    }

    /// What the outcomes mean: reports to send, and what waits for another attempt.
    fn settle(&self, job: &Job, outcomes: Vec<(Recipient, Outcome)>) -> Settled {
        let envelope = &job.envelope;
        let expired = envelope
            .received_at
            .elapsed()
            .is_ok_and(|age| age > self.worker.max_lifetime);
        let mut failures = Vec::new();
        let mut retry: Vec<Failure> = Vec::new();
        let mut relayed = Vec::new();
        let queue_id = &envelope.queue_id;
        for (recipient, outcome) in outcomes {
            let address = &recipient.address;
            match outcome {
                Outcome::Delivered {
                    reply,
                    host,
                    ip,
                    notifies,
                } => {
                    crate::metrics::relayed("delivered");
                    tracing::info!(%queue_id, recipient = %address, %host, %ip, %reply, "relayed");
                    // RFC 3461 6.2.7.4: a server without DSN cannot tell the sender
                    // of the delivery, so this one says it relayed the message.
                    if !notifies && recipient.notify.success {
                        relayed.push(Failure {
                            recipient,
                            status: "2.0.0".into(),
                            diagnostic: reply,
                            remote_mta: Some(host),
                        });
                    }
                }
                Outcome::Permanent {
                    status,
                    diagnostic,
                    remote,
                } => {
                    crate::metrics::relayed("failed");
                    tracing::warn!(%queue_id, recipient = %address, %status, %diagnostic, remote = remote.as_deref().unwrap_or("-"), "relay failed");
                    failures.push(Failure {
                        recipient,
                        status,
                        diagnostic,
                        remote_mta: remote,
                    });
                }
                Outcome::Temporary {
                    diagnostic, remote, ..
                } if expired => {
                    crate::metrics::relayed("expired");
                    tracing::warn!(%queue_id, recipient = %address, %diagnostic, "delivery time expired");
                    failures.push(Failure {
                        recipient,
                        status: "4.4.7".into(),
                        diagnostic: format!("delivery time expired; last error: {diagnostic}"),
                        remote_mta: remote,
                    });
                }
                Outcome::Temporary {
                    status,
                    diagnostic,
                    remote,
                } => {
                    crate::metrics::relayed("deferred");
                    retry.push(Failure {
                        recipient,
                        status,
                        diagnostic,
                        remote_mta: remote,
                    });
                }
            }
        }
        let mta = &self.worker.hostname;
        let bounce = failure_report(envelope, &job.message, &failures, mta);
        let relayed = success_report(envelope, &job.message, &relayed, mta, Success::Relayed);
        if retry.is_empty() {
            return Settled {
                bounce,
                notice: None,
                relayed,
                again: None,
            };
        }
        let schedule = &self.config.retry_schedule;
        let wait = schedule[(job.attempts as usize).min(schedule.len() - 1)];
        let until = envelope.received_at + self.worker.max_lifetime;
        let late = envelope
            .received_at
            .elapsed()
            .is_ok_and(|age| age >= self.config.delay_notify_after);
        let notice = (late && !job.delay_notified)
            .then(|| delay_report(envelope, &job.message, &retry, mta, until))
            .flatten();
        let last_error = retry
            .first()
            .map(|f| match &f.remote_mta {
                Some(host) => format!("{} (from {host})", f.diagnostic),
                None => f.diagnostic.clone(),
            })
            .unwrap_or_default();
        let due = (SystemTime::now() + wait).min(until.max(SystemTime::now()));
        let waiting = Envelope {
            recipients: retry.into_iter().map(|f| f.recipient).collect(),
            ..envelope.clone()
        };
        Settled {
            bounce,
            notice,
            relayed,
            again: Some(Again {
                envelope: waiting,
                due,
                wait,
                notified: job.delay_notified || late,
                last_error,
            }),
        }
    }

    /// Makes the settled outcomes durable: reports queued, the rest in the index.
    /// Safe to repeat (reports have derived queue ids, the index key is fixed).
    async fn persist(&self, job: &Job, settled: &Settled) -> Result<(), NotDone> {
        for report in settled
            .bounce
            .iter()
            .chain(&settled.notice)
            .chain(&settled.relayed)
        {
            publish_envelope(&*self.queue, &self.worker.topic, report, Vec::new()).await?;
            tracing::info!(
                queue_id = %job.envelope.queue_id,
                report = %report.queue_id,
                to = %report.recipients.first().map(|r| r.address.to_string()).unwrap_or_default(),
                "delivery report queued"
            );
        }
        let Some(again) = &settled.again else {
            return Ok(());
        };
        schedule::put(
            &*self.objects,
            &self.config.retry_prefix,
            again.due,
            &again.envelope,
            job.attempts + 1,
            again.notified,
            &again.last_error,
        )
        .await
        .map_err(|e| NotDone(format!("writing the retry entry: {e}")))?;
        tracing::info!(queue_id = %again.envelope.queue_id, recipients = again.envelope.recipients.len(), retry_in = ?again.wait, last_error = %again.last_error, "delivery deferred");
        Ok(())
    }

    /// Removes queue bodies no record can need any more (`bodies::sweep`), one
    /// worker at a time: the cache lock is kept for the interval, so the others skip
    /// it; without the cache nobody sweeps.
    async fn sweep(self: Arc<Self>, shutdown: Shutdown) {
        let every = self.worker.body_sweep_interval;
        loop {
            tokio::select! {
                _ = shutdown.closing() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.cache.try_lock("delivery:body-sweep", every).await {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "no queue-body sweep: the cache is unavailable");
                    continue;
                }
            }
            let before = SystemTime::now() - (self.worker.max_lifetime + self.worker.body_grace);
            match crate::bodies::sweep(&*self.objects, before).await {
                Ok(swept) if swept.objects > 0 => {
                    tracing::info!(
                        objects = swept.objects,
                        bytes = swept.bytes,
                        "old queue bodies removed"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "the queue-body sweep failed"),
            }
        }
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
                remote: None,
            });
        };
        let hosts = match self.router.hosts(domain).await {
            Ok(hosts) => hosts,
            Err(RouteError::Permanent { status, reason }) => {
                // A local finding (no such domain, null MX), not a reply anybody
                // gave: reported as `X-mailmesh`, never as an invented SMTP reply.
                return all(&|| Outcome::Permanent {
                    status: status.into(),
                    diagnostic: reason.clone(),
                    remote: None,
                });
            }
            Err(RouteError::Temporary(reason)) => {
                return all(&|| Outcome::Temporary {
                    status: "4.4.3".into(),
                    diagnostic: reason.clone(),
                    remote: None,
                });
            }
        };
        let implicit = hosts.len() == 1 && hosts[0].eq_ignore_ascii_case(domain);
        let policy = self.mta_sts.policy(domain).await;
        let mut last = format!("no MX host of {domain} could be reached");
        // 4.7.5 when the policy ruled out every host (RFC 8461 5: never a bounce
        // before the policy has been looked up again, so a temporary failure).
        let mut refused_by_policy = false;
        // Hosts an enforced policy does not list are never tried (nor counted
        // against max_mx_hosts).
        let listed: Vec<&String> = hosts
            .iter()
            .filter(|host| match &policy {
                Some(p) if !p.allows(host) => {
                    if p.mode == Mode::Enforce {
                        tracing::warn!(%domain, %host, "MX host not in the domain's MTA-STS policy; skipped");
                        last = format!("MX host {host} is not in {domain}'s MTA-STS policy");
                        refused_by_policy = true;
                        return false;
                    }
                    tracing::warn!(%domain, %host, "MTA-STS testing: MX host not in the policy");
                    true
                }
                _ => true,
            })
            .collect();
        for host in listed.into_iter().take(self.config.max_mx_hosts) {
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
                if implicit {
                    // No MX and no address: nowhere to deliver, ever.
                    return all(&|| Outcome::Permanent {
                        status: "5.1.2".into(),
                        diagnostic: format!("{domain} has no MX and no address"),
                        remote: None,
                    });
                }
                last = format!("MX host {host} has no address");
            }
            for ip in addresses.into_iter().take(2) {
                let ip = ip.to_canonical();
                if !self.config.allow_private_destinations && !public(ip) {
                    last = format!("MX host {host} points at a non-public address ({ip})");
                    continue;
                }
                let peer = SocketAddr::new(ip, self.config.port);
                match self
                    .attempt(peer, host, policy.as_ref(), envelope, recipients, message)
                    .await
                {
                    Ok((results, notifies)) => {
                        return recipients
                            .iter()
                            .zip(results)
                            .map(|(r, result)| {
                                (Recipient::clone(r), outcome(host, peer, result, notifies))
                            })
                            .collect();
                    }
                    Err(e @ SessionError::AfterData(_)) => {
                        // Maybe delivered: not to another host now, later at most.
                        tracing::warn!(%host, %peer, error = %e, "outcome unknown; deferring");
                        let diagnostic = format!("{host}[{}]: {e}", peer.ip());
                        return all(&|| Outcome::Temporary {
                            status: "4.4.2".into(),
                            diagnostic: diagnostic.clone(),
                            remote: Some(host.clone()),
                        });
                    }
                    Err(e) => {
                        tracing::info!(%host, %peer, error = %e, "MX host failed; trying the next");
                        let by_policy = matches!(e, SessionError::TlsRequired(_))
                            || (matches!(e, SessionError::Tls(_)) && policy.is_some());
                        refused_by_policy |= by_policy;
                        last = format!("{host}[{}]: {e}", peer.ip());
                        if by_policy {
                            last.push_str(&format!(" (MTA-STS policy of {domain})"));
                        }
                    }
                }
            }
        }
        let status = if refused_by_policy { "4.7.5" } else { "4.4.1" };
        all(&|| Outcome::Temporary {
            status: status.into(),
            diagnostic: last.clone(),
            remote: None,
        })
    }

    /// One transaction with `peer`, on an idle connection if there is one (a
    /// connection that fails then is replaced by a new one once). Under an MTA-STS
    /// policy the connection must be authenticated as `host`; in `testing` mode a
    /// failure to authenticate is logged and the delivery goes on as usual. With the
    /// results: whether the server takes DSN requests (it then sends the notices).
    async fn attempt(
        &self,
        peer: SocketAddr,
        host: &str,
        policy: Option<&Policy>,
        envelope: &Envelope,
        recipients: &[&Recipient],
        message: &[u8],
    ) -> Result<(Vec<RecipientResult>, bool), SessionError> {
        if let Some(mut conn) = self.take_idle(peer, policy.is_some().then_some(host)) {
            match conn.transaction(envelope, recipients, message).await {
                Ok(results) => {
                    let notifies = conn.extensions.dsn;
                    self.put_idle(conn);
                    return Ok((results, notifies));
                }
                Err(e @ SessionError::AfterData(_)) => return Err(e),
                // The server had closed the idle connection: a new one.
                Err(_) => {}
            }
        }
        if let Some(p) = policy {
            let opened = Connection::open(
                peer,
                host,
                self.client.clone(),
                Tls::Authenticated(&self.verified),
            )
            .await;
            match opened {
                Err(e @ (SessionError::Tls(_) | SessionError::TlsRequired(_)))
                    if p.mode == Mode::Testing =>
                {
                    tracing::warn!(%host, %peer, error = %e, "MTA-STS testing: no authenticated TLS; delivering as usual");
                }
                opened => return self.send_on(opened?, envelope, recipients, message).await,
            }
        }
        let opened = Connection::open(
            peer,
            host,
            self.client.clone(),
            Tls::Opportunistic(&self.tls),
        )
        .await;
        let conn = match opened {
            Err(SessionError::Tls(e)) => {
                // Opportunistic TLS must not make mail undeliverable: a server whose
                // TLS we cannot speak (old versions, broken certificates) gets it
                // in clear, as it would from most MTAs.
                tracing::info!(%host, %peer, error = %e, "STARTTLS failed; delivering without TLS");
                Connection::open(peer, host, self.client.clone(), Tls::Off).await?
            }
            other => other?,
        };
        self.send_on(conn, envelope, recipients, message).await
    }

    /// One transaction on a new connection, kept for reuse afterwards.
    async fn send_on(
        &self,
        mut conn: Connection,
        envelope: &Envelope,
        recipients: &[&Recipient],
        message: &[u8],
    ) -> Result<(Vec<RecipientResult>, bool), SessionError> {
        let results = conn.transaction(envelope, recipients, message).await?;
        let notifies = conn.extensions.dsn;
        self.put_idle(conn);
        Ok((results, notifies))
    }

    /// An idle connection to `peer`; with `authenticated_as`, only one whose
    /// certificate was verified for that host (others stay for other mail).
    fn take_idle(&self, peer: SocketAddr, authenticated_as: Option<&str>) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&peer)?;
        let fresh = self.config.reuse_connections_for;
        list.retain(|(since, conn)| since.elapsed() < fresh && conn.reusable());
        let wanted = authenticated_as.map(|h| h.trim_end_matches('.').to_ascii_lowercase());
        let at = list.iter().rposition(|(_, conn)| match &wanted {
            Some(host) => conn.authenticated.as_deref() == Some(host.as_str()),
            None => true,
        })?;
        Some(list.remove(at).1)
    }

    fn put_idle(&self, conn: Connection) {
        if self.config.reuse_connections_for.is_zero() || !conn.reusable() {
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
        if list.len() >= self.config.per_destination && conn.authenticated.is_some() {
            // Many domains share large providers' MX hosts: an authenticated
            // connection (only MTA-STS mail may use it) takes the place of a plain one.
            if let Some(at) = list.iter().position(|(_, c)| c.authenticated.is_none()) {
                let (_, plain) = list.remove(at);
                tokio::spawn(plain.quit());
            }
        }
        if list.len() < self.config.per_destination {
            list.push((Instant::now(), conn));
        } else {
            tokio::spawn(conn.quit());
        }
    }
}

/// An address mail may be relayed to: not loopback, private, link-local, shared
/// (CGNAT), multicast, documentation or otherwise reserved space.
fn public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// `notifies`: the server took the DSN parameters (its notices are its own).
fn outcome(host: &str, peer: SocketAddr, result: RecipientResult, notifies: bool) -> Outcome {
    match result {
        RecipientResult::Delivered(reply) => Outcome::Delivered {
            reply: reply.to_string(),
            host: host.to_owned(),
            ip: peer.ip(),
            notifies,
        },
        RecipientResult::Failed(reply) if reply.is_permanent() => Outcome::Permanent {
            status: reply.status(),
            diagnostic: reply.to_string(),
            remote: Some(host.to_owned()),
        },
        RecipientResult::Failed(reply) => Outcome::Temporary {
            status: reply.status(),
            diagnostic: reply.to_string(),
            remote: Some(host.to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::public;

    #[test]
    fn only_public_addresses_are_destinations() {
        assert!(public("8.8.8.8".parse().unwrap()));
        assert!(public("2a00:1450:4001::1".parse().unwrap()));
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "2001:db8::1",
        ] {
            assert!(!public(ip.parse().unwrap()), "{ip}");
        }
        // An IPv4 address written as IPv6 is judged as IPv4 (after to_canonical).
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(!public(mapped.to_canonical()));
    }
}
