//! The cache on Redis. Keys carry a configurable prefix so several deployments can
//! share one server. With `[sentinel]`, the master is asked from Redis Sentinel, and
//! asked again when it stops answering or turns out to be a replica (after a
//! failover): the command that noticed fails (callers fall back or answer a 4xx), the
//! ones after it go to the new master.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use mailmesh_kit::Secret;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ErrorKind, IntoConnectionInfo, ServerErrorKind};
use serde::Deserialize;

use crate::{Cache, LockToken, Result, Subscription, validate_key};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` (`rediss://`, TLS, is refused at start:
    /// the client is built without TLS support).
    pub url: Secret<String>,
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// A command that takes longer fails (callers fall back or answer a 4xx).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Find the master through Redis Sentinel. `url` then gives only the master's
    /// password and database; its host is not used.
    #[serde(default)]
    pub sentinel: Option<SentinelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the master under (`sentinel monitor NAME …`).
    pub master: String,
    /// The sentinels, `redis://host:26379` (`redis://:password@host:26379` when they
    /// require a password); asked in turn.
    pub nodes: Vec<Secret<String>>,
}

fn default_prefix() -> String {
    "mailmesh:".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

pub struct RedisCache {
    current: Arc<ArcSwap<Connected>>,
    sentinel: Option<Arc<Sentinel>>,
    manager: ConnectionManagerConfig,
    prefix: String,
}

/// The server commands go to now.
struct Connected {
    client: redis::Client,
    conn: ConnectionManager,
}

struct Sentinel {
    client: tokio::sync::Mutex<SentinelClient>,
    /// One search for a new master at a time.
    searching: AtomicBool,
}

const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"#;

const EXTEND: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// A slot in a sorted set scored by expiry (the server's clock): expired slots go,
/// a new one is taken only below the limit, and the key lives while slots are
/// renewed.
/// The scripts, hashed once.
static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    unlock: redis::Script::new(UNLOCK),
    extend: redis::Script::new(EXTEND),
    acquire_slot: redis::Script::new(ACQUIRE_SLOT),
});

struct Scripts {
    unlock: redis::Script,
    extend: redis::Script,
    acquire_slot: redis::Script,
}

const ACQUIRE_SLOT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisCache {
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.command_timeout))
            .set_connection_timeout(Some(config.command_timeout));
        let (client, sentinel) = match &config.sentinel {
            None => (redis::Client::open(config.url.expose().as_str())?, None),
            Some(s) => {
                let master = config.url.expose().as_str().into_connection_info()?;
                let nodes: Vec<String> = s.nodes.iter().map(|n| n.expose().clone()).collect();
                let node_info = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(master.redis_settings().clone());
                let mut sentinel = SentinelClient::build(
                    nodes,
                    s.master.clone(),
                    Some(node_info),
                    SentinelServerType::Master,
                )?;
                let client = sentinel.async_get_client().await?;
                let sentinel = Sentinel {
                    client: tokio::sync::Mutex::new(sentinel),
                    searching: AtomicBool::new(false),
                };
                (client, Some(Arc::new(sentinel)))
            }
        };
        let conn = ConnectionManager::new_with_config(client.clone(), manager.clone()).await?;
        Ok(Self {
            current: Arc::new(ArcSwap::from_pointee(Connected { client, conn })),
            sentinel,
            manager,
            prefix: config.key_prefix.clone(),
        })
    }

    fn key(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn conn(&self) -> ConnectionManager {
        self.current.load().conn.clone()
    }

    /// Passes a command's result on; an error that says the master is gone or is no
    /// longer the master starts a search for the new one (with Sentinel).
    fn check<T>(&self, result: redis::RedisResult<T>) -> Result<T> {
        if let (Err(e), Some(sentinel)) = (&result, &self.sentinel) {
            let moved = e.is_io_error()
                || e.is_connection_refusal()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
            if moved && !sentinel.searching.swap(true, Ordering::AcqRel) {
                tracing::warn!(error = %e, "redis master lost: asking the sentinels");
                let (sentinel, manager) = (sentinel.clone(), self.manager.clone());
                let current = self.current.clone();
                tokio::spawn(async move {
                    match find_master(&sentinel, manager).await {
                        Ok(found) => {
                            let addr = found.client.get_connection_info().addr().to_string();
                            tracing::info!(master = %addr, "redis master from the sentinels");
                            current.store(Arc::new(found));
                        }
                        Err(e) => tracing::warn!(error = %e, "no redis master from the sentinels"),
                    }
                    sentinel.searching.store(false, Ordering::Release);
                });
            }
        }
        Ok(result?)
    }
}

async fn find_master(sentinel: &Sentinel, manager: ConnectionManagerConfig) -> Result<Connected> {
    let client = sentinel.client.lock().await.async_get_client().await?;
    let conn = ConnectionManager::new_with_config(client.clone(), manager).await?;
    Ok(Connected { client, conn })
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let value: Option<Vec<u8>> = self.check(
            redis::cmd("GET")
                .arg(self.key(key)?)
                .query_async(&mut self.conn())
                .await,
        )?;
        Ok(value.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)?).arg(value.as_ref());
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        self.check(cmd.query_async::<()>(&mut self.conn()).await)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let n: i64 = self.check(
            redis::cmd("DEL")
                .arg(self.key(key)?)
                .query_async(&mut self.conn())
                .await,
        )?;
        Ok(n > 0)
    }

    async fn incr(&self, key: &str, by: i64, window: Duration) -> Result<i64> {
        let key = self.key(key)?;
        // One round trip, atomic: the expiry is set only by the increment that
        // created the key (PEXPIRE … NX, Redis 7).
        let (n,): (i64,) = self.check(
            redis::pipe()
                .atomic()
                .cmd("INCRBY")
                .arg(&key)
                .arg(by)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(millis(window))
                .arg("NX")
                .ignore()
                .query_async(&mut self.conn())
                .await,
        )?;
        Ok(n)
    }

    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<LockToken>> {
        let token = LockToken::generate();
        let set: Option<String> = self.check(
            redis::cmd("SET")
                .arg(self.key(key)?)
                .arg(&token.0)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl))
                .query_async(&mut self.conn())
                .await,
        )?;
        Ok(set.map(|_| token))
    }

    async fn unlock(&self, key: &str, token: &LockToken) -> Result<bool> {
        let n: i64 = self.check(
            SCRIPTS
                .unlock
                .key(self.key(key)?)
                .arg(&token.0)
                .invoke_async(&mut self.conn())
                .await,
        )?;
        Ok(n > 0)
    }

    async fn extend_lock(&self, key: &str, token: &LockToken, ttl: Duration) -> Result<bool> {
        let n: i64 = self.check(
            SCRIPTS
                .extend
                .key(self.key(key)?)
                .arg(&token.0)
                .arg(millis(ttl))
                .invoke_async(&mut self.conn())
                .await,
        )?;
        Ok(n > 0)
    }

    async fn publish(&self, channel: &str, message: Bytes) -> Result<usize> {
        self.check(
            redis::cmd("PUBLISH")
                .arg(self.key(channel)?)
                .arg(message.as_ref())
                .query_async(&mut self.conn())
                .await,
        )
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let client = self.current.load().client.clone();
        let mut pubsub = self.check(client.get_async_pubsub().await)?;
        pubsub.subscribe(self.key(channel)?).await?;
        Ok(pubsub
            .into_on_message()
            .map(|m| Bytes::copy_from_slice(m.get_payload_bytes()))
            .boxed())
    }

    async fn acquire_slot(
        &self,
        key: &str,
        holder: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<bool> {
        let n: i64 = self.check(
            SCRIPTS
                .acquire_slot
                .key(self.key(key)?)
                .arg(holder)
                .arg(limit)
                .arg(millis(ttl))
                .invoke_async(&mut self.conn())
                .await,
        )?;
        Ok(n > 0)
    }

    async fn release_slot(&self, key: &str, holder: &str) -> Result<()> {
        self.check(
            redis::cmd("ZREM")
                .arg(self.key(key)?)
                .arg(holder)
                .query_async::<i64>(&mut self.conn())
                .await,
        )?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        self.check(
            redis::cmd("PING")
                .query_async::<String>(&mut self.conn())
                .await,
        )?;
        Ok(())
    }
}
