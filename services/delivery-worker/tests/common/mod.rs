//! The platform behind the delivery worker in tests: a queue and object store
//! (embedded, or the real Kafka + S3 of `MMTEST_*`), the storage engine with tenant
//! acme and domain acme.test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use mailmesh_delivery::worker::{Worker, WorkerConfig};
use mailmesh_kit::config::ShutdownConfig;
use mailmesh_kit::{Health, Secret, Shutdown};
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig};
use mailmesh_proto::encode_envelope;
use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};
use mailmesh_queue::{OutgoingRecord, Queue};
use mailmesh_storage::directory::TenantLimits;
use mailmesh_storage::engine::{StorageConfig, StorageEngine, UserRef};
use mailmesh_storage::index::INBOX;
use mailmesh_types::{BodyRef, BodyType, Envelope, QueueId, Recipient};

pub struct Setup {
    pub queue: Arc<dyn Queue>,
    pub objects: Arc<dyn ObjectStore>,
    pub engine: Arc<StorageEngine>,
    pub config: WorkerConfig,
    pub _dir: Option<tempfile::TempDir>,
}

pub fn worker_config(run: &str) -> WorkerConfig {
    WorkerConfig {
        topic: format!("{run}.mail"),
        group: format!("{run}.workers"),
        outbound_topic: format!("{run}.outbound"),
        dead_letter_topic: format!("{run}.dead"),
        concurrency: 8,
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        retry_window: Duration::from_secs(2),
        requeue_max: Duration::from_millis(500),
        retry_prefix: format!("{run}/local-retry"),
        retry_scan_interval: Duration::from_millis(100),
        hostname: "mx.acme.test".into(),
        ..WorkerConfig::default()
    }
}

pub fn storage_config(run: &str) -> StorageConfig {
    StorageConfig {
        directory_topic: format!("{run}.directory"),
        mailbox_topic: format!("{run}.mailboxes"),
        mailbox_partitions: 2,
        password_policy: mailmesh_storage::password_policy::PasswordPolicy::relaxed(),
        ..StorageConfig::default()
    }
}

pub async fn setup(real: bool) -> Setup {
    let run = format!("w{}", uuid::Uuid::new_v4().simple());
    let (queue, objects, dir): (Arc<dyn Queue>, Arc<dyn ObjectStore>, _) = if real {
        let queue = mailmesh_storage::testing::real_queue();
        let objects = mailmesh_storage::testing::real_objects();
        (queue, objects, None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        let queue = Arc::new(
            EmbeddedLog::open(&EmbeddedConfig::new(dir.path().join("queue")))
                .await
                .unwrap(),
        );
        let objects = mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
            dir: dir.path().join("objects"),
        }))
        .unwrap();
        (queue, objects, Some(dir))
    };
    let config = worker_config(&run);
    for topic in [
        &config.topic,
        &config.outbound_topic,
        &config.dead_letter_topic,
    ] {
        queue.ensure_topic(topic, 2).await.unwrap();
    }
    let engine = StorageEngine::open(queue.clone(), objects.clone(), storage_config(&run))
        .await
        .unwrap();
    engine
        .add_tenant("acme".parse().unwrap(), TenantLimits::default())
        .await
        .unwrap();
    engine
        .add_domain("acme".parse().unwrap(), "acme.test".parse().unwrap())
        .await
        .unwrap();
    Setup {
        queue,
        objects,
        engine,
        config,
        _dir: dir,
    }
}

impl Setup {
    pub async fn user(&self, address: &str) -> UserRef {
        self.engine
            .add_user(address.parse().unwrap(), Secret::new("pw".into()), None)
            .await
            .unwrap()
    }

    pub fn start(&self) -> (Shutdown, tokio::task::JoinHandle<()>) {
        let shutdown = Shutdown::new();
        let worker = Worker::new(
            self.queue.clone(),
            self.objects.clone(),
            Arc::new(self.engine.clone()),
            Arc::new(mailmesh_cache::memory::MemoryCache::new()),
            self.config.clone(),
        );
        let s = shutdown.clone();
        let task = tokio::spawn(async move { worker.run(s).await.unwrap() });
        (shutdown, task)
    }

    pub async fn stop(&self, shutdown: Shutdown, task: tokio::task::JoinHandle<()>) {
        let config = ShutdownConfig {
            readiness_grace: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
        };
        shutdown.drain(&Health::new(), &config).await;
        task.await.unwrap();
    }

    pub async fn enqueue(&self, envelope: &Envelope) {
        self.enqueue_with_key(envelope, envelope.queue_id.to_string())
            .await;
    }

    pub async fn enqueue_with_key(&self, envelope: &Envelope, key: String) {
        self.queue
            .publish(OutgoingRecord {
                topic: self.config.topic.clone(),
                key: Bytes::from(key),
                payload: Bytes::from(encode_envelope(envelope)),
                headers: vec![],
                partition: None,
            })
            .await
            .unwrap();
    }

    /// The messages of the user's INBOX once it holds `count` (or the timeout).
    pub async fn inbox(&self, user: &UserRef, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.engine.sync_user(user).await.unwrap();
            let uids: Vec<u32> = self
                .engine
                .read_index(user, |i| {
                    i.and_then(|i| i.mailbox(INBOX))
                        .map(|m| m.messages.keys().copied().collect())
                        .unwrap_or_default()
                })
                .await
                .unwrap();
            if uids.len() >= count || Instant::now() > deadline {
                let mut out = Vec::new();
                for uid in uids {
                    let bytes = self.engine.fetch(user, INBOX, uid, None).await.unwrap();
                    out.push(String::from_utf8_lossy(&bytes).into_owned());
                }
                return out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Setup {
    /// Stores `content` as the message's body in object storage, where the front
    /// door puts large ones, and points `envelope` at it.
    pub async fn store_body(&self, envelope: &mut Envelope, content: &str) -> String {
        use mailmesh_objstore::object_store::{ObjectStoreExt, PutPayload, path::Path};
        let key = format!("t/{}/queue/{}", envelope.tenant, envelope.queue_id);
        self.objects
            .put(
                &Path::from(key.as_str()),
                PutPayload::from(content.as_bytes().to_vec()),
            )
            .await
            .unwrap();
        envelope.body = BodyRef::Object {
            key: key.clone(),
            size: content.len() as u64,
            claim: None,
        };
        key
    }

    /// The object keys under `prefix`.
    pub async fn objects_under(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use mailmesh_objstore::object_store::path::Path;
        let mut keys: Vec<String> = self
            .objects
            .list(Some(&Path::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// The records parked on the dead-letter topic (each partition read for `wait`).
    pub async fn dead_letters(&self, wait: Duration) -> Vec<mailmesh_queue::Record> {
        let mut dead = Vec::new();
        for p in 0..2 {
            let mut r = self
                .queue
                .reader(&self.config.dead_letter_topic, p, 0)
                .await
                .unwrap();
            while let Ok(Ok(rec)) = tokio::time::timeout(wait, r.recv()).await {
                dead.push(rec);
            }
        }
        dead
    }
}

pub fn envelope(from: &str, to: &[&str], body: &str) -> Envelope {
    Envelope {
        queue_id: QueueId::generate(),
        tenant: "acme".parse().unwrap(),
        mail_from: from.parse().unwrap(),
        recipients: to
            .iter()
            .map(|a| Recipient::new(a.parse().unwrap()))
            .collect(),
        received_at: SystemTime::now(),
        body_type: BodyType::SevenBit,
        smtputf8: false,
        dsn_ret: None,
        dsn_envid: None,
        client: None,
        authentication_results: None,
        junk: false,
        arc_set: None,
        dmarc_reject_failure: false,
        trace_context: BTreeMap::new(),
        body: BodyRef::Inline(Bytes::from(format!("Subject: {body}\r\n\r\n{body}\r\n"))),
    }
}

/// The outbound side (relaying to MX hosts).
impl Setup {
    /// Starts an outbound relay on this platform's queue with `config`.
    pub fn start_outbound(
        &self,
        config: mailmesh_delivery::outbound::OutboundConfig,
        cache: Arc<dyn mailmesh_cache::Cache>,
    ) -> Shutdown {
        let shutdown = Shutdown::new();
        let outbound = mailmesh_delivery::outbound::Outbound::new(
            self.queue.clone(),
            self.objects.clone(),
            cache,
            config,
            self.config.clone(),
        )
        .unwrap();
        let s = shutdown.clone();
        tokio::spawn(async move { outbound.run(s).await.unwrap() });
        shutdown
    }

    /// Hands `envelope` to the outbound topic, as the local path does.
    pub async fn relay(&self, envelope: &Envelope) {
        self.queue
            .publish(OutgoingRecord {
                topic: self.config.outbound_topic.clone(),
                key: Bytes::from(envelope.queue_id.to_string()),
                payload: Bytes::from(encode_envelope(envelope)),
                headers: vec![],
                partition: None,
            })
            .await
            .unwrap();
    }
}
