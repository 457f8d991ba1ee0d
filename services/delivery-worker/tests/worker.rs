//! The delivery worker against the storage engine, on the embedded log and on real
//! Kafka + S3 (`MMTEST_*`, started by `scripts/backends.sh`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mailmesh_delivery::worker::Worker;
use mailmesh_kit::Shutdown;
use mailmesh_proto::decode_envelope;
use mailmesh_queue::OutgoingRecord;
use mailmesh_storage::client::{Account, DeliveryError, Mailstore, SigningKey};
use mailmesh_storage::directory::{Lookup, TenantLimits};
use mailmesh_storage::engine::{Delivery, UserRef};
use mailmesh_types::{Domain, DsnNotify, EmailAddress, EnvelopeLimits, InboundPolicy, TenantId};

mod common;

use common::{Setup, envelope, setup};

/// Each mailbox gets one copy, whatever addresses and redeliveries lead to it.
async fn one_copy_per_mailbox(real: bool) {
    let s = setup(real).await;
    let alice = s.user("alice@acme.test").await;
    let bob = s.user("bob@acme.test").await;
    s.engine
        .add_alias(
            "team@acme.test".parse().unwrap(),
            vec![
                "alice@acme.test".parse().unwrap(),
                "bob@acme.test".parse().unwrap(),
            ],
        )
        .await
        .unwrap();
    let (shutdown, task) = s.start();
    let e = envelope(
        "sender@example.org",
        &["alice@acme.test", "team@acme.test", "ALICE+x@acme.test"],
        "hello",
    );
    s.enqueue(&e).await;
    // The same record again, as after a crash before its offset was stored, then a
    // marker in the same partition: once the marker is in, both copies were
    // dispatched, and stopping (which drains) lets them finish.
    s.enqueue(&e).await;
    let mut marker = envelope("sender@example.org", &["alice@acme.test"], "marker");
    marker.queue_id = e.queue_id.derived("marker");
    s.enqueue_with_key(&marker, e.queue_id.to_string()).await;
    let _ = s.inbox(&alice, 2).await;
    s.stop(shutdown, task).await;
    let alices = s.inbox(&alice, 2).await;
    let bobs = s.inbox(&bob, 1).await;
    assert_eq!(bobs.len(), 1, "bob got one copy");
    assert_eq!(
        alices.len(),
        2,
        "alice got one copy and the marker: {alices:?}"
    );
    let m = alices
        .iter()
        .find(|m| m.contains("Subject: hello"))
        .unwrap();
    assert!(
        m.starts_with("Return-Path: <sender@example.org>\r\nDelivered-To: alice@acme.test\r\n"),
        "{m}"
    );
}

/// Unknown recipients bounce to the sender (a local user here); a null sender gets
/// nothing; remote recipients go to the outbound topic.
async fn bounces_and_remote_recipients(real: bool) {
    let s = setup(real).await;
    let carol = s.user("carol@acme.test").await;
    let (shutdown, task) = s.start();
    let mut e = envelope(
        "carol@acme.test",
        &["ghost@acme.test", "friend@remote.test"],
        "lost",
    );
    e.dsn_envid = Some("ENV-7".into());
    s.enqueue(&e).await;
    let mut bounce = envelope("", &["ghost2@acme.test"], "a bounce itself");
    bounce.recipients[0].notify = DsnNotify::DEFAULT;
    s.enqueue(&bounce).await;
    let inbox = s.inbox(&carol, 1).await;
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    let dsn = &inbox[0];
    for needed in [
        "Return-Path: <>\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Final-Recipient: rfc822; ghost@acme.test",
        "Status: 5.1.1",
        "Original-Envelope-Id: ENV-7",
        "Subject: lost",
    ] {
        assert!(dsn.contains(needed), "missing {needed:?} in\n{dsn}");
    }
    assert!(
        !dsn.contains("friend@remote.test"),
        "the remote recipient is not a failure"
    );

    let mut outbound = s
        .queue
        .reader(&s.config.outbound_topic, 0, 0)
        .await
        .unwrap();
    let mut other = s
        .queue
        .reader(&s.config.outbound_topic, 1, 0)
        .await
        .unwrap();
    let record = tokio::select! {
        r = outbound.recv() => r.unwrap(),
        r = other.recv() => r.unwrap(),
        _ = tokio::time::sleep(Duration::from_secs(30)) => panic!("nothing went outbound"),
    };
    let handed = decode_envelope(&record.payload, &EnvelopeLimits::default()).unwrap();
    assert_eq!(handed.queue_id, e.queue_id);
    assert_eq!(handed.recipients.len(), 1);
    assert_eq!(
        handed.recipients[0].address.to_string(),
        "friend@remote.test"
    );
    s.stop(shutdown, task).await;
}

/// RFC 3461: a recipient that asked (NOTIFY=SUCCESS) is reported delivered to the
/// sender; one that did not is not mentioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_notices_when_asked() {
    let s = setup(false).await;
    let carol = s.user("carol@acme.test").await;
    let dave = s.user("dave@acme.test").await;
    let _erin = s.user("erin@acme.test").await;
    let (shutdown, task) = s.start();
    let mut e = envelope(
        "carol@acme.test",
        &["dave@acme.test", "erin@acme.test"],
        "tell me",
    );
    e.recipients[0].notify = asked_for_success();
    s.enqueue(&e).await;
    s.inbox(&dave, 1).await;
    let inbox = s.inbox(&carol, 1).await;
    let notice = &inbox[0];
    for needed in [
        "Subject: Successful Mail Delivery Report",
        "Final-Recipient: rfc822; dave@acme.test\r\nAction: delivered\r\nStatus: 2.0.0\r\n",
        "Subject: tell me\r\n",
    ] {
        assert!(notice.contains(needed), "missing {needed:?} in\n{notice}");
    }
    assert!(!notice.contains("erin@acme.test"), "{notice}");

    // An alias to two mailboxes: "expanded" (RFC 3461 6.2.7.3).
    s.engine
        .add_alias(
            "team@acme.test".parse().unwrap(),
            vec![
                "dave@acme.test".parse().unwrap(),
                "erin@acme.test".parse().unwrap(),
            ],
        )
        .await
        .unwrap();
    let mut e = envelope("carol@acme.test", &["team@acme.test"], "to the team");
    e.recipients[0].notify = asked_for_success();
    s.enqueue(&e).await;
    let inbox = s.inbox(&carol, 2).await;
    let notice = inbox
        .iter()
        .find(|m| m.contains("Subject: to the team"))
        .unwrap_or_else(|| panic!("no notice for the alias: {inbox:?}"));
    assert!(
        notice.contains("Final-Recipient: rfc822; team@acme.test\r\nAction: expanded\r\n"),
        "{notice}"
    );
    s.stop(shutdown, task).await;
}

fn asked_for_success() -> DsnNotify {
    DsnNotify {
        success: true,
        failure: true,
        delay: false,
    }
}

/// Bodies stored in object storage by the front door are delivered too; undecodable
/// records are parked, not retried forever and not lost.
async fn large_bodies_and_bad_records(real: bool) {
    let s = setup(real).await;
    let dave = s.user("dave@acme.test").await;
    let (shutdown, task) = s.start();
    s.queue
        .publish(OutgoingRecord {
            topic: s.config.topic.clone(),
            key: Bytes::from_static(b"junk"),
            payload: Bytes::from_static(b"\xff\xfe not a queue record"),
            headers: vec![],
            partition: None,
        })
        .await
        .unwrap();
    let mut e = envelope("sender@example.org", &["dave@acme.test"], "big");
    let body = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(300_000));
    s.store_body(&mut e, &body).await;
    s.enqueue(&e).await;
    let inbox = s.inbox(&dave, 1).await;
    assert_eq!(inbox.len(), 1);
    assert!(inbox[0].ends_with(&body));

    let dead = s.dead_letters(Duration::from_secs(3)).await;
    assert_eq!(dead.len(), 1, "the bad record was parked once");
    assert!(dead[0].header("mailmesh-reason").is_some());
    s.stop(shutdown, task).await;
}

/// A worker killed with records in flight (its whole runtime dropped: no drain, no
/// commit, tasks cut mid-way): another one delivers every message, each once.
async fn a_killed_worker_loses_nothing_and_duplicates_nothing(real: bool) {
    let s = setup(real).await;
    let erin = s.user("erin@acme.test").await;
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let worker = Worker::new(
        s.queue.clone(),
        s.objects.clone(),
        Arc::new(s.engine.clone()),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        s.config.clone(),
    );
    let doomed_shutdown = Shutdown::new();
    doomed.spawn(worker.run(doomed_shutdown));
    for i in 0..30 {
        s.enqueue(&envelope(
            "sender@example.org",
            &["erin@acme.test"],
            &format!("m{i}"),
        ))
        .await;
    }
    let _ = s.inbox(&erin, 5).await;
    // Dropping the runtime drops every task in it where it stands.
    tokio::task::spawn_blocking(move || doomed.shutdown_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    let (shutdown, second) = s.start();
    let inbox = s.inbox(&erin, 30).await;
    s.stop(shutdown, second).await;
    let mut subjects: Vec<String> = inbox
        .iter()
        .filter_map(|m| {
            m.lines()
                .find(|l| l.starts_with("Subject: "))
                .map(str::to_owned)
        })
        .collect();
    subjects.sort();
    let mut expected: Vec<String> = (0..30).map(|i| format!("Subject: m{i}")).collect();
    expected.sort();
    assert_eq!(subjects, expected, "every message once");
}

/// A user in tenant `full`, whose storage is nearly used up: deliveries to it fail
/// temporarily (4.2.2) until the limit is lifted.
async fn nearly_full_user(s: &Setup) -> UserRef {
    let full: mailmesh_types::TenantId = "full".parse().unwrap();
    s.engine
        .add_tenant(full.clone(), TenantLimits::default())
        .await
        .unwrap();
    s.engine
        .add_domain(full.clone(), "full.test".parse().unwrap())
        .await
        .unwrap();
    let frank = s.user("frank@full.test").await;
    s.engine
        .append(
            &frank,
            "Archive",
            Bytes::from(vec![b'x'; 560]),
            Default::default(),
            0,
        )
        .await
        .unwrap();
    s.engine
        .set_tenant_limits(
            full,
            TenantLimits {
                max_storage_bytes: Some(600),
                ..TenantLimits::default()
            },
        )
        .await
        .unwrap();
    frank
}

/// A mailbox failing temporarily does not hold up the other recipients: they get the
/// message now, the failing one waits alone in the retry index (with the reason,
/// for `mailctl queue list`) and gets it once it recovers, and nobody gets a second
/// copy. The body (in object storage), handed from each round to the next, is
/// freed after the last.
async fn a_failing_mailbox_is_requeued_alone(real: bool) {
    let s = setup(real).await;
    let alice = s.user("alice@acme.test").await;
    let frank = nearly_full_user(&s).await;
    let (shutdown, task) = s.start();
    let mut both = envelope(
        "sender@example.org",
        &["alice@acme.test", "frank@full.test"],
        "both",
    );
    let key = s
        .store_body(&mut both, "Subject: both\r\n\r\nboth\r\n")
        .await;
    s.enqueue(&both).await;
    assert_eq!(s.inbox(&alice, 1).await.len(), 1, "alice is not held up");
    // Frank's copy waits in the local retry index, with why.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let listed = mailmesh_storage::retry_index::list(&*s.objects, &s.config.retry_prefix, 10)
            .await
            .unwrap();
        if let Some(w) = listed.into_iter().next() {
            break w;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never in the retry index"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(waiting.queue_id, both.queue_id);
    let to: Vec<String> = waiting
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.to_string())
        .collect();
    assert_eq!(to, ["frank@full.test"], "only the failing recipient waits");
    assert!(
        waiting.last_error.starts_with("<frank@full.test>: 4.2.2 "),
        "{}",
        waiting.last_error
    );
    // Let it go round the queue a few times, then make room.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.inbox(&frank, 0).await.is_empty());
    s.engine
        .set_tenant_limits("full".parse().unwrap(), TenantLimits::default())
        .await
        .unwrap();
    assert_eq!(
        s.inbox(&frank, 1).await.len(),
        1,
        "frank gets it once there is room"
    );
    s.stop(shutdown, task).await;
    assert_eq!(
        s.inbox(&alice, 1).await.len(),
        1,
        "alice still has one copy"
    );
    assert_eq!(
        s.objects_under("t/acme/queue").await,
        [format!("{key}.done")],
        "the body and every round's claim are gone"
    );
}

/// A message still failing after its lifetime is bounced (4.4.7), not retried on.
async fn an_expired_message_is_bounced(real: bool) {
    let s = setup(real).await;
    let carol = s.user("carol@acme.test").await;
    nearly_full_user(&s).await;
    let (shutdown, task) = s.start();
    let mut old = envelope("carol@acme.test", &["frank@full.test"], "old news");
    old.received_at = SystemTime::now() - Duration::from_secs(6 * 24 * 3600);
    s.enqueue(&old).await;
    let inbox = s.inbox(&carol, 1).await;
    s.stop(shutdown, task).await;
    assert_eq!(inbox.len(), 1);
    assert!(inbox[0].contains("Status: 4.4.7"), "{}", inbox[0]);
    assert!(inbox[0].contains("Action: failed"), "{}", inbox[0]);
}

/// Storage that never answers: every call fails as a refused connection does.
struct Unreachable;

#[async_trait::async_trait]
impl Mailstore for Unreachable {
    async fn lookup(&self, _: &EmailAddress) -> Result<Lookup, DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
    async fn deliver(&self, _: &UserRef, _: Delivery<'_>) -> Result<(), DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
    async fn has_room(&self, _: &UserRef, _: u64) -> Result<bool, DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
    async fn authenticate(
        &self,
        _: &str,
        _: &str,
        _: std::net::IpAddr,
    ) -> Result<Option<Account>, DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
    async fn signing_key(
        &self,
        _: &Account,
        _: &Domain,
    ) -> Result<Option<SigningKey>, DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
    async fn refresh(&self, _: &mut Account) -> Result<bool, DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
    async fn local_domain(
        &self,
        _: &Domain,
    ) -> Result<Option<(TenantId, InboundPolicy)>, DeliveryError> {
        Err(DeliveryError::temporary("storage: connection refused"))
    }
}

/// With no storage replica reachable, a message goes round the queue with a
/// growing wait in the retry index (`retry_initial` doubling to `requeue_max`) and
/// a round count, instead of a tight loop (17 requeues of 8 messages within a
/// second before).
async fn requeues_back_off_while_storage_is_unreachable(real: bool) {
    let mut s = setup(real).await;
    s.config.retry_initial = Duration::from_millis(400);
    s.config.requeue_max = Duration::from_secs(60);
    let shutdown = Shutdown::new();
    let worker = Worker::new(
        s.queue.clone(),
        s.objects.clone(),
        Arc::new(Unreachable),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        s.config.clone(),
    );
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { worker.run(stop).await.unwrap() });
    s.enqueue(&envelope(
        "sender@example.org",
        &["alice@acme.test"],
        "waits",
    ))
    .await;
    // Every record of the topic, with its round count.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for partition in 0..2 {
        let mut reader = s.queue.reader(&s.config.topic, partition, 0).await.unwrap();
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(r) = reader.recv().await {
                let round = r
                    .header("mailmesh-rounds")
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                seen.lock().unwrap().push(round);
            }
        }));
    }
    let first_round = Some("1".to_owned());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen.lock().unwrap().contains(&first_round) {
        assert!(std::time::Instant::now() < deadline, "never requeued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Rounds 2 and 3 follow 0.8 and 2.4 s after round 1, round 4 only after 5.6 s:
    // 3 s later there are at most three requeues, where a tight loop makes
    // hundreds. Stopped at once: a round waiting then stays in the index.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = mailmesh_kit::config::ShutdownConfig {
        readiness_grace: Duration::ZERO,
        drain_timeout: Duration::ZERO,
    };
    shutdown.drain(&mailmesh_kit::Health::new(), &now).await;
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in readers {
        r.abort();
    }
    let mut rounds = seen.lock().unwrap().clone();
    rounds.sort();
    assert!(
        (2..=4).contains(&rounds.len()),
        "the message and its requeues: {rounds:?}"
    );
    // The first record, then rounds 1, 2, … in order, each counted once.
    let expected: Vec<Option<String>> = std::iter::once(None)
        .chain((1..rounds.len()).map(|n| Some(n.to_string())))
        .collect();
    assert_eq!(rounds, expected);
}

macro_rules! on_both {
    ($($name:ident),*) => {
        mod embedded_backends {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(false).await;
            })*
        }
        mod real_backends {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(true).await;
            })*
        }
    };
}

on_both!(
    one_copy_per_mailbox,
    bounces_and_remote_recipients,
    large_bodies_and_bad_records,
    a_killed_worker_loses_nothing_and_duplicates_nothing,
    a_failing_mailbox_is_requeued_alone,
    an_expired_message_is_bounced,
    requeues_back_off_while_storage_is_unreachable
);
