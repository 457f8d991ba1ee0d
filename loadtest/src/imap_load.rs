//! An IMAP load generator with two scenarios.
//!
//! - **mixed** (default): C connections, each logging in, selecting INBOX and running
//!   a mix of FETCH, SEARCH, STORE and NOOP, logging out after every
//!   `--ops-per-login` operations, for `--seconds`. Reports operations and logins per
//!   second, p50/p99 latency per operation and errors.
//! - **commands** (`--commands`): C connections, each logged in once (connection N
//!   as user N), running SELECT, FETCH, SEARCH, STORE, APPEND, EXPUNGE and NOOP for
//!   `--seconds`: what each command costs without logins. CPU per operation is per
//!   command.
//! - **idle** (`--idle K`): K connections log in (at most `--setup-concurrency` at
//!   once), select INBOX and enter IDLE; once all are idling it prints `idling K`, holds
//!   them for `--hold` seconds, counting the connections that were told of a new
//!   message (`* N EXISTS`) meanwhile, then ends IDLE and logs out of each. The caller
//!   measures the server's memory during the hold and delivers a message to see the
//!   pushes arrive.
//!
//! Plain IMAP on loopback (the servers under test allow LOGIN without TLS there), so
//! TLS cost is not measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use mailmesh_loadtest::{Lines, Recorder, Rng};
use tokio::io::AsyncReadExt;

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
    /// The commands scenario (instead of the mixed one): each connection logs in
    /// once, as user N for connection N, and runs commands until the end.
    #[arg(long)]
    commands: bool,
    /// The idle scenario with this many connections (instead of the mixed one).
    #[arg(long)]
    idle: Option<usize>,
    /// Seconds the idle connections are held once all are idling.
    #[arg(long, default_value_t = 30)]
    hold: u64,
    /// Idle connections being set up at once.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Processes whose CPU and memory (with their descendants') are sampled during
    /// the run and reported after it (repeatable).
    #[arg(long)]
    sample_pid: Vec<u32>,
}

/// The operations of the mixed scenario, in the order of the report.
const OPS: &[&str] = &[
    "login",
    "select",
    "fetch_flags",
    "fetch_body",
    "search",
    "store",
    "noop",
    "logout",
];

struct Conn {
    io: Lines,
    next: u32,
}

impl Conn {
    async fn open(server: &str) -> anyhow::Result<Self> {
        let mut io = Lines::connect(server).await?;
        let greeting = io.line().await?;
        if !greeting.starts_with("* OK") {
            bail!("greeting: {greeting}");
        }
        Ok(Self { io, next: 0 })
    }

    fn tag(&mut self) -> String {
        self.next += 1;
        format!("t{}", self.next)
    }

    /// Sends a command and reads to its tagged reply (literals included); returns
    /// the untagged lines. A NO or BAD is an error.
    async fn cmd(&mut self, command: &str) -> anyhow::Result<Vec<String>> {
        let tag = self.tag();
        self.io.send(&format!("{tag} {command}")).await?;
        self.until(&tag, command).await
    }

    async fn until(&mut self, tag: &str, command: &str) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let line = self.io.line().await?;
            // A literal: {n} at the end of the line, then n bytes.
            if let Some(n) = line
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                let mut body = vec![0; n];
                self.io.r.read_exact(&mut body).await?;
            }
            if let Some(rest) = line.strip_prefix(tag).and_then(|l| l.strip_prefix(' ')) {
                if rest.starts_with("OK") {
                    return Ok(lines);
                }
                bail!("{command}: {}", rest.trim_end());
            }
            lines.push(line);
        }
    }

    /// APPEND with a synchronising literal (the server's `+` first).
    async fn append(&mut self, mailbox: &str, message: &str) -> anyhow::Result<Vec<String>> {
        let tag = self.tag();
        self.io
            .send(&format!("{tag} APPEND {mailbox} {{{}}}", message.len()))
            .await?;
        let go = self.io.line().await?;
        if !go.starts_with('+') {
            bail!("APPEND: {}", go.trim_end());
        }
        self.io.send(message).await?;
        self.until(&tag, "APPEND").await
    }

    async fn login_and_select(&mut self, user: &str, password: &str) -> anyhow::Result<u64> {
        self.cmd(&format!("LOGIN {user} {password}")).await?;
        exists(&self.cmd("SELECT INBOX").await?)
    }
}

/// The message count of a SELECT's untagged replies.
fn exists(selected: &[String]) -> anyhow::Result<u64> {
    selected
        .iter()
        .find_map(|l| {
            l.strip_prefix("* ")?
                .strip_suffix(" EXISTS\r\n")?
                .parse()
                .ok()
        })
        .context("no EXISTS")
}

fn user(args: &Args, n: usize) -> String {
    format!("user{}@{}", n % args.users, args.domain)
}

async fn mixed_worker(args: Args, id: usize, deadline: Instant) -> Recorder {
    let mut stats = Recorder::new(OPS);
    let mut random = Rng::new(id as u64);
    while Instant::now() < deadline {
        let user = user(&args, id + random.below(args.users as u64) as usize);
        let session = async {
            let mut c = Conn::open(&args.server).await?;
            let t = Instant::now();
            c.cmd(&format!("LOGIN {user} {}", args.password)).await?;
            stats.done(0, t);
            let t = Instant::now();
            let exists = exists(&c.cmd("SELECT INBOX").await?)?;
            stats.done(1, t);
            for _ in 0..args.ops_per_login {
                if Instant::now() >= deadline {
                    break;
                }
                let n = 1 + random.below(exists);
                let (op, command) = match random.below(10) {
                    0..=2 => (2, "FETCH 1:* (UID FLAGS)".to_owned()),
                    3..=5 => (3, format!("FETCH {n} (BODY.PEEK[] RFC822.SIZE)")),
                    6 => (4, "SEARCH UNSEEN SINCE 1-Jan-2020".to_owned()),
                    7 | 8 => (
                        5,
                        format!(
                            "STORE {n} {}FLAGS.SILENT (\\Seen)",
                            if random.below(2) == 0 { "+" } else { "-" }
                        ),
                    ),
                    _ => (6, "NOOP".to_owned()),
                };
                let t = Instant::now();
                c.cmd(&command).await?;
                stats.done(op, t);
            }
            let t = Instant::now();
            c.cmd("LOGOUT").await.ok();
            stats.done(7, t);
            anyhow::Ok(())
        };
        if let Err(e) = session.await {
            stats.failed(id, &e).await;
        }
    }
    stats
}

async fn mixed(args: Args) -> anyhow::Result<()> {
    let (connections, seconds, sample) = (args.connections, args.seconds, args.sample_pid.clone());
    mailmesh_loadtest::run_for(OPS, connections, seconds, &sample, |id, deadline| {
        mixed_worker(args.clone(), id, deadline)
    })
    .await
}

/// The operations of the commands scenario, in the order of the report.
const COMMAND_OPS: &[&str] = &[
    "select",
    "fetch_flags",
    "fetch_body",
    "search",
    "store",
    "append",
    "expunge",
    "noop",
];

/// A message of about 3 KiB for APPEND.
fn appended(id: usize, n: u64) -> String {
    let mut m = format!(
        "From: Bob <bob@example.org>\r\nTo: user@acme.test\r\nSubject: appended {id}.{n}\r\n\
         Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a{id}.{n}@example.org>\r\n\r\n"
    );
    for line in 0..40 {
        m.push_str(&format!(
            "line {line} of an appended message {}\r\n",
            "y".repeat(50)
        ));
    }
    m
}

/// Follows the message count through a command's untagged replies.
fn track(exists: &mut u64, lines: &[String]) {
    for l in lines {
        let Some(rest) = l.strip_prefix("* ") else {
            continue;
        };
        if let Some(n) = rest
            .strip_suffix(" EXISTS\r\n")
            .and_then(|n| n.parse().ok())
        {
            *exists = n;
        } else if rest.ends_with(" EXPUNGE\r\n") {
            *exists = exists.saturating_sub(1);
        }
    }
}

/// One connection of the commands scenario: logs in once as its own user, then runs
/// commands until the deadline (per 20: 2 SELECT, 4 FETCH 1:* FLAGS, 4 FETCH of one
/// body, 2 SEARCH, 3 STORE, 2 APPEND, 2 EXPUNGE of one message, 1 NOOP), so the
/// mailbox stays about its size.
async fn commands_worker(args: Args, id: usize, deadline: Instant) -> Recorder {
    let mut stats = Recorder::new(COMMAND_OPS);
    let mut random = Rng::new(id as u64);
    let user = user(&args, id);
    let session = async {
        let mut c = Conn::open(&args.server).await?;
        c.cmd(&format!("LOGIN {user} {}", args.password)).await?;
        let mut exists = exists(&c.cmd("SELECT INBOX").await?)?;
        let mut appends = 0;
        while Instant::now() < deadline {
            let n = 1 + random.below(exists.max(1));
            let t = Instant::now();
            let (op, lines) = match random.below(20) {
                0 | 1 => (0, c.cmd("SELECT INBOX").await?),
                2..=5 => (1, c.cmd("FETCH 1:* (UID FLAGS)").await?),
                6..=9 => (
                    2,
                    c.cmd(&format!("FETCH {n} (BODY.PEEK[] RFC822.SIZE)"))
                        .await?,
                ),
                10 | 11 => (3, c.cmd("SEARCH UNSEEN SINCE 1-Jan-2020").await?),
                12..=14 => {
                    let sign = if random.below(2) == 0 { "+" } else { "-" };
                    (
                        4,
                        c.cmd(&format!("STORE {n} {sign}FLAGS.SILENT (\\Seen)"))
                            .await?,
                    )
                }
                15 | 16 => {
                    appends += 1;
                    (5, c.append("INBOX", &appended(id, appends)).await?)
                }
                17 | 18 if exists > 1 => {
                    let mut lines = c
                        .cmd(&format!("STORE {n} +FLAGS.SILENT (\\Deleted)"))
                        .await?;
                    lines.extend(c.cmd("EXPUNGE").await?);
                    (6, lines)
                }
                _ => (7, c.cmd("NOOP").await?),
            };
            stats.done(op, t);
            track(&mut exists, &lines);
        }
        c.cmd("LOGOUT").await.ok();
        anyhow::Ok(())
    };
    if let Err(e) = session.await {
        stats.failed(id, &e).await;
    }
    stats
}

async fn commands(args: Args) -> anyhow::Result<()> {
    let (connections, seconds, sample) = (args.connections, args.seconds, args.sample_pid.clone());
    mailmesh_loadtest::run_for_each_op(
        COMMAND_OPS,
        connections,
        seconds,
        &sample,
        |id, deadline| commands_worker(args.clone(), id, deadline),
    )
    .await
}

/// Counters of the idle scenario, shared by its connections.
#[derive(Default)]
struct Idle {
    idling: AtomicU64,
    /// Connections that failed before idling.
    failed: AtomicU64,
    pushed: AtomicU64,
    /// Connections dropped while idling, or that failed to end IDLE and log out.
    release_failed: AtomicU64,
}

/// One idle connection: set up, reports itself idling, waits for `release` while
/// counting a push, then ends IDLE and logs out.
async fn idle_connection(
    args: Arc<Args>,
    id: usize,
    setup: Arc<tokio::sync::Semaphore>,
    counters: Arc<Idle>,
    mut release: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let permit = setup.acquire().await?;
    let mut c = Conn::open(&args.server).await?;
    c.login_and_select(&user(&args, id), &args.password).await?;
    let tag = c.tag();
    c.io.send(&format!("{tag} IDLE")).await?;
    loop {
        let line = c.io.line().await?;
        if line.starts_with('+') {
            break;
        }
        if line.starts_with(&tag) {
            bail!("IDLE refused: {}", line.trim_end());
        }
    }
    drop(permit);
    counters.idling.fetch_add(1, Ordering::Relaxed);
    let release_failed = || {
        counters.release_failed.fetch_add(1, Ordering::Relaxed);
    };
    let mut pushed = false;
    loop {
        tokio::select! {
            _ = release.changed() => break,
            line = c.io.line() => {
                // Dropped by the server while idling.
                let Ok(line) = line else {
                    release_failed();
                    return Ok(());
                };
                if !pushed && line.starts_with("* ") && line.trim_end().ends_with(" EXISTS") {
                    pushed = true;
                    counters.pushed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    let end = async {
        c.io.send("DONE").await?;
        c.until(&tag, "IDLE").await?;
        c.cmd("LOGOUT").await
    };
    if let Err(e) = end.await
        && counters.release_failed.fetch_add(1, Ordering::Relaxed) < 3
    {
        eprintln!("connection {id} after the hold: {e:#}");
    }
    Ok(())
}

async fn idle(args: Args, connections: usize) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let setup = Arc::new(tokio::sync::Semaphore::new(args.setup_concurrency.max(1)));
    let counters = Arc::new(Idle::default());
    let (release, released) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|id| {
            let (args, setup, counters) = (args.clone(), setup.clone(), counters.clone());
            let released = released.clone();
            tokio::spawn(async move {
                let result = idle_connection(args, id, setup, counters.clone(), released).await;
                if let Err(e) = result
                    && counters.failed.fetch_add(1, Ordering::Relaxed) < 3
                {
                    eprintln!("connection {id}: {e:#}");
                }
            })
        })
        .collect();
    // Until every connection is idling or has failed.
    loop {
        let (idling, failed) = (
            counters.idling.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed),
        );
        if (idling + failed) as usize >= connections {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let set_up = started.elapsed().as_secs_f64();
    println!(
        "idling {} failed {} setup_seconds {set_up:.1}",
        counters.idling.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let pushed = counters.pushed.load(Ordering::Relaxed);
    release.send(true)?;
    for t in tasks {
        t.await?;
    }
    println!(
        "pushed {pushed} dropped_or_failed_after_idling {} total_seconds {:.1}",
        counters.release_failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use std::io::Write;
    let args = Args::parse();
    match args.idle {
        Some(n) => idle(args, n).await?,
        None if args.commands => commands(args).await?,
        None => mixed(args).await?,
    }
    std::io::stdout().flush()?;
    Ok(())
}
