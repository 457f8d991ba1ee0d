//! The mailbox index on the replica's disk (docs/adr/0005-storage-v2.md, §4–§5).
//!
//! One fjall database per replica holds a keyspace per mailbox-log partition. A
//! user's index is one value (`u/<tenant>/<user>`) together with the offset of the
//! last command applied to it; a tenant's stored bytes in the partition is another
//! (`t/<tenant>`), and `P` says from which offset the log must be replayed. Resident
//! memory is a cache of users shared by every partition, bounded by
//! `index_cache_bytes`: idle users and idle partitions cost only disk.
//!
//! Applying a command changes the cached user and marks it dirty. Dirty users are
//! written back on their own schedule (after `index_writeback_delay`, under memory
//! pressure, or when the replay distance grows), each with its offset, so a user
//! changed many times is written once, and nothing waits for the others. `P` is the
//! first offset of the oldest change not yet written back; a restart replays the
//! log from `P` and skips each record its user already holds (the user's offset is
//! at or after it). A tenant's stored total on disk is always the sum over the users
//! as written back, so replaying their changes makes it current again.
//!
//! Checkpoints in object storage are a stream of the keyspace read from an engine
//! snapshot (`index/<topic>/<partition>/<P>.ckpt`), taken in microseconds and written
//! in the background while the partition keeps applying; a replica without a local
//! store (a new pod) restores the newest and replays the log from its `P`. v1's JSON
//! snapshots (`<offset>.json`, ADR 0001) are read the same way, which migrates them.
//! The log is the source of truth, so the engine's journal is not synced at writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable};
use futures::StreamExt;
use futures::future::BoxFuture;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStore, ObjectStoreExt};
use mailmesh_types::TenantId;
use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::StorageError;
use crate::engine::{MailboxEvent, PartitionCommand};
use crate::index::{IndexOutcome, UserIndex};
use crate::replica::{ReplicaConfig, StateMachine};

const META: &[u8] = b"P";
const USER: &[u8] = b"u/";
const TENANT: &[u8] = b"t/";
/// The first byte of every user value: the encoding's version (3: with remembered
/// client requests; 2, read and converted: subscriptions a list of names, no
/// requests; 1, read and converted: subscriptions a flag on each mailbox).
const USER_FORMAT: u8 = 3;
const USER_FORMAT_NO_REQUESTS: u8 = 2;
const USER_FORMAT_FLAG_SUBSCRIPTIONS: u8 = 1;
/// Checkpoint streams start with this line.
const CHECKPOINT_MAGIC: &[u8] = b"mailmesh-index-checkpoint 1\n";
/// Delta checkpoint streams start with this line.
const DELTA_MAGIC: &[u8] = b"mailmesh-index-delta 1\n";
/// Deltas after a base before the next checkpoint is a new base (also when the
/// deltas reach a quarter of the base's size).
const MAX_DELTAS: u32 = 16;
/// A key length that ends the stream: a count and a CRC-32 follow.
const END_OF_FRAMES: u32 = u32::MAX;
/// Users are written back early when the log to replay after a restart grows
/// past this many records.
const MAX_REPLAY: i64 = 100_000;
/// The longest key fjall takes.
const MAX_KEY: usize = 1 << 16;
/// Checkpoint chunks handed from the engine's reader to the uploader.
const CHUNK: usize = 1 << 20;

fn disk(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("index store: {e}"))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Meta {
    /// The log is replayed from here: every change before it is written back.
    replay_from: i64,
}

/// A user as written back.
#[derive(Serialize, Deserialize)]
struct StoredUser<I> {
    /// The offset of the last command applied to it.
    applied: i64,
    /// `None`: the user was forgotten (kept so a replay cannot bring it back).
    index: Option<I>,
}

fn user_key(key: &str) -> Vec<u8> {
    [USER, key.as_bytes()].concat()
}

fn tenant_key(tenant: &TenantId) -> Vec<u8> {
    [TENANT, tenant.to_string().as_bytes()].concat()
}

fn encode_user(applied: i64, index: Option<&UserIndex>) -> Result<Vec<u8>, EngineError> {
    postcard::to_extend(&StoredUser { applied, index }, vec![USER_FORMAT])
        .map_err(|e| EngineError::Codec(format!("user index: {e}")))
}

fn decode_user(bytes: &[u8]) -> Result<StoredUser<UserIndex>, EngineError> {
    match bytes.split_first() {
        Some((&USER_FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|e| EngineError::Codec(format!("user index: {e}")))
        }
        Some((&USER_FORMAT_NO_REQUESTS, rest)) => {
            let old: StoredUser<crate::index::UserIndexFormat2> = postcard::from_bytes(rest)
                .map_err(|e| EngineError::Codec(format!("user index (format 2): {e}")))?;
            Ok(StoredUser {
                applied: old.applied,
                index: old.index.map(UserIndex::from),
            })
        }
        Some((&USER_FORMAT_FLAG_SUBSCRIPTIONS, rest)) => {
            let old: StoredUser<crate::index::LegacyUserIndex> = postcard::from_bytes(rest)
                .map_err(|e| EngineError::Codec(format!("user index (format 1): {e}")))?;
            Ok(StoredUser {
                applied: old.applied,
                index: old.index.map(UserIndex::from),
            })
        }
        _ => Err(EngineError::Codec(
            "user index: unknown format (written by a newer version?)".into(),
        )),
    }
}

/// A user held in memory.
#[derive(Clone)]
struct Cached {
    /// `None`: forgotten.
    index: Option<Arc<UserIndex>>,
    /// The offset of the last command applied to it (-1: none).
    applied: i64,
    /// Its stored bytes as last written back (for the tenant's total on disk).
    persisted_used: u64,
    bytes: usize,
    /// Its place in the LRU order.
    tick: u64,
    /// Changed since written back: never evicted.
    dirty: bool,
}

impl Cached {
    fn used(&self) -> u64 {
        self.index.as_ref().map_or(0, |i| i.used_bytes())
    }
}

type CacheKey = (i32, String);

/// The users every partition of this replica holds in memory, least recently used
/// first out once over budget.
#[derive(Default)]
struct Cache {
    users: HashMap<CacheKey, Cached>,
    lru: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: usize,
    dirty_bytes: usize,
    budget: usize,
}

impl Cache {
    fn get(&mut self, key: &CacheKey) -> Option<&Cached> {
        let entry = self.users.get_mut(key)?;
        self.lru.remove(&entry.tick);
        self.tick += 1;
        entry.tick = self.tick;
        self.lru.insert(self.tick, key.clone());
        Some(entry)
    }

    fn insert(&mut self, key: CacheKey, mut entry: Cached) {
        self.remove(&key);
        entry.bytes = entry.index.as_ref().map_or(64, |i| i.approx_heap_bytes());
        self.tick += 1;
        entry.tick = self.tick;
        self.lru.insert(self.tick, key.clone());
        self.bytes += entry.bytes;
        if entry.dirty {
            self.dirty_bytes += entry.bytes;
        }
        self.users.insert(key, entry);
        self.evict();
    }

    fn remove(&mut self, key: &CacheKey) -> Option<Cached> {
        let entry = self.users.remove(key)?;
        self.lru.remove(&entry.tick);
        self.bytes -= entry.bytes;
        if entry.dirty {
            self.dirty_bytes -= entry.bytes;
        }
        Some(entry)
    }

    /// Records what a user's write-back stored while it stays dirty.
    fn set_persisted(&mut self, key: &CacheKey, persisted_used: u64) {
        if let Some(entry) = self.users.get_mut(key) {
            entry.persisted_used = persisted_used;
        }
    }

    fn mark_clean(&mut self, key: &CacheKey, persisted_used: u64) {
        if let Some(entry) = self.users.get_mut(key) {
            if entry.dirty {
                self.dirty_bytes -= entry.bytes;
            }
            entry.dirty = false;
            entry.persisted_used = persisted_used;
        }
    }

    /// Drops clean users, oldest first, until within budget.
    fn evict(&mut self) {
        if self.bytes <= self.budget {
            return;
        }
        let mut victims = Vec::new();
        let mut freed = 0;
        for key in self.lru.values() {
            if self.bytes - freed <= self.budget {
                break;
            }
            if let Some(entry) = self.users.get(key)
                && !entry.dirty
            {
                freed += entry.bytes;
                victims.push(key.clone());
            }
        }
        for key in victims {
            self.remove(&key);
        }
    }
}

/// The replica's index database; shared by its partitions.
pub struct IndexDb {
    db: Database,
    cache: Mutex<Cache>,
    /// Partitions with a live `PartitionIndex`: one at a time each.
    open: Mutex<BTreeSet<String>>,
    budget: usize,
    /// A changed user is written back this long after its first change at the
    /// latest (so a busy user is written once per period, not once per command).
    writeback_delay: Duration,
}

impl IndexDb {
    /// Opens (or creates) the database in `dir`; without one, in a temporary
    /// directory removed when it closes (tests, and a replica that restores from
    /// object storage at every start).
    pub fn open(
        dir: Option<&FsPath>,
        cache_bytes: u64,
        writeback_delay: Duration,
    ) -> Result<Arc<Self>, EngineError> {
        let budget = usize::try_from(cache_bytes).unwrap_or(usize::MAX);
        let (path, temporary): (PathBuf, bool) = match dir {
            Some(dir) => (dir.to_path_buf(), false),
            None => (
                std::env::temp_dir().join(format!("mailmesh-index-{}", uuid::Uuid::new_v4())),
                true,
            ),
        };
        let db = Database::builder(&path)
            .temporary(temporary)
            // Beside the user cache: the engine's block cache (an eighth of the
            // budget) and a memtable of at most 4 MiB per partition written to;
            // the journal is cut at 128 MiB (older memtables are flushed then).
            .cache_size((cache_bytes / 8).max(1 << 20))
            .max_journaling_size(128 << 20)
            .open()
            .map_err(|e| disk(format!("opening {}: {e}", path.display())))?;
        Ok(Arc::new(Self {
            db,
            cache: Mutex::new(Cache {
                budget,
                ..Cache::default()
            }),
            budget,
            writeback_delay,
            open: Mutex::new(BTreeSet::new()),
        }))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of users held in memory (all partitions), for metrics and tests.
    pub fn cached_bytes(&self) -> usize {
        self.cache().bytes
    }

    /// Bytes of changed users not yet written back (all partitions).
    pub fn dirty_bytes(&self) -> usize {
        self.cache().dirty_bytes
    }

    /// Bytes on disk (journal and tables); lists the engine's files, so never
    /// under the apply lock.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Sets the index size metrics (the memory held, the bytes on disk).
    pub fn report(&self) {
        crate::metrics::index_cached_bytes(self.cached_bytes());
        crate::metrics::index_disk_bytes(self.disk_bytes());
    }

    fn keyspace_name(config: &ReplicaConfig) -> String {
        format!("{}#{}", config.topic, config.partition)
    }

    fn keyspace(&self, config: &ReplicaConfig) -> Result<Keyspace, EngineError> {
        let name = Self::keyspace_name(config);
        self.db
            .keyspace(&name, || {
                // Large users (50k messages: MBs) are kept apart from the keys.
                KeyspaceCreateOptions::default()
                    .max_memtable_size(4 << 20)
                    .with_kv_separation(Some(fjall::KvSeparationOptions::default()))
            })
            .map_err(disk)
    }
}

/// A user changed since it was last written back.
struct Dirty {
    /// The offset of its first change since then: the log must be kept from here.
    since: i64,
    at: Instant,
    tenant: TenantId,
}

/// The indexes of every user in one partition of the mailbox log.
pub struct PartitionIndex {
    db: Arc<IndexDb>,
    keyspace: Keyspace,
    partition: i32,
    /// Bytes stored per tenant in this partition, kept in step by `apply`; a tenant's
    /// total is the sum over partitions (for the tenant storage limit).
    tenant_bytes: BTreeMap<TenantId, u64>,
    /// The same, over the users as written back (what the keyspace holds).
    tenant_persisted: BTreeMap<TenantId, u64>,
    dirty: HashMap<String, Dirty>,
    /// `(since, key)` of the dirty users, oldest change first.
    dirty_order: BTreeSet<(i64, String)>,
    /// `P` as written.
    persisted_from: i64,
    /// Keys written back since the last checkpoint's snapshot: what the next
    /// delta carries.
    changed: BTreeSet<Vec<u8>>,
    /// The checkpoints in object storage this replica's next one builds on.
    chain: Arc<Mutex<Chain>>,
    /// A batch being written back outside the apply lock, and where it reports.
    /// (In a mutex only to be `Sync`: it is used under the apply lock.)
    writing: Option<Mutex<std::sync::mpsc::Receiver<Result<Batch, EngineError>>>>,
    /// Declared last: released after `Drop` has cleared this partition's users
    /// (and held by a batch still being written, so the partition is not opened
    /// again meanwhile).
    claim: Arc<Claim>,
}

/// Users to write back: taken under the apply lock, encoded and committed outside
/// it, then made clean under it again (`finish`).
struct Batch {
    /// Key, the offset of the last command applied to it, its index, and its
    /// stored bytes as last written back.
    users: Vec<(String, i64, Option<Arc<UserIndex>>, u64)>,
    /// Every tenant's bytes as written once this batch is committed, and the
    /// tenants it changes.
    persisted: BTreeMap<TenantId, u64>,
    tenants: BTreeSet<TenantId>,
    /// `P` once committed.
    replay_from: i64,
    /// The offset after the last command applied when it was taken: changes made
    /// since are at this offset or later.
    taken_at: i64,
}

/// A base checkpoint and the deltas after it, as this replica knows them.
#[derive(Debug, Default, Clone)]
struct Chain {
    /// `P` of the last checkpoint of the chain; `None`: the next one is a base
    /// (nothing known, or the keyspace may differ from what the bucket holds).
    end: Option<i64>,
    base_bytes: u64,
    delta_bytes: u64,
    deltas: u32,
}

/// What a checkpoint uploads.
enum Upload {
    /// The whole keyspace; older checkpoints are deleted after it.
    Base,
    /// The keys written back since the checkpoint at `from`, and `P`.
    Delta { from: i64, keys: Vec<Vec<u8>> },
}

/// A partition's place in `IndexDb::open`, given back when dropped.
struct Claim {
    db: Arc<IndexDb>,
    name: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.db
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl PartitionIndex {
    /// A user's index as applied here (`None` before their first use).
    pub fn user(&self, key: &str) -> Result<Option<Arc<UserIndex>>, EngineError> {
        let cache_key = (self.partition, key.to_owned());
        if let Some(entry) = self.db.cache().get(&cache_key) {
            return Ok(entry.index.clone());
        }
        // Not dirty (dirty users are pinned), so the keyspace has it as applied.
        let Some(entry) = self.load(key)? else {
            return Ok(None);
        };
        let index = entry.index.clone();
        let mut cache = self.db.cache();
        // Readers hold the state's read lock and writers its write lock, so no
        // writer put a newer one in meanwhile; another reader may have.
        if let Some(current) = cache.get(&cache_key) {
            return Ok(current.index.clone());
        }
        cache.insert(cache_key, entry);
        Ok(index)
    }

    pub fn tenant_bytes(&self, tenant: &TenantId) -> u64 {
        self.tenant_bytes.get(tenant).copied().unwrap_or(0)
    }

    fn load(&self, key: &str) -> Result<Option<Cached>, EngineError> {
        let Some(bytes) = self.keyspace.get(user_key(key)).map_err(disk)? else {
            return Ok(None);
        };
        let stored = decode_user(&bytes)?;
        let index = stored.index.map(Arc::new);
        Ok(Some(Cached {
            persisted_used: index.as_ref().map_or(0, |i| i.used_bytes()),
            index,
            applied: stored.applied,
            bytes: 0,
            tick: 0,
            dirty: false,
        }))
    }

    /// Takes a user out of the cache for a change (so the change does not copy it).
    fn take(&mut self, key: &str) -> Result<Cached, EngineError> {
        if let Some(entry) = self.db.cache().remove(&(self.partition, key.to_owned())) {
            return Ok(entry);
        }
        Ok(self.load(key)?.unwrap_or(Cached {
            index: None,
            applied: -1,
            persisted_used: 0,
            bytes: 0,
            tick: 0,
            dirty: false,
        }))
    }

    /// Puts a user back after a command at `offset` changed it.
    fn put_changed(&mut self, key: String, tenant: &TenantId, mut entry: Cached, offset: i64) {
        entry.applied = offset;
        entry.dirty = true;
        if !self.dirty.contains_key(&key) {
            self.dirty.insert(
                key.clone(),
                Dirty {
                    since: offset,
                    at: Instant::now(),
                    tenant: tenant.clone(),
                },
            );
            self.dirty_order.insert((offset, key.clone()));
        }
        self.db.cache().insert((self.partition, key), entry);
    }

    /// The offset a restart must replay from.
    fn replay_from(&self, next: i64) -> i64 {
        self.dirty_order.first().map_or(next, |(since, _)| *since)
    }

    /// Writes back the dirty users `pick` selects (all when `None`), oldest change
    /// first, up to about `limit` bytes of them, with the new `P`, in one batch,
    /// here and now. Memory changes only once the batch is committed.
    fn write_back(
        &mut self,
        next: i64,
        pick: Option<&dyn Fn(&Dirty) -> bool>,
        limit: usize,
    ) -> Result<(), EngineError> {
        self.written(true)?;
        if let Some(batch) = self.take_batch(next, pick, limit)? {
            commit(&self.db, &self.keyspace, &batch)?;
            self.finish(batch);
        }
        Ok(())
    }

    /// Starts writing back what `pick` selects (as `write_back`) outside the apply
    /// lock: a write never waits for the encoding and the commit; memory follows
    /// at a later call (`written`).
    fn start_write_back(
        &mut self,
        next: i64,
        pick: Option<&dyn Fn(&Dirty) -> bool>,
        limit: usize,
    ) -> Result<(), EngineError> {
        let Some(batch) = self.take_batch(next, pick, limit)? else {
            return Ok(());
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (db, keyspace, claim) = (self.db.clone(), self.keyspace.clone(), self.claim.clone());
        let job = move || {
            let done = commit(&db, &keyspace, &batch).map(|()| batch);
            let _ = tx.send(done);
            drop(claim);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(job)),
            Err(_) => job(),
        }
        self.writing = Some(Mutex::new(rx));
        Ok(())
    }

    /// Makes memory follow a batch written outside the lock, if it is done (or,
    /// with `wait`, once it is). False while one is still being written.
    fn written(&mut self, wait: bool) -> Result<bool, EngineError> {
        use std::sync::mpsc::TryRecvError;
        let Some(rx) = &self.writing else {
            return Ok(true);
        };
        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        let done = if wait {
            rx.recv()
                .map_err(|_| disk("a write-back ended without an answer"))?
        } else {
            match rx.try_recv() {
                Ok(done) => done,
                Err(TryRecvError::Empty) => return Ok(false),
                Err(TryRecvError::Disconnected) => {
                    return Err(disk("a write-back ended without an answer"));
                }
            }
        };
        drop(rx);
        self.writing = None;
        self.finish(done?);
        Ok(true)
    }

    /// The users to write back (see `write_back`), as they are now; `None` when
    /// neither a user nor `P` would change.
    fn take_batch(
        &mut self,
        next: i64,
        pick: Option<&dyn Fn(&Dirty) -> bool>,
        limit: usize,
    ) -> Result<Option<Batch>, EngineError> {
        let mut keys = BTreeSet::new();
        let mut users = Vec::new();
        {
            let cache = self.db.cache();
            let mut bytes = 0usize;
            for (_, key) in &self.dirty_order {
                if bytes >= limit {
                    break;
                }
                if !pick.is_none_or(|pick| pick(&self.dirty[key])) {
                    continue;
                }
                let Some(entry) = cache.users.get(&(self.partition, key.clone())) else {
                    return Err(disk(format!("dirty user {key} left the cache")));
                };
                bytes += entry.bytes;
                keys.insert(key.clone());
                users.push((
                    key.clone(),
                    entry.applied,
                    entry.index.clone(),
                    entry.persisted_used,
                ));
            }
        }
        let replay_from = self
            .dirty_order
            .iter()
            .find(|(_, key)| !keys.contains(key))
            .map_or(next, |(since, _)| *since);
        if keys.is_empty() && replay_from <= self.persisted_from {
            return Ok(None);
        }
        let mut persisted = self.tenant_persisted.clone();
        let mut tenants = BTreeSet::new();
        for (key, _, index, persisted_used) in &users {
            let used = index.as_ref().map_or(0, |i| i.used_bytes());
            let tenant = &self.dirty[key].tenant;
            let total = persisted.entry(tenant.clone()).or_default();
            *total = total.saturating_add(used).saturating_sub(*persisted_used);
            tenants.insert(tenant.clone());
        }
        // In the next checkpoint's delta whether or not the batch is committed by
        // its snapshot (and again once it is: `finish`).
        self.changed.extend(keys.iter().map(|k| user_key(k)));
        self.changed.extend(tenants.iter().map(tenant_key));
        Ok(Some(Batch {
            users,
            persisted,
            tenants,
            replay_from,
            taken_at: next,
        }))
    }

    /// Memory follows a committed batch: its users are clean unless changed since
    /// it was taken (then their log is kept from just after what it wrote).
    fn finish(&mut self, batch: Batch) {
        let Batch {
            users,
            persisted,
            tenants,
            replay_from,
            taken_at,
        } = batch;
        self.changed
            .extend(users.iter().map(|(key, ..)| user_key(key)));
        self.changed.extend(tenants.iter().map(tenant_key));
        self.tenant_persisted = persisted;
        self.persisted_from = replay_from;
        let mut cache = self.db.cache();
        for (key, applied, index, _) in users {
            debug_assert!(applied < taken_at);
            let cache_key = (self.partition, key.clone());
            let used = index.as_ref().map_or(0, |i| i.used_bytes());
            let current = cache.users.get(&cache_key).map(|e| e.applied);
            if current == Some(applied) {
                if let Some(d) = self.dirty.remove(&key) {
                    self.dirty_order.remove(&(d.since, key.clone()));
                }
                cache.mark_clean(&cache_key, used);
            } else {
                cache.set_persisted(&cache_key, used);
                if let Some(d) = self.dirty.get_mut(&key) {
                    self.dirty_order.remove(&(d.since, key.clone()));
                    d.since = d.since.max(taken_at);
                    d.at = Instant::now();
                    self.dirty_order.insert((d.since, key));
                }
            }
        }
        cache.evict();
        let cached = cache.bytes;
        drop(cache);
        // The bytes on disk are counted elsewhere, off the apply lock (listing the
        // engine's files takes milliseconds).
        crate::metrics::index_cached_bytes(cached);
    }

    /// Writes back what is due: users changed `writeback_delay` ago, the oldest
    /// changes when the replay distance is over `MAX_REPLAY`, and all of this
    /// partition's when dirty users hold half the cache.
    fn write_back_due(&mut self, next: i64) -> Result<(), EngineError> {
        let (pressure, full) = {
            let cache = self.db.cache();
            (
                cache.dirty_bytes > self.db.budget / 2,
                cache.dirty_bytes > self.db.budget,
            )
        };
        // One batch at a time, written outside the apply lock; only when dirty
        // users outgrow the whole cache does a write wait for it.
        if !self.written(full)? {
            return Ok(());
        }
        let batch = (self.db.budget / 64).max(2 << 20);
        if pressure {
            return self.start_write_back(next, None, batch);
        }
        if next - self.replay_from(next) > MAX_REPLAY {
            let horizon = next - MAX_REPLAY / 2;
            return self.start_write_back(next, Some(&|d: &Dirty| d.since < horizon), batch);
        }
        let delay = self.db.writeback_delay;
        if let Some((_, key)) = self.dirty_order.first()
            && self.dirty[key].at.elapsed() >= delay
        {
            return self.start_write_back(next, Some(&|d: &Dirty| d.at.elapsed() >= delay), batch);
        }
        Ok(())
    }

    fn read_meta(keyspace: &Keyspace) -> Result<Option<Meta>, EngineError> {
        keyspace
            .get(META)
            .map_err(disk)?
            .map(|bytes| postcard::from_bytes(&bytes).map_err(|e| disk(format!("P: {e}"))))
            .transpose()
    }

    fn load_tenants(keyspace: &Keyspace) -> Result<BTreeMap<TenantId, u64>, EngineError> {
        let mut tenants = BTreeMap::new();
        for item in keyspace.prefix(TENANT) {
            let (key, value) = item.into_inner().map_err(disk)?;
            let name = std::str::from_utf8(&key[TENANT.len()..])
                .map_err(|e| EngineError::Codec(format!("tenant key: {e}")))?;
            let tenant: TenantId = name
                .parse()
                .map_err(|_| EngineError::Codec(format!("tenant key {name:?}")))?;
            let bytes: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| EngineError::Codec("tenant bytes".into()))?;
            tenants.insert(tenant, u64::from_be_bytes(bytes));
        }
        Ok(tenants)
    }
}

/// Where a checkpoint or a v1 snapshot of a partition lies, and its offset.
fn parse_name(path: &Path) -> Option<(i64, Kind)> {
    let name = path.filename()?;
    if let Some(n) = name.strip_suffix(".ckpt") {
        return n.parse().ok().map(|o| (o, Kind::Checkpoint));
    }
    if let Some(n) = name.strip_suffix(".delta") {
        let (to, from) = n.split_once('.')?;
        return Some((
            to.parse().ok()?,
            Kind::Delta {
                from: from.parse().ok()?,
            },
        ));
    }
    name.strip_suffix(".json")
        .and_then(|n| n.parse().ok())
        .map(|o| (o, Kind::V1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Checkpoint,
    /// The keys changed since the checkpoint at `from`.
    Delta {
        from: i64,
    },
    V1,
}

/// An object of a restore: its offset, kind, path and size.
type Stored = (i64, Kind, Path, u64);

/// What a new replica restores: the newest base (a checkpoint or a v1 snapshot)
/// and the deltas that follow it, each from where the one before ends.
async fn newest(
    objects: &dyn ObjectStore,
    prefix: &Path,
) -> Result<Option<(Stored, Vec<Stored>)>, EngineError> {
    let mut listing = objects.list(Some(prefix));
    let mut best: Option<Stored> = None;
    let mut deltas: HashMap<i64, Vec<Stored>> = HashMap::new();
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let Some((offset, kind)) = parse_name(&meta.location) else {
            continue;
        };
        let stored = (offset, kind, meta.location, meta.size);
        match kind {
            Kind::Delta { from } => deltas.entry(from).or_default().push(stored),
            // At one offset a v2 checkpoint wins over a v1 snapshot.
            _ if best.as_ref().is_none_or(|(o, k, ..)| {
                offset > *o || (offset == *o && kind == Kind::Checkpoint && *k == Kind::V1)
            }) =>
            {
                best = Some(stored)
            }
            _ => {}
        }
    }
    let Some(base) = best else {
        return Ok(None);
    };
    let mut chain = Vec::new();
    if base.1 == Kind::Checkpoint {
        let mut end = base.0;
        // Two writers (a replica that lost the partition) may have left two
        // deltas from one checkpoint: the one that goes furthest.
        while let Some(next) = deltas
            .remove(&end)
            .and_then(|d| d.into_iter().filter(|d| d.0 > end).max_by_key(|d| d.0))
        {
            end = next.0;
            chain.push(next);
        }
    }
    Ok(Some((base, chain)))
}

/// v1's snapshot of a partition (ADR 0001): every user in one JSON object.
#[derive(Deserialize)]
struct V1Partition {
    users: BTreeMap<String, crate::index::LegacyUserIndex>,
}

/// Streams a checkpoint into an empty keyspace (a base), or over the state of the
/// checkpoint it follows (a delta, `magic` says which); returns its `P`.
async fn import_checkpoint(
    objects: &dyn ObjectStore,
    path: &Path,
    db: &Database,
    keyspace: &Keyspace,
    magic: &[u8],
) -> Result<Meta, EngineError> {
    let bad = |why: &str| EngineError::Codec(format!("checkpoint {path}: {why}"));
    let mut stream = objects.get(path).await?.into_stream();
    let mut buf = BytesMut::new();
    let mut crc = crc32fast::Hasher::new();
    let mut header = false;
    let mut count = 0u64;
    let mut batch = db.batch();
    let mut batch_bytes = 0usize;
    let mut meta = None;
    loop {
        // Take every complete frame in the buffer.
        loop {
            if !header {
                if buf.len() < magic.len() {
                    break;
                }
                if &buf[..magic.len()] != magic {
                    return Err(bad("not a checkpoint of this kind (or a newer format)"));
                }
                crc.update(&buf[..magic.len()]);
                buf.advance(magic.len());
                header = true;
                continue;
            }
            if buf.len() < 4 {
                break;
            }
            let key_len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if key_len == END_OF_FRAMES {
                if buf.len() < 16 {
                    break;
                }
                let expected_count = u64::from_be_bytes(buf[4..12].try_into().unwrap_or_default());
                let expected_crc = u32::from_be_bytes(buf[12..16].try_into().unwrap_or_default());
                if expected_count != count || expected_crc != crc.clone().finalize() {
                    return Err(bad("damaged (count or checksum differs)"));
                }
                let meta = meta.ok_or_else(|| bad("no P record"))?;
                let encoded = postcard::to_allocvec(&meta).map_err(|e| disk(e.to_string()))?;
                batch.insert(keyspace, META, encoded);
                batch.commit().map_err(disk)?;
                return Ok(meta);
            }
            let key_len = key_len as usize;
            // fjall keys are at most 64 KiB: a longer one is damage, and waiting
            // for it would buffer the rest of the stream.
            if key_len > MAX_KEY {
                return Err(bad("damaged (key length)"));
            }
            if buf.len() < 4 + key_len + 4 {
                break;
            }
            let value_len =
                u32::from_be_bytes(buf[4 + key_len..8 + key_len].try_into().unwrap_or_default())
                    as usize;
            let frame = 8 + key_len + value_len;
            if buf.len() < frame {
                break;
            }
            let frame = buf.split_to(frame).freeze();
            crc.update(&frame);
            count += 1;
            let key = frame.slice(4..4 + key_len);
            let value = frame.slice(8 + key_len..);
            if key.as_ref() == META {
                // Written last, once the whole stream checked out: a keyspace
                // without `P` is never taken for a restored one.
                meta = Some(
                    postcard::from_bytes::<Meta>(&value).map_err(|e| bad(&format!("P: {e}")))?,
                );
                continue;
            }
            batch_bytes += frame.len();
            batch.insert(keyspace, key.to_vec(), value.to_vec());
            if batch_bytes >= 4 * CHUNK {
                std::mem::replace(&mut batch, db.batch())
                    .commit()
                    .map_err(disk)?;
                batch_bytes = 0;
            }
        }
        match stream.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk?),
            None => return Err(bad("truncated")),
        }
    }
}

/// Writes a v1 snapshot's users into an empty keyspace as the state at `next`.
async fn import_v1(
    objects: &dyn ObjectStore,
    path: &Path,
    next: i64,
    db: &Database,
    keyspace: &Keyspace,
) -> Result<Meta, EngineError> {
    let bytes = objects.get(path).await?.bytes().await?;
    let v1: V1Partition = serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::Codec(format!("snapshot {path}: {e}")))?;
    drop(bytes);
    let mut batch = db.batch();
    let users: BTreeMap<String, UserIndex> = v1
        .users
        .into_iter()
        .map(|(key, index)| (key, UserIndex::from(index)))
        .collect();
    for (key, index) in &users {
        // The snapshot holds every record before `next`.
        batch.insert(keyspace, user_key(key), encode_user(next - 1, Some(index))?);
    }
    // Recomputed from the users (older snapshots lack the totals).
    let mut tenants: BTreeMap<TenantId, u64> = BTreeMap::new();
    for (key, index) in &users {
        let tenant = key
            .split_once('/')
            .and_then(|(t, _)| t.parse::<TenantId>().ok())
            .ok_or_else(|| EngineError::Codec(format!("snapshot {path}: user key {key:?}")))?;
        *tenants.entry(tenant).or_default() += index.used_bytes();
    }
    for (tenant, bytes) in &tenants {
        batch.insert(keyspace, tenant_key(tenant), bytes.to_be_bytes().to_vec());
    }
    let meta = Meta { replay_from: next };
    let encoded = postcard::to_allocvec(&meta).map_err(|e| disk(e.to_string()))?;
    batch.insert(keyspace, META, encoded);
    batch.commit().map_err(disk)?;
    tracing::info!(%path, users = users.len(), "index: v1 snapshot imported");
    Ok(meta)
}

/// Reads the keyspace as of `snapshot` (all of it, or `keys` and `P`) into
/// checkpoint chunks, on a blocking thread.
fn export(
    snapshot: fjall::Snapshot,
    keyspace: Keyspace,
    keys: Option<Vec<Vec<u8>>>,
    chunks: tokio::sync::mpsc::Sender<Bytes>,
) -> Result<(), EngineError> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = BytesMut::with_capacity(CHUNK + 1024);
    buf.extend_from_slice(if keys.is_some() {
        DELTA_MAGIC
    } else {
        CHECKPOINT_MAGIC
    });
    let mut count = 0u64;
    let items: Box<dyn Iterator<Item = Result<(fjall::Slice, fjall::Slice), EngineError>>> =
        match keys {
            None => Box::new(
                snapshot
                    .iter(&keyspace)
                    .map(|item| item.into_inner().map_err(disk)),
            ),
            Some(keys) => Box::new(
                keys.into_iter()
                    .chain(std::iter::once(META.to_vec()))
                    .filter_map(|key| match snapshot.get(&keyspace, &key) {
                        Ok(Some(value)) => Some(Ok((fjall::Slice::from(key), value))),
                        Ok(None) => None,
                        Err(e) => Some(Err(disk(e))),
                    }),
            ),
        };
    for item in items {
        let (key, value) = item?;
        let (Ok(key_len), Ok(value_len)) = (u32::try_from(key.len()), u32::try_from(value.len()))
        else {
            return Err(disk("a value over 4 GiB"));
        };
        buf.extend_from_slice(&key_len.to_be_bytes());
        buf.extend_from_slice(&key);
        buf.extend_from_slice(&value_len.to_be_bytes());
        buf.extend_from_slice(&value);
        count += 1;
        if buf.len() >= CHUNK {
            let chunk = buf.split().freeze();
            crc.update(&chunk);
            if chunks.blocking_send(chunk).is_err() {
                return Err(disk("checkpoint upload ended early"));
            }
        }
    }
    crc.update(&buf);
    buf.extend_from_slice(&END_OF_FRAMES.to_be_bytes());
    buf.extend_from_slice(&count.to_be_bytes());
    buf.extend_from_slice(&crc.finalize().to_be_bytes());
    chunks
        .blocking_send(buf.freeze())
        .map_err(|_| disk("checkpoint upload ended early"))
}

/// Runs `work` on a thread of its own at the lowest CPU priority (nice 19, as
/// RocksDB runs its compactions): writes and reads preempt it as soon as they are
/// ready, where on a busy pod a thread of equal priority would hold a core for a
/// whole scheduler slice (tens of ms). The thread ends with `work`, so nothing else
/// runs at that priority.
fn low_priority<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<T>, EngineError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("index-{name}"))
        .spawn(move || {
            // Per thread on Linux; elsewhere the whole process would follow, so not.
            #[cfg(target_os = "linux")]
            if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19)
            {
                tracing::debug!(error = %e, "lowering the priority of a background thread");
            }
            let _ = tx.send(work());
        })
        .map_err(|e| disk(format!("starting the {name} thread: {e}")))?;
    Ok(rx)
}

/// Uploads a checkpoint of the keyspace as `snapshot` has it, named after its
/// `P` (and, for a delta, the checkpoint it follows); after a base, deletes older
/// checkpoints. Returns `P` and the bytes uploaded, or `None` when nothing was
/// ever written back (the log is the whole state).
async fn write_checkpoint(
    snapshot: fjall::Snapshot,
    keyspace: Keyspace,
    upload_kind: Upload,
    objects: Arc<dyn ObjectStore>,
    prefix: Path,
) -> Result<Option<(i64, u64)>, EngineError> {
    let Some(meta) = snapshot
        .get(&keyspace, META)
        .map_err(disk)?
        .map(|b| postcard::from_bytes::<Meta>(&b).map_err(|e| disk(format!("P: {e}"))))
        .transpose()?
    else {
        return Ok(None);
    };
    let next = meta.replay_from;
    // Zero-padded, so names sort by offset.
    let (path, keys) = match upload_kind {
        Upload::Base => (prefix.clone().join(format!("{next:020}.ckpt")), None),
        Upload::Delta { from, keys } => (
            prefix.clone().join(format!("{next:020}.{from:020}.delta")),
            Some(keys),
        ),
    };
    let base = keys.is_none();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let reader = low_priority("checkpoint", move || export(snapshot, keyspace, keys, tx))?;
    let mut upload =
        mailmesh_objstore::object_store::buffered::BufWriter::new(objects.clone(), path.clone());
    let mut uploaded = Ok(());
    let mut bytes = 0u64;
    while let Some(chunk) = rx.recv().await {
        bytes += chunk.len() as u64;
        if let Err(e) = upload.put(chunk).await {
            uploaded = Err(EngineError::from(e));
            break;
        }
    }
    drop(rx);
    let read = reader
        .await
        .map_err(|e| disk(format!("checkpoint reader: {e}")))?;
    if read.is_err() || uploaded.is_err() {
        let _ = upload.abort().await;
        read?;
        uploaded?;
    }
    tokio::io::AsyncWriteExt::shutdown(&mut upload)
        .await
        .map_err(|e| disk(format!("checkpoint upload: {e}")))?;
    if base {
        let mut listing = objects.list(Some(&prefix));
        let mut older = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if parse_name(&meta.location).is_some_and(|(offset, _)| offset <= next)
                && meta.location != path
            {
                older.push(meta.location);
            }
        }
        for old in older {
            objects.delete(&old).await?;
        }
    }
    Ok(Some((next, bytes)))
}

/// Imports a base and the deltas after it into an emptied keyspace. A delta that
/// cannot be read ends the chain before it (the log from the checkpoint before it
/// is replayed instead); a base that cannot be read fails the restore. Returns
/// `P` and the chain the next checkpoint builds on.
async fn restore_chain(
    objects: &Arc<dyn ObjectStore>,
    db: &Arc<IndexDb>,
    keyspace: &Keyspace,
    base: Stored,
    mut deltas: Vec<Stored>,
) -> Result<(Meta, Chain), EngineError> {
    loop {
        keyspace.clear().map_err(disk)?;
        let (offset, kind, path, size) = &base;
        let imported = match kind {
            Kind::V1 => import_v1(&**objects, path, *offset, &db.db, keyspace).await,
            _ => import_checkpoint(&**objects, path, &db.db, keyspace, CHECKPOINT_MAGIC).await,
        };
        let mut meta = match imported {
            Ok(meta) => meta,
            Err(e) => {
                // No `P` was written; leave nothing half imported either.
                keyspace.clear().map_err(disk)?;
                return Err(e);
            }
        };
        if meta.replay_from != *offset {
            keyspace.clear().map_err(disk)?;
            return Err(EngineError::Codec(format!(
                "checkpoint {path} replays from {} (its name says {offset})",
                meta.replay_from
            )));
        }
        let mut chain = Chain {
            // A v1 snapshot is followed by a v2 base.
            end: (*kind == Kind::Checkpoint).then_some(*offset),
            base_bytes: *size,
            delta_bytes: 0,
            deltas: 0,
        };
        let mut broken = None;
        for (i, (to, _, path, size)) in deltas.iter().enumerate() {
            match import_checkpoint(&**objects, path, &db.db, keyspace, DELTA_MAGIC).await {
                Ok(m) if m.replay_from == *to => {
                    meta = m;
                    chain.end = Some(*to);
                    chain.delta_bytes += size;
                    chain.deltas += 1;
                }
                outcome => {
                    tracing::warn!(%path, error = ?outcome.err(), "index: a checkpoint delta cannot be read; the log is replayed from the one before");
                    broken = Some(i);
                    break;
                }
            }
        }
        match broken {
            // Half a delta may be in the keyspace: again, without it.
            Some(i) => deltas.truncate(i),
            None => return Ok((meta, chain)),
        }
    }
}

impl StateMachine for PartitionIndex {
    type Command = PartitionCommand;
    type Outcome = IndexOutcome;
    type Change = MailboxEvent;
    type Store = Arc<IndexDb>;

    fn apply(
        &mut self,
        command: PartitionCommand,
        at_ms: i64,
        offset: i64,
        changes: &mut Vec<MailboxEvent>,
    ) -> Result<Result<IndexOutcome, StorageError>, EngineError> {
        let (user, command) = match command {
            PartitionCommand::User {
                user,
                limits,
                command,
                request,
            } => (user, Some((limits, command, request))),
            PartitionCommand::Forget { user } => (user, None),
        };
        let key = user.key();
        let mut entry = self.take(&key)?;
        if entry.applied >= offset {
            // Replayed after a restart: the user as written back has it already.
            self.db.cache().insert((self.partition, key), entry);
            return Ok(Ok(IndexOutcome::Done));
        }
        let before = entry.used();
        let had_index = entry.index.is_some();
        let outcome = match command {
            Some((limits, command, request)) => {
                let mut index = entry
                    .index
                    .take()
                    .map(|i| Arc::try_unwrap(i).unwrap_or_else(|shared| (*shared).clone()))
                    .unwrap_or_default();
                let mut raw = Vec::new();
                let outcome = index.apply_request(request, command, at_ms, &limits, &mut raw);
                changes.extend(raw.into_iter().map(|change| MailboxEvent {
                    user: user.clone(),
                    change,
                    position: offset + 1,
                }));
                // A refused command may still have tidied an existing user (expired
                // delivery keys): kept, as every replica keeps it. A user it would
                // have created (or brought back after Forget) stays absent.
                if outcome.is_ok() || had_index {
                    entry.index = Some(Arc::new(index));
                }
                outcome
            }
            None => {
                entry.index = None;
                Ok(IndexOutcome::Done)
            }
        };
        let after = entry.used();
        if after != before {
            let total = self.tenant_bytes.entry(user.tenant.clone()).or_default();
            *total = total.saturating_add(after).saturating_sub(before);
        }
        if outcome.is_ok() || had_index {
            self.put_changed(key, &user.tenant, entry, offset);
        } else if entry.applied >= 0 || entry.dirty {
            // A forgotten user's marker, unchanged.
            self.db.cache().insert((self.partition, key), entry);
        }
        Ok(outcome)
    }

    fn applied(&mut self, next: i64) -> Result<(), EngineError> {
        self.write_back_due(next)
    }

    fn maintain(&mut self, next: i64) -> Result<(), EngineError> {
        if !self.written(false)? {
            return Ok(());
        }
        if self.dirty.is_empty() {
            // Barriers and refused commands move `P` too, so the log to replay
            // (and to retain) stays short on a partition without changes.
            return self.write_back(next, None, 0);
        }
        self.write_back_due(next)
    }

    async fn restore(
        db: &Arc<IndexDb>,
        objects: &Arc<dyn ObjectStore>,
        config: &ReplicaConfig,
        prefix: &Path,
    ) -> Result<(Self, i64), EngineError> {
        // Another replica may replace the newest checkpoint (and delete this one)
        // between the listing and the read: then list again.
        let mut attempts = 0;
        loop {
            match Self::try_restore(db, objects, config, prefix).await {
                Err(EngineError::Objects(mailmesh_objstore::object_store::Error::NotFound {
                    ..
                })) if attempts < 5 => attempts += 1,
                other => return other,
            }
        }
    }

    fn checkpoint(
        &mut self,
        _next: i64,
        objects: Arc<dyn ObjectStore>,
        prefix: Path,
    ) -> Result<BoxFuture<'static, Result<(), EngineError>>, EngineError> {
        // What is written back, with its `P`: dirty users stay in the cache and the
        // log from `P` has their changes. Nothing is written here, so no request
        // waits. A delta carries the keys written back since the last checkpoint;
        // a base (the first after a start, after a failed upload, or when the
        // deltas grow) everything.
        let chain = self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let upload = match chain.end {
            // `P` has not moved: the next checkpoint takes these changes too.
            Some(end) if end == self.persisted_from => return Ok(Box::pin(async { Ok(()) })),
            Some(from)
                if chain.deltas < MAX_DELTAS
                    && chain.delta_bytes.saturating_mul(4) < chain.base_bytes =>
            {
                Upload::Delta {
                    from,
                    keys: std::mem::take(&mut self.changed).into_iter().collect(),
                }
            }
            _ => {
                self.changed.clear();
                Upload::Base
            }
        };
        let snapshot = self.db.db.snapshot();
        let keyspace = self.keyspace.clone();
        let shared = self.chain.clone();
        Ok(Box::pin(async move {
            let delta = matches!(upload, Upload::Delta { .. });
            let written = write_checkpoint(snapshot, keyspace, upload, objects, prefix).await;
            let mut chain = shared.lock().unwrap_or_else(|e| e.into_inner());
            match &written {
                Ok(Some((end, bytes))) if delta => {
                    chain.end = Some(*end);
                    chain.delta_bytes += bytes;
                    chain.deltas += 1;
                }
                Ok(Some((end, bytes))) => {
                    *chain = Chain {
                        end: Some(*end),
                        base_bytes: *bytes,
                        delta_bytes: 0,
                        deltas: 0,
                    }
                }
                Ok(None) => {}
                // The changes it carried are in no checkpoint: the next is a base.
                Err(_) => *chain = Chain::default(),
            }
            written.map(|_| ())
        }))
    }
}

impl PartitionIndex {
    async fn try_restore(
        db: &Arc<IndexDb>,
        objects: &Arc<dyn ObjectStore>,
        config: &ReplicaConfig,
        prefix: &Path,
    ) -> Result<(Self, i64), EngineError> {
        let name = IndexDb::keyspace_name(config);
        if !db
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone())
        {
            // A replica that failed to start may still be winding down.
            return Err(EngineError::Unavailable(format!(
                "index partition {name} is still open; retry"
            )));
        }
        let claim = Claim {
            db: db.clone(),
            name,
        };
        let keyspace = db.keyspace(config)?;
        let local = Self::read_meta(&keyspace)?;
        let stored = newest(&**objects, prefix).await?;
        let stored_end = stored
            .as_ref()
            .map(|(base, deltas)| deltas.last().map_or(base.0, |d| d.0));
        // The local store, unless a checkpoint is more than `MAX_REPLAY` ahead of
        // it (replaying that much is cheaper than a download, and the log from the
        // local `P` is still retained: it is younger than a checkpoint interval).
        let local =
            local.filter(|l| stored_end.is_none_or(|end| end <= l.replay_from + MAX_REPLAY));
        let mut chain = Chain::default();
        let meta = match (local, stored) {
            (Some(local), _) => local,
            (None, Some((base, deltas))) => {
                let started = std::time::Instant::now();
                let (meta, restored) = restore_chain(objects, db, &keyspace, base, deltas).await?;
                tracing::info!(
                    checkpoints = restored.deltas + 1,
                    replay_from = meta.replay_from,
                    seconds = started.elapsed().as_secs_f64(),
                    "index: checkpoint restored"
                );
                chain = restored;
                meta
            }
            (None, None) => Meta { replay_from: 0 },
        };
        let tenant_bytes = Self::load_tenants(&keyspace)?;
        Ok((
            Self {
                db: db.clone(),
                keyspace,
                partition: config.partition,
                tenant_persisted: tenant_bytes.clone(),
                tenant_bytes,
                dirty: HashMap::new(),
                dirty_order: BTreeSet::new(),
                persisted_from: meta.replay_from,
                changed: BTreeSet::new(),
                chain: Arc::new(Mutex::new(chain)),
                writing: None,
                claim: Arc::new(claim),
            },
            meta.replay_from,
        ))
    }
}

/// Encodes and commits a batch: its users, tenants' totals and `P`, atomically.
fn commit(db: &IndexDb, keyspace: &Keyspace, batch: &Batch) -> Result<(), EngineError> {
    let mut write = db.db.batch();
    for (key, applied, index, _) in &batch.users {
        write.insert(
            keyspace,
            user_key(key),
            encode_user(*applied, index.as_deref())?,
        );
    }
    for tenant in &batch.tenants {
        let total = batch.persisted.get(tenant).copied().unwrap_or(0);
        write.insert(keyspace, tenant_key(tenant), total.to_be_bytes().to_vec());
    }
    let meta = postcard::to_allocvec(&Meta {
        replay_from: batch.replay_from,
    })
    .map_err(|e| disk(e.to_string()))?;
    write.insert(keyspace, META, meta);
    write.commit().map_err(disk)
}

impl Drop for PartitionIndex {
    fn drop(&mut self) {
        let mut cache = self.db.cache();
        let mine: Vec<CacheKey> = cache
            .users
            .keys()
            .filter(|(p, _)| *p == self.partition)
            .cloned()
            .collect();
        for key in mine {
            cache.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::UserId;
    use crate::engine::UserRef;
    use crate::index::{Flags, IndexCommand, IndexLimits, NewMessage};

    const T0: i64 = 1_780_000_000_000;
    /// Longer than any test: write-backs come from memory pressure and the tests.
    const DELAY: Duration = Duration::from_secs(3600);

    fn config() -> ReplicaConfig {
        ReplicaConfig {
            log: "mailboxes",
            topic: "test.mailboxes".into(),
            partition: 3,
            snapshot_every: 1000,
            snapshot_interval: std::time::Duration::from_secs(60),
            write_timeout: std::time::Duration::from_secs(5),
        }
    }

    fn prefix() -> Path {
        Path::from("index/test.mailboxes/3")
    }

    /// A user with the default mailboxes.
    fn initialised_user() -> UserIndex {
        let mut index = UserIndex::default();
        index
            .apply(
                IndexCommand::Init,
                T0,
                &IndexLimits::default(),
                &mut Vec::new(),
            )
            .unwrap();
        index
    }

    /// A user written in format 2 (no remembered requests) is read and converted;
    /// what is written now is format 3.
    #[test]
    fn users_of_format_2_are_read() {
        let index = initialised_user();
        let mut old = serde_json::to_value(&index).unwrap();
        old.as_object_mut().unwrap().remove("requests");
        let old: crate::index::UserIndexFormat2 = serde_json::from_value(old).unwrap();
        let bytes = postcard::to_extend(
            &StoredUser {
                applied: 42,
                index: Some(old),
            },
            vec![2],
        )
        .unwrap();
        let read = decode_user(&bytes).unwrap();
        assert_eq!(read.applied, 42);
        assert_eq!(read.index.unwrap(), index);
        // Written back, it is format 3, and read as such.
        let bytes = encode_user(42, Some(&index)).unwrap();
        assert_eq!(bytes[0], USER_FORMAT);
        assert_eq!(decode_user(&bytes).unwrap().index.unwrap(), index);
    }

    /// A user written in format 1 (subscriptions a flag on each mailbox) is read
    /// and converted.
    #[test]
    fn users_of_format_1_are_read() {
        let index = initialised_user();
        let mut old = serde_json::to_value(&index).unwrap();
        old.as_object_mut().unwrap().remove("subscriptions");
        for (_, m) in old["mailboxes"].as_object_mut().unwrap() {
            let subscribed = m["name"] == "INBOX";
            m.as_object_mut()
                .unwrap()
                .insert("subscribed".into(), subscribed.into());
        }
        let legacy: crate::index::LegacyUserIndex = serde_json::from_value(old).unwrap();
        let bytes = postcard::to_extend(
            &StoredUser {
                applied: 41,
                index: Some(legacy),
            },
            vec![1],
        )
        .unwrap();
        let read = decode_user(&bytes).unwrap();
        assert_eq!(read.applied, 41);
        let read = read.index.unwrap();
        assert!(read.is_subscribed("INBOX") && !read.is_subscribed("Sent"));
        assert_eq!(read.mailboxes().count(), 6);
        let now = encode_user(41, Some(&read)).unwrap();
        assert_eq!(now[0], USER_FORMAT);
        assert_eq!(decode_user(&now).unwrap().index.unwrap(), read);
        assert!(
            decode_user(&[USER_FORMAT + 1, 0]).is_err(),
            "a newer format is refused"
        );
    }

    fn objects(dir: &FsPath) -> Arc<dyn ObjectStore> {
        mailmesh_objstore::open(&mailmesh_objstore::ObjectStoreConfig::Local(
            mailmesh_objstore::LocalConfig {
                dir: dir.join("objects"),
            },
        ))
        .unwrap()
    }

    async fn open(db: &Arc<IndexDb>, objects: &Arc<dyn ObjectStore>) -> (PartitionIndex, i64) {
        PartitionIndex::restore(db, objects, &config(), &prefix())
            .await
            .unwrap()
    }

    /// The commands of a small workload: users in two tenants, messages, flag
    /// changes, an expunge and a forgotten user.
    fn workload(users: &[UserRef], messages: usize) -> Vec<PartitionCommand> {
        let limits = IndexLimits::default();
        let user = |user: &UserRef, command| PartitionCommand::User {
            user: user.clone(),
            limits,
            command,
            request: None,
        };
        let mut commands = Vec::new();
        for u in users {
            commands.push(user(u, IndexCommand::Init));
        }
        for i in 0..messages {
            for (n, u) in users.iter().enumerate() {
                commands.push(user(
                    u,
                    IndexCommand::Append {
                        mailbox: crate::index::INBOX.into(),
                        message: NewMessage {
                            object: format!("1/cur/{n}-{i}-a-rather-long-object-name"),
                            size: 1000 + i as u64,
                            internal_date_ms: T0,
                            flags: Flags::default(),
                        },
                        delivery_key: Some(format!("q{i}:{n}")),
                        quota_bytes: None,
                    },
                ));
            }
        }
        for u in users {
            commands.push(user(
                u,
                IndexCommand::Store {
                    mailbox: crate::index::INBOX.into(),
                    uids: vec![crate::index::UidRange { first: 1, last: 2 }],
                    action: crate::index::StoreAction::Add,
                    flags: Flags {
                        deleted: true,
                        ..Flags::default()
                    },
                    unchanged_since: None,
                },
            ));
            commands.push(user(
                u,
                IndexCommand::Expunge {
                    mailbox: crate::index::INBOX.into(),
                    uids: None,
                },
            ));
        }
        commands.push(PartitionCommand::Forget {
            user: users[0].clone(),
        });
        commands
    }

    /// More of the workload for users that exist already (no Init, no Forget).
    fn more(users: &[UserRef], messages: usize) -> Vec<PartitionCommand> {
        workload(users, messages)
            .into_iter()
            .filter(|c| {
                !matches!(
                    c,
                    PartitionCommand::Forget { .. }
                        | PartitionCommand::User {
                            command: IndexCommand::Init,
                            ..
                        }
                )
            })
            .collect()
    }

    fn users(n: usize) -> Vec<UserRef> {
        (0..n)
            .map(|i| UserRef {
                tenant: if i % 2 == 0 { "acme" } else { "globex" }.parse().unwrap(),
                user: UserId(uuid::Uuid::from_u128(i as u128 + 1)),
            })
            .collect()
    }

    /// What every user's index must be: the commands applied to plain maps.
    fn oracle(commands: &[PartitionCommand]) -> BTreeMap<String, UserIndex> {
        oracle_from(BTreeMap::new(), commands, 0)
    }

    /// `users` after `commands`, the first of which is record `first`.
    fn oracle_from(
        mut users: BTreeMap<String, UserIndex>,
        commands: &[PartitionCommand],
        first: usize,
    ) -> BTreeMap<String, UserIndex> {
        for (i, command) in commands.iter().enumerate().map(|(i, c)| (i + first, c)) {
            match command.clone() {
                PartitionCommand::User {
                    user,
                    limits,
                    command,
                    request,
                } => {
                    let _ = users.entry(user.key()).or_default().apply_request(
                        request,
                        command,
                        T0 + i as i64,
                        &limits,
                        &mut Vec::new(),
                    );
                }
                PartitionCommand::Forget { user } => {
                    users.remove(&user.key());
                }
            }
        }
        users
    }

    /// Applies `commands[from..]` as the records at their index in the log.
    fn apply_all(index: &mut PartitionIndex, commands: &[PartitionCommand], from: usize) {
        for (i, command) in commands.iter().enumerate().skip(from) {
            index
                .apply(command.clone(), T0 + i as i64, i as i64, &mut Vec::new())
                .unwrap()
                .ok();
            index.applied(i as i64 + 1).unwrap();
        }
    }

    fn assert_same(
        index: &PartitionIndex,
        users: &[UserRef],
        oracle: &BTreeMap<String, UserIndex>,
    ) {
        for u in users {
            let key = u.key();
            assert_eq!(
                index.user(&key).unwrap().as_deref(),
                oracle.get(&key),
                "user {key}"
            );
        }
        for tenant in ["acme", "globex"] {
            let tenant: TenantId = tenant.parse().unwrap();
            let expected: u64 = users
                .iter()
                .filter(|u| u.tenant == tenant)
                .filter_map(|u| oracle.get(&u.key()))
                .map(UserIndex::used_bytes)
                .sum();
            assert_eq!(index.tenant_bytes(&tenant), expected, "{tenant}");
        }
    }

    /// With a cache far smaller than the index, every user reads back as the
    /// commands made them, and memory stays within the budget.
    #[tokio::test]
    async fn a_small_cache_gives_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let objects = objects(dir.path());
        let budget = 1 << 20;
        let db = IndexDb::open(Some(&dir.path().join("index")), budget, DELAY).unwrap();
        let (mut index, next) = open(&db, &objects).await;
        assert_eq!(next, 0);
        let users = users(150);
        let commands = workload(&users, 80);
        apply_all(&mut index, &commands, 0);
        let oracle = oracle(&commands);
        let total: usize = oracle.values().map(UserIndex::approx_heap_bytes).sum();
        assert!(
            total > 2 * budget as usize,
            "the index ({total} B) outgrows the cache"
        );
        assert_same(&index, &users, &oracle);
        assert!(
            db.cached_bytes() <= budget as usize,
            "{} B cached over a {budget} B budget",
            db.cached_bytes()
        );
        assert!(index.user(&users[0].key()).unwrap().is_none(), "forgotten");
    }

    /// A batch written back outside the apply lock: users changed while it is
    /// written stay dirty (their later changes are not taken for written), the
    /// tenants' totals and `P` follow it, and a restart on the same disk gives
    /// the state as applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_while_a_batch_is_written_stay_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let objects = objects(dir.path());
        let users = users(12);
        let first = workload(&users, 20);
        let mut log = first.clone();
        log.extend(more(&users[..6], 5));
        let n = first.len() as i64;
        let local = dir.path().join("index");
        {
            let db = IndexDb::open(Some(&local), 64 << 20, DELAY).unwrap();
            let (mut index, _) = open(&db, &objects).await;
            apply_all(&mut index, &first, 0);
            let dirty_before = index.dirty.len();
            index.start_write_back(n, None, usize::MAX).unwrap();
            assert!(index.writing.is_some());
            // Half the users change while the batch is written.
            apply_all(&mut index, &log, first.len());
            assert!(index.written(true).unwrap());
            let still: BTreeSet<&String> = index.dirty.keys().collect();
            assert!(
                !still.is_empty() && still.len() < dirty_before,
                "{} of {dirty_before} dirty",
                still.len()
            );
            assert!(index.dirty.values().all(|d| d.since >= n));
            assert_eq!(index.persisted_from, n, "P once the batch is in");
        }
        // Only the batch reached the disk: a restart replays from `n`.
        let db = IndexDb::open(Some(&local), 64 << 20, DELAY).unwrap();
        let (mut index, next) = open(&db, &objects).await;
        assert_eq!(next, n);
        apply_all(&mut index, &log, next as usize);
        assert_same(&index, &users, &oracle(&log));
        index
            .write_back(log.len() as i64, None, usize::MAX)
            .unwrap();
        assert_eq!(index.tenant_persisted, index.tenant_bytes);
    }

    /// A restart replays the log from the local store's `P`, and each user skips
    /// what it holds already; a new replica (no local store) restores the
    /// checkpoint taken while the partition kept applying; a damaged checkpoint is
    /// refused; a v1 JSON snapshot is imported.
    #[tokio::test]
    async fn restart_checkpoint_and_v1_import() {
        let dir = tempfile::tempdir().unwrap();
        let objects = objects(dir.path());
        let users = users(20);
        let first = workload(&users, 30);
        // The whole log: `first`, then more for every user.
        let mut log = first.clone();
        log.extend(more(&users, 5));
        let n = first.len() as i64;
        let local = dir.path().join("index");
        {
            let db = IndexDb::open(Some(&local), 1 << 20, DELAY).unwrap();
            let (mut index, _) = open(&db, &objects).await;
            apply_all(&mut index, &log[..first.len()], 0);
            index.write_back(n, None, usize::MAX).unwrap();
            // A checkpoint at `n`, taken while the partition goes on.
            let job = index.checkpoint(n, objects.clone(), prefix()).unwrap();
            apply_all(&mut index, &log, first.len());
            job.await.unwrap();
            // Only acme's users are written back before the crash: `P` stays at
            // globex's first change after `n`.
            let acme: TenantId = "acme".parse().unwrap();
            index
                .write_back(
                    log.len() as i64,
                    Some(&|d: &Dirty| d.tenant == acme),
                    usize::MAX,
                )
                .unwrap();
        }
        // Restart on the same disk: replay from `P`; acme's users skip it.
        let db = IndexDb::open(Some(&local), 1 << 20, DELAY).unwrap();
        let (mut index, next) = open(&db, &objects).await;
        assert!(next >= n && next < log.len() as i64, "replays from {next}");
        apply_all(&mut index, &log, next as usize);
        assert_same(&index, &users, &oracle(&log));
        // A partition has one live index at a time.
        assert!(
            PartitionIndex::restore(&db, &objects, &config(), &prefix())
                .await
                .is_err()
        );
        // With nothing dirty, `P` follows the log (barriers, refusals) on its own.
        index
            .write_back(log.len() as i64, None, usize::MAX)
            .unwrap();
        index.maintain(log.len() as i64 + 5).unwrap();
        assert_eq!(
            PartitionIndex::read_meta(&index.keyspace)
                .unwrap()
                .unwrap()
                .replay_from,
            log.len() as i64 + 5
        );
        drop(index);
        drop(db);

        // A new pod: the checkpoint at `n`, then the log after it.
        let db = IndexDb::open(None, 1 << 20, DELAY).unwrap();
        let (mut index, next) = open(&db, &objects).await;
        assert_eq!(next, n);
        assert_same(&index, &users, &oracle(&first));
        apply_all(&mut index, &log, next as usize);
        assert_same(&index, &users, &oracle(&log));
        let listed: Vec<_> =
            futures::TryStreamExt::try_collect::<Vec<_>>(objects.list(Some(&prefix())))
                .await
                .unwrap();
        assert_eq!(listed.len(), 1, "older checkpoints are deleted");
        drop(index);

        // A damaged checkpoint is refused, never half loaded.
        let path = prefix().join(format!("{n:020}.ckpt"));
        let mut bytes = objects
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        objects.put(&path, bytes.into()).await.unwrap();
        let db = IndexDb::open(None, 1 << 20, DELAY).unwrap();
        let refused = PartitionIndex::restore(&db, &objects, &config(), &prefix()).await;
        assert!(
            matches!(refused, Err(EngineError::Codec(_))),
            "damaged checkpoint loaded"
        );
        // Nothing half imported is left to be taken for a restored store.
        let keyspace = db.keyspace(&config()).unwrap();
        assert!(PartitionIndex::read_meta(&keyspace).unwrap().is_none());
        assert!(keyspace.is_empty().unwrap());
        // A frame claiming a 4 GiB key is refused at once, not buffered for.
        let mut forged = CHECKPOINT_MAGIC.to_vec();
        forged.extend_from_slice(&(u32::MAX - 1).to_be_bytes());
        forged.extend_from_slice(&[0; 64]);
        objects.put(&path, forged.into()).await.unwrap();
        let refused = PartitionIndex::restore(&db, &objects, &config(), &prefix()).await;
        assert!(
            matches!(&refused, Err(EngineError::Codec(m)) if m.contains("key length")),
            "forged key length"
        );
        objects.delete(&path).await.unwrap();

        // v1: the whole partition as JSON at offset `half`.
        let half = first.len() / 2;
        let v1_state = oracle(&first[..half]);
        let mut tenant_bytes: BTreeMap<String, u64> = BTreeMap::new();
        for u in &users {
            if let Some(i) = v1_state.get(&u.key()) {
                *tenant_bytes.entry(u.tenant.to_string()).or_default() += i.used_bytes();
            }
        }
        // As v1 wrote users: subscriptions as mailbox flags, nothing about \Recent.
        let legacy: BTreeMap<String, serde_json::Value> = v1_state
            .iter()
            .map(|(k, i)| (k.clone(), crate::index::legacy_json(i)))
            .collect();
        let v1 = serde_json::json!({ "users": legacy, "tenant_bytes": tenant_bytes });
        objects
            .put(
                &prefix().join(format!("{half:020}.json")),
                serde_json::to_vec(&v1).unwrap().into(),
            )
            .await
            .unwrap();
        let db = IndexDb::open(None, 1 << 20, DELAY).unwrap();
        let (mut index, next) = open(&db, &objects).await;
        assert_eq!(next, half as i64);
        apply_all(&mut index, &log, half);
        // What the import makes of them (the same subscriptions; no message
        // recent), then the rest of the log.
        let imported: BTreeMap<String, UserIndex> = legacy
            .into_iter()
            .map(|(k, v)| {
                let old: crate::index::LegacyUserIndex = serde_json::from_value(v).unwrap();
                (k, UserIndex::from(old))
            })
            .collect();
        assert_same(&index, &users, &oracle_from(imported, &log[half..], half));
    }

    async fn listed(objects: &Arc<dyn ObjectStore>) -> Vec<(String, u64)> {
        let mut listed: Vec<(String, u64)> =
            futures::TryStreamExt::try_collect::<Vec<_>>(objects.list(Some(&prefix())))
                .await
                .unwrap()
                .into_iter()
                .map(|m| (m.location.filename().unwrap_or_default().to_owned(), m.size))
                .collect();
        listed.sort();
        listed
    }

    /// Checkpoints after the first carry only the users written back since the one
    /// before (deltas); a new replica restores the base and the deltas in order; a
    /// missing or damaged delta ends the chain before it and the log is replayed
    /// from there; a replica that starts on its own disk writes a base again, which
    /// replaces the chain.
    #[tokio::test]
    async fn incremental_checkpoints_restore_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let objects = objects(dir.path());
        let users = users(40);
        let mut log = workload(&users, 20);
        let local = dir.path().join("index");
        let db = IndexDb::open(Some(&local), 1 << 20, DELAY).unwrap();
        let (mut index, _) = open(&db, &objects).await;
        // Applies the log up to `to`, writes everything back and checkpoints.
        let mut done = 0;
        let mut step = async |index: &mut PartitionIndex, log: &[PartitionCommand], to: usize| {
            apply_all(index, &log[..to], done);
            done = to;
            index.write_back(to as i64, None, usize::MAX).unwrap();
            index
                .checkpoint(to as i64, objects.clone(), prefix())
                .unwrap()
                .await
                .unwrap();
        };
        let base_at = log.len();
        step(&mut index, &log, base_at).await;
        // Then two users change, then one.
        let more = |u: &UserRef, i: usize| PartitionCommand::User {
            user: u.clone(),
            request: None,
            limits: IndexLimits::default(),
            command: IndexCommand::Append {
                mailbox: crate::index::INBOX.into(),
                message: NewMessage {
                    object: format!("1/cur/late-{i}"),
                    size: 10,
                    internal_date_ms: T0,
                    flags: Flags::default(),
                },
                delivery_key: None,
                quota_bytes: None,
            },
        };
        for i in 0..10 {
            log.push(more(&users[1 + i % 2], i));
        }
        let first_delta = log.len();
        step(&mut index, &log, first_delta).await;
        for i in 10..15 {
            log.push(more(&users[3], i));
        }
        let second_delta = log.len();
        step(&mut index, &log, second_delta).await;
        // Nothing new: no checkpoint is written.
        step(&mut index, &log, second_delta).await;
        drop(index);
        let objects_now = listed(&objects).await;
        let names: Vec<&str> = objects_now.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                format!("{base_at:020}.ckpt"),
                format!("{first_delta:020}.{base_at:020}.delta"),
                format!("{second_delta:020}.{first_delta:020}.delta"),
            ],
            "a base and two deltas"
        );
        let (base_size, delta_size) = (objects_now[0].1, objects_now[1].1);
        assert!(
            delta_size * 10 < base_size,
            "a delta of two users ({delta_size} B) is a fraction of the base ({base_size} B)"
        );
        // The rest of the log, for every replay below.
        for i in 15..20 {
            log.push(more(&users[5], i));
        }
        let expected = oracle(&log);

        // A new pod: base, both deltas, the log after the last.
        let fresh = async |log: &[PartitionCommand]| {
            let db = IndexDb::open(None, 1 << 20, DELAY).unwrap();
            let (mut index, next) = open(&db, &objects).await;
            apply_all(&mut index, log, next as usize);
            (index, next)
        };
        let (index, next) = fresh(&log).await;
        assert_eq!(next, second_delta as i64);
        assert_same(&index, &users, &expected);
        drop(index);
        // The last delta lost: the chain ends at the first.
        let last = prefix().join(format!("{second_delta:020}.{first_delta:020}.delta"));
        let kept = objects.get(&last).await.unwrap().bytes().await.unwrap();
        objects.delete(&last).await.unwrap();
        let (index, next) = fresh(&log).await;
        assert_eq!(next, first_delta as i64);
        assert_same(&index, &users, &expected);
        drop(index);
        // The first damaged: only the base is used.
        objects.put(&last, kept.into()).await.unwrap();
        let first = prefix().join(format!("{first_delta:020}.{base_at:020}.delta"));
        let mut bytes = objects
            .get(&first)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        objects.put(&first, bytes.into()).await.unwrap();
        let (index, next) = fresh(&log).await;
        assert_eq!(next, base_at as i64);
        assert_same(&index, &users, &expected);
        drop(index);

        // The first replica again, on its disk: its next checkpoint is a base,
        // and the chain before it goes.
        let (mut index, next) = open(&db, &objects).await;
        apply_all(&mut index, &log, next as usize);
        index
            .write_back(log.len() as i64, None, usize::MAX)
            .unwrap();
        index
            .checkpoint(log.len() as i64, objects.clone(), prefix())
            .unwrap()
            .await
            .unwrap();
        let names: Vec<String> = listed(&objects).await.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, [format!("{:020}.ckpt", log.len())]);
        assert_same(&index, &users, &expected);
    }
}
