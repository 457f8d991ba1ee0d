//! The SMTP client of outbound delivery (RFC 5321): EHLO (HELO as a fallback),
//! opportunistic STARTTLS (RFC 3207), PIPELINING (RFC 2920), SIZE, 8BITMIME,
//! SMTPUTF8 and DSN parameters when the server offers them, and one result per
//! recipient. Connections are reused for the next message to the same host.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailmesh_types::{BodyType, DsnRet, Envelope, Recipient, ReversePath};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A reply: its code and its text (continuation lines joined with a space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The RFC 3463 status the text starts with (when its class agrees with the
    /// code's), or one made from the code.
    pub fn status(&self) -> String {
        let first = self.text.split_whitespace().next().unwrap_or_default();
        let mut parts = first.split('.');
        let class = (self.code / 100).to_string();
        let valid = parts.next() == Some(class.as_str())
            && matches!(class.as_str(), "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        if valid {
            return first.to_owned();
        }
        match self.code / 100 {
            2 => "2.0.0".into(),
            4 => "4.0.0".into(),
            _ => "5.0.0".into(),
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    /// `SIZE` with its limit (0: none given).
    pub size: Option<u64>,
}

impl Extensions {
    fn parse(lines: &[String]) -> Self {
        let mut ext = Self::default();
        // The first line is the greeting; each further line one extension.
        for line in lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "STARTTLS" => ext.starttls = true,
                "8BITMIME" => ext.eightbitmime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                _ => {}
            }
        }
        ext
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The name in EHLO.
    pub hostname: String,
    pub connect_timeout: Duration,
    /// For each reply but the one after the message (RFC 5321 4.5.3.2 allows 5 min).
    pub command_timeout: Duration,
    /// For the reply after the message (RFC 5321: 10 minutes).
    pub data_timeout: Duration,
    /// Use STARTTLS when offered (without authenticating the server).
    pub opportunistic_tls: bool,
}

/// Why a session ended before it could say anything about the recipients.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The server refused the session (greeting, EHLO/HELO, STARTTLS).
    #[error("{0}")]
    Refused(Reply),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// Authenticated TLS was required (MTA-STS) and the server cannot give it.
    #[error("TLS required: {0}")]
    TlsRequired(String),
    #[error("malformed reply {0:?}")]
    Protocol(String),
    /// The message was sent and the reply to it never came: it may have been
    /// delivered, so it must not be sent again at once.
    #[error("no reply after the message was sent ({0}); it may have been delivered")]
    AfterData(Box<SessionError>),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How a connection uses STARTTLS.
#[derive(Clone, Copy)]
pub enum Tls<'a> {
    /// Clear text.
    Off,
    /// When offered (and `opportunistic_tls` is on); the server is not authenticated.
    Opportunistic(&'a Arc<rustls::ClientConfig>),
    /// Always; the configuration must verify the certificate, which must name the
    /// MX host (not its address). No clear-text fallback.
    Authenticated(&'a Arc<rustls::ClientConfig>),
}

/// An open SMTP session, ready for a transaction.
pub struct Connection {
    io: BufReader<Box<dyn Stream>>,
    pub extensions: Extensions,
    pub tls: bool,
    /// The MX host name the server's certificate was verified for.
    pub authenticated: Option<String>,
    pub peer: SocketAddr,
    config: Arc<ClientConfig>,
    /// Out of step with the server (an RSET failed): not to be reused.
    broken: bool,
}

/// How one recipient fared in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientResult {
    Delivered(Reply),
    Failed(Reply),
}

const MAX_REPLY_LINES: usize = 256;
const MAX_LINE: usize = 4096;
/// Reply text kept (for diagnostics and reports); the rest is dropped.
const MAX_REPLY_TEXT: usize = 512;
/// The message goes out in pieces this large, each within the command timeout
/// (RFC 5321 4.5.3.2.5: a time limit per data block, not for the whole message).
const DATA_CHUNK: usize = 64 << 10;

impl Connection {
    /// Connects to `peer` (the MX `host`), reads the greeting, says EHLO and starts
    /// TLS as `tls` says.
    pub async fn open(
        peer: SocketAddr,
        host: &str,
        config: Arc<ClientConfig>,
        tls: Tls<'_>,
    ) -> Result<Self, SessionError> {
        let tcp = tokio::time::timeout(config.connect_timeout, TcpStream::connect(peer))
            .await
            .map_err(|_| SessionError::Timeout("connecting"))??;
        let _ = tcp.set_nodelay(true);
        let mut conn = Self {
            io: BufReader::new(Box::new(tcp) as Box<dyn Stream>),
            extensions: Extensions::default(),
            tls: false,
            authenticated: None,
            peer,
            config,
            broken: false,
        };
        let greeting = conn.reply(conn.config.command_timeout).await?;
        if greeting.code != 220 {
            return Err(SessionError::Refused(greeting));
        }
        conn.hello().await?;
        match tls {
            Tls::Opportunistic(tls)
                if conn.extensions.starttls && conn.config.opportunistic_tls =>
            {
                conn.send(b"STARTTLS\r\n").await?;
                let reply = conn.reply(conn.config.command_timeout).await?;
                if reply.code == 220 {
                    conn = conn.start_tls(host, tls.clone(), false).await?;
                    conn.hello().await?;
                }
            }
            Tls::Off | Tls::Opportunistic(_) => {}
            Tls::Authenticated(tls) => {
                if !conn.extensions.starttls {
                    return Err(SessionError::TlsRequired("STARTTLS not offered".into()));
                }
                conn.send(b"STARTTLS\r\n").await?;
                let reply = conn.reply(conn.config.command_timeout).await?;
                if reply.code != 220 {
                    return Err(SessionError::TlsRequired(format!(
                        "STARTTLS refused: {reply}"
                    )));
                }
                conn = conn.start_tls(host, tls.clone(), true).await?;
                conn.authenticated = Some(host.trim_end_matches('.').to_ascii_lowercase());
                conn.hello().await?;
            }
        }
        Ok(conn)
    }

    /// `by_name`: the certificate is checked against the host name only (an address
    /// is never a valid name then).
    async fn start_tls(
        self,
        host: &str,
        tls: Arc<rustls::ClientConfig>,
        by_name: bool,
    ) -> Result<Self, SessionError> {
        let by_host =
            rustls::pki_types::ServerName::try_from(host.trim_end_matches('.').to_owned());
        let name = match by_host {
            Ok(name @ rustls::pki_types::ServerName::DnsName(_)) => name,
            _ if by_name => {
                return Err(SessionError::TlsRequired(format!(
                    "{host} is not a host name"
                )));
            }
            Ok(name) => name,
            Err(_) => rustls::pki_types::ServerName::try_from(self.peer.ip().to_string())
                .map_err(|e| SessionError::Tls(io::Error::other(e)))?,
        };
        // Nothing the server sent before its 220 may be kept (RFC 3207 4.2 / 6).
        if !self.io.buffer().is_empty() {
            return Err(SessionError::Protocol(
                "data after the STARTTLS reply".into(),
            ));
        }
        let inner = self.io.into_inner();
        let stream = tokio::time::timeout(
            self.config.command_timeout,
            tokio_rustls::TlsConnector::from(tls).connect(name, inner),
        )
        .await
        .map_err(|_| SessionError::Timeout("in the TLS handshake"))?
        .map_err(SessionError::Tls)?;
        Ok(Self {
            io: BufReader::new(Box::new(stream) as Box<dyn Stream>),
            extensions: Extensions::default(),
            tls: true,
            authenticated: None,
            peer: self.peer,
            config: self.config,
            broken: false,
        })
    }

    async fn hello(&mut self) -> Result<(), SessionError> {
        let ehlo = format!("EHLO {}\r\n", self.config.hostname);
        self.send(ehlo.as_bytes()).await?;
        let (reply, lines) = self.reply_lines(self.config.command_timeout).await?;
        if reply.is_ok() {
            self.extensions = Extensions::parse(&lines);
            return Ok(());
        }
        if reply.code != 421 {
            let helo = format!("HELO {}\r\n", self.config.hostname);
            self.send(helo.as_bytes()).await?;
            let reply = self.reply(self.config.command_timeout).await?;
            if reply.is_ok() {
                self.extensions = Extensions::default();
                return Ok(());
            }
            return Err(SessionError::Refused(reply));
        }
        Err(SessionError::Refused(reply))
    }

    /// One transaction: `message` to `recipients` (all of one destination). Every
    /// recipient gets a result unless the session broke (`Err`: nothing known).
    pub async fn transaction(
        &mut self,
        envelope: &Envelope,
        recipients: &[&Recipient],
        message: &[u8],
    ) -> Result<Vec<RecipientResult>, SessionError> {
        let ext = self.extensions.clone();
        if envelope.smtputf8 && !ext.smtputf8 {
            // RFC 6531 3.5: not without the extension; the sender hears why.
            let reply = Reply {
                code: 553,
                text: "5.6.7 The destination does not support SMTPUTF8".into(),
            };
            return Ok(vec![RecipientResult::Failed(reply); recipients.len()]);
        }
        let mut mail = format!("MAIL FROM:<{}>", sender(&envelope.mail_from));
        if ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        // Declared, or found: clients often send 8-bit text without saying so.
        // (The message is scanned only when it says 7-bit and the server could be told.)
        if ext.eightbitmime && (envelope.body_type != BodyType::SevenBit || !message.is_ascii()) {
            mail.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if ext.dsn {
            match envelope.dsn_ret {
                Some(DsnRet::Full) => mail.push_str(" RET=FULL"),
                Some(DsnRet::Headers) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &envelope.dsn_envid {
                mail.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        mail.push_str("\r\n");
        let rcpts: Vec<String> = recipients.iter().map(|r| rcpt_line(r, ext.dsn)).collect();

        let timeout = self.config.command_timeout;
        let (mail_reply, rcpt_replies, data_reply) = if ext.pipelining {
            // RFC 2920: MAIL, every RCPT and DATA in one go, then the replies.
            let mut batch = mail.into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(r.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.send(&batch).await?;
            let mail_reply = self.reply(timeout).await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.reply(timeout).await?);
            }
            let data_reply = self.reply(timeout).await?;
            (mail_reply, rcpt_replies, Some(data_reply))
        } else {
            self.send(mail.as_bytes()).await?;
            let mail_reply = self.reply(timeout).await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            if mail_reply.is_ok() {
                for r in &rcpts {
                    self.send(r.as_bytes()).await?;
                    rcpt_replies.push(self.reply(timeout).await?);
                }
            }
            (mail_reply, rcpt_replies, None)
        };

        if !mail_reply.is_ok() {
            if data_reply.as_ref().is_some_and(|r| r.code == 354) {
                self.send(b".\r\n").await?;
                self.reply(self.config.data_timeout).await?;
            }
            self.rset().await;
            return Ok(vec![RecipientResult::Failed(mail_reply); recipients.len()]);
        }
        let accepted = rcpt_replies.iter().filter(|r| r.is_ok()).count();
        let data_reply = match data_reply {
            Some(reply) => reply,
            None if accepted == 0 => Reply {
                code: 554,
                text: "no recipient accepted".into(),
            },
            None => {
                self.send(b"DATA\r\n").await?;
                self.reply(timeout).await?
            }
        };
        let final_reply = if data_reply.code == 354 {
            if accepted == 0 {
                // A server that said 354 with nobody to deliver to gets an empty
                // message; whatever it answers, nobody was accepted.
                self.send(b".\r\n").await?;
                self.reply(self.config.data_timeout).await?;
                None
            } else {
                let sent = self.send_data(&dot_stuff(message)).await;
                let reply = match sent {
                    Ok(()) => self.reply(self.config.data_timeout).await,
                    Err(e) => Err(e),
                };
                // From the first byte of the message on, a broken session may still
                // have delivered it.
                Some(reply.map_err(|e| SessionError::AfterData(Box::new(e)))?)
            }
        } else {
            None
        };
        let mut results = Vec::with_capacity(recipients.len());
        for reply in rcpt_replies {
            results.push(match (&final_reply, reply.is_ok()) {
                (_, false) => RecipientResult::Failed(reply),
                (Some(done), true) if done.is_ok() => RecipientResult::Delivered(done.clone()),
                (Some(done), true) => RecipientResult::Failed(done.clone()),
                (None, true) => RecipientResult::Failed(data_reply.clone()),
            });
        }
        if !final_reply.as_ref().is_some_and(Reply::is_ok) {
            self.rset().await;
        }
        Ok(results)
    }

    /// Fit for another transaction: in step with the server, nothing unread.
    pub fn reusable(&self) -> bool {
        !self.broken && self.io.buffer().is_empty()
    }

    async fn send_data(&mut self, data: &[u8]) -> Result<(), SessionError> {
        for chunk in data.chunks(DATA_CHUNK) {
            let write = self.io.get_mut().write_all(chunk);
            tokio::time::timeout(self.config.command_timeout, write)
                .await
                .map_err(|_| SessionError::Timeout("sending the message"))??;
        }
        tokio::time::timeout(self.config.command_timeout, self.io.get_mut().flush())
            .await
            .map_err(|_| SessionError::Timeout("sending the message"))??;
        Ok(())
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        if self.send(b"QUIT\r\n").await.is_ok() {
            let _ = self.reply(Duration::from_secs(5)).await;
        }
    }

    /// Resets the transaction; a connection where that fails is not reused (the
    /// results already known stand).
    async fn rset(&mut self) {
        let ok = match self.send(b"RSET\r\n").await {
            Ok(()) => self
                .reply(self.config.command_timeout)
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        };
        self.broken |= !ok;
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let write = async {
            self.io.get_mut().write_all(bytes).await?;
            self.io.get_mut().flush().await
        };
        tokio::time::timeout(self.config.command_timeout, write)
            .await
            .map_err(|_| SessionError::Timeout("sending"))??;
        Ok(())
    }

    async fn reply(&mut self, timeout: Duration) -> Result<Reply, SessionError> {
        self.reply_lines(timeout).await.map(|(r, _)| r)
    }

    /// Reads one reply; also its lines' texts (EHLO keywords).
    async fn reply_lines(
        &mut self,
        timeout: Duration,
    ) -> Result<(Reply, Vec<String>), SessionError> {
        let read = async {
            let mut lines = Vec::new();
            let mut code = 0u16;
            loop {
                let mut line = Vec::new();
                let n = tokio::io::AsyncReadExt::take(&mut self.io, MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await?;
                if n == 0 {
                    return Err(SessionError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                let bytes = line.as_bytes();
                if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
                    return Err(SessionError::Protocol(line.chars().take(100).collect()));
                }
                let this: u16 = line[..3].parse().unwrap_or(0);
                if code != 0 && this != code {
                    return Err(SessionError::Protocol(line.chars().take(100).collect()));
                }
                code = this;
                let last = bytes.get(3).is_none_or(|b| *b == b' ');
                lines.push(line.get(4..).unwrap_or_default().to_owned());
                if last {
                    break;
                }
                if lines.len() > MAX_REPLY_LINES {
                    return Err(SessionError::Protocol("endless reply".into()));
                }
            }
            let mut text = lines.join(" ");
            if text.len() > MAX_REPLY_TEXT {
                let mut end = MAX_REPLY_TEXT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            Ok((Reply { code, text }, lines))
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| SessionError::Timeout("waiting for a reply"))?
    }
}

fn sender(from: &ReversePath) -> String {
    match from {
        ReversePath::Null => String::new(),
        ReversePath::Address(a) => a.to_string(),
    }
}

fn rcpt_line(r: &Recipient, dsn: bool) -> String {
    let mut line = format!("RCPT TO:<{}>", r.address);
    if dsn {
        let n = r.notify;
        if n == mailmesh_types::DsnNotify::NEVER {
            line.push_str(" NOTIFY=NEVER");
        } else if n != mailmesh_types::DsnNotify::DEFAULT {
            let mut what = Vec::new();
            if n.success {
                what.push("SUCCESS");
            }
            if n.failure {
                what.push("FAILURE");
            }
            if n.delay {
                what.push("DELAY");
            }
            line.push_str(&format!(" NOTIFY={}", what.join(",")));
        }
        if let Some(orcpt) = &r.orcpt
            && let Some((kind, address)) = orcpt.split_once(';')
        {
            line.push_str(&format!(" ORCPT={kind};{}", xtext(address)));
        }
    }
    line.push_str("\r\n");
    line
}

/// RFC 3461 4: xtext encoding of `+`, `=`, controls and non-ASCII.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The message as DATA sends it: leading dots doubled, CRLF at the end, `.` line.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    mailmesh_types::wire::dot_stuff(message, &mut out);
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_are_stuffed_and_the_end_is_marked() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"no end"), b"no end\r\n.\r\n");
    }

    #[test]
    fn enhanced_status_comes_from_the_text_or_the_code() {
        let r = |code, text: &str| Reply {
            code,
            text: text.into(),
        };
        assert_eq!(r(550, "5.1.1 no such user").status(), "5.1.1");
        assert_eq!(r(451, "try later").status(), "4.0.0");
        assert_eq!(r(550, "5.1 nope").status(), "5.0.0");
        assert_eq!(r(550, "4.2.2 class disagrees").status(), "5.0.0");
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }
}
