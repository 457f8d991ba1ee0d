//! A replicated state machine over one partition of a command log.
//!
//! Every replica reads the partition from its latest snapshot and applies each
//! command in log order, so all replicas hold the same state. A write publishes a
//! command and gets the outcome of applying it; the outcome is computed by the
//! apply, not by the writer (docs/adr/0001-mailbox-index.md). When the produce ack
//! shows the record landed right after everything this replica has applied, the
//! writer applies it at once (the same outcome the log order gives, without waiting
//! for the reader to fetch it back: ~250 ms on tansu); else the reader applies it
//! (docs/adr/0005-storage-v2.md, §2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use mailmesh_queue::{OutgoingRecord, PartitionReader, Queue};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch};

use crate::{EngineError, StorageError};

/// State that a command log drives.
pub trait StateMachine: Send + Sync + Sized + 'static {
    type Command: Serialize + DeserializeOwned + Send + Sync;
    type Outcome: Send + 'static;
    type Change: Clone + Send + 'static;
    /// Where the state is kept besides object storage (the replica's index
    /// database), or `()`.
    type Store: Send + Sync + 'static;

    /// Deterministic: the same state, command and time give the same result. The
    /// outer error is a local failure (the disk): the command was not applied, and
    /// the partition stops rather than fork.
    /// `offset` is the record's place in the log.
    fn apply(
        &mut self,
        command: Self::Command,
        at_ms: i64,
        offset: i64,
        changes: &mut Vec<Self::Change>,
    ) -> Result<Result<Self::Outcome, StorageError>, EngineError>;

    /// After every applied record (barriers too), with the apply lock held:
    /// everything before `next` is applied.
    fn applied(&mut self, _next: i64) -> Result<(), EngineError> {
        Ok(())
    }

    /// Every second or so, with the apply lock held, whether records came or not
    /// (time-based write-back).
    fn maintain(&mut self, _next: i64) -> Result<(), EngineError> {
        Ok(())
    }

    /// The newest state kept, and the first offset to apply to it.
    fn restore(
        store: &Self::Store,
        objects: &Arc<dyn ObjectStore>,
        config: &ReplicaConfig,
        prefix: &Path,
    ) -> impl std::future::Future<Output = Result<(Self, i64), EngineError>> + Send;

    /// Called with the apply lock held: prepares a checkpoint of the state as of
    /// `next` and returns the work that writes it, run without the lock.
    fn checkpoint(
        &mut self,
        next: i64,
        objects: Arc<dyn ObjectStore>,
        prefix: Path,
    ) -> Result<BoxFuture<'static, Result<(), EngineError>>, EngineError>;
}

/// A state kept whole as one JSON snapshot in object storage (ADR 0001): for small
/// states (the directory).
pub trait JsonState: Default + Serialize + DeserializeOwned + Send + Sync + 'static {}

/// Loads the newest JSON snapshot (for [`StateMachine::restore`]).
pub async fn restore_json<S: JsonState>(
    objects: &Arc<dyn ObjectStore>,
    prefix: &Path,
) -> Result<(S, i64), EngineError> {
    load_snapshot::<S>(&**objects, prefix).await
}

/// Serialises the state now and returns the upload (for
/// [`StateMachine::checkpoint`]).
pub fn checkpoint_json<S: JsonState>(
    state: &S,
    next: i64,
    objects: Arc<dyn ObjectStore>,
    prefix: Path,
) -> Result<BoxFuture<'static, Result<(), EngineError>>, EngineError> {
    let body = serde_json::to_vec(state).map_err(|e| EngineError::Codec(e.to_string()))?;
    Ok(Box::pin(async move {
        // Zero-padded, so names sort by offset.
        let path = prefix.clone().join(format!("{next:020}.json"));
        objects.put(&path, PutPayload::from(body)).await?;
        let older: Vec<Path> = objects
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_filter(|l| futures::future::ready(*l < path))
            .try_collect()
            .await?;
        for old in older {
            objects.delete(&old).await?;
        }
        Ok(())
    }))
}

/// One log record.
#[derive(Serialize, Deserialize)]
struct Entry<C> {
    /// Matches the outcome to the waiting writer.
    id: uuid::Uuid,
    at_ms: i64,
    /// `None` is a barrier: it changes nothing, and reading up to it proves this
    /// replica has seen everything written before it.
    command: Option<C>,
}

/// Appends `command` to a partition's log without applying it here: for a replica
/// that does not apply that partition (its owner does, with the outcome every
/// replica would compute). Returns once the record is durable, with its offset.
pub async fn append_only<C: Serialize>(
    queue: &dyn Queue,
    topic: &str,
    partition: i32,
    command: C,
) -> Result<i64, EngineError> {
    let (_, payload) = encode_entry(Some(command))?;
    Ok(append(queue, topic, partition, payload).await?.offset)
}

/// A log record for `command` (`None`: a barrier), and the id its outcome is
/// matched by.
fn encode_entry<C: Serialize>(command: Option<C>) -> Result<(uuid::Uuid, Bytes), EngineError> {
    let entry = Entry {
        id: uuid::Uuid::new_v4(),
        at_ms: now_ms(),
        command,
    };
    let payload = serde_json::to_vec(&entry).map_err(|e| EngineError::Codec(e.to_string()))?;
    Ok((entry.id, Bytes::from(payload)))
}

async fn append(
    queue: &dyn Queue,
    topic: &str,
    partition: i32,
    payload: Bytes,
) -> Result<mailmesh_queue::Position, EngineError> {
    Ok(queue
        .publish(OutgoingRecord {
            topic: topic.to_owned(),
            key: Bytes::new(),
            payload,
            headers: Vec::new(),
            partition: Some(partition),
        })
        .await?)
}

/// Where a replica's log lives and how often it snapshots.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// `directory` or `mailboxes`, for metrics and logs.
    pub log: &'static str,
    pub topic: String,
    pub partition: i32,
    /// Write a snapshot after this many applied records…
    pub snapshot_every: u64,
    /// …or after this long, if anything was applied since the last one.
    pub snapshot_interval: Duration,
    /// How long a write waits for its outcome before it is reported unavailable.
    pub write_timeout: Duration,
}

/// What became of a record offered to [`Replica::apply_at`].
enum Applied {
    /// Applied now.
    Now,
    /// Applied already (by a writer at its ack, or before the snapshot).
    Before,
    /// Records before it were never applied: the next expected offset.
    Gap(i64),
    /// Not applied: unreadable, a local failure, or the replica failed already
    /// (`fail` has the reason).
    Failed,
}

/// Gets the outcome of a command, or `None` when a barrier is reached.
type Waiter<O> = oneshot::Sender<Option<Result<O, StorageError>>>;

/// A published record whose outcome is awaited; removes its waiter when dropped.
struct Pending<'a, O> {
    waiters: &'a Mutex<HashMap<uuid::Uuid, Waiter<O>>>,
    id: uuid::Uuid,
    rx: Option<oneshot::Receiver<Option<Result<O, StorageError>>>>,
}

impl<O> Drop for Pending<'_, O> {
    fn drop(&mut self) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

pub struct Replica<S: StateMachine> {
    config: ReplicaConfig,
    queue: Arc<dyn Queue>,
    objects: Arc<dyn ObjectStore>,
    state: RwLock<S>,
    /// The next offset to apply: everything before it is in `state`.
    applied: watch::Sender<i64>,
    waiters: Mutex<HashMap<uuid::Uuid, Waiter<S::Outcome>>>,
    changes: broadcast::Sender<S::Change>,
    /// Set when the log cannot be applied any more; every call then fails.
    failed: Mutex<Option<String>>,
    /// Held while a record is applied and `applied` moved on (by the reader or by a
    /// writer that applies its own record), and while a snapshot is taken: the
    /// state and its offset always agree.
    apply_lock: Mutex<()>,
    /// Records applied since the last snapshot.
    since_snapshot: AtomicU64,
    /// A checkpoint is being written (in the background).
    checkpointing: Arc<AtomicBool>,
    /// Set once another replica owns the partition: every call is refused with
    /// `NotOwner` and the log is no longer applied here.
    closed: AtomicBool,
    /// Applying the log for another replica that owns the partition (a warm
    /// standby, ADR 0005 §1): no checkpoints are written; calls never reach it.
    standby: AtomicBool,
    /// Stops the task that applies the log.
    runner: Mutex<Option<tokio::task::AbortHandle>>,
}

use crate::client::now_ms;

fn snapshot_prefix(config: &ReplicaConfig) -> Path {
    Path::from(format!("index/{}/{}", config.topic, config.partition))
}

impl<S: StateMachine> Replica<S> {
    /// Loads the newest snapshot, starts applying the log after it and returns once
    /// everything written before the call is applied.
    pub async fn start(
        queue: Arc<dyn Queue>,
        objects: Arc<dyn ObjectStore>,
        config: ReplicaConfig,
        store: &S::Store,
    ) -> Result<Arc<Self>, EngineError> {
        let (state, offset) =
            S::restore(store, &objects, &config, &snapshot_prefix(&config)).await?;
        // A state ahead of its log's end: the log was emptied or replaced since
        // (issue 20, defect 5). Served, every new record would be skipped as
        // applied before, and the state would not be this log's.
        if let Some(end) = queue.end_offset(&config.topic, config.partition).await?
            && end < offset
        {
            return Err(EngineError::Unavailable(format!(
                "{}/{}: the log ends at offset {end}, but the state kept for it (a checkpoint in the bucket or the pod's disk) has applied it up to {offset}: the log was emptied or replaced and is not the one this state was built from; restoring a log from the bucket is not built yet",
                config.topic, config.partition
            )));
        }
        let reader = queue
            .reader(&config.topic, config.partition, offset)
            .await?;
        let replica = Arc::new(Self {
            config,
            queue,
            objects,
            state: RwLock::new(state),
            applied: watch::channel(offset).0,
            waiters: Mutex::new(HashMap::new()),
            changes: broadcast::channel(4096).0,
            failed: Mutex::new(None),
            apply_lock: Mutex::new(()),
            since_snapshot: AtomicU64::new(0),
            checkpointing: Arc::new(AtomicBool::new(false)),
            closed: AtomicBool::new(false),
            standby: AtomicBool::new(false),
            runner: Mutex::new(None),
        });
        let run = tokio::spawn(Arc::clone(&replica).run(reader));
        *replica.runner.lock().unwrap_or_else(|e| e.into_inner()) = Some(run.abort_handle());
        if let Err(e) = replica.sync().await {
            // Not handed out: stop applying, so a retry is the only copy of this
            // partition's state.
            run.abort();
            return Err(e);
        }
        Ok(replica)
    }

    async fn run(self: Arc<Self>, mut reader: Box<dyn PartitionReader>) {
        let mut tick = tokio::time::interval(self.config.snapshot_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut maintain = tokio::time::interval(Duration::from_secs(1));
        maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Every branch is cancel-safe: a reader hands out a record only when
            // its future completes.
            let received = tokio::select! {
                r = reader.recv() => r,
                _ = maintain.tick() => {
                    let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
                    let done = self
                        .state
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .maintain(self.applied());
                    if let Err(e) = done {
                        // Under the apply lock: no writer applies on the state
                        // the failure left.
                        self.fail(format!(
                            "{}/{}: writing the index back: {e}",
                            self.config.topic, self.config.partition
                        ));
                        return;
                    }
                    continue;
                }
                _ = tick.tick() => {
                    // Snapshots also go out on time, so a quiet log (the directory)
                    // is covered long before the broker's retention removes it.
                    if self.since_snapshot.load(Ordering::Relaxed) > 0 {
                        self.snapshot();
                    }
                    continue;
                }
            };
            let record = match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(topic = %self.config.topic, partition = self.config.partition, error = %e, "reading the command log failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let applied = {
                let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
                self.apply_at(record.offset, &record.payload)
            };
            match applied {
                Applied::Now | Applied::Before => {}
                Applied::Gap(next) => {
                    // Records between the snapshot and here are gone (retention shorter
                    // than the snapshot interval, or a truncated log): the state cannot be
                    // rebuilt, and serving it would hand out wrong UIDs.
                    let reason = format!(
                        "{}/{}: records {next} to {} are missing from the log; restore a newer snapshot",
                        self.config.topic,
                        self.config.partition,
                        record.offset - 1
                    );
                    self.fail(reason);
                    return;
                }
                Applied::Failed => {
                    // A record this version cannot read (written by a newer one?),
                    // or a local failure: skipping it would fork this replica from
                    // the others, so it stops (`apply_at` failed it).
                    return;
                }
            }
            if self.since_snapshot.load(Ordering::Relaxed) >= self.config.snapshot_every {
                self.snapshot();
            }
        }
    }

    /// Applies the record at `offset` if it is the next one; the caller holds
    /// `apply_lock`.
    fn apply_at(&self, offset: i64, payload: &[u8]) -> Applied {
        if self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Applied::Failed;
        }
        let next = self.applied();
        if offset < next {
            return Applied::Before;
        }
        if offset > next {
            return Applied::Gap(next);
        }
        if let Err(reason) = self.apply_record(offset, payload) {
            // The state may be half changed (a write-back failed): nothing may be
            // applied or served from it any more, by the reader or a writer.
            let reason = format!(
                "{}/{} offset {offset}: {reason}",
                self.config.topic, self.config.partition
            );
            self.fail(reason);
            return Applied::Failed;
        }
        self.applied.send_replace(offset + 1);
        self.since_snapshot.fetch_add(1, Ordering::Relaxed);
        Applied::Now
    }

    /// Prepares a checkpoint unless one is being written; the returned work writes
    /// it and clears the flag. A state that cannot be written back fails the
    /// replica: serving it on would lose the guarantee that a restart finds what
    /// was applied.
    fn begin_checkpoint(
        &self,
    ) -> Result<Option<BoxFuture<'static, Result<(), EngineError>>>, EngineError> {
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        let job = {
            let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            // Counted from here: what is applied while the checkpoint is written
            // goes into the next one.
            self.since_snapshot.store(0, Ordering::Relaxed);
            state.checkpoint(
                self.applied(),
                self.objects.clone(),
                snapshot_prefix(&self.config),
            )
        };
        let log = self.config.log;
        let busy = self.checkpointing.clone();
        match job {
            Ok(job) => Ok(Some(Box::pin(async move {
                let written = job.await;
                busy.store(false, Ordering::Release);
                crate::metrics::snapshot(log, written.is_ok());
                written
            }))),
            Err(e) => {
                busy.store(false, Ordering::Release);
                crate::metrics::snapshot(log, false);
                self.fail(format!(
                    "{}/{}: checkpoint: {e}",
                    self.config.topic, self.config.partition
                ));
                Err(e)
            }
        }
    }

    /// Starts a checkpoint in the background (retried at the next occasion when it
    /// fails); a standby leaves them to the owner.
    fn snapshot(&self) {
        if self.is_standby() {
            return;
        }
        if let Ok(Some(job)) = self.begin_checkpoint() {
            let topic = self.config.topic.clone();
            let partition = self.config.partition;
            tokio::spawn(async move {
                if let Err(e) = job.await {
                    tracing::warn!(%topic, partition, error = %e, "writing an index checkpoint failed");
                }
            });
        }
    }

    /// Writes a checkpoint now and returns once it is stored (tools and tests; the
    /// replica writes its own every `snapshot_every` records or
    /// `snapshot_interval`).
    pub async fn checkpoint(&self) -> Result<(), EngineError> {
        match self.begin_checkpoint()? {
            Some(job) => job.await,
            None => Err(EngineError::Unavailable(
                "a checkpoint is being written".into(),
            )),
        }
    }

    /// Makes this replica a warm standby (`true`: it applies the log for the
    /// partition's owner and writes no checkpoints) or the owner (`false`).
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Release);
    }

    /// Makes a standby the owner; whether it was one.
    pub fn promote(&self) -> bool {
        self.standby.swap(false, Ordering::AcqRel)
    }

    pub fn is_standby(&self) -> bool {
        self.standby.load(Ordering::Acquire)
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "refusing to serve this partition");
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        // Waiting writers learn the reason from `check_failed`.
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // And waiting readers at once (`reach`), not at their timeout.
        self.applied.send_modify(|_| {});
    }

    /// Stops applying the log (the partition moved to another replica): calls in
    /// flight and to come are refused with `NotOwner`, and the state is released
    /// with the last handle (what it had not written back is replayed by whoever
    /// opens the partition here again).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(run) = self.runner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            run.abort();
        }
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.applied.send_modify(|_| {});
    }

    fn has_failed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    fn check_failed(&self) -> Result<(), EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::NotOwner(self.config.partition));
        }
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(reason) => Err(EngineError::Unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    fn apply_record(&self, offset: i64, payload: &[u8]) -> Result<(), String> {
        let entry: Entry<S::Command> =
            serde_json::from_slice(payload).map_err(|e| format!("undecodable record: {e}"))?;
        let outcome = {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            let outcome = match entry.command {
                None => None,
                Some(command) => {
                    let mut changes = Vec::new();
                    let outcome = state
                        .apply(command, entry.at_ms, offset, &mut changes)
                        .map_err(|e| format!("applying: {e}"))?;
                    for change in changes {
                        let _ = self.changes.send(change);
                    }
                    Some(outcome)
                }
            };
            state
                .applied(offset + 1)
                .map_err(|e| format!("after applying: {e}"))?;
            outcome
        };
        crate::metrics::applied(
            self.config.log,
            match &outcome {
                None => "barrier",
                Some(Ok(_)) => "ok",
                Some(Err(_)) => "refused",
            },
        );
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&entry.id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(outcome);
        }
        Ok(())
    }

    /// Publishes a command (or a barrier) and returns where its outcome will arrive.
    async fn publish(
        &self,
        command: Option<S::Command>,
    ) -> Result<Pending<'_, S::Outcome>, EngineError> {
        self.check_failed()?;
        crate::metrics::published(self.config.log, command.is_none());
        let (id, payload) = encode_entry(command)?;
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        // However this ends (outcome, error, timeout, or the caller giving up), the
        // waiter does not outlive it.
        let pending = Pending {
            waiters: &self.waiters,
            id,
            rx: Some(rx),
        };
        let position = append(
            &*self.queue,
            &self.config.topic,
            self.config.partition,
            payload.clone(),
        )
        .await?;
        if position.partition == self.config.partition {
            self.apply_in_turn(position.offset, &payload).await;
        }
        Ok(pending)
    }

    /// Applies a record this replica produced as soon as everything before it is
    /// applied: at once when it landed right after, else when the writers (or the
    /// reader) before it are done. Records produced back to back are applied in
    /// ack order without waiting to read them back (group commit); the reader skips
    /// them when it comes by. A record of another writer in between is applied by
    /// the reader first. Gives up after `write_timeout` (the reader applies it).
    async fn apply_in_turn(&self, offset: i64, payload: &[u8]) {
        let mut applied = self.applied.subscribe();
        let turn = applied.wait_for(|&next| next >= offset || self.has_failed());
        if !matches!(
            tokio::time::timeout(self.config.write_timeout, turn).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let _applying = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Applied::Now = self.apply_at(offset, payload) {
            crate::metrics::applied_at_ack(self.config.log);
        }
    }

    async fn wait(
        &self,
        mut pending: Pending<'_, S::Outcome>,
    ) -> Result<Option<Result<S::Outcome, StorageError>>, EngineError> {
        let rx = pending
            .rx
            .take()
            .expect("a pending write is waited for once");
        match tokio::time::timeout(self.config.write_timeout, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) | Err(_) => match self.check_failed() {
                // The record is in the log and its new owner applies it: the
                // outcome is unknown here, and the call must not be routed again
                // as if it had not happened.
                Err(EngineError::NotOwner(p)) => Err(EngineError::Unavailable(format!(
                    "{}/{p} moved to another replica before this write's outcome was known",
                    self.config.topic
                ))),
                failed => failed.and(Err(EngineError::Unavailable(format!(
                    "no outcome from {}/{} within {:?}",
                    self.config.topic, self.config.partition, self.config.write_timeout
                )))),
            },
        }
    }

    /// Writes `command` to the log and returns its outcome once applied here.
    pub async fn submit(&self, command: S::Command) -> Result<S::Outcome, EngineError> {
        let started = std::time::Instant::now();
        let pending = self.publish(Some(command)).await?;
        let outcome = self.wait(pending).await;
        crate::metrics::write(self.config.log, started.elapsed());
        match outcome? {
            Some(outcome) => Ok(outcome?),
            None => Err(EngineError::Codec(
                "a command came back as a barrier".into(),
            )),
        }
    }

    /// Returns once every command written before the call is applied here: by
    /// waiting for the log's end where the queue knows it exactly (the embedded log:
    /// a read writes nothing), else through a barrier record. Client reads do not
    /// use this (they wait for the position they carry, [`Self::reach`]); admin
    /// reads and tests do.
    pub async fn sync(&self) -> Result<(), EngineError> {
        self.check_failed()?;
        if let Some(end) = self
            .queue
            .end_offset(&self.config.topic, self.config.partition)
            .await?
        {
            return self.reach(end).await;
        }
        let pending = self.publish(None).await?;
        self.wait(pending).await?;
        Ok(())
    }

    /// Returns once every record below `position` is applied here (at once when it
    /// is already): the read-your-writes wait for a position a client carries from
    /// an earlier reply, possibly of another replica. Fails after `write_timeout`.
    pub async fn reach(&self, position: i64) -> Result<(), EngineError> {
        self.check_failed()?;
        // Every call comes here: the common case (already applied) subscribes to
        // nothing.
        if self.applied() >= position {
            return Ok(());
        }
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(
            self.config.write_timeout,
            applied.wait_for(|&next| next >= position || self.has_failed()),
        )
        .await;
        match reached {
            Ok(Ok(_)) => self.check_failed(),
            Ok(Err(_)) | Err(_) => self
                .check_failed()
                .and(Err(EngineError::Unavailable(format!(
                    "{}/{} not applied up to offset {position} within {:?}",
                    self.config.topic, self.config.partition, self.config.write_timeout
                )))),
        }
    }

    /// Reads the current state.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, EngineError> {
        self.check_failed()?;
        Ok(f(&self.state.read().unwrap_or_else(|e| e.into_inner())))
    }

    /// Changes applied from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<S::Change> {
        self.changes.subscribe()
    }

    /// The next offset this replica will apply.
    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }
}

/// Loads the newest snapshot. Another replica may replace it (and delete this one)
/// between the listing and the read, so a vanished snapshot means: list again.
async fn load_snapshot<S: JsonState>(
    objects: &dyn ObjectStore,
    prefix: &Path,
) -> Result<(S, i64), EngineError> {
    let mut attempts = 0;
    loop {
        match try_load_snapshot(objects, prefix).await {
            Err(EngineError::Objects(mailmesh_objstore::object_store::Error::NotFound {
                ..
            })) if attempts < 5 => {
                attempts += 1;
            }
            other => return other,
        }
    }
}

async fn try_load_snapshot<S: JsonState>(
    objects: &dyn ObjectStore,
    prefix: &Path,
) -> Result<(S, i64), EngineError> {
    let newest = objects
        .list(Some(prefix))
        .map_ok(|m| m.location)
        .try_fold(None::<Path>, |best, p| async move {
            Ok(match best {
                Some(b) if b > p => Some(b),
                _ => Some(p),
            })
        })
        .await?;
    let Some(path) = newest else {
        return Ok((S::default(), 0));
    };
    let offset = path
        .filename()
        .and_then(|f| f.strip_suffix(".json"))
        .and_then(|f| f.parse::<i64>().ok())
        .ok_or_else(|| EngineError::Codec(format!("snapshot name {path}")))?;
    let bytes = objects.get(&path).await?.bytes().await?;
    let state = serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::Codec(format!("snapshot {path}: {e}")))?;
    Ok((state, offset))
}
