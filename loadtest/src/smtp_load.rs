//! An SMTP load generator, as an MTA handing mail to an MX (inbound) or as users'
//! clients submitting it (`--starttls` or `--tls`, then `--auth`).
//!
//! `--sessions` connections share `--messages` messages of about `--size` bytes. Each
//! connection greets (EHLO), upgrades to TLS and authenticates when asked, sends up to
//! `--per-session` messages (one transaction each; MAIL, RCPT and DATA in one write
//! with `--pipelining` when the server offers PIPELINING), QUITs and connects again,
//! until every message is accepted. A refused message or a broken session counts as
//! an error and its message is sent again, at most `--max-errors` times in all.
//! Reports messages/s, p50/p99 per step and errors. With `--delivered-check`, it then
//! runs that shell command every 100 ms until it succeeds (e.g. "all N messages are
//! in the mailbox or at the sink") and reports the delivery rate too. Last come the
//! CPU and memory of the `--sample-pid` processes over the whole run (accepting and,
//! with a check, delivering). The server's certificate is not verified.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Parser;
use mailmesh_loadtest::{Recorder, Sampler};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

#[derive(Parser, Clone)]
struct Args {
    /// host:port of the SMTP server.
    #[arg(long)]
    server: String,
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Message size in bytes, headers included.
    #[arg(long, default_value_t = 10_240)]
    size: usize,
    /// Messages per connection before it QUITs and connects again.
    #[arg(long, default_value_t = 10)]
    per_session: u64,
    /// Envelope sender and From header.
    #[arg(long, default_value = "bench@example.org")]
    from: String,
    /// A recipient of every message (repeatable).
    #[arg(long, default_values_t = ["alice@acme.test".to_owned()])]
    to: Vec<String>,
    #[arg(long, default_value = "client.example.org")]
    helo: String,
    /// MAIL, RCPT and DATA in one write (RFC 2920) when the server offers PIPELINING.
    #[arg(long)]
    pipelining: bool,
    /// STARTTLS after the first EHLO.
    #[arg(long, conflicts_with = "tls")]
    starttls: bool,
    /// TLS from the first byte (port 465, RFC 8314).
    #[arg(long)]
    tls: bool,
    /// AUTH PLAIN as USER:PASSWORD.
    #[arg(long)]
    auth: Option<String>,
    #[arg(long, default_value_t = 100)]
    max_errors: u64,
    /// Gives up after this many seconds even if messages remain.
    #[arg(long, default_value_t = 900)]
    seconds: u64,
    /// Processes whose CPU and memory (with their descendants') are sampled during
    /// the run and reported after it (repeatable).
    #[arg(long)]
    sample_pid: Vec<u32>,
    /// A shell command that succeeds once every message has been delivered.
    #[arg(long)]
    delivered_check: Option<String>,
}

/// The steps of the report; the first is what the run counts.
const OPS: &[&str] = &["message", "connect", "starttls", "auth", "quit"];
const MESSAGE: usize = 0;
const CONNECT: usize = 1;
const STARTTLS: usize = 2;
const AUTH: usize = 3;
const QUIT: usize = 4;

/// The messages left to send and the errors so far, shared by the connections.
struct Budget {
    left: AtomicU64,
    next: AtomicU64,
    errors: AtomicU64,
    max_errors: u64,
}

impl Budget {
    /// A message to send (its number, for the Message-ID), or None when all are
    /// taken or too many errors happened.
    fn take(&self) -> Option<u64> {
        if self.errors.load(Ordering::Relaxed) > self.max_errors {
            return None;
        }
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()?;
        Some(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// A taken message that was not accepted goes back.
    fn give_back(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.left.fetch_add(1, Ordering::Relaxed);
    }

    fn exhausted(&self) -> bool {
        self.left.load(Ordering::Relaxed) == 0
            || self.errors.load(Ordering::Relaxed) > self.max_errors
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One client connection, plain or TLS.
struct Smtp {
    io: BufReader<Box<dyn Io>>,
    line: String,
}

impl Smtp {
    fn new(io: Box<dyn Io>) -> Self {
        Self {
            io: BufReader::new(io),
            line: String::new(),
        }
    }

    /// Writes and flushes (TLS buffers its records).
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let io = self.io.get_mut();
        io.write_all(bytes).await?;
        io.flush().await?;
        Ok(())
    }

    /// Reads one reply, all its lines, and fails unless its code is `class`xx.
    async fn expect(&mut self, what: &str, class: u16) -> anyhow::Result<String> {
        let mut text = String::new();
        loop {
            self.line.clear();
            if self.io.read_line(&mut self.line).await? == 0 {
                bail!("{what}: connection closed by the server");
            }
            text.push_str(&self.line);
            if self.line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        let code: u16 = text
            .get(..3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("{what}: not an SMTP reply: {text:?}"))?;
        if code / 100 != class {
            bail!("{what}: {}", text.trim_end());
        }
        Ok(text)
    }

    /// EHLO; returns whether the server offers PIPELINING.
    async fn ehlo(&mut self, helo: &str) -> anyhow::Result<bool> {
        self.send(format!("EHLO {helo}\r\n").as_bytes()).await?;
        let reply = self.expect("EHLO", 2).await?;
        Ok(reply.lines().any(|l| {
            l.get(4..)
                .is_some_and(|k| k.trim().eq_ignore_ascii_case("PIPELINING"))
        }))
    }
}

/// Everything a connection needs, shared.
struct Run {
    args: Args,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    /// The message after its headers: lines of text, ending in CRLF.
    body: Vec<u8>,
    /// The envelope commands, the same for every message: MAIL, each RCPT, and all of
    /// them with DATA in one batch for PIPELINING.
    mail: String,
    rcpts: Vec<String>,
    pipelined: String,
    budget: Budget,
}

impl Run {
    fn message(&self, id: usize, n: u64) -> Vec<u8> {
        let mut m = format!(
            "From: <{}>\r\nTo: <{}>\r\nSubject: load {n}\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{n}.{id}@loadtest.example>\r\n\r\n",
            self.args.from, self.args.to[0]
        )
        .into_bytes();
        m.extend_from_slice(&self.body);
        m.extend_from_slice(b".\r\n");
        m
    }
}

/// Lines of 76 letters and CRLF up to `size` bytes (none starts with a dot).
fn body(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 80);
    let mut k = 0u8;
    while body.len() < size {
        body.extend((0..76).map(|i| b'a' + (i + k) % 26));
        body.extend_from_slice(b"\r\n");
        k = k.wrapping_add(1);
    }
    body
}

async fn session(run: &Run, id: usize, stats: &mut Recorder) -> anyhow::Result<()> {
    let args = &run.args;
    let t = Instant::now();
    let tcp = TcpStream::connect(&args.server).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = if args.tls {
        Box::new(run.tls.connect(run.server_name.clone(), tcp).await?)
    } else {
        Box::new(tcp)
    };
    let mut s = Smtp::new(io);
    s.expect("greeting", 2).await?;
    let mut pipelining = s.ehlo(&args.helo).await?;
    stats.done(CONNECT, t);
    if args.starttls {
        let t = Instant::now();
        s.send(b"STARTTLS\r\n").await?;
        s.expect("STARTTLS", 2).await?;
        // The server sends nothing more before the handshake: the buffer is empty.
        let plain = s.io.into_inner();
        s = Smtp::new(Box::new(
            run.tls.connect(run.server_name.clone(), plain).await?,
        ));
        pipelining = s.ehlo(&args.helo).await?;
        stats.done(STARTTLS, t);
    }
    if let Some(credentials) = &args.auth {
        let (user, password) = credentials
            .split_once(':')
            .context("--auth takes USER:PASSWORD")?;
        let t = Instant::now();
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        s.send(format!("AUTH PLAIN {token}\r\n").as_bytes()).await?;
        s.expect("AUTH", 2).await?;
        stats.done(AUTH, t);
    }
    let pipelining = pipelining && args.pipelining;
    for _ in 0..args.per_session {
        let Some(n) = run.budget.take() else { break };
        let t = Instant::now();
        if let Err(e) = transaction(run, &mut s, pipelining, id, n).await {
            run.budget.give_back();
            return Err(e);
        }
        stats.done(MESSAGE, t);
    }
    let t = Instant::now();
    s.send(b"QUIT\r\n").await?;
    s.expect("QUIT", 2).await?;
    stats.done(QUIT, t);
    Ok(())
}

async fn transaction(
    run: &Run,
    s: &mut Smtp,
    pipelining: bool,
    id: usize,
    n: u64,
) -> anyhow::Result<()> {
    if pipelining {
        s.send(run.pipelined.as_bytes()).await?;
        s.expect("MAIL", 2).await?;
        for _ in &run.rcpts {
            s.expect("RCPT", 2).await?;
        }
    } else {
        s.send(run.mail.as_bytes()).await?;
        s.expect("MAIL", 2).await?;
        for r in &run.rcpts {
            s.send(r.as_bytes()).await?;
            s.expect("RCPT", 2).await?;
        }
        s.send(b"DATA\r\n").await?;
    }
    s.expect("DATA", 3).await?;
    s.send(&run.message(id, n)).await?;
    s.expect("end of data", 2).await?;
    Ok(())
}

async fn worker(run: Arc<Run>, id: usize, deadline: Instant) -> Recorder {
    let mut stats = Recorder::new(OPS);
    while Instant::now() < deadline && !run.budget.exhausted() {
        if let Err(e) = session(&run, id, &mut stats).await {
            stats.failed(id, &e).await;
        }
    }
    stats
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = args
        .server
        .rsplit_once(':')
        .map_or(args.server.as_str(), |(h, _)| h)
        .trim_matches(['[', ']']);
    let server_name = ServerName::try_from(host.to_owned()).context("--server host")?;
    let mail = format!("MAIL FROM:<{}>\r\n", args.from);
    let rcpts: Vec<String> = args
        .to
        .iter()
        .map(|r| format!("RCPT TO:<{r}>\r\n"))
        .collect();
    let pipelined = format!("{mail}{}DATA\r\n", rcpts.concat());
    let run = Arc::new(Run {
        mail,
        rcpts,
        pipelined,
        tls: TlsConnector::from(mailmesh_kit::tls::opportunistic_client_config()),
        server_name,
        body: body(args.size.saturating_sub(200)),
        budget: Budget {
            left: AtomicU64::new(args.messages),
            next: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            max_errors: args.max_errors,
        },
        args: args.clone(),
    });
    let started = Instant::now();
    let sampler = Sampler::start(&args.sample_pid);
    let (mut stats, elapsed) =
        mailmesh_loadtest::run_workers(OPS, args.sessions, args.seconds, |id, deadline| {
            worker(run.clone(), id, deadline)
        })
        .await?;
    stats.report(elapsed);
    let left = run.budget.left.load(Ordering::Relaxed);
    if left > 0 {
        bail!("{left} of {} messages not accepted", args.messages);
    }
    if let Some(check) = &args.delivered_check {
        let deadline = started + Duration::from_secs(args.seconds);
        let check_once = || {
            let check = check.clone();
            // A blocking child, waited for off the runtime's workers.
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("sh")
                    .args(["-c", &check])
                    .status()
                    .is_ok_and(|s| s.success())
            })
        };
        while !check_once().await? {
            if Instant::now() > deadline {
                bail!("not all delivered after {} s: {check}", args.seconds);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "delivered/s {:.0} seconds {seconds:.1}",
            args.messages as f64 / seconds
        );
    }
    sampler
        .report(started.elapsed().as_secs_f64(), stats.count(MESSAGE))
        .await;
    Ok(())
}
