//! The mailbox index tier at scale: fills partitions of the mailbox log with users
//! and messages, through the same replicas, log and object store the storage
//! service uses, and prints what a provider sizes pods by.
//!
//! Index only: message bodies are not written (their objects are named, as a
//! delivery names them), and users are not created in the directory (no Argon2 per
//! user); everything else is the real path: each command is produced to the log
//! (embedded, or Kafka-compatible with `--backend real`), applied at its ack,
//! cached within `--cache-bytes`, written back to the replica's fjall database,
//! checkpointed to object storage and restored from it by a new replica.
//!
//! Prints: fill rate and write latency; RSS, cached, on-disk and checkpoint bytes
//! per message; checkpoint time and the latency of writes at a steady rate below
//! capacity while it runs, against the same without it (the stall);
//! the next checkpoint's time and size after 1 % of the users changed (a delta);
//! the time a replica with an empty disk takes to serve every partition (restore
//! and log tail: a takeover without a standby); read latency of a user's INBOX
//! status from the cache and from disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_queue::Queue;
use mailmesh_storage::directory::UserId;
use mailmesh_storage::engine::{PartitionCommand, UserRef};
use mailmesh_storage::index::{Flags, INBOX, IndexCommand, IndexLimits, NewMessage};
use mailmesh_storage::index_store::{IndexDb, PartitionIndex};
use mailmesh_storage::replica::{Replica, ReplicaConfig};

#[derive(Parser)]
struct Args {
    /// `embedded` (the log and object store of `mailctl dev`, under --dir) or
    /// `real` (the broker and S3 server named by MMTEST_KAFKA, MMTEST_S3*).
    #[arg(long, default_value = "embedded")]
    backend: String,
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    /// Commands in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 256 << 20)]
    cache_bytes: u64,
    /// Writes per second while the stall is measured (open loop, below capacity).
    #[arg(long, default_value_t = 2_000)]
    paced_rate: u64,
    /// The embedded backend's bucket, when not under `--dir`: on another device
    /// (e.g. /dev/shm), as a remote S3 bucket is, its checkpoint writes do not
    /// share a disk with the log's fsyncs.
    #[arg(long)]
    objects_dir: Option<std::path::PathBuf>,
    /// Work directory: the embedded log and objects, and the replica's index.
    #[arg(long, default_value = "/tmp/mailmesh-storage-scale")]
    dir: std::path::PathBuf,
    /// The mailbox log to fill (default: a new one per run).
    #[arg(long)]
    topic: Option<String>,
    /// Fill, write a checkpoint of every partition and stop: a log and bucket for
    /// storage processes to open (`loadtest/storage-takeover.sh`).
    #[arg(long)]
    fill_only: bool,
}

type Partition = Arc<Replica<PartitionIndex>>;

/// The storage service's default `index_writeback_delay`.
const WRITEBACK_DELAY: Duration = Duration::from_secs(30);

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn user(i: u64) -> UserRef {
    UserRef {
        tenant: "bench".parse().expect("valid tenant"),
        user: UserId(uuid::Uuid::from_u128(u128::from(i) + 1)),
    }
}

/// Messages appended so far: each gets its own delivery key.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn append(i: u64, users: u64) -> (u64, PartitionCommand) {
    let u = i % users;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    (
        u,
        PartitionCommand::User {
            user: user(u),
            limits: IndexLimits::default(),
            request: None,
            command: IndexCommand::Append {
                mailbox: INBOX.into(),
                message: NewMessage {
                    object: format!("1/cur/{:032x}", uuid::Uuid::new_v4().as_u128()),
                    size: 2048,
                    internal_date_ms: 1_780_000_000_000,
                    flags: Flags::default(),
                },
                delivery_key: Some(format!("{seq}:{u}")),
                quota_bytes: None,
            },
        },
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn open_partitions(
    queue: &Arc<dyn Queue>,
    objects: &Arc<dyn ObjectStore>,
    topic: &str,
    partitions: i32,
    db: &Arc<IndexDb>,
) -> anyhow::Result<Vec<Partition>> {
    // 16 at a time, as a replica's first requests open them: each open waits for
    // its log's end, and those waits overlap (all at once overran s3s-fs).
    use futures::{StreamExt, TryStreamExt};
    let opened: Vec<Partition> = futures::stream::iter(0..partitions)
        .map(|partition| {
            Replica::start(
                queue.clone(),
                objects.clone(),
                ReplicaConfig {
                    log: "mailboxes",
                    topic: topic.into(),
                    partition,
                    // Checkpoints are taken by this tool, when it measures them.
                    snapshot_every: u64::MAX,
                    snapshot_interval: Duration::from_secs(24 * 3600),
                    write_timeout: Duration::from_secs(60),
                },
                db,
            )
        })
        .buffered(16)
        .try_collect()
        .await?;
    Ok(opened)
}

/// Runs `count` commands from `make` with `concurrency` in flight; returns the
/// latencies.
async fn drive(
    partitions: &[Partition],
    count: u64,
    concurrency: usize,
    make: impl Fn(u64) -> (u64, PartitionCommand) + Send + Sync + 'static,
) -> anyhow::Result<Vec<Duration>> {
    let next = Arc::new(AtomicU64::new(0));
    let make = Arc::new(make);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, make, partitions) = (next.clone(), make.clone(), partitions.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(latencies);
                }
                let (u, command) = make(i);
                let partition = &partitions[(u % partitions.len() as u64) as usize];
                let started = Instant::now();
                partition.submit(command).await?;
                latencies.push(started.elapsed());
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort();
    Ok(all)
}

/// Appends at `rate` per second, each in its own task whatever the others do
/// (open loop), for `length` or until `STOP`; returns the latencies. Messages are
/// numbered from `from`.
async fn paced(
    partitions: &[Partition],
    rate: u64,
    from: u64,
    users: u64,
    length: Option<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut writes = tokio::task::JoinSet::new();
    let mut i = from;
    loop {
        tick.tick().await;
        let done = match length {
            Some(length) => started.elapsed() >= length,
            None => STOP.load(Ordering::Relaxed) == 1,
        };
        if done {
            break;
        }
        let (u, command) = append(i, users);
        i += 1;
        let partition = partitions[(u % partitions.len() as u64) as usize].clone();
        writes.spawn(async move {
            let started = Instant::now();
            partition.submit(command).await?;
            anyhow::Ok(started.elapsed())
        });
    }
    let mut latencies = Vec::new();
    while let Some(latency) = writes.join_next().await {
        latencies.push(latency??);
    }
    latencies.sort();
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    if let Some(objects) = &args.objects_dir {
        let _ = std::fs::remove_dir_all(objects);
        std::fs::create_dir_all(objects)?;
    }
    let (queue, objects): (Arc<dyn Queue>, Arc<dyn ObjectStore>) = match args.backend.as_str() {
        "embedded" => {
            use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};
            let queue = EmbeddedLog::open(&EmbeddedConfig::new(args.dir.join("queue"))).await?;
            let objects = mailmesh_objstore::open(&mailmesh_objstore::ObjectStoreConfig::Local(
                mailmesh_objstore::LocalConfig {
                    dir: args
                        .objects_dir
                        .clone()
                        .unwrap_or_else(|| args.dir.join("objects")),
                },
            ))?;
            (Arc::new(queue), objects)
        }
        "real" => (
            mailmesh_storage::testing::real_queue(),
            mailmesh_storage::testing::real_objects(),
        ),
        other => anyhow::bail!("--backend embedded or real, not {other}"),
    };
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("scale{}.mailboxes", uuid::Uuid::new_v4().simple()));
    queue.ensure_topic(&topic, args.partitions).await?;
    let rss_start = rss_bytes();
    let index_dir = args.dir.join("index");
    let db = IndexDb::open(Some(&index_dir), args.cache_bytes, WRITEBACK_DELAY)?;
    let threads_before = threads();
    let started = Instant::now();
    let partitions = open_partitions(&queue, &objects, &topic, args.partitions, &db).await?;
    println!(
        "storage-scale: {} backend, {} users, {} messages, {} partitions, cache {} MiB, {} in flight",
        args.backend,
        args.users,
        args.messages,
        args.partitions,
        args.cache_bytes >> 20,
        args.concurrency
    );
    println!(
        "  {} partitions opened in {:.2} s; threads {} -> {}",
        args.partitions,
        started.elapsed().as_secs_f64(),
        threads_before,
        threads()
    );

    let users = args.users;
    drive(&partitions, users, args.concurrency, move |u| {
        (
            u,
            PartitionCommand::User {
                user: user(u),
                limits: IndexLimits::default(),
                command: IndexCommand::Init,
                request: None,
            },
        )
    })
    .await
    .context("creating users")?;

    let started = Instant::now();
    let mut filled = 0u64;
    let mut latencies = Vec::new();
    // In tenths, printing the memory as it grows.
    for step in 1..=10u64 {
        let upto = args.messages * step / 10;
        let from = filled;
        latencies.extend(
            drive(&partitions, upto - from, args.concurrency, move |i| {
                append(from + i, users)
            })
            .await?,
        );
        filled = upto;
        println!(
            "  {filled:>9} messages  {:>7.0}/s  RSS {:>5} MiB  cached {:>5} MiB  index on disk {:>5} MiB",
            filled as f64 / started.elapsed().as_secs_f64(),
            rss_bytes() >> 20,
            db.cached_bytes() >> 20,
            dir_bytes(&index_dir) >> 20
        );
    }
    let fill = started.elapsed();
    if args.fill_only {
        for partition in &partitions {
            partition.checkpoint().await?;
        }
        println!(
            "  filled and checkpointed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    latencies.sort();
    let messages = args.messages.max(1) as f64;
    println!(
        "fill: {:.0} messages/s; write latency p50 {} p99 {} max {}",
        messages / fill.as_secs_f64(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0))
    );

    // The stall: writes at a steady rate well below capacity (open loop, so a
    // write that waits does not slow the ones after it), first alone, then while
    // every partition is checkpointed.
    let rate = args.paced_rate;
    let quiet = paced(
        &partitions,
        rate,
        args.messages,
        users,
        Some(Duration::from_secs(2)),
    )
    .await?;
    let stall_load = {
        let partitions = partitions.clone();
        let from = args.messages + 2 * rate;
        tokio::spawn(async move { paced(&partitions, rate, from, users, None).await })
    };
    // Some writes before the checkpoint starts, and until it ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for partition in &partitions {
        partition.checkpoint().await?;
    }
    let checkpoint = started.elapsed();
    STOP.store(1, Ordering::Relaxed);
    let during = stall_load.await??;
    let checkpoint_bytes: u64 = {
        use futures::TryStreamExt;
        objects
            .list(None)
            .try_fold(0u64, |n, m| async move { Ok(n + m.size) })
            .await?
    };
    let rss = rss_bytes();
    let disk = dir_bytes(&index_dir);
    println!(
        "writes at {rate}/s, no checkpoint ({}): p50 {} p99 {} max {}",
        quiet.len(),
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 0.99)),
        ms(percentile(&quiet, 1.0))
    );
    println!(
        "checkpoint of {} partitions: {:.1} s; writes at {rate}/s meanwhile ({}): p50 {} p99 {} max {}",
        args.partitions,
        checkpoint.as_secs_f64(),
        during.len(),
        ms(percentile(&during, 0.5)),
        ms(percentile(&during, 0.99)),
        ms(percentile(&during, 1.0))
    );
    println!(
        "per message: RSS {:.0} B (process {} MiB, {} MiB at start), index on disk {:.0} B, checkpoint {:.0} B",
        rss.saturating_sub(rss_start) as f64 / messages,
        rss >> 20,
        rss_start >> 20,
        disk as f64 / messages,
        checkpoint_bytes as f64 / messages
    );

    // An incremental checkpoint: 1 % of the users get a message each; once they
    // are written back (the write-back delay), the next checkpoint of each
    // partition carries those users only (a delta after the base above).
    // First the users the writes during the base checkpoint changed go out (a
    // delta that large makes the next checkpoint a base again).
    let stored = async || -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        use futures::TryStreamExt;
        Ok(objects
            .list(None)
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await?)
    };
    // Twice, with a message between (a checkpoint is skipped while `P` stays).
    for _ in 0..2 {
        let settled = Instant::now() + Duration::from_secs(600);
        while db.dirty_bytes() > 0 && Instant::now() < settled {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for partition in &partitions {
            partition.checkpoint().await?;
        }
        // One message per partition (user u lives in partition u % partitions).
        let each = partitions.len() as u64;
        drive(&partitions, each, 1, move |i| append(i, each)).await?;
    }
    let before = stored().await?;
    let changed = (users / 100).max(1);
    drive(&partitions, changed, args.concurrency, move |i| {
        append(i, changed)
    })
    .await?;
    let settled = Instant::now() + Duration::from_secs(600);
    while db.dirty_bytes() > 0 && Instant::now() < settled {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let started = Instant::now();
    for partition in &partitions {
        partition.checkpoint().await?;
    }
    let delta = started.elapsed();
    let after = stored().await?;
    let base_bytes: u64 = after
        .iter()
        .filter(|(n, _)| n.ends_with(".ckpt"))
        .map(|(_, b)| b)
        .sum();
    let written: Vec<(String, u64)> = after
        .into_iter()
        .filter(|(name, _)| !before.contains_key(name))
        .collect();
    let kinds = |suffix: &str| written.iter().filter(|(n, _)| n.ends_with(suffix)).count();
    let bytes: u64 = written.iter().map(|(_, b)| b).sum();
    println!(
        "next checkpoint after {changed} users changed: {:.2} s, {} deltas and {} bases, {} KiB ({:.2} % of a base)",
        delta.as_secs_f64(),
        kinds(".delta"),
        kinds(".ckpt"),
        bytes >> 10,
        bytes as f64 * 100.0 / base_bytes.max(1) as f64
    );

    // Reads: a user's INBOX status, from the cache and from disk.
    let read = |partitions: &[Partition], u: u64| -> anyhow::Result<Duration> {
        let started = Instant::now();
        let key = user(u);
        let partition = &partitions[(u % partitions.len() as u64) as usize];
        let exists = partition.read(|p| {
            p.user(&key.key())
                .map(|i| i.and_then(|i| i.mailbox(INBOX).map(|m| m.status().messages)))
        })??;
        anyhow::ensure!(exists.is_some(), "user {u} has no INBOX");
        Ok(started.elapsed())
    };
    let mut warm = Vec::new();
    for _ in 0..3 {
        for u in 0..100.min(users) {
            warm.push(read(&partitions, u)?);
        }
    }
    warm.sort();
    // What a read that must see every earlier write pays before it reads: on the
    // embedded log a wait for its end, on Kafka a barrier record.
    let mut syncs = Vec::new();
    for i in 0..200 {
        let started = Instant::now();
        partitions[i % partitions.len()].sync().await?;
        syncs.push(started.elapsed());
    }
    syncs.sort();
    println!(
        "read barrier (sync), idle partitions: p50 {} p99 {}",
        ms(percentile(&syncs, 0.5)),
        ms(percentile(&syncs, 0.99))
    );
    drop(partitions);
    drop(db);

    // A new replica with an empty disk: restore every partition and serve.
    let started = Instant::now();
    let fresh = IndexDb::open(None, args.cache_bytes, WRITEBACK_DELAY)?;
    let partitions = open_partitions(&queue, &objects, &topic, args.partitions, &fresh).await?;
    let takeover = started.elapsed();
    let mut cold = Vec::new();
    for u in 0..1000.min(users) {
        cold.push(read(&partitions, u)?);
    }
    cold.sort();
    println!(
        "restore on an empty disk (checkpoints + log tail), {} partitions: {:.1} s",
        args.partitions,
        takeover.as_secs_f64()
    );
    println!(
        "INBOX status read: cached p50 {} p99 {}; from disk p50 {} p99 {}",
        ms(percentile(&warm, 0.5)),
        ms(percentile(&warm, 0.99)),
        ms(percentile(&cold, 0.5)),
        ms(percentile(&cold, 0.99))
    );
    Ok(())
}

static STOP: AtomicU64 = AtomicU64::new(0);
