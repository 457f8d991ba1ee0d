//! A POP3 load generator: C connections, connection i working on maildrop
//! `user{i mod users}` (POP3 locks a maildrop per session, so give each connection its
//! own user), each logging in (USER/PASS), running STAT and UIDL, then
//! `--ops-per-login` operations (50% RETR, 20% LIST, 10% TOP n 10, 20% DELE), RSET
//! (so the maildrop stays as it was) and QUIT, for `--seconds`. Reports operations and
//! logins per second, p50/p99 per operation and errors. Plain POP3 on loopback.

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use mailmesh_loadtest::{Lines, Recorder, Rng};

#[derive(Parser, Clone)]
struct Args {
    /// host:port of the POP3 server.
    #[arg(long)]
    server: String,
    #[arg(long, default_value_t = 8)]
    users: usize,
    #[arg(long, default_value = "acme.test")]
    domain: String,
    #[arg(long, default_value = "pw")]
    password: String,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 20)]
    ops_per_login: usize,
    /// Processes whose CPU and memory (with their descendants') are sampled during
    /// the run and reported after it (repeatable).
    #[arg(long)]
    sample_pid: Vec<u32>,
}

const OPS: &[&str] = &[
    "login", "stat", "uidl", "retr", "list", "top", "dele", "rset", "quit",
];

/// Sends a command and reads its status line; with `multi`, also the multi-line
/// body to its terminating dot. Returns the status line. `-ERR` is an error.
async fn cmd(io: &mut Lines, command: &str, multi: bool) -> anyhow::Result<String> {
    io.send(command).await?;
    let status = io.line().await?;
    if !status.starts_with("+OK") {
        let shown = if command.starts_with("PASS") {
            "PASS"
        } else {
            command
        };
        bail!("{shown}: {}", status.trim_end());
    }
    if multi {
        while io.line().await? != ".\r\n" {}
    }
    Ok(status)
}

async fn worker(args: Args, id: usize, deadline: Instant) -> Recorder {
    let mut stats = Recorder::new(OPS);
    let mut random = Rng::new(id as u64);
    let user = format!("user{}@{}", id % args.users, args.domain);
    while Instant::now() < deadline {
        let session = async {
            let mut io = Lines::connect(&args.server).await?;
            if !io.line().await?.starts_with("+OK") {
                bail!("no greeting");
            }
            let t = Instant::now();
            cmd(&mut io, &format!("USER {user}"), false).await?;
            cmd(&mut io, &format!("PASS {}", args.password), false).await?;
            stats.done(0, t);
            let t = Instant::now();
            let status = cmd(&mut io, "STAT", false).await?;
            stats.done(1, t);
            let messages: u64 = status
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .context("STAT without a count")?;
            let t = Instant::now();
            cmd(&mut io, "UIDL", true).await?;
            stats.done(2, t);
            let mut deleted = std::collections::HashSet::new();
            for _ in 0..args.ops_per_login {
                if Instant::now() >= deadline || messages == 0 {
                    break;
                }
                let mut n = 1 + random.below(messages);
                while deleted.contains(&n) && deleted.len() < messages as usize {
                    n = n % messages + 1;
                }
                let (op, command, multi) = match random.below(10) {
                    0..=4 => (3, format!("RETR {n}"), true),
                    5 | 6 => (4, "LIST".to_owned(), true),
                    7 => (5, format!("TOP {n} 10"), true),
                    _ => {
                        deleted.insert(n);
                        (6, format!("DELE {n}"), false)
                    }
                };
                let t = Instant::now();
                cmd(&mut io, &command, multi).await?;
                stats.done(op, t);
            }
            let t = Instant::now();
            cmd(&mut io, "RSET", false).await?;
            stats.done(7, t);
            let t = Instant::now();
            cmd(&mut io, "QUIT", false).await?;
            stats.done(8, t);
            anyhow::Ok(())
        };
        if let Err(e) = session.await {
            stats.failed(id, &e).await;
        }
    }
    stats
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (connections, seconds, sample) = (args.connections, args.seconds, args.sample_pid.clone());
    mailmesh_loadtest::run_for(OPS, connections, seconds, &sample, |id, deadline| {
        worker(args.clone(), id, deadline)
    })
    .await
}
