//! The Sender Rewriting Scheme for forwarded mail (Shevek's SRS, as libsrs2 and
//! postsrsd write it). A forwarding alias that kept the original envelope sender
//! would send mail for every domain from the platform's addresses, which every
//! hosted domain's SPF authorises: SPF (and DMARC through SPF alignment) would pass
//! for a forged sender. The forwarded copy's sender is rewritten to an address of
//! the forwarding domain that encodes the original one:
//!
//! - `SRS0=HHHHHHHH=TT=orig.domain=orig-local@forwarding.domain`
//! - an SRS0 address forwarded again becomes
//!   `SRS1=HHHHHHHH=first.forwarder==HHHHHHHH=TT=orig.domain=orig-local@forwarding.domain`
//!
//! `HHHHHHHH` is a keyed hash (HMAC-SHA256, 40 bits in base32, so the case a
//! receiver may change does not matter) over the parts and the forwarding domain
//! (an address made for one of our domains is no good at another), and `TT` the day
//! it was made (base32, mod 1024): only addresses this deployment made, and not
//! older than `max_age`, are decoded when a bounce comes back to them; forged or
//! expired ones are refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use mailmesh_types::{Domain, EmailAddress};

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Days the timestamp counts before it wraps.
const DAYS: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    #[error("not an SRS address")]
    NotSrs,
    #[error("malformed SRS address")]
    Malformed,
    #[error("the SRS hash does not match (forged or damaged)")]
    BadHash,
    #[error("the SRS address has expired")]
    Expired,
    #[error("the sender cannot be rewritten (too long, or a malformed SRS address)")]
    Unwritable,
}

/// Rewrites senders and decodes rewritten ones with the deployment's secrets.
pub struct Srs {
    keys: Vec<hmac::Key>,
    max_age_days: u64,
}

impl std::fmt::Debug for Srs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srs")
            .field("max_age_days", &self.max_age_days)
            .finish_non_exhaustive()
    }
}

/// A secret that is not at least 16 bytes of base64.
#[derive(Debug, thiserror::Error)]
#[error("must be at least 16 bytes, base64 (e.g. `openssl rand -base64 32`)")]
pub struct BadSecret;

fn key(secret: &str) -> Result<hmac::Key, BadSecret> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(secret.trim())
        .map_err(|_| BadSecret)?;
    if bytes.len() < 16 {
        return Err(BadSecret);
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

impl Srs {
    /// `secret` makes new addresses; `previous` ones are still accepted (a rotation
    /// in progress). Addresses older than `max_age` are refused.
    pub fn new(secret: &str, previous: &[&str], max_age: Duration) -> Result<Self, BadSecret> {
        let mut keys = vec![key(secret)?];
        for p in previous {
            keys.push(key(p)?);
        }
        Ok(Self {
            keys,
            max_age_days: (max_age.as_secs() / 86_400).clamp(1, DAYS / 2),
        })
    }

    fn hash_with(key: &hmac::Key, parts: &[&str]) -> String {
        let mut input = Vec::new();
        for part in parts {
            input.extend_from_slice(part.to_ascii_lowercase().as_bytes());
            input.push(0);
        }
        let tag = hmac::sign(key, &input);
        // 40 bits, base32: eight characters that survive case changes.
        let bits = tag.as_ref()[..5]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        (0..8)
            .rev()
            .map(|i| BASE32[((bits >> (i * 5)) & 31) as usize] as char)
            .collect()
    }

    fn hash(&self, parts: &[&str]) -> String {
        Self::hash_with(&self.keys[0], parts)
    }

    fn check(&self, hash: &str, parts: &[&str]) -> Result<(), SrsError> {
        let hash = hash.to_ascii_lowercase();
        let matches = |k| {
            aws_lc_rs::constant_time::verify_slices_are_equal(
                Self::hash_with(k, parts).as_bytes(),
                hash.as_bytes(),
            )
            .is_ok()
        };
        if self.keys.iter().any(matches) {
            Ok(())
        } else {
            Err(SrsError::BadHash)
        }
    }

    /// The envelope sender for `sender`'s mail forwarded through `forwarder` (a
    /// local domain); `None` when it needs no rewriting (a sender of that domain).
    /// An error when it cannot be rewritten: the caller must not fall back to the
    /// original sender (that is the SPF laundering SRS exists to stop).
    pub fn forward(
        &self,
        sender: &EmailAddress,
        forwarder: &Domain,
    ) -> Result<Option<EmailAddress>, SrsError> {
        if sender.domain() == forwarder {
            return Ok(None);
        }
        let local = sender.local_part();
        let host = sender.domain().as_str();
        let fwd = forwarder.as_str();
        let rewritten = match srs_tag(local) {
            // Already rewritten once: SRS1 keeps the first forwarder and its tail.
            Some(("SRS0", tail)) => {
                let tail = format!("={tail}");
                format!("SRS1={}={host}={tail}", self.hash(&[host, &tail, fwd]))
            }
            Some(("SRS1", rest)) => {
                // `HHHH=first==tail`: the first forwarder and tail stay as they are.
                let (_, first_and_tail) = rest.split_once('=').ok_or(SrsError::Unwritable)?;
                let (first, tail) = first_and_tail
                    .split_once("==")
                    .ok_or(SrsError::Unwritable)?;
                let tail = format!("={tail}");
                format!("SRS1={}={first}={tail}", self.hash(&[first, &tail, fwd]))
            }
            _ => {
                let stamp = today() % DAYS;
                let tt: String = [stamp / 32, stamp % 32]
                    .iter()
                    .map(|&v| BASE32[v as usize] as char)
                    .collect();
                format!(
                    "SRS0={}={tt}={host}={local}",
                    self.hash(&[&tt, host, local, fwd])
                )
            }
        };
        format!("{rewritten}@{forwarder}")
            .parse()
            .map(Some)
            .map_err(|_| SrsError::Unwritable)
    }

    /// The address a bounce to `address` goes back to: the original sender for an
    /// SRS0 address, the first forwarder's SRS0 address for an SRS1 one.
    pub fn reverse(&self, address: &EmailAddress) -> Result<EmailAddress, SrsError> {
        let (tag, rest) = srs_tag(address.local_part()).ok_or(SrsError::NotSrs)?;
        let fwd = address.domain().as_str();
        let original = if tag == "SRS0" {
            let mut parts = rest.splitn(4, '=');
            let (Some(hash), Some(tt), Some(host), Some(local)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(SrsError::Malformed);
            };
            if tt.len() != 2 || local.is_empty() || host.is_empty() {
                return Err(SrsError::Malformed);
            }
            self.check(hash, &[tt, host, local, fwd])?;
            let stamp = tt.bytes().try_fold(0u64, |acc, c| {
                let v = BASE32
                    .iter()
                    .position(|&b| b == c.to_ascii_lowercase())
                    .ok_or(SrsError::Malformed)?;
                Ok::<_, SrsError>(acc * 32 + v as u64)
            })?;
            let age = (today() % DAYS + DAYS - stamp) % DAYS;
            if age > self.max_age_days {
                return Err(SrsError::Expired);
            }
            format!("{local}@{host}")
        } else {
            let (hash, first_and_tail) = rest.split_once('=').ok_or(SrsError::Malformed)?;
            let (first, tail) = first_and_tail.split_once("==").ok_or(SrsError::Malformed)?;
            let tail = format!("={tail}");
            self.check(hash, &[first, &tail, fwd])?;
            format!("SRS0{tail}@{first}")
        };
        original.parse().map_err(|_| SrsError::Malformed)
    }
}

/// `("SRS0" | "SRS1", the rest after `=`)` when `local` is an SRS local part.
fn srs_tag(local: &str) -> Option<(&'static str, &str)> {
    let head = local.get(..5)?;
    let rest = &local[5..];
    if head.eq_ignore_ascii_case("SRS0=") {
        Some(("SRS0", rest))
    } else if head.eq_ignore_ascii_case("SRS1=") {
        Some(("SRS1", rest))
    } else {
        None
    }
}

/// Whether `address` looks like an SRS address (decoding says whether it is ours).
pub fn is_srs(address: &EmailAddress) -> bool {
    srs_tag(address.local_part()).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "c2Vuc2libGUgc3JzIHNlY3JldCBmb3IgdGVzdHM=";

    fn a(s: &str) -> EmailAddress {
        s.parse().unwrap()
    }

    fn srs() -> Srs {
        Srs::new(SECRET, &[], Duration::from_secs(21 * 86_400)).unwrap()
    }

    #[test]
    fn forwarded_senders_are_rewritten_and_come_back() {
        let srs = srs();
        let forwarder: Domain = "evil.test".parse().unwrap();
        let ceo = a("ceo@corp.test");
        let rewritten = srs.forward(&ceo, &forwarder).unwrap().unwrap();
        assert_eq!(rewritten.domain(), &forwarder);
        assert!(rewritten.local_part().starts_with("SRS0="), "{rewritten}");
        assert!(rewritten.local_part().ends_with("=corp.test=ceo"));
        assert_eq!(srs.reverse(&rewritten), Ok(ceo.clone()));
        // A receiver that changes case changes nothing.
        let shouted = a(&rewritten.to_string().to_uppercase());
        assert_eq!(
            srs.reverse(&shouted).unwrap().to_string().to_lowercase(),
            "ceo@corp.test"
        );
        // Forwarded again by another of our domains: SRS1 back to the first forwarder.
        let second: Domain = "relay.test".parse().unwrap();
        let twice = srs.forward(&rewritten, &second).unwrap().unwrap();
        assert!(twice.local_part().starts_with("SRS1="), "{twice}");
        assert_eq!(srs.reverse(&twice), Ok(rewritten.clone()));
        // A third time it stays SRS1 with the first forwarder.
        let thrice = srs
            .forward(&twice, &"third.test".parse().unwrap())
            .unwrap()
            .unwrap();
        assert!(thrice.local_part().starts_with("SRS1="));
        assert_eq!(srs.reverse(&thrice), Ok(rewritten));
        // Senders of the forwarding domain itself need nothing.
        assert_eq!(srs.forward(&a("x@evil.test"), &forwarder), Ok(None));
        // A malformed SRS1 sender or one too long to rewrite is an error, never
        // the original sender again.
        assert_eq!(
            srs.forward(&a("SRS1=x@hosted.test"), &forwarder),
            Err(SrsError::Unwritable)
        );
        let long = a(&format!("{}@corp.test", "l".repeat(190)));
        assert_eq!(srs.forward(&long, &forwarder), Err(SrsError::Unwritable));
    }

    #[test]
    fn forged_and_expired_addresses_are_refused() {
        let srs = srs();
        let forwarder: Domain = "evil.test".parse().unwrap();
        let rewritten = srs
            .forward(&a("ceo@corp.test"), &forwarder)
            .unwrap()
            .unwrap();
        // The same address at another of our domains.
        let moved = a(&rewritten.to_string().replace("@evil.test", "@good.test"));
        assert_eq!(srs.reverse(&moved), Err(SrsError::BadHash));
        // Another target for the bounce, with the same hash.
        let forged = a(&rewritten
            .to_string()
            .replace("=corp.test=ceo", "=victim.test=ceo"));
        assert_eq!(srs.reverse(&forged), Err(SrsError::BadHash));
        // Another secret's address.
        let other = Srs::new(
            "YW5vdGhlciBzZWNyZXQgZm9yIHRlc3Rz",
            &[],
            Duration::from_secs(86_400 * 21),
        )
        .unwrap();
        assert_eq!(other.reverse(&rewritten), Err(SrsError::BadHash));
        // Until a rotation keeps the old one.
        let rotating = Srs::new(
            "YW5vdGhlciBzZWNyZXQgZm9yIHRlc3Rz",
            &[SECRET],
            Duration::from_secs(86_400 * 21),
        )
        .unwrap();
        assert!(rotating.reverse(&rewritten).is_ok());
        // An address made 30 days ago (its hash valid for that day) has expired.
        let stamp = (today() + DAYS - 30) % DAYS;
        let tt: String = [stamp / 32, stamp % 32]
            .iter()
            .map(|&v| BASE32[v as usize] as char)
            .collect();
        let old = a(&format!(
            "SRS0={}={tt}=corp.test=ceo@evil.test",
            srs.hash(&[&tt, "corp.test", "ceo", "evil.test"])
        ));
        assert_eq!(srs.reverse(&old), Err(SrsError::Expired));
        assert_eq!(srs.reverse(&a("ceo@corp.test")), Err(SrsError::NotSrs));
        assert_eq!(
            srs.reverse(&a("SRS0=broken@evil.test")),
            Err(SrsError::Malformed)
        );
        assert!(Srs::new("c2hvcnQ=", &[], Duration::ZERO).is_err());
    }
}

/// `[smtp.srs]` / `[worker.srs]`: the same in smtp-ingress (which takes bounces to
/// rewritten addresses back) and the delivery worker (which rewrites).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrsConfig {
    /// At least 16 bytes, base64 (`openssl rand -base64 32`).
    pub secret: mailmesh_kit::Secret<String>,
    /// Earlier secrets whose addresses are still taken back (a rotation).
    #[serde(default)]
    pub previous_secrets: Vec<mailmesh_kit::Secret<String>>,
    /// How long a rewritten address takes bounces (RFC-less convention: 21 days).
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

fn default_max_age() -> Duration {
    Duration::from_secs(21 * 86_400)
}

impl SrsConfig {
    pub fn build(&self) -> Result<Srs, BadSecret> {
        let previous: Vec<&str> = self
            .previous_secrets
            .iter()
            .map(|s| s.expose().as_str())
            .collect();
        Srs::new(self.secret.expose(), &previous, self.max_age)
    }
}
