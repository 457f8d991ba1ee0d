use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use mailmesh_types::{
    BodyRef, BodyType, ClientInfo, DsnNotify, DsnRet, Envelope, EnvelopeLimits, InvalidValue,
    Recipient,
};
use prost::Message;

use crate::v1;

/// A queue record that cannot be acted on. A consumer that sees one must not retry it
/// forever: it is parked (dead-lettered) and reported.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRecord {
    #[error("queue record does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("queue record field {field}: {source}")]
    Field {
        field: &'static str,
        source: InvalidValue,
    },
    #[error("queue record field {0} is missing")]
    Missing(&'static str),
    #[error("queue record field {0} is out of range")]
    OutOfRange(&'static str),
    #[error("queue record rejected: {0}")]
    Envelope(InvalidValue),
}

fn field<T: std::str::FromStr<Err = InvalidValue>>(
    name: &'static str,
    value: &str,
) -> Result<T, InvalidRecord> {
    value.parse().map_err(|source| InvalidRecord::Field {
        field: name,
        source,
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl TryFrom<v1::Recipient> for Recipient {
    type Error = InvalidRecord;

    fn try_from(r: v1::Recipient) -> Result<Self, Self::Error> {
        let notify = if r.notify_never {
            DsnNotify::NEVER
        } else if r.notify_success || r.notify_failure || r.notify_delay {
            DsnNotify {
                success: r.notify_success,
                failure: r.notify_failure,
                delay: r.notify_delay,
            }
        } else {
            DsnNotify::DEFAULT
        };
        Ok(Self {
            address: field("recipients.address", &r.address)?,
            notify,
            orcpt: non_empty(r.orcpt),
        })
    }
}

impl From<&Recipient> for v1::Recipient {
    fn from(r: &Recipient) -> Self {
        let never = r.notify == DsnNotify::NEVER;
        Self {
            address: r.address.to_string(),
            notify_success: r.notify.success,
            notify_failure: r.notify.failure,
            notify_delay: r.notify.delay,
            notify_never: never,
            orcpt: r.orcpt.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::ClientInfo> for ClientInfo {
    type Error = InvalidRecord;

    fn try_from(c: v1::ClientInfo) -> Result<Self, Self::Error> {
        let ip: IpAddr =
            c.ip.parse()
                .map_err(|_| InvalidRecord::OutOfRange("client.ip"))?;
        let authenticated_as = match c.authenticated_as.as_str() {
            "" => None,
            a => Some(field("client.authenticated_as", a)?),
        };
        Ok(Self {
            ip,
            helo: c.helo,
            tls: c.tls,
            authenticated_as,
        })
    }
}

impl TryFrom<v1::QueueRecord> for Envelope {
    type Error = InvalidRecord;

    fn try_from(r: v1::QueueRecord) -> Result<Self, Self::Error> {
        let received_at = u64::try_from(r.received_at_ms)
            .ok()
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            .ok_or(InvalidRecord::OutOfRange("received_at_ms"))?;
        let body_type = match v1::BodyType::try_from(r.body_type) {
            Ok(v1::BodyType::Unspecified | v1::BodyType::SevenBit) => BodyType::SevenBit,
            Ok(v1::BodyType::EightBitMime) => BodyType::EightBitMime,
            Ok(v1::BodyType::BinaryMime) => BodyType::BinaryMime,
            Err(_) => return Err(InvalidRecord::OutOfRange("body_type")),
        };
        let dsn_ret = match v1::DsnRet::try_from(r.dsn_ret) {
            Ok(v1::DsnRet::Unspecified) => None,
            Ok(v1::DsnRet::Full) => Some(DsnRet::Full),
            Ok(v1::DsnRet::Hdrs) => Some(DsnRet::Headers),
            Err(_) => return Err(InvalidRecord::OutOfRange("dsn_ret")),
        };
        let body = match r.body.and_then(|b| b.location) {
            Some(v1::body::Location::Inline(bytes)) => BodyRef::Inline(bytes),
            Some(v1::body::Location::Object(o)) => BodyRef::Object {
                key: o.key,
                size: o.size,
                claim: (!o.claim.is_empty()).then_some(o.claim),
            },
            None => return Err(InvalidRecord::Missing("body")),
        };
        let envelope = Envelope {
            queue_id: field("queue_id", &r.queue_id)?,
            tenant: field("tenant", &r.tenant)?,
            mail_from: field("mail_from", &r.mail_from)?,
            recipients: r
                .recipients
                .into_iter()
                .map(Recipient::try_from)
                .collect::<Result<_, _>>()?,
            received_at,
            body_type,
            smtputf8: r.smtputf8,
            dsn_ret,
            dsn_envid: non_empty(r.dsn_envid),
            client: r.client.map(ClientInfo::try_from).transpose()?,
            authentication_results: non_empty(r.authentication_results),
            junk: r.junk,
            arc_set: non_empty(r.arc_set),
            dmarc_reject_failure: r.dmarc_reject_failure,
            trace_context: r.trace_context.into_iter().collect(),
            body,
        };
        Ok(envelope)
    }
}

impl From<&Envelope> for v1::QueueRecord {
    fn from(e: &Envelope) -> Self {
        let received_at_ms = e
            .received_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            queue_id: e.queue_id.to_string(),
            tenant: e.tenant.to_string(),
            mail_from: e.mail_from.to_string(),
            recipients: e.recipients.iter().map(v1::Recipient::from).collect(),
            received_at_ms,
            body_type: match e.body_type {
                BodyType::SevenBit => v1::BodyType::SevenBit,
                BodyType::EightBitMime => v1::BodyType::EightBitMime,
                BodyType::BinaryMime => v1::BodyType::BinaryMime,
            } as i32,
            smtputf8: e.smtputf8,
            dsn_ret: match e.dsn_ret {
                None => v1::DsnRet::Unspecified,
                Some(DsnRet::Full) => v1::DsnRet::Full,
                Some(DsnRet::Headers) => v1::DsnRet::Hdrs,
            } as i32,
            dsn_envid: e.dsn_envid.clone().unwrap_or_default(),
            client: e.client.as_ref().map(|c| v1::ClientInfo {
                ip: c.ip.to_string(),
                helo: c.helo.clone(),
                tls: c.tls,
                authenticated_as: c
                    .authenticated_as
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            }),
            authentication_results: e.authentication_results.clone().unwrap_or_default(),
            junk: e.junk,
            arc_set: e.arc_set.clone().unwrap_or_default(),
            dmarc_reject_failure: e.dmarc_reject_failure,
            trace_context: e.trace_context.clone().into_iter().collect(),
            body: Some(v1::Body {
                location: Some(match &e.body {
                    BodyRef::Inline(b) => v1::body::Location::Inline(b.clone()),
                    BodyRef::Object { key, size, claim } => {
                        v1::body::Location::Object(v1::ObjectRef {
                            key: key.clone(),
                            size: *size,
                            claim: claim.clone().unwrap_or_default(),
                        })
                    }
                }),
            }),
        }
    }
}

/// Serialises an envelope into a queue record payload.
pub fn encode_envelope(envelope: &Envelope) -> Vec<u8> {
    v1::QueueRecord::from(envelope).encode_to_vec()
}

/// Decodes and validates a queue record payload.
pub fn decode_envelope(payload: &[u8], limits: &EnvelopeLimits) -> Result<Envelope, InvalidRecord> {
    let record = v1::QueueRecord::decode(payload)?;
    let envelope = Envelope::try_from(record)?;
    envelope.validate(limits).map_err(InvalidRecord::Envelope)?;
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use mailmesh_types::QueueId;

    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            queue_id: QueueId::generate(),
            tenant: "acme".parse().unwrap(),
            mail_from: "sender@example.org".parse().unwrap(),
            recipients: vec![
                Recipient::new("alice@acme.test".parse().unwrap()),
                Recipient {
                    address: "bob@acme.test".parse().unwrap(),
                    notify: DsnNotify::NEVER,
                    orcpt: Some("rfc822;bob@acme.test".into()),
                },
            ],
            // Millisecond precision survives the round trip.
            received_at: UNIX_EPOCH + Duration::from_millis(1_780_000_000_123),
            body_type: BodyType::EightBitMime,
            smtputf8: false,
            dsn_ret: Some(DsnRet::Headers),
            dsn_envid: Some("QQ314159".into()),
            client: Some(ClientInfo {
                ip: "2001:db8::1".parse().unwrap(),
                helo: "mx.example.org".into(),
                tls: true,
                authenticated_as: None,
            }),
            authentication_results: Some("mx.acme.test; spf=pass".into()),
            junk: true,
            arc_set: Some(
                "ARC-Seal: i=1; a=ed25519-sha256; cv=none; d=mx.test; s=a; b=x\r\n".into(),
            ),
            dmarc_reject_failure: true,
            trace_context: BTreeMap::from([(
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            )]),
            body: BodyRef::Inline(Bytes::from_static(b"Subject: t\r\n\r\nhi\r\n")),
        }
    }

    #[test]
    fn round_trip() {
        let limits = EnvelopeLimits::default();
        let e = envelope();
        assert_eq!(decode_envelope(&encode_envelope(&e), &limits).unwrap(), e);

        let mut e = envelope();
        e.mail_from = "".parse().unwrap();
        e.body = BodyRef::Object {
            key: "t/acme/bodies/x".into(),
            size: 30_000_000,
            claim: None,
        };
        assert_eq!(decode_envelope(&encode_envelope(&e), &limits).unwrap(), e);
        e.body = BodyRef::Object {
            key: "t/acme/bodies/x".into(),
            size: 30_000_000,
            claim: Some("3f2a9c0d1e4b5a67".into()),
        };
        assert_eq!(decode_envelope(&encode_envelope(&e), &limits).unwrap(), e);
    }

    #[test]
    fn invalid_records_name_the_field() {
        let limits = EnvelopeLimits::default();
        let mut r = v1::QueueRecord::from(&envelope());
        r.tenant = "../other".into();
        let err = decode_envelope(&r.encode_to_vec(), &limits).unwrap_err();
        assert!(err.to_string().contains("field tenant"), "{err}");

        let mut r = v1::QueueRecord::from(&envelope());
        r.body = None;
        assert!(matches!(
            decode_envelope(&r.encode_to_vec(), &limits),
            Err(InvalidRecord::Missing("body"))
        ));

        let mut r = v1::QueueRecord::from(&envelope());
        r.recipients.clear();
        assert!(matches!(
            decode_envelope(&r.encode_to_vec(), &limits),
            Err(InvalidRecord::Envelope(_))
        ));

        assert!(matches!(
            decode_envelope(b"\xff\xff\xff", &limits),
            Err(InvalidRecord::Decode(_))
        ));
    }
}
