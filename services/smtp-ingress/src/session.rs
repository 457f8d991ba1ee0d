//! One SMTP session (RFC 5321), generic over the stream so tests drive it in memory.
//! Commands are parsed by `smtp-proto`; replies are batched and flushed whenever the
//! client has to wait for input (PIPELINING, RFC 2920).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use mailmesh_auth::{ClientVerdict, DmarcPolicy, MessageFacts, MessageVerdict};
use mailmesh_cache::login::Login;
use mailmesh_kit::Shutdown;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStoreExt, PutPayload};
use mailmesh_proto::encode_envelope;
use mailmesh_queue::OutgoingRecord;
use mailmesh_storage::client::{Account, DeliveryError};
use mailmesh_storage::directory::Lookup;
use mailmesh_storage::engine::UserRef;
use mailmesh_types::wire::DotReader;
use mailmesh_types::{
    BodyRef, BodyType, ClientInfo, DsnNotify, DsnRet, EmailAddress, Envelope, InboundPolicy,
    PolicyAction, QueueId, Recipient, ReversePath, TenantId, rfc5322_date,
};
use smtp_proto::request::receiver::{BdatReceiver, RequestReceiver};
use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tracing::Instrument;

use crate::Ingress;

/// A parsed command, owned (the parser's borrows end before any await).
enum Command {
    Ehlo(String),
    Helo(String),
    Mail(smtp_proto::MailFrom<String>),
    Rcpt(smtp_proto::RcptTo<String>),
    Data,
    Bdat {
        size: usize,
        last: bool,
    },
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    StartTls,
    /// STARTTLS with parameters, which it has none of (smtp-proto skips them).
    StartTlsWithParameters,
    /// `RCPT TO:<>`: smtp-proto gives it as the empty path it also gives
    /// `<Postmaster>` as; told apart on the raw line.
    RcptNullPath,
    Auth {
        mechanism: u64,
        initial: String,
    },
    Unsupported,
}

impl From<Request<std::borrow::Cow<'_, str>>> for Command {
    fn from(r: Request<std::borrow::Cow<'_, str>>) -> Self {
        match r {
            Request::Ehlo { host } => Self::Ehlo(host.into_owned()),
            Request::Helo { host } => Self::Helo(host.into_owned()),
            Request::Mail { from } => Self::Mail(from.into_owned()),
            Request::Rcpt { to } => Self::Rcpt(to.into_owned()),
            Request::Data => Self::Data,
            Request::Bdat {
                chunk_size,
                is_last,
            } => Self::Bdat {
                size: chunk_size,
                last: is_last,
            },
            Request::Rset => Self::Rset,
            Request::Noop { .. } => Self::Noop,
            Request::Vrfy { .. } => Self::Vrfy,
            Request::Help { .. } => Self::Help,
            Request::Quit => Self::Quit,
            Request::StartTls => Self::StartTls,
            Request::Auth {
                mechanism,
                initial_response,
            } => Self::Auth {
                mechanism,
                initial: initial_response.into_owned(),
            },
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => Self::Unsupported,
        }
    }
}

/// A mail transaction: from MAIL to the end of the message.
/// Where a bounce to an SRS address goes, once decoded.
enum SrsBounce {
    /// The original sender is at a local domain: looked up like any recipient.
    Local,
    /// Relayed back in the forwarding domain's tenant.
    Remote(mailmesh_storage::directory::Resolution),
}

/// Most mailboxes of one recipient whose quota the MX asks storage about at RCPT.
const MAX_ROOM_QUESTIONS: usize = 4;

struct Transaction {
    from: ReversePath,
    body_type: BodyType,
    smtputf8: bool,
    ret: Option<DsnRet>,
    envid: Option<String>,
    recipients: Vec<(Recipient, TenantId)>,
    /// The inbound policy every recipient's tenant shares (one verdict, one reply).
    inbound: Option<InboundPolicy>,
    /// BDAT chunks so far; `None` once the message grew past the limit.
    chunks: Option<Vec<u8>>,
    /// BDAT has been used: DATA is no longer allowed (RFC 3030).
    bdat: bool,
    /// A recipient is an alias that forwards to another domain: the message is
    /// ARC-sealed for those copies.
    forwards: bool,
    /// The recipient is an SRS address (a bounce back to a forwarded sender): it is
    /// the transaction's only recipient.
    srs_bounce: bool,
    /// The size the client declared at MAIL (`SIZE=`; 0: none).
    size: usize,
    /// The smallest size limit of the recipients' tenants so far (RFC 1870: a
    /// message over it is refused at RCPT or before the `250` of DATA/BDAT, never
    /// accepted and bounced).
    max_bytes: Option<usize>,
}

pub struct Session<'a> {
    ingress: &'a Ingress,
    peer: SocketAddr,
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    errors: u32,
    tls: bool,
    /// auth-check's view of the client address, asked once per connection.
    client_verdict: Option<ClientVerdict>,
    /// The user who authenticated (submission).
    account: Option<Account>,
}

/// What the loop does after a reply.
enum Next {
    Continue,
    Close,
    StartTls,
}

/// How a plaintext conversation ended.
enum Upgrade<S> {
    Ended,
    /// STARTTLS was accepted: the handshake comes next on this stream.
    StartTls(S),
}

struct SessionGauge;

impl SessionGauge {
    fn open() -> Self {
        crate::metrics::session_opened();
        Self
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        crate::metrics::session_closed();
    }
}

impl<'a> Session<'a> {
    pub fn new(ingress: &'a Ingress, peer: SocketAddr) -> Self {
        Self {
            ingress,
            peer,
            helo: None,
            tx: None,
            errors: 0,
            tls: false,
            client_verdict: None,
            account: None,
        }
    }

    /// A session whose connection is TLS from the start (port 465).
    pub fn over_tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Runs the session to its end, upgrading to TLS on STARTTLS when configured.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        stream: S,
        shutdown: &Shutdown,
    ) -> io::Result<()> {
        let _gauge = SessionGauge::open();
        let Upgrade::StartTls(stream) = self.converse(stream, shutdown, true).await? else {
            return Ok(());
        };
        let Some(acceptor) = self.ingress.tls.clone() else {
            return Ok(());
        };
        let timeout = self.ingress.config.tls_handshake_timeout;
        let Ok(Ok(tls)) = tokio::time::timeout(timeout, acceptor.accept(stream)).await else {
            crate::metrics::rejected("tls_handshake");
            return Ok(());
        };
        // RFC 3207 4.2: forget everything learnt before TLS.
        self.tls = true;
        self.helo = None;
        self.tx = None;
        self.account = None;
        self.converse(tls, shutdown, false).await.map(drop)
    }

    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: S,
        shutdown: &Shutdown,
        greet: bool,
    ) -> io::Result<Upgrade<S>> {
        let host = self.ingress.config.hostname.clone();
        let (mut reader, writer) = tokio::io::split(stream);
        let mut out = BufWriter::new(writer);
        if greet {
            if shutdown.is_closing() {
                out.write_all(b"421 4.3.2 Service shutting down, try again later\r\n")
                    .await?;
                out.flush().await?;
                return Ok(Upgrade::Ended);
            }
            out.write_all(format!("220 {host} ESMTP mailmesh\r\n").as_bytes())
                .await?;
            out.flush().await?;
        }

        let mut input: Vec<u8> = Vec::new();
        let mut receiver = RequestReceiver::default();
        let command_line = self.ingress.config.max_command_line;
        let submission = self.ingress.submission.is_some();
        // Inside an over-long line: bytes are dropped up to its end.
        let mut skipping = false;
        // When the line being read began to arrive: it must be complete within
        // `command_timeout` of that, however slowly it trickles in.
        let mut line_started: Option<tokio::time::Instant> = None;
        // Submission: the time allowed before a login, whatever the client does.
        let login_deadline = self
            .ingress
            .submission
            .as_ref()
            .map(|s| tokio::time::Instant::now() + s.login_timeout);
        loop {
            let newline = input.iter().position(|b| *b == b'\n');
            // RFC 4954 4: an AUTH command with its initial response may be longer.
            let max_line =
                if submission && input.len() >= 5 && input[..5].eq_ignore_ascii_case(b"AUTH ") {
                    command_line.max(AUTH_LINE_MAX)
                } else {
                    command_line
                };
            if skipping
                || newline.is_some_and(|p| p >= max_line)
                || (newline.is_none() && input.len() > max_line)
            {
                match newline {
                    Some(p) => {
                        input.drain(..=p);
                        skipping = false;
                        crate::metrics::rejected("line_too_long");
                        if let Next::Close =
                            self.error(&mut out, "500 5.5.2 Line too long\r\n").await?
                        {
                            {
                                out.flush().await?;
                                return Ok(Upgrade::Ended);
                            }
                        }
                        continue;
                    }
                    None => {
                        input.clear();
                        skipping = true;
                    }
                }
            }
            // Only complete lines go to the parser, so it never holds part of one
            // (and the length check above sees every line whole).
            let (parsed, consumed) = match newline {
                Some(end) if !skipping => {
                    let line = &input[..=end];
                    let mut iter = line.iter();
                    let parsed = match receiver.ingest(&mut iter).map(Command::from) {
                        Ok(Command::StartTls) if !bare_verb(line) => {
                            Ok(Command::StartTlsWithParameters)
                        }
                        Ok(Command::Rcpt(to)) if to.address.is_empty() && null_path(line) => {
                            Ok(Command::RcptNullPath)
                        }
                        other => other,
                    };
                    (parsed, line.len() - iter.as_slice().len())
                }
                _ => (Err(ParseError::NeedsMoreData { bytes_left: 0 }), 0),
            };
            input.drain(..consumed);
            if consumed > 0 {
                line_started = None;
            }
            let next = match parsed {
                Err(ParseError::NeedsMoreData { .. }) => {
                    // The client waits for our replies before it sends more; one that
                    // never reads them cannot hold the session.
                    let mut timeout = self.ingress.config.command_timeout;
                    if tokio::time::timeout(timeout, out.flush()).await.is_err() {
                        return Ok(Upgrade::Ended);
                    }
                    let now = tokio::time::Instant::now();
                    if !input.is_empty() || skipping {
                        let started = *line_started.get_or_insert(now);
                        timeout = (started + timeout).saturating_duration_since(now);
                    }
                    if let Some(deadline) = login_deadline
                        && self.account.is_none()
                    {
                        timeout = timeout.min(deadline.saturating_duration_since(now));
                    }
                    match self
                        .read(&mut reader, &mut input, timeout, shutdown)
                        .await?
                    {
                        Some(0) => return Ok(Upgrade::Ended),
                        Some(_) => continue,
                        None => {
                            let reply: &[u8] = if shutdown.is_closing() {
                                b"421 4.3.2 Service shutting down, try again later\r\n"
                            } else {
                                b"421 4.4.2 Timeout, closing connection\r\n"
                            };
                            out.write_all(reply).await?;
                            {
                                out.flush().await?;
                                return Ok(Upgrade::Ended);
                            }
                        }
                    }
                }
                Err(e) => {
                    let reply = parse_error_reply(&e);
                    crate::metrics::rejected("syntax");
                    self.error(&mut out, &reply).await?
                }
                // Between transactions a draining server says goodbye; a transaction
                // under way is finished first.
                Ok(ref command)
                    if shutdown.is_closing()
                        && self.tx.is_none()
                        && !matches!(command, Command::Quit) =>
                {
                    out.write_all(b"421 4.3.2 Service shutting down, try again later\r\n")
                        .await?;
                    Next::Close
                }
                Ok(command) => {
                    self.command(command, &mut reader, &mut out, &mut input, shutdown)
                        .await?
                }
            };
            match next {
                Next::Continue => {}
                Next::Close => {
                    out.flush().await?;
                    return Ok(Upgrade::Ended);
                }
                Next::StartTls => {
                    out.flush().await?;
                    // Anything the client sent after STARTTLS is dropped with `input`
                    // (no command injection into the TLS session).
                    return Ok(Upgrade::StartTls(reader.unsplit(out.into_inner())));
                }
            }
        }
    }

    /// Reads more input; `Some(0)` at end of stream, `None` on timeout or shutdown
    /// (an idle session, between transactions, already ends when draining starts).
    async fn read<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        input: &mut Vec<u8>,
        timeout: std::time::Duration,
        shutdown: &Shutdown,
    ) -> io::Result<Option<usize>> {
        // Straight into `input`: a buffer on this future's stack is copied into every
        // future that awaits it, in every session — 16 KiB here made an open session
        // cost 30 KiB (`loadtest/smtp-soak.sh`).
        if input.capacity() - input.len() < READ_CHUNK {
            input.reserve(READ_CHUNK);
        }
        let idle = self.tx.is_none();
        tokio::select! {
            _ = shutdown.stopped() => Ok(None),
            _ = shutdown.closing(), if idle => Ok(None),
            read = tokio::time::timeout(timeout, reader.read_buf(input)) => match read {
                Ok(Ok(n)) => Ok(Some(n)),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(None),
            },
        }
    }

    async fn error<W: AsyncWrite + Unpin>(&mut self, out: &mut W, reply: &str) -> io::Result<Next> {
        self.errors += 1;
        out.write_all(reply.as_bytes()).await?;
        if self.errors >= self.ingress.config.max_errors {
            out.write_all(b"421 4.7.0 Too many errors, closing connection\r\n")
                .await?;
            return Ok(Next::Close);
        }
        Ok(Next::Continue)
    }

    async fn command<R, W>(
        &mut self,
        command: Command,
        reader: &mut R,
        out: &mut W,
        input: &mut Vec<u8>,
        shutdown: &Shutdown,
    ) -> io::Result<Next>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let config = &self.ingress.config;
        let reply = match command {
            Command::Ehlo(host) => {
                self.helo = Some((host.clone(), true));
                self.tx = None;
                let starttls = if self.ingress.tls.is_some() && !self.tls {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                // RFC 4954 4: AUTH is offered only where it may be used.
                let auth = match &self.ingress.submission {
                    Some(s) if self.account.is_none() && (self.tls || s.allow_plaintext_auth) => {
                        "250-AUTH PLAIN LOGIN\r\n"
                    }
                    _ => "",
                };
                format!(
                    "250-{} Hello {host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                     250-SIZE {}\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n{starttls}{auth}250 DSN\r\n",
                    config.hostname,
                    self.max_message_bytes()
                )
            }
            Command::Helo(host) => {
                self.helo = Some((host, false));
                self.tx = None;
                format!("250 {}\r\n", config.hostname)
            }
            Command::Mail(from) if self.ingress.submission.is_some() => {
                match self.submitter(&from).await {
                    Ok(()) => match self.mail(from) {
                        Ok(reply) => reply,
                        Err(reply) => return self.error(out, &reply).await,
                    },
                    Err(reply) => return self.error(out, &reply).await,
                }
            }
            Command::Mail(from) => match self.mail(from) {
                Ok(reply) => reply,
                Err(reply) => return self.error(out, &reply).await,
            },
            Command::Rcpt(to) => match self.rcpt(to).await {
                Ok(reply) => reply,
                Err(reply) => return self.error(out, &reply).await,
            },
            Command::Data => {
                if let Err(reply) = self.ready_for_data(false) {
                    return self.error(out, &reply).await;
                }
                out.write_all(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
                    .await?;
                out.flush().await?;
                match self.read_data(reader, input, shutdown).await? {
                    Some(message) => self.queue(message).await,
                    None => {
                        out.write_all(b"421 4.4.2 Timeout or shutdown, closing connection\r\n")
                            .await?;
                        return Ok(Next::Close);
                    }
                }
            }
            Command::Bdat { size, last } => {
                if let Err(reply) = self.ready_for_data(true) {
                    // The chunk still arrives: read and drop it to stay in step.
                    if self
                        .read_chunk(reader, input, size, shutdown, false)
                        .await?
                        .is_none()
                    {
                        return Ok(Next::Close);
                    }
                    return self.error(out, &reply).await;
                }
                if let Some(tx) = self.tx.as_mut() {
                    tx.bdat = true;
                }
                // Replies so far go out before waiting for the chunk's bytes.
                out.flush().await?;
                match self.read_chunk(reader, input, size, shutdown, true).await? {
                    None => {
                        out.write_all(b"421 4.4.2 Timeout or shutdown, closing connection\r\n")
                            .await?;
                        return Ok(Next::Close);
                    }
                    Some(()) if self.tx.as_ref().is_some_and(|tx| tx.chunks.is_none()) => {
                        // Over the limit: refused now, the transaction is over.
                        self.tx = None;
                        crate::metrics::rejected("too_large");
                        "552 5.3.4 Message size exceeds fixed maximum message size\r\n".to_owned()
                    }
                    Some(()) if !last => format!("250 2.0.0 {size} octets received\r\n"),
                    Some(()) => {
                        // `None` when it grew past the limit: `queue` refuses it.
                        let chunks = self.tx.as_mut().and_then(|tx| tx.chunks.take());
                        self.queue(chunks).await
                    }
                }
            }
            Command::Rset => {
                self.tx = None;
                "250 2.0.0 OK\r\n".to_owned()
            }
            Command::Noop => "250 2.0.0 OK\r\n".to_owned(),
            Command::Vrfy => {
                "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n"
                    .to_owned()
            }
            Command::Help => "214 2.0.0 mailmesh SMTP, see RFC 5321\r\n".to_owned(),
            Command::Quit => {
                out.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(Next::Close);
            }
            Command::StartTls if self.tls => {
                return self.error(out, "503 5.5.1 TLS already active\r\n").await;
            }
            Command::StartTls if self.ingress.tls.is_none() => {
                return self
                    .error(out, "502 5.5.1 STARTTLS is not available\r\n")
                    .await;
            }
            Command::StartTls => {
                out.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
                return Ok(Next::StartTls);
            }
            Command::Auth { mechanism, initial } => {
                return self
                    .auth(mechanism, initial, reader, out, input, shutdown)
                    .await;
            }
            Command::Unsupported => {
                return self
                    .error(out, "502 5.5.1 Command not implemented\r\n")
                    .await;
            }
            // RFC 3207 §4: "STARTTLS" with a parameter is answered 501.
            Command::StartTlsWithParameters => {
                return self
                    .error(out, "501 5.5.4 STARTTLS takes no parameters\r\n")
                    .await;
            }
            // RFC 5321 §4.1.1.3: a forward-path is never empty (`<>` is only a
            // reverse-path); `<Postmaster>` is a recipient, `<>` is not.
            Command::RcptNullPath => {
                return self
                    .error(out, "501 5.1.3 The null path is not a recipient\r\n")
                    .await;
            }
        };
        out.write_all(reply.as_bytes()).await?;
        Ok(Next::Continue)
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) -> Result<String, String> {
        if self.helo.is_none() {
            return Err("503 5.5.1 Send HELO or EHLO first\r\n".into());
        }
        if self.tx.is_some() {
            return Err("503 5.5.1 Nested MAIL command\r\n".into());
        }
        let esmtp = self.helo.as_ref().is_some_and(|(_, e)| *e);
        let extensions = smtp_proto::MAIL_BODY_8BITMIME
            | smtp_proto::MAIL_BODY_BINARYMIME
            | smtp_proto::MAIL_SMTPUTF8
            | smtp_proto::MAIL_RET_FULL
            | smtp_proto::MAIL_RET_HDRS;
        if !esmtp && (from.flags & extensions != 0 || from.size > 0 || from.env_id.is_some()) {
            return Err("555 5.5.4 Parameters need EHLO\r\n".into());
        }
        let supported = smtp_proto::MAIL_BODY_7BIT | extensions;
        if from.flags & !supported != 0
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0
            || from.by != 0
            || from.trans_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || (from.auth.is_some() && self.ingress.submission.is_none())
        {
            return Err("555 5.5.4 Unsupported MAIL parameter\r\n".into());
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return Err("555 5.5.4 BODY=BINARYMIME is not supported\r\n".into());
        }
        let max = self.max_message_bytes();
        if from.size > max {
            crate::metrics::rejected("too_large");
            return Err(format!(
                "552 5.3.4 Message size exceeds fixed maximum message size of {max}\r\n"
            ));
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let sender: ReversePath = from
            .address
            .parse()
            .map_err(|_| "501 5.1.7 Bad sender address syntax\r\n".to_owned())?;
        if sender.address().is_some_and(EmailAddress::is_utf8) && !smtputf8 {
            return Err("553 5.6.7 Non-ASCII addresses need SMTPUTF8\r\n".into());
        }
        self.tx = Some(Transaction {
            from: sender,
            body_type: if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8,
            ret: if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
                Some(DsnRet::Headers)
            } else if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
                Some(DsnRet::Full)
            } else {
                None
            },
            envid: from.env_id,
            recipients: Vec::new(),
            inbound: None,
            chunks: Some(Vec::new()),
            bdat: false,
            forwards: false,
            srs_bounce: false,
            size: from.size,
            max_bytes: None,
        });
        Ok("250 2.1.0 OK\r\n".into())
    }

    async fn rcpt(&mut self, to: smtp_proto::RcptTo<String>) -> Result<String, String> {
        let max = self.ingress.config.max_recipients;
        let Some(tx) = self.tx.as_ref() else {
            return Err("503 5.5.1 Need MAIL command\r\n".into());
        };
        if tx.recipients.len() >= max {
            crate::metrics::rejected("too_many_recipients");
            return Ok("452 4.5.3 Too many recipients\r\n".into());
        }
        // RFC 5321 4.5.1: `RCPT TO:<Postmaster>` (no domain) must be accepted; the
        // parser hands it over as an empty path, which is otherwise invalid here.
        let address: EmailAddress = if to.address.is_empty() {
            self.ingress.postmaster.clone()
        } else {
            to.address
                .parse()
                .map_err(|_| "501 5.1.3 Bad recipient address syntax\r\n".to_owned())?
        };
        if address.is_utf8() && !tx.smtputf8 {
            return Err("553 5.6.7 Non-ASCII addresses need SMTPUTF8\r\n".into());
        }
        let notify_flags = smtp_proto::RCPT_NOTIFY_SUCCESS
            | smtp_proto::RCPT_NOTIFY_FAILURE
            | smtp_proto::RCPT_NOTIFY_DELAY;
        if to.flags & !(notify_flags | smtp_proto::RCPT_NOTIFY_NEVER) != 0 || to.rrvs != 0 {
            return Err("555 5.5.4 Unsupported RCPT parameter\r\n".into());
        }
        if to.flags & smtp_proto::RCPT_NOTIFY_NEVER != 0 && to.flags & notify_flags != 0 {
            return Err("501 5.5.4 NOTIFY=NEVER cannot be combined\r\n".into());
        }
        let notify = if to.flags & smtp_proto::RCPT_NOTIFY_NEVER != 0 {
            DsnNotify::NEVER
        } else if to.flags
            & (smtp_proto::RCPT_NOTIFY_SUCCESS
                | smtp_proto::RCPT_NOTIFY_FAILURE
                | smtp_proto::RCPT_NOTIFY_DELAY)
            != 0
        {
            DsnNotify {
                success: to.flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
                failure: to.flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
                delay: to.flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
            }
        } else {
            DsnNotify::DEFAULT
        };
        let mut recipient = Recipient {
            address,
            notify,
            // The parser decodes ORCPT's xtext and drops its type, which RFC 3461
            // limits to rfc822 (or utf-8) for SMTP.
            orcpt: to.orcpt.map(|o| format!("rfc822;{o}")),
        };
        if let Some(account) = &self.account {
            // Submission: anywhere, but local addresses must exist. The record
            // belongs to the sender's tenant; workers deliver or relay each recipient.
            return match self.lookup_recipient(&mut recipient).await {
                Ok(Lookup::Deliver(_) | Lookup::NotLocal) => {
                    if !self.within_send_rates(account).await {
                        crate::metrics::rejected("send_rate");
                        tracing::info!(user = %account.address, "send rate reached");
                        return Ok(
                            "450 4.7.1 Sending rate limit reached, try again later\r\n".into()
                        );
                    }
                    let tenant = account.user.tenant.clone();
                    if let Some(tx) = self.tx.as_mut() {
                        tx.recipients.push((recipient, tenant));
                    }
                    Ok("250 2.1.5 OK\r\n".into())
                }
                Ok(Lookup::Unknown) | Err(DeliveryError::Permanent { .. }) => {
                    crate::metrics::rejected("unknown_user");
                    Err("550 5.1.1 User unknown\r\n".into())
                }
                Err(DeliveryError::Temporary { .. }) => {
                    Ok("451 4.3.0 Temporary failure, try again later\r\n".into())
                }
            };
        }
        let srs_bounce = match self.srs_bounce(tx, &mut recipient).await {
            Ok(found) => found,
            Err(reply) => {
                crate::metrics::rejected("srs");
                return reply;
            }
        };
        let is_srs_bounce = srs_bounce.is_some();
        let resolution = match srs_bounce {
            Some(SrsBounce::Remote(resolution)) => Ok(Lookup::Deliver(resolution)),
            Some(SrsBounce::Local) | None => self.lookup_recipient(&mut recipient).await,
        };
        let resolution = match resolution {
            Ok(Lookup::Deliver(resolution)) => resolution,
            Ok(Lookup::NotLocal) => {
                crate::metrics::rejected("relay_denied");
                return Err("550 5.7.1 Relaying denied\r\n".into());
            }
            Ok(Lookup::Unknown) | Err(DeliveryError::Permanent { .. }) => {
                crate::metrics::rejected("unknown_user");
                return Err("550 5.1.1 User unknown\r\n".into());
            }
            Err(DeliveryError::Temporary { .. }) => {
                return Ok("451 4.3.0 Temporary failure, try again later\r\n".into());
            }
        };
        if tx.inbound.is_some_and(|p| p != resolution.inbound) {
            // One DATA reply cannot both reject and accept: RFC 5321 3.3 lets the
            // client send these recipients in a later transaction.
            crate::metrics::rejected("policy_split");
            return Ok(
                "452 4.5.3 Recipients with another inbound policy need a separate transaction\r\n"
                    .into(),
            );
        }
        if resolution.inbound.block_listed == PolicyAction::Reject
            && let Some(zone) = match self.block_listed().await {
                Ok(zone) => zone,
                Err(Unavailable) => return Ok(AUTH_UNAVAILABLE.into()),
            }
        {
            crate::metrics::rejected("block_list");
            return Err(format!(
                "550 5.7.1 Client address {} is listed by {zone}\r\n",
                self.peer.ip()
            ));
        }
        if self.full(&resolution).await {
            crate::metrics::rejected("over_quota");
            return Ok("452 4.2.2 Mailbox full, try again later\r\n".into());
        }
        let limit = resolution
            .max_message_bytes
            .map(|b| usize::try_from(b).unwrap_or(usize::MAX));
        if let Some(limit) = limit
            && self.tx.as_ref().is_some_and(|tx| tx.size > limit)
        {
            crate::metrics::rejected("too_large");
            return Err(format!(
                "552 5.3.4 Message size exceeds the maximum of {limit} for this recipient\r\n"
            ));
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.max_bytes = match (tx.max_bytes, limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tx.inbound = Some(resolution.inbound);
            tx.srs_bounce |= is_srs_bounce;
            tx.forwards |= !resolution.remote.is_empty();
            tx.recipients.push((recipient, resolution.tenant));
        }
        Ok("250 2.1.5 OK\r\n".into())
    }

    /// Whether every mailbox a recipient reaches is full now (storage knows: the
    /// quota is set and used up, for the size declared at MAIL), so it is refused
    /// for now (RFC 3463 4.2.2) rather than accepted into a retry loop. Advice
    /// only: a recipient that reaches anything else, or that storage cannot
    /// answer for, is taken, and the delivery's own check catches a race.
    async fn full(&self, resolution: &mailmesh_storage::directory::Resolution) -> bool {
        // One question per mailbox, asked by an anonymous client's RCPT: only for a
        // recipient of a few mailboxes (an alias may reach a thousand), so a
        // transaction of 100 RCPTs costs storage at most a few hundred reads.
        if resolution.with_quota.is_empty()
            || !resolution.remote.is_empty()
            || resolution.with_quota.len() < resolution.users.len()
            || resolution.users.len() > MAX_ROOM_QUESTIONS
        {
            return false;
        }
        let size = self.tx.as_ref().map_or(0, |tx| tx.size as u64);
        for (tenant, user) in &resolution.users {
            let user = UserRef {
                tenant: tenant.clone(),
                user: *user,
            };
            match self.ingress.directory.has_room(&user, size).await {
                Ok(false) => {}
                Ok(true) => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "no answer on a recipient's quota; the delivery checks it");
                    return false;
                }
            }
        }
        true
    }

    /// A bounce to an address the delivery workers made for a forwarded message
    /// (SRS): `Ok(None)` when the address is not one (or SRS is off); else the
    /// original sender becomes the recipient, delivered here when it is local or
    /// sent back in the forwarding domain's tenant. A valid SRS address is a
    /// standing relay to its original sender for days, so it takes only bounces
    /// (`MAIL FROM:<>`), as the one recipient of its transaction, at most
    /// `max_srs_bounces_per_minute` per original sender; forged or expired
    /// addresses are refused.
    async fn srs_bounce(
        &self,
        tx: &Transaction,
        recipient: &mut Recipient,
    ) -> Result<Option<SrsBounce>, Result<String, String>> {
        const UNAVAILABLE: &str = "451 4.3.0 Temporary failure, try again later\r\n";
        let Some(srs) = self.ingress.srs.as_ref() else {
            return Ok(None);
        };
        let mut address = recipient.address.clone();
        let mut forwarder = None;
        // SRS1 decodes to the first forwarder's SRS0 address; when that is ours
        // too, it decodes once more.
        for _ in 0..2 {
            if !mailmesh_auth::srs::is_srs(&address) {
                break;
            }
            let local = match self.ingress.directory.local_domain(address.domain()).await {
                Ok(Some(local)) => local,
                Ok(None) => break,
                Err(_) => return Err(Ok(UNAVAILABLE.into())),
            };
            address = match srs.reverse(&address) {
                Ok(original) => original,
                Err(e) => {
                    tracing::info!(srs = %recipient.address, error = %e, "bounce to an SRS address refused");
                    return Err(Err(format!("550 5.1.1 {e}\r\n")));
                }
            };
            forwarder.get_or_insert(local);
        }
        let Some((tenant, inbound)) = forwarder else {
            return Ok(None);
        };
        if tx.from.address().is_some() {
            return Err(Err(
                "550 5.7.1 This address only takes delivery status notifications\r\n".into(),
            ));
        }
        if !tx.recipients.is_empty() || tx.srs_bounce {
            return Err(Ok(
                "452 4.5.3 A bounce to a forwarded sender needs a transaction of its own\r\n"
                    .into(),
            ));
        }
        let key = format!("smtp:srs:{}", address.to_string().to_lowercase());
        if !self
            .ingress
            .within_limit(&key, self.ingress.config.max_srs_bounces_per_minute)
            .await
        {
            tracing::info!(srs = %recipient.address, to = %address, "SRS bounce rate reached");
            return Err(Ok(
                "450 4.7.1 Too many bounces to this sender right now, try again later\r\n".into(),
            ));
        }
        tracing::info!(srs = %recipient.address, to = %address, "a bounce to a forwarded sender is sent back");
        if recipient.orcpt.is_none() && !recipient.address.is_utf8() {
            recipient.orcpt = Some(format!("rfc822;{}", recipient.address));
        }
        let local = match self.ingress.directory.local_domain(address.domain()).await {
            Ok(local) => local.is_some(),
            Err(_) => return Err(Ok(UNAVAILABLE.into())),
        };
        recipient.address = address;
        if local {
            return Ok(Some(SrsBounce::Local));
        }
        // The worker relays it (the recipient is remote): no forward.
        Ok(Some(SrsBounce::Remote(
            mailmesh_storage::directory::Resolution {
                tenant,
                users: Vec::new(),
                with_quota: Vec::new(),
                remote: Vec::new(),
                inbound,
                max_message_bytes: None,
            },
        )))
    }

    /// Looks `recipient` up. RFC 5321 4.5.1: every domain taking mail has a
    /// postmaster; at a local domain without one of its own, `postmaster@` becomes
    /// the deployment's postmaster (the original address kept as ORCPT).
    async fn lookup_recipient(&self, recipient: &mut Recipient) -> Result<Lookup, DeliveryError> {
        let found = self.ingress.directory.lookup(&recipient.address).await;
        let postmaster = &self.ingress.postmaster;
        if matches!(found, Ok(Lookup::Unknown))
            && recipient
                .address
                .local_part()
                .eq_ignore_ascii_case("postmaster")
            && recipient.address != *postmaster
        {
            let deployment = self.ingress.directory.lookup(postmaster).await;
            if !matches!(deployment, Ok(Lookup::Deliver(_))) {
                tracing::warn!(%postmaster, rcpt = %recipient.address,
                    "postmaster mail refused: the deployment's postmaster is not a local address (create it, or set [smtp] postmaster)");
                return found;
            }
            if recipient.orcpt.is_none() && !recipient.address.is_utf8() {
                recipient.orcpt = Some(format!("rfc822;{}", recipient.address));
            }
            recipient.address = postmaster.clone();
            return deployment;
        }
        if recipient.address == *postmaster
            && matches!(found, Ok(Lookup::NotLocal | Lookup::Unknown))
        {
            tracing::warn!(%postmaster,
                "postmaster mail refused: the deployment's postmaster is not a local address (create it, or set [smtp] postmaster)");
        }
        found
    }

    /// The largest message this session takes: the port's limit, or the user's
    /// tenant's if lower, or the recipients' tenants' (in a transaction) if lower.
    fn max_message_bytes(&self) -> usize {
        let port = self.ingress.config.max_message_bytes;
        let sender = self
            .account
            .as_ref()
            .and_then(|a| a.limits.max_message_bytes)
            .map(|t| usize::try_from(t).unwrap_or(usize::MAX));
        let recipients = self.tx.as_ref().and_then(|tx| tx.max_bytes);
        [sender, recipients]
            .into_iter()
            .flatten()
            .fold(port, usize::min)
    }

    /// Submission: MAIL needs a logged-in user sending as themselves.
    async fn submitter(&mut self, from: &smtp_proto::MailFrom<String>) -> Result<(), String> {
        let Some(account) = self.account.as_mut() else {
            return Err("530 5.7.0 Authentication required\r\n".into());
        };
        // A long session renews its storage session token between messages; an
        // account disabled meanwhile ends here.
        if account.session_renewal_due() {
            match self.ingress.directory.refresh(account).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(user = %account.address, "session ended by storage; login required again");
                    self.account = None;
                    return Err("530 5.7.0 Authentication required\r\n".into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the session");
                    return Err("451 4.3.0 Temporary failure, try again later\r\n".into());
                }
            }
        }
        let Some(account) = &self.account else {
            return Err("530 5.7.0 Authentication required\r\n".into());
        };
        if self.tx.is_some() {
            return Err("503 5.5.1 Nested MAIL command\r\n".into());
        }
        // The null sender is allowed (read receipts, RFC 8098); anything else must
        // reach this user (own address, a subaddress or an alias of theirs).
        if !from.address.is_empty() {
            let sender: EmailAddress = from
                .address
                .parse()
                .map_err(|_| "501 5.1.7 Bad sender address syntax\r\n".to_owned())?;
            match self.owns(account, &sender).await {
                Ok(true) => {}
                Ok(false) => {
                    crate::metrics::rejected("sender_mismatch");
                    return Err(format!(
                        "553 5.7.1 Sender address <{sender}> is not yours\r\n"
                    ));
                }
                Err(()) => return Err("451 4.3.0 Temporary failure, try again later\r\n".into()),
            }
        }
        Ok(())
    }

    /// Submission: one more recipient within the user's and the tenant's hourly
    /// send rates (counted per recipient, so a message to many costs many).
    async fn within_send_rates(&self, account: &Account) -> bool {
        let config = self.ingress.submission.as_ref().expect("submission port");
        let hour = std::time::Duration::from_secs(3600);
        let user_limit = config.recipients_per_user_per_hour;
        let tenant_limit = account.limits.send_rate_per_hour.unwrap_or(0);
        let user_key = format!("submission:user:{}", account.user.user);
        if !self.ingress.within(&user_key, user_limit, hour).await {
            return false;
        }
        let tenant_key = format!("submission:tenant:{}", account.user.tenant);
        if !self.ingress.within(&tenant_key, tenant_limit, hour).await {
            // Not sent, so not counted against the user either.
            if user_limit != 0 {
                let _ = self.ingress.cache.incr(&user_key, -1, hour).await;
            }
            return false;
        }
        true
    }

    /// Whether mail to `address` reaches `account`'s own mailbox (so they may send
    /// as it); `Err` when the directory cannot say.
    /// Own address and its subaddresses (`user+tag@`), and aliases that deliver to
    /// this user alone. Not: aliases shared with others (a member of `all@` must not
    /// speak for all), and nothing at a domain whose catch-all is this user (it would
    /// make every unassigned address theirs).
    async fn owns(&self, account: &Account, address: &EmailAddress) -> Result<bool, ()> {
        let own = &account.address;
        if address == own {
            return Ok(true);
        }
        let local = address.local_part().to_lowercase();
        let own_local = own.local_part().to_lowercase();
        if address.domain() == own.domain()
            && local
                .strip_prefix(&own_local)
                .is_some_and(|tag| tag.starts_with('+'))
        {
            return Ok(true);
        }
        let only_me = |lookup: Result<Lookup, DeliveryError>| match lookup {
            Ok(Lookup::Deliver(r)) => Ok(r.remote.is_empty()
                && !r.users.is_empty()
                && r.users.iter().all(|(_, u)| *u == account.user.user)),
            Ok(_) | Err(DeliveryError::Permanent { .. }) => Ok(false),
            Err(DeliveryError::Temporary { .. }) => Err(()),
        };
        if !only_me(self.ingress.directory.lookup(address).await)? {
            return Ok(false);
        }
        // An address nobody has: if that reaches this user too, the domain's
        // catch-all does, and the alias above may be nothing but the catch-all.
        let probe: EmailAddress = format!(
            "mailmesh-probe-{}@{}",
            QueueId::generate(),
            address.domain()
        )
        .parse()
        .map_err(|_| ())?;
        Ok(!only_me(self.ingress.directory.lookup(&probe).await)?)
    }

    /// AUTH (RFC 4954) with PLAIN (RFC 4616) or LOGIN, on the submission ports only
    /// and only over TLS; failures are limited like IMAP's and POP3's logins.
    async fn auth<R, W>(
        &mut self,
        mechanism: u64,
        initial: String,
        reader: &mut R,
        out: &mut W,
        input: &mut Vec<u8>,
        shutdown: &Shutdown,
    ) -> io::Result<Next>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Some(config) = self.ingress.submission.clone() else {
            return self
                .error(out, "503 5.5.1 AUTH is not available on this port\r\n")
                .await;
        };
        if !self.tls && !config.allow_plaintext_auth {
            return self
                .error(
                    out,
                    "538 5.7.11 Encryption required for requested authentication mechanism\r\n",
                )
                .await;
        }
        if self.account.is_some() {
            return self.error(out, "503 5.5.1 Already authenticated\r\n").await;
        }
        if self.helo.is_none() {
            return self.error(out, "503 5.5.1 Send EHLO first\r\n").await;
        }
        if self.tx.is_some() {
            return self
                .error(
                    out,
                    "503 5.5.1 AUTH is not allowed during a mail transaction\r\n",
                )
                .await;
        }
        // `=` is an empty initial response (RFC 4954 4).
        let initial = (!initial.is_empty()).then(|| {
            if initial == "=" {
                String::new()
            } else {
                initial
            }
        });
        let credentials = match mechanism {
            smtp_proto::AUTH_PLAIN => {
                let response = match initial {
                    Some(r) => Some(r),
                    None => {
                        self.challenge(b"334 \r\n", reader, out, input, shutdown)
                            .await?
                    }
                };
                response.map(|r| decode_plain(&r))
            }
            smtp_proto::AUTH_LOGIN => {
                let user = match initial {
                    Some(r) => Some(r),
                    None => {
                        self.challenge(b"334 VXNlcm5hbWU6\r\n", reader, out, input, shutdown)
                            .await?
                    }
                };
                match user {
                    None => None,
                    Some(user) => self
                        .challenge(b"334 UGFzc3dvcmQ6\r\n", reader, out, input, shutdown)
                        .await?
                        .map(|password| decode_login(&user, &password)),
                }
            }
            _ => {
                return self
                    .error(out, "504 5.5.4 Unrecognized authentication type\r\n")
                    .await;
            }
        };
        let (name, password) = match credentials {
            // The client cancelled with `*` (or went away: the next read ends it).
            None => {
                return self
                    .error(out, "501 5.7.0 Authentication canceled\r\n")
                    .await;
            }
            Some(Err(reply)) => return self.error(out, reply).await,
            Some(Ok(c)) => c,
        };
        let directory = self.ingress.directory.clone();
        let client = self.peer.ip();
        let login = mailmesh_cache::login::check(
            &self.ingress.cache,
            client,
            &name,
            &config.login_limits(),
            |name| async move { directory.authenticate(&name, &password, client).await },
        )
        .await;
        match login {
            Login::Ok(account) => {
                tracing::info!(user = %account.address, client = %self.peer.ip(), "authenticated");
                self.account = Some(account);
                out.write_all(b"235 2.7.0 Authentication successful\r\n")
                    .await?;
                Ok(Next::Continue)
            }
            Login::Invalid => {
                crate::metrics::rejected("auth_failed");
                self.error(out, "535 5.7.8 Authentication credentials invalid\r\n")
                    .await
            }
            Login::Throttled => {
                crate::metrics::rejected("auth_throttled");
                out.write_all(b"421 4.7.0 Too many failed logins, try again later\r\n")
                    .await?;
                Ok(Next::Close)
            }
            Login::Busy => {
                crate::metrics::rejected("auth_busy");
                out.write_all(
                    b"454 4.7.0 Too many logins at once from your address, try again later\r\n",
                )
                .await?;
                Ok(Next::Continue)
            }
            Login::Unavailable => {
                out.write_all(b"454 4.7.0 Temporary authentication failure\r\n")
                    .await?;
                Ok(Next::Continue)
            }
        }
    }

    /// Sends a `334` challenge and reads the client's line; `None` if it cancelled
    /// (`*`), went away or timed out.
    async fn challenge<R, W>(
        &mut self,
        prompt: &[u8],
        reader: &mut R,
        out: &mut W,
        input: &mut Vec<u8>,
        shutdown: &Shutdown,
    ) -> io::Result<Option<String>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        out.write_all(prompt).await?;
        out.flush().await?;
        let timeout = self.ingress.config.command_timeout;
        loop {
            if let Some(end) = input.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = input.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                return Ok((line != "*").then_some(line));
            }
            if input.len() > AUTH_LINE_MAX {
                input.clear();
                return Ok(None);
            }
            match self.read(reader, input, timeout, shutdown).await? {
                Some(0) | None => return Ok(None),
                Some(_) => {}
            }
        }
    }

    /// The block list naming the client, if any (asked once per connection).
    async fn block_listed(&mut self) -> Result<Option<String>, Unavailable> {
        let Some(auth) = &self.ingress.auth else {
            return Ok(None);
        };
        if self.client_verdict.is_none() {
            match auth.check_client(self.peer.ip()).await {
                Ok(v) => self.client_verdict = Some(v),
                Err(e) => {
                    tracing::warn!(error = %e, "auth-check unavailable");
                    return Err(Unavailable);
                }
            }
        }
        Ok(self
            .client_verdict
            .as_ref()
            .and_then(|v| v.blocked_by().map(str::to_owned)))
    }

    fn ready_for_data(&mut self, bdat: bool) -> Result<(), String> {
        match &self.tx {
            None => Err("503 5.5.1 Need MAIL command\r\n".into()),
            Some(tx) if tx.recipients.is_empty() => Err("554 5.5.1 No valid recipients\r\n".into()),
            Some(tx) if !bdat && tx.bdat => Err("503 5.5.1 DATA after BDAT\r\n".into()),
            Some(_) => Ok(()),
        }
    }

    /// Reads the message after `354`; `None` on timeout or shutdown.
    async fn read_data<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        input: &mut Vec<u8>,
        shutdown: &Shutdown,
    ) -> io::Result<Option<Option<Vec<u8>>>> {
        let max = self.max_message_bytes();
        let deadline = Instant::now() + self.ingress.config.max_data_duration;
        // Ends exactly at <CRLF>.<CRLF> (the CRLF that ended the DATA command
        // precedes the first line): nothing else a receiver might take for the end
        // ends a message here.
        let mut data = DotReader::new();
        let mut message = Vec::new();
        let mut too_big = false;
        loop {
            let (done, consumed) = match data.ingest(input, &mut message) {
                Some(n) => (true, n),
                None => (false, input.len()),
            };
            input.drain(..consumed);
            if message.len() > max {
                // Read on to the end so the session stays in step, keep nothing.
                too_big = true;
                message.clear();
            }
            if done {
                return Ok(Some((!too_big).then_some(message)));
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(self.ingress.config.data_timeout);
            match self.read(reader, input, left, shutdown).await? {
                Some(0) | None => return Ok(None),
                Some(_) => {}
            }
        }
    }

    /// Reads one BDAT chunk, keeping it when `keep` and the message stays within
    /// the limit; `None` if the connection ended first.
    async fn read_chunk<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        input: &mut Vec<u8>,
        size: usize,
        shutdown: &Shutdown,
        keep: bool,
    ) -> io::Result<Option<()>> {
        let max = self.max_message_bytes();
        let deadline = Instant::now() + self.ingress.config.max_data_duration;
        let mut chunk = BdatReceiver::new(size, false);
        let mut received = Vec::new();
        loop {
            let (done, consumed) = {
                let mut iter = input.iter();
                let done = chunk.ingest(&mut iter, &mut received);
                (done, input.len() - iter.as_slice().len())
            };
            input.drain(..consumed);
            if keep
                && let Some(tx) = self.tx.as_mut()
                && let Some(chunks) = tx.chunks.as_mut()
            {
                chunks.extend_from_slice(&received);
                if chunks.len() > max {
                    tx.chunks = None;
                }
            }
            received.clear();
            if done {
                return Ok(Some(()));
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(self.ingress.config.data_timeout);
            match self.read(reader, input, left, shutdown).await? {
                Some(0) | None => return Ok(None),
                Some(_) => {}
            }
        }
    }

    /// Makes the message durable in the queue (one record per tenant), then
    /// answers `250`; `451` if that is not possible. The transaction ends either way.
    async fn queue(&mut self, message: Option<Vec<u8>>) -> String {
        let Some(tx) = self.tx.take() else {
            return "503 5.5.1 Need MAIL command\r\n".into();
        };
        let Some(message) = message else {
            crate::metrics::rejected("too_large");
            return "552 5.3.4 Message size exceeds fixed maximum message size\r\n".into();
        };
        // BDAT content may be binary (BINARYMIME is not offered, so it is not).
        let message = normalize_line_ends(message);
        if let Some(reply) = refused_content(&message, self.ingress.config.max_received_fields) {
            crate::metrics::rejected("malformed");
            tracing::info!(peer = %self.peer, reply = reply.trim_end(), "message refused");
            return reply.into();
        }
        // Results that claim to be ours, on both ports (a user's own message must
        // not vouch for itself to a local recipient either).
        let config = &self.ingress.config;
        let message = strip_forged_results(
            message,
            &[config.authserv_id.as_deref().unwrap_or(&config.hostname)],
        );
        if let Some(account) = self.account.clone() {
            return self.submit(tx, message, &account).await;
        }
        let started = Instant::now();
        let mut by_tenant: BTreeMap<TenantId, Vec<Recipient>> = BTreeMap::new();
        let inbound = tx.inbound;
        for (recipient, tenant) in tx.recipients {
            by_tenant.entry(tenant).or_default().push(recipient);
        }
        let first_id = QueueId::generate();
        // One trace per message: this span is its root, and its context travels in
        // the queue record to the delivery worker (and from there to storage).
        let span = tracing::info_span!(
            "smtp_message",
            queue_id = %first_id,
            client = %self.peer.ip(),
            tenants = by_tenant.len()
        );
        let trace_context = {
            let _entered = span.enter();
            let mut carrier = BTreeMap::new();
            mailmesh_kit::telemetry::inject_context(&mut carrier);
            carrier
        };
        let (helo, _) = self.helo.clone().unwrap_or_default();
        let mut junk = false;
        let mut authentication_results = None;
        let mut arc_set = None;
        let mut dmarc_reject_failure = false;
        if let Some(auth) = &self.ingress.auth {
            let facts = MessageFacts {
                ip: self.peer.ip(),
                helo: &helo,
                mail_from: &tx.from.to_string(),
                message: &message,
                arc_seal: tx.forwards,
            };
            let verdict = match auth.check_message(facts).instrument(span.clone()).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "auth-check unavailable");
                    return AUTH_UNAVAILABLE.into();
                }
            };
            let policy = inbound.unwrap_or_default();
            match judge(&policy, &verdict) {
                Some((PolicyAction::Reject, reason)) => {
                    crate::metrics::rejected(reason.metric());
                    return reason.reply(&verdict, self.peer.ip());
                }
                Some((PolicyAction::Junk, _)) => junk = true,
                Some((PolicyAction::Tag, _)) | None => {}
            }
            dmarc_reject_failure = verdict.dmarc_failure() == Some(DmarcPolicy::Reject);
            if dmarc_reject_failure && tx.srs_bounce {
                // Sent on from our addresses to the forwarded sender, whatever the
                // tenant accepts for itself: a forgery is not passed on.
                crate::metrics::rejected("dmarc");
                return "550 5.7.1 A bounce failing its author domain's DMARC policy is not passed on\r\n".into();
            }
            arc_set = verdict.arc_set;
            authentication_results = Some(verdict.authentication_results);
        }
        let message = match &authentication_results {
            Some(header) => strip_forged_results(message, &[&authserv_id(header)]),
            None => message,
        };
        let received_at = SystemTime::now();
        for tenant in by_tenant.keys() {
            let limit = self.ingress.config.messages_per_tenant_per_minute;
            if !self
                .ingress
                .within_limit(&format!("smtp:tenant:{tenant}"), limit)
                .await
            {
                crate::metrics::rejected("tenant_rate");
                return "451 4.7.1 Too much mail for this domain right now, try again later\r\n"
                    .into();
            }
        }
        for (i, (tenant, recipients)) in by_tenant.into_iter().enumerate() {
            let queue_id = if i == 0 {
                first_id
            } else {
                QueueId::generate()
            };
            let received = self.received(queue_id, &recipients, tx.smtputf8, received_at);
            let header = authentication_results.as_deref().unwrap_or_default();
            let mut content = Vec::with_capacity(header.len() + received.len() + message.len());
            content.extend_from_slice(header.as_bytes());
            content.extend_from_slice(received.as_bytes());
            content.extend_from_slice(&message);
            let body = match self.body(&tenant, queue_id, content).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "storing a message body failed");
                    return "451 4.3.0 Queue unavailable, try again later\r\n".into();
                }
            };
            let envelope = Envelope {
                queue_id,
                tenant: tenant.clone(),
                mail_from: tx.from.clone(),
                recipients,
                received_at,
                body_type: tx.body_type,
                smtputf8: tx.smtputf8,
                dsn_ret: tx.ret,
                dsn_envid: tx.envid.clone(),
                client: Some(ClientInfo {
                    ip: self.peer.ip(),
                    helo: helo.clone(),
                    tls: self.tls,
                    authenticated_as: None,
                }),
                authentication_results: authentication_results.as_deref().map(header_value),
                junk,
                arc_set: arc_set.clone(),
                dmarc_reject_failure,
                trace_context: trace_context.clone(),
                body,
            };
            if let Err(reply) = self.publish(&envelope).await {
                return reply;
            }
            crate::metrics::accepted(tenant.as_str());
        }
        crate::metrics::queued(started.elapsed());
        tracing::info!(queue_id = %first_id, peer = %self.peer, "message queued");
        format!("250 2.0.0 Ok: queued as {first_id}\r\n")
    }

    /// The Received field (RFC 5321 4.4) this hop adds; RFC 3848 protocol names.
    /// On submission with `hide_client` the client's name and address are left out.
    fn received(
        &self,
        queue_id: QueueId,
        recipients: &[Recipient],
        smtputf8: bool,
        at: SystemTime,
    ) -> String {
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        let base = match (esmtp, smtputf8) {
            (true, true) => "UTF8SMTP",
            (true, false) => "ESMTP",
            (false, _) => "SMTP",
        };
        let proto = format!(
            "{base}{}{}",
            if self.tls { "S" } else { "" },
            if self.account.is_some() { "A" } else { "" }
        );
        let hide = self
            .ingress
            .submission
            .as_ref()
            .is_some_and(|s| s.hide_client)
            || self.account.as_ref().is_some_and(|a| a.hide_client);
        let from = if hide {
            String::new()
        } else {
            // RFC 5321 §4.4: TCP-info is an address literal.
            format!("from {helo} ({})\r\n\t", address_literal(self.peer.ip()))
        };
        let for_ = match recipients {
            [only] => format!("\r\n\tfor <{}>", only.address),
            _ => String::new(),
        };
        format!(
            "Received: {from}by {host} (mailmesh) with {proto} id {queue_id}{for_};\r\n\t{date}\r\n",
            host = self.ingress.config.hostname,
            date = rfc5322_date(at),
        )
    }

    /// Writes one record to the queue; the reply to give if that fails.
    async fn publish(&self, envelope: &Envelope) -> Result<(), String> {
        let published = self
            .ingress
            .queue
            .publish(OutgoingRecord {
                topic: self.ingress.config.topic.clone(),
                key: Bytes::from(envelope.queue_id.to_string()),
                payload: Bytes::from(encode_envelope(envelope)),
                headers: envelope.trace_headers(),
                partition: None,
            })
            .await;
        let Err(e) = published else {
            return Ok(());
        };
        tracing::warn!(error = %e, "queueing a message failed");
        // The client sends it again: the body written for this attempt is not kept
        // (should the record have landed after all, the worker parks it as one
        // whose body is gone, and the retry is what gets delivered).
        if let BodyRef::Object { key, .. } = &envelope.body
            && let Err(e) = self.ingress.objects.delete(&Path::from(key.as_str())).await
        {
            tracing::warn!(%key, error = %e, "removing the body of a message not queued");
        }
        Err("451 4.3.0 Queue unavailable, try again later\r\n".to_owned())
    }

    /// Submission: completes, checks and signs the message, then queues one record
    /// for the sender's tenant with every recipient (local ones are delivered, the
    /// others relayed, by the workers).
    async fn submit(&mut self, tx: Transaction, message: Vec<u8>, account: &Account) -> String {
        let config = self.ingress.submission.clone().unwrap_or_default();
        let queue_id = QueueId::generate();
        let received_at = SystemTime::now();
        let span = tracing::info_span!(
            "smtp_submission",
            queue_id = %queue_id,
            user = %account.address,
            recipients = tx.recipients.len()
        );
        let trace_context = {
            let _entered = span.enter();
            let mut carrier = BTreeMap::new();
            mailmesh_kit::telemetry::inject_context(&mut carrier);
            carrier
        };
        let completed = crate::submit::complete(
            message,
            &account.address,
            &self.ingress.config.hostname,
            queue_id,
            received_at,
        );
        // Every From and Sender address must be the user's (RFC 6409 8.1 lets the
        // MSA refuse).
        let authors = match &completed.authors {
            Ok(authors) => authors,
            Err(reply) => {
                crate::metrics::rejected("sender_mismatch");
                return (*reply).into();
            }
        };
        for author in authors {
            match self.owns(account, author).await {
                Ok(true) => {}
                Ok(false) => {
                    crate::metrics::rejected("sender_mismatch");
                    tracing::info!(user = %account.address, %author, "message from another author refused");
                    return format!("550 5.7.1 Author address <{author}> is not yours\r\n");
                }
                Err(()) => return "451 4.3.0 Temporary failure, try again later\r\n".into(),
            }
        }
        let mut content = Vec::new();
        let recipients: Vec<Recipient> = tx.recipients.into_iter().map(|(r, _)| r).collect();
        content.extend_from_slice(
            self.received(queue_id, &recipients, tx.smtputf8, received_at)
                .as_bytes(),
        );
        if config.dkim_sign {
            // The From domain signs (authors[0]: From comes first).
            let domain = authors[0].domain();
            match self
                .ingress
                .keys
                .get(
                    &*self.ingress.directory,
                    account,
                    domain,
                    config.key_cache_ttl,
                )
                .await
            {
                Ok(Some(key)) => match crate::submit::sign(&key, &completed.message) {
                    Ok(header) => content.extend_from_slice(header.as_bytes()),
                    Err(e) => {
                        tracing::error!(domain = %domain, error = %e, "DKIM signing failed");
                        return "451 4.3.0 Cannot sign the message now, try again later\r\n".into();
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "DKIM keys unavailable");
                    return "451 4.3.0 Temporary failure, try again later\r\n".into();
                }
            }
        }
        content.extend_from_slice(&completed.message);
        let tenant = account.user.tenant.clone();
        let body = match self.body(&tenant, queue_id, content).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "storing a message body failed");
                return "451 4.3.0 Queue unavailable, try again later\r\n".into();
            }
        };
        let (helo, _) = self.helo.clone().unwrap_or_default();
        let envelope = Envelope {
            queue_id,
            tenant: tenant.clone(),
            mail_from: tx.from,
            recipients,
            received_at,
            body_type: tx.body_type,
            smtputf8: tx.smtputf8,
            dsn_ret: tx.ret,
            dsn_envid: tx.envid,
            client: Some(ClientInfo {
                ip: self.peer.ip(),
                helo,
                tls: self.tls,
                authenticated_as: Some(account.address.clone()),
            }),
            authentication_results: None,
            junk: false,
            // A user's own mail: nothing to seal, nothing failed.
            arc_set: None,
            dmarc_reject_failure: false,
            trace_context,
            body,
        };
        if let Err(reply) = self.publish(&envelope).instrument(span).await {
            return reply;
        }
        crate::metrics::accepted(tenant.as_str());
        tracing::info!(%queue_id, user = %account.address, "message submitted");
        format!("250 2.0.0 Ok: queued as {queue_id}\r\n")
    }

    /// Small bodies travel in the record; large ones go to object storage first.
    async fn body(
        &self,
        tenant: &TenantId,
        queue_id: QueueId,
        content: Vec<u8>,
    ) -> Result<BodyRef, mailmesh_objstore::object_store::Error> {
        if content.len() <= self.ingress.config.inline_body_bytes {
            return Ok(BodyRef::Inline(Bytes::from(content)));
        }
        let key = format!("t/{tenant}/queue/{queue_id}");
        let size = content.len() as u64;
        self.ingress
            .objects
            .put(&Path::from(key.as_str()), PutPayload::from(content))
            .await?;
        Ok(BodyRef::Object {
            key,
            size,
            claim: None,
        })
    }
}

/// An IP address as an SMTP address literal (RFC 5321 §4.1.3): `[192.0.2.7]`,
/// `[IPv6:2001:db8::1]` (an IPv4-mapped IPv6 address as the IPv4 one).
fn address_literal(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// Whether the path in a command line is the null path `<>`.
fn null_path(line: &[u8]) -> bool {
    line.iter()
        .position(|b| *b == b'<')
        .is_some_and(|at| line[at + 1..].trim_ascii_start().first() == Some(&b'>'))
}

/// Whether a command line is its verb alone (trailing spaces aside).
fn bare_verb(line: &[u8]) -> bool {
    let line = line.trim_ascii_end();
    !line.contains(&b' ') && !line.contains(&b'\t')
}

/// RFC 4954 4: a client may send up to 12,288 octets in one AUTH line.
const AUTH_LINE_MAX: usize = 12_288;

/// Room made in the input buffer before each read.
const READ_CHUNK: usize = 8192;

/// `authzid NUL authcid NUL password`, base64 (RFC 4616); acting for someone else
/// (an authzid other than the user) is not allowed.
fn decode_plain(response: &str) -> Result<(String, String), &'static str> {
    use base64::Engine as _;
    const BAD: &str = "501 5.5.2 Cannot decode response\r\n";
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response.trim())
        .map_err(|_| BAD)?;
    let mut parts = bytes.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| BAD);
    let (authz, user, password) = (text(authz)?, text(user)?, text(password)?);
    if !authz.is_empty() && !authz.eq_ignore_ascii_case(&user) {
        return Err("535 5.7.8 Authentication credentials invalid\r\n");
    }
    Ok((user, password))
}

/// LOGIN's user name and password lines, each base64.
fn decode_login(user: &str, password: &str) -> Result<(String, String), &'static str> {
    use base64::Engine as _;
    const BAD: &str = "501 5.5.2 Cannot decode response\r\n";
    let decode = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(BAD)
    };
    Ok((decode(user)?, decode(password)?))
}

/// auth-check did not answer (logged where it happened).
struct Unavailable;

const AUTH_UNAVAILABLE: &str = "451 4.7.0 Temporary authentication failure, try again later\r\n";

/// Why a tenant's policy acts on a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Dmarc,
    BlockListed,
}

impl Failure {
    fn metric(self) -> &'static str {
        match self {
            Self::Dmarc => "dmarc",
            Self::BlockListed => "block_list",
        }
    }

    fn reply(self, verdict: &MessageVerdict, ip: std::net::IpAddr) -> String {
        match self {
            // No author domain: not exactly one From field (RFC 7489 §6.6.1).
            Self::Dmarc if verdict.dmarc_domain.is_empty() => {
                "550 5.7.1 A message must have exactly one From field\r\n".into()
            }
            Self::Dmarc => format!(
                "550 5.7.1 Rejected by the DMARC policy of {}\r\n",
                verdict.dmarc_domain
            ),
            Self::BlockListed => format!(
                "550 5.7.1 Client address {ip} is listed by {}\r\n",
                verdict.client.blocked_by().unwrap_or("a block list")
            ),
        }
    }
}

/// The strongest action `policy` takes on what `verdict` found (reject over junk
/// over tag), and why; `None` when nothing failed.
fn judge(policy: &InboundPolicy, verdict: &MessageVerdict) -> Option<(PolicyAction, Failure)> {
    let rank = |a: PolicyAction| match a {
        PolicyAction::Tag => 0,
        PolicyAction::Junk => 1,
        PolicyAction::Reject => 2,
    };
    let dmarc = verdict.dmarc_failure().map(|p| {
        let action = match p {
            DmarcPolicy::Reject => policy.dmarc_reject,
            DmarcPolicy::Quarantine => policy.dmarc_quarantine,
            DmarcPolicy::None => PolicyAction::Tag,
        };
        (action, Failure::Dmarc)
    });
    let listed = verdict
        .client
        .blocked_by()
        .map(|_| (policy.block_listed, Failure::BlockListed));
    [dmarc, listed]
        .into_iter()
        .flatten()
        .max_by_key(|(action, _)| rank(*action))
}

/// The `authserv-id` an `Authentication-Results` field names (before the first `;`).
fn authserv_id(field: &str) -> String {
    let value = header_value(field);
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The value of a whole `Authentication-Results: ...\r\n` field, unfolded lines kept.
fn header_value(field: &str) -> String {
    field
        .split_once(':')
        .map_or(field, |(_, v)| v)
        .trim()
        .to_owned()
}

/// RFC 8601 §5: `Authentication-Results` fields that claim one of our own
/// authserv-ids arrived from outside, so they are forgeries (a sender vouching for
/// itself); so are `ARC-Authentication-Results` fields that claim it (we have sealed
/// nothing yet). They are removed, whatever the spelling of the id (case, quotes,
/// comments, a trailing dot, backslash escapes); every other header and the body
/// stay byte for byte.
pub fn strip_forged_results(message: Vec<u8>, ours: &[&str]) -> Vec<u8> {
    let (fields, headers_end) = crate::submit::header_fields(&message);
    let ours: Vec<String> = ours.iter().map(|id| normalize_id(id)).collect();
    let forged = |field: &[u8]| {
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return false;
        };
        let (name, value) = field.split_at(colon);
        let name = name.trim_ascii();
        let value = String::from_utf8_lossy(&value[1..]);
        let claimed = if name.eq_ignore_ascii_case(b"authentication-results") {
            first_token(&value)
        } else if name.eq_ignore_ascii_case(b"arc-authentication-results") {
            // `i=N; authserv-id; ...` (RFC 8617 §4.1.1); either of the first two
            // parts, as a lenient reader might take the other order.
            let parts = split_outside_comments(&value);
            return parts
                .iter()
                .take(2)
                .filter_map(|p| first_token(p))
                .any(|id| ours.contains(&normalize_id(&id)));
        } else {
            return false;
        };
        claimed.is_some_and(|id| ours.contains(&normalize_id(&id)))
    };
    if !fields.iter().any(|r| forged(&message[r.clone()])) {
        return message;
    }
    let mut out = Vec::with_capacity(message.len());
    for range in fields {
        if !forged(&message[range.clone()]) {
            out.extend_from_slice(&message[range]);
        }
    }
    out.extend_from_slice(&message[headers_end..]);
    out
}

/// `value` split at the semicolons outside comments, quoted strings and escapes
/// (`i=1 (a;b); localhost; …` is three parts, not four).
fn split_outside_comments(value: &str) -> Vec<&str> {
    let (mut parts, mut start, mut depth) = (Vec::new(), 0, 0usize);
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            ';' if !quoted && depth == 0 => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

/// An authserv-id as receivers compare it: without backslash escapes, a trailing
/// dot (the root) or case.
fn normalize_id(id: &str) -> String {
    id.replace('\\', "")
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The authserv-id of an Authentication-Results value: the first token after any
/// folding whitespace and (nested) comments, without quotes (RFC 8601 2.2 allows
/// CFWS and a quoted-string there). A backslash escapes the next character, so
/// `localhost\;` is the token `localhost;`.
fn first_token(value: &str) -> Option<String> {
    let mut depth = 0usize;
    let mut token = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 && c != ';' {
                token.push(c);
            }
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' if depth == 0 => {
                if quoted {
                    return Some(token);
                }
                quoted = true;
            }
            _ if quoted => token.push(c),
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth > 0 => {}
            c if c.is_whitespace() || c == ';' => {
                if !token.is_empty() {
                    return Some(token);
                }
            }
            c => token.push(c),
        }
    }
    (!token.is_empty()).then_some(token)
}

/// What no message may hold, on either port, because receivers after us would read
/// it differently from us: NUL bytes (RFC 5322 §2.3; a receiver that drops them
/// before looking for the end of data, or for a header name, sees another message
/// or another field: `From\0:` passed DMARC and the From check) and header field
/// names with anything but printable ASCII (RFC 5322 §3.6.8 ftext). Lines of the
/// header section without a colon and whitespace before the colon (the obsolete
/// syntax) are refused too: mail-auth ends the header section at the first and
/// drops fields with the second, while mail clients show them, so `From : ceo@…`
/// or a junk line before the From had DMARC look at no From at all. More than
/// `max_received` Received fields is a loop.
pub fn refused_content(message: &[u8], max_received: usize) -> Option<&'static str> {
    if memchr::memchr(0, message).is_some() {
        return Some("550 5.6.0 NUL characters are not allowed in a message\r\n");
    }
    let (fields, _) = crate::submit::header_fields(message);
    let mut received = 0;
    for range in fields {
        let field = &message[range];
        let Some(colon) = memchr::memchr(b':', field) else {
            return Some("550 5.6.0 Malformed header field (no colon)\r\n");
        };
        let name = &field[..colon];
        let ftext = |b: &u8| (33..=126).contains(b) && *b != b':';
        if name.is_empty() || !name.iter().all(ftext) {
            return Some("550 5.6.0 Malformed header field name\r\n");
        }
        if name.eq_ignore_ascii_case(b"received") {
            received += 1;
            if received > max_received {
                return Some("554 5.4.6 Too many Received fields: a mail loop?\r\n");
            }
        }
    }
    None
}

/// Bare LF and bare CR become CRLF, so no later hop can read a line end (or the
/// `<LF>.<LF>` of an SMTP smuggling attempt) differently from us. Messages that are
/// already clean come back untouched, without a copy.
pub fn normalize_line_ends(message: Vec<u8>) -> Vec<u8> {
    let clean = message.iter().enumerate().all(|(i, b)| match b {
        b'\n' => i > 0 && message[i - 1] == b'\r',
        b'\r' => message.get(i + 1) == Some(&b'\n'),
        _ => true,
    });
    if clean {
        return message;
    }
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' if message.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn parse_error_reply(e: &ParseError) -> String {
    match e {
        ParseError::UnknownCommand => "500 5.5.1 Command unrecognized\r\n".into(),
        ParseError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax\r\n".into(),
        ParseError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax\r\n".into(),
        ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}\r\n"),
        ParseError::InvalidParameter { param } => {
            format!("501 5.5.4 Invalid parameter {param}\r\n")
        }
        ParseError::UnsupportedParameter { param } => {
            let param: String = param
                .chars()
                .filter(char::is_ascii_graphic)
                .take(64)
                .collect();
            format!("555 5.5.4 Unsupported parameter {param}\r\n")
        }
        ParseError::ResponseTooLong => "500 5.5.2 Line too long\r\n".into(),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            "500 5.5.1 Command unrecognized\r\n".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{address_literal, normalize_line_ends, strip_forged_results};

    #[test]
    fn client_addresses_are_address_literals() {
        assert_eq!(address_literal("192.0.2.7".parse().unwrap()), "[192.0.2.7]");
        assert_eq!(
            address_literal("2001:db8::1".parse().unwrap()),
            "[IPv6:2001:db8::1]"
        );
        assert_eq!(
            address_literal("::ffff:192.0.2.7".parse().unwrap()),
            "[192.0.2.7]"
        );
    }

    #[test]
    fn forged_authentication_results_are_removed_whatever_their_spelling() {
        let message = b"Authentication-Results: (c) mx.acme.test; dkim=pass\r\n\
            Authentication-Results: \"MX.ACME.TEST\";\r\n dmarc=pass\r\n\
            Authentication-Results:mx.acme.test; spf=pass\r\n\
            Authentication-Results: other.example; spf=pass\r\n\
            Authentication-Results: mx.acme.test.evil; spf=pass\r\n\
            Subject: hi\r\n\r\nAuthentication-Results: mx.acme.test; in the body\r\n"
            .to_vec();
        let kept = String::from_utf8(strip_forged_results(message, &["mx.acme.test"])).unwrap();
        assert_eq!(
            kept,
            "Authentication-Results: other.example; spf=pass\r\n\
             Authentication-Results: mx.acme.test.evil; spf=pass\r\n\
             Subject: hi\r\n\r\nAuthentication-Results: mx.acme.test; in the body\r\n"
        );
        // No header section: the body is left alone.
        let bare = b"\r\nAuthentication-Results: mx.acme.test; x\r\n".to_vec();
        assert_eq!(strip_forged_results(bare.clone(), &["mx.acme.test"]), bare);
        // The spellings a trial slipped past: a trailing dot, an escaped separator,
        // ARC-Authentication-Results claiming us (and other ids we go by).
        let message = b"Authentication-Results: localhost.; dmarc=pass\r\n\
            Authentication-Results: localhost\\; dmarc=pass\r\n\
            Authentication-Results: lo\\calhost; dmarc=pass\r\n\
            ARC-Authentication-Results: i=1; localhost; dmarc=pass\r\n\
            ARC-Authentication-Results: i=1; LOCALHOST.; dmarc=pass\r\n\
            Authentication-Results: mx.acme.test; spf=pass\r\n\
            ARC-Authentication-Results: i=1; lists.example; dmarc=pass\r\n\
            Subject: hi\r\n\r\nbody\r\n"
            .to_vec();
        let kept = String::from_utf8(strip_forged_results(
            message,
            &["localhost", "mx.acme.test"],
        ))
        .unwrap();
        assert_eq!(
            kept,
            "ARC-Authentication-Results: i=1; lists.example; dmarc=pass\r\n\
             Subject: hi\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn bare_line_ends_become_crlf() {
        assert_eq!(normalize_line_ends(b"a\r\nb\r\n".to_vec()), b"a\r\nb\r\n");
        assert_eq!(
            normalize_line_ends(b"a\nb\rc\r\n".to_vec()),
            b"a\r\nb\r\nc\r\n"
        );
        assert_eq!(normalize_line_ends(b"x\n.\ny".to_vec()), b"x\r\n.\r\ny");
        assert_eq!(normalize_line_ends(b"end\r".to_vec()), b"end\r\n");
        assert_eq!(normalize_line_ends(Vec::new()), b"");
    }
}
