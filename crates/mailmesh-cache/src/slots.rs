//! Connections per client address, counted across every pod: each connection holds
//! a slot in the cache (a sorted set scored by expiry in Redis) that it renews while
//! it lives and gives back when it ends, so a pod that dies leaves nothing counted
//! for longer than a slot's lifetime. An unreachable cache lifts the limit (as it
//! does rate limits) rather than refusing everyone.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::Cache;
use crate::login::address_key;

/// How long a slot lives without renewal; renewed every third of it.
const SLOT_TTL: Duration = Duration::from_secs(120);

/// A held slot: renewed in the background, given back when dropped.
pub struct Slot {
    release: Option<(Arc<dyn Cache>, String, String)>,
    renewal: Option<tokio::task::AbortHandle>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        if let Some((cache, key, holder)) = self.release.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = cache.release_slot(&key, &holder).await;
            });
        }
    }
}

/// Takes one of `limit` connection slots of `client` (IPv6: its /64) under `scope`
/// (`smtp`, `imap`, …); `None` when `limit` are held already. A `limit` of 0 is no
/// limit.
pub async fn connection_slot(
    cache: &Arc<dyn Cache>,
    scope: &str,
    client: IpAddr,
    limit: u32,
) -> Option<Slot> {
    if limit == 0 {
        return Some(Slot {
            release: None,
            renewal: None,
        });
    }
    let key = format!("conns:{scope}:{}", address_key(client));
    let holder = uuid::Uuid::new_v4().simple().to_string();
    match cache.acquire_slot(&key, &holder, limit, SLOT_TTL).await {
        Ok(false) => return None,
        Ok(true) => {}
        Err(e) => {
            tracing::debug!(error = %e, "connection slots unavailable: not limiting");
            return Some(Slot {
                release: None,
                renewal: None,
            });
        }
    }
    let renewal = {
        let (cache, key, holder) = (cache.clone(), key.clone(), holder.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SLOT_TTL / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                // Renewing never refuses a slot already held.
                let _ = cache.acquire_slot(&key, &holder, u32::MAX, SLOT_TTL).await;
            }
        })
        .abort_handle()
    };
    Some(Slot {
        release: Some((cache.clone(), key, holder)),
        renewal: Some(renewal),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryCache;

    #[tokio::test]
    async fn slots_are_counted_per_address_and_given_back() {
        let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        let held: Vec<Slot> =
            futures::future::join_all((0..3).map(|_| connection_slot(&cache, "imap", a, 3)))
                .await
                .into_iter()
                .map(Option::unwrap)
                .collect();
        assert!(connection_slot(&cache, "imap", a, 3).await.is_none());
        // Another address, another protocol: their own slots.
        assert!(connection_slot(&cache, "imap", b, 3).await.is_some());
        assert!(connection_slot(&cache, "pop3", a, 3).await.is_some());
        // IPv6 counts per /64.
        let _b1 = connection_slot(&cache, "smtp", b, 1).await.unwrap();
        assert!(connection_slot(&cache, "smtp", same_64, 1).await.is_none());
        // One given back: one more may come.
        drop(held.into_iter().next());
        for _ in 0..100 {
            if connection_slot(&cache, "imap", a, 3).await.is_some() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the dropped slot was not given back");
    }
}
