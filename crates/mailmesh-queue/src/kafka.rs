//! The queue on Kafka (or any Kafka-compatible broker) through rdkafka.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use mailmesh_kit::Secret;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use crate::tracker::OffsetTracker;
use crate::{
    Consumer, DEFAULT_PUBLISH_TIMEOUT, Delivery, OutgoingRecord, PartitionReader, Position, Queue,
    QueueError, Record, Result, validate_topic,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Extra librdkafka properties, e.g. `security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `ssl.ca.location`. They cannot override the delivery
    /// guarantees (`acks`, idempotence, offset storing).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// SASL password (`sasl.password`), kept out of `properties` so it can come from a
    /// Secret as `MAILMESH_QUEUE__SASL_PASSWORD` and never prints.
    #[serde(default)]
    pub sasl_password: Option<Secret<String>>,
    /// How long a publish may wait for the broker before it fails (the front door then
    /// answers `451 4.3.0`).
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Replication factor for topics this client creates.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Consumer group session timeout: how long a dead consumer keeps its partitions.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How long the producer may stay failed (a fatal error it could not be
    /// replaced after) before `/livez` fails and Kubernetes restarts the pod.
    #[serde(default = "default_producer_recovery", with = "humantime_serde")]
    pub producer_recovery_timeout: Duration,
}

fn default_publish_timeout() -> Duration {
    DEFAULT_PUBLISH_TIMEOUT
}
fn default_replication() -> i32 {
    3
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_producer_recovery() -> Duration {
    Duration::from_secs(120)
}

/// Properties the queue's guarantees rest on, with their librdkafka aliases; user
/// `properties` may not set them.
const PINNED: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.commit.enable",
    "group.id",
    "bootstrap.servers",
    "metadata.broker.list",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "sasl.password",
];

impl mailmesh_kit::config::Validate for KafkaConfig {
    fn validate(&self) -> std::result::Result<(), mailmesh_kit::ConfigError> {
        use mailmesh_kit::ConfigError;
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("queue.brokers", "must not be empty"));
        }
        if let Some(key) = self
            .properties
            .keys()
            .find(|k| PINNED.contains(&k.as_str()))
        {
            return Err(ConfigError::invalid(
                format!("queue.properties.{key}"),
                "is set by mailmesh (delivery guarantees or credentials) and cannot be overridden",
            ));
        }
        if self.publish_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "queue.publish_timeout",
                "must be greater than zero",
            ));
        }
        if self.replication_factor < 1 {
            return Err(ConfigError::invalid(
                "queue.replication_factor",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl KafkaConfig {
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            if !PINNED.contains(&k.as_str()) {
                config.set(k, v);
            }
        }
        if let Some(password) = &self.sasl_password {
            config.set("sasl.password", password.expose());
        }
        config
    }
}

pub struct KafkaQueue {
    config: KafkaConfig,
    producer: Producers,
    /// The consumer every partition reader of this queue shares while any is open.
    readers: std::sync::Mutex<Weak<SharedReaders>>,
    /// This process's consumers by group, each settled or rebalancing (a consumer
    /// that is gone leaves a dead link, skipped).
    memberships: std::sync::Mutex<Vec<(String, Weak<AtomicBool>)>>,
}

impl KafkaQueue {
    pub fn connect(config: &KafkaConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            producer: Producers {
                current: std::sync::RwLock::new((0, new_producer(config)?)),
                failed_since: std::sync::Mutex::new(None),
                unacknowledged_since: std::sync::Mutex::new(None),
                probing: AtomicBool::new(false),
            },
            readers: std::sync::Mutex::new(Weak::new()),
            memberships: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The producer to publish with, and its generation: the current one, or a new
    /// one when the current one has a fatal error (an idempotent producer the broker
    /// fenced or whose sequence broke fails every later record: librdkafka never
    /// recovers it).
    fn producer(&self) -> Result<(u64, FutureProducer)> {
        let (generation, producer) = self
            .producer
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match producer.client().fatal_error() {
            None => Ok((generation, producer)),
            Some((code, reason)) => {
                self.replace(generation, &format!("fatal error {code}: {reason}"))
            }
        }
    }

    /// Replaces producer `generation` (once: a later generation is kept).
    fn replace(&self, generation: u64, why: &str) -> Result<(u64, FutureProducer)> {
        let mut current = self
            .producer
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if current.0 != generation {
            return Ok(current.clone());
        }
        tracing::error!(reason = why, "starting a new Kafka producer");
        match new_producer(&self.config) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *current, (generation + 1, fresh));
                *lock(&self.producer.failed_since) = None;
                *lock(&self.producer.unacknowledged_since) = None;
                crate::metrics::producer_replaced();
                // Destroying a librdkafka handle blocks while its threads stop.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn_blocking(move || drop(old));
                }
                Ok(current.clone())
            }
            Err(e) => {
                lock(&self.producer.failed_since).get_or_insert_with(std::time::Instant::now);
                tracing::error!(error = %e, "no new Kafka producer");
                Err(e)
            }
        }
    }

    /// After a failed publish: a producer that has had nothing acknowledged for two
    /// publish timeouts while the broker answers is replaced. librdkafka's
    /// idempotent producer can stall for good without a fatal error — a broker
    /// that restarted without its producer state never acknowledges its sequence
    /// again — while a new producer is served at once.
    async fn after_failure(&self, generation: u64, producer: &FutureProducer) {
        let stalled = {
            let mut since = lock(&self.producer.unacknowledged_since);
            since.get_or_insert_with(std::time::Instant::now).elapsed()
                >= self.config.publish_timeout * 2
        };
        if producer.client().fatal_error().is_none() && !stalled {
            return;
        }
        // One probe at a time: while the broker is away every publish fails, and
        // each must not start a metadata request of its own.
        if self.producer.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let probe = producer.clone();
        let answers = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(2)))
                .is_ok()
        })
        .await
        .unwrap_or(false);
        if answers || producer.client().fatal_error().is_some() {
            let _ = self.replace(
                generation,
                "no record acknowledged while the broker answers",
            );
        }
        self.producer.probing.store(false, Ordering::Release);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The producer every publish of a queue shares, replaced after a fatal error.
struct Producers {
    /// A generation number (so one failure is replaced once) and the producer.
    current: std::sync::RwLock<(u64, FutureProducer)>,
    /// Set while the producer is failed and could not be replaced.
    failed_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// The first failed publish since the last acknowledged one.
    unacknowledged_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// A failed publish is asking the broker whether the producer is to blame.
    probing: AtomicBool,
}

fn new_producer(config: &KafkaConfig) -> Result<FutureProducer> {
    Ok(config
        .client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set(
            "message.timeout.ms",
            config.publish_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "1")
        .create()?)
}

impl KafkaQueue {
    /// A consumer for partition readers: assigned by hand, never commits.
    fn reader_consumer(&self) -> Result<StreamConsumer> {
        // A group id is required by librdkafka but unused: nothing is committed.
        Ok(self
            .config
            .client_config()
            .set(
                "group.id",
                format!("mailmesh-reader-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Readers tail logs other replicas write: a short long-poll bounds how
            // late they see a record (some brokers, tansu among them, hold a fetch
            // for part of this even when data is there), and a partition added to
            // the shared consumer joins the next fetch soon. One consumer per
            // process keeps the idle polls cheap.
            .set("fetch.wait.max.ms", "50")
            .create()?)
    }
}

/// One consumer serving many partition readers, each through its own partition
/// queue (`split_partition_queue`): librdkafka's threads and broker connections do
/// not grow with the partitions read (storage reads every partition it serves).
struct SharedReaders {
    consumer: Arc<StreamConsumer>,
    open: std::sync::Mutex<std::collections::HashSet<(String, i32)>>,
    /// Serves the consumer's events; no record arrives on its own queue, since every
    /// partition is split off before it is assigned.
    poller: tokio::task::JoinHandle<()>,
}

impl SharedReaders {
    fn new(consumer: StreamConsumer) -> Arc<Self> {
        let consumer = Arc::new(consumer);
        let events = consumer.clone();
        let poller = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(m) => tracing::error!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        "a record reached the shared reader's main queue; its partition reader will see a gap"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "partition readers' consumer");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Arc::new(Self {
            consumer,
            open: std::sync::Mutex::new(Default::default()),
            poller,
        })
    }

    /// A reader of `topic`/`partition` from `offset`, or `None` when this consumer
    /// reads that partition already.
    fn open(
        self: &Arc<Self>,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<SharedReader>> {
        let key = (topic.to_owned(), partition);
        if !self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return Ok(None);
        }
        let reader = SharedReader {
            // Split off before it is assigned, so no record of it is fetched into
            // the main queue.
            queue: self.consumer.split_partition_queue(topic, partition),
            shared: self.clone(),
            key,
        };
        if reader.queue.is_none() {
            return Err(QueueError::NoPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.incremental_assign(&assignment)?;
        Ok(Some(reader))
    }
}

impl Drop for SharedReaders {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

struct SharedReader {
    queue: Option<
        rdkafka::consumer::stream_consumer::StreamPartitionQueue<
            rdkafka::consumer::DefaultConsumerContext,
        >,
    >,
    shared: Arc<SharedReaders>,
    key: (String, i32),
}

#[async_trait]
impl PartitionReader for SharedReader {
    async fn recv(&mut self) -> Result<Record> {
        let queue = self.queue.as_ref().ok_or(QueueError::Closed)?;
        let message = queue.recv().await?;
        Ok(detach(&message))
    }
}

impl Drop for SharedReader {
    fn drop(&mut self) {
        let (topic, partition) = &self.key;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition(topic, *partition);
        if let Err(e) = self.shared.consumer.incremental_unassign(&assignment) {
            tracing::debug!(topic, partition, error = %e, "unassigning a closed reader");
        }
        // The queue goes before the partition can be split again.
        self.queue = None;
        self.shared
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn publish(&self, record: OutgoingRecord) -> Result<Position> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        let started = std::time::Instant::now();
        let (generation, producer) = self.producer()?;
        let limit = self.config.publish_timeout;
        // `message.timeout.ms` does not cover a record already sent to a broker
        // that stopped answering (an idempotent producer waits for the request's
        // own timeout), nor the wait for room in the producer's queue: the
        // publish as a whole is bounded here, so a front door answers in time. The
        // record may still be written later, as after any failed publish.
        let outcome = tokio::time::timeout(
            limit,
            producer.send(
                {
                    let mut r = FutureRecord::to(&record.topic)
                        .key(record.key.as_ref())
                        .payload(record.payload.as_ref())
                        .headers(headers);
                    if let Some(p) = record.partition {
                        r = r.partition(p);
                    }
                    r
                },
                Timeout::After(limit),
            ),
        )
        .await;
        crate::metrics::observe_publish("kafka", started.elapsed(), matches!(outcome, Ok(Ok(_))));
        match outcome {
            Ok(Ok(delivery)) => {
                *lock(&self.producer.unacknowledged_since) = None;
                Ok(Position {
                    partition: delivery.partition,
                    offset: delivery.offset,
                })
            }
            // Replaced now if it is broken, so readiness and the next publish see a
            // working producer; this record's fate is unknown, as after any failure.
            Ok(Err((e, _))) => {
                self.after_failure(generation, &producer).await;
                Err(e.into())
            }
            Err(_) => {
                self.after_failure(generation, &producer).await;
                Err(QueueError::Timeout(limit))
            }
        }
    }

    async fn consumer(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>> {
        for topic in topics {
            validate_topic(topic)?;
        }
        if group.is_empty() {
            return Err(QueueError::InvalidGroup(group.to_owned()));
        }
        // The tracker stores offsets through the consumer, and the consumer's context
        // holds the tracker: a weak link breaks the cycle so dropping the consumer
        // closes it (and leaves the group).
        let tracker_slot: Arc<std::sync::OnceLock<Weak<StreamConsumer<GroupContext>>>> =
            Arc::new(std::sync::OnceLock::new());
        let slot = tracker_slot.clone();
        let tracker = OffsetTracker::new(Box::new(move |topic, partition, next| {
            if let Some(consumer) = slot.get().and_then(Weak::upgrade) {
                // librdkafka stores `offset + 1` as the next offset to consume.
                if let Err(e) = consumer.store_offset(topic, partition, next - 1) {
                    tracing::debug!(topic, partition, error = %e, "offset not stored (partition revoked?)");
                }
            }
        }));
        // Not settled until the group's first assignment.
        let settled = Arc::new(AtomicBool::new(false));
        {
            let mut memberships = self.memberships.lock().unwrap_or_else(|e| e.into_inner());
            memberships.retain(|(_, s)| s.strong_count() > 0);
            memberships.push((group.to_owned(), Arc::downgrade(&settled)));
        }
        let context = GroupContext {
            tracker: tracker.clone(),
            group: group.to_owned(),
            settled,
        };
        let consumer: StreamConsumer<GroupContext> = self
            .config
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            // Topics created after the subscription are seen within seconds.
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set(
                "session.timeout.ms",
                self.config.session_timeout.as_millis().to_string(),
            )
            .create_with_context(context)?;
        consumer.subscribe(topics)?;
        let consumer = Arc::new(consumer);
        let _ = tracker_slot.set(Arc::downgrade(&consumer));
        Ok(Box::new(KafkaConsumer { consumer, tracker }))
    }

    async fn reader(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Box<dyn PartitionReader>> {
        validate_topic(topic)?;
        let shared = {
            let mut slot = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            match slot.upgrade() {
                Some(shared) => shared,
                None => {
                    let shared = SharedReaders::new(self.reader_consumer()?);
                    *slot = Arc::downgrade(&shared);
                    shared
                }
            }
        };
        if let Some(reader) = shared.open(topic, partition, offset)? {
            return Ok(Box::new(reader));
        }
        // The shared consumer reads this partition already (from another offset):
        // a consumer of its own.
        let consumer = self.reader_consumer()?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        consumer.assign(&assignment)?;
        Ok(Box::new(KafkaReader { consumer }))
    }

    async fn membership(
        &self,
        group: &str,
        topic: &str,
        session_timeout: Duration,
    ) -> Result<crate::Membership> {
        validate_topic(topic)?;
        if group.is_empty() {
            return Err(QueueError::InvalidGroup(group.to_owned()));
        }
        let (tx, rx) = tokio::sync::watch::channel(crate::Assignment::default());
        let consumer: StreamConsumer<MemberContext> = self
            .config
            .client_config()
            .set("group.id", group)
            // Partitions move one at a time, and only those that must.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set(
                "session.timeout.ms",
                session_timeout.as_millis().to_string(),
            )
            // A rebalance waits for every member's next heartbeat (twice: the
            // cooperative protocol revokes, then assigns).
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(MemberContext {
                group: group.to_owned(),
                assignment: tx,
            })?;
        consumer.subscribe(&[topic])?;
        let consumer = Arc::new(consumer);
        // Polling serves the group's callbacks and heartbeats; the topic carries no
        // records (nobody writes it), so nothing else comes.
        let polled = consumer.clone();
        let poller = tokio::spawn(async move {
            loop {
                if let Err(e) = polled.recv().await {
                    tracing::warn!(error = %e, "partition owners' group consumer");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(crate::Membership::new(rx, Member { consumer, poller }))
    }

    async fn partition_count(&self, topic: &str) -> Result<i32> {
        let (_, producer) = self.producer()?;
        let name = topic.to_owned();
        let count = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), Timeout::After(Duration::from_secs(10)))
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map_or(0, |t| t.partitions().len() as i32)
                })
        })
        .await
        .map_err(|_| QueueError::Closed)??;
        if count == 0 {
            return Err(QueueError::NoPartition {
                topic: topic.to_owned(),
                partition: 0,
            });
        }
        Ok(count)
    }

    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.ensure_topic_with(topic, partitions, &[]).await
    }

    async fn retention(&self, topic: &str) -> Result<Option<Duration>> {
        validate_topic(topic)?;
        let admin: AdminClient<DefaultClientContext> = self.config.client_config().create()?;
        let described = admin
            .describe_configs(
                [&rdkafka::admin::ResourceSpecifier::Topic(topic)],
                &AdminOptions::new().request_timeout(Some(Timeout::After(Duration::from_secs(10)))),
            )
            .await?;
        let ms = described.into_iter().filter_map(|r| r.ok()).find_map(|r| {
            r.get("retention.ms")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<i64>().ok())
        });
        Ok(ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis))
    }

    async fn ensure_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        settings: &[(&str, String)],
    ) -> Result<()> {
        validate_topic(topic)?;
        let admin: AdminClient<DefaultClientContext> = self.config.client_config().create()?;
        let mut new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        for (key, value) in settings {
            new = new.set(key, value.as_str());
        }
        let results = admin
            .create_topics(
                [&new],
                &AdminOptions::new()
                    .operation_timeout(Some(Timeout::After(Duration::from_secs(30)))),
            )
            .await?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
            }
        }
        Ok(())
    }

    fn unsettled_groups(&self) -> Vec<String> {
        let memberships = self.memberships.lock().unwrap_or_else(|e| e.into_inner());
        memberships
            .iter()
            .filter(|(_, s)| s.upgrade().is_some_and(|s| !s.load(Ordering::Acquire)))
            .map(|(group, _)| group.clone())
            .collect()
    }

    fn stuck(&self) -> Option<String> {
        let since = (*self
            .producer
            .failed_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()))?;
        (since.elapsed() >= self.config.producer_recovery_timeout).then(|| {
            format!(
                "the Kafka producer failed {:?} ago and could not be replaced",
                since.elapsed()
            )
        })
    }

    async fn ping(&self) -> Result<()> {
        let (_, producer) = self.producer()?;
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(2)))
                .map(|_| ())
        })
        .await
        .map_err(|_| QueueError::Closed)??;
        Ok(())
    }
}

/// Forgets revoked partitions so late acks of their records store nothing.
struct GroupContext {
    tracker: Arc<OffsetTracker>,
    group: String,
    settled: Arc<AtomicBool>,
}

impl rdkafka::ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Stop storing offsets for these partitions, then write what is done before
            // another member takes them over.
            for p in partitions.elements() {
                self.tracker.revoke(p.topic(), p.partition());
            }
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "commit before revoke");
            }
        }
    }

    /// Marks the group settled (assigned) or rebalancing (revoked) for readiness
    /// (`Queue::unsettled_groups`) and logs it with the group's name.
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let group = self.group.as_str();
        self.settled
            .store(matches!(rebalance, Rebalance::Assign(_)), Ordering::Release);
        match rebalance {
            Rebalance::Assign(partitions) => tracing::info!(
                group,
                partitions = partitions.count(),
                "consumer group settled: partitions assigned"
            ),
            Rebalance::Revoke(partitions) => tracing::info!(
                group,
                partitions = partitions.count(),
                "consumer group rebalancing: partitions revoked"
            ),
            Rebalance::Error(e) => {
                tracing::warn!(group, error = %e, "consumer group rebalance failed")
            }
        }
    }
}

/// A group member that only owns partitions (`Queue::membership`).
struct Member {
    consumer: Arc<StreamConsumer<MemberContext>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.poller.abort();
        // Leave the group now, so the partitions move without waiting for the
        // session to time out (the consumer closes when its last handle goes).
        self.consumer.unsubscribe();
    }
}

/// Keeps the member's assignment: revoked partitions leave it before the group
/// may hand them on, assigned ones join it.
struct MemberContext {
    group: String,
    assignment: tokio::sync::watch::Sender<crate::Assignment>,
}

impl rdkafka::ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let revoked: Vec<i32> = partitions
                .elements()
                .iter()
                .map(|p| p.partition())
                .collect();
            tracing::info!(group = %self.group, ?revoked, "partitions revoked");
            self.assignment.send_modify(|a| {
                for p in &revoked {
                    a.partitions.remove(p);
                }
            });
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                let assigned: Vec<i32> = partitions
                    .elements()
                    .iter()
                    .map(|p| p.partition())
                    .collect();
                tracing::info!(group = %self.group, ?assigned, "partitions assigned");
                self.assignment.send_modify(|a| {
                    a.partitions.extend(assigned);
                    a.joined = true;
                });
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "partition owners' rebalance failed")
            }
        }
    }
}

struct KafkaReader {
    consumer: StreamConsumer,
}

#[async_trait]
impl PartitionReader for KafkaReader {
    async fn recv(&mut self) -> Result<Record> {
        let message = self.consumer.recv().await?;
        Ok(detach(&message))
    }
}

/// Copies a borrowed message out of librdkafka's buffers.
fn detach(message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        Bytes::copy_from_slice(h.value.unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
        payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        headers,
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<GroupContext>>,
    tracker: Arc<OffsetTracker>,
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn recv(&mut self) -> Result<Delivery> {
        let message = self.consumer.recv().await?;
        let record = detach(&message);
        let ack = self
            .tracker
            .received(&record.topic, record.partition, record.offset);
        Ok(Delivery { record, ack })
    }

    async fn commit(&mut self) -> Result<()> {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last commit.
                Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                other => other,
            }
        })
        .await
        .map_err(|_| QueueError::Closed)??;
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.commit().await?;
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.unsubscribe())
            .await
            .map_err(|_| QueueError::Closed)?;
        Ok(())
    }
}
