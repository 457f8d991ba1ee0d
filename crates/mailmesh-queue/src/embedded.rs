//! The embedded queue: a durable append-only log on local disk, with Kafka's model
//! (topics, partitions, offsets, consumer groups) and the same at-least-once contract.
//!
//! Layout under the configured directory:
//! - `topics/<topic>/<partition>.log`: frames `len:u32 crc32:u32 body`, where body is
//!   `key_len:u16 key header_count:u16 (name_len:u16 name value_len:u32 value)* payload`;
//! - `groups/<group>.offsets`: the next offset to consume per topic and partition.
//!
//! One writer thread appends every record. It takes all requests waiting at once,
//! writes them, fsyncs each touched file once and only then answers the publishers and
//! makes the records visible to consumers (group commit: one fsync serves a burst).
//! On open, a torn frame at the end of a file (a crash mid-write, never acknowledged)
//! is cut off; a bad checksum anywhere else is corruption and refuses to open.
//!
//! Limits: one consumer per group at a time in a process; no retention yet (the log
//! grows until its directory is removed).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Deserialize;
use tokio::sync::{Notify, oneshot};

use crate::tracker::OffsetTracker;
use crate::{
    Consumer, Delivery, OutgoingRecord, PartitionReader, Position, Queue, QueueError, Record,
    Result, validate_topic,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    pub dir: PathBuf,
    /// fsync before a publish returns. Turning it off loses acknowledged mail on a
    /// power failure; it exists for throwaway test runs only.
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Partitions of topics created implicitly.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Largest record accepted (key, headers and payload).
    #[serde(default = "default_max_record")]
    pub max_record_bytes: usize,
    /// How often a consumer writes its stored offsets when it is not asked to.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
}

fn yes() -> bool {
    true
}
fn default_partitions() -> i32 {
    4
}
fn default_max_record() -> usize {
    64 << 20
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}

impl mailmesh_kit::config::Validate for EmbeddedConfig {
    fn validate(&self) -> std::result::Result<(), mailmesh_kit::ConfigError> {
        use mailmesh_kit::ConfigError;
        if !(1..=1024).contains(&self.partitions) {
            return Err(ConfigError::invalid(
                "queue.partitions",
                "must be 1 to 1024",
            ));
        }
        if self.commit_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "queue.commit_interval",
                "must be at least 10ms",
            ));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > u32::MAX as usize / 2 {
            return Err(ConfigError::invalid(
                "queue.max_record_bytes",
                "must be 1 byte to 2 GiB",
            ));
        }
        Ok(())
    }
}

impl EmbeddedConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fsync: true,
            partitions: default_partitions(),
            max_record_bytes: default_max_record(),
            commit_interval: default_commit_interval(),
        }
    }
}

/// `len:u32 crc32(len):u32 crc32(body):u32`. The length has its own checksum so a
/// damaged length is told apart from a record cut short by a crash.
const FRAME_HEADER: usize = 12;
/// The smallest body: an empty key and no headers.
const MIN_BODY: u32 = 4;
/// Most requests one group commit takes.
const MAX_BATCH: usize = 1024;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Partition {
    id: i32,
    path: PathBuf,
    read: File,
    /// Position and body length of every durable record; the offset is the index.
    index: RwLock<Vec<(u64, u32)>>,
    append: Mutex<Appender>,
}

impl Partition {
    fn open(path: PathBuf, id: i32) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let (index, end) = scan(&mut file, &path)?;
        let read = file.try_clone().map_err(io_err(&path))?;
        Ok(Self {
            id,
            path,
            read,
            index: RwLock::new(index),
            append: Mutex::new(Appender {
                file,
                end,
                failed: false,
            }),
        })
    }

    fn len(&self) -> i64 {
        self.index.read().unwrap_or_else(|e| e.into_inner()).len() as i64
    }

    fn read_at(&self, offset: i64) -> Result<Option<StoredRecord>> {
        let entry = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            usize::try_from(offset)
                .ok()
                .and_then(|o| index.get(o).copied())
        };
        let Some((pos, len)) = entry else {
            return Ok(None);
        };
        let mut body = vec![0u8; len as usize];
        self.read
            .read_exact_at(&mut body, pos + FRAME_HEADER as u64)
            .map_err(io_err(&self.path))?;
        decode_body(Bytes::from(body))
            .map(Some)
            .ok_or(QueueError::Corrupt {
                path: self.path.clone(),
                position: pos,
                reason: "malformed record body",
            })
    }
}

/// The body length of a valid frame at `pos`, if there is one.
fn frame_at(file: &File, pos: u64, size: u64) -> Option<u32> {
    let mut header = [0u8; FRAME_HEADER];
    if size.saturating_sub(pos) < FRAME_HEADER as u64
        || file.read_exact_at(&mut header, pos).is_err()
    {
        return None;
    }
    let len = header_len(&header)?;
    if pos + FRAME_HEADER as u64 + u64::from(len) > size {
        return None;
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, pos + FRAME_HEADER as u64)
        .ok()?;
    let crc = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
    (crc32fast::hash(&body) == crc && decode_body(Bytes::from(body)).is_some()).then_some(len)
}

/// The body length a header announces, if the header's own checksum holds.
fn header_len(header: &[u8; FRAME_HEADER]) -> Option<u32> {
    let len = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
    (crc32fast::hash(&header[0..4]) == crc && len >= MIN_BODY).then_some(len)
}

/// Whether any valid frame starts after `pos`: slides over the rest of the file
/// checking header checksums, which almost every position fails at once.
fn valid_frame_after(file: &File, pos: u64, size: u64) -> bool {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    if std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(pos + 1)).is_err() {
        return false;
    }
    let mut window = [0u8; FRAME_HEADER];
    let mut filled = 0usize;
    let mut at = pos + 1;
    let mut byte = [0u8; 1];
    while reader.read_exact(&mut byte).is_ok() {
        if filled < FRAME_HEADER {
            window[filled] = byte[0];
            filled += 1;
        } else {
            window.rotate_left(1);
            window[FRAME_HEADER - 1] = byte[0];
            at += 1;
        }
        if filled == FRAME_HEADER
            && header_len(&window).is_some()
            && frame_at(file, at, size).is_some()
        {
            return true;
        }
    }
    false
}

/// Reads every frame, returning the index and the end of the last good frame.
///
/// A crash can only damage what was written after the last fsync, which was never
/// acknowledged: that is the tail. So at the first invalid frame the rest of the file
/// is searched for a valid one; none means a torn tail, which is cut; one means
/// corruption in acknowledged data, and the log refuses to open.
fn scan(file: &mut File, path: &Path) -> Result<(Vec<(u64, u32)>, u64)> {
    let size = file.metadata().map_err(io_err(path))?.len();
    let mut index = Vec::new();
    let mut pos = 0u64;
    while let Some(len) = frame_at(file, pos, size) {
        index.push((pos, len));
        pos += FRAME_HEADER as u64 + u64::from(len);
    }
    if pos < size {
        if valid_frame_after(file, pos, size) {
            return Err(QueueError::Corrupt {
                path: path.to_owned(),
                position: pos,
                reason: "invalid record followed by valid ones",
            });
        }
        tracing::warn!(path = %path.display(), at = pos, "cutting a torn record at the end of the log");
        file.set_len(pos).map_err(io_err(path))?;
        file.sync_data().map_err(io_err(path))?;
    }
    Ok((index, pos))
}

fn encode_frame(record: &OutgoingRecord) -> Option<Vec<u8>> {
    let key_len = u16::try_from(record.key.len()).ok()?;
    let header_count = u16::try_from(record.headers.len()).ok()?;
    let mut body = BytesMut::with_capacity(
        4 + record.key.len()
            + record.payload.len()
            + record
                .headers
                .iter()
                .map(|(n, v)| 6 + n.len() + v.len())
                .sum::<usize>(),
    );
    body.put_u16(key_len);
    body.put_slice(&record.key);
    body.put_u16(header_count);
    for (name, value) in &record.headers {
        body.put_u16(u16::try_from(name.len()).ok()?);
        body.put_slice(name.as_bytes());
        body.put_u32(u32::try_from(value.len()).ok()?);
        body.put_slice(value);
    }
    body.put_slice(&record.payload);
    let len = u32::try_from(body.len()).ok()?.to_be_bytes();
    let mut frame = Vec::with_capacity(FRAME_HEADER + body.len());
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&crc32fast::hash(&len).to_be_bytes());
    frame.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    frame.extend_from_slice(&body);
    Some(frame)
}

/// A record as read back from the log.
struct StoredRecord {
    key: Bytes,
    payload: Bytes,
    headers: Vec<(String, Bytes)>,
}

fn decode_body(mut body: Bytes) -> Option<StoredRecord> {
    fn take(body: &mut Bytes, n: usize) -> Option<Bytes> {
        (body.remaining() >= n).then(|| body.split_to(n))
    }
    let key_len = take(&mut body, 2)?.get_u16() as usize;
    let key = take(&mut body, key_len)?;
    let count = take(&mut body, 2)?.get_u16();
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name_len = take(&mut body, 2)?.get_u16() as usize;
        let name = String::from_utf8(take(&mut body, name_len)?.to_vec()).ok()?;
        let value_len = take(&mut body, 4)?.get_u32() as usize;
        headers.push((name, take(&mut body, value_len)?));
    }
    Some(StoredRecord {
        key,
        payload: body,
        headers,
    })
}

struct Topic {
    partitions: Vec<Arc<Partition>>,
}

struct WriteRequest {
    partition: Arc<Partition>,
    frame: Vec<u8>,
    reply: oneshot::Sender<Result<i64>>,
}

struct Inner {
    config: EmbeddedConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    writer: Mutex<std::sync::mpsc::Sender<WriteRequest>>,
    appended: Notify,
    active_groups: Mutex<HashSet<String>>,
}

/// The embedded durable log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
    /// Held (flock) while any handle to the log exists. Kept out of `Inner`, which
    /// the writer thread may hold a moment longer, so a closed log can be reopened
    /// at once.
    _lock: Arc<File>,
}

impl EmbeddedLog {
    pub async fn open(config: &EmbeddedConfig) -> Result<Self> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(config))
            .await
            .map_err(|_| QueueError::Closed)?
    }

    fn open_blocking(config: EmbeddedConfig) -> Result<Self> {
        let topics_dir = config.dir.join("topics");
        std::fs::create_dir_all(&topics_dir).map_err(io_err(&topics_dir))?;
        // Two processes appending to one log would interleave frames.
        let lock_path = config.dir.join("LOCK");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        lock.try_lock().map_err(|_| QueueError::Io {
            path: lock_path.clone(),
            source: std::io::Error::other("the log is open in another process"),
        })?;
        std::fs::create_dir_all(config.dir.join("groups")).map_err(io_err(&config.dir))?;
        let mut topics = HashMap::new();
        for entry in std::fs::read_dir(&topics_dir).map_err(io_err(&topics_dir))? {
            let entry = entry.map_err(io_err(&topics_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_topic(&name).is_err() {
                continue;
            }
            let mut ids = Vec::new();
            for file in std::fs::read_dir(entry.path()).map_err(io_err(&entry.path()))? {
                let file = file.map_err(io_err(&entry.path()))?;
                if let Some(id) = file
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse::<i32>().ok())
                {
                    ids.push(id);
                }
            }
            ids.sort_unstable();
            if ids.is_empty() {
                // A crash while the topic was being created: it never took a record.
                continue;
            }
            if ids != (0..ids.len() as i32).collect::<Vec<_>>() {
                return Err(QueueError::Corrupt {
                    path: entry.path(),
                    position: 0,
                    reason: "partition files missing",
                });
            }
            let partitions = ids
                .into_iter()
                .map(|id| Partition::open(entry.path().join(format!("{id}.log")), id).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            topics.insert(name, Arc::new(Topic { partitions }));
        }

        let (tx, rx) = std::sync::mpsc::channel::<WriteRequest>();
        let inner = Arc::new(Inner {
            config,
            topics: RwLock::new(topics),
            writer: Mutex::new(tx),
            appended: Notify::new(),
            active_groups: Mutex::new(HashSet::new()),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("queue-log-writer".into())
            .spawn(move || writer_loop(&rx, &weak))
            .map_err(io_err(Path::new("writer thread")))?;
        Ok(Self {
            inner,
            _lock: Arc::new(lock),
        })
    }

    fn topic(&self, name: &str, partitions: i32) -> Result<Arc<Topic>> {
        validate_topic(name)?;
        let existing = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        if let Some(t) = existing {
            return Ok(t);
        }
        // Creating a topic is rare: holding the write lock over its file I/O keeps two
        // creators from racing.
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let dir = self.inner.config.dir.join("topics").join(name);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let partitions = (0..partitions.max(1))
            .map(|id| Partition::open(dir.join(format!("{id}.log")), id).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        sync_dir(&dir)?;
        sync_dir(&self.inner.config.dir.join("topics"))?;
        let topic = Arc::new(Topic { partitions });
        topics.insert(name.to_owned(), topic.clone());
        Ok(topic)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn writer_loop(rx: &std::sync::mpsc::Receiver<WriteRequest>, inner: &std::sync::Weak<Inner>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        write_batch(batch, inner.config.fsync);
        inner.appended.notify_waiters();
    }
}

/// A record written but not yet synced.
struct Written {
    pos: u64,
    len: u32,
    reply: oneshot::Sender<Result<i64>>,
}

/// Appends a batch, fsyncs each touched partition once, then publishes the records
/// to readers and answers the publishers.
fn write_batch(batch: Vec<WriteRequest>, fsync: bool) {
    // Per partition touched: the requests written there, in order.
    let mut written: Vec<(Arc<Partition>, Vec<Written>)> = Vec::new();
    let mut failed: Vec<(oneshot::Sender<Result<i64>>, QueueError)> = Vec::new();
    for req in batch {
        let outcome = req
            .partition
            .append
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&req.frame, &req.partition.path);
        match outcome {
            Ok(pos) => {
                let entry = Written {
                    pos,
                    len: (req.frame.len() - FRAME_HEADER) as u32,
                    reply: req.reply,
                };
                match written
                    .iter_mut()
                    .find(|(p, _)| Arc::ptr_eq(p, &req.partition))
                {
                    Some((_, entries)) => entries.push(entry),
                    None => written.push((req.partition, vec![entry])),
                }
            }
            Err(e) => failed.push((req.reply, e)),
        }
    }
    for (partition, entries) in written {
        let synced = if fsync {
            partition
                .append
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sync(&partition.path)
        } else {
            Ok(())
        };
        match synced {
            Ok(()) => {
                let mut index = partition.index.write().unwrap_or_else(|e| e.into_inner());
                for w in entries {
                    let offset = index.len() as i64;
                    index.push((w.pos, w.len));
                    let _ = w.reply.send(Ok(offset));
                }
            }
            Err(e) => {
                // The records may or may not be on disk: none is acknowledged and
                // readers never see them.
                for w in entries {
                    let _ = w.reply.send(Err(QueueError::Io {
                        path: partition.path.clone(),
                        source: std::io::Error::other(e.to_string()),
                    }));
                }
            }
        }
    }
    for (reply, e) in failed {
        let _ = reply.send(Err(e));
    }
}

/// The writing end of a partition file, owned by the writer thread.
struct Appender {
    file: File,
    /// Where the next frame goes: the end of the last complete frame.
    end: u64,
    /// A write or fsync failed: what is on disk after `end` is unknown, so the
    /// partition takes no more writes until the log is reopened (which rescans it).
    failed: bool,
}

impl Appender {
    fn write(&mut self, frame: &[u8], path: &Path) -> Result<u64> {
        if self.failed {
            return Err(QueueError::Io {
                path: path.to_owned(),
                source: std::io::Error::other("an earlier write failed; reopen the log to recover"),
            });
        }
        match self.file.write_all(frame) {
            Ok(()) => {
                let pos = self.end;
                self.end += frame.len() as u64;
                Ok(pos)
            }
            Err(e) => {
                self.failed = true;
                Err(io_err(path)(e))
            }
        }
    }

    fn sync(&mut self, path: &Path) -> Result<()> {
        // After a failed fsync the kernel may have dropped the dirty pages; retrying
        // could report success for data that is gone, so the partition stops.
        self.file.sync_data().map_err(|e| {
            self.failed = true;
            io_err(path)(e)
        })
    }
}

fn partition_for(key: &[u8], partitions: usize) -> usize {
    if key.is_empty() {
        return 0;
    }
    // FNV-1a: stable across processes and releases, unlike the std hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % partitions as u64) as usize
}

#[async_trait]
impl Queue for EmbeddedLog {
    async fn publish(&self, record: OutgoingRecord) -> Result<Position> {
        let started = Instant::now();
        let topic = self.topic(&record.topic, self.inner.config.partitions)?;
        let size = record.key.len()
            + record.payload.len()
            + record
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        if size > self.inner.config.max_record_bytes {
            return Err(QueueError::TooLarge {
                size,
                limit: self.inner.config.max_record_bytes,
            });
        }
        let frame = encode_frame(&record).ok_or(QueueError::TooLarge {
            size,
            limit: self.inner.config.max_record_bytes,
        })?;
        let index = match record.partition {
            Some(p) => usize::try_from(p)
                .ok()
                .filter(|p| *p < topic.partitions.len())
                .ok_or_else(|| QueueError::NoPartition {
                    topic: record.topic.clone(),
                    partition: p,
                })?,
            None => partition_for(&record.key, topic.partitions.len()),
        };
        let partition = topic.partitions[index].clone();
        let id = partition.id;
        let (reply, answer) = oneshot::channel();
        self.inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(WriteRequest {
                partition,
                frame,
                reply,
            })
            .map_err(|_| QueueError::Closed)?;
        let outcome = answer.await.map_err(|_| QueueError::Closed)?;
        crate::metrics::observe_publish("embedded", started.elapsed(), outcome.is_ok());
        Ok(Position {
            partition: id,
            offset: outcome?,
        })
    }

    async fn consumer(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>> {
        validate_topic(group).map_err(|_| QueueError::InvalidGroup(group.to_owned()))?;
        let topics: BTreeSet<&str> = topics.iter().copied().collect();
        let mut assigned = Vec::new();
        for name in topics {
            let topic = self.topic(name, self.inner.config.partitions)?;
            for p in &topic.partitions {
                assigned.push((name.to_owned(), p.clone()));
            }
        }
        let offsets_path = self
            .inner
            .config
            .dir
            .join("groups")
            .join(format!("{group}.offsets"));
        let committed = read_offsets(&offsets_path)?;
        if !self
            .inner
            .active_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_owned())
        {
            return Err(QueueError::GroupBusy(group.to_owned()));
        }
        let positions = assigned
            .iter()
            .map(|(t, p)| {
                let committed = committed.get(&(t.clone(), p.id)).copied().unwrap_or(0);
                // Never past what exists (a log restored from an older copy).
                committed.clamp(0, p.len())
            })
            .collect();
        let stored = Arc::new(Mutex::new(StoredOffsets {
            offsets: committed,
            dirty: false,
        }));
        let s = stored.clone();
        let tracker = OffsetTracker::new(Box::new(move |topic, partition, next| {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            s.offsets.insert((topic.to_owned(), partition), next);
            s.dirty = true;
        }));
        Ok(Box::new(EmbeddedConsumer {
            log: self.clone(),
            group: group.to_owned(),
            offsets_path,
            assigned,
            positions,
            next: 0,
            tracker,
            stored,
            last_commit: Instant::now(),
        }))
    }

    async fn reader(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Box<dyn PartitionReader>> {
        let t = self.topic(topic, self.inner.config.partitions)?;
        let p = usize::try_from(partition)
            .ok()
            .and_then(|p| t.partitions.get(p))
            .cloned()
            .ok_or_else(|| QueueError::NoPartition {
                topic: topic.to_owned(),
                partition,
            })?;
        Ok(Box::new(EmbeddedReader {
            log: self.clone(),
            topic: topic.to_owned(),
            partition: p,
            position: offset.max(0),
        }))
    }

    /// One process uses the log: it is assigned every partition.
    async fn membership(
        &self,
        group: &str,
        topic: &str,
        _session_timeout: Duration,
    ) -> Result<crate::Membership> {
        if group.is_empty() {
            return Err(QueueError::InvalidGroup(group.to_owned()));
        }
        let count = self.partition_count(topic).await?;
        let (tx, rx) = tokio::sync::watch::channel(crate::Assignment {
            partitions: (0..count).collect(),
            joined: true,
        });
        Ok(crate::Membership::new(rx, tx))
    }

    async fn partition_count(&self, topic: &str) -> Result<i32> {
        Ok(self
            .topic(topic, self.inner.config.partitions)?
            .partitions
            .len() as i32)
    }

    /// Exact: a record is in the index only once it is fsynced and acknowledged.
    async fn end_offset(&self, name: &str, partition: i32) -> Result<Option<i64>> {
        let topic = self.topic(name, self.inner.config.partitions)?;
        let p = usize::try_from(partition)
            .ok()
            .and_then(|p| topic.partitions.get(p))
            .ok_or_else(|| QueueError::NoPartition {
                topic: name.to_owned(),
                partition,
            })?;
        Ok(Some(p.len()))
    }

    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let log = self.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || log.topic(&topic, partitions).map(|_| ()))
            .await
            .map_err(|_| QueueError::Closed)?
    }

    async fn ping(&self) -> Result<()> {
        let dir = self.inner.config.dir.join("topics");
        tokio::fs::metadata(&dir).await.map_err(io_err(&dir))?;
        Ok(())
    }
}

struct EmbeddedReader {
    log: EmbeddedLog,
    topic: String,
    partition: Arc<Partition>,
    position: i64,
}

#[async_trait]
impl PartitionReader for EmbeddedReader {
    async fn recv(&mut self) -> Result<Record> {
        loop {
            let inner = self.log.inner.clone();
            let appended = inner.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            if let Some(stored) = self.partition.read_at(self.position)? {
                let offset = self.position;
                self.position += 1;
                return Ok(Record {
                    topic: self.topic.clone(),
                    partition: self.partition.id,
                    offset,
                    key: stored.key,
                    payload: stored.payload,
                    headers: stored.headers,
                });
            }
            appended.await;
        }
    }
}

struct StoredOffsets {
    offsets: HashMap<(String, i32), i64>,
    dirty: bool,
}

fn read_offsets(path: &Path) -> Result<HashMap<(String, i32), i64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut offsets = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        match (
            parts.next(),
            parts.next().map(str::parse),
            parts.next().map(str::parse),
        ) {
            (Some(topic), Some(Ok(partition)), Some(Ok(offset))) => {
                offsets.insert((topic.to_owned(), partition), offset);
            }
            _ => {
                return Err(QueueError::Corrupt {
                    path: path.to_owned(),
                    position: 0,
                    reason: "unreadable group offsets",
                });
            }
        }
    }
    Ok(offsets)
}

/// Writes the offsets to a temporary file, fsyncs it and renames it into place, so a
/// crash leaves either the old or the new offsets.
fn write_offsets(path: &Path, offsets: &HashMap<(String, i32), i64>) -> Result<()> {
    let mut text = String::new();
    let mut sorted: Vec<_> = offsets.iter().collect();
    sorted.sort();
    for ((topic, partition), offset) in sorted {
        text.push_str(&format!("{topic} {partition} {offset}\n"));
    }
    let tmp = path.with_extension("offsets.tmp");
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

struct EmbeddedConsumer {
    log: EmbeddedLog,
    group: String,
    offsets_path: PathBuf,
    assigned: Vec<(String, Arc<Partition>)>,
    /// Next offset to read, per assigned partition.
    positions: Vec<i64>,
    /// Round-robin cursor over partitions, so one busy partition cannot starve others.
    next: usize,
    tracker: Arc<OffsetTracker>,
    stored: Arc<Mutex<StoredOffsets>>,
    last_commit: Instant,
}

impl EmbeddedConsumer {
    fn try_next(&mut self) -> Result<Option<Delivery>> {
        let n = self.assigned.len();
        for i in 0..n {
            let slot = (self.next + i) % n;
            let (topic, partition) = &self.assigned[slot];
            let offset = self.positions[slot];
            if offset >= partition.len() {
                continue;
            }
            let Some(stored) = partition.read_at(offset)? else {
                continue;
            };
            self.positions[slot] += 1;
            self.next = (slot + 1) % n;
            let ack = self.tracker.received(topic, partition.id, offset);
            return Ok(Some(Delivery {
                record: Record {
                    topic: topic.clone(),
                    partition: partition.id,
                    offset,
                    key: stored.key,
                    payload: stored.payload,
                    headers: stored.headers,
                },
                ack,
            }));
        }
        Ok(None)
    }

    /// The stored offsets if they changed since the last write.
    fn take_dirty(&self) -> Option<HashMap<(String, i32), i64>> {
        let mut s = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        if !s.dirty {
            return None;
        }
        s.dirty = false;
        Some(s.offsets.clone())
    }

    fn mark_dirty(&self) {
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn recv(&mut self) -> Result<Delivery> {
        let interval = self.log.inner.config.commit_interval;
        loop {
            if self.last_commit.elapsed() >= interval {
                self.commit().await?;
            }
            let inner = self.log.inner.clone();
            let appended = inner.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            // A pread of one record from a local file: short enough to run inline.
            if let Some(delivery) = self.try_next()? {
                return Ok(delivery);
            }
            let _ = tokio::time::timeout(interval, appended).await;
        }
    }

    async fn commit(&mut self) -> Result<()> {
        self.last_commit = Instant::now();
        let Some(snapshot) = self.take_dirty() else {
            return Ok(());
        };
        let path = self.offsets_path.clone();
        let written = tokio::task::spawn_blocking(move || write_offsets(&path, &snapshot))
            .await
            .map_err(|_| QueueError::Closed)?;
        if written.is_err() {
            self.mark_dirty();
        }
        written
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.commit().await
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        let written = match self.take_dirty() {
            Some(snapshot) => write_offsets(&self.offsets_path, &snapshot),
            None => Ok(()),
        };
        if let Err(e) = written {
            tracing::warn!(group = %self.group, error = %e, "writing consumer offsets on close");
        }
        self.log
            .inner
            .active_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, payload: &str) -> OutgoingRecord {
        OutgoingRecord {
            topic: "mail.queue".into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            headers: vec![("traceparent".into(), Bytes::from_static(b"00-ab-cd-01"))],
            partition: None,
        }
    }

    #[test]
    fn frames_round_trip() {
        let r = record("k", "payload");
        let frame = encode_frame(&r).unwrap();
        let stored = decode_body(Bytes::from(frame[FRAME_HEADER..].to_vec())).unwrap();
        assert_eq!(stored.key, r.key);
        assert_eq!(stored.payload, r.payload);
        assert_eq!(stored.headers, r.headers);
        assert!(decode_body(Bytes::from_static(b"\x00\x05ab")).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_cut_and_acknowledged_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedConfig {
            partitions: 1,
            ..EmbeddedConfig::new(dir.path())
        };
        {
            let log = EmbeddedLog::open(&config).await.unwrap();
            for i in 0..3 {
                log.publish(record("k", &format!("m{i}"))).await.unwrap();
            }
        }
        // A crash in the middle of a write leaves half a frame.
        let path = dir.path().join("topics/mail.queue/0.log");
        let frame = encode_frame(&record("k", "half")).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&frame[..frame.len() / 2]).unwrap();
        drop(f);

        let log = EmbeddedLog::open(&config).await.unwrap();
        let pos = log.publish(record("k", "m3")).await.unwrap();
        assert_eq!(pos.offset, 3);
        let mut consumer = log.consumer("g", &["mail.queue"]).await.unwrap();
        for i in 0..4 {
            let d = consumer.recv().await.unwrap();
            assert_eq!(d.record.payload, format!("m{i}").as_bytes());
        }
    }

    async fn two_records(dir: &Path) -> (EmbeddedConfig, PathBuf) {
        let config = EmbeddedConfig {
            partitions: 1,
            ..EmbeddedConfig::new(dir)
        };
        let log = EmbeddedLog::open(&config).await.unwrap();
        log.publish(record("k", "first")).await.unwrap();
        log.publish(record("k", "second")).await.unwrap();
        (config, dir.join("topics/mail.queue/0.log"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corruption_before_the_end_refuses_to_open() {
        // A flipped bit in the first record's body, and in its length: both are
        // followed by an acknowledged record, so nothing may be cut.
        for flip in [FRAME_HEADER + 3, 1] {
            let dir = tempfile::tempdir().unwrap();
            let (config, path) = two_records(dir.path()).await;
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[flip] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
            assert!(
                matches!(
                    EmbeddedLog::open(&config).await,
                    Err(QueueError::Corrupt { .. })
                ),
                "flip at {flip}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zero_filled_tail_is_cut() {
        // Some file systems extend a file with zeros when a crash hits a write.
        let dir = tempfile::tempdir().unwrap();
        let (config, path) = two_records(dir.path()).await;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        drop(f);
        let log = EmbeddedLog::open(&config).await.unwrap();
        let mut consumer = log.consumer("g", &["mail.queue"]).await.unwrap();
        assert_eq!(consumer.recv().await.unwrap().record.payload, "first");
        assert_eq!(consumer.recv().await.unwrap().record.payload, "second");
        assert_eq!(log.publish(record("k", "third")).await.unwrap().offset, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_process_per_log() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_records(dir.path()).await;
        let _open = EmbeddedLog::open(&config).await.unwrap();
        // flock is per open file description, so a second open in this process stands
        // in for a second process.
        assert!(matches!(
            EmbeddedLog::open(&config).await,
            Err(QueueError::Io { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_consumer_per_group_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedConfig {
            max_record_bytes: 10,
            ..EmbeddedConfig::new(dir.path())
        };
        let log = EmbeddedLog::open(&config).await.unwrap();
        let first = log.consumer("g", &["t"]).await.unwrap();
        assert!(matches!(
            log.consumer("g", &["t"]).await,
            Err(QueueError::GroupBusy(_))
        ));
        drop(first);
        log.consumer("g", &["t"]).await.unwrap();
        assert!(matches!(
            log.publish(record("k", "far too large")).await,
            Err(QueueError::TooLarge { .. })
        ));
        assert!(matches!(
            log.consumer("../x", &["t"]).await,
            Err(QueueError::InvalidGroup(_))
        ));
        assert!(matches!(
            log.ensure_topic("../../etc", 1).await,
            Err(QueueError::InvalidTopic(_))
        ));
    }
}
