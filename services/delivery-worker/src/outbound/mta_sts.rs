//! MTA-STS (RFC 8461): a domain that publishes `_mta-sts.<domain>` TXT and a policy
//! at `https://mta-sts.<domain>/.well-known/mta-sts.txt` asks senders to deliver
//! only to the MX hosts it names, over TLS with a certificate that verifies.
//!
//! Policies are cached (in Redis when configured, so every worker shares them) for
//! their `max_age`. A TXT record whose `id` matches the cached policy means the
//! cached one is current; a new `id` fetches the policy again. When neither DNS nor
//! HTTPS gives a live policy, an unexpired cached one still applies (RFC 8461 5.1),
//! so an attacker who blocks the lookups cannot turn the policy off.
//!
//! A policy in the second half of its `max_age` is fetched again (the record
//! unchanged), so a policy in use does not lapse. Not built: TLS reporting (RFC 8460).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mailmesh_cache::Cache;
use serde::{Deserialize, Serialize};

use super::route::{RouteError, Router};

/// `[outbound.mta_sts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtaStsConfig {
    /// Look up and apply recipient domains' MTA-STS policies.
    pub enabled: bool,
    /// For the whole policy fetch (connect, TLS, request, body).
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Policies larger than this are refused (RFC 8461 3.3 suggests 64 KiB).
    pub max_policy_bytes: usize,
    /// After a failed fetch, the same policy `id` is not fetched again for this long.
    #[serde(with = "humantime_serde")]
    pub fetch_failure_backoff: Duration,
    /// The policy host's HTTPS port (443; tests point it elsewhere).
    pub https_port: u16,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            fetch_timeout: Duration::from_secs(20),
            max_policy_bytes: 64 << 10,
            fetch_failure_backoff: Duration::from_secs(300),
            https_port: 443,
        }
    }
}

/// RFC 8461 3.2: policies live at most a year.
const MAX_AGE_LIMIT: u64 = 31_557_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to listed MX hosts over authenticated TLS.
    Enforce,
    /// Deliver as usual; failures are only logged (reports are not built).
    Testing,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The TXT record's `id` it was fetched for.
    pub id: String,
    pub mode: Mode,
    /// MX host patterns: names, or `*.` and a domain for one more label.
    pub mx: Vec<String>,
    pub max_age: u64,
    /// Unix seconds after which it is no longer applied.
    pub expires: u64,
}

impl Policy {
    /// Whether `host` is one of the policy's MX hosts (RFC 8461 4.1).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|pattern| {
            let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => host == pattern,
            }
        })
    }
}

/// The `id` of the one valid `v=STSv1` record among a name's TXT records (RFC 8461
/// 3.1); `None` when there is none, several, or it is malformed.
pub fn record_id(records: &[String]) -> Option<String> {
    let mut sts = records.iter().filter(|r| r.starts_with("v=STSv1"));
    let record = sts.next()?;
    if sts.next().is_some() {
        return None;
    }
    let mut fields = record.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next()? != "v=STSv1" {
        return None;
    }
    let id = fields.find_map(|f| f.strip_prefix("id="))?;
    (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_owned())
}

/// Parses a policy body (RFC 8461 3.2) fetched for `id` at `now` (Unix seconds).
pub fn parse_policy(body: &str, id: &str, now: u64) -> Result<Policy, String> {
    let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
    for line in body.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("malformed line {line:?}"));
        };
        let value = value.trim();
        // RFC 8461 3.2: of a repeated field other than mx, the first one counts.
        match key.trim() {
            "version" if version.is_none() => version = Some(value.to_owned()),
            "mode" if mode.is_none() => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "max_age" if max_age.is_none() => {
                let age = (!value.is_empty()
                    && value.len() <= 10
                    && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| format!("bad max_age {value:?}"))?;
                max_age = Some(age.min(MAX_AGE_LIMIT));
            }
            "mx" => {
                if value.is_empty() || value.contains(char::is_whitespace) {
                    return Err(format!("bad mx {value:?}"));
                }
                mx.push(value.to_ascii_lowercase());
            }
            // Extensions are ignored (RFC 8461 3.2).
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("no version: STSv1".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mode != Mode::None && mx.is_empty() {
        return Err("no mx".into());
    }
    Ok(Policy {
        id: id.to_owned(),
        mode,
        mx,
        max_age,
        expires: now.saturating_add(max_age),
    })
}

pub struct MtaSts {
    config: MtaStsConfig,
    cache: Arc<dyn Cache>,
    router: Arc<Router>,
    http: reqwest::Client,
}

impl MtaSts {
    /// `tls` authenticates the policy hosts; their addresses come from `router`
    /// (public ones only unless `allow_private`).
    pub fn new(
        config: MtaStsConfig,
        cache: Arc<dyn Cache>,
        router: Arc<Router>,
        tls: &Arc<rustls::ClientConfig>,
        allow_private: bool,
    ) -> anyhow::Result<Self> {
        let mut tls = rustls::ClientConfig::clone(tls);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .http1_only()
            // RFC 8461 3.3: redirects are not followed.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.fetch_timeout)
            .dns_resolver(Arc::new(PolicyHosts {
                router: router.clone(),
                allow_private,
            }))
            .user_agent(concat!("mailmesh/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("building the MTA-STS client: {e}"))?;
        Ok(Self {
            config,
            cache,
            router,
            http,
        })
    }

    /// The policy that applies to mail for `domain` now, if any (never one in mode
    /// `none`).
    pub async fn policy(&self, domain: &str) -> Option<Policy> {
        if !self.config.enabled {
            return None;
        }
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let now = unix_now();
        let key = format!("mtasts:policy:{domain}");
        let cached = match self.cache.get(&key).await {
            Ok(Some(bytes)) => serde_json::from_slice::<Policy>(&bytes)
                .ok()
                .filter(|p| p.expires > now),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%domain, error = %e, "MTA-STS cache unavailable");
                None
            }
        };
        let live = match self.router.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => {
                let id = record_id(&records);
                if id.is_none() && records.iter().any(|r| r.starts_with("v=STSv1")) {
                    tracing::info!(%domain, ?records, "MTA-STS record unusable (several, or a bad id); no policy from it");
                }
                id
            }
            Err(RouteError::Temporary(reason) | RouteError::Permanent { reason, .. }) => {
                tracing::info!(%domain, %reason, "MTA-STS record lookup failed");
                None
            }
        };
        let policy = match (live, cached) {
            // Current, and not yet in the second half of its life (then it is
            // fetched again, so a policy in use does not lapse; RFC 8461 5.1).
            (Some(id), Some(cached))
                if cached.id == id && cached.expires.saturating_sub(now) > cached.max_age / 2 =>
            {
                Some(cached)
            }
            (Some(id), cached) => match self.fetch(&domain, &id, now).await {
                Some(fresh) => {
                    let ttl = Duration::from_secs(fresh.max_age.max(1));
                    if let Ok(json) = serde_json::to_vec(&fresh)
                        && let Err(e) = self.cache.set(&key, Bytes::from(json), Some(ttl)).await
                    {
                        tracing::debug!(%domain, error = %e, "MTA-STS policy not cached");
                    }
                    Some(fresh)
                }
                None => cached,
            },
            (None, cached) => cached,
        };
        policy.filter(|p| p.mode != Mode::None)
    }

    /// Fetches the policy for record `id`; failures are logged and remembered for
    /// `fetch_failure_backoff`.
    async fn fetch(&self, domain: &str, id: &str, now: u64) -> Option<Policy> {
        let failed_key = format!("mtasts:failed:{domain}:{id}");
        if matches!(self.cache.get(&failed_key).await, Ok(Some(_))) {
            return None;
        }
        let url = match self.config.https_port {
            443 => format!("https://mta-sts.{domain}/.well-known/mta-sts.txt"),
            port => format!("https://mta-sts.{domain}:{port}/.well-known/mta-sts.txt"),
        };
        match self
            .download(&url)
            .await
            .and_then(|body| parse_policy(&body, id, now))
        {
            Ok(policy) => {
                tracing::info!(%domain, %id, mode = ?policy.mode, max_age = policy.max_age, "MTA-STS policy fetched");
                Some(policy)
            }
            Err(reason) => {
                tracing::warn!(%domain, %url, %reason, "MTA-STS policy not usable");
                let _ = self
                    .cache
                    .set(
                        &failed_key,
                        Bytes::from_static(b"1"),
                        Some(self.config.fetch_failure_backoff),
                    )
                    .await;
                None
            }
        }
    }

    async fn download(&self, url: &str) -> Result<String, String> {
        let mut response = self.http.get(url).send().await.map_err(|e| {
            // The cause (a certificate that does not verify, a refused connection)
            // is in the chain, not in reqwest's own message.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        })?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        let media = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if media.split(';').next().map(str::trim) != Some("text/plain") {
            return Err(format!("media type {media:?}, not text/plain"));
        }
        let limit = self.config.max_policy_bytes;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > limit {
                return Err(format!("policy larger than {limit} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| "policy is not UTF-8".to_owned())
    }
}

/// Resolves policy hosts with the outbound resolver (the same view of DNS as the
/// MX lookups), refusing non-public addresses unless allowed.
struct PolicyHosts {
    router: Arc<Router>,
    allow_private: bool,
}

impl reqwest::dns::Resolve for PolicyHosts {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let router = self.router.clone();
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = router.addresses(&host).await.map_err(
                |e| -> Box<dyn std::error::Error + Send + Sync> { format!("{e:?}").into() },
            )?;
            let usable: Vec<SocketAddr> = ips
                .into_iter()
                .map(|ip| ip.to_canonical())
                .filter(|ip| allow_private || super::public(*ip))
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if usable.is_empty() {
                return Err(format!("{host} has no usable address").into());
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_names_one_id() {
        let one = |r: &str| record_id(&[r.to_owned()]);
        assert_eq!(
            one("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(one("v=STSv1;id=abc").as_deref(), Some("abc"));
        assert_eq!(one("v=STSv1; id=a-b"), None, "alphanumeric only");
        assert_eq!(one("v=STSv1;"), None, "no id");
        assert_eq!(one(&format!("v=STSv1; id={}", "a".repeat(33))), None);
        assert_eq!(one("v=spf1 -all"), None);
        // Other TXT records are ignored; two STS records are none.
        let both = ["v=spf1 -all".to_owned(), "v=STSv1; id=x1".to_owned()];
        assert_eq!(record_id(&both).as_deref(), Some("x1"));
        let two = ["v=STSv1; id=x1".to_owned(), "v=STSv1; id=x2".to_owned()];
        assert_eq!(record_id(&two), None);
    }

    #[test]
    fn policies_parse_as_the_rfc_writes_them() {
        let body = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n\
                    mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";
        let p = parse_policy(body, "id1", 1000).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx.len(), 3);
        assert_eq!(p.expires, 1000 + 604_800);
        // LF line ends, unknown keys, a huge max_age (capped at a year).
        let p = parse_policy(
            "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 9999999999\nfoo: bar\n",
            "i",
            0,
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::Testing, MAX_AGE_LIMIT));
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 1\n", "i", 0).is_ok());
        // Repeated fields: the first counts (mx lines add up).
        let p = parse_policy(
            "version: STSv1\nmode: testing\nmode: enforce\nmx: a\nmx: b\nmax_age: 5\nmax_age: 9\n",
            "i",
            0,
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age, p.mx.len()), (Mode::Testing, 5, 2));
        for bad in [
            "mode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse_policy(bad, "i", 0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mx_patterns_match_one_label_at_most() {
        let p = parse_policy(
            "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 1\n",
            "i",
            0,
        )
        .unwrap();
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("MAIL.Example.COM."));
        assert!(p.allows("mx1.example.net"));
        assert!(!p.allows("example.net"), "the wildcard needs a label");
        assert!(!p.allows("a.mx1.example.net"), "one label only");
        assert!(!p.allows("mail.example.com.evil.test"));
        assert!(!p.allows("other.example.com"));
    }
}
