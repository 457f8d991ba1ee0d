//! Cache behaviour on the in-process map and on a real Redis (`MMTEST_REDIS`,
//! started by `scripts/backends.sh`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use mailmesh_cache::memory::MemoryCache;
use mailmesh_cache::redis::{RedisCache, RedisConfig};
use mailmesh_cache::{Cache, CacheError};
use mailmesh_kit::Secret;

async fn redis() -> Arc<dyn Cache> {
    let url = mailmesh_testkit::backend_env("MMTEST_REDIS");
    Arc::new(
        RedisCache::connect(&RedisConfig {
            url: Secret::new(url),
            // Each run in its own key space, so runs never see each other's keys.
            key_prefix: format!("test-{}:", uuid::Uuid::new_v4().simple()),
            command_timeout: Duration::from_secs(2),
            sentinel: None,
        })
        .await
        .unwrap(),
    )
}

async fn values_and_expiry(cache: Arc<dyn Cache>) {
    assert_eq!(cache.get("acme:k").await.unwrap(), None);
    cache
        .set("acme:k", Bytes::from_static(b"v1"), None)
        .await
        .unwrap();
    assert_eq!(cache.get("acme:k").await.unwrap().unwrap(), "v1");
    cache
        .set(
            "acme:short",
            Bytes::from_static(b"v"),
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(cache.get("acme:short").await.unwrap(), None);
    assert!(cache.delete("acme:k").await.unwrap());
    assert!(!cache.delete("acme:k").await.unwrap());
    assert!(matches!(
        cache.get("bad key\r\nFLUSHALL").await,
        Err(CacheError::InvalidKey(_))
    ));
}

/// Many tasks increment one counter at once: no increment is lost, and the window
/// starts with the first increment.
async fn atomic_counter(cache: Arc<dyn Cache>) {
    let tasks = (0..50).map(|_| {
        let cache = cache.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                cache
                    .incr("acme:rate:ip", 1, Duration::from_secs(60))
                    .await
                    .unwrap();
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    assert_eq!(
        cache
            .incr("acme:rate:ip", 0, Duration::from_secs(60))
            .await
            .unwrap(),
        1000
    );

    assert_eq!(
        cache
            .incr("acme:window", 5, Duration::from_millis(150))
            .await
            .unwrap(),
        5
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cache
            .incr("acme:window", 1, Duration::from_millis(150))
            .await
            .unwrap(),
        1,
        "a new window starts after the old one expired"
    );
}

async fn locks(cache: Arc<dyn Cache>) {
    let token = cache
        .try_lock("acme:lock", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        cache
            .try_lock("acme:lock", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    let other = cache
        .try_lock("acme:lock2", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !cache.unlock("acme:lock", &other).await.unwrap(),
        "a stranger's token"
    );
    assert!(cache.unlock("acme:lock", &token).await.unwrap());
    assert!(
        cache
            .try_lock("acme:lock", Duration::from_secs(5))
            .await
            .unwrap()
            .is_some()
    );
    // A holder keeps its lock alive by extending it; a stranger cannot.
    assert!(
        cache
            .extend_lock("acme:lock2", &other, Duration::from_millis(400))
            .await
            .unwrap()
    );
    assert!(
        !cache
            .extend_lock("acme:lock2", &token, Duration::from_secs(5))
            .await
            .unwrap(),
        "a stranger's token"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        cache
            .try_lock("acme:lock2", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none(),
        "extended past its first expiry"
    );
    // An expired lock is free again, and the old holder can no longer release it
    // nor extend it.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        !cache
            .extend_lock("acme:lock2", &other, Duration::from_secs(5))
            .await
            .unwrap()
    );
    let next = cache
        .try_lock("acme:lock2", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(next.is_some());
    assert!(!cache.unlock("acme:lock2", &other).await.unwrap());
}

async fn pub_sub(cache: Arc<dyn Cache>) {
    let mut a = cache.subscribe("acme:mailbox:1").await.unwrap();
    let mut b = cache.subscribe("acme:mailbox:1").await.unwrap();
    let mut other = cache.subscribe("acme:mailbox:2").await.unwrap();
    assert_eq!(
        cache
            .publish("acme:mailbox:1", Bytes::from_static(b"EXISTS 3"))
            .await
            .unwrap(),
        2
    );
    cache
        .publish("acme:mailbox:1", Bytes::from_static(b"EXISTS 4"))
        .await
        .unwrap();
    for sub in [&mut a, &mut b] {
        for expected in ["EXISTS 3", "EXISTS 4"] {
            let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("message within the timeout")
                .expect("stream open");
            assert_eq!(msg, expected);
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.next())
            .await
            .is_err(),
        "another channel's subscriber got nothing"
    );
    cache.ping().await.unwrap();
}

/// Slots: at most `limit` holders at once, many pods racing for them; a holder
/// renews without being refused, gives back, and lapses when it stops renewing.
async fn slots(cache: Arc<dyn Cache>) {
    let ttl = Duration::from_secs(30);
    let taken = futures::future::join_all((0..20).map(|i| {
        let cache = cache.clone();
        async move {
            cache
                .acquire_slot("conns:imap:192.0.2.1", &format!("h{i}"), 5, ttl)
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(taken.iter().filter(|t| **t).count(), 5, "{taken:?}");
    let holder = format!("h{}", taken.iter().position(|t| *t).unwrap());
    assert!(
        cache
            .acquire_slot("conns:imap:192.0.2.1", &holder, 5, ttl)
            .await
            .unwrap(),
        "renewing a held slot"
    );
    assert!(
        !cache
            .acquire_slot("conns:imap:192.0.2.1", "new", 5, ttl)
            .await
            .unwrap()
    );
    cache
        .release_slot("conns:imap:192.0.2.1", &holder)
        .await
        .unwrap();
    assert!(
        cache
            .acquire_slot("conns:imap:192.0.2.1", "new", 5, ttl)
            .await
            .unwrap()
    );
    // A holder that stops renewing (its pod died) lapses.
    assert!(
        cache
            .acquire_slot(
                "conns:pop3:192.0.2.2",
                "dead",
                1,
                Duration::from_millis(100)
            )
            .await
            .unwrap()
    );
    assert!(
        !cache
            .acquire_slot("conns:pop3:192.0.2.2", "alive", 1, ttl)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        cache
            .acquire_slot("conns:pop3:192.0.2.2", "alive", 1, ttl)
            .await
            .unwrap()
    );
}

macro_rules! behaviour {
    ($($name:ident),*) => {
        mod memory {
            use super::*;
            $(#[tokio::test]
            async fn $name() {
                super::$name(Arc::new(MemoryCache::new())).await;
            })*
        }
        mod real_redis {
            use super::*;
            $(#[tokio::test]
            async fn $name() {
                super::$name(redis().await).await;
            })*
        }
    };
}

behaviour!(values_and_expiry, atomic_counter, locks, pub_sub, slots);
