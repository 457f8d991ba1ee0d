//! DKIM private keys sealed at rest: AES-256-GCM under a key from the deployment's
//! secrets (`storage.dkim_key_secret`), so the directory log, its snapshots and their
//! backups in the bucket hold no usable signing key. The key's DNS name is bound in
//! as associated data (a sealed key cannot be moved to another selector or domain).
//! Keys stored before a secret was configured stay readable as they are.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

const PREFIX: &str = "sealed:v1:";

pub struct Seal {
    key: LessSafeKey,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(<key>)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("dkim_key_secret must be 32 bytes, base64 (e.g. `openssl rand -base64 32`)")]
    BadSecret,
    #[error("the DKIM key is sealed and no dkim_key_secret is configured")]
    NoSecret,
    #[error("the DKIM key cannot be opened (another dkim_key_secret, or damaged)")]
    Damaged,
}

impl Seal {
    /// From the base64 secret (32 bytes).
    pub fn new(secret: &str) -> Result<Self, SealError> {
        let bytes = STANDARD
            .decode(secret.trim())
            .map_err(|_| SealError::BadSecret)?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SealError::BadSecret)?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// `plain` sealed for `name`, as stored.
    pub fn seal(&self, plain: &[u8], name: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .expect("AES-GCM sealing of a small input");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }
}

/// The key bytes of a stored value: opened with `seal` when sealed, decoded when
/// stored plain (base64).
pub fn open(stored: &str, name: &str, seal: Option<&Seal>) -> Result<Vec<u8>, SealError> {
    let Some(sealed) = stored.strip_prefix(PREFIX) else {
        return STANDARD.decode(stored).map_err(|_| SealError::Damaged);
    };
    let seal = seal.ok_or(SealError::NoSecret)?;
    let data = STANDARD.decode(sealed).map_err(|_| SealError::Damaged)?;
    if data.len() < NONCE_LEN {
        return Err(SealError::Damaged);
    }
    let (nonce, sealed) = data.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Damaged)?;
    let mut sealed = sealed.to_vec();
    let plain = seal
        .key
        .open_in_place(nonce, Aad::from(name.as_bytes()), &mut sealed)
        .map_err(|_| SealError::Damaged)?;
    Ok(plain.to_vec())
}

/// Whether a stored value is sealed.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes

    #[test]
    fn sealed_keys_open_only_with_their_secret_and_name() {
        let seal = Seal::new(SECRET).unwrap();
        let stored = seal.seal(b"pkcs8 bytes", "s1._domainkey.acme.test");
        assert!(is_sealed(&stored));
        assert!(!stored.contains(&STANDARD.encode(b"pkcs8 bytes")));
        assert_eq!(
            open(&stored, "s1._domainkey.acme.test", Some(&seal)).unwrap(),
            b"pkcs8 bytes"
        );
        // Another name, another secret, no secret, a damaged value.
        assert_eq!(
            open(&stored, "s2._domainkey.acme.test", Some(&seal)),
            Err(SealError::Damaged)
        );
        let other = Seal::new(&STANDARD.encode([7u8; 32])).unwrap();
        assert_eq!(
            open(&stored, "s1._domainkey.acme.test", Some(&other)),
            Err(SealError::Damaged)
        );
        assert_eq!(
            open(&stored, "s1._domainkey.acme.test", None),
            Err(SealError::NoSecret)
        );
        assert_eq!(
            open("sealed:v1:AAAA", "x", Some(&seal)),
            Err(SealError::Damaged)
        );
        // Keys stored plain (before a secret was set) still read.
        let plain = STANDARD.encode(b"old key");
        assert_eq!(open(&plain, "x", None).unwrap(), b"old key");
        assert_eq!(open(&plain, "x", Some(&seal)).unwrap(), b"old key");
        // Secrets of the wrong size are refused.
        assert_eq!(
            Seal::new(&STANDARD.encode([1u8; 16])).unwrap_err(),
            SealError::BadSecret
        );
        assert_eq!(Seal::new("not base64!").unwrap_err(), SealError::BadSecret);
    }
}
