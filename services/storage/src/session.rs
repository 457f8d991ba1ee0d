//! Session tokens (ADR 0006): proof that a user logged in through a front door.
//!
//! `Authenticate` answers a right password with a token bound to the user (tenant
//! and id), the role of the front door that asked and an expiry, under an
//! HMAC-SHA256 key every storage replica shares (`storage.session_secret`). Calls a
//! front door makes for a user must carry that user's token, so a compromised
//! gateway reaches only the users who log in through it while it is compromised,
//! never every tenant's mail. Tokens are short-lived and renewed by
//! `RefreshSession`, which also sees a disabled or removed user and ends there.
//!
//! Wire form: `v1.<expires_ms>.<mac>` with the MAC, base64url, over the tenant, the
//! user id, the role and the expiry.

use std::time::Duration;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use mailmesh_kit::internal::Role;

use crate::engine::UserRef;

/// Why a token does not open a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no session token")]
    Missing,
    #[error("malformed session token")]
    Malformed,
    #[error("the session token is not valid for this user")]
    Invalid,
    #[error("the session has expired")]
    Expired,
}

/// The keys that make and check tokens.
pub struct SessionKeys {
    current: hmac::Key,
    /// Still accepted (a rotation in progress), never used to make tokens.
    previous: Option<hmac::Key>,
    ttl: Duration,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A secret that is not 32 bytes of base64.
#[derive(Debug, thiserror::Error)]
#[error("must be 32 bytes, base64 (e.g. `openssl rand -base64 32`)")]
pub struct BadSecret;

fn key(secret: &str) -> Result<hmac::Key, BadSecret> {
    let bytes = STANDARD.decode(secret.trim()).map_err(|_| BadSecret)?;
    if bytes.len() != 32 {
        return Err(BadSecret);
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

use crate::client::now_ms;

impl SessionKeys {
    /// From the configured secrets (base64, 32 bytes each).
    pub fn new(secret: &str, previous: Option<&str>, ttl: Duration) -> Result<Self, BadSecret> {
        Ok(Self {
            current: key(secret)?,
            previous: previous.map(key).transpose()?,
            ttl,
        })
    }

    /// A random key: tokens are then valid on this replica only (one storage
    /// process, as in `mailctl dev`).
    pub fn random(ttl: Duration) -> Self {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source");
        Self {
            current: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            previous: None,
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn signed(user: &UserRef, role: Role, expires_ms: i64) -> Vec<u8> {
        // Fields that cannot contain NUL, separated by it: no two inputs sign alike.
        format!(
            "mailmesh-session-v1\0{}\0{}\0{}\0{expires_ms}",
            user.tenant,
            user.user,
            role.name()
        )
        .into_bytes()
    }

    /// A new token for `user`, to be used by `role`, and when it expires (ms).
    pub fn issue(&self, user: &UserRef, role: Role) -> (String, i64) {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_ms = now_ms().saturating_add(ttl_ms);
        let tag = hmac::sign(&self.current, &Self::signed(user, role, expires_ms));
        (
            format!("v1.{expires_ms}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref())),
            expires_ms,
        )
    }

    /// Checks that `token` was issued for `user` and `role` and has not expired;
    /// returns its expiry.
    pub fn verify(&self, token: &str, user: &UserRef, role: Role) -> Result<i64, SessionError> {
        if token.is_empty() {
            return Err(SessionError::Missing);
        }
        let mut parts = token.splitn(3, '.');
        let (Some("v1"), Some(expires), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Malformed);
        };
        let expires_ms: i64 = expires.parse().map_err(|_| SessionError::Malformed)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| SessionError::Malformed)?;
        let signed = Self::signed(user, role, expires_ms);
        let valid = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|key| hmac::verify(key, &signed, &mac).is_ok());
        if !valid {
            return Err(SessionError::Invalid);
        }
        if expires_ms <= now_ms() {
            return Err(SessionError::Expired);
        }
        Ok(expires_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::UserId;

    fn user(tenant: &str, id: u128) -> UserRef {
        UserRef {
            tenant: tenant.parse().unwrap(),
            user: UserId(uuid::Uuid::from_u128(id)),
        }
    }

    const SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const OTHER: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

    #[test]
    fn a_token_opens_only_its_user_and_role() {
        let keys = SessionKeys::new(SECRET, None, Duration::from_secs(60)).unwrap();
        let alice = user("acme", 1);
        let (token, expires) = keys.issue(&alice, Role::Gateway);
        assert_eq!(keys.verify(&token, &alice, Role::Gateway), Ok(expires));
        // Another user of the tenant, the same id in another tenant, another role.
        for (u, role) in [
            (user("acme", 2), Role::Gateway),
            (user("other", 1), Role::Gateway),
            (alice.clone(), Role::Submission),
        ] {
            assert_eq!(
                keys.verify(&token, &u, role),
                Err(SessionError::Invalid),
                "{u:?} {role}"
            );
        }
        // A longer expiry written into the token breaks its MAC.
        let forged = token.replacen(&expires.to_string(), &(expires + 3_600_000).to_string(), 1);
        assert_eq!(
            keys.verify(&forged, &alice, Role::Gateway),
            Err(SessionError::Invalid)
        );
        assert_eq!(
            keys.verify("", &alice, Role::Gateway),
            Err(SessionError::Missing)
        );
        assert_eq!(
            keys.verify("v1.x.y", &alice, Role::Gateway),
            Err(SessionError::Malformed)
        );
    }

    #[test]
    fn tokens_expire_and_other_keys_do_not_open_them() {
        let alice = user("acme", 1);
        let keys = SessionKeys::new(SECRET, None, Duration::ZERO).unwrap();
        let (token, _) = keys.issue(&alice, Role::Gateway);
        assert_eq!(
            keys.verify(&token, &alice, Role::Gateway),
            Err(SessionError::Expired)
        );

        let old = SessionKeys::new(OTHER, None, Duration::from_secs(60)).unwrap();
        let (token, _) = old.issue(&alice, Role::Gateway);
        let keys = SessionKeys::new(SECRET, None, Duration::from_secs(60)).unwrap();
        assert_eq!(
            keys.verify(&token, &alice, Role::Gateway),
            Err(SessionError::Invalid)
        );
        // During a rotation the previous secret still opens its tokens.
        let rotating = SessionKeys::new(SECRET, Some(OTHER), Duration::from_secs(60)).unwrap();
        assert!(rotating.verify(&token, &alice, Role::Gateway).is_ok());
        assert!(SessionKeys::new("short", None, Duration::ZERO).is_err());
    }
}
