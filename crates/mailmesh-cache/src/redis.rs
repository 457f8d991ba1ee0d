//! The cache on Redis. Keys carry a configurable prefix so several deployments can
//! share one server.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use mailmesh_kit::Secret;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use crate::{Cache, LockToken, Result, Subscription, validate_key};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` or `rediss://…` for TLS.
    pub url: Secret<String>,
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// A command that takes longer fails (callers fall back or answer a 4xx).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
}

fn default_prefix() -> String {
    "mailmesh:".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

pub struct RedisCache {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisCache {
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let client = redis::Client::open(config.url.expose().as_str())?;
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.command_timeout))
            .set_connection_timeout(Some(config.command_timeout));
        let conn = ConnectionManager::new_with_config(client.clone(), manager).await?;
        Ok(Self {
            client,
            conn,
            prefix: config.key_prefix.clone(),
        })
    }

    fn key(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(key)?)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(value.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)?).arg(value.as_ref());
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        cmd.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let n: i64 = redis::cmd("DEL")
            .arg(self.key(key)?)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n > 0)
    }

    async fn incr(&self, key: &str, by: i64, window: Duration) -> Result<i64> {
        let key = self.key(key)?;
        // One round trip, atomic: the expiry is set only by the increment that
        // created the key (PEXPIRE … NX, Redis 7).
        let (n,): (i64,) = redis::pipe()
            .atomic()
            .cmd("INCRBY")
            .arg(&key)
            .arg(by)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(millis(window))
            .arg("NX")
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n)
    }

    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<LockToken>> {
        let token = LockToken::generate();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(key)?)
            .arg(&token.0)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(set.map(|_| token))
    }

    async fn unlock(&self, key: &str, token: &LockToken) -> Result<bool> {
        let n: i64 = redis::Script::new(UNLOCK)
            .key(self.key(key)?)
            .arg(&token.0)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n > 0)
    }

    async fn extend_lock(&self, key: &str, token: &LockToken, ttl: Duration) -> Result<bool> {
        let n: i64 = redis::Script::new(EXTEND)
            .key(self.key(key)?)
            .arg(&token.0)
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n > 0)
    }

    async fn publish(&self, channel: &str, message: Bytes) -> Result<usize> {
        let n: usize = redis::cmd("PUBLISH")
            .arg(self.key(channel)?)
            .arg(message.as_ref())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n)
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.key(channel)?).await?;
        Ok(pubsub
            .into_on_message()
            .map(|m| Bytes::copy_from_slice(m.get_payload_bytes()))
            .boxed())
    }

    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
