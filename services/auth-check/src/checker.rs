//! The checks themselves, run in this process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::common::resolver::ToReverseName;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, DnsError, Error,
    IprevOutput, IprevResult, MessageAuthenticator, SpfResult,
};
use mailmesh_cache::Cache;
use mailmesh_kit::config::{ConfigError, Validate};
use mailmesh_proto::v1;
use prost::Message as _;
use serde::Deserialize;

use crate::verdict::{AuthResult, ClientVerdict, DmarcPolicy, MessageVerdict};
use crate::{AuthCheck, MessageFacts, Unavailable};

/// How auth-check judges; every limit has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The `authserv-id` of Authentication-Results (RFC 8601 §2.5) and the SPF `r`
    /// macro: this site's mail host name. Headers claiming it on incoming mail are
    /// the front door's to remove.
    pub authserv_id: String,
    pub dns: DnsConfig,
    /// DNS block-list zones queried for the client address (e.g. `zen.spamhaus.org`).
    pub block_lists: Vec<String>,
    /// DNS allow-list zones; a listed address is never treated as blocked.
    pub allow_lists: Vec<String>,
    /// Largest message accepted for checking (gRPC message limit).
    pub max_message_bytes: usize,
    /// How long a client address's iprev and DNS-list results are reused, shared by
    /// every pod through the cache (Redis) when there is one. 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub client_cache_ttl: Duration,
    /// The key that seals messages forwarded to other domains (ARC); without it
    /// forwarded copies are not sealed.
    pub arc_seal: Option<crate::sign::ArcSealConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            authserv_id: "localhost".into(),
            dns: DnsConfig::default(),
            block_lists: Vec::new(),
            allow_lists: Vec::new(),
            max_message_bytes: 25 << 20,
            client_cache_ttl: Duration::from_secs(300),
            arc_seal: None,
        }
    }
}

impl Validate for AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.authserv_id.is_empty()
            || self
                .authserv_id
                .chars()
                .any(|c| c.is_whitespace() || c == ';' || c == '(')
        {
            return Err(ConfigError::invalid(
                "auth.authserv_id",
                "must be a host name",
            ));
        }
        for zone in self.block_lists.iter().chain(&self.allow_lists) {
            if !is_zone(zone) {
                return Err(ConfigError::invalid(
                    "auth.block_lists",
                    format!("{zone:?} is not a DNS zone"),
                ));
            }
        }
        if self.dns.attempts == 0 || self.dns.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "auth.dns",
                "attempts and timeout must be above zero",
            ));
        }
        Ok(())
    }
}

/// A DNS name of letters, digits and hyphens, with a dot somewhere inside.
fn is_zone(zone: &str) -> bool {
    let zone = zone.trim_end_matches('.');
    zone.contains('.')
        && zone.len() <= 253
        && zone.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The resolver auth-check asks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Recursive resolvers (`ip:port`); empty reads /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// Per query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Tries per query and server.
    pub attempts: usize,
    /// Answers kept in this process, each up to its TTL.
    pub cache_entries: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(3),
            attempts: 2,
            cache_entries: 16_384,
        }
    }
}

/// Runs the checks in this process.
pub struct Checker {
    dns: MessageAuthenticator,
    config: AuthConfig,
    arc_seal: Option<crate::sign::ArcSealKey>,
    /// Client verdicts shared between pods; losing it only costs lookups.
    cache: Option<Arc<dyn Cache>>,
}

impl Checker {
    /// The client's verdict, from the shared cache or asked now; with the iprev
    /// output when it was asked now (the header's iprev entry needs it).
    async fn client(&self, ip: IpAddr) -> (ClientVerdict, Option<IprevOutput>) {
        let started = Instant::now();
        let key = format!("auth:client:{ip}");
        if let Some(verdict) = self.cached_client(&key).await {
            crate::metrics::took("client_cached", started.elapsed());
            return (verdict, None);
        }
        let (iprev, (block_listed, blocks_answered), (allow_listed, allows_answered)) = tokio::join!(
            self.dns.verify_iprev(ip),
            self.listed(ip, &self.config.block_lists, "dnsbl"),
            self.listed(ip, &self.config.allow_lists, "dnswl"),
        );
        let result = iprev_result(&iprev.result);
        crate::metrics::result("iprev", result.as_str());
        let verdict = ClientVerdict {
            iprev: result,
            ptr: match (result, &iprev.ptr) {
                (AuthResult::Pass, Some(names)) => {
                    names.first().map(|n| n.trim_end_matches('.').to_owned())
                }
                _ => None,
            },
            block_listed,
            allow_listed,
        };
        // Temporary failures are asked again next time, not remembered.
        if result != AuthResult::TempError
            && blocks_answered
            && allows_answered
            && !self.config.client_cache_ttl.is_zero()
        {
            self.remember_client(&key, &verdict).await;
        }
        crate::metrics::took("client", started.elapsed());
        (verdict, Some(iprev))
    }

    pub fn new(config: AuthConfig) -> anyhow::Result<Self> {
        let (resolver, mut options) = mailmesh_kit::dns::resolver_setup(
            &config.dns.servers,
            config.dns.timeout,
            config.dns.attempts,
        )
        .map_err(anyhow::Error::msg)?;
        options.cache_size = config.dns.cache_entries;
        let dns = MessageAuthenticator::new(resolver, options)
            .map_err(|e| anyhow::anyhow!("building the DNS resolver: {e}"))?;
        let arc_seal = config
            .arc_seal
            .as_ref()
            .map(crate::sign::ArcSealKey::load)
            .transpose()
            .map_err(|e| anyhow::anyhow!("loading the ARC sealing key: {e}"))?;
        Ok(Self {
            dns,
            config,
            arc_seal,
            cache: None,
        })
    }

    /// Shares client verdicts through `cache` (Redis across pods).
    pub fn with_cache(mut self, cache: Arc<dyn Cache>) -> Self {
        self.cache = Some(cache);
        self
    }

    async fn cached_client(&self, key: &str) -> Option<ClientVerdict> {
        let cache = self.cache.as_ref()?;
        match cache.get(key).await {
            Ok(Some(bytes)) => v1::ClientVerdict::decode(bytes).ok().map(Into::into),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "client verdict cache unavailable");
                None
            }
        }
    }

    async fn remember_client(&self, key: &str, verdict: &ClientVerdict) {
        let Some(cache) = &self.cache else { return };
        let bytes = v1::ClientVerdict::from(verdict.clone()).encode_to_vec();
        let ttl = Some(self.config.client_cache_ttl);
        if let Err(e) = cache.set(key, Bytes::from(bytes), ttl).await {
            tracing::debug!(error = %e, "client verdict cache unavailable");
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Zones of `zones` that list `ip` (an A record under the reversed address), and
    /// whether every zone answered.
    async fn listed(&self, ip: IpAddr, zones: &[String], method: &str) -> (Vec<String>, bool) {
        let reversed = ip.to_reverse_name();
        let lookups = zones.iter().map(|zone| {
            let name = format!("{reversed}.{}.", zone.trim_end_matches('.'));
            async move {
                match self.dns.ipv4_lookup_raw(&name).await {
                    // 127.0.0.0/8 answers are listings; 127.255.255.0/24 is how
                    // Spamhaus and others say "refused" (e.g. a public resolver).
                    Ok(answer) => {
                        let listed = answer.entry.iter().any(|a| {
                            a.octets()[0] == 127 && !(a.octets()[1] == 255 && a.octets()[2] == 255)
                        });
                        if listed {
                            Ok(Some(zone.clone()))
                        } else {
                            // A refusal (rate limit, public resolver): no answer, so
                            // the verdict is not remembered.
                            tracing::warn!(%zone, answer = ?answer.entry, "DNS list refused the query");
                            crate::metrics::result(method, "refused");
                            Err(())
                        }
                    }
                    Err(Error::Dns(DnsError::RecordNotFound(_))) => Ok(None),
                    Err(e) => {
                        tracing::warn!(%zone, error = %e, "DNS list lookup failed");
                        crate::metrics::result(method, "temperror");
                        Err(())
                    }
                }
            }
        });
        let answers = futures::future::join_all(lookups).await;
        let complete = answers.iter().all(Result::is_ok);
        let found: Vec<String> = answers.into_iter().flatten().flatten().collect();
        for _ in &found {
            crate::metrics::result(method, "listed");
        }
        (found, complete)
    }
}

fn dkim_result(r: &DkimResult) -> AuthResult {
    match r {
        DkimResult::Pass => AuthResult::Pass,
        DkimResult::Neutral(_) => AuthResult::Neutral,
        DkimResult::Fail(_) => AuthResult::Fail,
        DkimResult::PermError(_) => AuthResult::PermError,
        DkimResult::TempError(_) => AuthResult::TempError,
        DkimResult::None => AuthResult::None,
    }
}

fn spf_result(r: SpfResult) -> AuthResult {
    match r {
        SpfResult::Pass => AuthResult::Pass,
        SpfResult::Fail => AuthResult::Fail,
        SpfResult::SoftFail => AuthResult::SoftFail,
        SpfResult::Neutral => AuthResult::Neutral,
        SpfResult::TempError => AuthResult::TempError,
        SpfResult::PermError => AuthResult::PermError,
        SpfResult::None => AuthResult::None,
    }
}

fn dmarc_result(r: &DmarcResult) -> AuthResult {
    match r {
        DmarcResult::Pass => AuthResult::Pass,
        DmarcResult::Fail(_) => AuthResult::Fail,
        DmarcResult::TempError(_) => AuthResult::TempError,
        DmarcResult::PermError(_) => AuthResult::PermError,
        DmarcResult::None => AuthResult::None,
    }
}

fn iprev_result(r: &IprevResult) -> AuthResult {
    match r {
        IprevResult::Pass => AuthResult::Pass,
        IprevResult::Fail(_) => AuthResult::Fail,
        IprevResult::TempError(_) => AuthResult::TempError,
        IprevResult::PermError(_) => AuthResult::PermError,
        IprevResult::None => AuthResult::None,
    }
}

/// How many From fields the header section of `message` has (names compared
/// without case; folded lines belong to their field).
fn from_fields(message: &[u8]) -> usize {
    // A message that starts with its blank line has no header section at all.
    let header_end = if message.starts_with(b"\r\n") {
        0
    } else {
        message
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(message.len(), |p| p + 2)
    };
    message[..header_end]
        .split(|&b| b == b'\n')
        .filter(|line| {
            line.iter()
                .position(|&b| b == b':')
                .is_some_and(|colon| line[..colon].trim_ascii().eq_ignore_ascii_case(b"from"))
                && !line.starts_with(b" ")
                && !line.starts_with(b"\t")
        })
        .count()
}

/// RFC 7489 §6.6.1: DMARC evaluates one author domain, so a message needs exactly
/// one From field whose addresses, as mail-auth reads them (the check and this rule
/// must agree: mail-auth skips DMARC for a From it cannot reduce to one domain),
/// share one domain. Not so for no From, two, a group or a mailbox without an
/// address, or authors of several domains.
fn one_author(raw: &[u8], message: Option<&AuthenticatedMessage<'_>>) -> bool {
    let Some(message) = message else {
        return false;
    };
    if from_fields(raw) != 1 {
        return false;
    }
    let mut domains = message
        .from
        .iter()
        .map(|a| a.rsplit_once('@').map(|(_, d)| d));
    match domains.next() {
        Some(Some(first)) if !first.is_empty() => domains.all(|d| d == Some(first)),
        _ => false,
    }
}

#[async_trait]
impl AuthCheck for Checker {
    async fn check_client(&self, ip: IpAddr) -> Result<ClientVerdict, Unavailable> {
        Ok(self.client(ip).await.0)
    }

    async fn check_message(&self, facts: MessageFacts<'_>) -> Result<MessageVerdict, Unavailable> {
        let started = Instant::now();
        let host = self.config.authserv_id.as_str();
        let helo = facts.helo.trim_start_matches('[').trim_end_matches(']');
        // RFC 7208 §2.4: the MAIL FROM identity, or the HELO identity for the null
        // sender; DMARC aligns with the same domain.
        let spf_params = if facts.mail_from.is_empty() {
            SpfParameters::verify_ehlo(facts.ip, helo, host)
        } else {
            SpfParameters::verify_mail_from(facts.ip, helo, host, facts.mail_from)
        };
        let spf_domain = facts
            .mail_from
            .rsplit_once('@')
            .map_or(helo, |(_, d)| d)
            .to_ascii_lowercase();
        let message = AuthenticatedMessage::parse(facts.message);
        // RFC 7208 §2.3: the HELO identity is checked too when it is a domain name.
        let helo_is_domain =
            !facts.mail_from.is_empty() && helo.contains('.') && helo.parse::<IpAddr>().is_err();
        let helo_check = async {
            if helo_is_domain {
                Some(
                    self.dns
                        .verify_spf(SpfParameters::verify_ehlo(facts.ip, helo, host))
                        .await,
                )
            } else {
                None
            }
        };
        let ((client, iprev), spf, spf_helo) = tokio::join!(
            self.client(facts.ip),
            self.dns.verify_spf(spf_params),
            helo_check,
        );
        // Asked once: again only when the verdict came from the cache (and then the
        // resolver's own cache usually answers).
        let iprev = match iprev {
            Some(iprev) => iprev,
            None => self.dns.verify_iprev(facts.ip).await,
        };
        let header = AuthenticationResults::new(host);
        let mut header = if facts.mail_from.is_empty() {
            header.with_spf_ehlo_result(&spf, facts.ip, helo)
        } else {
            header.with_spf_mailfrom_result(&spf, facts.ip, facts.mail_from, helo)
        };
        if let Some(spf_helo) = &spf_helo {
            header = header.with_spf_ehlo_result(spf_helo, facts.ip, helo);
        }
        header = header.with_iprev_result(&iprev, facts.ip);
        let mut verdict = MessageVerdict {
            client,
            spf: spf_result(spf.result()),
            spf_helo: spf_helo.map_or(AuthResult::None, |o| spf_result(o.result())),
            ..MessageVerdict::default()
        };
        // RFC 7489 §6.6.1: without exactly one From field there is no author
        // domain to evaluate; such a message is handled as failing DMARC with
        // p=reject (the tenant's policy for that decides), and its
        // Authentication-Results says why instead of an empty header.from.
        let single_from = one_author(facts.message, message.as_ref());
        if let Some(message) = &message {
            let (dkim, arc) =
                tokio::join!(self.dns.verify_dkim(message), self.dns.verify_arc(message));
            header = header
                .with_dkim_results(&dkim, message.from.first().map_or("", String::as_str))
                .with_arc_result(&arc, facts.ip);
            verdict.dkim = if dkim.iter().any(|d| d.result() == &DkimResult::Pass) {
                AuthResult::Pass
            } else {
                dkim.first()
                    .map_or(AuthResult::None, |d| dkim_result(d.result()))
            };
            verdict.arc = dkim_result(arc.result());
            if single_from {
                let dmarc = self
                    .dns
                    .verify_dmarc(DmarcParameters::new(message, &dkim, &spf_domain, &spf))
                    .await;
                header = header.with_dmarc_result(&dmarc);
                verdict.dmarc = dmarc_result(&dmarc.result());
                verdict.dmarc_policy = match dmarc.policy() {
                    Policy::Reject => DmarcPolicy::Reject,
                    Policy::Quarantine => DmarcPolicy::Quarantine,
                    _ => DmarcPolicy::None,
                };
                verdict.dmarc_domain = dmarc.domain().to_owned();
            }
            // A copy goes to another domain: sealed with what this hop found (RFC
            // 8617 §5.1), DMARC included, when the chain so far allows it (cv is
            // none or pass). Mail that fails DMARC under p=reject is not forwarded,
            // so it is not sealed either.
            let forwarded = single_from
                && !(verdict.dmarc == AuthResult::Fail
                    && verdict.dmarc_policy == DmarcPolicy::Reject);
            if facts.arc_seal
                && forwarded
                && let Some(key) = &self.arc_seal
            {
                match key.seal(message, facts.message, &header, &arc) {
                    Ok(set) => verdict.arc_set = Some(set),
                    Err(e) => tracing::info!(error = %e, "not ARC-sealing a message to forward"),
                }
            }
        }
        if !single_from {
            verdict.dmarc = AuthResult::Fail;
            verdict.dmarc_policy = DmarcPolicy::Reject;
            verdict.dmarc_domain = String::new();
        }
        verdict.authentication_results = header.to_header();
        if !single_from {
            let end = verdict.authentication_results.len() - 2;
            verdict
                .authentication_results
                .insert_str(end, ";\r\n\tdmarc=permerror (not exactly one From field)");
        }
        if verdict.dkim == AuthResult::None {
            // RFC 8601 2.7.1: say there was no signature rather than nothing.
            verdict.authentication_results =
                verdict
                    .authentication_results
                    .replacen(";\r\n\t", ";\r\n\tdkim=none;\r\n\t", 1);
        }
        for (method, result) in [
            ("spf", verdict.spf),
            ("dkim", verdict.dkim),
            ("arc", verdict.arc),
            ("dmarc", verdict.dmarc),
        ] {
            crate::metrics::result(method, result.as_str());
        }
        crate::metrics::took("message", started.elapsed());
        Ok(verdict)
    }
}
