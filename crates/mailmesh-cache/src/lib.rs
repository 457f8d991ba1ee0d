//! Caches, counters, locks and pub/sub: Redis in production, an in-process map for
//! `mailctl dev` and unit tests. Nothing here is the only copy of anything: losing the
//! cache loses no mail and no account (DESIGN invariant 3), only warm state.

pub mod login;
pub mod memory;
pub mod redis;
pub mod slots;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::Deserialize;

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("invalid cache key {0:?}")]
    InvalidKey(String),
}

/// Proof of holding a lock; pass it back to release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken(String);

impl LockToken {
    fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }
}

/// Messages published on a channel after the subscription started.
pub type Subscription = BoxStream<'static, Bytes>;

#[async_trait]
pub trait Cache: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Sets a value that expires after `ttl` (no expiry when `None`).
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()>;

    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Atomically adds `by` and returns the new value. The first increment of a key
    /// starts its `window`: the key expires `window` after it was created (a fixed
    /// window rate-limit counter).
    async fn incr(&self, key: &str, by: i64, window: Duration) -> Result<i64>;

    /// Takes the lock if free. It expires after `ttl` so a crashed holder cannot keep
    /// it; use locks for efficiency, never for correctness (fence with durable state).
    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<LockToken>>;

    /// Releases the lock if `token` still holds it; returns whether it did.
    async fn unlock(&self, key: &str, token: &LockToken) -> Result<bool>;

    /// Gives the lock `ttl` more from now if `token` still holds it; false when it
    /// expired or someone else took it (the holder has lost it).
    async fn extend_lock(&self, key: &str, token: &LockToken, ttl: Duration) -> Result<bool>;

    /// Publishes to every current subscriber of `channel`; returns how many got it
    /// (in this process for the in-process cache, on this server for Redis).
    async fn publish(&self, channel: &str, message: Bytes) -> Result<usize>;

    async fn subscribe(&self, channel: &str) -> Result<Subscription>;

    async fn ping(&self) -> Result<()>;

    /// Takes (or renews) `holder`'s slot under `key` for `ttl`, unless `limit` other
    /// unexpired slots are held there: a gauge shared by every pod (connections per
    /// client address), whose slots lapse by themselves when a holder dies. True when
    /// the slot is held now.
    async fn acquire_slot(
        &self,
        key: &str,
        holder: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<bool>;

    /// Gives `holder`'s slot under `key` back.
    async fn release_slot(&self, key: &str, holder: &str) -> Result<()>;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheConfig {
    Redis(redis::RedisConfig),
    Memory,
}

pub async fn open(config: &CacheConfig) -> Result<Arc<dyn Cache>> {
    Ok(match config {
        CacheConfig::Redis(c) => Arc::new(redis::RedisCache::connect(c).await?),
        CacheConfig::Memory => Arc::new(memory::MemoryCache::new()),
    })
}

/// Keys are built from validated identifiers (`tenant:rate:…`); refusing control
/// characters and whitespace keeps a raw client string from forging a key.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 512 || key.chars().any(|c| c.is_control() || c == ' ') {
        return Err(CacheError::InvalidKey(key.chars().take(64).collect()));
    }
    Ok(())
}

/// A readiness check for the admin port.
pub struct CacheReadiness(pub Arc<dyn Cache>);

#[async_trait]
impl mailmesh_kit::ReadinessCheck for CacheReadiness {
    fn name(&self) -> &str {
        "cache"
    }

    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}
