//! What the load generators share: latency recording and the report format, a small
//! deterministic random source, and a line-oriented client connection.

use std::time::Instant;

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

    /// Counts a failed session of connection `id` (printing its first three) and
    /// pauses a moment before the connection tries again.
    pub async fn failed(&mut self, id: usize, error: &anyhow::Error) {
        self.errors += 1;
        if self.errors <= 3 {
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
    pub fn report(mut self, elapsed_secs: f64) {
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

/// Runs `worker(id, deadline)` on `connections` tasks until `seconds` have passed,
/// merges what they recorded and prints the report.
pub async fn run_for<F, Fut>(
    names: &'static [&'static str],
    connections: usize,
    seconds: u64,
    worker: F,
) -> anyhow::Result<()>
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Recorder> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + std::time::Duration::from_secs(seconds);
    let workers: Vec<_> = (0..connections)
        .map(|id| tokio::spawn(worker(id, deadline)))
        .collect();
    let mut all = Recorder::new(names);
    for w in workers {
        all.merge(w.await?);
    }
    all.report(started.elapsed().as_secs_f64());
    Ok(())
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
