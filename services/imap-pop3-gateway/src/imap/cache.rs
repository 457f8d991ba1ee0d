//! Recently read messages, shared by the pod's IMAP sessions
//! (`imap.message_cache_bytes`). A stored message never changes, so its key —
//! tenant, user, mailbox name, UIDVALIDITY and UID — names the same bytes for as
//! long as the message exists: nothing is ever invalidated, the least useful
//! entries are evicted (S3-FIFO, by size).

use std::sync::Arc;

use mailmesh_proto::v1;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    tenant: String,
    user: String,
    mailbox: String,
    uid_validity: u32,
    uid: u32,
}

/// An entry weighs its bytes and its key's.
#[derive(Clone)]
struct BySize;

impl Weighter<Key, Arc<Vec<u8>>> for BySize {
    fn weight(&self, key: &Key, message: &Arc<Vec<u8>>) -> u64 {
        (message.len() + key.tenant.len() + key.user.len() + key.mailbox.len() + 96) as u64
    }
}

pub(crate) struct MessageCache {
    cache: Option<Cache<Key, Arc<Vec<u8>>, BySize>>,
    /// Larger messages are never kept (one would push out many small ones).
    largest: usize,
}

impl MessageCache {
    /// A cache of `bytes` (0: none).
    pub(crate) fn new(bytes: usize) -> Self {
        let cache = (bytes > 0).then(|| {
            // Sized for messages of about 16 KiB on average.
            Cache::with_weighter((bytes / (16 << 10)).max(16), bytes as u64, BySize)
        });
        Self {
            cache,
            largest: bytes / 64,
        }
    }

    fn key(user: &v1::UserRef, mailbox: &str, uid_validity: u32, uid: u32) -> Key {
        Key {
            tenant: user.tenant.clone(),
            user: user.user_id.clone(),
            mailbox: mailbox.to_owned(),
            uid_validity,
            uid,
        }
    }

    pub(crate) fn get(
        &self,
        user: &v1::UserRef,
        mailbox: &str,
        uid_validity: u32,
        uid: u32,
    ) -> Option<Arc<Vec<u8>>> {
        let found = self
            .cache
            .as_ref()?
            .get(&Self::key(user, mailbox, uid_validity, uid));
        crate::metrics::event(
            super::PROTOCOL,
            if found.is_some() {
                "message_cache_hit"
            } else {
                "message_cache_miss"
            },
        );
        found
    }

    pub(crate) fn put(
        &self,
        user: &v1::UserRef,
        mailbox: &str,
        uid_validity: u32,
        uid: u32,
        message: &Arc<Vec<u8>>,
    ) {
        if let Some(cache) = &self.cache
            && message.len() <= self.largest
        {
            cache.insert(Self::key(user, mailbox, uid_validity, uid), message.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> v1::UserRef {
        v1::UserRef {
            tenant: "acme".into(),
            user_id: "a".repeat(32),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_messages_apart_and_bounded() {
        let cache = MessageCache::new(64 << 10);
        let m = Arc::new(vec![b'x'; 512]);
        cache.put(&alice(), "INBOX", 7, 1, &m);
        assert_eq!(cache.get(&alice(), "INBOX", 7, 1), Some(m.clone()));
        // Another UIDVALIDITY, mailbox, UID or user is another message.
        assert_eq!(cache.get(&alice(), "INBOX", 8, 1), None);
        assert_eq!(cache.get(&alice(), "Archive", 7, 1), None);
        assert_eq!(cache.get(&alice(), "INBOX", 7, 2), None);
        let bob = v1::UserRef {
            user_id: "b".repeat(32),
            ..alice()
        };
        assert_eq!(cache.get(&bob, "INBOX", 7, 1), None);
        // Larger than 1/64 of the cache: not kept.
        cache.put(&alice(), "INBOX", 7, 3, &Arc::new(vec![0; 2 << 10]));
        assert_eq!(cache.get(&alice(), "INBOX", 7, 3), None);
        // Many more than fit: the cache stays within its bytes.
        for uid in 10..1000 {
            cache.put(&alice(), "INBOX", 7, uid, &m);
        }
        let held = (10..1000)
            .filter(|&uid| cache.get(&alice(), "INBOX", 7, uid).is_some())
            .count();
        assert!(held > 0 && held * 512 <= 64 << 10, "{held} held");
        // Off.
        let none = MessageCache::new(0);
        none.put(&alice(), "INBOX", 7, 1, &m);
        assert_eq!(none.get(&alice(), "INBOX", 7, 1), None);
    }
}
