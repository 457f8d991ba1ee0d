//! Credential checks shared by IMAP and POP3 (and, through the same counters in the
//! cache, submission): see `mailmesh_cache::login`.

use std::net::SocketAddr;

pub(crate) use mailmesh_cache::login::{Login, LoginLimits as Limits};
use mailmesh_proto::v1;

use crate::Gateway;

pub(crate) async fn check(
    gw: &Gateway,
    protocol: &'static str,
    peer: SocketAddr,
    name: &str,
    password: &str,
    limits: &Limits,
) -> Login<v1::UserRef> {
    let login =
        mailmesh_cache::login::check(&gw.cache, peer.ip(), name, limits, |name| async move {
            gw.store.authenticate(&name, password).await
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
