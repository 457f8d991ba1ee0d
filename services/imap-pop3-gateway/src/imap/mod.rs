//! One IMAP session (RFC 3501 IMAP4rev1), generic over the stream so tests drive it
//! in memory. Commands are framed by `imap-codec`'s fragmentizer (lines and literals,
//! bounded before anything is parsed) and parsed by its command codec; replies are
//! encoded by its response codec.
//!
//! Extensions: STARTTLS, LOGINDISABLED, AUTH=PLAIN, SASL-IR, ENABLE (CONDSTORE,
//! QRESYNC, IMAP4rev2), CONDSTORE, QRESYNC, IDLE, UIDPLUS, MOVE, UNSELECT, LITERAL+,
//! NAMESPACE, ID, SPECIAL-USE, QUOTA, STATUS=SIZE, BINARY, ESEARCH, SEARCHRES,
//! LIST-EXTENDED, LIST-STATUS. Mailbox names are modified UTF-7 on the wire for
//! IMAP4rev1 clients, UTF-8 for IMAP4rev2 ones and in storage.
//!
//! The session keeps only its view of the selected mailbox (sequence numbers to
//! UIDs, flags); everything else is asked of the storage service. Changes made by
//! other sessions, on any pod, arrive through the storage change stream and are
//! announced as EXISTS / EXPUNGE / FETCH FLAGS after the next command or during IDLE.

mod cache;
mod ext;
pub mod message;
mod mutf7;
mod search;
mod selected;
mod watch;

pub(crate) use cache::MessageCache;
pub(crate) use watch::Watches;
use watch::{Pending, Watcher};

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use imap_codec::decode::Decoder;
use imap_codec::encode::{Encoder, Fragment};
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::SelectParameter;
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::{
    Atom, IString, LiteralMode, NString, QuotedChar, Tag, Text, Vec1,
};
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use imap_codec::imap_types::extensions::namespace::Namespace;
use imap_codec::imap_types::extensions::quota::{QuotaGet, Resource};
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::flag::FlagNameAttribute;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::response::{
    Bye, Capability, Code, CodeOther, CommandContinuationRequest, Data, Greeting, GreetingKind,
    Response, Status, StatusBody, StatusKind, Tagged,
};
use imap_codec::imap_types::sequence::SequenceSet;
use imap_codec::imap_types::status::{StatusDataItem, StatusDataItemName};
use imap_codec::imap_types::{IntoStatic, ToStatic};
use imap_codec::{
    AuthenticateDataCodec, CommandCodec, GreetingCodec, IdleDoneCodec, ResponseCodec,
};
use mailmesh_kit::Shutdown;
use mailmesh_proto::v1;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::Gateway;
use crate::login::{self, Login};
use selected::Selected;

const PROTOCOL: &str = "imap";
/// The hierarchy delimiter.
const DELIMITER: char = '/';

/// What the loop does after a command.
enum Next {
    Continue,
    Close,
    StartTls,
}

/// What the reader produced.
enum Input {
    /// A complete message (command, authenticate line or DONE) in the fragmentizer.
    Message,
    /// The connection ended, timed out or the server is stopping.
    End(&'static str),
    /// A change notification arrived while waiting (IDLE only).
    Changed,
    /// An APPEND from a logged-in client announced its message literal: the
    /// session decides (size, quota) and streams it to storage itself.
    AppendLiteral { length: usize, sync: bool },
}

/// The connection: the stream, the framing state and the replies not yet written.
/// Bytes read from the client at a time.
const READ_BUFFER: usize = 4096;
/// Replies of many lines are written in pieces of about this size.
const WRITE_BATCH: usize = 32 << 10;
/// An APPEND literal goes to storage in pieces of about this size.
const APPEND_CHUNK: usize = 32 << 10;
/// How long storage has to answer an APPEND once the whole message was sent.
const APPEND_ANSWER: Duration = Duration::from_secs(60);

struct Conn<S> {
    stream: S,
    frag: Fragmentizer,
    /// Where reads land before the fragmentizer takes them. On the heap, once per
    /// connection: in the read future it would be copied into every future that
    /// awaits it (the session's, IDLE's), making each idle session's state triple.
    read_buf: Box<[u8]>,
    out: Vec<u8>,
    /// Items written so far of the FETCH reply being written.
    fetch_items: usize,
    /// Bytes read but not yet handed to the fragmentizer: it gets a line at a time
    /// (a literal at once), so what follows an APPEND's literal announcement stays
    /// here for the session to stream.
    pending: Vec<u8>,
    /// Bytes of a literal the fragmentizer still expects.
    literal_left: usize,
    /// When the message being read began to arrive (its deadline runs from then).
    started: Option<tokio::time::Instant>,
    max_command: usize,
    command_timeout: Duration,
    /// After login: only then is an APPEND's literal streamed (before, every
    /// command is held to `max_command_bytes`).
    authenticated: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, config: &crate::ImapConfig) -> Self {
        // APPEND literals are streamed past the fragmentizer: it holds commands only.
        let total = config.max_command_bytes.saturating_add(1024);
        Self {
            stream,
            frag: Fragmentizer::new(u32::try_from(total).unwrap_or(u32::MAX)),
            read_buf: vec![0; READ_BUFFER].into_boxed_slice(),
            out: Vec::with_capacity(1024),
            fetch_items: 0,
            pending: Vec::new(),
            literal_left: 0,
            started: None,
            max_command: config.max_command_bytes,
            command_timeout: config.command_timeout,
            authenticated: false,
        }
    }

    fn push(&mut self, response: &Response<'_>) {
        self.out
            .extend(ResponseCodec::default().encode(response).dump());
    }

    /// Starts a FETCH reply, `* seq FETCH (`: [`Self::fetch_item`] writes its items,
    /// [`Self::end_fetch`] closes it.
    fn begin_fetch(&mut self, seq: NonZeroU32) {
        self.fetch_items = 0;
        self.out
            .extend_from_slice(format!("* {seq} FETCH (").as_bytes());
    }

    /// Encodes one item of the FETCH reply begun for `seq` and writes it, so the
    /// reply never holds more than one item's copy. Literals whose bytes are a
    /// placeholder for one of `verbatim` (in order: the same bytes with NUL as 0x01)
    /// go out as the stored bytes themselves.
    /// `origin`: the start of a partial BINARY item (RFC 3516 §4.2: `BINARY[1]<0>`),
    /// which the codec's item has no place for.
    async fn fetch_item(
        &mut self,
        seq: NonZeroU32,
        item: MessageDataItem<'_>,
        verbatim: &[&[u8]],
        origin: Option<u32>,
    ) -> io::Result<()> {
        const DIRECT: usize = 64 << 10;
        if self.fetch_items > 0 {
            self.out.push(b' ');
        }
        self.fetch_items += 1;
        // Encoded as a reply of its own, `* seq FETCH (` item `)` CRLF, and written
        // without that frame.
        let one = Response::Data(Data::Fetch {
            seq,
            items: Vec1::from(item),
        });
        let fragments: Vec<Fragment> = ResponseCodec::default().encode(&one).collect();
        drop(one);
        let prefix = format!("* {seq} FETCH (");
        let last = fragments.len().saturating_sub(1);
        let mut pending = verbatim.iter().peekable();
        for (n, fragment) in fragments.into_iter().enumerate() {
            let (data, literal) = match fragment {
                Fragment::Line { data } => (data, false),
                Fragment::Literal { data, .. } => (data, true),
            };
            let mut bytes: &[u8] = &data;
            let with_origin: Vec<u8>;
            if n == 0 {
                bytes = bytes.strip_prefix(prefix.as_bytes()).unwrap_or(bytes);
                // `BINARY[1.2]` names part numbers only: its first `]` ends it.
                if let Some(origin) = origin
                    && let Some(at) = bytes.iter().position(|&b| b == b']')
                {
                    with_origin = [
                        &bytes[..=at],
                        format!("<{origin}>").as_bytes(),
                        &bytes[at + 1..],
                    ]
                    .concat();
                    bytes = &with_origin;
                }
            }
            if n == last {
                bytes = bytes.strip_suffix(b")\r\n").unwrap_or(bytes);
            }
            if literal {
                let original = pending.next_if(|o| {
                    o.len() == bytes.len()
                        && o.iter()
                            .zip(bytes)
                            .all(|(&o, &d)| d == if o == 0 { 1 } else { o })
                });
                if let Some(original) = original {
                    bytes = original;
                }
            }
            if bytes.len() >= DIRECT {
                // Large literals go straight to the connection, not through `out`.
                self.stream.write_all(&self.out).await?;
                self.out.clear();
                self.stream.write_all(bytes).await?;
            } else {
                self.out.extend_from_slice(bytes);
            }
        }
        Ok(())
    }

    /// Closes the FETCH reply. It is sent once [`WRITE_BATCH`] bytes wait (the
    /// command's end sends the rest): one write per message made `FETCH 1:*
    /// (FLAGS)` on 50,000 messages 50,000 writes and TLS records.
    async fn end_fetch(&mut self) -> io::Result<()> {
        self.out.extend_from_slice(b")\r\n");
        if self.out.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    fn push_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > 64 << 10 {
                self.out.shrink_to(1024);
            }
        }
        self.stream.flush().await
    }

    /// Reads until the fragmentizer holds a whole message, answering literal
    /// announcements on the way. `changes` wakes the wait during IDLE. The wait for
    /// a message ends `timeout` from now, and once a message has begun it must be
    /// complete within `command_timeout`: a client trickling a byte at a time
    /// extends neither (it held a session for ever before).
    async fn read_message(
        &mut self,
        timeout: Duration,
        shutdown: &Shutdown,
        changes: Option<&Notify>,
    ) -> io::Result<Input> {
        let idle_deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.frag.progress() {
                Some(FragmentInfo::Line {
                    announcement: Some(LiteralAnnouncement { mode, length }),
                    ..
                }) => {
                    let length = length as usize;
                    // An APPEND's message literal is the session's to stream.
                    if self.is_append() && append_prefix(self.frag.message_bytes()).is_some() {
                        return Ok(Input::AppendLiteral {
                            length,
                            sync: mode == LiteralMode::Sync,
                        });
                    }
                    // Any other literal belongs to a small command.
                    let so_far = self.frag.message_bytes().len();
                    let fits = so_far + length <= self.max_command;
                    match (fits, mode) {
                        (true, LiteralMode::Sync) => {
                            self.literal_left = length;
                            self.push_raw(b"+ Ready for literal data\r\n");
                            self.flush().await?;
                        }
                        (true, LiteralMode::NonSync) => self.literal_left = length,
                        (false, LiteralMode::Sync) => {
                            // The client waits for "+", so it sends no literal: the
                            // command ends here.
                            let tag = self.frag.decode_tag().map(|t| t.into_static());
                            self.frag.skip_message();
                            self.started = None;
                            self.push(&status(
                                tag.as_ref(),
                                StatusKind::No,
                                Some(Code::TooBig),
                                "Literal too large",
                            ));
                            self.flush().await?;
                        }
                        // LITERAL+: the bytes come anyway; the command is cut off
                        // below (BYE), so memory stays bounded by `max_command_bytes`.
                        (false, LiteralMode::NonSync) => {
                            self.literal_left = length;
                            self.frag.poison_message();
                        }
                    }
                    continue;
                }
                Some(_) if self.frag.is_message_complete() => {
                    self.started = None;
                    return Ok(Input::Message);
                }
                Some(_) => continue,
                None => {}
            }
            // A command longer than allowed, an endless line or an oversized
            // LITERAL+ literal alike: the session is closed.
            if self.frag.message_bytes().len() > self.max_command {
                return Ok(Input::End("Command line too long"));
            }
            if self.feed() {
                continue;
            }
            let deadline = match self.started {
                Some(started) => idle_deadline.min(started + self.command_timeout),
                None => idle_deadline,
            };
            let read = self.stream.read(&mut self.read_buf);
            let n = tokio::select! {
                _ = shutdown.closing() => return Ok(Input::End("Server shutting down")),
                _ = async { match changes { Some(n) => n.notified().await, None => std::future::pending().await } } => {
                    return Ok(Input::Changed);
                }
                r = tokio::time::timeout_at(deadline, read) => match r {
                    Ok(r) => r?,
                    Err(_) if self.started.is_some() => return Ok(Input::End("Command took too long")),
                    Err(_) => return Ok(Input::End("Autologout; idle for too long")),
                },
            };
            if n == 0 {
                return Ok(Input::End(""));
            }
            self.started.get_or_insert_with(tokio::time::Instant::now);
            self.pending.extend_from_slice(&self.read_buf[..n]);
        }
    }

    /// Hands the fragmentizer the next piece of what was read: as much of a literal
    /// as it still expects, otherwise one line. False when nothing is pending.
    fn feed(&mut self) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let take = if self.literal_left > 0 {
            self.literal_left.min(self.pending.len())
        } else {
            memchr::memchr(b'\n', &self.pending).map_or(self.pending.len(), |i| i + 1)
        };
        self.literal_left -= take.min(self.literal_left);
        self.frag.enqueue_bytes(&self.pending[..take]);
        self.pending.drain(..take);
        true
    }

    /// Up to `max` bytes the client sent after what the fragmentizer has: what is
    /// pending first, then from the connection; `None` when it ended or `deadline`
    /// passed.
    async fn take_raw(
        &mut self,
        max: usize,
        deadline: tokio::time::Instant,
        shutdown: &Shutdown,
    ) -> io::Result<Option<Vec<u8>>> {
        if self.pending.is_empty() {
            let read = self.stream.read(&mut self.read_buf);
            let n = tokio::select! {
                _ = shutdown.closing() => return Ok(None),
                r = tokio::time::timeout_at(deadline, read) => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(None),
                },
            };
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend_from_slice(&self.read_buf[..n]);
        }
        let take = max.min(self.pending.len());
        Ok(Some(self.pending.drain(..take).collect()))
    }

    /// Reads the rest of the current line (after a literal), without its line end;
    /// `None` when the connection ended, `deadline` passed or the line is longer than
    /// `max`.
    async fn rest_of_line(
        &mut self,
        max: usize,
        deadline: tokio::time::Instant,
        shutdown: &Shutdown,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.pending) {
                line.extend(self.pending.drain(..=end));
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            line.append(&mut self.pending);
            if line.len() > max {
                return Ok(None);
            }
            let Some(more) = self.take_raw(usize::MAX, deadline, shutdown).await? else {
                return Ok(None);
            };
            self.pending = more;
        }
    }

    /// Whether the message being read is an APPEND (which may carry a large literal)
    /// from a logged-in client; before login every command is held to
    /// `max_command_bytes`.
    fn is_append(&self) -> bool {
        if !self.authenticated {
            return false;
        }
        let bytes = self.frag.message_bytes();
        let mut words = bytes.split(|&b| b == b' ');
        let _tag = words.next();
        words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"APPEND"))
    }
}

pub(crate) struct Session {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    tls: bool,
    errors: u32,
    /// The logged-in user, with the storage session token every mailbox call
    /// carries; renewed from `renew_at_ms` on (ADR 0006).
    user: Option<v1::UserRef>,
    renew_at_ms: i64,
    watcher: Option<Watcher>,
    selected: Option<Selected>,
    /// ENABLE CONDSTORE (or a CONDSTORE-using command): MODSEQ in FETCH replies.
    condstore: bool,
    /// The client was told BYE (its selected mailbox vanished): end the session.
    bye: bool,
    /// ENABLE IMAP4rev2: RFC 9051 replies (ESEARCH, no RECENT, UTF-8 names).
    rev2: bool,
    /// ENABLE QRESYNC (RFC 7162): VANISHED instead of EXPUNGE, SELECT resyncs.
    qresync: bool,
    /// Extension syntax cut out of the current command.
    extras: ext::Extras,
    /// SEARCHRES: the saved search result, as UIDs (RFC 5182).
    saved: Vec<u32>,
    /// When a session that has not logged in is closed.
    login_deadline: tokio::time::Instant,
}

/// Runs a session to its end; `tls` when the connection is already encrypted.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    gw: Arc<Gateway>,
    stream: S,
    peer: SocketAddr,
    tls: bool,
    shutdown: &Shutdown,
) {
    let _gauge = crate::metrics::SessionGauge::open(PROTOCOL);
    let mut session = Session {
        gw: gw.clone(),
        peer,
        tls,
        errors: 0,
        user: None,
        renew_at_ms: 0,
        watcher: None,
        selected: None,
        condstore: false,
        bye: false,
        rev2: false,
        qresync: false,
        extras: ext::Extras::default(),
        saved: Vec::new(),
        login_deadline: tokio::time::Instant::now() + gw.imap.login_timeout,
    };
    let mut conn = Conn::new(stream, &gw.imap);
    let capabilities = session.capabilities();
    let greeting = Greeting {
        kind: GreetingKind::Ok,
        code: Some(Code::Capability(capabilities)),
        text: Text::unvalidated(format!("{} IMAP4rev1 (mailmesh) ready", gw.imap.hostname)),
    };
    conn.out
        .extend(GreetingCodec::default().encode(&greeting).dump());
    match session.converse(&mut conn, shutdown).await {
        Ok(Next::StartTls) => {
            // Whatever the client sent after STARTTLS, before the handshake, is dropped
            // with the fragmentizer (RFC 3501 §6.2.1: no plaintext command injection).
            let stream = conn.stream;
            // Boxed: the handshake's and the encrypted session's state are held only by
            // the sessions that use them, not reserved in every session's future.
            let handshake = Box::pin(gw.tls.accept(stream));
            match tokio::time::timeout(gw.imap.login_timeout, handshake).await {
                Ok(Ok(tls)) => {
                    session.tls = true;
                    let mut conn = Conn::new(tls, &gw.imap);
                    if let Err(e) = Box::pin(session.converse(&mut conn, shutdown)).await {
                        tracing::debug!(%peer, error = %e, "imap session ended with an error");
                    }
                    let _ = conn.stream.shutdown().await;
                }
                _ => crate::metrics::event(PROTOCOL, "tls_failed"),
            }
        }
        Ok(_) => {
            let _ = conn.stream.shutdown().await;
        }
        Err(e) => tracing::debug!(%peer, error = %e, "imap session ended with an error"),
    }
}

/// By when the next byte of a literal must have arrived, `received` of it so far:
/// `command_timeout` from the command's start, plus the time `min_append_rate`
/// allows for what arrived (a slow link is fine; a trickle is not).
fn literal_deadline(
    started: tokio::time::Instant,
    received: usize,
    config: &crate::ImapConfig,
) -> tokio::time::Instant {
    let rate = config.min_append_rate.max(1) as f64;
    started + config.command_timeout + Duration::from_secs_f64(received as f64 / rate)
}

/// Reads and drops a refused LITERAL+ literal of `length` bytes and the rest of its
/// line; false when the client went away or was too slow.
async fn discard<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    length: usize,
    started: tokio::time::Instant,
    config: &crate::ImapConfig,
    shutdown: &Shutdown,
) -> io::Result<bool> {
    let mut left = length;
    while left > 0 {
        let deadline = literal_deadline(started, length - left, config);
        match conn
            .take_raw(left.min(64 << 10), deadline, shutdown)
            .await?
        {
            Some(chunk) => left -= chunk.len(),
            None => return Ok(false),
        }
    }
    let deadline = literal_deadline(started, length, config);
    Ok(conn
        .rest_of_line(config.max_command_bytes, deadline, shutdown)
        .await?
        .is_some())
}

/// What an APPEND whose message literal was just announced asks for, read from
/// the command so far with the literal taken as empty: tag, mailbox, flags and
/// date. `None` when those bytes are not such an APPEND (the announced literal is
/// another argument, say the mailbox name, or the syntax is wrong).
fn append_prefix(
    bytes: &[u8],
) -> Option<(
    Tag<'static>,
    Mailbox<'static>,
    Vec<imap_codec::imap_types::flag::Flag<'static>>,
    Option<imap_codec::imap_types::datetime::DateTime>,
)> {
    let line = bytes.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    let count = &line[open + 1..];
    let count = count.strip_suffix(b"+").unwrap_or(count);
    if count.is_empty() || !count.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut synthetic = line[..open].to_vec();
    synthetic.extend_from_slice(b"{0}\r\n\r\n");
    match CommandCodec::default().decode(&synthetic) {
        Ok((
            &[],
            Command {
                tag,
                body:
                    CommandBody::Append {
                        mailbox,
                        flags,
                        date,
                        ..
                    },
            },
        )) => Some((
            tag.into_static(),
            mailbox.into_static(),
            flags.into_iter().map(IntoStatic::into_static).collect(),
            date,
        )),
        _ => None,
    }
}

/// A tagged (or, without a tag, untagged) status response.
fn status(
    tag: Option<&Tag<'_>>,
    kind: StatusKind,
    code: Option<Code<'static>>,
    text: &str,
) -> Response<'static> {
    let body = StatusBody {
        kind,
        code,
        text: Text::unvalidated(text.to_owned()),
    };
    Response::Status(match tag {
        Some(tag) => Status::Tagged(Tagged {
            tag: tag.to_static(),
            body,
        }),
        None => Status::Untagged(body),
    })
}

/// Credentials before TLS where that is not allowed (RFC 5530).
fn privacy_required(tag: &Tag<'_>) -> Response<'static> {
    status(
        Some(tag),
        StatusKind::No,
        Some(code("PRIVACYREQUIRED")),
        "Use STARTTLS first",
    )
}

fn bye(text: &str) -> Response<'static> {
    Response::Status(Status::Bye(Bye {
        code: None,
        text: Text::unvalidated(text.to_owned()),
    }))
}

fn code(name: &'static str) -> Code<'static> {
    Code::Other(CodeOther::unvalidated(name.as_bytes()))
}

/// The mailbox name as the client wrote it.
fn wire_name(m: &Mailbox<'_>) -> String {
    match m {
        Mailbox::Inbox => "INBOX".to_owned(),
        Mailbox::Other(o) => String::from_utf8_lossy(o.inner().as_ref()).into_owned(),
    }
}

/// How a storage error reads to an IMAP client.
fn storage_failure(tag: &Tag<'_>, e: &tonic::Status) -> Response<'static> {
    use tonic::Code as C;
    let (kind, code_, text) = match e.code() {
        C::NotFound => (
            StatusKind::No,
            Some(code("NONEXISTENT")),
            "No such mailbox or message",
        ),
        C::AlreadyExists => (
            StatusKind::No,
            Some(code("ALREADYEXISTS")),
            "Mailbox already exists",
        ),
        C::ResourceExhausted => (StatusKind::No, Some(Code::OverQuota), "Quota exceeded"),
        C::InvalidArgument | C::FailedPrecondition => (
            StatusKind::No,
            Some(code("CANNOT")),
            "Operation not permitted",
        ),
        C::PermissionDenied => (StatusKind::No, Some(code("NOPERM")), "Not permitted"),
        _ => {
            tracing::warn!(error = %e, "storage call failed");
            (
                StatusKind::No,
                Some(code("UNAVAILABLE")),
                "Temporary failure, try again",
            )
        }
    };
    // The storage message says which rule applied; it is safe to pass on when short.
    let detail = e.message();
    if kind == StatusKind::No
        && !detail.is_empty()
        && detail.len() < 200
        && detail.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !matches!(
            e.code(),
            C::Unavailable | C::Internal | C::Unknown | C::DeadlineExceeded
        )
    {
        return status(Some(tag), kind, code_, &format!("{text}: {detail}"));
    }
    status(Some(tag), kind, code_, text)
}

impl Session {
    /// The logged-in user for a storage call, with the position storage must reach.
    fn user_at(&self) -> Option<v1::UserRef> {
        self.user.as_ref().map(|u| self.gw.store.at(u))
    }

    /// The mailbox name as the storage service knows it (UTF-8).
    fn mailbox_name(&self, m: &Mailbox<'_>) -> String {
        let wire = wire_name(m);
        if self.rev2 {
            return wire;
        }
        mutf7::decode(&wire).unwrap_or(wire)
    }

    /// A storage mailbox name as this client reads it.
    fn to_mailbox(&self, name: &str) -> Mailbox<'static> {
        let wire = if self.rev2 {
            name.to_owned()
        } else {
            mutf7::encode(name)
        };
        Mailbox::try_from(wire).unwrap_or(Mailbox::Inbox)
    }

    /// What `$` stands for now: the saved UIDs, or their sequence numbers.
    fn saved_set(&self, uid: bool) -> Option<String> {
        let mut uids = self.saved.clone();
        uids.sort_unstable();
        if uid {
            selected::set_string(&uids)
        } else {
            self.selected.as_ref()?.seq_set_of(&uids)
        }
    }

    fn capabilities(&self) -> Vec1<Capability<'static>> {
        let mut caps = vec![Capability::Imap4Rev1];
        if self.user.is_none() {
            if !self.tls {
                caps.push(Capability::StartTls);
            }
            if self.tls || self.gw.imap.allow_plaintext_auth {
                caps.push(Capability::Auth(AuthMechanism::Plain));
            } else {
                caps.push(Capability::LoginDisabled);
            }
            caps.push(Capability::SaslIr);
        }
        caps.extend([
            Capability::LiteralPlus,
            Capability::Enable,
            Capability::Idle,
            Capability::UidPlus,
            Capability::Move,
            Capability::Unselect,
            Capability::Namespace,
            Capability::Id,
            Capability::CondStore,
            Capability::QResync,
            Capability::Quota,
            Capability::StatusSize,
            Capability::Binary,
            Capability::QuotaRes(Resource::Storage),
        ]);
        for other in [
            "SPECIAL-USE",
            "ESEARCH",
            "SEARCHRES",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "IMAP4rev2",
        ] {
            caps.push(Capability::from(Atom::try_from(other).expect("atom")));
        }
        Vec1::try_from(caps).expect("not empty")
    }

    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        shutdown: &Shutdown,
    ) -> io::Result<Next> {
        loop {
            conn.flush().await?;
            // Before login the whole conversation, not each read, is limited, so
            // nobody holds a connection slot without logging in.
            conn.authenticated = self.user.is_some();
            let timeout = if self.user.is_some() {
                self.gw.imap.idle_timeout
            } else {
                let left = self
                    .login_deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    // Commands pipelined before the deadline are not read after it.
                    conn.push(&bye("Autologout; idle for too long"));
                    let _ = conn.flush().await;
                    return Ok(Next::Close);
                }
                left
            };
            match conn.read_message(timeout, shutdown, None).await? {
                Input::Message => {}
                Input::Changed => continue,
                Input::End(text) => {
                    if !text.is_empty() {
                        conn.push(&bye(text));
                        let _ = conn.flush().await;
                    }
                    return Ok(Next::Close);
                }
                Input::AppendLiteral { length, sync } => {
                    if !self.renew_session().await {
                        conn.push(&bye("Session ended, log in again"));
                        conn.flush().await?;
                        return Ok(Next::Close);
                    }
                    if !Box::pin(self.append_streamed(conn, length, sync, shutdown)).await? {
                        // Its BYE, if the client is still there to read it.
                        let _ = conn.flush().await;
                        return Ok(Next::Close);
                    }
                    continue;
                }
            }
            let command =
                if conn.frag.is_max_message_size_exceeded() || conn.frag.is_message_poisoned() {
                    Err(true)
                } else if let Some((bytes, extras)) =
                    ext::rewrite(conn.frag.message_bytes(), &|uid| self.saved_set(uid))
                {
                    self.extras = extras;
                    match CommandCodec::default().decode(&bytes) {
                        Ok((&[], c)) => Ok(c.into_static()),
                        _ => Err(false),
                    }
                } else {
                    self.extras = ext::Extras::default();
                    conn.frag
                        .decode_message(&CommandCodec::default())
                        .map(IntoStatic::into_static)
                        .map_err(|_| false)
                };
            let command = match command {
                Ok(c) => c,
                Err(too_long) => {
                    let tag = conn.frag.decode_tag().map(|t| t.into_static());
                    crate::metrics::command(PROTOCOL, "invalid", false);
                    self.errors += 1;
                    if self.errors >= self.gw.imap.max_errors {
                        conn.push(&bye("Too many errors"));
                        conn.flush().await?;
                        return Ok(Next::Close);
                    }
                    let (code_, text) = if too_long {
                        (Some(Code::TooBig), "Command too long")
                    } else {
                        (None, "Syntax error in command")
                    };
                    conn.push(&status(tag.as_ref(), StatusKind::Bad, code_, text));
                    continue;
                }
            };
            if !self.renew_session().await {
                conn.push(&bye("Session ended, log in again"));
                conn.flush().await?;
                return Ok(Next::Close);
            }
            // A command's future is as large as the largest command's, so it is boxed and
            // lives only while the command runs; IDLE, which may last for hours in
            // thousands of sessions at once, runs outside it with its own small state.
            let next = match command.body {
                CommandBody::Idle if self.user.is_some() => {
                    self.idle(conn, &command.tag, shutdown).await?
                }
                _ => Box::pin(self.command(conn, command, shutdown)).await?,
            };
            if self.bye {
                conn.flush().await?;
                return Ok(Next::Close);
            }
            match next {
                Next::Continue => {}
                other => {
                    conn.flush().await?;
                    return Ok(other);
                }
            }
        }
    }

    /// Renews the storage session token once half its life is gone: at each
    /// command, and before announcing changes during IDLE, so with a token lifetime
    /// of at least twice the idle timeout it never expires in use. False when
    /// storage has ended the session (the account was disabled or removed); a
    /// storage that does not answer is tried again next time.
    async fn renew_session(&mut self) -> bool {
        let Some(user) = &self.user else {
            return true;
        };
        if crate::store::now_ms() < self.renew_at_ms {
            return true;
        }
        match self.gw.store.refresh(user).await {
            Ok(Some(renewed)) => {
                if let Some(selected) = self.selected.as_mut() {
                    selected.renewed(&renewed.user);
                }
                if let Some(watcher) = &self.watcher {
                    watcher.renewed(&renewed.user);
                }
                self.user = Some(renewed.user);
                self.renew_at_ms = renewed.renew_at_ms;
                true
            }
            Ok(None) => {
                tracing::info!(peer = %self.peer, "storage ended the session");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the storage session");
                true
            }
        }
    }

    /// Pushes a BAD for a command in the wrong state, counting it as an error.
    /// ENABLE CONDSTORE (or QRESYNC): with a mailbox selected, its HIGHESTMODSEQ
    /// comes with the reply (RFC 7162 §3.1) — and once more with the first
    /// command that then uses MODSEQ, where clients (and test suites) look for it.
    fn enable_condstore<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Conn<S>) {
        if !self.condstore
            && let Some(sel) = &self.selected
        {
            conn.push(&selected::highest_modseq(sel.highest_modseq()));
        }
        self.condstore = true;
    }

    /// A command that uses MODSEQ enables CONDSTORE (RFC 7162 §3.1); the first one
    /// on a mailbox selected without it is answered with the mailbox's
    /// HIGHESTMODSEQ too.
    fn condstore_used<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Conn<S>) {
        self.condstore = true;
        if let Some(sel) = &mut self.selected
            && !sel.modseq_told
        {
            sel.modseq_told = true;
            conn.push(&selected::highest_modseq(sel.highest_modseq()));
        }
    }

    fn wrong_state<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        text: &str,
    ) {
        self.errors += 1;
        conn.push(&status(Some(tag), StatusKind::Bad, None, text));
    }

    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        command: Command<'static>,
        shutdown: &Shutdown,
    ) -> io::Result<Next> {
        let Command { tag, body } = command;
        let name = body.name();
        let authed = self.user.is_some();
        let ok = |conn: &mut Conn<S>, text: &str| {
            conn.push(&status(Some(&tag), StatusKind::Ok, None, text))
        };
        match body {
            CommandBody::Capability => {
                conn.push(&Response::Data(Data::Capability(self.capabilities())));
                ok(conn, "CAPABILITY completed");
            }
            CommandBody::Noop | CommandBody::Check => {
                self.announce(conn, true).await;
                ok(conn, &format!("{name} completed"));
            }
            CommandBody::Logout => {
                conn.push(&bye("Logging out"));
                ok(conn, "LOGOUT completed");
                crate::metrics::command(PROTOCOL, name, true);
                return Ok(Next::Close);
            }
            CommandBody::StartTLS if !self.tls && !authed => {
                ok(conn, "Begin TLS negotiation now");
                crate::metrics::command(PROTOCOL, name, true);
                return Ok(Next::StartTls);
            }
            CommandBody::StartTLS => {
                self.wrong_state(conn, &tag, "TLS is already active or not allowed now")
            }
            CommandBody::Login { username, password } if !authed => {
                if !self.tls && !self.gw.imap.allow_plaintext_auth {
                    conn.push(&privacy_required(&tag));
                } else {
                    let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                    let pass = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                    self.login(conn, &tag, &user, &pass).await;
                }
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } if !authed => {
                self.authenticate(
                    conn,
                    &tag,
                    mechanism,
                    initial_response.map(|r| r.declassify().to_vec()),
                    shutdown,
                )
                .await?;
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. } => {
                self.wrong_state(conn, &tag, "Already authenticated");
            }
            // Clients identify themselves before logging in (RFC 2971 §3.1).
            CommandBody::Id { .. } => {
                conn.push(&Response::Data(Data::Id {
                    parameters: Some(vec![
                        (
                            IString::try_from("name").expect("string"),
                            NString(Some(message::istring("mailmesh"))),
                        ),
                        (
                            IString::try_from("version").expect("string"),
                            NString(Some(message::istring(env!("CARGO_PKG_VERSION")))),
                        ),
                    ]),
                }));
                ok(conn, "ID completed");
            }
            _ if !authed => self.wrong_state(conn, &tag, "Log in first"),
            CommandBody::Enable { capabilities } => {
                let mut enabled = Vec::new();
                for c in capabilities.into_iter() {
                    if matches!(c, CapabilityEnable::CondStore) {
                        self.enable_condstore(conn);
                        enabled.push(CapabilityEnable::CondStore);
                    } else if c.to_string().eq_ignore_ascii_case("IMAP4rev2") {
                        self.rev2 = true;
                        enabled.push(c);
                    } else if c.to_string().eq_ignore_ascii_case("QRESYNC") {
                        // QRESYNC implies CONDSTORE (RFC 7162 §3.2.3).
                        self.qresync = true;
                        self.enable_condstore(conn);
                        enabled.push(c);
                    }
                }
                conn.push(&Response::Data(Data::Enabled {
                    capabilities: enabled,
                }));
                ok(conn, "ENABLE completed");
            }
            CommandBody::Namespace => {
                conn.push(&Response::Data(Data::Namespace {
                    personal: vec![Namespace {
                        prefix: IString::try_from("").expect("string"),
                        delimiter: QuotedChar::try_from(DELIMITER).ok(),
                        extensions: vec![],
                    }],
                    other: vec![],
                    shared: vec![],
                }));
                ok(conn, "NAMESPACE completed");
            }
            CommandBody::Create { mailbox } => {
                let name = self.mailbox_name(&mailbox);
                let name = name.trim_end_matches(DELIMITER).to_owned();
                let r = self
                    .gw
                    .store
                    .write(
                        v1::MailboxRequest {
                            user: self.user_at(),
                            mailbox: name,
                        },
                        |mut c, r| async move { c.create_mailbox(r).await },
                    )
                    .await;
                match r {
                    Ok(_) => ok(conn, "CREATE completed"),
                    Err(e) => conn.push(&storage_failure(&tag, &e)),
                }
            }
            CommandBody::Delete { mailbox } => {
                let name = self.mailbox_name(&mailbox);
                let r = self
                    .gw
                    .store
                    .write(
                        v1::MailboxRequest {
                            user: self.user_at(),
                            mailbox: name.clone(),
                        },
                        |mut c, r| async move { c.delete_mailbox(r).await },
                    )
                    .await;
                match r {
                    Ok(_) => {
                        // Deleting the selected mailbox deselects it; a failed DELETE
                        // changes nothing.
                        if self
                            .selected
                            .as_ref()
                            .is_some_and(|s| s.name.eq_ignore_ascii_case(&name))
                        {
                            self.selected = None;
                            self.saved.clear();
                            conn.push(&status(
                                None,
                                StatusKind::Ok,
                                Some(code("CLOSED")),
                                "Mailbox deleted",
                            ));
                        }
                        ok(conn, "DELETE completed")
                    }
                    Err(e) => conn.push(&storage_failure(&tag, &e)),
                }
            }
            CommandBody::Rename { from, to } => {
                let (from, to) = (self.mailbox_name(&from), self.mailbox_name(&to));
                let r = self
                    .gw
                    .store
                    .write(
                        v1::RenameMailboxRequest {
                            user: self.user_at(),
                            from: from.clone(),
                            to: to.clone(),
                        },
                        |mut c, r| async move { c.rename_mailbox(r).await },
                    )
                    .await;
                match r {
                    Ok(_) => {
                        // The selected mailbox (or one under it) keeps being the
                        // selected one under its new name. INBOX itself stays (its
                        // messages move; RFC 3501 §6.3.5).
                        if let Some(sel) = self.selected.as_mut()
                            && !from.eq_ignore_ascii_case("INBOX")
                        {
                            let child = format!("{from}{DELIMITER}");
                            if sel.name == from {
                                sel.name = to.clone();
                            } else if let Some(rest) = sel.name.strip_prefix(&child) {
                                sel.name = format!("{to}{DELIMITER}{rest}");
                            }
                        }
                        ok(conn, "RENAME completed")
                    }
                    Err(e) => conn.push(&storage_failure(&tag, &e)),
                }
            }
            CommandBody::Subscribe { mailbox } | CommandBody::Unsubscribe { mailbox } => {
                let subscribed = matches!(name, "SUBSCRIBE");
                let r = self
                    .gw
                    .store
                    .write(
                        v1::SubscribeRequest {
                            user: self.user_at(),
                            mailbox: self.mailbox_name(&mailbox),
                            subscribed,
                        },
                        |mut c, r| async move { c.subscribe(r).await },
                    )
                    .await;
                match r {
                    Ok(_) => ok(conn, &format!("{name} completed")),
                    Err(e) => conn.push(&storage_failure(&tag, &e)),
                }
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => {
                self.list(conn, &tag, &reference, &mailbox_wildcard, false)
                    .await;
            }
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => {
                self.list(conn, &tag, &reference, &mailbox_wildcard, true)
                    .await;
            }
            CommandBody::Status {
                mailbox,
                item_names,
            } => {
                self.status(conn, &tag, &mailbox, &item_names).await;
            }
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                let data = match &message {
                    imap_codec::imap_types::extensions::binary::LiteralOrLiteral8::Literal(l) => {
                        l.data().to_vec()
                    }
                    imap_codec::imap_types::extensions::binary::LiteralOrLiteral8::Literal8(l) => {
                        l.data.to_vec()
                    }
                };
                self.append(conn, &tag, &mailbox, flags, date, data).await;
            }
            CommandBody::GetQuotaRoot { mailbox } => {
                conn.push(&Response::Data(Data::QuotaRoot {
                    mailbox: mailbox.clone(),
                    roots: vec![
                        imap_codec::imap_types::core::AString::try_from("").expect("string"),
                    ],
                }));
                self.quota(conn, &tag).await;
            }
            CommandBody::GetQuota { root } if root.as_ref().is_empty() => {
                self.quota(conn, &tag).await
            }
            CommandBody::GetQuota { .. } => {
                conn.push(&status(
                    Some(&tag),
                    StatusKind::No,
                    Some(code("NONEXISTENT")),
                    "No such quota root",
                ));
            }
            CommandBody::SetQuota { .. } => {
                conn.push(&status(
                    Some(&tag),
                    StatusKind::No,
                    Some(code("NOPERM")),
                    "Quotas are set by the operator",
                ));
            }
            CommandBody::Select {
                mailbox,
                parameters,
            }
            | CommandBody::Examine {
                mailbox,
                parameters,
            } => {
                let read_only = name == "EXAMINE";
                let mut resync = None;
                for p in parameters {
                    match p {
                        SelectParameter::CondStore => self.condstore = true,
                        SelectParameter::QResync {
                            uid_validity,
                            mod_sequence_value,
                            known_uids,
                            ..
                        } => {
                            resync =
                                Some((uid_validity.get(), mod_sequence_value.get(), known_uids))
                        }
                    }
                }
                if resync.is_some() && !self.qresync {
                    conn.push(&status(
                        Some(&tag),
                        StatusKind::Bad,
                        None,
                        "ENABLE QRESYNC first",
                    ));
                } else {
                    self.select(conn, &tag, &mailbox, read_only, resync).await;
                }
            }
            CommandBody::Idle => {
                return self.idle(conn, &tag, shutdown).await;
            }
            body => {
                if self.selected.is_none() {
                    if matches!(
                        body,
                        CommandBody::Unselect
                            | CommandBody::Close
                            | CommandBody::Expunge
                            | CommandBody::ExpungeUid { .. }
                            | CommandBody::Search { .. }
                            | CommandBody::Fetch { .. }
                            | CommandBody::Store { .. }
                            | CommandBody::Copy { .. }
                            | CommandBody::Move { .. }
                    ) {
                        self.wrong_state(conn, &tag, "Select a mailbox first");
                    } else {
                        conn.push(&status(
                            Some(&tag),
                            StatusKind::Bad,
                            None,
                            "Command not supported",
                        ));
                    }
                } else {
                    self.selected_command(conn, &tag, body).await?;
                }
            }
        }
        let tagged = &conn.out[last_line_start(&conn.out)..];
        let ok = tagged
            .split(|&b| b == b' ')
            .nth(1)
            .is_some_and(|w| w == b"OK");
        crate::metrics::command(PROTOCOL, name, ok);
        if !matches!(
            name,
            "FETCH" | "STORE" | "SEARCH" | "NOOP" | "CHECK" | "IDLE" | "LOGOUT"
        ) {
            // Other sessions' changes, after commands that allow them (RFC 3501 §7.4.1:
            // no EXPUNGE during FETCH, STORE or SEARCH; those get them next time).
            self.announce_before_tag(conn, true).await;
        } else if matches!(name, "FETCH" | "STORE" | "SEARCH") {
            self.announce_before_tag(conn, false).await;
        }
        Ok(Next::Continue)
    }

    async fn login<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        name: &str,
        password: &str,
    ) {
        let limits = login::Limits {
            max_failures: self.gw.imap.max_auth_failures,
            window: self.gw.imap.failure_window,
            failure_delay: self.gw.imap.failure_delay,
            max_parallel: self.gw.imap.max_parallel_logins,
            account_pace: None,
        };
        match login::check(&self.gw, PROTOCOL, self.peer, name, password, &limits).await {
            Login::Ok(logged_in) => {
                let Some(watcher) = self.gw.watches.join(
                    &self.gw,
                    &logged_in.user,
                    self.gw.imap.max_sessions_per_user,
                ) else {
                    crate::metrics::event(PROTOCOL, "too_many_sessions");
                    return conn.push(&status(
                        Some(tag),
                        StatusKind::No,
                        Some(code("UNAVAILABLE")),
                        "Too many sessions for this user here; close some and try again",
                    ));
                };
                self.watcher = Some(watcher);
                self.user = Some(logged_in.user);
                self.renew_at_ms = logged_in.renew_at_ms;
                conn.push(&status(
                    Some(tag),
                    StatusKind::Ok,
                    Some(Code::Capability(self.capabilities())),
                    "Logged in",
                ));
            }
            Login::Invalid => {
                // Failed logins count as errors: a connection cannot guess for ever.
                self.errors += 1;
                if self.errors >= self.gw.imap.max_errors {
                    self.bye = true;
                    conn.push(&bye("Too many errors"));
                }
                conn.push(&status(
                    Some(tag),
                    StatusKind::No,
                    Some(code("AUTHENTICATIONFAILED")),
                    "Invalid credentials",
                ));
            }
            Login::Throttled => conn.push(&status(
                Some(tag),
                StatusKind::No,
                Some(code("UNAVAILABLE")),
                "Too many failed logins, try again later",
            )),
            Login::Busy => conn.push(&status(
                Some(tag),
                StatusKind::No,
                Some(code("UNAVAILABLE")),
                "Too many logins at once from your address, try again later",
            )),
            Login::Unavailable => conn.push(&status(
                Some(tag),
                StatusKind::No,
                Some(code("UNAVAILABLE")),
                "Authentication temporarily unavailable",
            )),
        }
    }

    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        mechanism: AuthMechanism<'_>,
        initial: Option<Vec<u8>>,
        shutdown: &Shutdown,
    ) -> io::Result<()> {
        if !matches!(mechanism, AuthMechanism::Plain) {
            conn.push(&status(
                Some(tag),
                StatusKind::No,
                None,
                "Unsupported mechanism",
            ));
            return Ok(());
        }
        if !self.tls && !self.gw.imap.allow_plaintext_auth {
            conn.push(&privacy_required(tag));
            return Ok(());
        }
        let response = match initial {
            Some(r) => r,
            None => {
                conn.push(&Response::CommandContinuationRequest(
                    CommandContinuationRequest::Base64(Vec::new().into()),
                ));
                conn.flush().await?;
                // The answer counts against the login deadline like any command.
                let left = self
                    .login_deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                match conn.read_message(left, shutdown, None).await? {
                    Input::Message => {}
                    _ => {
                        conn.push(&bye("Authentication timed out"));
                        self.bye = true;
                        return Ok(());
                    }
                }
                match conn.frag.decode_message(&AuthenticateDataCodec::default()) {
                    Ok(AuthenticateData::Continue(data)) => data.declassify().to_vec(),
                    Ok(AuthenticateData::Cancel) => {
                        conn.push(&status(
                            Some(tag),
                            StatusKind::Bad,
                            None,
                            "Authentication cancelled",
                        ));
                        return Ok(());
                    }
                    Err(_) => {
                        conn.push(&status(
                            Some(tag),
                            StatusKind::Bad,
                            None,
                            "Invalid base64 response",
                        ));
                        return Ok(());
                    }
                }
            }
        };
        // authzid NUL authcid NUL password (RFC 4616); authzid must be empty or the
        // same user.
        let mut parts = response.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            conn.push(&status(
                Some(tag),
                StatusKind::Bad,
                None,
                "Malformed PLAIN response",
            ));
            return Ok(());
        };
        let authc = String::from_utf8_lossy(authc).into_owned();
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(authc.as_bytes()) {
            conn.push(&status(
                Some(tag),
                StatusKind::No,
                Some(code("AUTHORIZATIONFAILED")),
                "Cannot act as another user",
            ));
            return Ok(());
        }
        let pass = String::from_utf8_lossy(pass).into_owned();
        self.login(conn, tag, &authc, &pass).await;
        Ok(())
    }

    async fn list<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        reference: &Mailbox<'_>,
        wildcard: &ListMailbox<'_>,
        lsub: bool,
    ) {
        let reference = match reference {
            Mailbox::Inbox => "INBOX".to_owned(),
            Mailbox::Other(_) => self.mailbox_name(reference),
        };
        let extras = std::mem::take(&mut self.extras);
        // Several patterns (LIST-EXTENDED) or the one the codec parsed.
        let patterns = extras.list_patterns.clone().unwrap_or_else(|| {
            vec![match wildcard {
                ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()).into_owned(),
                ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()).into_owned(),
            }]
        });
        let patterns: Vec<String> = patterns
            .into_iter()
            .map(|p| {
                if self.rev2 {
                    p
                } else {
                    mutf7::decode(&p).unwrap_or(p)
                }
            })
            .collect();
        if let Some(refusal) = list_options_refused(&extras, patterns.len()) {
            return conn.push(&status(Some(tag), StatusKind::Bad, None, &refusal));
        }
        let only_subscribed = lsub || extras.list_select.iter().any(|o| o == "SUBSCRIBED");
        let only_special = extras.list_select.iter().any(|o| o == "SPECIAL-USE");
        // RFC 5258 §3.5: a name that matches but is not subscribed itself is listed
        // (with CHILDINFO) when a mailbox below it is.
        let recursive = extras.list_select.iter().any(|o| o == "RECURSIVEMATCH");
        if patterns.len() == 1 && patterns[0].is_empty() && !lsub {
            // The hierarchy delimiter and root name (RFC 3501 §6.3.8).
            conn.push(&Response::Data(Data::List {
                items: vec![FlagNameAttribute::Noselect],
                delimiter: QuotedChar::try_from(DELIMITER).ok(),
                mailbox: self.to_mailbox(""),
            }));
            conn.push(&status(Some(tag), StatusKind::Ok, None, "LIST completed"));
            return;
        }
        let mut matchers = Vec::with_capacity(patterns.len());
        // Patterns ending in `%`, which also list the levels above mailboxes.
        let mut levels = Vec::new();
        for pattern in &patterns {
            let pattern = format!("{reference}{pattern}");
            if pattern.chars().count() > self.gw.imap.max_list_pattern_chars {
                return conn.push(&status(
                    Some(tag),
                    StatusKind::Bad,
                    Some(Code::TooBig),
                    "Pattern too long",
                ));
            }
            if pattern.ends_with('%') {
                levels.push(ListPattern::new(&pattern));
            }
            matchers.push(ListPattern::new(&pattern));
        }
        let r = self
            .gw
            .store
            .mailboxes()
            .list_mailboxes(self.user_at().unwrap_or_default())
            .await;
        let (mailboxes, missing) = match r {
            Ok(r) => {
                let r = r.into_inner();
                (r.mailboxes, r.subscribed_without_mailbox)
            }
            Err(e) => return conn.push(&storage_failure(tag, &e)),
        };
        // Every name that has a mailbox below it (one pass, not one per mailbox), and
        // every name that has a subscribed one below it.
        let above = |name: &str| -> Vec<String> {
            name.match_indices(DELIMITER)
                .map(|(at, _)| name[..at].to_owned())
                .collect()
        };
        let parents: HashSet<String> = mailboxes.iter().flat_map(|m| above(&m.name)).collect();
        let subscribed_below: HashSet<String> = mailboxes
            .iter()
            .filter(|m| m.subscribed)
            .map(|m| m.name.as_str())
            .chain(missing.iter().map(String::as_str))
            .flat_map(above)
            .collect();
        let flag = |s: &str| FlagNameAttribute::from(Atom::try_from(s.to_owned()).expect("atom"));
        for (i, m) in mailboxes.iter().enumerate() {
            if i % 256 == 255 {
                // A long listing leaves the worker thread to other sessions now and then.
                tokio::task::yield_now().await;
            }
            let child_info = recursive && subscribed_below.contains(&m.name);
            if (only_subscribed && !m.subscribed && !child_info)
                || (only_special && m.special_use.is_empty())
            {
                continue;
            }
            if !matchers.iter_mut().any(|p| p.matches(&m.name)) {
                continue;
            }
            let mut items = vec![flag(if parents.contains(&m.name) {
                "HasChildren"
            } else {
                "HasNoChildren"
            })];
            if m.subscribed && !lsub {
                items.push(flag("Subscribed"));
            }
            if let Some(use_) = m.special_use.strip_prefix('\\')
                && let Ok(a) = Atom::try_from(use_.to_owned())
            {
                items.push(FlagNameAttribute::from(a));
            }
            self.push_list_entry(conn, lsub, items, &m.name, child_info);
            if let Some(names) = &extras.list_status {
                // LIST-STATUS (RFC 5819): the STATUS of each listed mailbox follows it.
                conn.push(&Response::Data(Data::Status {
                    mailbox: self.to_mailbox(&m.name),
                    items: status_items(m, names).into(),
                }));
            }
        }
        // A pattern ending in `%` also lists the levels it matches that are only
        // above mailboxes (RFC 3501 §6.3.8): `\Noselect`, or `\NonExistent` (which
        // implies it) for IMAP4rev2, with `\HasChildren`. For LSUB, the levels above
        // subscribed names that are not subscribed themselves, `\Noselect` (§6.3.9).
        if !levels.is_empty() && !only_special && (lsub || !only_subscribed) {
            let listed: HashSet<&str> = if lsub {
                mailboxes
                    .iter()
                    .filter(|m| m.subscribed)
                    .map(|m| m.name.as_str())
                    .chain(missing.iter().map(String::as_str))
                    .collect()
            } else {
                mailboxes.iter().map(|m| m.name.as_str()).collect()
            };
            let above = if lsub { &subscribed_below } else { &parents };
            let mut names: Vec<&str> = above
                .iter()
                .map(String::as_str)
                .filter(|name| !listed.contains(name))
                .collect();
            names.sort_unstable();
            for name in names {
                if !levels.iter_mut().any(|p| p.matches(name)) {
                    continue;
                }
                let items = if lsub {
                    vec![FlagNameAttribute::Noselect]
                } else if self.rev2 {
                    vec![flag("NonExistent"), flag("HasChildren")]
                } else {
                    vec![FlagNameAttribute::Noselect, flag("HasChildren")]
                };
                self.push_list_entry(conn, lsub, items, name, false);
            }
        }
        // Names without a mailbox (RFC 5258 §3): subscribed ones when subscriptions
        // are asked for (`\NonExistent`; `\Noselect` in LSUB), and with
        // RECURSIVEMATCH the levels above a subscribed name.
        if only_subscribed && !only_special {
            let existing: HashSet<&str> = mailboxes.iter().map(|m| m.name.as_str()).collect();
            let subscribed: HashSet<&str> = missing.iter().map(String::as_str).collect();
            let mut names: Vec<&str> = subscribed.iter().copied().collect();
            if recursive {
                names.extend(subscribed_below.iter().map(String::as_str));
            }
            names.sort_unstable();
            names.dedup();
            for name in names {
                if existing.contains(name) || !matchers.iter_mut().any(|p| p.matches(name)) {
                    continue;
                }
                let is_subscribed = subscribed.contains(name);
                let child_info = recursive && subscribed_below.contains(name);
                let items = if lsub {
                    vec![FlagNameAttribute::Noselect]
                } else if is_subscribed {
                    vec![flag("NonExistent"), flag("Subscribed")]
                } else {
                    vec![flag("NonExistent")]
                };
                self.push_list_entry(conn, lsub, items, name, child_info);
            }
        }
        conn.push(&status(
            Some(tag),
            StatusKind::Ok,
            None,
            if lsub {
                "LSUB completed"
            } else {
                "LIST completed"
            },
        ));
    }

    /// One `* LIST` (or `* LSUB`) line; with `child_info`, RFC 5258's
    /// `("CHILDINFO" ("SUBSCRIBED"))` extended data, which the codec's LIST item has
    /// no place for: the reply is encoded, then the data goes before its CRLF.
    fn push_list_entry<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        lsub: bool,
        items: Vec<FlagNameAttribute<'static>>,
        name: &str,
        child_info: bool,
    ) {
        let delimiter = QuotedChar::try_from(DELIMITER).ok();
        let mailbox = self.to_mailbox(name);
        let data = if lsub {
            Data::Lsub {
                items,
                delimiter,
                mailbox,
            }
        } else {
            Data::List {
                items,
                delimiter,
                mailbox,
            }
        };
        if !child_info {
            return conn.push(&Response::Data(data));
        }
        let mut line = ResponseCodec::default()
            .encode(&Response::Data(data))
            .dump();
        if line.ends_with(b"\r\n") {
            line.truncate(line.len() - 2);
        }
        line.extend_from_slice(b" (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n");
        conn.push_raw(&line);
    }

    async fn status<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        mailbox: &Mailbox<'_>,
        names: &[StatusDataItemName],
    ) {
        let r = self
            .gw
            .store
            .mailboxes()
            .status(v1::MailboxRequest {
                user: self.user_at(),
                mailbox: self.mailbox_name(mailbox),
            })
            .await;
        let info = match r {
            Ok(r) => r.into_inner(),
            Err(e) => return conn.push(&storage_failure(tag, &e)),
        };
        if names.contains(&StatusDataItemName::HighestModSeq) {
            self.condstore = true;
        }
        let items = status_items(&info, names);
        conn.push(&Response::Data(Data::Status {
            mailbox: mailbox.to_static(),
            items: items.into(),
        }));
        conn.push(&status(Some(tag), StatusKind::Ok, None, "STATUS completed"));
    }

    async fn append<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        mailbox: &Mailbox<'_>,
        flags: Vec<imap_codec::imap_types::flag::Flag<'_>>,
        date: Option<imap_codec::imap_types::datetime::DateTime>,
        message: Vec<u8>,
    ) {
        let name = self.mailbox_name(mailbox);
        let r = self
            .gw
            .store
            .write(
                v1::AppendRequest {
                    user: self.user_at(),
                    mailbox: name.clone(),
                    message,
                    flags: flags.iter().map(selected::flag_string).collect(),
                    internal_date_ms: date.map(|d| d.as_ref().timestamp_millis()).unwrap_or(0),
                },
                |mut c, r| async move { c.append(r).await },
            )
            .await;
        self.appended(conn, tag, &name, r);
    }

    /// APPEND whose message literal is streamed to storage as it arrives, never held
    /// whole (10 sessions × 60 MiB literals were 700 MB in memory before): size,
    /// quota and mailbox are checked when the literal is announced, before the
    /// client is told to send it (`NO [TOOBIG]`, `NO [OVERQUOTA]`, `NO [TRYCREATE]`);
    /// a refused LITERAL+ literal is read and dropped. The literal must keep coming
    /// at `min_append_rate` after `command_timeout`. False when the session must end
    /// (the client went away or was too slow mid-literal).
    async fn append_streamed<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        length: usize,
        sync: bool,
        shutdown: &Shutdown,
    ) -> io::Result<bool> {
        let started = conn.started.unwrap_or_else(tokio::time::Instant::now);
        let prefix = append_prefix(conn.frag.message_bytes());
        let tag = conn.frag.decode_tag().map(IntoStatic::into_static);
        // The fragmentizer forgets this command; the literal and the rest of its line
        // are read here.
        conn.frag.skip_message();
        conn.started = None;
        let Some((tag, mailbox, flags, date)) = prefix else {
            // read_message only hands over APPENDs it could read.
            conn.push(&status(tag.as_ref(), StatusKind::Bad, None, "Bad APPEND"));
            return Ok(sync || discard(conn, length, started, &self.gw.imap, shutdown).await?);
        };
        let name = self.mailbox_name(&mailbox);
        let user = self.user_at().unwrap_or_default();
        let refusal = if length > self.gw.imap.max_message_bytes {
            Some((Code::TooBig, "Message too large".to_owned()))
        } else {
            let mut mailboxes = self.gw.store.mailboxes();
            let quota = mailboxes.quota(user.clone()).await;
            let exists = if sync {
                mailboxes
                    .status(v1::MailboxRequest {
                        user: Some(user.clone()),
                        mailbox: name.clone(),
                    })
                    .await
                    .map(drop)
            } else {
                Ok(())
            };
            match (quota, exists) {
                (Ok(q), _)
                    if q.get_ref().limit_bytes > 0
                        && q.get_ref().used_bytes.saturating_add(length as u64)
                            > q.get_ref().limit_bytes =>
                {
                    Some((Code::OverQuota, "Over quota".to_owned()))
                }
                (_, Err(e)) if e.code() == tonic::Code::NotFound => {
                    Some((Code::TryCreate, "No such mailbox".to_owned()))
                }
                _ => None,
            }
        };
        if let Some((code_, text)) = refusal {
            conn.push(&status(Some(&tag), StatusKind::No, Some(code_), &text));
            return Ok(sync || discard(conn, length, started, &self.gw.imap, shutdown).await?);
        }
        if sync {
            conn.push_raw(b"+ Ready for literal data\r\n");
            conn.flush().await?;
        }
        let (upload, mut stream) = self.gw.store.append_stream(v1::AppendStart {
            user: Some(user),
            mailbox: name.clone(),
            flags: flags.iter().map(selected::flag_string).collect(),
            internal_date_ms: date.map(|d| d.as_ref().timestamp_millis()).unwrap_or(0),
            size: length as u64,
            resume: false,
        });
        let mut upload = Some(upload);
        let mut left = length;
        // Reads come a socket buffer at a time; storage gets them in larger pieces.
        let mut batch = Vec::new();
        while left > 0 {
            let deadline = literal_deadline(started, length - left, &self.gw.imap);
            let Some(chunk) = conn
                .take_raw(left.min(64 << 10), deadline, shutdown)
                .await?
            else {
                // Gone or too slow: nothing is stored (the upload has no end).
                stream.call.abort();
                conn.push(&bye("Literal not sent in time"));
                return Ok(false);
            };
            left -= chunk.len();
            if batch.is_empty() {
                batch = chunk;
            } else {
                batch.extend_from_slice(&chunk);
            }
            if batch.len() < APPEND_CHUNK && left > 0 {
                continue;
            }
            let data = std::mem::take(&mut batch);
            // A storage that refused already (its answer comes below) gets no more;
            // the client's bytes are still read to keep in step.
            if let Some(tx) = &upload
                && tx
                    .send(v1::AppendChunk {
                        data,
                        ..Default::default()
                    })
                    .await
                    .is_err()
            {
                upload = None;
            }
        }
        let deadline = literal_deadline(started, length, &self.gw.imap);
        let Some(rest) = conn
            .rest_of_line(self.gw.imap.max_command_bytes, deadline, shutdown)
            .await?
        else {
            stream.call.abort();
            conn.push(&bye("Command line too long"));
            return Ok(false);
        };
        if !rest.is_empty() {
            // MULTIAPPEND, CATENATE and the like are not offered: nothing is stored.
            // What follows may announce literals of its own, whose bytes would then
            // be read as commands: the session ends instead.
            stream.call.abort();
            conn.push(&bye("Unexpected data after the message"));
            return Ok(false);
        }
        // Whether the whole message went to storage (then an unknown outcome is
        // finished with `resume`; else nothing can have been stored).
        let mut whole = false;
        if let Some(tx) = upload.take() {
            whole = tx
                .send(v1::AppendChunk {
                    end: true,
                    ..Default::default()
                })
                .await
                .is_ok();
        }
        // The upload's call has no timeout of its own (it lasts as long as the
        // client sends); once the message is whole, storage answers in time or not.
        let mut result = match tokio::time::timeout(APPEND_ANSWER, &mut stream.call).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(tonic::Status::unavailable("the upload was cut off")),
            Err(_) => {
                stream.call.abort();
                Err(tonic::Status::unavailable("storage did not answer in time"))
            }
        };
        if whole && matches!(&result, Err(e) if crate::store::unknown_outcome(e)) {
            // Stored or not? Storage knows: the body it kept under the request id
            // is indexed now, or the request is given up for good.
            result = match self.gw.store.resume_append(&stream).await {
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    Err(tonic::Status::aborted(e.message()))
                }
                other => other,
            };
        }
        crate::metrics::command(PROTOCOL, "APPEND", result.is_ok());
        self.appended(conn, &tag, &name, result);
        // As after any command: other sessions' changes, and this one's own.
        self.announce_before_tag(conn, true).await;
        Ok(true)
    }

    /// The answer to an APPEND from what storage said.
    fn appended<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        name: &str,
        r: Result<tonic::Response<v1::AppendResponse>, tonic::Status>,
    ) {
        match r {
            Ok(r) => {
                let r = r.into_inner();
                let code_ = match (
                    std::num::NonZeroU32::new(r.uid_validity),
                    std::num::NonZeroU32::new(r.uid),
                ) {
                    (Some(uid_validity), Some(uid)) => Some(Code::AppendUid { uid_validity, uid }),
                    _ => None,
                };
                if let Some(w) = &self.watcher {
                    w.changes.mark(Some(name));
                }
                conn.push(&status(
                    Some(tag),
                    StatusKind::Ok,
                    code_,
                    "APPEND completed",
                ));
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                conn.push(&status(
                    Some(tag),
                    StatusKind::No,
                    Some(Code::TryCreate),
                    "No such mailbox",
                ));
            }
            Err(e) => conn.push(&storage_failure(tag, &e)),
        }
    }

    async fn quota<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
    ) {
        let r = self
            .gw
            .store
            .mailboxes()
            .quota(self.user_at().unwrap_or_default())
            .await;
        match r {
            Ok(r) => {
                let q = r.into_inner();
                if q.limit_bytes > 0 {
                    conn.push(&Response::Data(Data::Quota {
                        root: imap_codec::imap_types::core::AString::try_from("").expect("string"),
                        quotas: Vec1::from(QuotaGet {
                            resource: Resource::Storage,
                            usage: q.used_bytes.div_ceil(1024),
                            limit: q.limit_bytes / 1024,
                        }),
                    }));
                }
                conn.push(&status(
                    Some(tag),
                    StatusKind::Ok,
                    None,
                    "GETQUOTA completed",
                ));
            }
            Err(e) => conn.push(&storage_failure(tag, &e)),
        }
    }

    async fn select<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        mailbox: &Mailbox<'_>,
        read_only: bool,
        resync: Option<(u32, u64, Option<SequenceSet>)>,
    ) {
        // A failed SELECT leaves no mailbox selected (RFC 3501 §6.3.1); QRESYNC
        // clients are told where one mailbox's replies end (RFC 7162 §3.2.11).
        if self.selected.take().is_some() && (self.qresync || self.rev2) {
            conn.push(&status(
                None,
                StatusKind::Ok,
                Some(code("CLOSED")),
                "Previous mailbox closed",
            ));
        }
        self.saved.clear();
        let name = self.mailbox_name(mailbox);
        let user = self.user.clone().unwrap_or_default();
        if let Some(w) = &self.watcher {
            w.changes.take(&name);
        }
        match Selected::open(&self.gw, user, &name, read_only, self.rev2).await {
            Ok(mut s) => {
                s.modseq_told = self.condstore;
                s.greet(conn, self.rev2);
                if let Some((uid_validity, since, known)) = resync
                    && uid_validity == s.uid_validity()
                    && let Err(e) = s.resync(&self.gw, conn, since, known.as_ref()).await
                {
                    conn.push(&storage_failure(tag, &e));
                    return;
                }
                conn.push(&status(
                    Some(tag),
                    StatusKind::Ok,
                    Some(if read_only {
                        Code::ReadOnly
                    } else {
                        Code::ReadWrite
                    }),
                    "SELECT completed",
                ));
                self.selected = Some(s);
            }
            Err(e) => conn.push(&storage_failure(tag, &e)),
        }
    }

    /// IDLE (RFC 2177): changes are announced as they happen until DONE.
    async fn idle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        shutdown: &Shutdown,
    ) -> io::Result<Next> {
        conn.push_raw(b"+ idling\r\n");
        Box::pin(self.announce(conn, true)).await;
        conn.flush().await?;
        let changes = self.watcher.as_ref().map(|w| w.changes.clone());
        loop {
            let input = conn
                .read_message(
                    self.gw.imap.idle_timeout,
                    shutdown,
                    changes.as_deref().map(|c| &c.notify),
                )
                .await?;
            match input {
                Input::Changed => {
                    if !self.renew_session().await {
                        conn.push(&bye("Session ended, log in again"));
                        conn.flush().await?;
                        return Ok(Next::Close);
                    }
                    Box::pin(self.announce(conn, true)).await;
                    conn.flush().await?;
                    if self.bye {
                        return Ok(Next::Close);
                    }
                }
                Input::End(text) => {
                    if !text.is_empty() {
                        conn.push(&bye(text));
                        let _ = conn.flush().await;
                    }
                    return Ok(Next::Close);
                }
                // Only DONE may come during IDLE (a literal would have to be read).
                Input::AppendLiteral { .. } => {
                    conn.push(&bye("Expected DONE"));
                    let _ = conn.flush().await;
                    return Ok(Next::Close);
                }
                Input::Message => {
                    crate::metrics::command(PROTOCOL, "IDLE", true);
                    match conn.frag.decode_message(&IdleDoneCodec::default()) {
                        Ok(_) => {
                            conn.push(&status(Some(tag), StatusKind::Ok, None, "IDLE terminated"))
                        }
                        Err(_) => {
                            conn.push(&status(Some(tag), StatusKind::Bad, None, "Expected DONE"))
                        }
                    }
                    return Ok(Next::Continue);
                }
            }
        }
    }

    /// Announces other sessions' changes to the selected mailbox now.
    async fn announce<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        expunges: bool,
    ) {
        let Some(selected) = self.selected.as_mut() else {
            return;
        };
        let pending = self
            .watcher
            .as_ref()
            .map_or(Pending::Refresh, |w| w.changes.take(&selected.name));
        let refresh = match pending {
            Pending::Refresh => true,
            Pending::Flags(updates) => {
                selected.apply_flags(conn, updates, self.condstore);
                false
            }
            Pending::Nothing => false,
        };
        if (refresh || selected.pending_expunges())
            && !selected
                .refresh(&self.gw, conn, expunges, self.condstore, self.qresync)
                .await
        {
            self.selected = None;
            self.bye = true;
        }
    }

    /// Like [`Self::announce`], but the untagged replies go before the tagged one the
    /// command already pushed.
    async fn announce_before_tag<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        expunges: bool,
    ) {
        if self.selected.is_none() {
            return;
        }
        // Find the start of the last (tagged) line in the output and splice in front.
        let tagged_at = last_line_start(&conn.out);
        let tagged = conn.out.split_off(tagged_at);
        self.announce(conn, expunges).await;
        conn.out.extend_from_slice(&tagged);
    }
}

/// STATUS data items from storage's view of a mailbox.
fn status_items(info: &v1::MailboxInfo, names: &[StatusDataItemName]) -> Vec<StatusDataItem> {
    let nz = |v: u32| std::num::NonZeroU32::new(v.max(1)).expect("not zero");
    names
        .iter()
        .filter_map(|n| {
            Some(match n {
                StatusDataItemName::Messages => StatusDataItem::Messages(info.messages),
                StatusDataItemName::Recent => StatusDataItem::Recent(info.recent),
                StatusDataItemName::UidNext => StatusDataItem::UidNext(nz(info.uid_next)),
                StatusDataItemName::UidValidity => {
                    StatusDataItem::UidValidity(nz(info.uid_validity))
                }
                StatusDataItemName::Unseen => StatusDataItem::Unseen(info.unseen),
                StatusDataItemName::Size => StatusDataItem::Size(info.size),
                StatusDataItemName::HighestModSeq => {
                    StatusDataItem::HighestModSeq(info.highest_modseq)
                }
                StatusDataItemName::Deleted => StatusDataItem::Deleted(info.deleted),
                // Storage does not keep the size of \Deleted messages apart.
                StatusDataItemName::DeletedStorage => return None,
            })
        })
        .collect()
}

/// Where the last line of `out` starts (the tagged reply just pushed).
fn last_line_start(out: &[u8]) -> usize {
    if out.len() < 2 {
        return 0;
    }
    out[..out.len() - 2]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1)
}

/// A LIST pattern (RFC 3501 §6.3.8: `*` matches anything, `%` anything but the
/// hierarchy delimiter), compiled once per command: runs of wildcards collapse (a
/// run with `*` is `*`), and matching is dynamic programming over (pattern, name)
/// positions in two reused rows, so the cost is linear in their product whatever the
/// client puts in the pattern (60,000 `%*` over 1,000 mailboxes took 50 s before).
/// Why a LIST's options are refused (`BAD`, RFC 5258 §3), if they are: options
/// this server does not know, RECURSIVEMATCH without another selection option, more
/// patterns than [`MAX_LIST_PATTERNS`].
fn list_options_refused(extras: &ext::Extras, patterns: usize) -> Option<String> {
    if let Some(o) = extras.list_select.iter().find(|o| {
        !matches!(
            o.as_str(),
            "SUBSCRIBED" | "REMOTE" | "RECURSIVEMATCH" | "SPECIAL-USE"
        )
    }) {
        return Some(format!("Unknown LIST selection option {o}"));
    }
    let recursive = extras.list_select.iter().any(|o| o == "RECURSIVEMATCH");
    if recursive
        && !extras
            .list_select
            .iter()
            .any(|o| o != "RECURSIVEMATCH" && o != "REMOTE")
    {
        return Some("RECURSIVEMATCH needs another selection option".into());
    }
    if let Some(o) = extras
        .list_return
        .iter()
        .find(|o| !matches!(o.as_str(), "SUBSCRIBED" | "CHILDREN" | "SPECIAL-USE"))
    {
        return Some(format!("Unknown LIST return option {o}"));
    }
    (patterns > MAX_LIST_PATTERNS).then(|| format!("At most {MAX_LIST_PATTERNS} patterns"))
}

/// Patterns one LIST may name (each bounded by `max_list_pattern_chars`).
const MAX_LIST_PATTERNS: usize = 32;

struct ListPattern {
    chars: Vec<char>,
    reach: Vec<bool>,
    next: Vec<bool>,
}

/// `INBOX` in any case, as a whole name or the first level, compared as INBOX.
fn fold_inbox(s: &str) -> Vec<char> {
    match s.get(..5) {
        Some(head)
            if head.eq_ignore_ascii_case("inbox")
                && (s.len() == 5 || s[5..].starts_with(DELIMITER)) =>
        {
            format!("INBOX{}", &s[5..]).chars().collect()
        }
        _ => s.chars().collect(),
    }
}

impl ListPattern {
    fn new(pattern: &str) -> Self {
        let mut chars: Vec<char> = Vec::new();
        for c in fold_inbox(pattern) {
            match (c, chars.last_mut()) {
                ('*' | '%', Some(last @ ('*' | '%'))) => {
                    if c == '*' {
                        *last = '*';
                    }
                }
                _ => chars.push(c),
            }
        }
        Self {
            chars,
            reach: Vec::new(),
            next: Vec::new(),
        }
    }

    fn matches(&mut self, name: &str) -> bool {
        let n = fold_inbox(name);
        // reach[j]: the pattern so far can match the first j characters of the name.
        self.reach.clear();
        self.reach.resize(n.len() + 1, false);
        self.reach[0] = true;
        for &c in &self.chars {
            self.next.clear();
            self.next.resize(n.len() + 1, false);
            match c {
                '*' | '%' => {
                    let mut on = false;
                    for j in 0..=n.len() {
                        on |= self.reach[j];
                        self.next[j] = on;
                        if c == '%' && j < n.len() && n[j] == DELIMITER {
                            on = false;
                        }
                    }
                }
                c => {
                    for (j, &nc) in n.iter().enumerate() {
                        self.next[j + 1] = self.reach[j] && nc == c;
                    }
                }
            }
            std::mem::swap(&mut self.reach, &mut self.next);
            if !self.reach.contains(&true) {
                return false;
            }
        }
        self.reach[n.len()]
    }
}

#[cfg(test)]
fn wildcard_match(pattern: &str, name: &str) -> bool {
    ListPattern::new(pattern).matches(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_wildcards() {
        assert!(wildcard_match("*", "Archive/2024"));
        assert!(!wildcard_match("%", "Archive/2024"));
        assert!(wildcard_match("Archive/%", "Archive/2024"));
        assert!(wildcard_match("inbox", "INBOX"));
        assert!(!wildcard_match("Sent", "sent"));
        assert!(wildcard_match("S%", "Sent"));
        assert!(wildcard_match("Entwü*", "Entwürfe/2026"));
        assert!(!wildcard_match("Entwü%", "Entwürfe/2026"));
        assert!(wildcard_match("a/%/c", "a/b/c"));
        assert!(!wildcard_match("a/%", "a/b/c"));
        assert!(wildcard_match("%/%", "a/b"));
        // Linear, not exponential: this would never finish with backtracking.
        let evil = format!("{}b", "*a".repeat(40));
        assert!(!wildcard_match(&evil, &"a".repeat(200)));
        assert!(wildcard_match("a%*%%b", "a/x/b"));
        assert!(!wildcard_match("a%%%b", "a/x/b"));
        // A run of wildcards is one: the issue's 60,000-character pattern is `*`.
        let runs = ListPattern::new(&"%*".repeat(30_000));
        assert_eq!(runs.chars, ['*']);
    }

    #[test]
    fn tagged_line_is_found_for_splicing() {
        assert_eq!(last_line_start(b"* 1 EXISTS\r\na OK done\r\n"), 12);
        assert_eq!(last_line_start(b"a OK done\r\n"), 0);
    }
}
