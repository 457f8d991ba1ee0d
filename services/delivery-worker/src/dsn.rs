//! Delivery status notifications (RFC 3464): failures, delays, and the success
//! notices RFC 3461 asks for with `NOTIFY=SUCCESS` (delivered to a mailbox, expanded
//! by an alias, or relayed to a server that sends no notices of its own). Each is a
//! `multipart/report` to the envelope sender, from the null sender so it can never
//! cause another bounce (RFC 5321 §4.5.5). Mail that travelled with SMTPUTF8 gets
//! the internationalized parts of RFC 6533 (`message/global-delivery-status`,
//! `message/global`, `message/global-headers`, `utf-8` address types).

use std::fmt::Write;
use std::time::SystemTime;

use bytes::Bytes;
use mailmesh_types::{
    BodyRef, BodyType, DsnNotify, DsnRet, EmailAddress, Envelope, Recipient, ReversePath,
    rfc5322_date,
};

/// How much of the original message goes back with a failure report (RET=HDRS, or
/// the headers of large messages).
const MAX_RETURNED_BYTES: usize = 64 << 10;

/// One recipient's line in a report (a failure, a delay or a success), with its
/// RFC 3463 status.
#[derive(Debug, Clone)]
pub struct Failure {
    pub recipient: Recipient,
    pub status: String,
    pub diagnostic: String,
    /// The host whose reply `diagnostic` is (`Remote-MTA`); none for local causes.
    pub remote_mta: Option<String>,
}

/// The bounce for `failures`, or `None` when none is due: the sender is null, or no
/// failed recipient asked for failure notices (NOTIFY).
pub fn failure_report(
    original: &Envelope,
    original_message: &[u8],
    failures: &[Failure],
    reporting_mta: &str,
) -> Option<Envelope> {
    report(
        original,
        original_message,
        failures,
        reporting_mta,
        Kind::Failed,
    )
}

/// What a success notice says happened (RFC 3464 2.3.3 `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Success {
    /// Stored in the recipient's mailbox.
    Delivered,
    /// An alias passed it on to several other addresses.
    Expanded,
    /// Handed to a server that sends no delivery notices itself.
    Relayed,
}

/// A success notice for recipients that asked for one (NOTIFY=SUCCESS), with the
/// original's headers; `None` when nobody asked or the sender is null.
pub fn success_report(
    original: &Envelope,
    original_message: &[u8],
    done: &[Failure],
    reporting_mta: &str,
    what: Success,
) -> Option<Envelope> {
    report(
        original,
        original_message,
        done,
        reporting_mta,
        Kind::Success(what),
    )
}

/// Which report.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Failed,
    Delayed(SystemTime),
    Success(Success),
}

/// A delay notice (RFC 3464 `Action: delayed`) for recipients still being retried,
/// with the original's headers; `None` when none is due (null sender, or nobody
/// asked with NOTIFY=DELAY or the default).
pub fn delay_report(
    original: &Envelope,
    original_message: &[u8],
    delayed: &[Failure],
    reporting_mta: &str,
    retry_until: SystemTime,
) -> Option<Envelope> {
    report(
        original,
        original_message,
        delayed,
        reporting_mta,
        Kind::Delayed(retry_until),
    )
}

fn report(
    original: &Envelope,
    original_message: &[u8],
    failures: &[Failure],
    reporting_mta: &str,
    kind: Kind,
) -> Option<Envelope> {
    let ReversePath::Address(sender) = &original.mail_from else {
        return None;
    };
    let failures: Vec<&Failure> = failures
        .iter()
        .filter(|f| match kind {
            Kind::Failed => f.recipient.notify.failure,
            Kind::Delayed(_) => f.recipient.notify.delay,
            Kind::Success(_) => f.recipient.notify.success,
        })
        .collect();
    if failures.is_empty() {
        return None;
    }
    // RFC 6533 §3: the message or an address may be UTF-8.
    let global = original.smtputf8;
    let boundary = format!("dsn-{}", original.queue_id);
    // The same failures of the same message always give the same bounce (a redo
    // after a crash is deduplicated); other failures later give another one.
    let mut failed: Vec<String> = failures
        .iter()
        .map(|f| f.recipient.address.to_string())
        .collect();
    failed.sort();
    failed.dedup();
    let (label, action, subject, intro) = match kind {
        Kind::Failed => (
            "dsn",
            "failed",
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to these recipients:\r\n\r\n",
        ),
        Kind::Delayed(_) => (
            "delay",
            "delayed",
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to these recipients; delivery\r\n\
             will be tried again. No action is needed now:\r\n\r\n",
        ),
        Kind::Success(Success::Delivered) => (
            "delivered",
            "delivered",
            "Successful Mail Delivery Report",
            "Your message was delivered to these recipients' mailboxes:\r\n\r\n",
        ),
        Kind::Success(Success::Expanded) => (
            "expanded",
            "expanded",
            "Successful Mail Delivery Report",
            "Your message was passed on by these addresses to the addresses they\r\n\
             forward to:\r\n\r\n",
        ),
        Kind::Success(Success::Relayed) => (
            "relayed",
            "relayed",
            "Successful Mail Delivery Report",
            "Your message was handed to these recipients' mail servers, which send no\r\n\
             delivery notices; no further notice will come:\r\n\r\n",
        ),
    };
    let queue_id = original
        .queue_id
        .derived(&format!("{label}/{}", failed.join(",")));
    let mut m = String::new();
    // Writing into a String cannot fail.
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n\
         To: {sender}\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{queue_id}@{reporting_mta}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         {intro}",
        date = rfc5322_date(SystemTime::now()),
    );
    for f in &failures {
        let _ = write!(m, "  {}: {}", f.recipient.address, printable(&f.diagnostic));
        if let Some(remote) = &f.remote_mta {
            let _ = write!(m, " (from {})", printable(remote));
        }
        let _ = write!(m, "\r\n");
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/{global}delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {reporting_mta}\r\n",
        global = if global { "global-" } else { "" },
    );
    if let Some(envid) = &original.dsn_envid {
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", printable(envid));
    }
    let _ = write!(
        m,
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.received_at)
    );
    for f in &failures {
        let _ = write!(m, "\r\n");
        if let Some(orcpt) = &f.recipient.orcpt {
            let _ = write!(m, "Original-Recipient: {}\r\n", printable(orcpt));
        }
        let _ = write!(
            m,
            "Final-Recipient: {}; {}\r\n\
             Action: {}\r\n\
             Status: {}\r\n\
             Diagnostic-Code: {}; {}\r\n",
            if f.recipient.address.is_utf8() {
                "utf-8"
            } else {
                "rfc822"
            },
            f.recipient.address,
            action,
            f.status,
            // An SMTP reply ("550 5.1.1 ..."), or a local cause in our own words.
            if is_smtp_reply(&f.diagnostic) {
                "smtp"
            } else {
                "X-mailmesh"
            },
            printable(&f.diagnostic)
        );
        if let Some(remote) = &f.remote_mta {
            let _ = write!(m, "Remote-MTA: dns; {}\r\n", printable(remote));
        }
        if let Kind::Delayed(until) = kind {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", rfc5322_date(until));
        }
    }
    // Delay and success notices return the headers only (RFC 3461 4.3: RET is for
    // failures; the message is on its way or arrived).
    let headers_only = !matches!(kind, Kind::Failed)
        || original.dsn_ret == Some(DsnRet::Headers)
        || original_message.len() > MAX_RETURNED_BYTES;
    let returned = if headers_only {
        let end = find_header_end(original_message).unwrap_or(original_message.len());
        &original_message[..end.min(MAX_RETURNED_BYTES)]
    } else {
        original_message
    };
    let content_type = match (headers_only, global) {
        (true, false) => "text/rfc822-headers",
        (true, true) => "message/global-headers",
        (false, false) => "message/rfc822",
        (false, true) => "message/global",
    };
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n"
    );
    let mut bytes = m.into_bytes();
    bytes.extend_from_slice(returned);
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());

    // The report's own headers are ASCII; message/global parts need only 8BITMIME,
    // so SMTPUTF8 is asked of the next hop only for a UTF-8 sender address.
    let smtputf8 = sender.is_utf8();
    Some(Envelope {
        queue_id,
        tenant: original.tenant.clone(),
        mail_from: ReversePath::Null,
        recipients: vec![Recipient {
            address: EmailAddress::clone(sender),
            notify: DsnNotify::NEVER,
            orcpt: None,
        }],
        received_at: SystemTime::now(),
        // The returned message may carry 8-bit text.
        body_type: BodyType::EightBitMime,
        smtputf8,
        dsn_ret: None,
        dsn_envid: None,
        client: None,
        authentication_results: None,
        junk: false,
        arc_set: None,
        dmarc_reject_failure: false,
        trace_context: original.trace_context.clone(),
        body: BodyRef::Inline(Bytes::from(bytes)),
    })
}

/// A value for one line of the report: control characters (CR and LF from a
/// remote reply or a decoded ENVID/ORCPT among them) become spaces, so nothing can
/// start a field of its own.
fn printable(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Whether a diagnostic starts as an SMTP reply: three digits, then a space or end.
fn is_smtp_reply(diagnostic: &str) -> bool {
    let b = diagnostic.as_bytes();
    b.len() >= 3
        && b[..3].iter().all(u8::is_ascii_digit)
        && matches!(b[0], b'2'..=b'5')
        && b.get(3).is_none_or(|c| *c == b' ')
}

fn find_header_end(message: &[u8]) -> Option<usize> {
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    use mailmesh_types::QueueId;

    use super::*;

    fn envelope(from: &str, ret: Option<DsnRet>) -> Envelope {
        Envelope {
            queue_id: QueueId::generate(),
            tenant: "acme".parse().unwrap(),
            mail_from: from.parse().unwrap(),
            recipients: vec![],
            received_at: UNIX_EPOCH + Duration::from_secs(1_795_752_725),
            body_type: BodyType::SevenBit,
            smtputf8: false,
            dsn_ret: ret,
            dsn_envid: Some("ENV-42".into()),
            client: None,
            authentication_results: None,
            junk: false,
            arc_set: None,
            dmarc_reject_failure: false,
            trace_context: BTreeMap::new(),
            body: BodyRef::Inline(Bytes::new()),
        }
    }

    fn failure(address: &str, notify: DsnNotify) -> Failure {
        Failure {
            recipient: Recipient {
                address: address.parse().unwrap(),
                notify,
                orcpt: Some("rfc822;Ghost@acme.test".into()),
            },
            status: "5.1.1".into(),
            diagnostic: "user unknown".into(),
            remote_mta: None,
        }
    }

    const MESSAGE: &[u8] = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nthe body\r\n";

    #[test]
    fn a_failure_report_follows_rfc_3464() {
        let original = envelope("a@example.org", None);
        let dsn = failure_report(
            &original,
            MESSAGE,
            &[failure("ghost@acme.test", DsnNotify::DEFAULT)],
            "mx.acme.test",
        )
        .unwrap();
        assert_eq!(dsn.mail_from, ReversePath::Null, "bounces come from <>");
        assert_eq!(dsn.recipients[0].address.to_string(), "a@example.org");
        assert_eq!(dsn.recipients[0].notify, DsnNotify::NEVER);
        assert_eq!(
            dsn.queue_id,
            original.queue_id.derived("dsn/ghost@acme.test")
        );
        let BodyRef::Inline(body) = &dsn.body else {
            panic!()
        };
        let text = String::from_utf8(body.to_vec()).unwrap();
        for needed in [
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Reporting-MTA: dns; mx.acme.test\r\n",
            "Original-Envelope-Id: ENV-42\r\n",
            "Arrival-Date: Fri, 27 Nov 2026 04:12:05 +0000\r\n",
            "Original-Recipient: rfc822;Ghost@acme.test\r\n",
            "Final-Recipient: rfc822; ghost@acme.test\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            // Not an SMTP reply: a local cause, in its own type.
            "Diagnostic-Code: X-mailmesh; user unknown\r\n",
            "Content-Type: message/rfc822\r\n\r\nSubject: hello",
            "the body\r\n--dsn-",
        ] {
            assert!(text.contains(needed), "missing {needed:?} in\n{text}");
        }
        assert!(text.ends_with("--\r\n"));
    }

    /// RFC 3461: a success notice only for recipients that asked (NOTIFY=SUCCESS; the
    /// default is failures only), with the headers only even under RET=FULL.
    #[test]
    fn success_notices_only_when_asked() {
        let original = envelope("a@example.org", Some(DsnRet::Full));
        let asked = DsnNotify {
            success: true,
            failure: true,
            delay: false,
        };
        let done = |address: &str, notify| Failure {
            status: "2.0.0".into(),
            diagnostic: "250 2.0.0 ok".into(),
            remote_mta: Some("mx.example.net".into()),
            ..failure(address, notify)
        };
        let list = [
            done("yes@acme.test", asked),
            done("no@acme.test", DsnNotify::DEFAULT),
        ];
        let dsn = success_report(&original, MESSAGE, &list, "mx", Success::Relayed).unwrap();
        assert_eq!(dsn.mail_from, ReversePath::Null);
        let BodyRef::Inline(body) = &dsn.body else {
            panic!()
        };
        let text = String::from_utf8(body.to_vec()).unwrap();
        for needed in [
            "Subject: Successful Mail Delivery Report\r\n",
            "Final-Recipient: rfc822; yes@acme.test\r\nAction: relayed\r\nStatus: 2.0.0\r\n",
            "Remote-MTA: dns; mx.example.net\r\n",
            "Diagnostic-Code: smtp; 250 2.0.0 ok\r\n",
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello",
        ] {
            assert!(text.contains(needed), "missing {needed:?} in\n{text}");
        }
        assert!(
            !text.contains("no@acme.test") && !text.contains("the body"),
            "{text}"
        );
        // Nobody asked, or a null sender: no notice.
        assert!(success_report(&original, MESSAGE, &list[1..], "mx", Success::Delivered).is_none());
        let null = envelope("", None);
        assert!(success_report(&null, MESSAGE, &list, "mx", Success::Delivered).is_none());
    }

    #[test]
    fn headers_only_when_asked() {
        let original = envelope("a@example.org", Some(DsnRet::Headers));
        let dsn = failure_report(
            &original,
            MESSAGE,
            &[failure("x@acme.test", DsnNotify::DEFAULT)],
            "mx",
        )
        .unwrap();
        let BodyRef::Inline(body) = &dsn.body else {
            panic!()
        };
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hello"));
        assert!(!text.contains("the body"));
    }

    #[test]
    fn smtputf8_mail_gets_an_internationalized_report() {
        let original = Envelope {
            smtputf8: true,
            ..envelope("bob@example.org", None)
        };
        let report = failure_report(
            &original,
            b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nhi\r\n",
            &[failure("josé@acme.test", DsnNotify::DEFAULT)],
            "mx.acme.test",
        )
        .unwrap();
        assert!(
            !report.smtputf8,
            "an ASCII sender's report needs no SMTPUTF8"
        );
        let BodyRef::Inline(body) = &report.body else {
            panic!("inline");
        };
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains("Content-Type: message/global-delivery-status\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Final-Recipient: utf-8; josé@acme.test\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Type: message/global\r\n"), "{text}");
        assert!(!text.contains("message/rfc822"), "{text}");
    }

    #[test]
    fn no_bounce_to_the_null_sender_or_to_notify_never() {
        let bounce = envelope("", None);
        assert!(
            failure_report(
                &bounce,
                MESSAGE,
                &[failure("x@acme.test", DsnNotify::DEFAULT)],
                "mx"
            )
            .is_none()
        );
        let original = envelope("a@example.org", None);
        assert!(
            failure_report(
                &original,
                MESSAGE,
                &[failure("x@acme.test", DsnNotify::NEVER)],
                "mx"
            )
            .is_none()
        );
    }
}
