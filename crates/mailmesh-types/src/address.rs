use std::fmt;
use std::str::FromStr;

use crate::InvalidValue;

/// A domain name, lowercased. ASCII labels follow RFC 5321 `Domain` (letters, digits,
/// hyphens, no leading or trailing hyphen); non-ASCII labels (RFC 6531, SMTPUTF8) are
/// accepted as UTF-8 and lowercased, since mail systems compare domains without case.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Domain(String);

impl Domain {
    /// RFC 5321 §4.5.3.1.2.
    pub const MAX_LEN: usize = 255;
    const MAX_LABEL_LEN: usize = 63;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Domain {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(InvalidValue::Domain("empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidValue::Domain("longer than 255 octets"));
        }
        for label in s.split('.') {
            if label.is_empty() {
                return Err(InvalidValue::Domain("empty label"));
            }
            if label.len() > Self::MAX_LABEL_LEN {
                return Err(InvalidValue::Domain("label longer than 63 octets"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(InvalidValue::Domain("label starts or ends with '-'"));
            }
            if !label.chars().all(|c| {
                c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && !c.is_control())
            }) {
                return Err(InvalidValue::Domain("invalid character"));
            }
        }
        Ok(Self(s.to_lowercase()))
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mailbox address `local-part@domain` as it appears in an SMTP path.
///
/// The local part is kept as sent (it is case-sensitive by RFC 5321, even if mailmesh's
/// directory compares it without case); quoted local parts keep their quotes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EmailAddress {
    local: String,
    domain: Domain,
}

impl EmailAddress {
    /// RFC 5321 §4.5.3.1.1 names 64 octets, and §4.5.3.1 asks to accept longer where
    /// possible: SRS addresses (forwarded mail's senders, and the bounces that come
    /// back to them) often run past 64, so up to 200 are taken.
    pub const MAX_LOCAL_LEN: usize = 200;
    /// RFC 5321 §4.5.3.1.3 (path of 256 octets including the angle brackets).
    pub const MAX_LEN: usize = 254;

    pub fn local_part(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Whether the address needs SMTPUTF8 to be carried (RFC 6531).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.as_str().is_ascii()
    }
}

impl FromStr for EmailAddress {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > Self::MAX_LEN {
            return Err(InvalidValue::Address("longer than 254 octets"));
        }
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or(InvalidValue::Address("missing '@'"))?;
        if local.is_empty() {
            return Err(InvalidValue::Address("empty local part"));
        }
        if local.len() > Self::MAX_LOCAL_LEN {
            return Err(InvalidValue::Address("local part longer than 200 octets"));
        }
        let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
        if local
            .chars()
            .any(|c| c.is_control() || (!quoted && c == ' '))
        {
            return Err(InvalidValue::Address("invalid character in local part"));
        }
        if domain.starts_with('[') {
            return Err(InvalidValue::Address("address literals are not accepted"));
        }
        let domain = domain
            .parse::<Domain>()
            .map_err(|_| InvalidValue::Address("invalid domain"))?;
        Ok(Self {
            local: local.to_owned(),
            domain,
        })
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The SMTP reverse-path: an address, or the null sender `<>` used by bounces, which
/// must never receive a bounce itself (RFC 5321 §4.5.5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    Null,
    Address(EmailAddress),
}

impl ReversePath {
    pub fn address(&self) -> Option<&EmailAddress> {
        match self {
            Self::Null => None,
            Self::Address(a) => Some(a),
        }
    }
}

impl FromStr for ReversePath {
    type Err = InvalidValue;

    /// The empty string is the null sender.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            Ok(Self::Null)
        } else {
            s.parse().map(Self::Address)
        }
    }
}

impl fmt::Display for ReversePath {
    /// The path without angle brackets; empty for the null sender.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => Ok(()),
            Self::Address(a) => a.fmt(f),
        }
    }
}

/// Serialises as the text form and deserialises through `FromStr`, so a stored or
/// transmitted value is validated again when it is read.
macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

pub(crate) use serde_as_string;

serde_as_string!(Domain, EmailAddress, ReversePath);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_lowercased_and_checked() {
        assert_eq!(
            "Example.COM.".parse::<Domain>().unwrap().as_str(),
            "example.com"
        );
        assert_eq!("Bücher.de".parse::<Domain>().unwrap().as_str(), "bücher.de");
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b.c",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<Domain>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn addresses() {
        let a: EmailAddress = "John.Doe@Example.org".parse().unwrap();
        assert_eq!(a.local_part(), "John.Doe");
        assert_eq!(a.domain().as_str(), "example.org");
        assert_eq!(a.to_string(), "John.Doe@example.org");
        assert!(!a.is_utf8());
        assert!("用户@例子.广告".parse::<EmailAddress>().unwrap().is_utf8());
        assert!("\"john doe\"@example.org".parse::<EmailAddress>().is_ok());
        for bad in [
            "nobody",
            "@example.org",
            "a b@example.org",
            "a@",
            "a@[127.0.0.1]",
            "a\0@example.org",
            &format!("{}@example.org", "a".repeat(201)),
        ] {
            assert!(bad.parse::<EmailAddress>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn null_reverse_path() {
        assert_eq!("".parse::<ReversePath>().unwrap(), ReversePath::Null);
        assert_eq!(ReversePath::Null.to_string(), "");
        assert!("a@b.c".parse::<ReversePath>().unwrap().address().is_some());
    }
}
