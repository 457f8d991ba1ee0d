//! The storage engine end to end, on the embedded backends and on real Kafka + S3
//! (`MMTEST_KAFKA`, `MMTEST_S3*`, started by `scripts/backends.sh`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mailmesh_kit::Secret;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStore, ObjectStoreExt};
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig};
use mailmesh_queue::Queue;
use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};
use mailmesh_storage::EngineError;
use mailmesh_storage::StorageError;
use mailmesh_storage::directory::{Lookup, TenantLimits};
use mailmesh_storage::engine::{Delivery, StorageConfig, StorageEngine, UserRef};
use mailmesh_storage::index::{Flags, INBOX, IndexLimits, StoreAction, UidRange};

/// One deployment's backends; engines opened on it are replicas of one storage service.
struct Backends {
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    config: StorageConfig,
    _dir: Option<tempfile::TempDir>,
}

fn config(run: &str) -> StorageConfig {
    StorageConfig {
        // Fresh topics per test: the broker outlives test runs.
        directory_topic: format!("{run}.directory"),
        mailbox_topic: format!("{run}.mailboxes"),
        mailbox_partitions: 4,
        snapshot_every: 7,
        snapshot_interval: Duration::from_secs(60),
        write_timeout: Duration::from_secs(30),
        max_message_bytes: 1 << 20,
        index_limits: IndexLimits::default(),
        outbound_retry_prefix: format!("{run}/retry"),
        local_retry_prefix: format!("{run}/local-retry"),
        // Short test passwords; the policy has tests of its own.
        password_policy: mailmesh_storage::password_policy::PasswordPolicy::relaxed(),
        ..StorageConfig::default()
    }
}

fn run_id() -> String {
    format!("t{}", uuid::Uuid::new_v4().simple())
}

async fn embedded() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn Queue> = Arc::new(
        EmbeddedLog::open(&EmbeddedConfig::new(dir.path().join("queue")))
            .await
            .unwrap(),
    );
    let objects = mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
        dir: dir.path().join("objects"),
    }))
    .unwrap();
    Backends {
        queue,
        objects,
        config: config(&run_id()),
        _dir: Some(dir),
    }
}

fn real() -> Backends {
    Backends {
        queue: mailmesh_storage::testing::real_queue(),
        objects: mailmesh_storage::testing::real_objects(),
        config: config(&run_id()),
        _dir: None,
    }
}

impl Backends {
    async fn engine(&self) -> Arc<StorageEngine> {
        StorageEngine::open(
            self.queue.clone(),
            self.objects.clone(),
            self.config.clone(),
        )
        .await
        .unwrap()
    }

    /// A second replica with its own broker connection, as another pod would have.
    async fn other_replica(&self) -> Arc<StorageEngine> {
        let queue = if self._dir.is_some() {
            self.queue.clone()
        } else {
            mailmesh_storage::testing::real_queue()
        };
        StorageEngine::open(queue, self.objects.clone(), self.config.clone())
            .await
            .unwrap()
    }
}

fn a(s: &str) -> mailmesh_types::EmailAddress {
    s.parse().unwrap()
}

async fn tenant_with_user(
    engine: &StorageEngine,
    tenant: &str,
    address: &str,
    quota: Option<u64>,
) -> UserRef {
    let t: mailmesh_types::TenantId = tenant.parse().unwrap();
    let domain = a(address).domain().clone();
    match engine.add_tenant(t.clone(), TenantLimits::default()).await {
        Ok(()) | Err(EngineError::Refused(StorageError::AlreadyExists(_))) => {}
        Err(e) => panic!("{e}"),
    }
    match engine.add_domain(t, domain).await {
        Ok(()) | Err(EngineError::Refused(StorageError::AlreadyExists(_))) => {}
        Err(e) => panic!("{e}"),
    }
    engine
        .add_user(a(address), Secret::new("s3cret!".into()), quota)
        .await
        .unwrap()
}

const MESSAGE: &[u8] = b"From: sender@example.org\r\nSubject: hello\r\n\r\nbody line\r\n";

async fn deliver_list_fetch_and_replay(b: Backends) {
    let engine = b.engine().await;
    let alice = tenant_with_user(&engine, "acme", "alice@acme.test", None).await;
    let names: Vec<String> = engine
        .read_index(&alice, |i| {
            i.unwrap().mailboxes().map(|m| m.name.clone()).collect()
        })
        .await
        .unwrap();
    assert_eq!(
        names,
        ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"]
    );

    let Lookup::Deliver(resolution) = engine.lookup(&a("ALICE@acme.test")).unwrap() else {
        panic!("alice not found")
    };
    assert_eq!(resolution.users, [(alice.tenant.clone(), alice.user)]);

    let sender = "sender@example.org".parse().unwrap();
    let to = a("alice@acme.test");
    let delivery = Delivery {
        mailbox: INBOX,
        return_path: &sender,
        delivered_to: &to,
        message: MESSAGE,
        key: "q1/alice@acme.test",
        internal_date_ms: 1_780_000_000_000,
    };
    let first = engine.deliver(&alice, delivery).await.unwrap();
    assert_eq!((first.uid, first.duplicate), (1, false));
    let replay = engine.deliver(&alice, delivery).await.unwrap();
    assert_eq!(
        (replay.uid, replay.duplicate),
        (1, true),
        "a replay stores nothing new"
    );

    let stored = engine.fetch(&alice, "inbox", 1, None).await.unwrap();
    let expected = [
        b"Return-Path: <sender@example.org>\r\nDelivered-To: alice@acme.test\r\n".as_slice(),
        MESSAGE,
    ]
    .concat();
    assert_eq!(stored.as_ref(), expected.as_slice());
    let part = engine.fetch(&alice, INBOX, 1, Some(0..11)).await.unwrap();
    assert_eq!(part.as_ref(), b"Return-Path");
    // Partial fetches past the end give what exists, or nothing.
    let len = expected.len() as u64;
    let tail = engine
        .fetch(&alice, INBOX, 1, Some(len - 4..len + 100))
        .await
        .unwrap();
    assert_eq!(tail.as_ref(), b"ne\r\n");
    let past = engine
        .fetch(&alice, INBOX, 1, Some(len + 10..len + 20))
        .await
        .unwrap();
    assert!(past.is_empty());

    let objects: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(
        b.objects
            .list(Some(&Path::from(format!("t/acme/u/{}", alice.user)))),
    )
    .await
    .unwrap();
    assert_eq!(
        objects.len(),
        1,
        "one object for the delivery and its replay"
    );
    assert_eq!(
        engine.quota(&alice).await.unwrap(),
        (expected.len() as u64, None)
    );
}

async fn flags_expunge_and_quota(b: Backends) {
    let engine = b.engine().await;
    let bob = tenant_with_user(&engine, "acme", "bob@acme.test", Some(1000)).await;
    let mut uids = Vec::new();
    for _ in 0..3 {
        let appended = engine
            .append(
                &bob,
                INBOX,
                Bytes::from(vec![b'x'; 300]),
                Flags::default(),
                0,
            )
            .await
            .unwrap();
        uids.push(appended.uid);
    }
    let err = engine
        .append(
            &bob,
            INBOX,
            Bytes::from(vec![b'x'; 300]),
            Flags::default(),
            0,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Refused(StorageError::OverQuota {
                permanent: false,
                ..
            })
        ),
        "{err}"
    );
    // The tenant's message size limit applies below the service's own.
    engine
        .set_tenant_limits(
            "acme".parse().unwrap(),
            TenantLimits {
                max_message_bytes: Some(200),
                ..TenantLimits::default()
            },
        )
        .await
        .unwrap();
    let err = engine
        .append(
            &bob,
            "Archive",
            Bytes::from(vec![b'x'; 250]),
            Flags::default(),
            0,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Refused(StorageError::OverQuota { permanent: true, reason }) if reason.contains("200 bytes")),
        "{err}"
    );
    engine
        .set_tenant_limits("acme".parse().unwrap(), TenantLimits::default())
        .await
        .unwrap();
    let err = engine
        .append(
            &bob,
            INBOX,
            Bytes::from(vec![b'x'; 5000]),
            Flags::default(),
            0,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Refused(StorageError::OverQuota {
                permanent: true,
                ..
            })
        ),
        "{err}"
    );

    let before = engine
        .read_index(&bob, |i| i.unwrap().mailbox(INBOX).unwrap().highest_modseq)
        .await
        .unwrap();
    let deleted = Flags::parse(["\\Deleted"], &IndexLimits::default()).unwrap();
    engine
        .store_flags(
            &bob,
            INBOX,
            vec![UidRange::one(uids[0])],
            StoreAction::Add,
            deleted,
            None,
        )
        .await
        .unwrap();
    let after = engine
        .read_index(&bob, |i| i.unwrap().mailbox(INBOX).unwrap().highest_modseq)
        .await
        .unwrap();
    assert!(after > before, "a flag change bumps MODSEQ");
    assert_eq!(engine.expunge(&bob, INBOX, None).await.unwrap(), [uids[0]]);
    assert_eq!(engine.quota(&bob).await.unwrap(), (600, Some(1000)));
    // Sessions not told of the expunge yet still read it (`expunged_retention`).
    assert_eq!(
        engine
            .fetch(&bob, INBOX, uids[0], None)
            .await
            .unwrap()
            .len(),
        300
    );
    assert!(matches!(
        engine.fetch(&bob, INBOX, uids[0] + 100, None).await,
        Err(EngineError::Refused(StorageError::NotFound(_)))
    ));

    let (_, mapping) = engine
        .copy(
            &bob,
            INBOX,
            "Archive",
            vec![UidRange { first: 1, last: 10 }],
            true,
        )
        .await
        .unwrap();
    assert_eq!(mapping, [(uids[1], 1), (uids[2], 2)]);
    assert_eq!(
        engine.fetch(&bob, "Archive", 2, None).await.unwrap().len(),
        300
    );
    let inbox_left = engine
        .read_index(&bob, |i| i.unwrap().mailbox(INBOX).unwrap().messages.len())
        .await
        .unwrap();
    assert_eq!(inbox_left, 0);
}

/// Appends from many tasks through two replicas: every UID distinct, and both
/// replicas hold the same index afterwards.
async fn concurrent_appends_through_two_replicas(mut b: Backends) {
    // Every replica applies every partition (owned partitions are tested through
    // the routed gRPC service): two writers of one partition.
    b.config.owned_partitions = false;
    let one = b.engine().await;
    let carol = tenant_with_user(&one, "acme", "carol@acme.test", None).await;
    let two = b.other_replica().await;
    two.sync_directory().await.unwrap();

    let tasks = (0..40).map(|i| {
        let engine = if i % 2 == 0 { one.clone() } else { two.clone() };
        let carol = carol.clone();
        tokio::spawn(async move {
            engine
                .append(
                    &carol,
                    INBOX,
                    Bytes::from(format!("Subject: {i}\r\n\r\n{i}\r\n")),
                    Flags::default(),
                    0,
                )
                .await
                .unwrap()
                .uid
        })
    });
    let mut uids = BTreeSet::new();
    for t in futures::future::join_all(tasks).await {
        assert!(uids.insert(t.unwrap()), "a UID was given twice");
    }
    assert_eq!(uids, (1..=40).collect::<BTreeSet<_>>());

    one.sync_user(&carol).await.unwrap();
    two.sync_user(&carol).await.unwrap();
    let view = |e: Arc<StorageEngine>, carol: UserRef| async move {
        e.read_index(&carol, |i| {
            let m = i.unwrap().mailbox(INBOX).unwrap();
            (m.uidnext, m.highest_modseq, m.messages.clone())
        })
        .await
        .unwrap()
    };
    assert_eq!(
        view(one.clone(), carol.clone()).await,
        view(two.clone(), carol.clone()).await
    );

    // Each UID's content is the message that got it, through either replica.
    for uid in [1, 20, 40] {
        let a = one.fetch(&carol, INBOX, uid, None).await.unwrap();
        let b = two.fetch(&carol, INBOX, uid, None).await.unwrap();
        assert_eq!(a, b);
    }
}

/// A user of one tenant cannot reach another tenant's messages by naming them.
async fn tenants_are_isolated(b: Backends) {
    let engine = b.engine().await;
    let eve = tenant_with_user(&engine, "evil", "eve@evil.test", None).await;
    let dave = tenant_with_user(&engine, "globex", "dave@globex.test", None).await;
    engine
        .append(
            &dave,
            INBOX,
            Bytes::from_static(b"Subject: secret\r\n\r\n"),
            Flags::default(),
            0,
        )
        .await
        .unwrap();
    // Eve's tenant with Dave's user id: not Dave.
    let forged = UserRef {
        tenant: eve.tenant.clone(),
        user: dave.user,
    };
    assert!(matches!(
        engine.fetch(&forged, INBOX, 1, None).await,
        Err(EngineError::Refused(StorageError::NotFound(_)))
    ));
    assert!(matches!(
        engine.read_index(&forged, |i| i.is_none()).await,
        Err(EngineError::Refused(StorageError::NotFound(_)))
    ));
    assert!(
        engine
            .append(
                &forged,
                INBOX,
                Bytes::from_static(b"x"),
                Flags::default(),
                0
            )
            .await
            .is_err()
    );
    // Mailbox names cannot climb out of the user's prefix.
    assert!(engine.fetch(&eve, "../../globex", 1, None).await.is_err());
    // The domain stays with its owner.
    let err = engine
        .add_domain("evil".parse().unwrap(), "globex.test".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Refused(StorageError::FailedPrecondition(_))
        ),
        "{err}"
    );
    assert_eq!(
        engine.lookup(&a("eve@globex.test")).unwrap(),
        Lookup::Unknown
    );
}

/// A restarted replica (new process) replays snapshot + log to the same state.
async fn restart_replays_to_the_same_state(mut b: Backends) {
    // Every change written back at once, so checkpoints cover the commands.
    b.config.index_writeback_delay = Duration::ZERO;
    let before = {
        let engine = b.engine().await;
        let frank = tenant_with_user(&engine, "acme", "frank@acme.test", None).await;
        // More commands than `snapshot_every`, so a snapshot is written and used.
        for i in 0..20 {
            engine
                .append(
                    &frank,
                    INBOX,
                    Bytes::from(format!("m{i}")),
                    Flags::default(),
                    0,
                )
                .await
                .unwrap();
        }
        let state = engine
            .read_index(&frank, |i| i.unwrap().mailbox(INBOX).unwrap().clone())
            .await
            .unwrap();
        (frank, state)
    };
    // A read that must see every earlier change: where the log's end is known
    // exactly (the embedded log) it writes nothing; on Kafka, one barrier record.
    let barriers = || {
        mailmesh_kit::metrics::render()
            .lines()
            .filter(|l| {
                l.starts_with("mailmesh_storage_records_published_total")
                    && l.contains("kind=\"barrier\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let exact = b
        .queue
        .end_offset(&b.config.mailbox_topic, 0)
        .await
        .unwrap()
        .is_some();
    let before_sync = barriers();
    let engine = b.engine().await;
    let frank = before.0.clone();
    engine.sync_user(&frank).await.unwrap();
    let written = barriers() - before_sync;
    drop(engine);
    if exact {
        assert_eq!(written, 0.0, "the embedded log's end is exact");
    } else {
        assert!(written >= 1.0, "Kafka: a barrier ({written})");
    }
    // Snapshots are written by the log reader, which may come by the records after
    // their writers had their outcomes (applied at the produce ack).
    wait_for_objects(&b.objects, "index", "no snapshot was written").await;

    let engine = b.engine().await;
    let (frank, state) = before;
    assert!(
        engine
            .authenticate(&a("frank@acme.test"), Secret::new("s3cret!".into()))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        engine
            .authenticate(&a("frank@acme.test"), Secret::new("wrong".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        engine
            .authenticate(&a("nobody@acme.test"), Secret::new("s3cret!".into()))
            .await
            .unwrap()
            .is_none()
    );
    let replayed = engine
        .read_index(&frank, |i| i.unwrap().mailbox(INBOX).unwrap().clone())
        .await
        .unwrap();
    assert_eq!(replayed, state);
    let next = engine
        .append(
            &frank,
            INBOX,
            Bytes::from_static(b"after restart"),
            Flags::default(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(next.uid, 21, "UIDs continue, never reused");
}

/// Messages moved by RENAME INBOX stay readable; deleting a mailbox deletes its objects.
async fn rename_inbox_and_delete_mailbox(b: Backends) {
    let engine = b.engine().await;
    let gina = tenant_with_user(&engine, "acme", "gina@acme.test", Some(10_000)).await;
    for i in 0..3 {
        engine
            .append(
                &gina,
                INBOX,
                Bytes::from(format!("message {i}")),
                Flags::default(),
                0,
            )
            .await
            .unwrap();
    }
    engine
        .index(
            &gina,
            mailmesh_storage::index::IndexCommand::RenameMailbox {
                from: INBOX.into(),
                to: "Old".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        engine.fetch(&gina, "Old", 2, None).await.unwrap().as_ref(),
        b"message 1"
    );
    let objects = |b: &Backends, gina: &UserRef| {
        let list = b
            .objects
            .list(Some(&Path::from(format!("t/acme/u/{}", gina.user))));
        async move {
            futures::TryStreamExt::try_collect::<Vec<_>>(list)
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(objects(&b, &gina).await, 3);
    engine.delete_mailbox(&gina, "Old").await.unwrap();
    assert_eq!(
        objects(&b, &gina).await,
        0,
        "the mailbox's objects went with it"
    );
    assert_eq!(engine.quota(&gina).await.unwrap().0, 0);
}

/// A tenant's storage limit counts every user, whichever partition holds them.
async fn tenant_storage_limit(b: Backends) {
    let engine = b.engine().await;
    let mut users = Vec::new();
    for name in ["u1", "u2", "u3", "u4"] {
        users.push(tenant_with_user(&engine, "big", &format!("{name}@big.test"), None).await);
    }
    for user in &users {
        engine
            .append(
                user,
                INBOX,
                Bytes::from(vec![b'x'; 100]),
                Flags::default(),
                0,
            )
            .await
            .unwrap();
    }
    let tenant: mailmesh_types::TenantId = "big".parse().unwrap();
    assert_eq!(engine.tenant_usage(&tenant).await.unwrap(), 400);
    engine
        .set_tenant_limits(
            tenant.clone(),
            TenantLimits {
                max_storage_bytes: Some(450),
                ..TenantLimits::default()
            },
        )
        .await
        .unwrap();
    let err = engine
        .append(
            &users[0],
            INBOX,
            Bytes::from(vec![b'x'; 100]),
            Flags::default(),
            0,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Refused(StorageError::OverQuota { permanent: false, reason }) if reason.contains("tenant storage full")),
        "{err}"
    );
    // Freeing space makes room again.
    let deleted = Flags::parse(["\\Deleted"], &IndexLimits::default()).unwrap();
    engine
        .store_flags(
            &users[1],
            INBOX,
            vec![UidRange::one(1)],
            StoreAction::Add,
            deleted,
            None,
        )
        .await
        .unwrap();
    engine.expunge(&users[1], INBOX, None).await.unwrap();
    assert_eq!(engine.tenant_usage(&tenant).await.unwrap(), 300);
    engine
        .append(
            &users[0],
            INBOX,
            Bytes::from(vec![b'x'; 100]),
            Flags::default(),
            0,
        )
        .await
        .unwrap();
}

/// The object keys under `prefix`.
async fn keys_under(objects: &Arc<dyn ObjectStore>, prefix: &str) -> BTreeSet<String> {
    use futures::TryStreamExt;
    objects
        .list(Some(&Path::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

/// An expunged message's object stays readable for `expunged_retention` (sessions
/// not yet told of the expunge fetch it), then goes. An object no index names (left
/// by a crash between the object write and its command) goes with the orphan sweep
/// once older than `orphan_grace`; named ones stay.
async fn unreferenced_objects_go(mut b: Backends) {
    b.config.expunged_retention = Duration::from_secs(1);
    b.config.write_timeout = Duration::from_secs(2);
    b.config.orphan_grace = Duration::from_secs(4);
    b.config.orphan_sweep_interval = Duration::ZERO;
    let engine = b.engine().await;
    let carol = tenant_with_user(&engine, "acme", "carol@acme.test", None).await;
    // Owned partitions: the replica's share arrives a few seconds after it joins.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !engine.owns(&carol) {
        assert!(std::time::Instant::now() < deadline, "never owned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut uids = Vec::new();
    for body in [&b"first"[..], b"second"] {
        let appended = engine
            .append(&carol, INBOX, Bytes::from(body), Flags::default(), 0)
            .await
            .unwrap();
        uids.push(appended.uid);
    }
    let prefix = format!("t/acme/u/{}", carol.user);
    let named = keys_under(&b.objects, &prefix).await;
    assert_eq!(named.len(), 2);

    let deleted = Flags::parse(["\\Deleted"], &IndexLimits::default()).unwrap();
    engine
        .store_flags(
            &carol,
            INBOX,
            vec![UidRange::one(uids[0])],
            StoreAction::Add,
            deleted,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        engine
            .expunge(&carol, INBOX, Some(vec![UidRange::one(uids[0])]))
            .await
            .unwrap(),
        [uids[0]]
    );
    assert_eq!(
        engine
            .fetch(&carol, INBOX, uids[0], Some(1..3))
            .await
            .unwrap(),
        &b"ir"[..],
        "kept for the retention"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while keys_under(&b.objects, &prefix).await.len() > 1 {
        assert!(std::time::Instant::now() < deadline, "deleted after it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        engine.fetch(&carol, INBOX, uids[0], None).await,
        Err(EngineError::Refused(StorageError::NotFound(_)))
    ));

    // A crash between writing an object and the command naming it.
    let kept = keys_under(&b.objects, &prefix).await;
    let folder = kept.first().unwrap().rsplit_once('/').unwrap().0.to_owned();
    let orphan = format!("{folder}/orphan");
    b.objects
        .put(
            &Path::from(orphan.as_str()),
            Bytes::from_static(b"lost").into(),
        )
        .await
        .unwrap();
    let swept = engine.sweep_orphans().await.unwrap();
    assert_eq!(
        (swept.users, swept.objects),
        (1, 0),
        "too young to be an orphan"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let swept = engine.sweep_orphans().await.unwrap();
    assert_eq!((swept.objects, swept.bytes), (1, 4), "{swept:?}");
    assert_eq!(keys_under(&b.objects, &prefix).await, kept);
    assert_eq!(
        engine.fetch(&carol, INBOX, uids[1], None).await.unwrap(),
        &b"second"[..]
    );
}

macro_rules! on_both {
    ($($name:ident),*) => {
        mod embedded_backends {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::embedded().await).await;
            })*
        }
        mod real_backends {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::real()).await;
            })*
        }
    };
}

on_both!(
    deliver_list_fetch_and_replay,
    flags_expunge_and_quota,
    concurrent_appends_through_two_replicas,
    tenants_are_isolated,
    restart_replays_to_the_same_state,
    rename_inbox_and_delete_mailbox,
    tenant_storage_limit,
    the_log_before_a_checkpoint_may_go,
    unreferenced_objects_go
);

/// Snapshots go out on time too, so a quiet log (the directory) is covered before
/// the broker's retention could remove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_logs_are_snapshotted_on_time() {
    let mut b = embedded().await;
    b.config.snapshot_every = 1_000_000;
    b.config.snapshot_interval = Duration::from_millis(1000);
    let engine = b.engine().await;
    tenant_with_user(&engine, "acme", "quiet@acme.test", None).await;
    wait_for_objects(
        &b.objects,
        &format!("index/{}", b.config.directory_topic),
        "no directory snapshot was written",
    )
    .await;
}

/// A fresh embedded log (an emptied broker), for `b`'s bucket.
async fn empty_log() -> (Arc<dyn Queue>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn Queue> = Arc::new(
        EmbeddedLog::open(&EmbeddedConfig::new(dir.path().join("queue")))
            .await
            .unwrap(),
    );
    (queue, dir)
}

fn refusal(opened: Result<Arc<StorageEngine>, EngineError>) -> String {
    match opened {
        Ok(_) => panic!("storage served a log and a bucket of different clusters"),
        Err(e) => e.to_string(),
    }
}

/// Issue 20, defect 5: a log and a bucket serve together only when they belong to
/// one cluster. An emptied log (a new broker) over a bucket that holds mail used to
/// be served as an empty directory, and the MX refused every local domain for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_is_not_the_buckets_is_refused_until_adopted() {
    let mut b = embedded().await;
    // No directory checkpoint yet: only the identity tells the logs apart.
    b.config.snapshot_every = 1_000_000;
    let cluster = {
        let engine = b.engine().await;
        tenant_with_user(&engine, "acme", "kept@acme.test", None).await;
        engine
            .directory(|d| d.cluster())
            .unwrap()
            .expect("a new cluster is identified")
    };
    let topic = b.config.directory_topic.clone();
    assert_eq!(
        mailmesh_storage::cluster::marked(&*b.objects, &topic)
            .await
            .unwrap(),
        Some(cluster),
        "the bucket names the cluster too"
    );
    // Started again on the same log and bucket: the same cluster.
    let again = b.engine().await;
    assert_eq!(again.directory(|d| d.cluster()).unwrap(), Some(cluster));
    drop(again);

    // The same bucket with an emptied log: refused, with what to do.
    let (emptied, _dir) = empty_log().await;
    let why =
        refusal(StorageEngine::open(emptied.clone(), b.objects.clone(), b.config.clone()).await);
    assert!(why.contains("does not know cluster"), "{why}");
    assert!(why.contains("mailctl cluster adopt"), "{why}");
    // The operator adopts it: storage starts on it as the bucket's cluster.
    let (adopted, _) = mailmesh_storage::cluster::adopt(&*emptied, &*b.objects, &topic)
        .await
        .unwrap();
    assert_eq!(adopted, cluster);
    let engine = StorageEngine::open(emptied.clone(), b.objects.clone(), b.config.clone())
        .await
        .unwrap();
    assert_eq!(engine.directory(|d| d.cluster()).unwrap(), Some(cluster));
    drop(engine);

    // A bucket that names another cluster: refused.
    let other = uuid::Uuid::new_v4();
    b.objects
        .put(
            &mailmesh_storage::cluster::marker_path(&topic),
            format!("{other}\n").into_bytes().into(),
        )
        .await
        .unwrap();
    let why = refusal(StorageEngine::open(emptied, b.objects.clone(), b.config.clone()).await);
    assert!(why.contains(&format!("names cluster {other}")), "{why}");
}

/// A checkpoint in the bucket ahead of its log's end (the log was emptied after
/// the checkpoint) is refused: its new records would all be skipped as applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_ahead_of_its_log_is_refused() {
    let mut b = embedded().await;
    b.config.snapshot_every = 1;
    {
        let engine = b.engine().await;
        tenant_with_user(&engine, "acme", "ahead@acme.test", None).await;
        wait_for_objects(
            &b.objects,
            &format!("index/{}", b.config.directory_topic),
            "no directory checkpoint was written",
        )
        .await;
    }
    let (emptied, _dir) = empty_log().await;
    let why = refusal(StorageEngine::open(emptied, b.objects.clone(), b.config.clone()).await);
    assert!(why.contains("the log ends at offset 0"), "{why}");
}

/// Waits (30 s at most) until something is stored under `prefix`.
async fn wait_for_objects(objects: &Arc<dyn ObjectStore>, prefix: &str, missing: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored: Vec<_> =
            futures::TryStreamExt::try_collect::<Vec<_>>(objects.list(Some(&Path::from(prefix))))
                .await
                .unwrap();
        if !stored.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{missing}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A log that lost records after the newest snapshot (retention shorter than the
/// snapshot interval) is refused: serving it would reuse UIDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_with_a_hole_is_refused() {
    let b = embedded().await;
    {
        let engine = b.engine().await;
        tenant_with_user(&engine, "acme", "hole@acme.test", None).await;
    }
    // The same log, read by a replica that finds its first records gone.
    let lossy: Arc<dyn Queue> = Arc::new(Faulty {
        gone_below: Some((None, 1)),
        ..Faulty::new(b.queue.clone())
    });
    let err = StorageEngine::open(lossy, b.objects.clone(), b.config.clone()).await;
    let Err(err) = err else {
        panic!("a replica served a log with a hole")
    };
    assert!(
        matches!(&err, EngineError::Unavailable(m) if m.contains("missing from the log")),
        "{err}"
    );
}

/// Retention may remove the log before the newest checkpoint (`P` of the end of its
/// chain): a new replica restores the checkpoint and reads on from `P`. Removing
/// anything after `P` is refused (a hole).
async fn the_log_before_a_checkpoint_may_go(mut b: Backends) {
    b.config.snapshot_every = 7;
    // Every change written back at once, so checkpoints cover the commands.
    b.config.index_writeback_delay = Duration::ZERO;
    let engine = b.engine().await;
    let olga = tenant_with_user(&engine, "acme", "olga@acme.test", None).await;
    for i in 0..20 {
        engine
            .append(
                &olga,
                INBOX,
                Bytes::from(format!("m{i}")),
                Flags::default(),
                0,
            )
            .await
            .unwrap();
    }
    let partition = engine.partition(&olga);
    let prefix = Path::from(format!("index/{}/{partition}", b.config.mailbox_topic));
    // The end of the newest chain of checkpoints: every 7 records one is written.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let kept_from = loop {
        let names: Vec<String> =
            futures::TryStreamExt::try_collect::<Vec<_>>(b.objects.list(Some(&prefix)))
                .await
                .unwrap()
                .into_iter()
                .filter_map(|m| m.location.filename().map(str::to_owned))
                .collect();
        let end = names
            .iter()
            .filter_map(|n| n.split('.').next()?.parse::<i64>().ok())
            .max();
        if let Some(end) = end.filter(|e| *e > 0) {
            break end;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of partition {partition}: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(engine);
    // No checkpoint after this point, so the last check below sees a hole.
    b.config.snapshot_every = 1_000_000;

    // A new replica (no local index) on a log whose records before `P` are gone.
    let retained: Arc<dyn Queue> = Arc::new(Faulty {
        gone_below: Some((Some((b.config.mailbox_topic.clone(), partition)), kept_from)),
        ..Faulty::new(b.queue.clone())
    });
    let engine = StorageEngine::open(retained, b.objects.clone(), b.config.clone())
        .await
        .unwrap();
    let uids = engine
        .read_index(&olga, |i| {
            i.unwrap()
                .mailbox(INBOX)
                .unwrap()
                .messages
                .keys()
                .copied()
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
    assert_eq!(uids, (1..=20).collect::<Vec<_>>());
    for (i, uid) in [(20, 21), (21, 22)] {
        let appended = engine
            .append(
                &olga,
                INBOX,
                Bytes::from(format!("m{i}")),
                Flags::default(),
                0,
            )
            .await
            .unwrap();
        assert_eq!(appended.uid, uid);
    }
    // Their records lie after every checkpoint: a log that lost the first of them
    // (the second is there) is refused, never served without it.
    let end = engine.position(&olga).await.unwrap() as i64;
    drop(engine);
    let holed: Arc<dyn Queue> = Arc::new(Faulty {
        gone_below: Some((Some((b.config.mailbox_topic.clone(), partition)), end - 1)),
        ..Faulty::new(b.queue.clone())
    });
    let engine = StorageEngine::open(holed, b.objects.clone(), b.config.clone())
        .await
        .unwrap();
    let refused = engine
        .read_index(&olga, |i| {
            i.map(|i| i.mailbox(INBOX).map(|m| m.status().messages))
        })
        .await;
    assert!(
        matches!(&refused, Err(EngineError::Unavailable(m)) if m.contains("missing from the log")),
        "{refused:?}"
    );
}

/// A replica refuses to start on a log the broker keeps for less than the
/// checkpoints need, saying which topic and what to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_kept_too_briefly_is_refused() {
    let b = embedded().await;
    let short: Arc<dyn Queue> = Arc::new(Faulty {
        retention: Some(Duration::from_secs(600)),
        ..Faulty::new(b.queue.clone())
    });
    let Err(err) = StorageEngine::open(short, b.objects.clone(), b.config.clone()).await else {
        panic!("a replica started on a log kept 10 minutes");
    };
    let message = err.to_string();
    assert!(
        message.contains(&b.config.directory_topic) && message.contains("retention.ms"),
        "{message}"
    );
    let long: Arc<dyn Queue> = Arc::new(Faulty {
        retention: Some(Duration::from_secs(86400)),
        ..Faulty::new(b.queue.clone())
    });
    StorageEngine::open(long, b.objects.clone(), b.config.clone())
        .await
        .unwrap();
}

/// With `dkim_key_secret`, a DKIM private key is sealed in the directory log and its
/// snapshots (nothing in the queue's files or the bucket shows it); only an engine
/// with the same secret can sign with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_keys_are_sealed_at_rest() {
    use base64::Engine as _;
    let mut b = embedded().await;
    b.config.snapshot_every = 1;
    b.config.dkim_key_secret = Some(Secret::new(
        base64::engine::general_purpose::STANDARD.encode([42u8; 32]),
    ));
    let engine = b.engine().await;
    tenant_with_user(&engine, "acme", "ann@acme.test", None).await;
    let domain: mailmesh_types::Domain = "acme.test".parse().unwrap();
    let key = engine
        .add_dkim_key(
            domain.clone(),
            Some("s1".into()),
            mailmesh_storage::directory::DkimAlgorithm::Ed25519,
            true,
        )
        .await
        .unwrap();
    assert!(key.private_key.starts_with("sealed:v1:"), "{key:?}");
    let (_, pkcs8) = engine.signing_key(&domain).unwrap().unwrap();
    let plain = base64::engine::general_purpose::STANDARD.encode(&pkcs8);
    // Snapshots are written after the answer: wait for one that holds the key.
    let snapshots = Path::from(format!("index/{}", b.config.directory_topic));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed: Vec<_> =
            futures::TryStreamExt::try_collect::<Vec<_>>(b.objects.list(Some(&snapshots)))
                .await
                .unwrap();
        let mut holds_key = false;
        for meta in &listed {
            // A newer snapshot may have replaced it since the listing.
            let found = match b.objects.get(&meta.location).await {
                Err(mailmesh_objstore::object_store::Error::NotFound { .. }) => continue,
                found => found.unwrap(),
            };
            let bytes = found.bytes().await.unwrap();
            holds_key |= String::from_utf8_lossy(&bytes).contains("sealed:v1:");
        }
        if holds_key {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot with the key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything written to disk: the embedded log and the snapshots in the bucket.
    let mut files = vec![b._dir.as_ref().unwrap().path().to_path_buf()];
    let (mut seen, mut sealed) = (0, false);
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&plain), "the plain key is in {path:?}");
        seen += 1;
        sealed |= text.contains("sealed:v1:");
    }
    assert!(
        seen > 2 && sealed,
        "{seen} files, sealed key seen: {sealed}"
    );

    // Another replica with the secret signs; one without it cannot read the key.
    let same = b.other_replica().await;
    same.sync_directory().await.unwrap();
    assert_eq!(same.signing_key(&domain).unwrap().unwrap().1, pkcs8);
    b.config.dkim_key_secret = None;
    let without = b.other_replica().await;
    without.sync_directory().await.unwrap();
    let err = without.signing_key(&domain).unwrap_err().to_string();
    assert!(err.contains("no dkim_key_secret"), "{err}");
}

/// A log in front of a real one, with the faults a test asks for.
struct Faulty {
    inner: Arc<dyn Queue>,
    /// Readers hand out nothing while this says false: a replica's own log reader
    /// lags as far behind as a test wants.
    gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// Records below this offset are gone (the broker's retention), in one
    /// topic's partition or in every one.
    gone_below: Option<(Option<(String, i32)>, i64)>,
    /// What the broker says of its retention.
    retention: Option<Duration>,
}

impl Faulty {
    fn new(inner: Arc<dyn Queue>) -> Self {
        Self {
            inner,
            gate: None,
            gone_below: None,
            retention: None,
        }
    }
}

struct FaultyReader {
    inner: Box<dyn mailmesh_queue::PartitionReader>,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
    gone_below: i64,
    /// Through the gate, waiting for the next record: a wait the replica cancels
    /// (its once-a-second upkeep) and starts again is still through.
    through: bool,
}

#[async_trait::async_trait]
impl mailmesh_queue::PartitionReader for FaultyReader {
    async fn recv(&mut self) -> mailmesh_queue::Result<mailmesh_queue::Record> {
        if !self.through
            && let Some(gate) = &mut self.gate
        {
            let _ = gate.wait_for(|open| *open).await;
        }
        self.through = true;
        loop {
            let record = self.inner.recv().await?;
            if record.offset >= self.gone_below {
                self.through = false;
                return Ok(record);
            }
        }
    }
}

#[async_trait::async_trait]
impl Queue for Faulty {
    async fn membership(
        &self,
        group: &str,
        topic: &str,
        session_timeout: Duration,
    ) -> mailmesh_queue::Result<mailmesh_queue::Membership> {
        self.inner.membership(group, topic, session_timeout).await
    }
    async fn publish(
        &self,
        record: mailmesh_queue::OutgoingRecord,
    ) -> mailmesh_queue::Result<mailmesh_queue::Position> {
        self.inner.publish(record).await
    }
    async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
    ) -> mailmesh_queue::Result<Box<dyn mailmesh_queue::Consumer>> {
        self.inner.consumer(group, topics).await
    }
    async fn reader(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> mailmesh_queue::Result<Box<dyn mailmesh_queue::PartitionReader>> {
        let gone_below = match &self.gone_below {
            Some((None, below)) => *below,
            Some((Some((t, p)), below)) if t == topic && *p == partition => *below,
            _ => 0,
        };
        Ok(Box::new(FaultyReader {
            inner: self.inner.reader(topic, partition, offset).await?,
            gate: self.gate.clone(),
            gone_below,
            through: false,
        }))
    }
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> mailmesh_queue::Result<()> {
        self.inner.ensure_topic(topic, partitions).await
    }
    async fn retention(&self, topic: &str) -> mailmesh_queue::Result<Option<Duration>> {
        match self.retention {
            Some(kept) => Ok(Some(kept)),
            None => self.inner.retention(topic).await,
        }
    }
    async fn partition_count(&self, topic: &str) -> mailmesh_queue::Result<i32> {
        self.inner.partition_count(topic).await
    }
    async fn end_offset(&self, topic: &str, partition: i32) -> mailmesh_queue::Result<Option<i64>> {
        self.inner.end_offset(topic, partition).await
    }
    async fn ping(&self) -> mailmesh_queue::Result<()> {
        self.inner.ping().await
    }
}

/// A writer whose record landed right after everything its replica applied decides
/// the outcome at the produce ack: writes complete while the replica's own log reader
/// hands out nothing (on tansu it took ~250 ms to read a record back), and when the
/// reader catches up it skips them, so the state is what the log order gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_complete_at_the_ack_while_the_reader_lags() {
    let b = embedded().await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let queue: Arc<dyn Queue> = Arc::new(Faulty {
        gate: Some(gate),
        ..Faulty::new(b.queue.clone())
    });
    let engine = StorageEngine::open(queue, b.objects.clone(), b.config.clone())
        .await
        .unwrap();
    let grace = tenant_with_user(&engine, "acme", "grace@acme.test", None).await;
    for i in 0..5 {
        let appended = tokio::time::timeout(
            Duration::from_secs(10),
            engine.append(
                &grace,
                INBOX,
                Bytes::from(format!("m{i}")),
                Flags::default(),
                0,
            ),
        )
        .await
        .expect("a write completes without its replica reading the log")
        .unwrap();
        assert_eq!(appended.uid, i + 1);
    }
    open.send_replace(true);
    // Caught up, the reader applied nothing twice; a fresh replica replays the log
    // to the same mailbox.
    engine.sync_user(&grace).await.unwrap();
    let here = engine
        .read_index(&grace, |i| i.unwrap().mailbox(INBOX).unwrap().clone())
        .await
        .unwrap();
    assert_eq!((here.uidnext, here.messages.len()), (6, 5));
    let replayed = b
        .engine()
        .await
        .read_index(&grace, |i| i.unwrap().mailbox(INBOX).unwrap().clone())
        .await
        .unwrap();
    assert_eq!(format!("{here:?}"), format!("{replayed:?}"));
}

/// The position a storage reply carries for its user (`mailmesh-position`).
fn position<T>(reply: &tonic::Response<T>) -> u64 {
    reply
        .metadata()
        .get(mailmesh_proto::POSITION_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(_, at)| at.parse().ok())
        .expect("a position on the reply")
}

/// Read-your-writes across replicas, without a read writing to the log: a change
/// made through one replica is seen through another that lags, because the call
/// carries the position the first one's reply gave (`UserRef.position`) and the
/// lagging replica waits until it has applied that far. Without the position it
/// answers its older state at once (so the lag is real). Over gRPC, on real Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_give_read_your_writes_across_replicas() {
    use mailmesh_kit::internal::Role;
    use mailmesh_proto::v1;
    use mailmesh_proto::v1::directory_client::DirectoryClient;
    use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut b = real();
    b.config.session_secret = Some(Secret::new(
        "jQpa+PkbjW8SvMBelsouArxupJFAlsmPnW7j4NCEG9g=".into(),
    ));
    // Both replicas apply the partition, one of them late: what positions are for
    // when a read reaches a replica that is not the writer.
    b.config.owned_partitions = false;
    let one = b.engine().await;
    tenant_with_user(&one, "acme", "heidi@acme.test", None).await;
    let (open, gate) = tokio::sync::watch::channel(true);
    let lagging: Arc<dyn Queue> = Arc::new(Faulty {
        gate: Some(gate),
        ..Faulty::new(mailmesh_storage::testing::real_queue())
    });
    let two = StorageEngine::open(lagging, b.objects.clone(), b.config.clone())
        .await
        .unwrap();
    two.sync_directory().await.unwrap();
    let shutdown = mailmesh_kit::Shutdown::new();
    let connect = |engine: Arc<StorageEngine>| {
        let shutdown = shutdown.clone();
        async move {
            let endpoint = mailmesh_storage::testing::serve(engine, shutdown).await;
            let channel = mailmesh_kit::internal::testing::tls(Role::Gateway)
                .connect(
                    tonic::transport::Endpoint::from_shared(endpoint).unwrap(),
                    Role::Storage,
                )
                .await
                .unwrap();
            (
                DirectoryClient::new(channel.clone()),
                MailboxesClient::new(channel),
            )
        }
    };
    let (mut directory, mut via_one) = connect(one.clone()).await;
    let (_, mut via_two) = connect(two.clone()).await;
    let login = directory
        .authenticate(v1::AuthenticateRequest {
            address: "heidi@acme.test".into(),
            password: "s3cret!".into(),
            client_ip: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(login.ok);
    let heidi = login.user.unwrap().user.unwrap();
    let at = |position: u64| v1::UserRef {
        position,
        ..heidi.clone()
    };
    let inbox = |position: u64| v1::MailboxRequest {
        user: Some(at(position)),
        mailbox: INBOX.into(),
    };
    let append = |text: &str| v1::AppendRequest {
        user: Some(at(0)),
        mailbox: INBOX.into(),
        message: text.as_bytes().to_vec(),
        ..Default::default()
    };

    // The lagging replica has heidi's partition open and current.
    let listed = via_two.list_messages(inbox(0)).await.unwrap();
    assert!(listed.get_ref().messages.is_empty());
    open.send_replace(false);
    // A read already waiting for the next record takes it past the closed gate: let
    // it be this one.
    let first = via_one
        .append(append("Subject: 1\r\n\r\n1\r\n"))
        .await
        .unwrap();
    let listed = via_two
        .list_messages(inbox(position(&first)))
        .await
        .unwrap();
    assert_eq!(listed.get_ref().messages.len(), 1);
    let second = via_one
        .append(append("Subject: 2\r\n\r\n2\r\n"))
        .await
        .unwrap();
    assert!(position(&second) > position(&first));

    let before = mailmesh_storage::testing::records_published();
    let stale = via_two.list_messages(inbox(0)).await.unwrap();
    assert_eq!(stale.get_ref().messages.len(), 1, "the replica lags");
    assert!(position(&stale) < position(&second));
    let opened = Arc::new(AtomicBool::new(false));
    let opener = {
        let opened = opened.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            opened.store(true, Ordering::SeqCst);
            open.send_replace(true);
        })
    };
    let fresh = via_two
        .list_messages(inbox(position(&second)))
        .await
        .unwrap();
    assert!(
        opened.load(Ordering::SeqCst),
        "answered before the replica could have applied the write"
    );
    assert_eq!(fresh.get_ref().messages.len(), 2);
    assert!(position(&fresh) >= position(&second));
    let status = via_two.status(inbox(position(&fresh))).await.unwrap();
    assert_eq!(status.get_ref().messages, 2);
    assert_eq!(
        mailmesh_storage::testing::records_published() - before,
        0.0,
        "records written by reads"
    );
    opener.await.unwrap();
}
