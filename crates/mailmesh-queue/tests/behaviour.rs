//! The same at-least-once behaviour, checked on the embedded log and on a real
//! Kafka-compatible broker (`MMTEST_KAFKA`, started by `scripts/backends.sh`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};
use mailmesh_queue::kafka::{KafkaConfig, KafkaQueue};
use mailmesh_queue::{Consumer, Delivery, OutgoingRecord, Queue, QueueError};
use mailmesh_testkit::broker::OwnBroker;

const RECV_TIMEOUT: Duration = Duration::from_secs(60);

fn kafka_config() -> KafkaConfig {
    let brokers = mailmesh_testkit::backend_env("MMTEST_KAFKA");
    KafkaConfig {
        brokers,
        properties: BTreeMap::new(),
        sasl_password: None,
        publish_timeout: Duration::from_secs(30),
        replication_factor: 1,
        session_timeout: Duration::from_secs(10),
        producer_recovery_timeout: Duration::from_secs(120),
    }
}

fn kafka() -> Arc<dyn Queue> {
    Arc::new(KafkaQueue::connect(&kafka_config()).unwrap())
}

async fn embedded(dir: &std::path::Path) -> Arc<dyn Queue> {
    Arc::new(EmbeddedLog::open(&EmbeddedConfig::new(dir)).await.unwrap())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn record(topic: &str, key: &str, payload: String) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_owned(),
        key: Bytes::copy_from_slice(key.as_bytes()),
        payload: Bytes::from(payload),
        headers: vec![(
            "traceparent".into(),
            Bytes::from_static(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        )],
        partition: None,
    }
}

async fn recv(consumer: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(RECV_TIMEOUT, consumer.recv())
        .await
        .expect("a record within the timeout")
        .expect("recv")
}

fn text(d: &Delivery) -> String {
    String::from_utf8(d.record.payload.to_vec()).unwrap()
}

/// Records done in order are never delivered again to the group; records received
/// but not done (or done out of order past a gap) are.
async fn second_consumer_resumes_after_the_stored_offset(queue: Arc<dyn Queue>) {
    let topic = unique("resume");
    let group = unique("group");
    queue.ensure_topic(&topic, 1).await.unwrap();
    let mut last = None;
    for i in 0..10 {
        let pos = queue
            .publish(record(&topic, "k", format!("m{i}")))
            .await
            .unwrap();
        if let Some(prev) = last {
            assert!(pos.offset > prev, "offsets grow within a partition");
        }
        last = Some(pos.offset);
    }

    let mut first = queue.consumer(&group, &[&topic]).await.unwrap();
    let mut deliveries = Vec::new();
    for i in 0..10 {
        let d = recv(&mut first).await;
        assert_eq!(text(&d), format!("m{i}"));
        assert_eq!(
            d.record.header("traceparent").map(|v| v.len()),
            Some(55),
            "headers travel with the record"
        );
        deliveries.push(d);
    }
    let mut acks: Vec<_> = deliveries.into_iter().map(|d| Some(d.ack)).collect();
    for ack in &mut acks[0..5] {
        ack.take().unwrap().done();
    }
    // Done, but after a gap: must come again.
    acks[7].take().unwrap().done();
    drop(acks);
    first.close().await.unwrap();

    let mut second = queue.consumer(&group, &[&topic]).await.unwrap();
    let again: Vec<String> = {
        let mut v = Vec::new();
        for _ in 5..10 {
            v.push(text(&recv(&mut second).await));
        }
        v
    };
    assert_eq!(again, ["m5", "m6", "m7", "m8", "m9"]);
    // And nothing else: everything before m5 was stored.
    let extra = tokio::time::timeout(Duration::from_secs(2), second.recv()).await;
    assert!(
        extra.is_err(),
        "unexpected extra record: {:?}",
        extra.map(|r| r.map(|d| d.record))
    );
    second.close().await.unwrap();
}

/// Concurrent publishers: every record arrives exactly once; records of one key stay
/// in one partition and are consumed in offset order.
async fn concurrent_publishes_arrive_once_in_key_order(queue: Arc<dyn Queue>) {
    let topic = unique("fanin");
    queue.ensure_topic(&topic, 3).await.unwrap();
    let publishes = (0..200).map(|i| {
        let queue = queue.clone();
        let topic = topic.clone();
        async move {
            let key = format!("key{}", i % 20);
            queue
                .publish(record(&topic, &key, format!("{key}/{i}")))
                .await
                .unwrap()
        }
    });
    let results = futures::future::join_all(publishes).await;
    assert_eq!(results.len(), 200);

    let mut consumer = queue.consumer(&unique("group"), &[&topic]).await.unwrap();
    let mut seen = HashSet::new();
    let mut last_per_key: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    for _ in 0..200 {
        let d = recv(&mut consumer).await;
        assert!(seen.insert(text(&d)), "duplicate {}", text(&d));
        let key = String::from_utf8(d.record.key.to_vec()).unwrap();
        if let Some((partition, offset)) = last_per_key.get(&key) {
            assert_eq!(*partition, d.record.partition, "one key, one partition");
            assert!(d.record.offset > *offset);
        }
        last_per_key.insert(key, (d.record.partition, d.record.offset));
        d.ack.done();
    }
    assert_eq!(seen.len(), 200);
    consumer.close().await.unwrap();
}

async fn next(reader: &mut Box<dyn mailmesh_queue::PartitionReader>) -> (i64, String) {
    let rec = tokio::time::timeout(RECV_TIMEOUT, reader.recv())
        .await
        .expect("a record within the timeout")
        .unwrap();
    (rec.offset, String::from_utf8(rec.payload.to_vec()).unwrap())
}

/// Readers outside any group: each sees the whole partition from where it starts, and
/// waits for records written later.
async fn readers_see_every_record_from_their_offset(queue: Arc<dyn Queue>) {
    let topic = unique("log");
    queue.ensure_topic(&topic, 3).await.unwrap();
    assert_eq!(queue.partition_count(&topic).await.unwrap(), 3);
    let mut offsets = Vec::new();
    for i in 0..5 {
        let mut r = record(&topic, "any", format!("c{i}"));
        r.partition = Some(2);
        let pos = queue.publish(r).await.unwrap();
        assert_eq!(pos.partition, 2);
        offsets.push(pos.offset);
    }
    let mut all = queue.reader(&topic, 2, 0).await.unwrap();
    let mut late = queue.reader(&topic, 2, offsets[3]).await.unwrap();
    for (i, offset) in offsets.iter().enumerate() {
        assert_eq!(next(&mut all).await, (*offset, format!("c{i}")));
    }
    assert_eq!(next(&mut late).await, (offsets[3], "c3".into()));
    assert_eq!(next(&mut late).await, (offsets[4], "c4".into()));
    // Both wait for the next record.
    let mut r = record(&topic, "any", "c5".into());
    r.partition = Some(2);
    let pos = queue.publish(r).await.unwrap();
    assert_eq!(next(&mut all).await, (pos.offset, "c5".into()));
    assert_eq!(next(&mut late).await, (pos.offset, "c5".into()));

    let mut bad = record(&topic, "any", "x".into());
    bad.partition = Some(7);
    assert!(queue.publish(bad).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_readers() {
    let dir = tempfile::tempdir().unwrap();
    readers_see_every_record_from_their_offset(embedded(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_readers() {
    readers_see_every_record_from_their_offset(kafka()).await;
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Readers of many partitions share one consumer: librdkafka's threads (and broker
/// connections) do not grow with the partitions read; each reader still sees only
/// its partition, from its offset, and a partition closed and opened again reads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_readers_share_one_consumer() {
    let queue = kafka();
    let topic = unique("log");
    let partitions = 16;
    queue.ensure_topic(&topic, partitions).await.unwrap();
    for p in 0..partitions {
        for i in 0..2 {
            let mut r = record(&topic, "any", format!("p{p}-{i}"));
            r.partition = Some(p);
            queue.publish(r).await.unwrap();
        }
    }
    let before = threads();
    let mut readers = Vec::new();
    for p in 0..partitions {
        // Odd partitions from their second record.
        let mut reader = queue.reader(&topic, p, i64::from(p % 2)).await.unwrap();
        let first = p % 2;
        assert_eq!(
            next(&mut reader).await,
            (i64::from(first), format!("p{p}-{first}"))
        );
        readers.push(reader);
    }
    let grown = threads() - before;
    // A consumer of its own per reader would take at least 3 threads each (48).
    assert!(grown < 12, "{grown} threads for {partitions} readers");
    let mut r = record(&topic, "any", "p3-2".into());
    r.partition = Some(3);
    queue.publish(r).await.unwrap();
    assert_eq!(next(&mut readers[3]).await, (2, "p3-2".into()));
    // Closed and opened again on the same consumer.
    drop(readers.remove(5));
    let mut again = queue.reader(&topic, 5, 0).await.unwrap();
    assert_eq!(next(&mut again).await, (0, "p5-0".into()));
    assert_eq!(next(&mut again).await, (1, "p5-1".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_resume() {
    let dir = tempfile::tempdir().unwrap();
    second_consumer_resumes_after_the_stored_offset(embedded(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_fan_in() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_publishes_arrive_once_in_key_order(embedded(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_offsets_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let topic = "mail.queue";
    {
        let queue = embedded(dir.path()).await;
        for i in 0..4 {
            queue
                .publish(record(topic, "k", format!("m{i}")))
                .await
                .unwrap();
        }
        let mut c = queue.consumer("workers", &[topic]).await.unwrap();
        for _ in 0..2 {
            recv(&mut c).await.ack.done();
        }
        // No explicit commit: dropping the consumer (process exit) writes offsets.
    }
    let queue = embedded(dir.path()).await;
    let mut c = queue.consumer("workers", &[topic]).await.unwrap();
    assert_eq!(text(&recv(&mut c).await), "m2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_resume() {
    second_consumer_resumes_after_the_stored_offset(kafka()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_fan_in() {
    concurrent_publishes_arrive_once_in_key_order(kafka()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_ping_and_unreachable_broker() {
    kafka().ping().await.unwrap();
    let unreachable = KafkaQueue::connect(&KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        publish_timeout: Duration::from_secs(2),
        ..kafka_config()
    })
    .unwrap();
    // A publish that cannot be made durable fails (the front door answers 451).
    let err = unreachable
        .publish(record("mail.queue", "k", "m".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::Kafka(_) | QueueError::Timeout(_)),
        "{err}"
    );
    assert!(unreachable.ping().await.is_err());
}

/// A producer the broker failed for good (fenced, sequence broken) is replaced:
/// before, every later publish failed for ever while `/readyz` stayed green.
/// librdkafka's mock cluster answers one Produce with the error that makes an
/// idempotent producer fail fatally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_producer_is_replaced_after_a_fatal_error() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("fatal", 1, 1).unwrap();
    let queue = KafkaQueue::connect(&KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        publish_timeout: Duration::from_secs(10),
        ..kafka_config()
    })
    .unwrap();
    queue
        .publish(record("fatal", "k", "before".into()))
        .await
        .unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let failed = queue.publish(record("fatal", "k", "refused".into())).await;
    assert!(failed.is_err(), "the injected error was not seen");
    for n in 0..3 {
        queue
            .publish(record("fatal", "k", format!("after {n}")))
            .await
            .unwrap_or_else(|e| panic!("publish {n} after the fatal error: {e}"));
    }
    queue.ping().await.unwrap();
    assert_eq!(queue.stuck(), None);
}

/// The chart's production settings (SASL over TLS): the client is built with TLS and
/// SCRAM support and speaks TLS to the broker. Here the "broker" is a listener that
/// records the first bytes it gets: a TLS handshake record (0x16 0x03 …), not Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_sasl_ssl_speaks_tls() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first_bytes = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 3];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    });
    let properties = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "mailmesh"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let queue = KafkaQueue::connect(&KafkaConfig {
        brokers: addr.to_string(),
        properties,
        sasl_password: Some(mailmesh_kit::Secret::new("secret".into())),
        publish_timeout: Duration::from_secs(2),
        replication_factor: 3,
        session_timeout: Duration::from_secs(10),
        producer_recovery_timeout: Duration::from_secs(120),
    })
    .expect("librdkafka built with TLS and SASL/SCRAM");
    let publish = queue.publish(record("mail.queue", "k", "m".into()));
    let (published, seen) = tokio::join!(publish, first_bytes);
    assert!(published.is_err(), "no broker behind the listener");
    let seen = seen.unwrap();
    assert_eq!(&seen[..2], &[0x16, 0x03], "a TLS handshake, got {seen:?}");
}

/// `/readyz` of a process with a group consumer fails until the group has settled
/// with it (its first assignment), so a rolling restart waits for the group; a
/// closed consumer no longer counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_readiness_waits_for_the_group_to_settle() {
    use mailmesh_kit::ReadinessCheck;
    let queue = kafka();
    let topic = unique("settle");
    queue.ensure_topic(&topic, 2).await.unwrap();
    queue
        .publish(record(&topic, "k", "m".into()))
        .await
        .unwrap();
    let group = unique("g");
    let readiness = mailmesh_queue::QueueReadiness(queue.clone());
    readiness.check().await.unwrap();
    let mut c = queue.consumer(&group, &[&topic]).await.unwrap();
    assert_eq!(queue.unsettled_groups(), vec![group.clone()]);
    let err = readiness.check().await.unwrap_err();
    assert!(err.contains(&group), "{err}");
    // The group is joined while the consumer polls; a record comes once assigned.
    assert_eq!(text(&recv(&mut c).await), "m");
    assert!(queue.unsettled_groups().is_empty());
    readiness.check().await.unwrap();
    c.close().await.unwrap();
    assert!(queue.unsettled_groups().is_empty());
}

async fn assignment_where(
    member: &mut mailmesh_queue::Membership,
    what: &str,
    done: impl FnMut(&mailmesh_queue::Assignment) -> bool,
) -> std::collections::BTreeSet<i32> {
    tokio::time::timeout(RECV_TIMEOUT, member.assignment.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("{what} within {RECV_TIMEOUT:?}"))
        .expect("the member is alive")
        .partitions
        .clone()
}

/// Members of one group share a topic's partitions between them, each partition
/// with exactly one member; when a member leaves, the others take its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_members_split_partitions_and_take_over_a_leaver() {
    let topic = unique("owners");
    let group = unique("g");
    let (one, two) = (kafka(), kafka());
    one.ensure_topic(&topic, 6).await.unwrap();
    let mut a = one
        .membership(&group, &topic, Duration::from_secs(6))
        .await
        .unwrap();
    let all: std::collections::BTreeSet<i32> = (0..6).collect();
    let alone = assignment_where(&mut a, "the first member owns every partition", |x| {
        x.joined && x.partitions.len() == 6
    })
    .await;
    assert_eq!(alone, all);
    let mut b = two
        .membership(&group, &topic, Duration::from_secs(6))
        .await
        .unwrap();
    let theirs = assignment_where(&mut b, "the second member is given partitions", |x| {
        x.joined && !x.partitions.is_empty()
    })
    .await;
    let mine = assignment_where(&mut a, "the first member gives them up", |x| {
        x.partitions.is_disjoint(&theirs)
    })
    .await;
    assert!(
        !mine.is_empty() && !theirs.is_empty(),
        "{mine:?} / {theirs:?}"
    );
    // Sticky: whatever the second member has come from the first, and between them
    // they own everything once the move is done.
    let mine = assignment_where(&mut a, "every partition owned by one member", |x| {
        x.partitions.len() + b.assignment.borrow().partitions.len() == 6
    })
    .await;
    let theirs = b.assignment.borrow().partitions.clone();
    assert!(mine.is_disjoint(&theirs));
    assert_eq!(
        mine.union(&theirs)
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        all
    );
    drop(b);
    let back = assignment_where(&mut a, "the leaver's partitions come back", |x| {
        x.partitions.len() == 6
    })
    .await;
    assert_eq!(back, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_member_owns_every_partition() {
    let dir = tempfile::tempdir().unwrap();
    let queue = embedded(dir.path()).await;
    queue.ensure_topic("owners", 5).await.unwrap();
    let member = queue
        .membership("g", "owners", Duration::from_secs(6))
        .await
        .unwrap();
    let assignment = member.assignment.borrow().clone();
    assert!(assignment.joined);
    assert_eq!(assignment.partitions, (0..5).collect());
}

/// A topic made with a retention keeps it, and the queue reads it back; the
/// embedded log keeps everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topic_retention_is_set_and_read() {
    let queue = kafka();
    let topic = unique("retained");
    let week = Duration::from_secs(7 * 24 * 3600);
    queue
        .ensure_topic_with(&topic, 1, &[("retention.ms", week.as_millis().to_string())])
        .await
        .unwrap();
    assert_eq!(queue.retention(&topic).await.unwrap(), Some(week));
    let dir = tempfile::tempdir().unwrap();
    let embedded = embedded(dir.path()).await;
    embedded
        .ensure_topic_with("kept", 1, &[("retention.ms", "1000".into())])
        .await
        .unwrap();
    assert_eq!(embedded.retention("kept").await.unwrap(), None);
}

/// A frozen broker (connections open, nothing answered) fails a publish within
/// `publish_timeout`, so the front door can answer `451` in time: librdkafka alone
/// held it for its request timeout on top (37 s seen for a 30 s limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_publish_to_a_frozen_broker_fails_within_the_publish_timeout() {
    let broker = OwnBroker::start();
    let limit = Duration::from_secs(3);
    let queue = queue_on(&broker, limit);
    queue.ensure_topic("frozen", 1).await.unwrap();
    queue
        .publish(record("frozen", "k", "first".into()))
        .await
        .unwrap();
    broker.freeze();
    // Within the limit, with room for a loaded machine: not librdkafka's 30 s
    // request timeout on top.
    let outcome = tokio::time::timeout(
        limit * 3,
        queue.publish(record("frozen", "k", "second".into())),
    )
    .await
    .expect("the publish gave up instead of hanging");
    broker.thaw();
    assert!(outcome.is_err(), "a frozen broker acknowledged a record");
}

/// A queue on a broker of the test's own.
fn queue_on(broker: &OwnBroker, publish_timeout: Duration) -> KafkaQueue {
    KafkaQueue::connect(&KafkaConfig {
        brokers: broker.address(),
        publish_timeout,
        ..kafka_config()
    })
    .unwrap()
}

/// A broker that restarts empty (in memory: its topics are gone) must cost the
/// consumers a pause, not the process: librdkafka 2.12 dereferenced a NULL topic
/// name for the zero topic id tansu answers a Fetch of an unknown topic with
/// (SIGSEGV in `rd_kafka_metadata_cache_find`), killing every storage replica
/// and worker at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_readers_survive_a_broker_that_restarts_empty() {
    let mut broker = OwnBroker::start();
    let queue = queue_on(&broker, Duration::from_secs(5));
    queue.ensure_topic("restarted", 1).await.unwrap();
    queue
        .publish(record("restarted", "k", "first".into()))
        .await
        .unwrap();
    let mut reader = queue.reader("restarted", 0, 0).await.unwrap();
    let first = tokio::time::timeout(RECV_TIMEOUT, reader.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first.payload[..], b"first");
    let waiting = tokio::spawn(async move { reader.recv().await.map(|r| r.payload) });
    broker.restart();
    // The reader keeps fetching a topic the broker no longer knows.
    tokio::time::sleep(Duration::from_secs(5)).await;
    queue.ensure_topic("restarted", 1).await.unwrap();
    // The broker forgot the producer too: its sequence is never acknowledged
    // again, and the queue replaces it after two publish timeouts.
    let mut published = false;
    for _ in 0..20 {
        match queue
            .publish(record("restarted", "k", "second".into()))
            .await
        {
            Ok(_) => {
                published = true;
                break;
            }
            Err(e) => eprintln!("publish after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(published, "no publish to the restarted broker");
    let mut fresh = queue.reader("restarted", 0, 0).await.unwrap();
    let again = tokio::time::timeout(RECV_TIMEOUT, fresh.recv())
        .await
        .expect("a record from the restarted broker")
        .unwrap();
    assert_eq!(&again.payload[..], b"second");
    waiting.abort();
}
