//! The storage engine: the directory and the mailbox index as replicated state
//! machines, message bodies in object storage. The gRPC service and `mailctl dev` both
//! call it; it holds no state that is not in the log or the object store.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use mailmesh_kit::Secret;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
};
use mailmesh_queue::Queue;
use mailmesh_types::{Domain, EmailAddress, ReversePath, TenantId};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, broadcast};

use crate::directory::{
    Directory, DirectoryCommand, DirectoryOutcome, DkimAlgorithm, DkimKey, Lookup, TenantLimits,
    User, UserId, hash_password, verify_password,
};
use crate::index::{
    Change, Flags, INBOX, IndexCommand, IndexLimits, IndexOutcome, MailboxId, NewMessage,
    StoreAction, Uid, UidRange, UserIndex,
};
use crate::index_store::{IndexDb, PartitionIndex};
use crate::owners::{Owners, Route};
use crate::replica::{JsonState, Replica, ReplicaConfig, StateMachine};
use crate::{EngineError, StorageError};

/// Mailbox partitions a replica opens at once when it needs many (tenant usage).
const OPENING_AT_ONCE: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub directory_topic: String,
    pub mailbox_topic: String,
    /// Partitions of the mailbox topic when this service creates it; never change
    /// it afterwards (users are placed by `hash % partitions`).
    pub mailbox_partitions: i32,
    pub snapshot_every: u64,
    /// Where this replica keeps the mailbox index (a fjall database; one per
    /// replica, never shared). Without it a temporary directory is used and every
    /// start restores from the checkpoints in object storage.
    pub index_dir: Option<std::path::PathBuf>,
    /// Memory for users' indexes held by this replica (all partitions together);
    /// the rest stays on disk. Dirty users are written back when a quarter of it
    /// is dirty. One user larger than this is still held while in use.
    pub index_cache_bytes: u64,
    /// A changed user's index is written back to disk this long after its first
    /// change at the latest (earlier under memory pressure). A restart replays the
    /// log from the oldest change not written back.
    #[serde(with = "humantime_serde")]
    pub index_writeback_delay: Duration,
    /// Snapshot at least this often while anything changes. Keep the broker's
    /// retention of the storage topics far above it (days).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// How long the broker keeps the storage logs' records: set on the topics this
    /// service creates, and checked at start on existing ones (a replica refuses
    /// to start on a log kept shorter than `min_log_retention`, which would lose
    /// records no checkpoint holds yet). Cover object-store outages: checkpoints
    /// wait for the bucket meanwhile.
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Largest message stored, headers included.
    pub max_message_bytes: u64,
    pub index_limits: IndexLimits,
    /// Each mailbox partition is applied by one replica, its owner, chosen by a
    /// consumer group; the others forward calls for it there (ADR 0005 §1), so
    /// the data and its memory are spread over the replicas. Off: every replica
    /// opens every partition it is asked about (all replicas of a deployment
    /// must agree).
    pub owned_partitions: bool,
    /// A replica silent this long (killed, frozen, cut off) loses its partitions
    /// to the others: the bound on how long its users wait after a crash.
    #[serde(with = "humantime_serde")]
    pub owner_session_timeout: Duration,
    /// Replicas that keep each partition warm for its owner (`owned_partitions`):
    /// they apply its log as it is written, so when the owner dies or leaves and
    /// the partition comes to one of them, it serves at once instead of restoring
    /// a checkpoint. Each costs the partition's share of disk and apply work on
    /// the standby (its memory stays within `index_cache_bytes`); 0: none.
    pub standbys: usize,
    /// The host (name or IP address) other replicas forward calls to, on the
    /// gRPC port; the chart gives the pod's IP address. Without it, the gRPC
    /// listener's address when it names one.
    pub advertise_host: Option<String>,
    /// Where the delivery workers keep outbound mail waiting for a retry (their
    /// `outbound.retry_prefix`), for `mailctl queue`.
    pub outbound_retry_prefix: String,
    /// Where they keep mail for local mailboxes waiting for a retry (their
    /// `worker.retry_prefix`), for `mailctl queue`.
    pub local_retry_prefix: String,
    /// Password hashes computed at once (each Argon2id run takes 19 MiB); default
    /// the number of CPUs.
    pub password_threads: usize,
    /// Logins waiting for a password thread; more are refused as temporary failures.
    pub password_queue: usize,
    /// What a password must be to be set (`[storage.password_policy]`: `min_length`
    /// 12, `refuse_common` true).
    pub password_policy: crate::password_policy::PasswordPolicy,
    /// 32 bytes, base64: DKIM private keys made from now on are sealed with it
    /// (AES-256-GCM) in the directory log and snapshots. Without it they are kept
    /// plain. Keep it with the deployment's other secrets: losing it loses the keys.
    pub dkim_key_secret: Option<mailmesh_kit::Secret<String>>,
    /// 32 bytes, base64, the same on every replica: signs the session tokens that
    /// `Authenticate` gives the front doors (ADR 0006). Without it each replica
    /// makes a random one, and a token works only on the replica that made it
    /// (fine for one replica, as in `mailctl dev`).
    pub session_secret: Option<mailmesh_kit::Secret<String>>,
    /// The secret before a rotation: its tokens are still accepted, none are made.
    pub session_secret_previous: Option<mailmesh_kit::Secret<String>>,
    /// How long a session token is valid; front doors renew it once half is gone.
    /// Keep it at least twice the gateway's `imap.idle_timeout`. A disabled account
    /// loses its sessions within half of it.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed `Authenticate` calls counted per client address (as the caller
    /// reports it) and per account, apart from the front doors' own counters and
    /// above their limits: storage is no free password oracle for a caller that
    /// skips the front door's checks.
    pub login_max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub login_failure_window: Duration,
    /// Logins from one client address checked at once.
    pub login_max_parallel: u32,
    /// An account with `login_max_failures` failures in the window gets at most
    /// one password check per this long, from any caller and any client address
    /// (callers name the address: a compromised front door could name a new one
    /// per guess). Its owner may be asked to retry, never locked out.
    #[serde(with = "humantime_serde")]
    pub login_account_pace: Duration,
    /// The object of an expunged message is kept this long (on the replica that
    /// applied the expunge), so IMAP sessions that have not yet been told of the
    /// expunge can still fetch it; zero deletes it at once.
    #[serde(with = "humantime_serde")]
    pub expunged_retention: Duration,
    /// At most this many expunged objects are kept per replica (about 200 bytes of
    /// memory each); beyond it the oldest are deleted at once.
    pub expunged_retention_max: usize,
    /// Each user's objects are listed this often, on the owner of the user's
    /// partition, to delete those no index names (written before a command that
    /// never landed); zero: never.
    #[serde(with = "humantime_serde")]
    pub orphan_sweep_interval: Duration,
    /// Only objects older than this are orphans (at least twice `write_timeout`: a
    /// command may land until then).
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            directory_topic: "storage.directory".into(),
            mailbox_topic: "storage.mailboxes".into(),
            mailbox_partitions: 64,
            snapshot_every: 10_000,
            index_dir: None,
            index_cache_bytes: 256 << 20,
            index_writeback_delay: Duration::from_secs(30),
            snapshot_interval: Duration::from_secs(300),
            log_retention: Duration::from_secs(7 * 24 * 3600),
            write_timeout: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
            index_limits: IndexLimits::default(),
            outbound_retry_prefix: crate::retry_index::DEFAULT_PREFIX.into(),
            local_retry_prefix: crate::retry_index::LOCAL_PREFIX.into(),
            owned_partitions: true,
            owner_session_timeout: Duration::from_secs(6),
            standbys: 1,
            advertise_host: None,
            password_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            password_queue: 1024,
            password_policy: Default::default(),
            dkim_key_secret: None,
            session_secret: None,
            session_secret_previous: None,
            // Twice the IMAP idle timeout: a session renews at its commands once
            // half is gone, so its token never expires in use.
            session_ttl: Duration::from_secs(60 * 60),
            login_max_failures: 20,
            login_failure_window: Duration::from_secs(15 * 60),
            login_max_parallel: 64,
            login_account_pace: Duration::from_secs(5),
            expunged_retention: Duration::from_secs(30 * 60),
            expunged_retention_max: 100_000,
            orphan_sweep_interval: Duration::from_secs(24 * 3600),
            orphan_grace: Duration::from_secs(24 * 3600),
        }
    }
}

impl mailmesh_kit::config::Validate for StorageConfig {
    fn validate(&self) -> Result<(), mailmesh_kit::ConfigError> {
        use mailmesh_kit::ConfigError;
        if !(1..=64).contains(&self.password_threads) || self.password_queue == 0 {
            return Err(ConfigError::invalid(
                "storage.password_threads",
                "password_threads must be 1 to 64 and password_queue above zero",
            ));
        }
        if !(1..=4096).contains(&self.mailbox_partitions) {
            return Err(ConfigError::invalid(
                "storage.mailbox_partitions",
                "must be 1 to 4096",
            ));
        }
        if self.index_cache_bytes < 1 << 20 {
            return Err(ConfigError::invalid(
                "storage.index_cache_bytes",
                "must be at least 1 MiB",
            ));
        }
        if !(Duration::from_secs(3)..=Duration::from_secs(300))
            .contains(&self.owner_session_timeout)
        {
            return Err(ConfigError::invalid(
                "storage.owner_session_timeout",
                "must be 3s to 5m (heartbeats go every second)",
            ));
        }
        if !(1..=128).contains(&self.password_policy.min_length) {
            return Err(ConfigError::invalid(
                "storage.password_policy.min_length",
                "must be 1 to 128",
            ));
        }
        if self.standbys > 8 {
            return Err(ConfigError::invalid("storage.standbys", "must be 0 to 8"));
        }
        if self.log_retention < self.min_log_retention() {
            return Err(ConfigError::invalid(
                "storage.log_retention",
                format!(
                    "must be at least {} (1 h, and 4 times snapshot_interval plus index_writeback_delay)",
                    humantime_serde::re::humantime::format_duration(self.min_log_retention())
                ),
            ));
        }
        if self.snapshot_every == 0 {
            return Err(ConfigError::invalid(
                "storage.snapshot_every",
                "must be at least 1",
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::invalid(
                "storage.max_message_bytes",
                "must be at least 1",
            ));
        }
        for (key, secret) in [
            ("storage.session_secret", &self.session_secret),
            (
                "storage.session_secret_previous",
                &self.session_secret_previous,
            ),
        ] {
            if let Some(secret) = secret {
                crate::session::SessionKeys::new(secret.expose(), None, self.session_ttl)
                    .map_err(|e| ConfigError::invalid(key, e.to_string()))?;
            }
        }
        if self.session_ttl < Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "storage.session_ttl",
                "must be at least 10s (and twice the gateway's idle timeout)",
            ));
        }
        if self.login_max_failures == 0 || self.login_max_parallel == 0 {
            return Err(ConfigError::invalid(
                "storage.login_max_failures",
                "login_max_failures and login_max_parallel must be above zero",
            ));
        }
        if let Some(secret) = &self.dkim_key_secret {
            crate::sealed::Seal::new(secret.expose())
                .map_err(|e| ConfigError::invalid("storage.dkim_key_secret", e.to_string()))?;
        }
        if self.orphan_grace < self.write_timeout * 2 {
            return Err(ConfigError::invalid(
                "storage.orphan_grace",
                "must be at least twice write_timeout (a command may land until then)",
            ));
        }
        Ok(())
    }
}

impl StorageConfig {
    /// The shortest retention of the storage logs that keeps every record no
    /// checkpoint holds yet, with room for a few failed checkpoints.
    pub fn min_log_retention(&self) -> Duration {
        ((self.snapshot_interval + self.index_writeback_delay) * 4).max(Duration::from_secs(3600))
    }
}

/// A user as every storage call names it: always with its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserRef {
    pub tenant: TenantId,
    pub user: UserId,
}

impl UserRef {
    /// The user's key in the mailbox log and index (`<tenant>/<user>`).
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant, self.user)
    }

    /// Every object of this user lives under this prefix.
    fn prefix(&self) -> String {
        format!("t/{}/u/{}", self.tenant, self.user)
    }
}

/// A change to one user's mailboxes, as every replica's subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxEvent {
    pub user: UserRef,
    pub change: Change,
    /// The position of the user's log just after the change: a read that must
    /// see it (on any replica) carries at least this.
    pub position: i64,
}

/// The commands of one mailbox-log partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// One command lives per record being applied or written: boxing the large variant
// would cost an allocation per record to save memory nothing holds many of.
#[allow(clippy::large_enum_variant)]
pub enum PartitionCommand {
    User {
        user: UserRef,
        /// Limits travel with the command so replicas with different configuration
        /// (during a rollout) still apply it identically.
        limits: IndexLimits,
        command: IndexCommand,
        /// The client's id for the request this command serves (`crate::request`):
        /// applied once however often it is sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<uuid::Uuid>,
    },
    /// The user was removed from the directory: drop their index.
    Forget { user: UserRef },
}

impl JsonState for Directory {}

impl StateMachine for Directory {
    type Command = DirectoryCommand;
    type Outcome = DirectoryOutcome;
    type Change = ();
    type Store = ();

    fn apply(
        &mut self,
        command: DirectoryCommand,
        _at_ms: i64,
        _offset: i64,
        _changes: &mut Vec<()>,
    ) -> Result<Result<DirectoryOutcome, StorageError>, EngineError> {
        Ok(Directory::apply(self, command))
    }

    async fn restore(
        _store: &(),
        objects: &Arc<dyn ObjectStore>,
        _config: &ReplicaConfig,
        prefix: &Path,
    ) -> Result<(Self, i64), EngineError> {
        crate::replica::restore_json(objects, prefix).await
    }

    fn checkpoint(
        &mut self,
        next: i64,
        objects: Arc<dyn ObjectStore>,
        prefix: Path,
    ) -> Result<BoxFuture<'static, Result<(), EngineError>>, EngineError> {
        crate::replica::checkpoint_json(self, next, objects, prefix)
    }
}

/// A message for a local user, as the delivery worker hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub mailbox: &'a str,
    pub return_path: &'a ReversePath,
    pub delivered_to: &'a EmailAddress,
    pub message: &'a [u8],
    /// Queue id and recipient: what makes a replay store nothing new.
    pub key: &'a str,
    pub internal_date_ms: i64,
}

/// A message object about to be written and indexed.
struct NewObject {
    mailbox_name: String,
    mailbox: MailboxId,
    name: String,
    body: Bytes,
    flags: Flags,
    internal_date_ms: i64,
    delivery_key: Option<String>,
}

/// Where an appended message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub mailbox: MailboxId,
    pub uidvalidity: u32,
    pub uid: Uid,
    pub duplicate: bool,
}

/// A Argon2 hash to verify against when the user does not exist, so a failed login
/// takes as long for an unknown user as for a wrong password.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password("mailmesh-timing-equaliser").unwrap_or_default());

type MailboxReplica = Arc<Replica<PartitionIndex>>;

/// Most messages one COPY or MOVE command carries (it is one log record).
const MAX_COPY: usize = 10_000;

pub struct StorageEngine {
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    config: StorageConfig,
    directory: Arc<Replica<Directory>>,
    partitions: i32,
    mailboxes: Mutex<HashMap<i32, Arc<OnceCell<MailboxReplica>>>>,
    /// The mailbox index on this replica's disk, shared by its partitions.
    index_db: Arc<IndexDb>,
    /// Argon2 runs here, a few at a time (memory), never on the async threads.
    passwords: crate::passwords::PasswordPool,
    /// Seals new DKIM keys and opens sealed ones (`dkim_key_secret`).
    seal: Option<crate::sealed::Seal>,
    /// Which mailbox partitions this replica owns (`owned_partitions`); `None`:
    /// every one it is asked about.
    owners: Option<Arc<Owners>>,
    /// The task that follows the assignment (it holds the membership: stopped
    /// with the engine, which leaves the group).
    owning: Mutex<Option<tokio::task::AbortHandle>>,
    /// Mailbox partitions open here.
    open: std::sync::atomic::AtomicUsize,
    /// The other replicas, for what is summed over partitions.
    peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// Tenants' bytes in other replicas' partitions, and when asked.
    remote_usage: Mutex<HashMap<TenantId, (u64, std::time::Instant)>>,
    /// One question to the other replicas per tenant at a time: the calls that
    /// find the answer stale meanwhile wait for it.
    usage_asking: Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>,
    /// Objects of expunged messages, kept for a while (`sweep`).
    expunged: crate::sweep::ExpungedBodies,
    /// The task deleting expunged objects when due and sweeping orphans.
    tending: Mutex<Option<tokio::task::AbortHandle>>,
}

/// Refuses a log whose records go sooner than `min` (an existing topic made with
/// a short retention): a restore would find records missing and refuse anyway,
/// later and partition by partition. A broker that does not say is trusted.
/// The name of a new message object: the request's own when the call has an id
/// (every attempt writes the same object), else a new time-ordered one.
fn new_object_name() -> String {
    crate::request::current().map_or_else(
        || uuid::Uuid::now_v7().simple().to_string(),
        crate::request::object_name,
    )
}

async fn check_retention(queue: &dyn Queue, topic: &str, min: Duration) -> Result<(), EngineError> {
    match queue.retention(topic).await {
        Ok(Some(kept)) if kept < min => Err(EngineError::Unavailable(format!(
            "the broker keeps {topic}'s records for {}, less than the {} storage needs \
             (checkpoint interval and write-back delay, four times over): raise the topic's \
             retention.ms",
            humantime_serde::re::humantime::format_duration(kept),
            humantime_serde::re::humantime::format_duration(min)
        ))),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(topic, error = %e, "the log's retention could not be read; not checked");
            Ok(())
        }
    }
}

/// How long another replica's answer on a tenant's usage is used.
const REMOTE_USAGE_TTL: Duration = Duration::from_secs(5);

/// Calls to other storage replicas.
pub trait Peers: Send + Sync {
    /// The bytes `tenant` stores in the partitions `owner` owns, and those
    /// partitions.
    fn tenant_usage(
        &self,
        owner: crate::owners::Owner,
        tenant: TenantId,
    ) -> BoxFuture<'static, Result<(u64, Vec<i32>), EngineError>>;
}

impl Drop for StorageEngine {
    /// Stops following the log: nothing of a dropped engine goes on applying (or
    /// writing checkpoints) in the background.
    fn drop(&mut self) {
        for task in [&self.owning, &self.tending] {
            if let Some(task) = task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
        for cell in self
            .mailboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if let Some(replica) = cell.get() {
                replica.close();
            }
        }
        self.directory.close();
    }
}

impl StorageEngine {
    /// Creates the log topics if needed and loads the directory.
    pub async fn open(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        config: StorageConfig,
    ) -> Result<Arc<Self>, EngineError> {
        let retention = [("retention.ms", config.log_retention.as_millis().to_string())];
        queue
            .ensure_topic_with(&config.directory_topic, 1, &retention)
            .await?;
        queue
            .ensure_topic_with(&config.mailbox_topic, config.mailbox_partitions, &retention)
            .await?;
        for topic in [&config.directory_topic, &config.mailbox_topic] {
            check_retention(&*queue, topic, config.min_log_retention()).await?;
        }
        let partitions = queue.partition_count(&config.mailbox_topic).await?;
        let directory = Replica::start(
            queue.clone(),
            objects.clone(),
            ReplicaConfig {
                log: "directory",
                topic: config.directory_topic.clone(),
                partition: 0,
                snapshot_every: config.snapshot_every,
                snapshot_interval: config.snapshot_interval,
                write_timeout: config.write_timeout,
            },
            &(),
        )
        .await?;
        crate::cluster::check(&directory, &objects, &config.directory_topic).await?;
        let index_db = IndexDb::open(
            config.index_dir.as_deref(),
            config.index_cache_bytes,
            config.index_writeback_delay,
        )?;
        let passwords =
            crate::passwords::PasswordPool::new(config.password_threads, config.password_queue);
        let seal = match &config.dkim_key_secret {
            Some(secret) => Some(
                crate::sealed::Seal::new(secret.expose())
                    .map_err(|e| EngineError::Unavailable(e.to_string()))?,
            ),
            None => None,
        };
        let owners = if config.owned_partitions {
            Some(
                Owners::join(
                    queue.clone(),
                    &config.mailbox_topic,
                    partitions,
                    config.write_timeout,
                    config.owner_session_timeout,
                )
                .await?,
            )
        } else {
            None
        };
        let engine = Arc::new(Self {
            queue,
            objects,
            directory,
            partitions,
            passwords,
            seal,
            mailboxes: Mutex::new(HashMap::new()),
            index_db,
            owners,
            owning: Mutex::new(None),
            open: std::sync::atomic::AtomicUsize::new(0),
            peers: std::sync::OnceLock::new(),
            remote_usage: Mutex::new(HashMap::new()),
            usage_asking: Mutex::new(HashMap::new()),
            expunged: crate::sweep::ExpungedBodies::new(
                config.expunged_retention,
                config.expunged_retention_max,
            ),
            tending: Mutex::new(None),
            config,
        });
        let task = tokio::spawn(tend(Arc::downgrade(&engine)));
        *engine.tending.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        if let Some(owners) = &engine.owners {
            let task = tokio::spawn(own(Arc::downgrade(&engine), owners.clone()));
            *engine.owning.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        }
        Ok(engine)
    }

    /// Leaves the partition owners' group (at shutdown, once calls are drained):
    /// the partitions move to the other replicas without waiting for the session
    /// timeout.
    pub fn leave(&self) {
        if let Some(owners) = &self.owners {
            owners.leave();
        }
    }

    /// Whether this replica owns `user`'s partition now (always, without owners).
    pub fn owns(&self, user: &UserRef) -> bool {
        self.owners
            .as_ref()
            .is_none_or(|o| o.owns(self.partition_of(user)))
    }

    /// The bytes a tenant stores in the partitions this replica owns and has open,
    /// and those partitions.
    pub fn owned_tenant_usage(&self, tenant: &TenantId) -> (u64, Vec<i32>) {
        let open: Vec<(i32, MailboxReplica)> = self
            .mailboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(p, c)| c.get().map(|r| (*p, r.clone())))
            // Standbys count nothing: their owners do.
            .filter(|(_, r)| !r.is_standby())
            .collect();
        let mut total = 0u64;
        let mut counted = Vec::new();
        for (partition, replica) in open {
            if let Ok(bytes) = replica.read(|p| p.tenant_bytes(tenant)) {
                total = total.saturating_add(bytes);
                counted.push(partition);
            }
        }
        (total, counted)
    }

    /// How this replica asks the others (set by the gRPC service).
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    /// Sets the address other replicas forward calls to: `advertise_host` on the
    /// port the gRPC listener is `bound` to, else the bound address itself (`None`
    /// when that names no host: every address).
    pub fn advertise(&self, bound: std::net::SocketAddr) -> Option<String> {
        let addr = match &self.config.advertise_host {
            Some(host) => match host.parse::<std::net::IpAddr>() {
                Ok(ip) => std::net::SocketAddr::new(ip, bound.port()).to_string(),
                Err(_) => format!("{host}:{}", bound.port()),
            },
            None if bound.ip().is_unspecified() => return None,
            None => bound.to_string(),
        };
        if let Some(owners) = &self.owners {
            owners.advertise(addr.clone());
        }
        Some(addr)
    }

    /// Where a call for `user` is served: here, or at the replica that owns the
    /// user's partition (skipping `refused`, which said it does not own it).
    pub async fn route(
        &self,
        user: &UserRef,
        refused: Option<&crate::owners::Owner>,
    ) -> Result<Route, EngineError> {
        match &self.owners {
            None => Ok(Route::Here),
            Some(owners) => owners.route(self.partition_of(user), refused).await,
        }
    }

    /// Stops serving a partition another replica owns now.
    fn close_partition(&self, partition: i32) {
        let cell = self
            .mailboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&partition);
        if let Some(replica) = cell.as_ref().and_then(|c| c.get()) {
            replica.close();
            let open = self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) - 1;
            crate::metrics::partitions("open", open);
        }
    }

    /// The object store (outbound retry index, message bodies).
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// Reads the directory as this replica has it; fails (temporarily) when its log
    /// cannot be applied, rather than answer from a wrong state.
    pub fn directory<R>(&self, f: impl FnOnce(&Directory) -> R) -> Result<R, EngineError> {
        self.directory.read(f)
    }

    /// Waits until every directory change made anywhere before the call is visible.
    pub async fn sync_directory(&self) -> Result<(), EngineError> {
        self.directory.sync().await
    }

    async fn change_directory(
        &self,
        command: DirectoryCommand,
    ) -> Result<DirectoryOutcome, EngineError> {
        self.directory.submit(command).await
    }

    pub async fn add_tenant(
        &self,
        tenant: TenantId,
        limits: TenantLimits,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::AddTenant { tenant, limits })
            .await
            .map(drop)
    }

    pub async fn set_tenant_limits(
        &self,
        tenant: TenantId,
        limits: TenantLimits,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::SetTenantLimits { tenant, limits })
            .await
            .map(drop)
    }

    pub async fn set_inbound_policy(
        &self,
        tenant: TenantId,
        policy: mailmesh_types::InboundPolicy,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::SetInboundPolicy { tenant, policy })
            .await
            .map(drop)
    }

    /// Whether submission hides the sender's client in this tenant's mail.
    pub async fn set_hide_client(
        &self,
        tenant: TenantId,
        hide_client: bool,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::SetHideClient {
            tenant,
            hide_client,
        })
        .await
        .map(drop)
    }

    pub async fn remove_tenant(&self, tenant: TenantId) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::RemoveTenant { tenant })
            .await
            .map(drop)
    }

    pub async fn add_domain(&self, tenant: TenantId, domain: Domain) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::AddDomain { tenant, domain })
            .await
            .map(drop)
    }

    pub async fn remove_domain(&self, tenant: TenantId, domain: Domain) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::RemoveDomain { tenant, domain })
            .await
            .map(drop)
    }

    /// Refuses a password the policy does not allow for `address`, saying why.
    fn check_password(
        &self,
        address: &EmailAddress,
        password: &Secret<String>,
    ) -> Result<(), EngineError> {
        match self
            .config
            .password_policy
            .refuses(&address.to_string(), password.expose())
        {
            Some(reason) => Err(StorageError::InvalidArgument(reason).into()),
            None => Ok(()),
        }
    }

    async fn hash(&self, password: Secret<String>) -> Result<String, EngineError> {
        self.passwords
            .run(move || hash_password(password.expose()))
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?
            .map_err(EngineError::from)
    }

    /// Creates a user and their default mailboxes.
    pub async fn add_user(
        &self,
        address: EmailAddress,
        password: Secret<String>,
        quota_bytes: Option<u64>,
    ) -> Result<UserRef, EngineError> {
        self.check_password(&address, &password)?;
        let password_hash = self.hash(password).await?;
        let outcome = self
            .change_directory(DirectoryCommand::AddUser {
                id: UserId::generate(),
                address: address.clone(),
                password_hash,
                quota_bytes,
            })
            .await?;
        let DirectoryOutcome::UserAdded(id) = outcome else {
            return Err(EngineError::Codec(format!(
                "unexpected outcome {outcome:?}"
            )));
        };
        let tenant = self
            .directory(|d| d.user(&id).map(|u| u.tenant.clone()))?
            .ok_or_else(|| EngineError::Unavailable("user vanished after creation".into()))?;
        let user = UserRef { tenant, user: id };
        self.command_anywhere(PartitionCommand::User {
            user: user.clone(),
            limits: self.config.index_limits,
            command: IndexCommand::Init,
            request: None,
        })
        .await?;
        Ok(user)
    }

    /// A partition command whose outcome the caller does not need (it cannot be
    /// refused): applied here when this replica owns the partition, else only
    /// appended to its log, for the owner to apply.
    async fn command_anywhere(&self, command: PartitionCommand) -> Result<(), EngineError> {
        let user = match &command {
            PartitionCommand::User { user, .. } | PartitionCommand::Forget { user } => user.clone(),
        };
        if self.owns(&user) {
            self.mailbox_replica(&user).await?.submit(command).await?;
        } else {
            crate::metrics::published("mailboxes", false);
            crate::replica::append_only(
                &*self.queue,
                &self.config.mailbox_topic,
                self.partition_of(&user),
                command,
            )
            .await?;
        }
        Ok(())
    }

    pub async fn set_password(
        &self,
        address: EmailAddress,
        password: Secret<String>,
    ) -> Result<(), EngineError> {
        self.check_password(&address, &password)?;
        let password_hash = self.hash(password).await?;
        self.change_directory(DirectoryCommand::SetPassword {
            address,
            password_hash,
        })
        .await
        .map(drop)
    }

    pub async fn set_enabled(
        &self,
        address: EmailAddress,
        enabled: bool,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::SetEnabled { address, enabled })
            .await
            .map(drop)
    }

    pub async fn set_quota(
        &self,
        address: EmailAddress,
        quota_bytes: Option<u64>,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::SetQuota {
            address,
            quota_bytes,
        })
        .await
        .map(drop)
    }

    /// Removes a user, their index and every object they own.
    pub async fn remove_user(&self, address: EmailAddress) -> Result<(), EngineError> {
        let tenant = self
            .directory(|d| d.user_by_address(&address).map(|u| u.tenant.clone()))?
            .ok_or_else(|| StorageError::NotFound(format!("user {address}")))?;
        let outcome = self
            .change_directory(DirectoryCommand::RemoveUser { address })
            .await?;
        if let DirectoryOutcome::UserRemoved(id) = outcome {
            let user = UserRef { tenant, user: id };
            self.command_anywhere(PartitionCommand::Forget { user: user.clone() })
                .await?;
            self.delete_prefix(&user.prefix()).await?;
        }
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), EngineError> {
        use futures::TryStreamExt;
        let paths: Vec<Path> = self
            .objects
            .list(Some(&Path::from(prefix)))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for path in paths {
            self.objects.delete(&path).await?;
        }
        Ok(())
    }

    pub async fn add_alias(
        &self,
        address: EmailAddress,
        targets: Vec<EmailAddress>,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::AddAlias { address, targets })
            .await
            .map(drop)
    }

    pub async fn remove_alias(&self, address: EmailAddress) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::RemoveAlias { address })
            .await
            .map(drop)
    }

    pub async fn set_catch_all(
        &self,
        domain: Domain,
        target: Option<EmailAddress>,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::SetCatchAll { domain, target })
            .await
            .map(drop)
    }

    /// Creates a DKIM key for a local domain. It signs the domain's mail from now on
    /// when `activate` or when it is the domain's first key; otherwise after
    /// [`Self::activate_dkim_key`]. Without a selector one is made from the time.
    pub async fn add_dkim_key(
        &self,
        domain: Domain,
        selector: Option<String>,
        algorithm: DkimAlgorithm,
        activate: bool,
    ) -> Result<DkimKey, EngineError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let selector = selector.unwrap_or_else(|| {
            let alg = match algorithm {
                DkimAlgorithm::Ed25519 => "ed",
                DkimAlgorithm::Rsa2048 => "rsa",
            };
            format!("mm{alg}{}", now / 1000)
        });
        let mut key = tokio::task::spawn_blocking(move || {
            DkimKey::generate(domain, selector, algorithm, now)
        })
        .await
        .map_err(|e| EngineError::Unavailable(e.to_string()))??;
        if let Some(seal) = &self.seal {
            let plain = crate::sealed::open(&key.private_key, &key.dns_name(), None)
                .map_err(|e| EngineError::Codec(e.to_string()))?;
            key.private_key = seal.seal(&plain, &key.dns_name());
        }
        self.change_directory(DirectoryCommand::AddDkimKey {
            key: key.clone(),
            activate,
        })
        .await?;
        Ok(key)
    }

    pub async fn activate_dkim_key(
        &self,
        domain: Domain,
        selector: String,
    ) -> Result<(), EngineError> {
        self.change_directory(DirectoryCommand::ActivateDkimKey { domain, selector })
            .await
            .map(drop)
    }

    pub async fn remove_dkim_key(
        &self,
        domain: Domain,
        selector: String,
    ) -> Result<(), EngineError> {
        self.sync_directory().await?;
        self.directory(|d| d.check_dkim_removal(&domain, &selector))??;
        self.change_directory(DirectoryCommand::RemoveDkimKey { domain, selector })
            .await
            .map(drop)
    }

    /// The domain's keys, oldest first (the last one signs).
    pub fn dkim_keys(&self, domain: &Domain) -> Result<Vec<DkimKey>, EngineError> {
        self.directory(|d| d.dkim_keys(domain).to_vec())
    }

    /// The key that signs for `domain` and its private key (PKCS#8 DER), opened.
    pub fn signing_key(&self, domain: &Domain) -> Result<Option<(DkimKey, Vec<u8>)>, EngineError> {
        let Some(key) = self.dkim_keys(domain)?.pop() else {
            return Ok(None);
        };
        let pkcs8 = crate::sealed::open(&key.private_key, &key.dns_name(), self.seal.as_ref())
            .map_err(|e| EngineError::Unavailable(format!("DKIM key {}: {e}", key.dns_name())))?;
        Ok(Some((key, pkcs8)))
    }

    /// Who receives mail for `address`.
    pub fn lookup(&self, address: &EmailAddress) -> Result<Lookup, EngineError> {
        self.directory(|d| d.lookup(address))
    }

    /// Checks a login. `None` for an unknown user, a wrong password or a disabled
    /// account alike, in about the same time, so a caller learns nothing else.
    pub async fn authenticate(
        &self,
        address: &EmailAddress,
        password: Secret<String>,
    ) -> Result<Option<User>, EngineError> {
        let user = self.directory(|d| d.user_by_address(address).cloned())?;
        let hash = user
            .as_ref()
            .map_or_else(|| DUMMY_HASH.clone(), |u| u.password_hash.clone());
        let ok = self
            .passwords
            .run(move || verify_password(password.expose(), &hash))
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        Ok(user.filter(|u| ok && u.enabled))
    }

    /// The mailbox partition that holds `user`.
    pub fn partition(&self, user: &UserRef) -> i32 {
        self.partition_of(user)
    }

    fn partition_of(&self, user: &UserRef) -> i32 {
        (mailmesh_types::fnv1a(user.key().as_bytes()) % self.partitions as u64) as i32
    }

    async fn mailbox_replica(&self, user: &UserRef) -> Result<MailboxReplica, EngineError> {
        self.partition_replica(self.partition_of(user)).await
    }

    async fn partition_replica(&self, partition: i32) -> Result<MailboxReplica, EngineError> {
        if let Some(owners) = &self.owners {
            owners.owned(partition).await?;
        }
        let cell = self.cell(partition);
        let replica = cell
            .get_or_try_init(|| self.open_partition(partition, false))
            .await
            .cloned()?;
        match &self.owners {
            // Revoked while it opened: the owner task may have missed it.
            Some(owners) if !owners.owns(partition) => {
                self.close_partition(partition);
                replica.close();
                Err(EngineError::NotOwner(partition))
            }
            Some(_) => {
                if replica.promote() {
                    tracing::info!(
                        partition,
                        applied = replica.applied(),
                        "mailbox partition taken over from its warm standby"
                    );
                    crate::metrics::taken_over("standby");
                }
                Ok(replica)
            }
            None => Ok(replica),
        }
    }

    /// The cell of `partition` in the map of open partitions (made empty).
    fn cell(&self, partition: i32) -> Arc<OnceCell<MailboxReplica>> {
        self.mailboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(partition)
            .or_default()
            .clone()
    }

    /// Restores `partition` and applies its log, as its owner or as a warm standby.
    async fn open_partition(
        &self,
        partition: i32,
        standby: bool,
    ) -> Result<MailboxReplica, EngineError> {
        let replica = Replica::start(
            self.queue.clone(),
            self.objects.clone(),
            ReplicaConfig {
                log: "mailboxes",
                topic: self.config.mailbox_topic.clone(),
                partition,
                snapshot_every: self.config.snapshot_every,
                snapshot_interval: self.config.snapshot_interval,
                write_timeout: self.config.write_timeout,
            },
            &self.index_db,
        )
        .await?;
        replica.set_standby(standby);
        let open = self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        crate::metrics::partitions("open", open);
        if self.owners.is_some() && !standby {
            crate::metrics::taken_over("restore");
        }
        Ok(replica)
    }

    /// Keeps `partition` warm for its owner (ADR 0005 §1): opened here, its log
    /// applied as it is written, no checkpoints, no calls.
    async fn stand_by(&self, partition: i32) -> Result<(), EngineError> {
        let cell = self.cell(partition);
        let replica = cell
            .get_or_try_init(|| self.open_partition(partition, true))
            .await
            .cloned()?;
        let still_here = self
            .mailboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .is_some_and(|c| Arc::ptr_eq(c, &cell));
        if !still_here {
            // Given up while it opened.
            replica.close();
            let open = self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) - 1;
            crate::metrics::partitions("open", open);
        }
        Ok(())
    }

    /// Applies an index command for `user` and returns its outcome.
    pub async fn index(
        &self,
        user: &UserRef,
        command: IndexCommand,
    ) -> Result<IndexOutcome, EngineError> {
        self.ensure_user(user)?;
        self.mailbox_replica(user)
            .await?
            .submit(PartitionCommand::User {
                user: user.clone(),
                limits: self.config.index_limits,
                command,
                request: None,
            })
            .await
    }

    /// Applies the index command that serves the current client request, with
    /// its id (`crate::request`): a request applied before is not applied again,
    /// and its remembered outcome comes back with `true` (repeated).
    pub async fn index_request(
        &self,
        user: &UserRef,
        command: IndexCommand,
    ) -> Result<(IndexOutcome, bool), EngineError> {
        self.ensure_user(user)?;
        let outcome = self
            .mailbox_replica(user)
            .await?
            .submit(PartitionCommand::User {
                user: user.clone(),
                limits: self.config.index_limits,
                command,
                request: crate::request::current(),
            })
            .await?;
        Ok(match outcome {
            IndexOutcome::Repeated(first) => (*first, true),
            outcome => (outcome, false),
        })
    }

    /// Reads a user's index as this replica has it (`None` before their first use).
    pub async fn read_index<R>(
        &self,
        user: &UserRef,
        f: impl FnOnce(Option<&UserIndex>) -> R,
    ) -> Result<R, EngineError> {
        self.ensure_user(user)?;
        let replica = self.mailbox_replica(user).await?;
        // `f` runs under the state's read lock, as the user is held: a write waits
        // for it rather than copy the user.
        replica.read(|p| p.user(&user.key()).map(|index| f(index.as_deref())))?
    }

    /// Waits until every change to the user's mailboxes made anywhere before the
    /// call is visible here (linearizable; on Kafka it writes a barrier record:
    /// for tests and admin tools, never for a client's reads, which use
    /// [`Self::reach_user`]).
    pub async fn sync_user(&self, user: &UserRef) -> Result<(), EngineError> {
        self.mailbox_replica(user).await?.sync().await
    }

    /// Waits until this replica has applied the user's log up to `position` (from
    /// an earlier reply of any replica, 0 for none): a session sees its own writes
    /// and never goes back in time, and a read writes nothing to the log.
    pub async fn reach_user(&self, user: &UserRef, position: u64) -> Result<(), EngineError> {
        let replica = self.mailbox_replica(user).await?;
        replica
            .reach(i64::try_from(position).unwrap_or(i64::MAX))
            .await
    }

    /// How far this replica has applied the user's log: what a reply tells the
    /// client to carry into its next call.
    pub async fn position(&self, user: &UserRef) -> Result<u64, EngineError> {
        let replica = self.mailbox_replica(user).await?;
        Ok(u64::try_from(replica.applied()).unwrap_or(0))
    }

    /// Changes to the mailboxes of every user placed with `user`; filter by user.
    pub async fn subscribe(
        &self,
        user: &UserRef,
    ) -> Result<broadcast::Receiver<MailboxEvent>, EngineError> {
        Ok(self.mailbox_replica(user).await?.subscribe())
    }

    fn quota_of(&self, user: &UserRef) -> Result<Option<u64>, EngineError> {
        self.directory(|d| d.user(&user.user).and_then(|u| u.quota_bytes))
    }

    /// The key of a new message object relative to the user's prefix (maildir layout).
    fn object_key(mailbox: MailboxId, name: &str) -> String {
        format!("{mailbox}/cur/{name}")
    }

    fn object_path(user: &UserRef, key: &str) -> Path {
        Path::from(format!("{}/{key}", user.prefix()))
    }

    /// Deletes objects the index no longer refers to. The change is committed, so a
    /// failure here is logged, not returned (the sweep collects what is left).
    async fn delete_unreferenced(&self, user: &UserRef, keys: impl IntoIterator<Item = String>) {
        for key in keys {
            let path = Self::object_path(user, &key);
            if let Err(e) = self.objects.delete(&path).await {
                tracing::warn!(%path, error = %e, "deleting an unreferenced message object");
            }
        }
    }

    /// Keeps the objects of messages expunged from `mailbox` for the sessions that
    /// may still fetch them (`expunged_retention`), deleting what cannot be kept.
    async fn retire(&self, user: &UserRef, mailbox: &str, removed: Vec<(Uid, String)>) {
        let retired = removed
            .into_iter()
            .map(|(uid, object)| crate::sweep::Retired {
                user: user.clone(),
                object,
                message: Some((mailbox.to_owned(), uid)),
            })
            .collect();
        let now = self.expunged.keep(retired);
        let reason = if self.config.expunged_retention.is_zero() {
            "expunged"
        } else {
            "overflow"
        };
        self.delete_retired(now, reason).await;
    }

    async fn delete_retired(&self, retired: Vec<crate::sweep::Retired>, reason: &str) {
        let count = retired.len() as u64;
        for r in retired {
            self.delete_unreferenced(&r.user, [r.object]).await;
        }
        crate::metrics::objects_deleted(reason, count);
    }

    /// Deletes every kept expunged object now (at shutdown: a later owner does not
    /// know them, and they would wait for the orphan sweep).
    pub async fn release_expunged(&self) {
        self.delete_retired(self.expunged.due(true), "expunged")
            .await;
    }

    /// Lists the objects of every user whose partition this replica owns and
    /// deletes those older than `orphan_grace` that no index names (`sweep`).
    pub async fn sweep_orphans(&self) -> Result<crate::sweep::Swept, EngineError> {
        use futures::TryStreamExt;
        let users: Vec<UserRef> = self.directory(|d| {
            d.all_users()
                .map(|u| UserRef {
                    tenant: u.tenant.clone(),
                    user: u.id,
                })
                .collect()
        })?;
        let before =
            mailmesh_types::unix_millis(std::time::SystemTime::now() - self.config.orphan_grace);
        let mut swept = crate::sweep::Swept::default();
        for user in users {
            if !self.owns(&user) {
                continue;
            }
            let prefix = format!("{}/", user.prefix());
            // Listed before the index is read: an object the listing shows was
            // written before anything the read cannot see.
            let old: Vec<(String, u64)> = self
                .objects
                .list(Some(&Path::from(user.prefix())))
                .try_filter_map(|meta| {
                    let key = meta
                        .location
                        .as_ref()
                        .strip_prefix(&prefix)
                        .map(str::to_owned);
                    let old = meta.last_modified.timestamp_millis() < before;
                    std::future::ready(Ok(key.filter(|_| old).map(|k| (k, meta.size))))
                })
                .try_collect()
                .await?;
            swept.users += 1;
            if old.is_empty() {
                continue;
            }
            let named: std::collections::HashSet<String> = match self
                .read_index(&user, |i| {
                    i.map(|i| {
                        i.mailboxes()
                            .flat_map(|m| m.messages.values().map(|m| m.object.clone()))
                            .collect()
                    })
                    .unwrap_or_default()
                })
                .await
            {
                Ok(named) => named,
                // Moved to another replica meanwhile: its owner sweeps it.
                Err(EngineError::NotOwner(_)) => continue,
                Err(e) => return Err(e),
            };
            for (key, size) in old {
                if named.contains(&key) || self.expunged.holds(&user, &key) {
                    continue;
                }
                tracing::info!(user = %user.key(), object = %key, "deleting an orphaned message object");
                self.delete_unreferenced(&user, [key]).await;
                swept.objects += 1;
                swept.bytes += size;
            }
        }
        crate::metrics::objects_deleted("orphan", swept.objects);
        Ok(swept)
    }

    /// Refuses a `UserRef` that does not name an existing user of that tenant.
    fn ensure_user(&self, user: &UserRef) -> Result<(), EngineError> {
        let known =
            self.directory(|d| d.user(&user.user).is_some_and(|u| u.tenant == user.tenant))?;
        if known {
            Ok(())
        } else {
            Err(StorageError::NotFound(format!("user {}", user.user)).into())
        }
    }

    /// The mailbox `name` of `user`, creating the user's index if it is new.
    async fn mailbox_id(
        &self,
        user: &UserRef,
        name: &str,
    ) -> Result<Option<MailboxId>, EngineError> {
        let canonical = crate::index::canonical_name(name, &self.config.index_limits)?;
        let found = self
            .read_index(user, |i| {
                i.map(|i| (i.is_initialised(), i.mailbox(&canonical).map(|m| m.id)))
            })
            .await?;
        match found {
            Some((true, id)) => Ok(id),
            _ => {
                self.index(user, IndexCommand::Init).await?;
                self.read_index(user, |i| {
                    i.and_then(|i| i.mailbox(&canonical).map(|m| m.id))
                })
                .await
            }
        }
    }

    /// The largest message `user` may store: the service's limit, or the tenant's
    /// when lower.
    fn message_limit(&self, user: &UserRef) -> Result<u64, EngineError> {
        let tenant_limit = self.directory(|d| {
            d.tenant(&user.tenant)
                .and_then(|t| t.limits.max_message_bytes)
        })?;
        Ok(tenant_limit.map_or(self.config.max_message_bytes, |t| {
            t.min(self.config.max_message_bytes)
        }))
    }

    /// Whether `size` more bytes may be stored for `user`: the message limit, the
    /// tenant's storage, and (checked here before any upload, exactly again when the
    /// index applies the append) the user's quota.
    async fn check_room(&self, user: &UserRef, size: u64) -> Result<(), EngineError> {
        self.check_tenant_storage(&user.tenant, size).await?;
        let limit = self.message_limit(user)?;
        if size > limit {
            return Err(StorageError::OverQuota {
                reason: format!("message exceeds {limit} bytes"),
                permanent: true,
            }
            .into());
        }
        Ok(())
    }

    async fn append_object(&self, user: &UserRef, new: NewObject) -> Result<Appended, EngineError> {
        let size = new.body.len() as u64;
        self.check_room(user, size).await?;
        let path = Self::object_path(user, &Self::object_key(new.mailbox, &new.name));
        // The object is durable before the index refers to it.
        self.objects
            .put(&path, PutPayload::from(new.body.clone()))
            .await?;
        self.index_object(user, new, size).await
    }

    /// Makes the index refer to `new`'s object, already stored (`size` bytes).
    async fn index_object(
        &self,
        user: &UserRef,
        new: NewObject,
        size: u64,
    ) -> Result<Appended, EngineError> {
        let NewObject {
            mailbox_name,
            mailbox,
            name,
            flags,
            internal_date_ms,
            delivery_key,
            ..
        } = new;
        let key = Self::object_key(mailbox, &name);
        let path = Self::object_path(user, &key);
        let outcome = self
            .index_request(
                user,
                IndexCommand::Append {
                    mailbox: mailbox_name,
                    message: NewMessage {
                        object: key,
                        size,
                        internal_date_ms,
                        flags,
                    },
                    delivery_key,
                    quota_bytes: self.quota_of(user)?,
                },
            )
            .await;
        match outcome {
            // A repeated request's body went to the same object as the first
            // attempt's (`request::object_name`): nothing to remove.
            Ok((
                IndexOutcome::Appended {
                    mailbox,
                    uidvalidity,
                    uid,
                    duplicate,
                },
                repeated,
            )) => Ok(Appended {
                mailbox,
                uidvalidity,
                uid,
                duplicate: duplicate || repeated,
            }),
            Ok((other, _)) => Err(EngineError::Codec(format!("unexpected outcome {other:?}"))),
            Err(e @ EngineError::Refused(_)) => {
                // Refused when applied: nothing refers to the object.
                if let Err(del) = self.objects.delete(&path).await {
                    tracing::warn!(%path, error = %del, "removing an unreferenced message object");
                }
                Err(e)
            }
            // No outcome (timeout, broker error): the command may still have landed
            // and refer to the object, so it stays (a sweep removes true orphans).
            Err(e) => Err(e),
        }
    }

    /// IMAP APPEND of a message that arrives in chunks, never held whole: `size`
    /// (announced by the client) is checked against the limits and the quota first,
    /// the bytes go to the object store as they come (multipart), and only a body of
    /// exactly `size` bytes is indexed; anything else stores nothing.
    pub async fn append_stream<S>(
        &self,
        user: &UserRef,
        mailbox: &str,
        size: u64,
        body: S,
        flags: Flags,
        internal_date_ms: i64,
    ) -> Result<Appended, EngineError>
    where
        S: futures::Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let id = self
            .mailbox_id(user, mailbox)
            .await?
            .ok_or_else(|| StorageError::NotFound(format!("mailbox {mailbox} (trycreate)")))?;
        self.check_room(user, size).await?;
        let (used, quota) = self.quota(user).await?;
        if let Some(quota) = quota
            && used.saturating_add(size) > quota
        {
            return Err(StorageError::OverQuota {
                reason: format!("{size} more bytes exceed the quota of {quota}"),
                permanent: size > quota,
            }
            .into());
        }
        let new = NewObject {
            mailbox_name: mailbox.to_owned(),
            mailbox: id,
            name: new_object_name(),
            body: Bytes::new(),
            flags,
            internal_date_ms,
            delivery_key: None,
        };
        let path = Self::object_path(user, &Self::object_key(id, &new.name));
        let written = mailmesh_objstore::put_stream(
            &*self.objects,
            &path,
            body,
            mailmesh_objstore::DEFAULT_PART_SIZE,
            size,
        )
        .await?;
        if written != size {
            if let Err(e) = self.objects.delete(&path).await {
                tracing::warn!(%path, error = %e, "removing a short APPEND body");
            }
            return Err(StorageError::InvalidArgument(format!(
                "{written} bytes arrived of {size} announced"
            ))
            .into());
        }
        self.index_object(user, new, size).await
    }

    /// Finishes a streamed APPEND whose answer was lost after its last chunk (sent
    /// again with the same request id and `resume`): the body that attempt stored
    /// under the request's object name is indexed, or the first attempt's outcome
    /// returned. With no body there, the request is abandoned: a late first attempt
    /// is refused, and the answer (FailedPrecondition) says nothing was stored.
    pub async fn append_resume(
        &self,
        user: &UserRef,
        mailbox: &str,
        size: u64,
        flags: Flags,
        internal_date_ms: i64,
    ) -> Result<Appended, EngineError> {
        let request = crate::request::current().ok_or_else(|| {
            StorageError::InvalidArgument("resume needs the request id of the first attempt".into())
        })?;
        let id = self
            .mailbox_id(user, mailbox)
            .await?
            .ok_or_else(|| StorageError::NotFound(format!("mailbox {mailbox} (trycreate)")))?;
        let name = crate::request::object_name(request);
        let path = Self::object_path(user, &Self::object_key(id, &name));
        match self.objects.head(&path).await {
            Ok(meta) if meta.size == size => {
                let new = NewObject {
                    mailbox_name: mailbox.to_owned(),
                    mailbox: id,
                    name,
                    body: Bytes::new(),
                    flags,
                    internal_date_ms,
                    delivery_key: None,
                };
                return self.index_object(user, new, size).await;
            }
            Ok(_) | Err(mailmesh_objstore::object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match self.index_request(user, IndexCommand::Abandon).await? {
            (
                IndexOutcome::Appended {
                    mailbox,
                    uidvalidity,
                    uid,
                    ..
                },
                _,
            ) => Ok(Appended {
                mailbox,
                uidvalidity,
                uid,
                duplicate: true,
            }),
            (IndexOutcome::Abandoned, _) => Err(StorageError::FailedPrecondition(
                "the message was not stored (its body never arrived whole); send it again".into(),
            )
            .into()),
            (other, _) => Err(EngineError::Codec(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Delivers a message as an MDA does: adds `Return-Path` and `Delivered-To`,
    /// stores it in the requested mailbox (INBOX when that mailbox does not exist) and
    /// is idempotent on the delivery key (queue id and recipient): a replay stores
    /// nothing.
    pub async fn deliver(
        &self,
        user: &UserRef,
        delivery: Delivery<'_>,
    ) -> Result<Appended, EngineError> {
        let (name, id) = match self.mailbox_id(user, delivery.mailbox).await? {
            Some(id) => (delivery.mailbox, id),
            None => (
                INBOX,
                self.mailbox_id(user, INBOX)
                    .await?
                    .ok_or_else(|| StorageError::NotFound("INBOX".into()))?,
            ),
        };
        let mut body = BytesMut::with_capacity(delivery.message.len() + 128);
        body.extend_from_slice(
            format!(
                "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                delivery.return_path, delivery.delivered_to
            )
            .as_bytes(),
        );
        body.extend_from_slice(delivery.message);
        // The same delivery always writes the same object, so a replay that races the
        // first attempt overwrites identical bytes.
        let object = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, delivery.key.as_bytes())
            .simple()
            .to_string();
        self.append_object(
            user,
            NewObject {
                mailbox_name: name.to_owned(),
                mailbox: id,
                name: object,
                body: body.freeze(),
                flags: Flags::default(),
                internal_date_ms: delivery.internal_date_ms,
                delivery_key: Some(delivery.key.to_owned()),
            },
        )
        .await
    }

    /// IMAP APPEND: stores a message as given.
    pub async fn append(
        &self,
        user: &UserRef,
        mailbox: &str,
        message: Bytes,
        flags: Flags,
        internal_date_ms: i64,
    ) -> Result<Appended, EngineError> {
        let id = self
            .mailbox_id(user, mailbox)
            .await?
            .ok_or_else(|| StorageError::NotFound(format!("mailbox {mailbox} (trycreate)")))?;
        self.append_object(
            user,
            NewObject {
                mailbox_name: mailbox.to_owned(),
                mailbox: id,
                name: new_object_name(),
                body: message,
                flags,
                internal_date_ms,
                delivery_key: None,
            },
        )
        .await
    }

    /// A message's content, whole or a byte range of it, collected in memory (for
    /// small messages and tests; the gRPC API streams with [`Self::fetch_stream`]).
    pub async fn fetch(
        &self,
        user: &UserRef,
        mailbox: &str,
        uid: Uid,
        range: Option<Range<u64>>,
    ) -> Result<Bytes, EngineError> {
        use futures::TryStreamExt;
        let chunks: Vec<Bytes> = self
            .fetch_stream(user, mailbox, uid, range)
            .await?
            .try_collect()
            .await?;
        Ok(chunks.concat().into())
    }

    /// A message's content as it comes from object storage, so a large message is
    /// never held whole in memory. A range past the end gives what exists (IMAP
    /// partial fetch semantics); one starting past the end gives nothing.
    pub async fn fetch_stream(
        &self,
        user: &UserRef,
        mailbox: &str,
        uid: Uid,
        range: Option<Range<u64>>,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, EngineError>>, EngineError> {
        use futures::{StreamExt, TryStreamExt};
        let canonical = crate::index::canonical_name(mailbox, &self.config.index_limits)?;
        let found = self
            .read_index(user, |i| {
                let m = i?.mailbox(&canonical)?;
                m.messages
                    .get(&uid)
                    .map(|msg| (msg.object.clone(), msg.size))
            })
            .await?;
        let (key, size) = match found {
            Some(found) => found,
            // Expunged, but a session may not know yet: its object while kept.
            None => match self.expunged.find(user, &canonical, uid) {
                Some(key) => {
                    let size = self
                        .objects
                        .head(&Self::object_path(user, &key))
                        .await?
                        .size;
                    (key, size)
                }
                None => {
                    return Err(
                        StorageError::NotFound(format!("message {uid} in {canonical}")).into(),
                    );
                }
            },
        };
        let range = match range {
            None => None,
            Some(r) if r.start >= size || r.start >= r.end => {
                return Ok(futures::stream::empty().boxed());
            }
            Some(r) => Some(GetRange::Bounded(r.start..r.end.min(size))),
        };
        let path = Self::object_path(user, &key);
        let options = GetOptions {
            range,
            ..Default::default()
        };
        let result = self.objects.get_opts(&path, options).await?;
        Ok(result.into_stream().map_err(EngineError::from).boxed())
    }

    /// STORE / UID STORE.
    pub async fn store_flags(
        &self,
        user: &UserRef,
        mailbox: &str,
        uids: Vec<UidRange>,
        action: StoreAction,
        flags: Flags,
        unchanged_since: Option<u64>,
    ) -> Result<IndexOutcome, EngineError> {
        Ok(self
            .index_request(
                user,
                IndexCommand::Store {
                    mailbox: mailbox.to_owned(),
                    uids,
                    action,
                    flags,
                    unchanged_since,
                },
            )
            .await?
            .0)
    }

    /// EXPUNGE / UID EXPUNGE; the removed messages' objects are deleted.
    pub async fn expunge(
        &self,
        user: &UserRef,
        mailbox: &str,
        uids: Option<Vec<UidRange>>,
    ) -> Result<Vec<Uid>, EngineError> {
        let (outcome, repeated) = self
            .index_request(
                user,
                IndexCommand::Expunge {
                    mailbox: mailbox.to_owned(),
                    uids,
                },
            )
            .await?;
        let IndexOutcome::Expunged { removed, .. } = outcome else {
            return Err(EngineError::Codec(format!(
                "unexpected outcome {outcome:?}"
            )));
        };
        let uids = removed.iter().map(|(uid, _)| *uid).collect();
        // A repeat's objects were retired by the first attempt (or are the sweep's).
        if !repeated {
            let canonical = crate::index::canonical_name(mailbox, &self.config.index_limits)?;
            self.retire(user, &canonical, removed).await;
        }
        Ok(uids)
    }

    /// DELETE mailbox, with the objects of its messages.
    pub async fn delete_mailbox(&self, user: &UserRef, mailbox: &str) -> Result<(), EngineError> {
        let (outcome, _) = self
            .index_request(
                user,
                IndexCommand::DeleteMailbox {
                    name: mailbox.to_owned(),
                },
            )
            .await?;
        if let IndexOutcome::MailboxDeleted { removed } = outcome {
            self.delete_unreferenced(user, removed).await;
        }
        Ok(())
    }

    /// COPY, or MOVE with `remove_source`: returns (UIDVALIDITY, source→destination UIDs).
    pub async fn copy(
        &self,
        user: &UserRef,
        from: &str,
        to: &str,
        uids: Vec<UidRange>,
        remove_source: bool,
    ) -> Result<(u32, Vec<(Uid, Uid)>), EngineError> {
        let limits = &self.config.index_limits;
        let from_c = crate::index::canonical_name(from, limits)?;
        let to_c = crate::index::canonical_name(to, limits)?;
        // Planned on what this replica has applied: a remote caller's call waits
        // first for the position it carries (what it has seen), and the copy takes
        // the messages that exist when it is applied.
        let plan = self
            .read_index(user, |i| {
                let i = i?;
                let src = i.mailbox(&from_c)?;
                let dst = i.mailbox(&to_c).map(|m| m.id);
                let messages: BTreeMap<Uid, String> = uids
                    .iter()
                    .flat_map(|r| {
                        src.messages
                            .range(r.first.min(r.last)..=r.first.max(r.last))
                    })
                    .map(|(uid, m)| (*uid, m.object.clone()))
                    .collect();
                Some((src.id, dst, messages))
            })
            .await?;
        let (_, dst_id, messages) =
            plan.ok_or_else(|| StorageError::NotFound(format!("mailbox {from_c}")))?;
        if messages.len() > MAX_COPY {
            return Err(StorageError::InvalidArgument(format!(
                "at most {MAX_COPY} messages per COPY or MOVE"
            ))
            .into());
        }
        let dst_id =
            dst_id.ok_or_else(|| StorageError::NotFound(format!("mailbox {to_c} (trycreate)")))?;
        // Copies first (server-side), so the index never names a missing object.
        let mut objects = Vec::with_capacity(messages.len());
        for (uid, key) in &messages {
            let copy = Self::object_key(dst_id, &uuid::Uuid::now_v7().simple().to_string());
            let copied = self
                .objects
                .copy(
                    &Self::object_path(user, key),
                    &Self::object_path(user, &copy),
                )
                .await;
            if let Err(e) = copied {
                self.delete_unreferenced(user, objects.into_iter().map(|(_, k)| k))
                    .await;
                return Err(e.into());
            }
            objects.push((*uid, copy));
        }
        let outcome = self
            .index_request(
                user,
                IndexCommand::Copy {
                    from: from_c.clone(),
                    to: to_c,
                    objects: objects.clone(),
                    remove_source,
                    quota_bytes: self.quota_of(user)?,
                },
            )
            .await;
        match outcome {
            Ok((
                IndexOutcome::Copied {
                    uidvalidity,
                    mapping,
                    unused_objects,
                    expunged,
                },
                repeated,
            )) => {
                if repeated {
                    // The first attempt's copies are the ones referenced: this
                    // attempt's are not.
                    self.delete_unreferenced(user, objects.into_iter().map(|(_, k)| k))
                        .await;
                } else {
                    self.delete_unreferenced(user, unused_objects).await;
                    self.retire(user, &from_c, expunged).await;
                }
                Ok((uidvalidity, mapping))
            }
            Ok((other, _)) => Err(EngineError::Codec(format!("unexpected outcome {other:?}"))),
            Err(e @ EngineError::Refused(_)) => {
                self.delete_unreferenced(user, objects.into_iter().map(|(_, k)| k))
                    .await;
                Err(e)
            }
            // No outcome: the copies may be referenced; leave them to the sweep.
            Err(e) => Err(e),
        }
    }

    /// Bytes a tenant stores, summed over every mailbox partition: with owned
    /// partitions, this replica's own as applied and the others' as their owners
    /// answer (asked at most every few seconds per tenant); else all partitions are
    /// opened here.
    pub async fn tenant_usage(&self, tenant: &TenantId) -> Result<u64, EngineError> {
        if let Some(owners) = &self.owners {
            let (mine, counted) = self.owned_tenant_usage(tenant);
            let cached = || {
                self.remote_usage
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(tenant)
                    .filter(|(_, at)| at.elapsed() < REMOTE_USAGE_TTL)
                    .map(|(bytes, _)| *bytes)
            };
            let asking = match (cached(), self.peers.get()) {
                (None, Some(_)) => Some(
                    self.usage_asking
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(tenant.clone())
                        .or_default()
                        .clone(),
                ),
                _ => None,
            };
            let _asking = match &asking {
                Some(lock) => Some(lock.lock().await),
                None => None,
            };
            let remote = match (cached(), self.peers.get()) {
                (Some(bytes), _) => bytes,
                (None, None) => 0,
                (None, Some(peers)) => {
                    crate::metrics::tenant_usage_asked();
                    let asked = futures::future::join_all(
                        owners
                            .others()
                            .into_keys()
                            .map(|owner| peers.tenant_usage(owner, tenant.clone())),
                    )
                    .await;
                    let mut bytes = 0u64;
                    for answer in asked {
                        match answer {
                            // A partition counted twice (moving) counts once.
                            Ok((b, partitions))
                                if partitions.iter().all(|p| !counted.contains(p)) =>
                            {
                                bytes = bytes.saturating_add(b)
                            }
                            Ok(_) => {}
                            // An owner that cannot answer now counts as nothing (the
                            // limit is a soft one; its partitions' users are
                            // unavailable anyway).
                            Err(e) => {
                                tracing::debug!(error = %e, "tenant usage of another replica")
                            }
                        }
                    }
                    self.remote_usage
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(tenant.clone(), (bytes, std::time::Instant::now()));
                    bytes
                }
            };
            return Ok(mine.saturating_add(remote));
        }
        // Partitions not yet open here are opened 16 at a time: each open waits for
        // its log's end (on tansu ~0.35 s; one after another 64 took 22 s), and all
        // at once overran the test S3 server with listings.
        use futures::{StreamExt, TryStreamExt};
        let replicas: Vec<MailboxReplica> = futures::stream::iter(0..self.partitions)
            .map(|partition| self.partition_replica(partition))
            .buffer_unordered(OPENING_AT_ONCE)
            .try_collect()
            .await?;
        let mut total = 0u64;
        for replica in replicas {
            total = total.saturating_add(replica.read(|p| p.tenant_bytes(tenant))?);
        }
        Ok(total)
    }

    /// The tenant-wide storage limit. It is checked before the command is made, from
    /// each partition's applied state, so concurrent appends can overshoot it by what
    /// is in flight; per-user quotas are exact (checked in `apply`).
    async fn check_tenant_storage(&self, tenant: &TenantId, size: u64) -> Result<(), EngineError> {
        let limit =
            self.directory(|d| d.tenant(tenant).and_then(|t| t.limits.max_storage_bytes))?;
        let Some(limit) = limit else {
            return Ok(());
        };
        let used = self.tenant_usage(tenant).await?;
        if used.saturating_add(size) > limit {
            return Err(StorageError::OverQuota {
                reason: format!("tenant storage full: {used} of {limit} bytes used"),
                permanent: size > limit,
            }
            .into());
        }
        Ok(())
    }

    /// Quota usage and limit of a user, in bytes.
    /// Whether `user`'s quota has room for `bytes` more now (always, without a
    /// quota). Advice for the MX: the delivery's own check decides.
    pub async fn has_room(&self, user: &UserRef, bytes: u64) -> Result<bool, EngineError> {
        let Some(quota) = self.quota_of(user)? else {
            return Ok(true);
        };
        let used = self
            .read_index(user, |i| i.map_or(0, UserIndex::used_bytes))
            .await?;
        Ok(used.saturating_add(bytes) <= quota)
    }

    pub async fn quota(&self, user: &UserRef) -> Result<(u64, Option<u64>), EngineError> {
        let used = self
            .read_index(user, |i| i.map_or(0, UserIndex::used_bytes))
            .await?;
        Ok((used, self.quota_of(user)?))
    }
}

/// Deletes kept expunged objects when due, and sweeps orphans every
/// `orphan_sweep_interval` (the first pass one interval after the start).
async fn tend(engine: std::sync::Weak<StorageEngine>) {
    let (retention, sweep_every) = match engine.upgrade() {
        Some(e) => (e.config.expunged_retention, e.config.orphan_sweep_interval),
        None => return,
    };
    let tick = retention.clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut next_sweep =
        (!sweep_every.is_zero()).then(|| tokio::time::Instant::now() + sweep_every);
    let mut next_report = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let Some(this) = engine.upgrade() else {
            return;
        };
        this.delete_retired(this.expunged.due(false), "expunged")
            .await;
        if tokio::time::Instant::now() >= next_report {
            // Lists the index's files: a blocking thread's job.
            let db = this.index_db.clone();
            let _ = tokio::task::spawn_blocking(move || db.report()).await;
            next_report = tokio::time::Instant::now() + Duration::from_secs(10);
        }
        if let Some(at) = next_sweep
            && tokio::time::Instant::now() >= at
        {
            match this.sweep_orphans().await {
                Ok(swept) => tracing::info!(
                    users = swept.users,
                    objects = swept.objects,
                    bytes = swept.bytes,
                    "orphan sweep done"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "the orphan sweep failed; tried again next interval")
                }
            }
            next_sweep = Some(tokio::time::Instant::now() + sweep_every);
        }
    }
}

/// Follows this replica's assignment: opens and announces the partitions it is
/// given, and closes those taken away; and the announcements: keeps warm the
/// partitions it stands by for (`standbys`), and closes those it no longer does.
async fn own(engine: std::sync::Weak<StorageEngine>, owners: Arc<Owners>) {
    use std::collections::BTreeSet;
    let mut assignment = owners.assignment();
    let mut advertised = owners.advertised();
    let mut announcements = owners.announcements();
    let mut serving = BTreeSet::new();
    let mut standing = BTreeSet::new();
    let mut announced: Option<String> = None;
    loop {
        let now = assignment.borrow_and_update().partitions.clone();
        let addr = advertised.borrow_and_update().clone();
        announcements.borrow_and_update();
        let Some(this) = engine.upgrade() else {
            return;
        };
        let warm = owners.standing(this.config.standbys);
        for gone in serving.difference(&now) {
            tracing::info!(
                partition = gone,
                "mailbox partition moved to another replica"
            );
            this.close_partition(*gone);
        }
        for gone in standing.difference(&warm) {
            if !now.contains(gone) {
                tracing::info!(partition = gone, "no longer a standby for this partition");
                this.close_partition(*gone);
            }
        }
        let added: Vec<i32> = if announced != addr {
            // A new address: every partition is announced again.
            now.iter().copied().collect()
        } else {
            now.difference(&serving).copied().collect()
        };
        let fresh: Vec<i32> = now.difference(&serving).copied().collect();
        let new_standbys: Vec<i32> = warm.difference(&standing).copied().collect();
        serving = now;
        standing = warm;
        crate::metrics::partitions("owned", serving.len());
        crate::metrics::partitions("standby", standing.len());
        announced.clone_from(&addr);
        if !added.is_empty() || !fresh.is_empty() {
            let this = this.clone();
            let owners = owners.clone();
            tokio::spawn(async move {
                // Announced first: calls forwarded here wait for the opening
                // rather than for the announcement.
                if let Some(addr) = addr {
                    for partition in &added {
                        if let Err(e) = owners.announce(*partition, addr.clone()).await {
                            tracing::warn!(partition, error = %e, "announcing a partition owner");
                        }
                    }
                }
                use futures::StreamExt;
                futures::stream::iter(fresh)
                    .for_each_concurrent(OPENING_AT_ONCE, |partition| {
                        let this = this.clone();
                        async move {
                            match this.partition_replica(partition).await {
                                Ok(_) => tracing::info!(partition, "mailbox partition served here"),
                                Err(EngineError::NotOwner(_)) => {}
                                Err(e) => tracing::warn!(partition, error = %e, "opening an owned mailbox partition (retried at its next call)"),
                            }
                        }
                    })
                    .await;
            });
        }
        if !new_standbys.is_empty() {
            tokio::spawn(stand_by_all(
                Arc::downgrade(&this),
                owners.clone(),
                new_standbys,
            ));
        }
        drop(this);
        tokio::select! {
            changed = assignment.changed() => if changed.is_err() { return },
            changed = advertised.changed() => if changed.is_err() { return },
            changed = announcements.changed() => if changed.is_err() { return },
        }
    }
}

/// Opens partitions as warm standbys, a few at a time; one that cannot be opened
/// yet (its previous opening here still winding down, the bucket away) is tried
/// again every second while this replica still stands by for it.
async fn stand_by_all(
    engine: std::sync::Weak<StorageEngine>,
    owners: Arc<Owners>,
    partitions: Vec<i32>,
) {
    use futures::StreamExt;
    futures::stream::iter(partitions)
        .for_each_concurrent(OPENING_AT_ONCE, |partition| {
            let engine = engine.clone();
            let owners = owners.clone();
            async move {
                loop {
                    let Some(this) = engine.upgrade() else { return };
                    if owners.owns(partition) || !owners.stands_by(partition, this.config.standbys) {
                        return;
                    }
                    match this.stand_by(partition).await {
                        Ok(()) => {
                            tracing::info!(partition, "mailbox partition kept warm here for its owner");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(partition, error = %e, "opening a standby partition; retrying")
                        }
                    }
                    drop(this);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        })
        .await;
}
