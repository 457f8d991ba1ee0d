//! A wrapper for credentials whose `Debug` and `Display` never print the value.

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself; call it only where the secret is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

/// 32 random bytes from the system's source, base64: a fresh key for the secrets
/// that take one (`openssl rand -base64 32` does the same).
pub fn random_base64() -> String {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The secret kept in `path`, made (and kept, owner-readable only) on first use.
pub fn ensure_secret_file(path: &std::path::Path) -> std::io::Result<Secret<String>> {
    if let Ok(existing) = std::fs::read_to_string(path)
        && !existing.trim().is_empty()
    {
        return Ok(Secret::new(existing.trim().to_owned()));
    }
    let fresh = random_base64();
    crate::tls::write_private(path, fresh.as_bytes())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Secret::new(fresh))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2".to_string());
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
