//! What the load generators share: latency recording and the report format, a small
//! deterministic random source, and a line-oriented client connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Latencies per operation (microseconds) and errors, merged across connections.
pub struct Recorder {
    names: &'static [&'static str],
    latencies: Vec<Vec<u32>>,
    pub errors: u64,
}

impl Recorder {
    pub fn new(names: &'static [&'static str]) -> Self {
        Self {
            names,
            latencies: vec![Vec::new(); names.len()],
            errors: 0,
        }
    }

    /// Records operation `op` (an index into the names) as started at `started`.
    pub fn done(&mut self, op: usize, started: Instant) {
        self.latencies[op].push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }

    /// Counts a failed session of connection `id` (printing the run's first five)
    /// and pauses a moment before the connection tries again.
    pub async fn failed(&mut self, id: usize, error: &anyhow::Error) {
        static PRINTED: AtomicU64 = AtomicU64::new(0);
        self.errors += 1;
        if PRINTED.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("connection {id}: {error:#}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    pub fn merge(&mut self, other: Recorder) {
        self.errors += other.errors;
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            mine.extend(theirs);
        }
    }

    pub fn count(&self, op: usize) -> usize {
        self.latencies[op].len()
    }

    /// Prints `ops/s X <first op>s/s Y errors E seconds S` and then one line per
    /// operation with its count, p50 and p99 in milliseconds. The scripts read the
    /// first line's second and fourth fields.
    pub fn report(&mut self, elapsed_secs: f64) {
        let total: usize = self.latencies.iter().map(Vec::len).sum();
        println!(
            "ops/s {:.0} {}s/s {:.1} errors {} seconds {:.1}",
            total as f64 / elapsed_secs,
            self.names[0],
            self.count(0) as f64 / elapsed_secs,
            self.errors,
            elapsed_secs
        );
        for (name, l) in self.names.iter().zip(&mut self.latencies) {
            l.sort_unstable();
            println!(
                "{:<12} n {:>7} p50_ms {:>8.2} p99_ms {:>8.2}",
                name,
                l.len(),
                percentile(l, 0.5),
                percentile(l, 0.99)
            );
        }
    }
}

/// Runs `worker(id, deadline)` on `connections` tasks until `seconds` have passed (or
/// every worker has returned), samples the CPU and memory of the `sample` processes
/// (each with its descendants) meanwhile, merges what the workers recorded and prints
/// the report, then one line per sampled process tree.
pub async fn run_for<F, Fut>(
    names: &'static [&'static str],
    connections: usize,
    seconds: u64,
    sample: &[u32],
    worker: F,
) -> anyhow::Result<()>
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Recorder> + Send + 'static,
{
    run_and_report(names, connections, seconds, sample, worker, |all| {
        all.count(0)
    })
    .await
}

/// [`run_for`] with the sampled CPU reported per operation of any kind (not per
/// operation of the first kind).
pub async fn run_for_each_op<F, Fut>(
    names: &'static [&'static str],
    connections: usize,
    seconds: u64,
    sample: &[u32],
    worker: F,
) -> anyhow::Result<()>
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Recorder> + Send + 'static,
{
    run_and_report(names, connections, seconds, sample, worker, |all| {
        all.latencies.iter().map(Vec::len).sum()
    })
    .await
}

async fn run_and_report<F, Fut>(
    names: &'static [&'static str],
    connections: usize,
    seconds: u64,
    sample: &[u32],
    worker: F,
    per_op: impl Fn(&Recorder) -> usize,
) -> anyhow::Result<()>
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Recorder> + Send + 'static,
{
    let sampler = Sampler::start(sample);
    let (mut all, elapsed) = run_workers(names, connections, seconds, worker).await?;
    let per = per_op(&all);
    all.report(elapsed);
    sampler.report(elapsed, per).await;
    Ok(())
}

/// Runs `worker(id, deadline)` on `connections` tasks until `seconds` have passed (or
/// every worker has returned); returns what they recorded, merged, and the seconds
/// it took.
pub async fn run_workers<F, Fut>(
    names: &'static [&'static str],
    connections: usize,
    seconds: u64,
    worker: F,
) -> anyhow::Result<(Recorder, f64)>
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Recorder> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..connections)
        .map(|id| tokio::spawn(worker(id, deadline)))
        .collect();
    let mut all = Recorder::new(names);
    for w in workers {
        all.merge(w.await?);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

/// The `p` quantile of sorted microsecond values, in milliseconds.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// xorshift64: the same operation mix on every run for a given connection.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self((seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A plain-text TCP connection read line by line.
pub struct Lines {
    pub r: BufReader<OwnedReadHalf>,
    pub w: OwnedWriteHalf,
}

impl Lines {
    pub async fn connect(server: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(server).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Self {
            r: BufReader::new(r),
            w,
        })
    }

    /// The next line with its CRLF; an error at the end of the stream.
    pub async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line).await? == 0 {
            bail!("connection closed by the server");
        }
        Ok(line)
    }

    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.w.write_all(line.as_bytes()).await?;
        self.w.write_all(b"\r\n").await?;
        Ok(())
    }
}

/// Samples process trees from /proc while a load runs: CPU time (user + system, of
/// the root and every descendant seen, including those that exited between samples)
/// and memory as the proportional set size (PSS: shared pages divided among the
/// processes that share them, so a tree of forked workers is not counted many times
/// over) — the tree's sum, its peak and its last value.
pub struct Sampler {
    trees: Arc<Mutex<Vec<Tree>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Tree {
    root: u32,
    name: String,
    /// CPU ticks per process at its first and latest sample.
    ticks: HashMap<u32, (u64, u64)>,
    pss_kb: u64,
    pss_peak_kb: u64,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(250);

impl Sampler {
    pub fn start(roots: &[u32]) -> Self {
        let trees: Vec<Tree> = roots
            .iter()
            .map(|&root| Tree {
                root,
                name: std::fs::read_to_string(format!("/proc/{root}/comm"))
                    .map(|n| n.trim().to_owned())
                    .unwrap_or_else(|_| "?".into()),
                ticks: HashMap::new(),
                pss_kb: 0,
                pss_peak_kb: 0,
            })
            .collect();
        let trees = Arc::new(Mutex::new(trees));
        if roots.is_empty() {
            return Self { trees, task: None };
        }
        sample(&trees);
        let shared = trees.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(SAMPLE_EVERY).await;
                let trees = shared.clone();
                // Reading /proc is blocking file I/O.
                let _ = tokio::task::spawn_blocking(move || sample(&trees)).await;
            }
        });
        Self {
            trees,
            task: Some(task),
        }
    }

    /// Prints, per sampled tree, `process NAME pid P cpu_s C cores K cpu_ms_per_op M
    /// pss_peak_mb R pss_end_mb E` (`per_op` operations of the report's first kind).
    pub async fn report(mut self, elapsed_secs: f64, per_op: usize) {
        let Some(task) = self.task.take() else {
            return;
        };
        task.abort();
        let _ = task.await;
        sample(&self.trees);
        let ticks_per_sec = clock_ticks();
        for t in self.trees.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let ticks: u64 = t.ticks.values().map(|(first, last)| last - first).sum();
            let cpu = ticks as f64 / ticks_per_sec;
            println!(
                "process {} pid {} cpu_s {:.2} cores {:.2} cpu_ms_per_op {:.3} pss_peak_mb {:.1} pss_end_mb {:.1}",
                t.name,
                t.root,
                cpu,
                cpu / elapsed_secs,
                cpu * 1000.0 / per_op.max(1) as f64,
                t.pss_peak_kb as f64 / 1024.0,
                t.pss_kb as f64 / 1024.0
            );
        }
    }
}

/// One sample of every tree: walks /proc once for parent links.
fn sample(trees: &Mutex<Vec<Tree>>) {
    let mut ticks_of: HashMap<u32, u64> = HashMap::new();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some((parent, ticks)) = stat(pid) {
                ticks_of.insert(pid, ticks);
                children.entry(parent).or_default().push(pid);
            }
        }
    }
    let mut trees = trees.lock().unwrap_or_else(|e| e.into_inner());
    for tree in trees.iter_mut() {
        let mut members = vec![tree.root];
        let mut i = 0;
        while i < members.len() {
            let parent = members[i];
            members.extend(children.get(&parent).into_iter().flatten());
            i += 1;
        }
        let mut pss = 0;
        for &pid in &members {
            if let Some(&ticks) = ticks_of.get(&pid) {
                tree.ticks
                    .entry(pid)
                    .and_modify(|(_, last)| *last = ticks)
                    .or_insert((ticks, ticks));
            }
            pss += pss_kb(pid).unwrap_or(0);
        }
        tree.pss_kb = pss;
        tree.pss_peak_kb = tree.pss_peak_kb.max(pss);
    }
}

/// The parent and the CPU ticks (user + system) of a process, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let parent = fields.get(1)?.parse().ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((parent, user + system))
}

/// PSS in KiB from /proc/PID/smaps_rollup (reading another user's needs root).
fn pss_kb(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 where it cannot be
/// asked).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
