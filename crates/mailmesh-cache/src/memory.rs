//! The in-process cache, with the same semantics as Redis within one process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;

use crate::{Cache, LockToken, Result, Subscription, validate_key};

/// Messages a slow subscriber may fall behind by before it misses some (as a Redis
/// subscriber over its output buffer limit would).
const CHANNEL_CAPACITY: usize = 1024;

struct Entry {
    value: Bytes,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<HashMap<String, Entry>>,
    channels: Mutex<HashMap<String, broadcast::Sender<Bytes>>>,
    /// key → holder → expiry.
    slots: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl MemoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_entries<T>(&self, f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> T) -> T {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Expired entries go when the map has grown, so memory stays bounded by live
        // keys without a sweeper task.
        if entries.len() > 1024 && entries.len().is_power_of_two() {
            entries.retain(|_, e| e.live(now));
        }
        f(&mut entries, now)
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn acquire_slot(
        &self,
        key: &str,
        holder: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<bool> {
        validate_key(key)?;
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let held = slots.entry(key.to_owned()).or_default();
        held.retain(|_, expires| *expires > now);
        if !held.contains_key(holder) && held.len() >= limit as usize {
            return Ok(false);
        }
        held.insert(holder.to_owned(), now + ttl);
        Ok(true)
    }

    async fn release_slot(&self, key: &str, holder: &str) -> Result<()> {
        validate_key(key)?;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = slots.get_mut(key) {
            held.remove(holder);
            if held.is_empty() {
                slots.remove(key);
            }
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        validate_key(key)?;
        Ok(self.with_entries(|m, now| m.get(key).filter(|e| e.live(now)).map(|e| e.value.clone())))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        validate_key(key)?;
        self.with_entries(|m, now| {
            m.insert(
                key.to_owned(),
                Entry {
                    value,
                    expires: ttl.map(|t| now + t),
                },
            )
        });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        Ok(self.with_entries(|m, now| m.remove(key).is_some_and(|e| e.live(now))))
    }

    async fn incr(&self, key: &str, by: i64, window: Duration) -> Result<i64> {
        validate_key(key)?;
        Ok(self.with_entries(|m, now| {
            let current = m.get(key).filter(|e| e.live(now)).map(|e| {
                let n = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0);
                (n, e.expires)
            });
            let (n, expires) = match current {
                Some((n, expires)) => (n + by, expires),
                None => (by, Some(now + window)),
            };
            m.insert(
                key.to_owned(),
                Entry {
                    value: Bytes::from(n.to_string()),
                    expires,
                },
            );
            n
        }))
    }

    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<LockToken>> {
        validate_key(key)?;
        Ok(self.with_entries(|m, now| {
            if m.get(key).is_some_and(|e| e.live(now)) {
                return None;
            }
            let token = LockToken::generate();
            m.insert(
                key.to_owned(),
                Entry {
                    value: Bytes::from(token.0.clone()),
                    expires: Some(now + ttl),
                },
            );
            Some(token)
        }))
    }

    async fn unlock(&self, key: &str, token: &LockToken) -> Result<bool> {
        validate_key(key)?;
        Ok(self.with_entries(|m, now| {
            let held = m
                .get(key)
                .is_some_and(|e| e.live(now) && e.value == token.0.as_bytes());
            if held {
                m.remove(key);
            }
            held
        }))
    }

    async fn extend_lock(&self, key: &str, token: &LockToken, ttl: Duration) -> Result<bool> {
        validate_key(key)?;
        Ok(self.with_entries(|m, now| match m.get_mut(key) {
            Some(e) if e.live(now) && e.value == token.0.as_bytes() => {
                e.expires = Some(now + ttl);
                true
            }
            _ => false,
        }))
    }

    async fn publish(&self, channel: &str, message: Bytes) -> Result<usize> {
        validate_key(channel)?;
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        Ok(channels
            .get(channel)
            .and_then(|tx| tx.send(message).ok())
            .unwrap_or(0))
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription> {
        validate_key(channel)?;
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.retain(|_, tx| tx.receiver_count() > 0);
        let rx = channels
            .entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        Ok(tokio_stream_from(rx))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

fn tokio_stream_from(rx: broadcast::Receiver<Bytes>) -> Subscription {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(msg) => return Some((msg, rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "pub/sub subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}
