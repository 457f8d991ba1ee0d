//! Mailbox change notifications for IMAP sessions. A gateway follows one storage
//! change stream per user, however many sessions of that user it holds (a phone, a
//! laptop and a webmail client idling, times every user on the pod): each change is
//! handed to every session of the user, and each keeps what concerns it. One stream
//! per session would cost storage a subscriber and the gateway an HTTP/2 stream for
//! each idling client.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use mailmesh_proto::v1;
use tokio::sync::Notify;

use crate::Gateway;

/// Change notifications for the logged-in user, from the storage change stream:
/// mailbox names that must be listed again (`all` = everything must be rechecked),
/// and flag changes that carry their new flags (applied without a listing).
#[derive(Default)]
pub(crate) struct Changes {
    pub(crate) notify: Notify,
    dirty: Mutex<Dirty>,
}

#[derive(Default)]
struct Dirty {
    all: bool,
    mailboxes: HashSet<String>,
    /// Per mailbox (lower-cased): uid → (modseq, flags), the latest seen.
    flags: HashMap<String, BTreeMap<u32, (u64, Vec<String>)>>,
}

/// Flag changes kept per session before a listing is cheaper.
const MAX_FLAG_UPDATES: usize = 1000;

/// What changed in one mailbox since the last look.
pub(crate) enum Pending {
    Nothing,
    Flags(BTreeMap<u32, (u64, Vec<String>)>),
    /// Listing again is needed (new or expunged messages, or too much to carry).
    Refresh,
}

impl Changes {
    pub(crate) fn mark(&self, mailbox: Option<&str>) {
        {
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            match mailbox {
                Some(m) => {
                    d.mailboxes.insert(m.to_ascii_lowercase());
                }
                None => d.all = true,
            }
        }
        self.notify.notify_one();
    }

    pub(crate) fn flags(&self, mailbox: &str, uid: u32, modseq: u64, flags: Vec<String>) {
        {
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            let key = mailbox.to_ascii_lowercase();
            let updates = d.flags.entry(key.clone()).or_default();
            if updates.len() >= MAX_FLAG_UPDATES {
                d.flags.remove(&key);
                d.mailboxes.insert(key);
            } else if updates.get(&uid).is_none_or(|(m, _)| *m < modseq) {
                updates.insert(uid, (modseq, flags));
            }
        }
        self.notify.notify_one();
    }

    /// What changed in `mailbox` since the last call (everything is forgotten).
    pub(crate) fn take(&self, mailbox: &str) -> Pending {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let key = mailbox.to_ascii_lowercase();
        let refresh = d.all || d.mailboxes.contains(&key);
        let flags = d.flags.remove(&key);
        d.all = false;
        d.mailboxes.clear();
        d.flags.clear();
        match (refresh, flags) {
            (true, _) => Pending::Refresh,
            (false, Some(f)) if !f.is_empty() => Pending::Flags(f),
            _ => Pending::Nothing,
        }
    }
}

/// The change streams this gateway follows: one per user with a session here.
#[derive(Default)]
pub(crate) struct Watches {
    users: Mutex<HashMap<(String, String), Arc<UserWatch>>>,
}

/// One user's stream and the sessions it feeds.
#[derive(Default)]
struct UserWatch {
    sessions: Mutex<Vec<Arc<Changes>>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// The user with the latest session token any of their sessions holds, for
    /// re-opening the stream.
    user: Mutex<v1::UserRef>,
}

impl UserWatch {
    /// Hands a change to every session of the user.
    fn each(&self, f: impl Fn(&Changes)) {
        for changes in self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            f(changes);
        }
    }
}

fn key(user: &v1::UserRef) -> (String, String) {
    (user.tenant.clone(), user.user_id.clone())
}

impl Watches {
    /// Registers a session of `user`, starting the user's stream if it is the first;
    /// `None` when the user already has `max_sessions` sessions on this pod.
    pub(crate) fn join(
        self: &Arc<Self>,
        gw: &Arc<Gateway>,
        user: &v1::UserRef,
        max_sessions: usize,
    ) -> Option<Watcher> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.get(&key(user)).is_some_and(|w| {
            w.sessions.lock().unwrap_or_else(|e| e.into_inner()).len() >= max_sessions
        }) {
            return None;
        }
        let watch = users
            .entry(key(user))
            .or_insert_with(|| {
                let watch = Arc::new(UserWatch {
                    user: Mutex::new(user.clone()),
                    ..UserWatch::default()
                });
                let task = tokio::spawn(follow(gw.clone(), Arc::downgrade(&watch)));
                *watch.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
                watch
            })
            .clone();
        crate::metrics::watch_streams(users.len());
        let changes = Arc::new(Changes::default());
        watch
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(changes.clone());
        Some(Watcher {
            changes,
            user: key(user),
            watch,
            watches: self.clone(),
        })
    }
}

/// A session's membership: its change notifications, for as long as it lives.
pub(crate) struct Watcher {
    pub(crate) changes: Arc<Changes>,
    user: (String, String),
    watch: Arc<UserWatch>,
    watches: Arc<Watches>,
}

impl Watcher {
    /// A session of the user renewed its token: the stream re-opens with it.
    pub(crate) fn renewed(&self, user: &v1::UserRef) {
        *self.watch.user.lock().unwrap_or_else(|e| e.into_inner()) = user.clone();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The map's lock first, as in `join`: a session joining meanwhile either finds
        // this stream still registered (and keeps it) or starts a new one.
        let mut users = self.watches.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut sessions = self
            .watch
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sessions.retain(|c| !Arc::ptr_eq(c, &self.changes));
        if sessions.is_empty() {
            if let Some(task) = self
                .watch
                .task
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                task.abort();
            }
            if users
                .get(&self.user)
                .is_some_and(|w| Arc::ptr_eq(w, &self.watch))
            {
                users.remove(&self.user);
            }
            crate::metrics::watch_streams(users.len());
        }
    }
}

/// Follows the storage change stream for `user` while any session of theirs is
/// here; a broken stream is re-opened and everything is marked changed (nothing is
/// missed).
async fn follow(gw: Arc<Gateway>, watch: Weak<UserWatch>) {
    let each = |f: &dyn Fn(&Changes)| {
        if let Some(w) = watch.upgrade() {
            w.each(f);
        }
    };
    // While storage is unreachable, retries back off (to 30 s), so idling sessions
    // do not all re-list their mailbox every second.
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(user) = watch
            .upgrade()
            .map(|w| w.user.lock().unwrap_or_else(|e| e.into_inner()).clone())
        else {
            return;
        };
        let user_ref = user.clone();
        match gw.store.mailboxes().watch(user).await {
            Ok(stream) => {
                backoff = Duration::from_secs(1);
                let mut stream = stream.into_inner();
                each(&|c| c.mark(None));
                while let Some(change) = stream.next().await {
                    use v1::mailbox_change::Kind;
                    if let Ok(c) = &change {
                        gw.store.advance(&user_ref, c.position);
                    }
                    match change {
                        Ok(c) if c.mailbox.is_empty() => each(&|s| s.mark(None)),
                        Ok(c) if c.kind == Kind::Flags as i32 && c.has_flags => {
                            each(&|s| s.flags(&c.mailbox, c.uid, c.modseq, c.flags.clone()))
                        }
                        Ok(c) => each(&|s| s.mark(Some(&c.mailbox))),
                        Err(_) => {
                            each(&|c| c.mark(None));
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "watching mailbox changes"),
        }
        each(&|c| c.mark(None));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
