//! Resolver set-up shared by the services that ask DNS (auth-check's checks, the
//! delivery workers' MX lookups).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};

/// The resolvers to ask: `servers` (`ip:port`, UDP and TCP), or /etc/resolv.conf
/// when empty; names are always absolute (no search domains).
pub fn resolver_setup(
    servers: &[SocketAddr],
    timeout: Duration,
    attempts: usize,
) -> Result<(ResolverConfig, ResolverOpts), String> {
    let (config, mut options) = if servers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("reading /etc/resolv.conf: {e}"))?
    } else {
        let servers = servers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        (
            ResolverConfig::from_name_servers(servers),
            ResolverOpts::default(),
        )
    };
    options.timeout = timeout;
    options.attempts = attempts;
    options.ndots = 0;
    Ok((config, options))
}
