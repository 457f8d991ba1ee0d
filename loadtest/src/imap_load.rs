//! An IMAP load generator: C connections, each logging in, selecting INBOX and
//! running a mix of FETCH, SEARCH, STORE and NOOP, logging out after every
//! `--ops-per-login` operations, for `--seconds`. Reports operations and logins per
//! second, p50/p99 latency per operation and errors. Plain IMAP on loopback (the
//! servers under test allow LOGIN without TLS there), so TLS cost is not measured.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    /// host:port of the IMAP server.
    #[arg(long)]
    server: String,
    /// Users are `user{N}@{domain}` for N in 0..users, all with `password`.
    #[arg(long, default_value_t = 8)]
    users: usize,
    #[arg(long, default_value = "acme.test")]
    domain: String,
    #[arg(long, default_value = "pw")]
    password: String,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 20)]
    ops_per_login: usize,
}

/// The operations, in the order of the report.
const OPS: [&str; 8] = [
    "login",
    "select",
    "fetch_flags",
    "fetch_body",
    "search",
    "store",
    "noop",
    "logout",
];

#[derive(Default)]
struct Stats {
    latencies: Vec<Vec<u32>>,
    errors: u64,
}

struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    next: u32,
}

impl Conn {
    async fn open(server: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(server).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Self {
            r: BufReader::new(r),
            w,
            next: 0,
        };
        let mut greeting = String::new();
        c.r.read_line(&mut greeting).await?;
        if !greeting.starts_with("* OK") {
            bail!("greeting: {greeting}");
        }
        Ok(c)
    }

    /// Sends a command and reads to its tagged reply (literals included); returns
    /// the untagged lines. A NO or BAD is an error.
    async fn cmd(&mut self, command: &str) -> anyhow::Result<Vec<String>> {
        self.next += 1;
        let tag = format!("t{}", self.next);
        self.w
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).await? == 0 {
                bail!("connection closed during {command}");
            }
            // A literal: {n} at the end of the line, then n bytes.
            if let Some(n) = line
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                let mut body = vec![0; n];
                self.r.read_exact(&mut body).await?;
            }
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                if rest.starts_with("OK") {
                    return Ok(lines);
                }
                bail!("{command}: {}", rest.trim_end());
            }
            lines.push(line);
        }
    }
}

async fn worker(args: Args, id: usize, deadline: Instant) -> Stats {
    let mut stats = Stats {
        latencies: vec![Vec::new(); OPS.len()],
        errors: 0,
    };
    let mut rng = (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    while Instant::now() < deadline {
        let user = format!(
            "user{}@{}",
            (id + random(args.users as u64) as usize) % args.users,
            args.domain
        );
        let session = async {
            let mut c = Conn::open(&args.server).await?;
            let timed = |op: usize, started: Instant, stats: &mut Stats| {
                stats.latencies[op].push(started.elapsed().as_micros() as u32);
            };
            let t = Instant::now();
            c.cmd(&format!("LOGIN {user} {}", args.password)).await?;
            timed(0, t, &mut stats);
            let t = Instant::now();
            let selected = c.cmd("SELECT INBOX").await?;
            timed(1, t, &mut stats);
            let exists: u64 = selected
                .iter()
                .find_map(|l| {
                    l.strip_prefix("* ")?
                        .strip_suffix(" EXISTS\r\n")?
                        .parse()
                        .ok()
                })
                .context("no EXISTS")?;
            for _ in 0..args.ops_per_login {
                if Instant::now() >= deadline {
                    break;
                }
                let n = 1 + random(exists);
                let (op, command) = match random(10) {
                    0..=2 => (2, "FETCH 1:* (UID FLAGS)".to_owned()),
                    3..=5 => (3, format!("FETCH {n} (BODY.PEEK[] RFC822.SIZE)")),
                    6 => (4, "SEARCH UNSEEN SINCE 1-Jan-2020".to_owned()),
                    7 | 8 => (
                        5,
                        format!(
                            "STORE {n} {}FLAGS.SILENT (\\Seen)",
                            if random(2) == 0 { "+" } else { "-" }
                        ),
                    ),
                    _ => (6, "NOOP".to_owned()),
                };
                let t = Instant::now();
                c.cmd(&command).await?;
                timed(op, t, &mut stats);
            }
            let t = Instant::now();
            c.cmd("LOGOUT").await.ok();
            timed(7, t, &mut stats);
            anyhow::Ok(())
        };
        if let Err(e) = session.await {
            stats.errors += 1;
            if stats.errors <= 3 {
                eprintln!("worker {id}: {e:#}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stats
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let workers: Vec<_> = (0..args.connections)
        .map(|id| tokio::spawn(worker(args.clone(), id, deadline)))
        .collect();
    let mut all = Stats {
        latencies: vec![Vec::new(); OPS.len()],
        errors: 0,
    };
    for w in workers {
        let s = w.await?;
        all.errors += s.errors;
        for (i, l) in s.latencies.into_iter().enumerate() {
            all.latencies[i].extend(l);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total: usize = all.latencies.iter().map(Vec::len).sum();
    println!(
        "ops/s {:.0} logins/s {:.1} errors {} seconds {:.1}",
        total as f64 / elapsed,
        all.latencies[0].len() as f64 / elapsed,
        all.errors,
        elapsed
    );
    for (i, mut l) in all.latencies.into_iter().enumerate() {
        l.sort_unstable();
        println!(
            "{:<12} n {:>7} p50_ms {:>8.2} p99_ms {:>8.2}",
            OPS[i],
            l.len(),
            percentile(&l, 0.5),
            percentile(&l, 0.99)
        );
    }
    Ok(())
}
