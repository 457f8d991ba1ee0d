//! Message objects the index no longer names.
//!
//! *Expunged bodies* stay readable for `expunged_retention`: an IMAP session learns
//! of an expunge only at its next command that may carry the news (RFC 3501 §7.4.1,
//! RFC 2180 §4.1), and until then the message still exists in its view, so a FETCH
//! of it is answered with the data rather than `NO [EXPUNGEISSUED]`. They wait, in
//! expunge order, in a bounded queue in memory on the replica that applied the
//! expunge (the partition's owner, where every call for the user goes) and are
//! deleted when their time is up, at once when the queue is full, and at shutdown.
//!
//! *Orphans* are objects written before a command that never landed: a crash
//! between the object write and the index command, a timeout with no outcome, an
//! expunged body whose replica died before deleting it. The orphan sweep lists each
//! user's objects on the owner of the user's partition and deletes those older than
//! `orphan_grace` that the user's index does not name and the expunged queue does
//! not hold. Objects that old can no longer become named: every command refers to
//! objects written just before it, and is applied (or lost) within `write_timeout`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::engine::UserRef;
use crate::index::Uid;

/// An expunged message whose object is kept for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Retired {
    pub(crate) user: UserRef,
    /// The object's key relative to the user's prefix.
    pub(crate) object: String,
    /// The mailbox (canonical name) and UID it had, for sessions still using them.
    pub(crate) message: Option<(String, Uid)>,
}

#[derive(Default)]
struct Queue {
    by_age: VecDeque<(Instant, Retired)>,
    /// (user key, mailbox, UID) → object.
    by_message: HashMap<(String, String, Uid), String>,
    /// (user key, object) for the orphan sweep.
    objects: HashSet<(String, String)>,
}

impl Queue {
    fn pop(&mut self) -> Option<Retired> {
        let (_, retired) = self.by_age.pop_front()?;
        let user = retired.user.key();
        if let Some((mailbox, uid)) = &retired.message {
            let key = (user.clone(), mailbox.clone(), *uid);
            // A later expunge of the same UID (a recreated mailbox) replaced it.
            if self.by_message.get(&key) == Some(&retired.object) {
                self.by_message.remove(&key);
            }
        }
        self.objects.remove(&(user, retired.object.clone()));
        Some(retired)
    }
}

/// Expunged bodies waiting to be deleted.
pub(crate) struct ExpungedBodies {
    retention: Duration,
    max: usize,
    queue: Mutex<Queue>,
}

impl ExpungedBodies {
    pub(crate) fn new(retention: Duration, max: usize) -> Self {
        Self {
            retention,
            max,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `retired` for the retention; returns what must be deleted now (all of
    /// it without a retention, the oldest when the queue is over its bound).
    pub(crate) fn keep(&self, retired: Vec<Retired>) -> Vec<Retired> {
        if self.retention.is_zero() || self.max == 0 {
            return retired;
        }
        let now = Instant::now();
        let mut queue = self.lock();
        for r in retired {
            let user = r.user.key();
            if let Some((mailbox, uid)) = &r.message {
                queue
                    .by_message
                    .insert((user.clone(), mailbox.clone(), *uid), r.object.clone());
            }
            queue.objects.insert((user, r.object.clone()));
            queue.by_age.push_back((now, r));
        }
        let mut now_gone = Vec::new();
        while queue.by_age.len() > self.max {
            now_gone.extend(queue.pop());
        }
        crate::metrics::expunged_kept(queue.by_age.len());
        now_gone
    }

    /// The object an expunged message of `user` had, while it is kept.
    pub(crate) fn find(&self, user: &UserRef, mailbox: &str, uid: Uid) -> Option<String> {
        self.lock()
            .by_message
            .get(&(user.key(), mailbox.to_owned(), uid))
            .cloned()
    }

    /// Whether `object` of `user` is kept.
    pub(crate) fn holds(&self, user: &UserRef, object: &str) -> bool {
        self.lock()
            .objects
            .contains(&(user.key(), object.to_owned()))
    }

    /// Takes what has been kept for the retention (everything with `all`).
    pub(crate) fn due(&self, all: bool) -> Vec<Retired> {
        let now = Instant::now();
        let mut queue = self.lock();
        let mut due = Vec::new();
        while let Some((at, _)) = queue.by_age.front() {
            if !all && now.duration_since(*at) < self.retention {
                break;
            }
            due.extend(queue.pop());
        }
        crate::metrics::expunged_kept(queue.by_age.len());
        due
    }
}

/// What an orphan sweep found and removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Users whose objects were listed.
    pub users: u64,
    pub objects: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u32) -> UserRef {
        UserRef {
            tenant: "acme".parse().unwrap(),
            user: crate::directory::UserId(uuid::Uuid::from_u128(u128::from(n))),
        }
    }

    fn retired(u: u32, uid: Uid) -> Retired {
        Retired {
            user: user(u),
            object: format!("1/cur/{u}-{uid}"),
            message: Some(("INBOX".into(), uid)),
        }
    }

    #[test]
    fn kept_until_due_and_bounded() {
        let kept = ExpungedBodies::new(Duration::from_secs(3600), 3);
        assert!(kept.keep(vec![retired(1, 1), retired(1, 2)]).is_empty());
        assert_eq!(
            kept.find(&user(1), "INBOX", 2).as_deref(),
            Some("1/cur/1-2")
        );
        assert_eq!(kept.find(&user(2), "INBOX", 2), None);
        assert!(kept.holds(&user(1), "1/cur/1-1"));
        // Over the bound, the oldest goes at once.
        let now = kept.keep(vec![retired(2, 1), retired(2, 2)]);
        assert_eq!(now, vec![retired(1, 1)]);
        assert!(!kept.holds(&user(1), "1/cur/1-1"));
        assert_eq!(kept.find(&user(1), "INBOX", 1), None);
        assert!(kept.due(false).is_empty(), "not due within the retention");
        assert_eq!(kept.due(true).len(), 3);
        assert_eq!(kept.find(&user(2), "INBOX", 1), None);

        let none = ExpungedBodies::new(Duration::ZERO, 10);
        assert_eq!(none.keep(vec![retired(1, 1)]), vec![retired(1, 1)]);
    }
}
