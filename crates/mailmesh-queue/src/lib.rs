//! The mail queue between the front doors and the delivery workers.
//!
//! Two implementations of one [`Queue`] trait with the same semantics:
//! - [`kafka::KafkaQueue`]: rdkafka, producer with `acks=all` and idempotence, consumer
//!   groups with `enable.auto.offset.store=false`;
//! - [`embedded::EmbeddedLog`]: a durable append-only log on local disk for `mailctl dev`
//!   and unit tests, fsynced before `publish` returns.
//!
//! Both are at-least-once: [`Queue::publish`] returns only when the record is durable,
//! and a consumer group's offset advances only over records whose [`Ack::done`] was
//! called, in order per partition. A record received but not done is delivered again
//! to the next consumer of the group, so consumers must be idempotent.

pub mod embedded;
pub mod kafka;
mod metrics;
mod tracker;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;

pub use tracker::Ack;

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("queue log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("queue log {path} is corrupt at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: &'static str,
    },
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    #[error("invalid consumer group name {0:?}")]
    InvalidGroup(String),
    #[error("consumer group {0:?} already has an active consumer in this process")]
    GroupBusy(String),
    #[error("record of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the queue is closed")]
    Closed,
    #[error("no partition {partition} in topic {topic:?}")]
    NoPartition { topic: String, partition: i32 },
    #[error("the broker did not acknowledge the record within {0:?}")]
    Timeout(Duration),
}

/// A record to publish.
#[derive(Debug, Clone, Default)]
pub struct OutgoingRecord {
    pub topic: String,
    /// Records with the same key land in the same partition, in order.
    pub key: Bytes,
    pub payload: Bytes,
    /// Metadata such as trace context (`traceparent`).
    pub headers: Vec<(String, Bytes)>,
    /// Writes to this partition instead of the key's.
    pub partition: Option<i32>,
}

/// Where a published record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// A record as consumed.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Bytes,
    pub payload: Bytes,
    pub headers: Vec<(String, Bytes)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// The partitions of a topic a consumer group has assigned to this member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub partitions: BTreeSet<i32>,
    /// The group has given this member its first assignment (possibly empty).
    pub joined: bool,
}

/// Membership of a consumer group that consumes nothing: the group's assignment
/// says which partitions this process owns (storage's partition owners). Leaves
/// the group when dropped.
pub struct Membership {
    /// Partitions leave it before the group hands them to another member
    /// (the revoke callback), and join it once assigned here.
    pub assignment: tokio::sync::watch::Receiver<Assignment>,
    _member: Box<dyn std::any::Any + Send + Sync>,
}

impl Membership {
    pub fn new(
        assignment: tokio::sync::watch::Receiver<Assignment>,
        member: impl std::any::Any + Send + Sync,
    ) -> Self {
        Self {
            assignment,
            _member: Box::new(member),
        }
    }
}

/// A consumed record and the handle that marks its outcome durable.
#[derive(Debug)]
pub struct Delivery {
    pub record: Record,
    pub ack: Ack,
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Appends a record; returns once it is durable (replicated to all in-sync
    /// replicas, or fsynced for the embedded log).
    async fn publish(&self, record: OutgoingRecord) -> Result<Position>;

    /// Joins `group` and consumes `topics` from the group's stored offsets (or the
    /// beginning, for a new group).
    async fn consumer(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>>;

    /// Reads one partition from `offset` on, outside any consumer group (for
    /// replicas that materialise a log: every reader sees every record).
    async fn reader(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Box<dyn PartitionReader>>;

    /// Joins `group` as a member that is assigned partitions of `topic` (balanced
    /// over the members, moved as few as possible when members come and go) and
    /// reads none of their records. A member silent for `session_timeout` loses
    /// its partitions.
    async fn membership(
        &self,
        group: &str,
        topic: &str,
        session_timeout: Duration,
    ) -> Result<Membership>;

    /// Creates a topic if it does not exist.
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<()>;

    /// Creates a topic with broker settings (`retention.ms`, `cleanup.policy`) if it
    /// does not exist; an existing topic keeps its own. The embedded log keeps
    /// everything and takes none.
    async fn ensure_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        _settings: &[(&str, String)],
    ) -> Result<()> {
        self.ensure_topic(topic, partitions).await
    }

    /// How long the broker keeps `topic`'s records (`None`: for ever, or not
    /// known).
    async fn retention(&self, _topic: &str) -> Result<Option<Duration>> {
        Ok(None)
    }

    /// How many partitions `topic` has.
    async fn partition_count(&self, topic: &str) -> Result<i32>;

    /// The offset the next record of `partition` will get, when this queue knows it
    /// exactly: every record acknowledged before the call lies below it. `None` when
    /// it cannot be trusted (Kafka-compatible brokers differ: tansu's high watermark
    /// moves before the record is stored), and readers that need everything written
    /// so far must write a barrier record instead.
    async fn end_offset(&self, _topic: &str, _partition: i32) -> Result<Option<i64>> {
        Ok(None)
    }

    /// Succeeds when the queue can take records (for `/readyz`).
    async fn ping(&self) -> Result<()>;

    /// A fault this process cannot recover from by itself (for `/livez`: the pod
    /// is restarted), with its description.
    fn stuck(&self) -> Option<String> {
        None
    }

    /// The consumer groups this process is in that have not settled: not yet joined,
    /// or rebalancing. `/readyz` fails while there are any, so a rolling restart waits
    /// for the groups before it stops the next member.
    fn unsettled_groups(&self) -> Vec<String> {
        Vec::new()
    }
}

#[async_trait]
pub trait Consumer: Send {
    /// The next record of any assigned partition.
    async fn recv(&mut self) -> Result<Delivery>;

    /// Writes the group's stored offsets now (they are also written periodically and
    /// when the consumer is closed).
    async fn commit(&mut self) -> Result<()>;

    /// Commits and leaves the group.
    async fn close(self: Box<Self>) -> Result<()>;
}

#[async_trait]
pub trait PartitionReader: Send {
    /// The next record of the partition, waiting for one to be written.
    async fn recv(&mut self) -> Result<Record>;
}

/// Which queue to use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueConfig {
    Kafka(kafka::KafkaConfig),
    Embedded(embedded::EmbeddedConfig),
}

impl mailmesh_kit::config::Validate for QueueConfig {
    fn validate(&self) -> Result<(), mailmesh_kit::ConfigError> {
        match self {
            Self::Kafka(c) => c.validate(),
            Self::Embedded(c) => c.validate(),
        }
    }
}

/// Opens the configured queue.
pub async fn open(config: &QueueConfig) -> Result<Arc<dyn Queue>> {
    Ok(match config {
        QueueConfig::Kafka(c) => Arc::new(kafka::KafkaQueue::connect(c)?),
        QueueConfig::Embedded(c) => Arc::new(embedded::EmbeddedLog::open(c).await?),
    })
}

/// Opens the configured queue and makes `/readyz` depend on it.
pub async fn open_checked(
    config: &QueueConfig,
    health: &mailmesh_kit::Health,
) -> Result<Arc<dyn Queue>> {
    let queue = open(config).await?;
    health.add_check(Arc::new(QueueReadiness(queue.clone())));
    health.add_liveness(Arc::new(QueueReadiness(queue.clone())));
    Ok(queue)
}

/// Topic names are used as file names by the embedded log and must be valid Kafka
/// topic names: `[a-zA-Z0-9._-]`, 1 to 249 characters, not `.` or `..`.
pub(crate) fn validate_topic(topic: &str) -> Result<()> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(QueueError::InvalidTopic(topic.to_owned()))
    }
}

/// A readiness check for the admin port.
pub struct QueueReadiness(pub Arc<dyn Queue>);

#[async_trait]
impl mailmesh_kit::ReadinessCheck for QueueReadiness {
    fn name(&self) -> &str {
        "queue"
    }

    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())?;
        let unsettled = self.0.unsettled_groups();
        if unsettled.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "consumer group not settled: {}",
                unsettled.join(", ")
            ))
        }
    }
}

impl mailmesh_kit::health::LivenessCheck for QueueReadiness {
    fn name(&self) -> &str {
        "queue"
    }

    fn stuck(&self) -> Option<String> {
        self.0.stuck()
    }
}

pub(crate) const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use mailmesh_kit::ConfigSource;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Config {
        queue: QueueConfig,
    }

    impl mailmesh_kit::config::Validate for Config {
        fn validate(&self) -> Result<(), mailmesh_kit::ConfigError> {
            self.queue.validate()
        }
    }

    #[test]
    fn delivery_guarantees_cannot_be_configured_away() {
        let err = ConfigSource::default()
            .with_var("MAILMESH_QUEUE__KAFKA__BROKERS", "kafka:9092")
            .with_var(
                "MAILMESH_QUEUE__KAFKA__PROPERTIES",
                "{\"request.required.acks\" = \"1\"}",
            )
            .load::<Config>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("queue.properties.request.required.acks"),
            "{err}"
        );

        // Numbers from the environment fill numeric fields inside the variant.
        let cfg = ConfigSource::default()
            .with_var("MAILMESH_QUEUE__KAFKA__BROKERS", "kafka:9092")
            .with_var("MAILMESH_QUEUE__KAFKA__REPLICATION_FACTOR", "2")
            .load::<Config>()
            .unwrap();
        assert!(matches!(cfg.queue, QueueConfig::Kafka(c) if c.replication_factor == 2));

        let cfg = ConfigSource::default()
            .with_var("MAILMESH_QUEUE__EMBEDDED__DIR", "/var/lib/mailmesh/queue")
            .with_var("MAILMESH_QUEUE__EMBEDDED__PARTITIONS", "8")
            .load::<Config>()
            .unwrap();
        assert!(matches!(cfg.queue, QueueConfig::Embedded(c) if c.fsync && c.partitions == 8));
    }
}
