use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use crate::{EmailAddress, InvalidValue, QueueId, ReversePath, TenantId};

/// RFC 3461 `NOTIFY`: when the sender wants a delivery status notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DsnNotify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl DsnNotify {
    /// `NOTIFY=NEVER`.
    pub const NEVER: Self = Self {
        success: false,
        failure: false,
        delay: false,
    };
    /// What RFC 3461 §4.1 lets an MTA assume when `NOTIFY` is absent.
    pub const DEFAULT: Self = Self {
        success: false,
        failure: true,
        delay: true,
    };
}

/// RFC 3461 `RET`: how much of the message a failure DSN returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnRet {
    Full,
    Headers,
}

/// The body type the client declared (RFC 6152 8BITMIME, RFC 3030 BINARYMIME).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// One envelope recipient with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: EmailAddress,
    pub notify: DsnNotify,
    /// RFC 3461 `ORCPT`, kept as received (`addr-type;xtext`).
    pub orcpt: Option<String>,
}

impl Recipient {
    pub fn new(address: EmailAddress) -> Self {
        Self {
            address,
            notify: DsnNotify::DEFAULT,
            orcpt: None,
        }
    }
}

/// Where the message content lives. Small bodies travel inside the queue record; large
/// ones are written to object storage first and the record points at them, so a queue
/// record stays small and a `250` still means the content is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRef {
    Inline(bytes::Bytes),
    Object {
        key: String,
        size: u64,
        /// The claim through which this record holds a shared object (the delivery
        /// worker's `bodies`); `None` for the record the object was written for.
        claim: Option<String>,
    },
}

impl BodyRef {
    pub fn size(&self) -> u64 {
        match self {
            Self::Inline(b) => b.len() as u64,
            Self::Object { size, .. } => *size,
        }
    }
}

/// The SMTP client the message came from, for trace headers and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub helo: String,
    pub tls: bool,
    /// The authenticated submission user, if any.
    pub authenticated_as: Option<EmailAddress>,
}

/// Bounds an envelope must keep; configurable by the services that build envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeLimits {
    pub max_recipients: usize,
    pub max_envid_len: usize,
    pub max_trace_entries: usize,
}

impl Default for EnvelopeLimits {
    fn default() -> Self {
        Self {
            // RFC 5321 §4.5.3.1.8 requires accepting at least 100.
            max_recipients: 1000,
            // RFC 3461 §4.4.
            max_envid_len: 100,
            max_trace_entries: 16,
        }
    }
}

/// A message accepted for delivery: what the queue carries from the front doors to the
/// delivery workers. One envelope belongs to one tenant; a front door splits a message
/// addressed to several tenants into one envelope per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub queue_id: QueueId,
    pub tenant: TenantId,
    pub mail_from: ReversePath,
    pub recipients: Vec<Recipient>,
    pub received_at: SystemTime,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    pub client: Option<ClientInfo>,
    /// The RFC 8601 `Authentication-Results` header value auth-check produced.
    pub authentication_results: Option<String>,
    /// The recipient tenant's policy files this message in the Junk mailbox.
    pub junk: bool,
    /// The ARC set auth-check made (headers, folded, CRLF) for copies forwarded to
    /// other domains.
    pub arc_set: Option<String>,
    /// The message failed DMARC where its author domain asks for reject (its
    /// tenant took it anyway): it is never forwarded to other domains.
    pub dmarc_reject_failure: bool,
    /// W3C trace context (`traceparent`, `tracestate`) of the span that accepted it.
    pub trace_context: BTreeMap<String, String>,
    pub body: BodyRef,
}

impl Envelope {
    /// The trace context as queue record headers, so a consumer can continue the
    /// message's trace before it decodes the record.
    pub fn trace_headers(&self) -> Vec<(String, bytes::Bytes)> {
        self.trace_context
            .iter()
            .map(|(k, v)| (k.clone(), bytes::Bytes::from(v.clone())))
            .collect()
    }

    /// Checks the invariants a decoded record must keep before anyone acts on it.
    pub fn validate(&self, limits: &EnvelopeLimits) -> Result<(), InvalidValue> {
        if self.recipients.is_empty() {
            return Err(InvalidValue::Envelope("no recipients"));
        }
        if self.recipients.len() > limits.max_recipients {
            return Err(InvalidValue::Envelope("too many recipients"));
        }
        if let Some(envid) = &self.dsn_envid
            && (envid.len() > limits.max_envid_len || envid.chars().any(char::is_control))
        {
            return Err(InvalidValue::Envelope("invalid dsn envid"));
        }
        if self.trace_context.len() > limits.max_trace_entries {
            return Err(InvalidValue::Envelope("too many trace context entries"));
        }
        let needs_utf8 = self.mail_from.address().is_some_and(EmailAddress::is_utf8)
            || self.recipients.iter().any(|r| r.address.is_utf8());
        if needs_utf8 && !self.smtputf8 {
            return Err(InvalidValue::Envelope("utf-8 addresses without smtputf8"));
        }
        if let BodyRef::Object { key, .. } = &self.body
            && !key.starts_with(&format!("t/{}/", self.tenant))
        {
            return Err(InvalidValue::Envelope(
                "body object key outside the envelope's tenant",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            queue_id: QueueId::generate(),
            tenant: "acme".parse().unwrap(),
            mail_from: "a@example.org".parse().unwrap(),
            recipients: vec![Recipient::new("b@acme.test".parse().unwrap())],
            received_at: SystemTime::now(),
            body_type: BodyType::EightBitMime,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            client: None,
            authentication_results: None,
            junk: false,
            arc_set: None,
            dmarc_reject_failure: false,
            trace_context: BTreeMap::new(),
            body: BodyRef::Inline(bytes::Bytes::from_static(b"Subject: hi\r\n\r\nhello\r\n")),
        }
    }

    #[test]
    fn valid_envelope() {
        envelope().validate(&EnvelopeLimits::default()).unwrap();
    }

    #[test]
    fn invariants() {
        let limits = EnvelopeLimits::default();
        let mut e = envelope();
        e.recipients.clear();
        assert_eq!(
            e.validate(&limits),
            Err(InvalidValue::Envelope("no recipients"))
        );

        let mut e = envelope();
        e.recipients = vec![Recipient::new("用户@acme.test".parse().unwrap())];
        assert!(e.validate(&limits).is_err());
        e.smtputf8 = true;
        assert!(e.validate(&limits).is_ok());

        let mut e = envelope();
        e.body = BodyRef::Object {
            key: "t/other/bodies/x".into(),
            size: 10,
            claim: None,
        };
        assert!(e.validate(&limits).is_err());

        let mut e = envelope();
        e.recipients = (0..1001)
            .map(|i| Recipient::new(format!("u{i}@acme.test").parse().unwrap()))
            .collect();
        assert_eq!(
            e.validate(&limits),
            Err(InvalidValue::Envelope("too many recipients"))
        );
    }
}
