//! Credential checks shared by IMAP and POP3, with failure limits counted in the
//! cache across pods and protocols: a client address (an IPv6 /64) over the limit is
//! refused for a while; an account over it is only slowed down (a stranger must not
//! be able to lock a user out). The answer never tells whether the user exists.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mailmesh_proto::v1;

use crate::Gateway;

pub(crate) struct Limits {
    pub max_failures: u32,
    pub window: Duration,
    /// Every failed login costs the client this long before the answer; a login to
    /// an account with many recent failures waits five times as long first.
    pub failure_delay: Duration,
}

pub(crate) enum Login {
    Ok(v1::UserRef),
    Invalid,
    /// Too many failures from this client address.
    Throttled,
    /// The directory could not be asked.
    Unavailable,
}

pub(crate) async fn check(
    gw: &Gateway,
    protocol: &'static str,
    peer: SocketAddr,
    name: &str,
    password: &str,
    limits: &Limits,
) -> Login {
    let name = name.trim().to_ascii_lowercase();
    let window = limits.window;
    let limit = i64::from(limits.max_failures);
    let by_ip = format!("gateway:authfail:ip:{}", address_key(peer.ip()));
    let by_name = (!name.is_empty()
        && name.len() <= 320
        && !name.chars().any(|c| c.is_control() || c.is_whitespace()))
    .then(|| format!("gateway:authfail:user:{name}"));
    // Every attempt is counted before the password is checked (and given back when
    // it was right), so parallel connections cannot try more than the limit. An
    // unreachable cache does not stop logins; it only lifts the limits.
    let count =
        |key: String, by: i64| async move { gw.cache.incr(&key, by, window).await.unwrap_or(0) };
    if count(by_ip.clone(), 1).await > limit {
        crate::metrics::event(protocol, "auth_throttled");
        tokio::time::sleep(limits.failure_delay).await;
        return Login::Throttled;
    }
    // Too many on one account: slowed down, never locked out (anyone could lock a
    // user out otherwise), and the same whether the account exists or not.
    if let Some(key) = &by_name
        && count(key.clone(), 1).await > limit
    {
        crate::metrics::event(protocol, "auth_throttled");
        tokio::time::sleep(limits.failure_delay * 5).await;
    }
    let user = match by_name {
        Some(_) => match gw.store.authenticate(&name, password).await {
            Ok(user) => user,
            Err(e) => {
                tracing::warn!(error = %e, "authentication unavailable");
                return Login::Unavailable;
            }
        },
        None => None,
    };
    match user {
        Some(user) => {
            for key in std::iter::once(&by_ip).chain(by_name.as_ref()) {
                let _ = gw.cache.incr(key, -1, window).await;
            }
            Login::Ok(user)
        }
        None => {
            crate::metrics::event(protocol, "auth_failed");
            tokio::time::sleep(limits.failure_delay).await;
            Login::Invalid
        }
    }
}

/// What failure counts are kept under: the address, or its /64 for IPv6 (one
/// subscriber's whole network).
fn address_key(ip: IpAddr) -> String {
    // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}
