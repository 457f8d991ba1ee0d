//! Credential checks shared by IMAP and POP3 (and, through the same counters in the
//! cache, submission): see `mailmesh_cache::login`.

use std::net::SocketAddr;

use crate::Gateway;
use crate::store::LoggedIn;
pub(crate) use mailmesh_cache::login::{Login, LoginLimits as Limits};

pub(crate) async fn check(
    gw: &Gateway,
    protocol: &'static str,
    peer: SocketAddr,
    name: &str,
    password: &str,
    limits: &Limits,
) -> Login<LoggedIn> {
    let login =
        mailmesh_cache::login::check(&gw.cache, peer.ip(), name, limits, |name| async move {
            gw.store.authenticate(&name, password, peer.ip()).await
        })
        .await;
    match login {
        Login::Throttled => crate::metrics::event(protocol, "auth_throttled"),
        Login::Busy => crate::metrics::event(protocol, "auth_busy"),
        Login::Invalid => crate::metrics::event(protocol, "auth_failed"),
        Login::Ok(_) | Login::Unavailable => {}
    }
    login
}
