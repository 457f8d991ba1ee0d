//! What the session does differently as a message submission agent (RFC 6409, on
//! 587 with STARTTLS and 465 with implicit TLS, RFC 8314): users authenticate (AUTH
//! PLAIN and LOGIN, RFC 4954), send only as themselves, and their messages are
//! completed (Date, Message-ID), cleaned (Bcc) and DKIM-signed before they are queued.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use mailmesh_auth::sign::{KeyAlgorithm, dkim_signature};
use mailmesh_cache::login::LoginLimits;
use mailmesh_kit::config::{ConfigError, Validate};
use mailmesh_storage::client::{Account, DeliveryError, Mailstore, SigningKey};
use mailmesh_storage::directory::DkimAlgorithm;
use mailmesh_types::{Domain, EmailAddress, QueueId, rfc5322_date};
use serde::Deserialize;

/// `[submission]`: what only the submission ports do.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubmissionConfig {
    /// Offer AUTH before TLS (tests on loopback only; passwords would travel in clear).
    pub allow_plaintext_auth: bool,
    /// Failed logins per client address (and per account, which only slows down)
    /// within `failure_window`, counted across pods and shared with IMAP and POP3.
    pub max_auth_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Logins checked at once for one client address (webmail servers and NATs log
    /// many users in together); more get `454` and may try again shortly.
    pub max_parallel_logins: u32,
    /// Leave the client's address and name out of the Received header (the header
    /// still says which server took the message, when, and that it was submitted).
    pub hide_client: bool,
    /// Recipients one user may send to per hour, across pods (each accepted RCPT
    /// counts, so one message to 100 people counts 100); 0 is no limit. A tenant's
    /// own `send_rate_per_hour` limits all its users together on top.
    #[serde(alias = "messages_per_user_per_hour")]
    pub recipients_per_user_per_hour: u32,
    /// DKIM-sign with the From domain's key when it has one.
    pub dkim_sign: bool,
    /// How long a domain's signing key (or its absence) is remembered.
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    /// The time a connection has to log in, however it spends it (a client that
    /// trickles commands cannot hold a session without logging in).
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        Self {
            allow_plaintext_auth: false,
            max_auth_failures: 10,
            failure_window: Duration::from_secs(600),
            failure_delay: Duration::from_secs(1),
            max_parallel_logins: 64,
            hide_client: false,
            recipients_per_user_per_hour: 1000,
            dkim_sign: true,
            key_cache_ttl: Duration::from_secs(60),
            login_timeout: Duration::from_secs(60),
        }
    }
}

impl Validate for SubmissionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_auth_failures == 0
            || self.failure_window.is_zero()
            || self.max_parallel_logins == 0
            || self.login_timeout.is_zero()
        {
            return Err(ConfigError::invalid(
                "submission.max_auth_failures",
                "max_auth_failures, failure_window, max_parallel_logins and login_timeout must be above zero",
            ));
        }
        Ok(())
    }
}

impl SubmissionConfig {
    pub(crate) fn login_limits(&self) -> LoginLimits {
        LoginLimits {
            max_failures: self.max_auth_failures,
            window: self.failure_window,
            failure_delay: self.failure_delay,
            max_parallel: self.max_parallel_logins,
            account_pace: None,
        }
    }
}

/// Signing keys by domain, asked from the directory at most once per TTL.
#[derive(Default)]
pub(crate) struct KeyCache {
    keys: Mutex<HashMap<Domain, (Instant, Option<SigningKey>)>>,
}

impl KeyCache {
    /// The key for `domain`, which `account` (a user of the domain's tenant, else
    /// no key) signs with.
    pub(crate) async fn get(
        &self,
        directory: &dyn Mailstore,
        account: &Account,
        domain: &Domain,
        ttl: Duration,
    ) -> Result<Option<SigningKey>, DeliveryError> {
        if let Some((at, key)) = self.lock().get(domain)
            && at.elapsed() < ttl
        {
            return Ok(key.clone());
        }
        let key = directory.signing_key(account, domain).await?;
        let mut keys = self.lock();
        if keys.len() > 10_000 {
            keys.clear();
        }
        keys.insert(domain.clone(), (Instant::now(), key.clone()));
        Ok(key)
    }

    /// Forgets what is known of `domain`'s key (`None`: of every domain's).
    pub(crate) fn forget(&self, domain: Option<&Domain>) {
        match domain {
            Some(domain) => self.lock().remove(domain),
            None => {
                self.lock().clear();
                None
            }
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Domain, (Instant, Option<SigningKey>)>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `DKIM-Signature: ...\r\n` for `message` with `key`.
pub(crate) fn sign(key: &SigningKey, message: &[u8]) -> Result<String, String> {
    let algorithm = match key.algorithm {
        DkimAlgorithm::Ed25519 => KeyAlgorithm::Ed25519,
        DkimAlgorithm::Rsa2048 => KeyAlgorithm::Rsa,
    };
    dkim_signature(
        algorithm,
        &key.pkcs8,
        key.domain.as_str(),
        &key.selector,
        message,
    )
    .map_err(|e| e.to_string())
}

/// The header fields of `message` (each with its continuation lines and CRLF) and
/// where the header section ends (the start of the blank line, or the end).
pub fn header_fields(message: &[u8]) -> (Vec<Range<usize>>, usize) {
    // A message that starts with its blank line has no header section at all.
    let headers_end = if message.starts_with(b"\r\n") {
        0
    } else {
        find(message, b"\r\n\r\n").map_or(message.len(), |i| i + 2)
    };
    let mut fields = Vec::new();
    let mut start = 0;
    while start < headers_end {
        let mut end =
            find(&message[start..headers_end], b"\r\n").map_or(headers_end, |i| start + i + 2);
        // Continuation lines (leading WSP) belong to the same field.
        while end < headers_end && matches!(message[end], b' ' | b'\t') {
            end = find(&message[end..headers_end], b"\r\n").map_or(headers_end, |i| end + i + 2);
        }
        fields.push(start..end);
        start = end;
    }
    (fields, headers_end)
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// The name of a header field, if it has one.
pub(crate) fn field_name(field: &[u8]) -> Option<&[u8]> {
    let colon = field.iter().position(|&b| b == b':')?;
    Some(field[..colon].trim_ascii())
}

/// A submitted message as it will be queued.
pub(crate) struct Completed {
    pub message: Vec<u8>,
    /// Addresses in From and Sender, all of which must belong to the user; or the
    /// reply refusing a message whose author fields cannot be read.
    pub authors: Result<Vec<EmailAddress>, &'static str>,
}

/// RFC 6409 8: adds Date and Message-ID when missing, a From with the user's
/// address when there is none; removes Bcc and Resent-Bcc (their recipients are in
/// the envelope).
pub(crate) fn complete(
    message: Vec<u8>,
    user: &EmailAddress,
    hostname: &str,
    queue_id: QueueId,
    now: SystemTime,
) -> Completed {
    let (fields, headers_end) = header_fields(&message);
    let has = |name: &[u8]| {
        fields
            .iter()
            .any(|r| field_name(&message[r.clone()]).is_some_and(|n| n.eq_ignore_ascii_case(name)))
    };
    let mut added = String::new();
    if !has(b"date") {
        added.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
    }
    if !has(b"message-id") {
        added.push_str(&format!("Message-ID: <{queue_id}@{hostname}>\r\n"));
    }
    let count = |name: &[u8]| {
        fields
            .iter()
            .filter(|r| {
                field_name(&message[(*r).clone()]).is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .count()
    };
    let headers = &message[..headers_end];
    // RFC 5322 3.6: one From and at most one Sender; more would let one hide
    // behind another.
    let authors = if count(b"from") > 1 {
        Err("550 5.7.1 Only one From field is allowed\r\n")
    } else if count(b"sender") > 1 {
        Err("550 5.7.1 Only one Sender field is allowed\r\n")
    } else {
        let from = if has(b"from") {
            addresses(headers, &mail_parser::HeaderName::From)
                .filter(|a| !a.is_empty())
                .ok_or("550 5.7.1 The From header cannot be read\r\n")
        } else {
            added.push_str(&format!("From: <{user}>\r\n"));
            Ok(vec![user.clone()])
        };
        let sender = if has(b"sender") {
            addresses(headers, &mail_parser::HeaderName::Sender)
                .filter(|a| a.len() == 1)
                .ok_or("550 5.7.1 The Sender header cannot be read\r\n")
        } else {
            Ok(Vec::new())
        };
        from.and_then(|mut from| {
            from.extend(sender?);
            Ok(from)
        })
    };
    let mut out = Vec::with_capacity(message.len() + added.len());
    for range in &fields {
        let field = &message[range.clone()];
        let blind = field_name(field).is_some_and(|n| {
            n.eq_ignore_ascii_case(b"bcc") || n.eq_ignore_ascii_case(b"resent-bcc")
        });
        if !blind {
            out.extend_from_slice(field);
        }
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        // The last field had no line end (a message that is all header section).
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(added.as_bytes());
    out.extend_from_slice(&message[headers_end..]);
    Completed {
        message: out,
        authors,
    }
}

/// The mailbox addresses of every `name` field (group syntax included); `None`
/// when one of them cannot be read (the caller refuses the message).
fn addresses(headers: &[u8], name: &mail_parser::HeaderName<'_>) -> Option<Vec<EmailAddress>> {
    let mut section = headers.to_vec();
    section.extend_from_slice(b"\r\n");
    let parsed = mail_parser::MessageParser::new().parse_headers(&section)?;
    let mut out = Vec::new();
    for header in parsed.headers() {
        if &header.name != name {
            continue;
        }
        let Some(address) = header.value().as_address() else {
            // Not an address list.
            out.push(None);
            continue;
        };
        for a in address.iter() {
            out.push(a.address().and_then(|a| a.parse::<EmailAddress>().ok()));
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(message: &str) -> (String, Vec<String>) {
        let user: EmailAddress = "ann@acme.test".parse().unwrap();
        let id: QueueId = "0190a4d1c0de7000800000000000abcd".parse().unwrap();
        let done = complete(
            message.as_bytes().to_vec(),
            &user,
            "mx.acme.test",
            id,
            SystemTime::UNIX_EPOCH,
        );
        (
            String::from_utf8(done.message).unwrap(),
            // Refused: nothing the ownership check could pass.
            done.authors
                .map(|a| a.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        )
    }

    #[test]
    fn missing_headers_are_added_and_bcc_removed() {
        let (out, from) = run(
            "From: Ann <ann@acme.test>\r\nTo: bob@b.test\r\nBcc: secret@c.test,\r\n more@c.test\r\nSubject: hi\r\n\r\nBcc: stays in the body\r\n",
        );
        assert_eq!(from, ["ann@acme.test"]);
        assert!(!out.contains("Bcc: secret"), "{out}");
        assert!(!out.contains("more@c.test"), "{out}");
        assert!(out.contains("\r\n\r\nBcc: stays in the body\r\n"), "{out}");
        assert!(
            out.contains("Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Message-ID: <0190a4d1c0de7000800000000000abcd@mx.acme.test>\r\n"),
            "{out}"
        );
        // Present headers are kept as they are.
        let (out, _) = run(
            "From: ann@acme.test\r\nDate: Mon, 2 Nov 2026 10:00:00 +0100\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n",
        );
        assert_eq!(
            out,
            "From: ann@acme.test\r\nDate: Mon, 2 Nov 2026 10:00:00 +0100\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn from_is_read_whatever_its_form() {
        assert_eq!(
            run("From: \"Ann, A.\" <ann@acme.test>, bob@acme.test\r\n\r\n").1,
            ["ann@acme.test", "bob@acme.test"]
        );
        assert_eq!(
            run("From: team: ann@acme.test;\r\n\r\n").1,
            ["ann@acme.test"]
        );
        // Unreadable: nothing, so the ownership check fails.
        assert!(run("From: not an address\r\n\r\n").1.is_empty());
        // No From at all: the user's own address is added.
        let (out, from) = run("Subject: x\r\n\r\nbody");
        assert_eq!(from, ["ann@acme.test"]);
        assert!(out.contains("From: <ann@acme.test>\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nbody"), "{out}");
        // Two From fields: refused (nothing readable).
        assert!(
            run("From: ann@acme.test\r\nFrom: boss@acme.test\r\n\r\nx")
                .1
                .is_empty()
        );
        // All header section, no final line end: the added fields stay separate.
        let (out, from) = run("From: ann@acme.test");
        assert_eq!(from, ["ann@acme.test"]);
        assert!(out.starts_with("From: ann@acme.test\r\nDate: "), "{out}");
    }

    #[test]
    fn sender_counts_as_an_author_and_resent_bcc_goes() {
        let (out, authors) = run(
            "From: ann@acme.test\r\nSender: Boss <boss@acme.test>\r\nResent-Bcc: hidden@c.test\r\n\r\nx",
        );
        assert_eq!(authors, ["ann@acme.test", "boss@acme.test"]);
        assert!(!out.contains("hidden@c.test"), "{out}");
        // Two Sender fields, a Sender list or an unreadable one: refused.
        for bad in [
            "From: ann@acme.test\r\nSender: ann@acme.test\r\nSender: boss@acme.test\r\n\r\nx",
            "From: ann@acme.test\r\nSender: ann@acme.test, boss@acme.test\r\n\r\nx",
            "From: ann@acme.test\r\nSender: nobody at all\r\n\r\nx",
        ] {
            assert!(run(bad).1.is_empty(), "{bad}");
        }
    }
}
