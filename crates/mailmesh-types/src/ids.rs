use std::fmt;
use std::str::FromStr;

use crate::InvalidValue;

/// A tenant's identifier: 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a
/// letter or digit. It appears in object keys, Kafka keys, Redis keys and metric labels,
/// so it is restricted to what is safe in all of them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(String);

impl TenantId {
    pub const MAX_LEN: usize = 63;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TenantId {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(InvalidValue::TenantId("empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidValue::TenantId("longer than 63 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(InvalidValue::TenantId(
                "only lowercase letters, digits and '-' are allowed",
            ));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(InvalidValue::TenantId("must not start or end with '-'"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identifier a message gets when it is accepted, quoted in the `250` reply and in
/// trace headers. A UUIDv7, so ids sort by acceptance time, written as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(uuid::Uuid);

impl QueueId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// A queue id that is always the same for this message and `purpose` (a bounce,
    /// a forward): redoing the work after a crash yields the same id, so the copy is
    /// deduplicated downstream instead of sent twice.
    pub fn derived(&self, purpose: &str) -> Self {
        let mut name = self.0.as_bytes().to_vec();
        name.extend_from_slice(purpose.as_bytes());
        Self(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &name))
    }
}

impl FromStr for QueueId {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidValue::QueueId("expected 32 hex digits"));
        }
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| InvalidValue::QueueId("expected 32 hex digits"))
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

crate::address::serde_as_string!(TenantId, QueueId);

/// FNV-1a, 64 bits: a hash that is the same in every process and version, for
/// placing keys (mailbox partitions) and naming things (queue-body claims) that
/// other processes must name the same way. Not for anything an attacker must not
/// steer.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users are placed in mailbox partitions by it: it must never change.
    #[test]
    fn fnv1a_is_the_published_function() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn tenant_ids() {
        for ok in ["acme", "a", "acme-mail-2", &"a".repeat(63)] {
            assert_eq!(ok.parse::<TenantId>().unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "Acme",
            "-acme",
            "acme-",
            "ac/me",
            "ac..me",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<TenantId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn queue_ids_round_trip_and_sort_by_time() {
        let a = QueueId::generate();
        let b = QueueId::generate();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<QueueId>().unwrap(), a);
        assert_eq!(a.to_string().len(), 32);
        assert!("../etc/passwd".parse::<QueueId>().is_err());
        assert_eq!(a.derived("dsn"), a.derived("dsn"));
        assert_ne!(a.derived("dsn"), a.derived("forward"));
        assert_ne!(a.derived("dsn"), b.derived("dsn"));
        assert!(
            "0192f0c0-1234-7abc-8def-0123456789ab"
                .parse::<QueueId>()
                .is_err()
        );
    }
}
