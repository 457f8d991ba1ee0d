//! Where mail for a domain goes (RFC 5321 5.1): its MX hosts by preference (equal
//! preferences in random order), the domain itself when it has no MX, nowhere when
//! it publishes a null MX (RFC 7505) or does not exist.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use serde::Deserialize;

/// `[outbound.dns]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Recursive resolvers (`ip:port`); empty reads /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub attempts: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

/// Why no host can be named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Mail can never be delivered there.
    Permanent {
        status: &'static str,
        reason: String,
    },
    /// DNS did not answer; try later.
    Temporary(String),
}

pub struct Router {
    resolver: TokioResolver,
}

impl Router {
    pub fn new(config: &DnsConfig) -> anyhow::Result<Self> {
        let (resolver_config, options) =
            mailmesh_kit::dns::resolver_setup(&config.servers, config.timeout, config.attempts)
                .map_err(anyhow::Error::msg)?;
        let resolver = TokioResolver::builder_with_config(
            resolver_config,
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|e| anyhow::anyhow!("building the DNS resolver: {e}"))?;
        Ok(Self { resolver })
    }

    /// The hosts to try for `domain`, best first.
    pub async fn hosts(&self, domain: &str) -> Result<Vec<String>, RouteError> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, u64, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        hickory_resolver::proto::rr::RData::MX(mx) => Some(mx),
                        _ => None,
                    })
                    .map(|mx| {
                        let host = mx.exchange.to_ascii().trim_end_matches('.').to_owned();
                        (mx.preference, rand_u64(), host)
                    })
                    .collect();
                // RFC 7505: a null MX ("." as the exchange) means no mail, and
                // never a fallback to the domain's address.
                if mx.iter().any(|(_, _, host)| host.is_empty()) {
                    return Err(RouteError::Permanent {
                        status: "5.1.10",
                        reason: format!("{domain} does not accept mail (null MX)"),
                    });
                }
                if mx.is_empty() {
                    return Ok(vec![domain.to_owned()]);
                }
                // By preference; equal ones in random order (RFC 5321 5.1).
                mx.sort();
                Ok(mx.into_iter().map(|(_, _, host)| host).collect())
            }
            Err(e) if e.is_nx_domain() => Err(RouteError::Permanent {
                status: "5.1.2",
                reason: format!("domain {domain} does not exist"),
            }),
            // No MX: the domain itself is the host (RFC 5321 5.1).
            Err(e) if e.is_no_records_found() => Ok(vec![domain.to_owned()]),
            Err(e) => Err(RouteError::Temporary(format!(
                "MX lookup for {domain} failed: {e}"
            ))),
        }
    }

    /// The TXT records at `name`, each record's strings joined; empty when none.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, RouteError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.txt_lookup(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(RouteError::Temporary(format!(
                "TXT lookup for {name} failed: {e}"
            ))),
        }
    }

    /// The addresses of `host`; empty when it has none.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, RouteError> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => Ok(ips.iter().collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(RouteError::Temporary(format!(
                "address lookup for {host} failed: {e}"
            ))),
        }
    }
}

/// A random tie-breaker for MX hosts of equal preference.
fn rand_u64() -> u64 {
    let (hi, _) = uuid::Uuid::new_v4().as_u64_pair();
    hi
}
