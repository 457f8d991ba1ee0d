//! The delivery worker: consumes the mail queue in a consumer group and delivers each
//! message to its local recipients, at least once, exactly once per mailbox.
//!
//! A record's offset is stored only when every recipient's outcome is durable: stored
//! in a mailbox, handed to the outbound topic, or reported in a bounce queued on the
//! mail topic. Records are handled concurrently, so a slow one (a storage outage being
//! retried) does not hold up the others. Recipients still failing after a short
//! retry in place (`retry_window`) wait in a due-time index in object storage,
//! visible to `mailctl queue list` with their reason, and go round the queue again
//! when due (`due`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mailmesh_cache::Cache;
use mailmesh_kit::Shutdown;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStore, ObjectStoreExt};
use mailmesh_proto::{decode_envelope, encode_envelope};
use mailmesh_queue::{OutgoingRecord, Queue, Record};
use mailmesh_storage::directory::Lookup;
use mailmesh_storage::engine::{Delivery, UserRef};
use mailmesh_storage::index::{INBOX, JUNK};
use mailmesh_storage::retry_index as schedule;
use mailmesh_types::{BodyRef, Domain, Envelope, EnvelopeLimits, ReversePath};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::dsn::{Failure, Success, failure_report, success_report};
use mailmesh_storage::client::{DeliveryError, Mailstore};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// The topic the front doors write accepted mail to.
    pub topic: String,
    /// Partitions of `topic` (and the outbound and dead-letter topics) if this
    /// worker is the first to create them. The chart sets the same value everywhere.
    pub topic_partitions: i32,
    pub group: String,
    /// Mail for remote recipients (forwarding aliases, bounces to remote senders)
    /// is handed to the outbound path here.
    pub outbound_topic: String,
    /// Records that cannot be decoded are parked here for an operator.
    pub dead_letter_topic: String,
    /// Records handled at once.
    pub concurrency: usize,
    /// Backoff between attempts in place after a temporary failure (doubling up
    /// to `retry_max`)…
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// …for this long (a full mailbox is not retried in place); then the
    /// recipients still failing wait in the due-time index under `retry_prefix`
    /// (listed by `mailctl queue list`), for `retry_initial` doubling per round up
    /// to `requeue_max`, and go back to the queue from there.
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    #[serde(with = "humantime_serde")]
    pub requeue_max: Duration,
    /// Where mail for local mailboxes waits in object storage (storage's
    /// `local_retry_prefix`, for `mailctl queue`).
    pub retry_prefix: String,
    /// How often each worker looks for due entries there.
    #[serde(with = "humantime_serde")]
    pub retry_scan_interval: Duration,
    /// Name in bounces (`Reporting-MTA`, `MAILER-DAEMON@…`).
    pub hostname: String,
    /// After this long a message still failing temporarily is bounced (4.4.7). Keep
    /// it well below the mailboxes' delivery-key memory (14 days).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Largest message sent to the storage service.
    pub max_message_bytes: usize,
    /// `[worker.srs]`: the envelope sender of mail an alias forwards to another
    /// domain is rewritten to an address of the alias's domain (SRS), so the
    /// platform's addresses never vouch (SPF) for a stranger's sender; bounces to it
    /// come back through smtp-ingress (the same secret as `[smtp.srs]`). Without it
    /// forwarded mail keeps its sender (and forwarding launders SPF).
    pub srs: Option<mailmesh_auth::srs::SrsConfig>,
    /// Forwarded copies up to this size travel inside the queue record; larger ones
    /// (with their ARC seal added) go to object storage first.
    pub inline_body_bytes: usize,
    /// Queue bodies in object storage are freed when the last record holding them
    /// finishes; what is left (a crash between, a parked record's body) is removed
    /// once older than `max_lifetime` plus this.
    #[serde(with = "humantime_serde")]
    pub body_grace: Duration,
    /// How often one worker (chosen through the cache) looks for such bodies.
    #[serde(with = "humantime_serde")]
    pub body_sweep_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            topic: "mail.queue".into(),
            topic_partitions: 12,
            group: "delivery-worker".into(),
            outbound_topic: "mail.outbound".into(),
            dead_letter_topic: "mail.queue.dead".into(),
            concurrency: 64,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            retry_window: Duration::from_secs(60),
            requeue_max: Duration::from_secs(15 * 60),
            retry_prefix: schedule::LOCAL_PREFIX.into(),
            retry_scan_interval: Duration::from_secs(5),
            hostname: "localhost".into(),
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            max_message_bytes: 64 << 20,
            srs: None,
            inline_body_bytes: 256 << 10,
            body_grace: Duration::from_secs(2 * 24 * 3600),
            body_sweep_interval: Duration::from_secs(3600),
        }
    }
}

impl mailmesh_kit::config::Validate for WorkerConfig {
    fn validate(&self) -> Result<(), mailmesh_kit::ConfigError> {
        use mailmesh_kit::ConfigError;
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(ConfigError::invalid(
                "worker.concurrency",
                "must be 1 to 10000",
            ));
        }
        if self.retry_window < self.retry_initial {
            return Err(ConfigError::invalid(
                "worker.retry_window",
                "must be at least retry_initial",
            ));
        }
        if self.max_lifetime > Duration::from_secs(10 * 24 * 3600) {
            return Err(ConfigError::invalid(
                "worker.max_lifetime",
                "must be at most 10 days (mailboxes remember delivery keys for 14)",
            ));
        }
        if let Some(srs) = &self.srs {
            srs.build()
                .map_err(|e| ConfigError::invalid("worker.srs.secret", e.to_string()))?;
        }
        if self.body_sweep_interval.is_zero() {
            return Err(ConfigError::invalid(
                "worker.body_sweep_interval",
                "must be above zero",
            ));
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(ConfigError::invalid(
                "worker.retry_max",
                "must be at least retry_initial, which must be above zero",
            ));
        }
        if self.requeue_max < self.retry_initial {
            return Err(ConfigError::invalid(
                "worker.requeue_max",
                "must be at least retry_initial",
            ));
        }
        if self.retry_scan_interval.is_zero() || self.retry_prefix.trim_matches('/').is_empty() {
            return Err(ConfigError::invalid(
                "worker.retry_scan_interval",
                "retry_scan_interval must be above zero and retry_prefix not empty",
            ));
        }
        Ok(())
    }
}

pub struct Worker {
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    store: Arc<dyn Mailstore>,
    /// Decides which worker publishes a due entry of the retry index.
    cache: Arc<dyn Cache>,
    config: WorkerConfig,
    limits: EnvelopeLimits,
    subscribed: Subscribed,
    srs: Option<mailmesh_auth::srs::Srs>,
}

/// Tells, once, that a consumer has joined its group (the process may then say it
/// is ready: from then on the queue's readiness follows the group's assignments).
#[derive(Default)]
pub(crate) struct Subscribed(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>);

impl Subscribed {
    /// A receiver completed when the consumer has been created (or dropped if it
    /// never is). A second call replaces the first.
    pub(crate) fn receiver(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    fn fire(&self) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

/// Why a message body could not be read.
pub(crate) enum BodyError {
    /// The object is gone: retrying cannot help.
    Missing(String),
    /// Freed after every record holding it finished: this record is a replay of
    /// finished work (`bodies`).
    Finished(String),
    Unavailable(String),
}

/// The SMTP reply code that goes with an enhanced status code.
fn reply_code(status: &str) -> &'static str {
    if status.starts_with('5') {
        "550"
    } else {
        "450"
    }
}

/// A record could not be finished now (its outcomes are not all durable); it is
/// tried again and its offset is not stored meanwhile.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotDone(pub(crate) String);

/// Where [`consume`] reads: `topic` in `group`, telling `subscribed` once joined.
pub(crate) struct Source<'a> {
    pub(crate) queue: &'a dyn Queue,
    pub(crate) subscribed: &'a Subscribed,
    pub(crate) group: &'a str,
    pub(crate) topic: &'a str,
}

/// Consumes `topic` in `group` until the shutdown closes: `handle` runs for each
/// record, `concurrency` at once, under the span `span` makes, which continues the
/// message's trace (W3C context in the record headers); the record is acknowledged
/// when `handle` says it is done. Records in flight finish (and store their
/// offsets) before the consumer leaves the group; those still running when the
/// drain ends stay unacknowledged and go to another worker.
pub(crate) async fn consume<H, Fut>(
    Source {
        queue,
        subscribed,
        group,
        topic,
    }: Source<'_>,
    concurrency: usize,
    shutdown: &Shutdown,
    span: impl Fn(&Record) -> tracing::Span,
    handle: H,
) -> Result<(), mailmesh_queue::QueueError>
where
    H: Fn(Record, Shutdown) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut consumer = queue.consumer(group, &[topic]).await?;
    subscribed.fire();
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let delivery = tokio::select! {
            _ = shutdown.closing() => break,
            d = consumer.recv() => d,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%topic, error = %e, "receiving from the queue failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let span = span(&delivery.record);
        // The parent must be set before the span is first entered.
        let carrier: std::collections::BTreeMap<String, String> = delivery
            .record
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.to_vec()).ok()?)))
            .collect();
        mailmesh_kit::telemetry::extract_context(&span, &carrier);
        let done = handle(delivery.record, shutdown.clone());
        let ack = delivery.ack;
        shutdown.spawn(
            async move {
                if done.await {
                    ack.done();
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => {}
        _ = shutdown.stopped() => {}
    }
    consumer.close().await
}

/// The message a queue record carries, from the record or from object storage.
pub(crate) async fn read_body(
    objects: &dyn ObjectStore,
    envelope: &Envelope,
) -> Result<Bytes, BodyError> {
    use mailmesh_objstore::object_store::Error as E;
    let key = match &envelope.body {
        BodyRef::Inline(bytes) => return Ok(bytes.clone()),
        BodyRef::Object { key, .. } => key,
    };
    let unavailable = |e: E| BodyError::Unavailable(format!("reading the message body {key}: {e}"));
    let read = async { objects.get(&Path::from(key.as_str())).await?.bytes().await };
    match read.await {
        Ok(bytes) => Ok(bytes),
        Err(E::NotFound { .. }) => match crate::bodies::finished(objects, key).await {
            Ok(true) => Err(BodyError::Finished(format!(
                "message body {key} was freed: every record holding it finished"
            ))),
            Ok(false) => Err(BodyError::Missing(format!(
                "message body {key} does not exist"
            ))),
            Err(e) => Err(unavailable(e)),
        },
        Err(e) => Err(unavailable(e)),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Worker {
    pub fn new(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        store: Arc<dyn Mailstore>,
        cache: Arc<dyn Cache>,
        config: WorkerConfig,
    ) -> Arc<Self> {
        let srs = config
            .srs
            .as_ref()
            .map(|c| c.build().expect("a validated configuration"));
        if srs.is_none() {
            tracing::warn!(
                "no [worker.srs]: forwarded mail keeps its sender, and the platform's addresses vouch for it (SPF)"
            );
        }
        Arc::new(Self {
            queue,
            objects,
            store,
            cache,
            config,
            limits: EnvelopeLimits::default(),
            subscribed: Subscribed::default(),
            srs,
        })
    }

    /// Completes once [`Self::run`] has created its group consumer.
    pub fn subscribed(&self) -> tokio::sync::oneshot::Receiver<()> {
        self.subscribed.receiver()
    }

    /// Consumes until the shutdown closes; records in flight then finish within the
    /// drain (or, if cut when it stops, are left unacknowledged and come again).
    pub async fn run(
        self: Arc<Self>,
        shutdown: Shutdown,
    ) -> Result<(), mailmesh_queue::QueueError> {
        // Subscribing to a topic that does not exist yet would wait for the client's
        // next metadata refresh (minutes) once a front door creates it.
        for topic in [
            &self.config.topic,
            &self.config.outbound_topic,
            &self.config.dead_letter_topic,
        ] {
            self.queue
                .ensure_topic(topic, self.config.topic_partitions)
                .await?;
        }
        let scanner = tokio::spawn(
            crate::due::DueScan {
                objects: self.objects.clone(),
                cache: self.cache.clone(),
                queue: self.queue.clone(),
                prefix: self.config.retry_prefix.clone(),
                topic: self.config.topic.clone(),
                lock: "local:retry",
                every: self.config.retry_scan_interval,
                headers: rounds_header,
            }
            .run(shutdown.clone()),
        );
        let worker = self.clone();
        let consumed = consume(
            Source {
                queue: &*self.queue,
                subscribed: &self.subscribed,
                group: &self.config.group,
                topic: &self.config.topic,
            },
            self.config.concurrency,
            &shutdown,
            |r| tracing::info_span!("deliver_record", partition = r.partition, offset = r.offset),
            move |record, stop| {
                let worker = worker.clone();
                async move { worker.finish(&record, &stop).await }
            },
        )
        .await;
        scanner.abort();
        consumed
    }

    /// Handles a record until every outcome is durable; false if the process stops
    /// first (the record is then delivered again later).
    async fn finish(&self, record: &Record, shutdown: &Shutdown) -> bool {
        let mut backoff = self.config.retry_initial;
        loop {
            match self.handle(record, shutdown).await {
                Ok(()) => return true,
                Err(NotDone(reason)) => {
                    if shutdown.is_stopped() {
                        return false;
                    }
                    tracing::warn!(%reason, retry_in = ?backoff, "record not finished");
                    tokio::select! {
                        _ = shutdown.stopped() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
            }
        }
    }

    async fn dead_letter(&self, record: &Record, reason: &str) -> Result<(), NotDone> {
        tracing::error!(%reason, "parking a queue record that cannot be delivered");
        self.publish(
            &self.config.dead_letter_topic,
            record.key.clone(),
            record.payload.clone(),
            reason,
        )
        .await?;
        crate::metrics::delivered("dead_letter");
        Ok(())
    }

    /// Hands the copies aliases forward to other domains to the outbound path: the
    /// envelope sender rewritten (SRS) to an address of the alias's domain, the
    /// message with the ARC set auth-check made on top. Mail that failed DMARC where
    /// its author domain asks for reject is never forwarded (the platform would vouch
    /// for a forgery); it is dropped with a log line, no report (its sender is most
    /// likely forged).
    async fn forward(
        &self,
        envelope: &Envelope,
        message: &[u8],
        forwards: BTreeMap<Domain, Vec<mailmesh_types::Recipient>>,
    ) -> Result<(), NotDone> {
        if forwards.is_empty() {
            return Ok(());
        }
        if envelope.dmarc_reject_failure {
            let targets: usize = forwards.values().map(Vec::len).sum();
            tracing::warn!(queue_id = %envelope.queue_id, targets, "not forwarding mail that failed DMARC with p=reject");
            crate::metrics::delivered("forward_refused_dmarc");
            return Ok(());
        }
        let body = match &envelope.arc_set {
            // Held under each domain's claim, written with the others' (`handle`).
            None => envelope.body.clone(),
            Some(set) => {
                let mut sealed = Vec::with_capacity(set.len() + message.len());
                sealed.extend_from_slice(set.as_bytes());
                sealed.extend_from_slice(message);
                if sealed.len() <= self.config.inline_body_bytes {
                    BodyRef::Inline(bytes::Bytes::from(sealed))
                } else {
                    let key = format!("t/{}/queue/{}-forward", envelope.tenant, envelope.queue_id);
                    let size = sealed.len() as u64;
                    self.objects
                        .put(
                            &mailmesh_objstore::object_store::path::Path::from(key.as_str()),
                            mailmesh_objstore::object_store::PutPayload::from(sealed),
                        )
                        .await
                        .map_err(|e| NotDone(format!("storing a forwarded copy: {e}")))?;
                    let copy = BodyRef::Object {
                        key: key.clone(),
                        size,
                        claim: None,
                    };
                    // Only the copies hold it: no record was queued for it.
                    let claims: Vec<BodyRef> = forwards
                        .keys()
                        .map(|domain| forward_body(&copy, domain))
                        .collect();
                    crate::bodies::hold(&*self.objects, &key, claims.iter().filter_map(claim_of))
                        .await
                        .map_err(|e| NotDone(format!("holding a forwarded copy: {e}")))?;
                    copy
                }
            }
        };
        for (domain, recipients) in forwards {
            let mail_from = match (&self.srs, &envelope.mail_from) {
                (Some(srs), ReversePath::Address(sender)) => match srs.forward(sender, &domain) {
                    Ok(Some(rewritten)) => ReversePath::Address(rewritten),
                    Ok(None) => envelope.mail_from.clone(),
                    // Never the original sender from our addresses: the null one
                    // (its bounces are lost, no domain's SPF is borrowed).
                    Err(e) => {
                        tracing::info!(queue_id = %envelope.queue_id, %sender, error = %e, "forwarding with the null sender");
                        crate::metrics::delivered("forward_null_sender");
                        ReversePath::Null
                    }
                },
                _ => envelope.mail_from.clone(),
            };
            let copy = Envelope {
                recipients,
                mail_from,
                body: forward_body(&body, &domain),
                // The seal is in the body now.
                arc_set: None,
                ..envelope.clone()
            };
            self.publish_envelope(&self.config.outbound_topic, &copy)
                .await?;
            crate::metrics::delivered("forwarded");
        }
        Ok(())
    }

    /// Every recipient gets an outcome: stored, failed (bounced), remote (handed to
    /// outbound) or still failing temporarily (requeued). `NotDone` only when one of
    /// those could not be made durable.
    async fn handle(&self, record: &Record, shutdown: &Shutdown) -> Result<(), NotDone> {
        let envelope = match decode_envelope(&record.payload, &self.limits) {
            Ok(e) => e,
            Err(e) => return self.dead_letter(record, &e.to_string()).await,
        };
        let message = match self.message(&envelope).await {
            Ok(m) => m,
            Err(BodyError::Missing(reason)) => return self.dead_letter(record, &reason).await,
            Err(BodyError::Finished(reason)) => {
                tracing::info!(queue_id = %envelope.queue_id, %reason, "a finished record came again; nothing to do");
                crate::metrics::delivered("replayed");
                return Ok(());
            }
            Err(BodyError::Unavailable(reason)) => return Err(NotDone(reason)),
        };
        let started = Instant::now();
        // Past its lifetime a message is not retried any more but bounced, well
        // before mailboxes forget its delivery key (no late duplicates).
        let expired = envelope
            .received_at
            .elapsed()
            .is_ok_and(|age| age > self.config.max_lifetime);

        let mut failures = Vec::new();
        let mut remote: Vec<mailmesh_types::Recipient> = Vec::new();
        // Copies aliases forward to other domains, by the alias's domain.
        let mut forwarded: BTreeMap<Domain, Vec<mailmesh_types::Recipient>> = BTreeMap::new();
        // Recipients still failing temporarily, and why (for the queue listing).
        let (mut retry, mut reasons) = (Vec::new(), Vec::new());
        let mut stored = HashSet::new();
        // For success notices (NOTIFY=SUCCESS): in a mailbox, or only forwarded.
        let (mut delivered, mut expanded) = (Vec::new(), Vec::new());
        for recipient in &envelope.recipients {
            // Stored in a mailbox; and to how many addresses it went.
            let (mut mailboxes, mut targets) = (false, 0);
            let outcome = match self.store.lookup(&recipient.address).await {
                Ok(Lookup::NotLocal) => {
                    remote.push(recipient.clone());
                    continue;
                }
                Ok(Lookup::Unknown) => Err(DeliveryError::Permanent {
                    status: "5.1.1",
                    reason: "no such user here".into(),
                }),
                Ok(Lookup::Deliver(resolution)) => {
                    mailboxes = !resolution.users.is_empty();
                    let forwards = resolution.remote.len();
                    // An alias to several addresses, local or not, is "expanded".
                    targets = resolution.users.len() + forwards;
                    // RFC 3461 6.2.7.3: a one-to-one forward passes the DSN request
                    // on (the next hop reports); a list expands and reports here.
                    let one_to_one = !mailboxes && forwards == 1;
                    for forward in resolution.remote {
                        let known = remote
                            .iter()
                            .chain(forwarded.values().flatten())
                            .any(|r| r.address == forward);
                        if !known {
                            let mut next = mailmesh_types::Recipient::new(forward);
                            if one_to_one {
                                next.notify = recipient.notify;
                                next.orcpt = recipient.orcpt.clone().or_else(|| {
                                    (!recipient.address.is_utf8())
                                        .then(|| format!("rfc822;{}", recipient.address))
                                });
                            }
                            forwarded
                                .entry(recipient.address.domain().clone())
                                .or_default()
                                .push(next);
                        }
                    }
                    let mut outcome = Ok(());
                    for (tenant, user) in resolution.users {
                        // One copy per mailbox, however many addresses reach it.
                        if !stored.insert(user) {
                            continue;
                        }
                        let user = UserRef { tenant, user };
                        if let Err(e) = self
                            .deliver(&envelope, &message, recipient, &user, shutdown)
                            .await
                        {
                            // Another address reaching this mailbox must try again.
                            stored.remove(&user.user);
                            outcome = Err(e);
                            break;
                        }
                        crate::metrics::delivered("stored");
                    }
                    outcome
                }
                Err(e) => Err(e),
            };
            match outcome {
                // Success notices only for those who asked (most do not).
                Ok(()) if !recipient.notify.success => {}
                Ok(()) => {
                    let done = |diagnostic: &str| Failure {
                        recipient: recipient.clone(),
                        status: "2.0.0".into(),
                        diagnostic: diagnostic.into(),
                        remote_mta: None,
                    };
                    if targets > 1 {
                        expanded.push(done("250 2.0.0 expanded by the alias"));
                    } else if mailboxes {
                        delivered.push(done("250 2.0.0 delivered to the mailbox"));
                    }
                }
                Err(DeliveryError::Temporary { .. }) if shutdown.is_stopped() => {
                    return Err(NotDone("stopping".into()));
                }
                Err(DeliveryError::Temporary { status, reason }) if expired => {
                    crate::metrics::delivered("failed");
                    failures.push(Failure {
                        recipient: recipient.clone(),
                        status: "4.4.7".into(),
                        diagnostic: format!(
                            "{} {status} delivery time expired: {reason}",
                            reply_code(status)
                        ),
                        remote_mta: None,
                    });
                }
                Err(DeliveryError::Temporary { status, reason }) => {
                    reasons.push(format!("<{}>: {status} {reason}", recipient.address));
                    retry.push(recipient.clone());
                }
                Err(DeliveryError::Permanent { status, reason }) => {
                    crate::metrics::delivered("failed");
                    failures.push(Failure {
                        recipient: recipient.clone(),
                        status: status.into(),
                        diagnostic: format!("{} {status} {reason}", reply_code(status)),
                        remote_mta: None,
                    });
                }
            }
        }
        crate::metrics::delivery_seconds(started.elapsed());

        // Each record this one hands the body to holds it by a claim, all written
        // before the first of them is published (`bodies`).
        let mut handed = Vec::new();
        if !remote.is_empty() {
            handed.push(crate::bodies::handed(&envelope.body, OUTBOUND));
        }
        if !retry.is_empty() {
            handed.push(crate::bodies::handed(&envelope.body, REQUEUE));
        }
        if envelope.arc_set.is_none() && !envelope.dmarc_reject_failure {
            handed.extend(forwarded.keys().map(|d| forward_body(&envelope.body, d)));
        }
        if let BodyRef::Object { key, .. } = &envelope.body {
            crate::bodies::hold(&*self.objects, key, handed.iter().filter_map(claim_of))
                .await
                .map_err(|e| NotDone(format!("holding the message body: {e}")))?;
        }

        if !remote.is_empty() {
            // Same queue id: the outbound path deduplicates per (queue id, recipient).
            let outbound = Envelope {
                recipients: remote,
                body: crate::bodies::handed(&envelope.body, OUTBOUND),
                ..envelope.clone()
            };
            self.publish_envelope(&self.config.outbound_topic, &outbound)
                .await?;
            crate::metrics::delivered("outbound");
        }
        self.forward(&envelope, &message, forwarded).await?;
        if let Some(bounce) = failure_report(&envelope, &message, &failures, &self.config.hostname)
        {
            self.publish_envelope(&self.config.topic, &bounce).await?;
            crate::metrics::delivered("bounced");
        }
        for (done, what) in [
            (&delivered, Success::Delivered),
            (&expanded, Success::Expanded),
        ] {
            if let Some(notice) =
                success_report(&envelope, &message, done, &self.config.hostname, what)
            {
                self.publish_envelope(&self.config.topic, &notice).await?;
            }
        }
        if !retry.is_empty() {
            // Only the recipients still failing go round again: they wait in the
            // due-time index (visible to `mailctl queue list` with the reason), so
            // this partition's offset moves on and no worker slot is held. Mailboxes
            // that already have the message get no second copy (same queue id, same
            // delivery keys). Each round waits longer (doubling from
            // `retry_initial` to `requeue_max`), so a storage tier that is down
            // costs a round per message per `requeue_max`, not a tight loop.
            let rounds = record
                .header(ROUNDS)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
                .unwrap_or(0);
            let wait = requeue_wait(&self.config, rounds);
            let again = Envelope {
                recipients: retry,
                body: crate::bodies::handed(&envelope.body, REQUEUE),
                ..envelope.clone()
            };
            let reason = reasons.join("; ");
            schedule::put(
                &*self.objects,
                &self.config.retry_prefix,
                SystemTime::now() + wait,
                &again,
                rounds + 1,
                false,
                &reason,
            )
            .await
            .map_err(|e| NotDone(format!("writing the retry entry: {e}")))?;
            tracing::warn!(queue_id = %envelope.queue_id, recipients = again.recipients.len(), rounds, retry_in = ?wait, %reason, "delivery deferred after temporary failures");
            crate::metrics::delivered("requeued");
        }
        crate::bodies::release_body(&*self.objects, &envelope.body).await;
        Ok(())
    }

    /// Delivers to one user, retrying temporary failures with backoff within the
    /// retry window (and not past a stop).
    async fn deliver(
        &self,
        envelope: &Envelope,
        message: &[u8],
        recipient: &mailmesh_types::Recipient,
        user: &UserRef,
        shutdown: &Shutdown,
    ) -> Result<(), DeliveryError> {
        let key = format!("{}/{}", envelope.queue_id, user.user);
        let internal_date_ms = envelope
            .received_at
            .duration_since(UNIX_EPOCH)
            .map_or_else(|_| now_ms(), |d| d.as_millis() as i64);
        let deadline = Instant::now() + self.config.retry_window;
        let mut backoff = self.config.retry_initial;
        let mut mailbox = if envelope.junk { JUNK } else { INBOX };
        loop {
            let outcome = self
                .store
                .deliver(
                    user,
                    Delivery {
                        mailbox,
                        return_path: &envelope.mail_from,
                        delivered_to: &recipient.address,
                        message,
                        key: &key,
                        internal_date_ms,
                    },
                )
                .await;
            match outcome {
                // A user may have deleted their Junk mailbox: INBOX still takes it.
                Err(DeliveryError::Permanent { .. }) if mailbox == JUNK => {
                    tracing::info!(error = ?outcome, "no Junk mailbox; delivering to INBOX");
                    mailbox = INBOX;
                }
                // A full mailbox stays full for longer than a retry in place: it
                // waits in the retry index, where an operator sees it.
                Err(DeliveryError::Temporary { status, .. })
                    if status != "4.2.2" && Instant::now() + backoff < deadline =>
                {
                    tracing::info!(error = ?outcome, retry_in = ?backoff, "temporary delivery failure");
                    tokio::select! {
                        _ = shutdown.stopped() => return outcome,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.retry_max);
                }
                other => return other,
            }
        }
    }

    async fn message(&self, envelope: &Envelope) -> Result<Bytes, BodyError> {
        read_body(&*self.objects, envelope).await
    }

    async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), NotDone> {
        publish_envelope(&*self.queue, topic, envelope, Vec::new()).await
    }

    async fn publish(
        &self,
        topic: &str,
        key: Bytes,
        payload: Bytes,
        reason: &str,
    ) -> Result<(), NotDone> {
        publish_raw(&*self.queue, topic, key, payload, reason).await
    }
}

/// Record header: how many times a message went round the queue for recipients
/// still failing temporarily.
const ROUNDS: &str = "mailmesh-rounds";

/// A due entry of the local retry index goes back with its round count.
fn rounds_header(waiting: &schedule::Waiting) -> Vec<(String, Bytes)> {
    vec![(ROUNDS.to_owned(), Bytes::from(waiting.attempts.to_string()))]
}

/// How long a message waits before its `rounds + 1`th round.
fn requeue_wait(config: &WorkerConfig, rounds: u32) -> Duration {
    config
        .retry_initial
        .saturating_mul(1u32 << rounds.min(20))
        .min(config.requeue_max)
}

/// Roles in which a record hands its body on (`bodies::child_claim`).
const OUTBOUND: &str = "outbound";
const REQUEUE: &str = "requeue";

/// The body a copy forwarded to `domain` holds: `body` under the copy's own claim.
fn forward_body(body: &BodyRef, domain: &Domain) -> BodyRef {
    crate::bodies::handed(body, &format!("forward:{domain}"))
}

/// The claim a body reference names, if any.
fn claim_of(body: &BodyRef) -> Option<&str> {
    match body {
        BodyRef::Object { claim, .. } => claim.as_deref(),
        BodyRef::Inline(_) => None,
    }
}

/// Publishes a queue record (with its trace context and `headers`).
pub(crate) async fn publish_envelope(
    queue: &dyn Queue,
    topic: &str,
    envelope: &Envelope,
    headers: Vec<(String, Bytes)>,
) -> Result<(), NotDone> {
    let mut all = envelope.trace_headers();
    all.extend(headers);
    queue
        .publish(OutgoingRecord {
            topic: topic.to_owned(),
            key: Bytes::from(envelope.queue_id.to_string()),
            payload: Bytes::from(encode_envelope(envelope)),
            headers: all,
            partition: None,
        })
        .await
        .map(drop)
        .map_err(|e| NotDone(format!("publishing to {topic}: {e}")))
}

/// Publishes raw bytes (a record that could not be decoded) with a reason header.
pub(crate) async fn publish_raw(
    queue: &dyn Queue,
    topic: &str,
    key: Bytes,
    payload: Bytes,
    reason: &str,
) -> Result<(), NotDone> {
    let mut headers = Vec::new();
    if !reason.is_empty() {
        headers.push(("mailmesh-reason".to_owned(), Bytes::from(reason.to_owned())));
    }
    queue
        .publish(OutgoingRecord {
            topic: topic.to_owned(),
            key,
            payload,
            headers,
            partition: None,
        })
        .await
        .map(drop)
        .map_err(|e| NotDone(format!("publishing to {topic}: {e}")))
}
