//! Password checks with failure limits counted in the cache, shared by every pod and
//! protocol (IMAP, POP3, submission): a client address (an IPv6 /64) over the limit
//! is refused for a while; an account over it is only slowed down (a stranger must
//! not be able to lock a user out). The answer never tells whether the user exists.

use std::fmt::Display;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use crate::Cache;

#[derive(Debug, Clone)]
pub struct LoginLimits {
    pub max_failures: u32,
    pub window: Duration,
    /// Every failed login costs the client this long before the answer; a login to
    /// an account with many recent failures waits five times as long first.
    pub failure_delay: Duration,
}

#[derive(Debug)]
pub enum Login<U> {
    Ok(U),
    Invalid,
    /// Too many failures from this client address.
    Throttled,
    /// The password could not be checked.
    Unavailable,
}

/// Checks `name`'s password with `verify` (given the lower-cased name) within the
/// limits. Every attempt is counted before the password is checked (and given back
/// when it was right), so parallel connections cannot try more than the limit. An
/// unreachable cache does not stop logins; it only lifts the limits.
pub async fn check<U, E, F, Fut>(
    cache: &dyn Cache,
    client: IpAddr,
    name: &str,
    limits: &LoginLimits,
    verify: F,
) -> Login<U>
where
    E: Display,
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<Option<U>, E>>,
{
    let name = name.trim().to_ascii_lowercase();
    let window = limits.window;
    let limit = i64::from(limits.max_failures);
    let by_ip = format!("authfail:ip:{}", address_key(client));
    let by_name = (!name.is_empty()
        && name.len() <= 320
        && !name.chars().any(|c| c.is_control() || c.is_whitespace()))
    .then(|| format!("authfail:user:{name}"));
    let count =
        |key: String, by: i64| async move { cache.incr(&key, by, window).await.unwrap_or(0) };
    if count(by_ip.clone(), 1).await > limit {
        tokio::time::sleep(limits.failure_delay).await;
        return Login::Throttled;
    }
    // Too many on one account: slowed down, never locked out, and the same whether
    // the account exists or not.
    if let Some(key) = &by_name
        && count(key.clone(), 1).await > limit
    {
        tracing::info!(%client, "slowing down logins to an account with many failures");
        tokio::time::sleep(limits.failure_delay * 5).await;
    }
    let user = match by_name {
        Some(_) => match verify(name).await {
            Ok(user) => user,
            Err(e) => {
                tracing::warn!(error = %e, "authentication unavailable");
                // Not the client's failure: the attempt is given back.
                for key in std::iter::once(&by_ip).chain(by_name.as_ref()) {
                    let _ = cache.incr(key, -1, window).await;
                }
                return Login::Unavailable;
            }
        },
        None => None,
    };
    match user {
        Some(user) => {
            for key in std::iter::once(&by_ip).chain(by_name.as_ref()) {
                let _ = cache.incr(key, -1, window).await;
            }
            Login::Ok(user)
        }
        None => {
            tokio::time::sleep(limits.failure_delay).await;
            Login::Invalid
        }
    }
}

/// What failure counts are kept under: the address, or its /64 for IPv6 (one
/// subscriber's whole network).
pub fn address_key(ip: IpAddr) -> String {
    // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}
