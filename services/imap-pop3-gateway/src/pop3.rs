//! One POP3 session (RFC 1939), generic over the stream so tests drive it in memory.
//! Extensions: CAPA and response codes (RFC 2449, RFC 3206), STLS (RFC 2595),
//! AUTH PLAIN (RFC 5034), UIDL and TOP.
//!
//! The maildrop is the user's INBOX as it was at login. Only one session per
//! maildrop at a time, across every pod (a lock in the cache); a second one is told
//! `[IN-USE]`. Deletions are applied at QUIT only (the UPDATE state): a dropped
//! connection deletes nothing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use mailmesh_cache::LockToken;
use mailmesh_kit::Shutdown;
use mailmesh_proto::v1;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::Gateway;
use crate::login::Login;
use crate::store::Listed;

const PROTOCOL: &str = "pop3";
const MAILDROP: &str = "INBOX";

/// What the loop does after a command.
enum Next {
    Continue,
    Close,
    StartTls,
}

/// One line from the client.
enum Line {
    Text(String),
    TooLong,
    /// The connection ended, timed out or the server is stopping.
    End,
}

/// A logged-in user's view of the maildrop.
struct Maildrop {
    /// With the storage session token, renewed from `renew_at_ms` on.
    user: v1::UserRef,
    renew_at_ms: i64,
    lock_key: String,
    token: LockToken,
    /// Set by the renewal task when the lock can no longer be confirmed.
    lost: Arc<AtomicBool>,
    renewal: tokio::task::AbortHandle,
    uid_validity: u32,
    messages: Vec<Listed>,
    deleted: Vec<bool>,
}

impl Drop for Maildrop {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl Maildrop {
    fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// The message numbered `arg` (1-based), if it exists and is not deleted.
    fn message(&self, arg: Option<&str>) -> Option<(usize, &Listed)> {
        let n: usize = arg?.parse().ok()?;
        let i = n.checked_sub(1)?;
        let m = self.messages.get(i)?;
        (!self.deleted[i]).then_some((n, m))
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Listed)> {
        self.messages
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.deleted[*i])
            .map(|(i, m)| (i + 1, m))
    }
}

struct Session<'a> {
    gw: &'a Gateway,
    peer: SocketAddr,
    tls: bool,
    errors: u32,
    /// The name given with USER, waiting for PASS.
    user_name: Option<String>,
    maildrop: Option<Maildrop>,
    /// When a session that has not logged in is closed.
    login_deadline: tokio::time::Instant,
}

/// Runs a session to its end; `tls` when the connection is already encrypted.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    gw: &Gateway,
    stream: S,
    peer: SocketAddr,
    tls: bool,
    shutdown: &Shutdown,
) {
    let _gauge = crate::metrics::SessionGauge::open(PROTOCOL);
    let mut session = Session {
        gw,
        peer,
        tls,
        errors: 0,
        user_name: None,
        maildrop: None,
        login_deadline: tokio::time::Instant::now() + gw.config.login_timeout,
    };
    let mut io = BufReader::new(stream);
    let greeting = format!("+OK {} POP3 (mailmesh) ready\r\n", gw.config.hostname);
    let upgrade = match session.converse(&mut io, &greeting, shutdown).await {
        Ok(Next::StartTls) => true,
        Ok(_) => {
            let _ = io.get_mut().shutdown().await;
            false
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "pop3 session ended with an error");
            false
        }
    };
    if upgrade {
        // Whatever the client sent after STLS, before the handshake, is dropped with
        // the buffer (RFC 2595 §4: no plaintext command injection).
        let stream = io.into_inner();
        let left = session
            .login_deadline
            .saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, gw.tls.accept(stream)).await {
            Ok(Ok(tls)) => {
                session.tls = true;
                let mut io = BufReader::new(tls);
                match session.converse(&mut io, "", shutdown).await {
                    // close_notify, so the client knows the last reply was whole.
                    Ok(_) => {
                        let _ = io.get_mut().shutdown().await;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "pop3 session ended with an error");
                    }
                }
            }
            _ => crate::metrics::event(PROTOCOL, "tls_failed"),
        }
    }
    session.release().await;
}

impl Session<'_> {
    /// Reads commands and answers them until the session ends or upgrades to TLS.
    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        greeting: &str,
        shutdown: &Shutdown,
    ) -> io::Result<Next> {
        if !greeting.is_empty() {
            io.get_mut().write_all(greeting.as_bytes()).await?;
        }
        loop {
            if self.maildrop.as_ref().is_some_and(Maildrop::lost) {
                send(io, "-ERR [IN-USE] Maildrop lock lost, closing\r\n").await?;
                return Ok(Next::Close);
            }
            // Before login the whole conversation, not each line, is limited.
            let wait = if self.maildrop.is_some() {
                self.gw.config.idle_timeout
            } else {
                let left = self
                    .login_deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    // Commands pipelined before the deadline are not read after it.
                    return Ok(Next::Close);
                }
                left
            };
            let line = tokio::select! {
                line = read_line(io, self.gw.config.max_line, wait, self.gw.config.command_timeout) => line?,
                _ = shutdown.closing() => {
                    send(io, "-ERR [SYS/TEMP] Server shutting down\r\n").await?;
                    return Ok(Next::Close);
                }
            };
            let line = match line {
                Line::Text(line) => line,
                Line::End => return Ok(Next::Close),
                Line::TooLong => {
                    if self.error(io, "-ERR Line too long\r\n").await? {
                        return Ok(Next::Close);
                    }
                    continue;
                }
            };
            match self.command(io, &line).await? {
                Next::Continue => {}
                other => return Ok(other),
            }
        }
    }

    /// Counts a protocol error and answers it; true when the session must close.
    async fn error<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        reply: &str,
    ) -> io::Result<bool> {
        self.errors += 1;
        if self.errors >= self.gw.config.max_errors {
            send(io, "-ERR Too many errors, closing\r\n").await?;
            return Ok(true);
        }
        send(io, reply).await?;
        Ok(false)
    }

    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        line: &str,
    ) -> io::Result<Next> {
        let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let mut args = rest.split(' ').filter(|a| !a.is_empty());
        let known = matches!(
            keyword.as_str(),
            "CAPA"
                | "QUIT"
                | "NOOP"
                | "STLS"
                | "USER"
                | "PASS"
                | "AUTH"
                | "STAT"
                | "LIST"
                | "UIDL"
                | "RETR"
                | "TOP"
                | "DELE"
                | "RSET"
        );
        let name = if known { keyword.as_str() } else { "unknown" };
        if !self.renew_session().await {
            send(io, "-ERR [AUTH] Session ended, log in again\r\n").await?;
            return Ok(Next::Close);
        }
        let (next, ok) = match (keyword.as_str(), self.maildrop.is_some()) {
            ("CAPA", _) => {
                send(io, &self.capabilities()).await?;
                (Next::Continue, true)
            }
            ("QUIT", false) => {
                send(io, "+OK Bye\r\n").await?;
                (Next::Close, true)
            }
            ("QUIT", true) => {
                let reply = self.update().await;
                send(io, &reply).await?;
                (Next::Close, reply.starts_with("+OK"))
            }
            ("NOOP", true) => {
                send(io, "+OK\r\n").await?;
                (Next::Continue, true)
            }
            ("STLS", false) if !self.tls => {
                // RFC 2595 4: nothing said before TLS carries over.
                self.user_name = None;
                send(io, "+OK Begin TLS negotiation\r\n").await?;
                (Next::StartTls, true)
            }
            ("USER", false) => {
                let reply = if !self.may_authenticate() {
                    PLAINTEXT_REFUSED.to_owned()
                } else if rest.is_empty() {
                    "-ERR USER needs a name\r\n".to_owned()
                } else {
                    self.user_name = Some(rest.to_owned());
                    "+OK Send PASS\r\n".to_owned()
                };
                let ok = reply.starts_with("+OK");
                send(io, &reply).await?;
                (Next::Continue, ok)
            }
            ("PASS", false) => {
                let reply = match self.user_name.take() {
                    _ if !self.may_authenticate() => PLAINTEXT_REFUSED.to_owned(),
                    None => "-ERR Send USER first\r\n".to_owned(),
                    Some(name) => self.login(&name, rest).await,
                };
                let ok = reply.starts_with("+OK");
                send(io, &reply).await?;
                (Next::Continue, ok)
            }
            ("AUTH", false) => {
                let reply = self.authenticate(io, args.next(), args.next()).await?;
                let ok = reply.starts_with("+OK");
                send(io, &reply).await?;
                (Next::Continue, ok)
            }
            ("STAT", true) => {
                let m = self.maildrop.as_ref().expect("in TRANSACTION");
                let (count, octets) = m.live().fold((0, 0), |(c, o), (_, l)| (c + 1, o + l.size));
                send(io, &format!("+OK {count} {octets}\r\n")).await?;
                (Next::Continue, true)
            }
            ("LIST" | "UIDL", true) => {
                let m = self.maildrop.as_ref().expect("in TRANSACTION");
                let uidl = keyword == "UIDL";
                let entry = |n: usize, l: &Listed| {
                    if uidl {
                        format!("{n} {}.{}\r\n", m.uid_validity, l.uid)
                    } else {
                        format!("{n} {}\r\n", l.size)
                    }
                };
                let reply = match args.next() {
                    None => {
                        let mut out = String::from("+OK\r\n");
                        for (n, l) in m.live() {
                            out.push_str(&entry(n, l));
                        }
                        out.push_str(".\r\n");
                        out
                    }
                    Some(arg) => match m.message(Some(arg)) {
                        Some((n, l)) => format!("+OK {}", entry(n, l)),
                        None => NO_SUCH_MESSAGE.to_owned(),
                    },
                };
                let ok = reply.starts_with("+OK");
                send(io, &reply).await?;
                (Next::Continue, ok)
            }
            ("RETR" | "TOP", true) => {
                let which = args.next();
                let lines = if keyword == "TOP" {
                    match args.next().map(str::parse::<usize>) {
                        Some(Ok(n)) => Some(n),
                        _ => {
                            let close = self
                                .error(io, "-ERR TOP needs a message and a line count\r\n")
                                .await?;
                            return Ok(if close { Next::Close } else { Next::Continue });
                        }
                    }
                } else {
                    None
                };
                let ok = self.retrieve(io, which, lines).await?;
                (Next::Continue, ok)
            }
            ("DELE", true) => {
                let m = self.maildrop.as_mut().expect("in TRANSACTION");
                let reply = match m.message(args.next()) {
                    Some((n, _)) => {
                        m.deleted[n - 1] = true;
                        format!("+OK Message {n} deleted\r\n")
                    }
                    None => NO_SUCH_MESSAGE.to_owned(),
                };
                let ok = reply.starts_with("+OK");
                send(io, &reply).await?;
                (Next::Continue, ok)
            }
            ("RSET", true) => {
                let m = self.maildrop.as_mut().expect("in TRANSACTION");
                m.deleted.iter_mut().for_each(|d| *d = false);
                send(
                    io,
                    &format!("+OK Maildrop has {} messages\r\n", m.messages.len()),
                )
                .await?;
                (Next::Continue, true)
            }
            _ if known => {
                let close = self
                    .error(io, "-ERR Command not valid in this state\r\n")
                    .await?;
                crate::metrics::command(PROTOCOL, name, false);
                return Ok(if close { Next::Close } else { Next::Continue });
            }
            _ => {
                let close = self.error(io, "-ERR Unknown command\r\n").await?;
                crate::metrics::command(PROTOCOL, name, false);
                return Ok(if close { Next::Close } else { Next::Continue });
            }
        };
        crate::metrics::command(PROTOCOL, name, ok);
        Ok(next)
    }

    /// Credentials may cross this connection.
    fn may_authenticate(&self) -> bool {
        self.tls || self.gw.config.allow_plaintext_auth
    }

    fn capabilities(&self) -> String {
        let mut caps = String::from(
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n",
        );
        if self.maildrop.is_none() {
            if self.may_authenticate() {
                caps.push_str("USER\r\nSASL PLAIN\r\n");
            }
            if !self.tls {
                caps.push_str("STLS\r\n");
            }
        }
        caps.push_str("IMPLEMENTATION mailmesh\r\n.\r\n");
        caps
    }

    /// AUTH (RFC 5034): the mechanism list, or PLAIN with or without an initial
    /// response.
    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        mechanism: Option<&str>,
        initial: Option<&str>,
    ) -> io::Result<String> {
        let Some(mechanism) = mechanism else {
            return Ok("+OK\r\nPLAIN\r\n.\r\n".into());
        };
        if !self.may_authenticate() {
            return Ok(PLAINTEXT_REFUSED.into());
        }
        if !mechanism.eq_ignore_ascii_case("PLAIN") {
            return Ok("-ERR Unsupported authentication mechanism\r\n".into());
        }
        let response = match initial {
            Some("=") => String::new(),
            Some(ir) => ir.to_owned(),
            None => {
                send(io, "+ \r\n").await?;
                let wait = self
                    .login_deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                match read_line(
                    io,
                    self.gw.config.max_line,
                    wait,
                    self.gw.config.command_timeout,
                )
                .await?
                {
                    Line::Text(line) => line,
                    Line::TooLong => return Ok("-ERR Line too long\r\n".into()),
                    Line::End => return Ok("-ERR Authentication cancelled\r\n".into()),
                }
            }
        };
        if response == "*" {
            return Ok("-ERR Authentication cancelled\r\n".into());
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(response.trim()) else {
            return Ok("-ERR Invalid base64\r\n".into());
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok("-ERR Invalid PLAIN response\r\n".into());
        };
        let (Ok(authzid), Ok(authcid), Ok(password)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(password),
        ) else {
            return Ok("-ERR [AUTH] Invalid login\r\n".into());
        };
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid) {
            return Ok("-ERR [AUTH] Acting as another user is not allowed\r\n".into());
        }
        Ok(self.login(authcid, password).await)
    }

    /// Renews the storage session token once half its life is gone (ADR 0006);
    /// false when storage has ended the session (the account was disabled or
    /// removed). A storage that does not answer is tried again at the next command.
    async fn renew_session(&mut self) -> bool {
        let Some(m) = self.maildrop.as_mut() else {
            return true;
        };
        if crate::store::now_ms() < m.renew_at_ms {
            return true;
        }
        match self.gw.store.refresh(&m.user).await {
            Ok(Some(renewed)) => {
                m.user = renewed.user;
                m.renew_at_ms = renewed.renew_at_ms;
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the storage session");
                true
            }
        }
    }

    /// Checks the credentials (with cluster-wide failure limits), takes the maildrop
    /// lock and lists the maildrop. The reply never tells whether the user exists.
    async fn login(&mut self, name: &str, password: &str) -> String {
        let limits = crate::login::Limits {
            max_failures: self.gw.config.max_auth_failures,
            window: self.gw.config.failure_window,
            failure_delay: self.gw.config.failure_delay,
            max_parallel: self.gw.config.max_parallel_logins,
            account_pace: None,
        };
        let user = match crate::login::check(self.gw, PROTOCOL, self.peer, name, password, &limits)
            .await
        {
            Login::Ok(logged_in) => logged_in,
            Login::Invalid => return "-ERR [AUTH] Invalid login\r\n".into(),
            Login::Throttled => {
                // RFC 3206: [AUTH] would tell the client its password is wrong (and
                // make it ask again); the refusal is temporary and not about it.
                return "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n".into();
            }
            Login::Busy => {
                return "-ERR [SYS/TEMP] Too many logins at once from your address, try again later\r\n"
                    .into();
            }
            Login::Unavailable => return "-ERR [SYS/TEMP] Try again later\r\n".into(),
        };
        let renew_at_ms = user.renew_at_ms;
        let user = user.user;
        let lock_key = format!("pop3:lock:{}:{}", user.tenant, user.user_id);
        let ttl = self.gw.config.lock_ttl;
        let token = match self.gw.cache.try_lock(&lock_key, ttl).await {
            Ok(Some(token)) => token,
            Ok(None) => {
                crate::metrics::event(PROTOCOL, "in_use");
                return "-ERR [IN-USE] Maildrop is in use by another session\r\n".into();
            }
            Err(e) => {
                tracing::warn!(error = %e, "maildrop lock unavailable");
                return "-ERR [SYS/TEMP] Try again later\r\n".into();
            }
        };
        let lost = Arc::new(AtomicBool::new(false));
        match self.gw.store.list(&user, MAILDROP).await {
            Ok((uid_validity, messages)) => {
                // Messages an IMAP client marked \Deleted are already on their way out.
                let messages: Vec<Listed> = messages
                    .into_iter()
                    .filter(|m| !m.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Deleted")))
                    .collect();
                let reply = format!("+OK Logged in, {} messages\r\n", messages.len());
                let renewal = tokio::spawn(keep_locked(
                    self.gw.cache.clone(),
                    lock_key.clone(),
                    token.clone(),
                    ttl,
                    lost.clone(),
                ))
                .abort_handle();
                self.maildrop = Some(Maildrop {
                    user,
                    renew_at_ms,
                    lock_key,
                    lost,
                    renewal,
                    token,
                    uid_validity,
                    deleted: vec![false; messages.len()],
                    messages,
                });
                reply
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing the maildrop failed");
                let _ = self.gw.cache.unlock(&lock_key, &token).await;
                "-ERR [SYS/TEMP] Try again later\r\n".into()
            }
        }
    }

    /// RETR, or TOP with `lines` of the body; true when the message was sent.
    async fn retrieve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<S>,
        which: Option<&str>,
        lines: Option<usize>,
    ) -> io::Result<bool> {
        let m = self.maildrop.as_ref().expect("in TRANSACTION");
        let Some((_, listed)) = m.message(which) else {
            send(io, NO_SUCH_MESSAGE).await?;
            return Ok(false);
        };
        if listed.size > self.gw.config.max_message_bytes as u64 {
            send(io, "-ERR Message too large to retrieve\r\n").await?;
            return Ok(false);
        }
        let message = match self.gw.store.fetch(&m.user, MAILDROP, listed.uid).await {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "fetching a message failed");
                send(
                    io,
                    "-ERR [SYS/TEMP] Message unavailable, try again later\r\n",
                )
                .await?;
                return Ok(false);
            }
        };
        let part = match lines {
            None => &message[..],
            Some(n) => top(&message, n),
        };
        let mut out = Vec::with_capacity(part.len() + part.len() / 50 + 32);
        out.extend_from_slice(format!("+OK {} octets\r\n", listed.size).as_bytes());
        mailmesh_types::wire::dot_stuff(part, &mut out);
        out.extend_from_slice(b".\r\n");
        io.get_mut().write_all(&out).await?;
        io.get_mut().flush().await?;
        Ok(true)
    }

    /// The UPDATE state: removes what was deleted, releases the maildrop.
    async fn update(&mut self) -> String {
        let Some(m) = &self.maildrop else {
            return "+OK Bye\r\n".into();
        };
        if m.lost() {
            // Another session may hold the maildrop by now: change nothing.
            self.maildrop = None;
            return "-ERR [IN-USE] Maildrop lock lost, nothing deleted\r\n".into();
        }
        let uids: Vec<u32> = m
            .messages
            .iter()
            .zip(&m.deleted)
            .filter(|(_, d)| **d)
            .map(|(l, _)| l.uid)
            .collect();
        let reply = match self.gw.store.remove(&m.user, MAILDROP, &uids).await {
            Ok(()) => format!("+OK Bye, {} messages deleted\r\n", uids.len()),
            Err(e) => {
                tracing::warn!(error = %e, "removing deleted messages failed");
                "-ERR [SYS/TEMP] Some deleted messages were not removed\r\n".into()
            }
        };
        self.release().await;
        reply
    }

    /// Gives the maildrop lock back (a dropped connection does too).
    async fn release(&mut self) {
        if let Some(m) = self.maildrop.take()
            && let Err(e) = self.gw.cache.unlock(&m.lock_key, &m.token).await
        {
            tracing::warn!(error = %e, "releasing a maildrop lock failed; it expires by itself");
        }
    }
}

/// Renews the maildrop lock every third of its lifetime; flags it lost when the
/// cache says another holder has it, or when it could not be confirmed for a whole
/// lifetime (the cache unreachable).
async fn keep_locked(
    cache: Arc<dyn mailmesh_cache::Cache>,
    key: String,
    token: LockToken,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    let mut confirmed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let asked = Instant::now();
        match cache.extend_lock(&key, &token, ttl).await {
            Ok(true) => confirmed = asked,
            Ok(false) => break,
            Err(e) => tracing::warn!(error = %e, "renewing a maildrop lock failed"),
        }
        if confirmed.elapsed() >= ttl {
            break;
        }
    }
    lost.store(true, Ordering::Relaxed);
}

const PLAINTEXT_REFUSED: &str =
    "-ERR [AUTH] Plaintext authentication is disabled: use STLS first\r\n";
const NO_SUCH_MESSAGE: &str = "-ERR No such message\r\n";

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    reply: &str,
) -> io::Result<()> {
    io.get_mut().write_all(reply.as_bytes()).await
}

/// One command line without its line end, read within `idle` and at most `max`
/// bytes kept (a longer line is consumed and reported, never buffered whole).
/// Reads one command line: the client has `wait` to begin it and `line_timeout`
/// from its first byte to end it, however slowly it trickles in.
async fn read_line<S: AsyncRead + Unpin>(
    io: &mut BufReader<S>,
    max: usize,
    wait: Duration,
    line_timeout: Duration,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    let wait_until = tokio::time::Instant::now() + wait;
    let mut deadline = wait_until;
    let mut started = false;
    loop {
        let available = match tokio::time::timeout_at(deadline, io.fill_buf()).await {
            Ok(read) => read?,
            Err(_) => return Ok(Line::End),
        };
        if !started {
            started = true;
            deadline = wait_until.min(tokio::time::Instant::now() + line_timeout);
        }
        if available.is_empty() {
            return Ok(Line::End);
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !too_long && line.len() + taken <= max {
            line.extend_from_slice(&available[..taken]);
        } else {
            too_long = true;
            line.clear();
        }
        io.consume(taken);
        if done {
            if too_long {
                return Ok(Line::TooLong);
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            return Ok(Line::Text(String::from_utf8_lossy(&line).into_owned()));
        }
    }
}

/// The header section and the first `lines` lines of the body (RFC 1939 TOP).
fn top(message: &[u8], lines: usize) -> &[u8] {
    let crlf = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = message.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let body_start = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(message.len()),
    };
    let mut end = body_start;
    for _ in 0..lines {
        match message[end..].iter().position(|&b| b == b'\n') {
            Some(i) => end += i + 1,
            None => {
                end = message.len();
                break;
            }
        }
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_keeps_the_headers_and_n_lines() {
        let m = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top(m, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top(m, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top(m, 99), &m[..]);
    }
}
