//! One user's mailbox index: mailboxes with SPECIAL-USE roles, UIDVALIDITY, UIDNEXT,
//! per-message UID, flags and keywords, internal date, size, MODSEQ, the expunge log,
//! quota usage and the delivery keys that make delivery idempotent.
//!
//! [`UserIndex::apply`] is deterministic: it takes time only from the command's
//! timestamp and iterates only ordered maps, so replicas replaying one log agree
//! (docs/adr/0001-mailbox-index.md).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Result, StorageError};

pub type Uid = u32;
pub type ModSeq = u64;

/// A mailbox's identity within its user, stable across renames; used in object keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MailboxId(pub u32);

impl std::fmt::Display for MailboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// RFC 6154 roles of the mailboxes every new user gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SpecialUse {
    Sent,
    Drafts,
    Trash,
    Junk,
    Archive,
}

impl SpecialUse {
    pub fn attribute(self) -> &'static str {
        match self {
            Self::Sent => "\\Sent",
            Self::Drafts => "\\Drafts",
            Self::Trash => "\\Trash",
            Self::Junk => "\\Junk",
            Self::Archive => "\\Archive",
        }
    }
}

pub const INBOX: &str = "INBOX";
/// The default Junk mailbox (`\\Junk`), where a tenant's policy may file mail.
pub const JUNK: &str = "Junk";
/// The hierarchy delimiter of mailbox names.
pub const DELIMITER: char = '/';

const DEFAULT_MAILBOXES: [(&str, Option<SpecialUse>); 6] = [
    (INBOX, None),
    ("Sent", Some(SpecialUse::Sent)),
    ("Drafts", Some(SpecialUse::Drafts)),
    ("Trash", Some(SpecialUse::Trash)),
    (JUNK, Some(SpecialUse::Junk)),
    ("Archive", Some(SpecialUse::Archive)),
];

/// Bounds on what one user's index may hold; every one is configurable. They travel
/// inside commands, so unknown fields (from a newer version) are tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IndexLimits {
    pub max_mailboxes: usize,
    pub max_mailbox_name_bytes: usize,
    pub max_keywords_per_message: usize,
    pub max_keyword_bytes: usize,
    /// Expunged UIDs remembered per mailbox for QRESYNC `VANISHED`.
    pub max_expunge_log: usize,
    /// How long a delivery key is remembered (redelivery within it stores nothing).
    pub delivery_key_ttl_ms: i64,
    /// At most this many delivery keys are kept per user (the newest), however many
    /// arrived within the TTL: a busy mailbox would otherwise hold every key of two
    /// weeks in memory (`loadtest/smtp-soak.sh` grew by 0.3 KB per message). A
    /// redelivery comes within minutes of the first, far inside this bound.
    pub max_delivery_keys: usize,
    /// How long a client's request id is remembered with its outcome: a request
    /// sent again within it (the client did not hear the answer) is not applied
    /// twice (issue 20, defect 2).
    pub request_ttl_ms: i64,
    /// At most this many requests are remembered per user (the newest).
    pub max_requests: usize,
}

impl Default for IndexLimits {
    fn default() -> Self {
        Self {
            max_mailboxes: 1000,
            max_mailbox_name_bytes: 255,
            max_keywords_per_message: 64,
            max_keyword_bytes: 100,
            max_expunge_log: 10_000,
            delivery_key_ttl_ms: 14 * 24 * 3600 * 1000,
            max_delivery_keys: 65_536,
            request_ttl_ms: 10 * 60 * 1000,
            max_requests: 32,
        }
    }
}

/// Message flags: the RFC 3501 system flags (`\Recent` is per session, not stored)
/// and keywords.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    pub seen: bool,
    pub answered: bool,
    pub flagged: bool,
    pub deleted: bool,
    pub draft: bool,
    pub keywords: BTreeSet<String>,
}

impl Flags {
    /// Parses IMAP flag names (`\Seen`, `$Forwarded`, …); unknown system flags and
    /// malformed keywords are refused.
    pub fn parse<'a>(
        names: impl IntoIterator<Item = &'a str>,
        limits: &IndexLimits,
    ) -> Result<Self> {
        let mut flags = Self::default();
        for name in names {
            match name.to_ascii_lowercase().as_str() {
                "\\seen" => flags.seen = true,
                "\\answered" => flags.answered = true,
                "\\flagged" => flags.flagged = true,
                "\\deleted" => flags.deleted = true,
                "\\draft" => flags.draft = true,
                _ if name.starts_with('\\') => {
                    return Err(StorageError::InvalidArgument(format!(
                        "unknown system flag {name}"
                    )));
                }
                _ => {
                    let atom = |c: char| {
                        c.is_ascii_graphic()
                            && !matches!(c, '(' | ')' | '{' | '%' | '*' | '"' | '\\' | ']')
                    };
                    if name.is_empty()
                        || name.len() > limits.max_keyword_bytes
                        || !name.chars().all(atom)
                    {
                        return Err(StorageError::InvalidArgument(format!(
                            "invalid keyword {name:?}"
                        )));
                    }
                    flags.keywords.insert(name.to_owned());
                }
            }
        }
        if flags.keywords.len() > limits.max_keywords_per_message {
            return Err(StorageError::InvalidArgument("too many keywords".into()));
        }
        Ok(flags)
    }

    /// IMAP names, system flags first.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (set, name) in [
            (self.seen, "\\Seen"),
            (self.answered, "\\Answered"),
            (self.flagged, "\\Flagged"),
            (self.deleted, "\\Deleted"),
            (self.draft, "\\Draft"),
        ] {
            if set {
                out.push(name.to_owned());
            }
        }
        out.extend(self.keywords.iter().cloned());
        out
    }

    fn union(&self, other: &Self) -> Self {
        Self {
            seen: self.seen || other.seen,
            answered: self.answered || other.answered,
            flagged: self.flagged || other.flagged,
            deleted: self.deleted || other.deleted,
            draft: self.draft || other.draft,
            keywords: self.keywords.union(&other.keywords).cloned().collect(),
        }
    }

    fn minus(&self, other: &Self) -> Self {
        Self {
            seen: self.seen && !other.seen,
            answered: self.answered && !other.answered,
            flagged: self.flagged && !other.flagged,
            deleted: self.deleted && !other.deleted,
            draft: self.draft && !other.draft,
            keywords: self.keywords.difference(&other.keywords).cloned().collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub uid: Uid,
    /// The object's key relative to the user's prefix (`<mailbox-id>/cur/<name>`).
    /// It keeps naming where the bytes are when the message changes mailbox (RENAME
    /// INBOX), so it is stored, never rebuilt from the current mailbox.
    pub object: String,
    pub size: u64,
    pub internal_date_ms: i64,
    pub flags: Flags,
    pub modseq: ModSeq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    pub id: MailboxId,
    pub name: String,
    pub role: Option<SpecialUse>,
    pub uidvalidity: u32,
    pub uidnext: Uid,
    pub highest_modseq: ModSeq,
    pub messages: BTreeMap<Uid, Message>,
    /// Recently expunged UIDs and the MODSEQ of their expunge (QRESYNC).
    pub expunged: BTreeMap<Uid, ModSeq>,
    /// The highest MODSEQ of an expunge dropped from `expunged` (the log is bounded,
    /// oldest expunges go first): a client asking for expunges since an older MODSEQ
    /// cannot get a complete list. `None` in snapshots older than this field, whose
    /// log may have been trimmed without a record of it.
    #[serde(default)]
    pub vanished_floor: Option<ModSeq>,
    /// The lowest UID no IMAP session has been told is recent (RFC 3501 §2.3.2):
    /// messages from here on are `\Recent` to the next session that claims them.
    pub first_recent_uid: Uid,
}

impl Mailbox {
    pub fn status(&self) -> MailboxStatus {
        MailboxStatus {
            messages: self.messages.len() as u32,
            unseen: self.messages.values().filter(|m| !m.flags.seen).count() as u32,
            deleted: self.messages.values().filter(|m| m.flags.deleted).count() as u32,
            uidnext: self.uidnext,
            uidvalidity: self.uidvalidity,
            highest_modseq: self.highest_modseq,
            size: self.messages.values().map(|m| m.size).sum(),
            recent: self.messages.range(self.first_recent_uid..).count() as u32,
        }
    }

    fn bump(&mut self) -> ModSeq {
        self.highest_modseq += 1;
        self.highest_modseq
    }

    fn log_expunge(&mut self, uid: Uid, modseq: ModSeq, limit: usize) {
        self.expunged.insert(uid, modseq);
        while self.expunged.len() > limit {
            // The oldest expunge (lowest MODSEQ, then lowest UID: deterministic).
            let Some((&oldest, &dropped)) = self.expunged.iter().min_by_key(|(u, m)| (**m, **u))
            else {
                break;
            };
            self.expunged.remove(&oldest);
            self.vanished_floor = Some(self.vanished_floor.unwrap_or(0).max(dropped));
        }
    }

    /// The UIDs expunged after `since` that the expunge log still holds (all of them
    /// when [`Self::expunges_complete_since`]).
    pub fn expunged_since(&self, since: ModSeq) -> Vec<Uid> {
        self.expunged
            .iter()
            .filter(|(_, modseq)| **modseq > since)
            .map(|(uid, _)| *uid)
            .collect()
    }

    /// Whether `expunged` lists every expunge after `since`; `limit` is the log's
    /// bound (for snapshots that predate `vanished_floor`).
    pub fn expunges_complete_since(&self, since: ModSeq, limit: usize) -> bool {
        match self.vanished_floor {
            Some(floor) => since >= floor,
            // Never trimmed if it never reached the bound; otherwise unknown.
            None => self.expunged.len() < limit,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxStatus {
    pub messages: u32,
    pub unseen: u32,
    #[serde(default)]
    pub deleted: u32,
    pub uidnext: Uid,
    pub uidvalidity: u32,
    pub highest_modseq: ModSeq,
    pub size: u64,
    /// Messages no session has been told about yet (STATUS RECENT).
    #[serde(default)]
    pub recent: u32,
}

/// An inclusive UID range (`4:9`); `4:4` is one UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRange {
    pub first: Uid,
    pub last: Uid,
}

impl UidRange {
    pub fn one(uid: Uid) -> Self {
        Self {
            first: uid,
            last: uid,
        }
    }
}

fn uids_in<'a>(
    messages: &'a BTreeMap<Uid, Message>,
    ranges: &'a [UidRange],
) -> impl Iterator<Item = Uid> + 'a {
    let mut selected = BTreeSet::new();
    for r in ranges {
        let (lo, hi) = (r.first.min(r.last), r.first.max(r.last));
        selected.extend(messages.range(lo..=hi).map(|(uid, _)| *uid));
    }
    selected.into_iter()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreAction {
    Add,
    Remove,
    Replace,
}

/// A message to add: its object is already written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    pub object: String,
    pub size: u64,
    pub internal_date_ms: i64,
    pub flags: Flags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum IndexCommand {
    /// Creates the default mailboxes; does nothing for an initialised user.
    Init,
    CreateMailbox {
        name: String,
        role: Option<SpecialUse>,
    },
    RenameMailbox {
        from: String,
        to: String,
    },
    DeleteMailbox {
        name: String,
    },
    Subscribe {
        name: String,
        subscribed: bool,
    },
    Append {
        mailbox: String,
        message: NewMessage,
        /// Queue id + recipient for deliveries: a replay stores nothing new.
        delivery_key: Option<String>,
        /// The user's quota when the command was made; `None` is unlimited.
        quota_bytes: Option<u64>,
    },
    Store {
        mailbox: String,
        uids: Vec<UidRange>,
        action: StoreAction,
        flags: Flags,
        /// CONDSTORE `UNCHANGEDSINCE`: messages changed after it are left alone.
        unchanged_since: Option<ModSeq>,
    },
    /// COPY, or MOVE when `remove_source`. `objects` names the copy of each source
    /// message, written before the command.
    Copy {
        from: String,
        to: String,
        objects: Vec<(Uid, String)>,
        remove_source: bool,
        quota_bytes: Option<u64>,
    },
    /// Removes `\Deleted` messages (all of them, or those in `uids` for UID EXPUNGE).
    Expunge {
        mailbox: String,
        uids: Option<Vec<UidRange>>,
    },
    /// An IMAP4rev1 session takes the messages below `up_to` that no session was
    /// told about as its `\Recent` ones (RFC 3501 §2.3.2): the log's order decides
    /// which session gets each message, across pods.
    ClaimRecent {
        mailbox: String,
        uidvalidity: u32,
        up_to: Uid,
    },
    /// The client gives up a request whose answer it did not hear: applied before,
    /// its outcome comes back ([`IndexOutcome::Repeated`]); otherwise it never will
    /// be (a late copy is refused), so the client can say it did not happen.
    Abandon,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexOutcome {
    Done,
    MailboxCreated {
        id: MailboxId,
        uidvalidity: u32,
    },
    Appended {
        mailbox: MailboxId,
        uidvalidity: u32,
        uid: Uid,
        /// A delivery replayed: the message was stored before, under `uid`.
        duplicate: bool,
    },
    Stored {
        /// Changed messages with their new flags and MODSEQ.
        changed: Vec<(Uid, Flags, ModSeq)>,
        /// UIDs left alone because of `UNCHANGEDSINCE` (the `[MODIFIED]` set).
        modified: Vec<Uid>,
    },
    Copied {
        uidvalidity: u32,
        /// (source UID, destination UID) for COPYUID.
        mapping: Vec<(Uid, Uid)>,
        /// Copies the command carried that were not used (their source vanished);
        /// the proposer deletes these objects.
        unused_objects: Vec<String>,
        /// For MOVE: source messages removed, with their objects to delete.
        expunged: Vec<(Uid, String)>,
    },
    Expunged {
        mailbox: MailboxId,
        /// Removed UIDs with their objects, which the proposer deletes.
        removed: Vec<(Uid, String)>,
    },
    /// UIDs `from..to` are this session's recent messages (none when equal).
    RecentClaimed {
        from: Uid,
        to: Uid,
    },
    /// A rename; renaming INBOX moves its messages to the new mailbox (RFC 3501).
    Renamed {
        moved_messages: usize,
    },
    /// A mailbox deleted, with the objects of its messages for the proposer to delete.
    MailboxDeleted {
        removed: Vec<String>,
    },
    /// The request was applied before, with this outcome (as remembered: objects
    /// the first attempt handled and long lists left out). Nothing changed now.
    Repeated(Box<IndexOutcome>),
    /// An [`IndexCommand::Abandon`] came first: the request will never be applied.
    Abandoned,
}

/// Entries of a remembered outcome's lists kept for a repeated request; a longer
/// list is left out (the client's view catches up from the mailbox's changes).
const REMEMBERED_ENTRIES: usize = 256;

/// A STORE's `[MODIFIED]` set is the answer itself and is kept up to this many
/// UIDs (the gateway sends at most 5,000 messages per STORE); a caller sending
/// larger ones loses it on a repeat. Bounds what a user's 32 remembered requests
/// can hold to about 1 MiB.
const REMEMBERED_MODIFIED: usize = 8192;

impl IndexOutcome {
    /// What a repeated request is answered: what the client needs, not the objects
    /// the first attempt deleted (or left to the orphan sweep).
    fn remembered(&self) -> IndexOutcome {
        fn short<T: Clone>(list: &[T]) -> Vec<T> {
            if list.len() <= REMEMBERED_ENTRIES {
                list.to_vec()
            } else {
                Vec::new()
            }
        }
        match self {
            Self::Stored { changed, modified } => Self::Stored {
                changed: short(changed),
                modified: if modified.len() <= REMEMBERED_MODIFIED {
                    modified.clone()
                } else {
                    Vec::new()
                },
            },
            Self::Copied {
                uidvalidity,
                mapping,
                ..
            } => Self::Copied {
                uidvalidity: *uidvalidity,
                mapping: short(mapping),
                unused_objects: Vec::new(),
                expunged: Vec::new(),
            },
            Self::Expunged { mailbox, removed } => Self::Expunged {
                mailbox: *mailbox,
                removed: short(removed)
                    .into_iter()
                    .map(|(uid, _)| (uid, String::new()))
                    .collect(),
            },
            Self::MailboxDeleted { .. } => Self::MailboxDeleted {
                removed: Vec::new(),
            },
            other => other.clone(),
        }
    }
}

/// A client's request applied to the index, kept for [`IndexLimits::request_ttl_ms`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    id: Uuid,
    at_ms: i64,
    /// A refusal is remembered too: a late copy of a refused (or abandoned)
    /// request must not succeed after the client was told it failed.
    outcome: std::result::Result<IndexOutcome, StorageError>,
}

/// A change other sessions should hear about (IMAP untagged responses, IDLE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    MailboxesChanged,
    Exists {
        mailbox: MailboxId,
        uid: Uid,
    },
    Flags {
        mailbox: MailboxId,
        uid: Uid,
        modseq: ModSeq,
    },
    Expunge {
        mailbox: MailboxId,
        uid: Uid,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Delivered {
    mailbox: MailboxId,
    uid: Uid,
    at_ms: i64,
}

/// Everything the index knows about one user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIndex {
    mailboxes: BTreeMap<MailboxId, Mailbox>,
    next_mailbox_id: u32,
    last_uidvalidity: u32,
    used_bytes: u64,
    deliveries: BTreeMap<String, Delivered>,
    initialised: bool,
    /// Subscribed names (canonical), a list of its own (RFC 3501 §6.3.6): a name
    /// may be subscribed with no mailbox, and stays subscribed across DELETE.
    subscriptions: BTreeSet<String>,
    /// Recent client requests with their outcomes, oldest first.
    #[serde(default)]
    requests: VecDeque<Remembered>,
}

/// A user's index as user format 2 held it (before remembered requests). Read
/// only, to convert.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct UserIndexFormat2 {
    mailboxes: BTreeMap<MailboxId, Mailbox>,
    next_mailbox_id: u32,
    last_uidvalidity: u32,
    used_bytes: u64,
    deliveries: BTreeMap<String, Delivered>,
    initialised: bool,
    subscriptions: BTreeSet<String>,
}

impl From<UserIndexFormat2> for UserIndex {
    fn from(old: UserIndexFormat2) -> Self {
        Self {
            mailboxes: old.mailboxes,
            next_mailbox_id: old.next_mailbox_id,
            last_uidvalidity: old.last_uidvalidity,
            used_bytes: old.used_bytes,
            deliveries: old.deliveries,
            initialised: old.initialised,
            subscriptions: old.subscriptions,
            requests: VecDeque::new(),
        }
    }
}

/// A user's index as written before subscriptions were names (user format 1, v1
/// snapshots): a flag on each mailbox. Read only, to convert.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct LegacyUserIndex {
    mailboxes: BTreeMap<MailboxId, LegacyMailbox>,
    next_mailbox_id: u32,
    last_uidvalidity: u32,
    used_bytes: u64,
    deliveries: BTreeMap<String, Delivered>,
    initialised: bool,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct LegacyMailbox {
    id: MailboxId,
    name: String,
    role: Option<SpecialUse>,
    subscribed: bool,
    uidvalidity: u32,
    uidnext: Uid,
    highest_modseq: ModSeq,
    messages: BTreeMap<Uid, Message>,
    expunged: BTreeMap<Uid, ModSeq>,
    #[serde(default)]
    vanished_floor: Option<ModSeq>,
}

/// `index` as a v1 snapshot held it (JSON, subscriptions as mailbox flags).
#[cfg(test)]
pub(crate) fn legacy_json(index: &UserIndex) -> serde_json::Value {
    let mut v = serde_json::to_value(index).expect("serialisable");
    v.as_object_mut().expect("object").remove("subscriptions");
    v.as_object_mut().expect("object").remove("requests");
    for (_, m) in v["mailboxes"].as_object_mut().expect("mailboxes") {
        let name = m["name"].as_str().unwrap_or_default().to_owned();
        let m = m.as_object_mut().expect("mailbox");
        m.remove("first_recent_uid");
        m.insert("subscribed".into(), index.is_subscribed(&name).into());
    }
    v
}

impl From<LegacyUserIndex> for UserIndex {
    fn from(old: LegacyUserIndex) -> Self {
        let mut subscriptions = BTreeSet::new();
        let mailboxes = old
            .mailboxes
            .into_iter()
            .map(|(id, m)| {
                if m.subscribed {
                    subscriptions.insert(m.name.clone());
                }
                let mailbox = Mailbox {
                    id: m.id,
                    name: m.name,
                    role: m.role,
                    uidvalidity: m.uidvalidity,
                    uidnext: m.uidnext,
                    highest_modseq: m.highest_modseq,
                    messages: m.messages,
                    expunged: m.expunged,
                    vanished_floor: m.vanished_floor,
                    // Nothing stored before was recent to anyone.
                    first_recent_uid: m.uidnext,
                };
                (id, mailbox)
            })
            .collect();
        Self {
            mailboxes,
            next_mailbox_id: old.next_mailbox_id,
            last_uidvalidity: old.last_uidvalidity,
            used_bytes: old.used_bytes,
            deliveries: old.deliveries,
            initialised: old.initialised,
            subscriptions,
            requests: VecDeque::new(),
        }
    }
}

/// Checks a client-given mailbox name and returns its canonical form (`INBOX` in any
/// case is `INBOX`). Names are `/`-separated; empty, `.` and `..` segments, control
/// characters and over-long names are refused.
pub fn canonical_name(name: &str, limits: &IndexLimits) -> Result<String> {
    let bad = |why: &str| StorageError::InvalidArgument(format!("mailbox name: {why}"));
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > limits.max_mailbox_name_bytes {
        return Err(bad("too long"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(bad("control characters are not allowed"));
    }
    if name
        .split(DELIMITER)
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(bad("empty, '.' or '..' hierarchy level"));
    }
    let mut parts = name.splitn(2, DELIMITER);
    let first = parts.next().unwrap_or_default();
    if first.eq_ignore_ascii_case(INBOX) {
        return Ok(match parts.next() {
            Some(rest) => format!("{INBOX}{DELIMITER}{rest}"),
            None => INBOX.to_owned(),
        });
    }
    Ok(name.to_owned())
}

impl UserIndex {
    pub fn is_initialised(&self) -> bool {
        self.initialised
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// About how much memory this index holds, for the replica's cache budget.
    /// An estimate from counts (exact accounting would walk every message): a
    /// message costs its struct, its object name and a B-tree slot.
    pub fn approx_heap_bytes(&self) -> usize {
        const MESSAGE: usize = std::mem::size_of::<Message>() + 16 + 56;
        const EXPUNGED: usize = 32;
        const DELIVERY: usize = std::mem::size_of::<Delivered>() + 64 + 32;
        let mailboxes: usize = self
            .mailboxes
            .values()
            .map(|m| {
                std::mem::size_of::<Mailbox>()
                    + m.name.len()
                    + m.messages.len() * MESSAGE
                    + m.expunged.len() * EXPUNGED
            })
            .sum();
        let subscriptions: usize = self.subscriptions.iter().map(|n| n.len() + 48).sum();
        std::mem::size_of::<Self>() + mailboxes + self.deliveries.len() * DELIVERY + subscriptions
    }

    pub fn mailboxes(&self) -> impl Iterator<Item = &Mailbox> {
        self.mailboxes.values()
    }

    pub fn mailbox(&self, name: &str) -> Option<&Mailbox> {
        self.mailboxes.values().find(|m| m.name == name)
    }

    /// Whether `name` (canonical) is subscribed.
    pub fn is_subscribed(&self, name: &str) -> bool {
        self.subscriptions.contains(name)
    }

    /// Subscribed names that no mailbox has (RFC 5258 `\NonExistent`).
    pub fn subscribed_without_mailbox(&self) -> impl Iterator<Item = &str> {
        self.subscriptions
            .iter()
            .filter(|name| self.mailbox(name).is_none())
            .map(String::as_str)
    }

    pub fn mailbox_by_id(&self, id: MailboxId) -> Option<&Mailbox> {
        self.mailboxes.get(&id)
    }

    fn id_of(&self, name: &str, limits: &IndexLimits) -> Result<MailboxId> {
        let name = canonical_name(name, limits)?;
        self.mailboxes
            .values()
            .find(|m| m.name == name)
            .map(|m| m.id)
            .ok_or_else(|| StorageError::NotFound(format!("mailbox {name}")))
    }

    fn create(&mut self, name: String, role: Option<SpecialUse>, at_ms: i64) -> MailboxId {
        let id = MailboxId(self.next_mailbox_id);
        self.next_mailbox_id += 1;
        // Strictly increasing per user, and at least the creation time, so a mailbox
        // deleted and created again never reuses a UIDVALIDITY.
        let now = u32::try_from(at_ms.max(0) / 1000).unwrap_or(u32::MAX);
        self.last_uidvalidity = now.max(self.last_uidvalidity.saturating_add(1));
        self.mailboxes.insert(
            id,
            Mailbox {
                id,
                name,
                role,
                uidvalidity: self.last_uidvalidity,
                uidnext: 1,
                highest_modseq: 1,
                messages: BTreeMap::new(),
                expunged: BTreeMap::new(),
                vanished_floor: Some(0),
                first_recent_uid: 1,
            },
        );
        id
    }

    fn check_quota(&self, size: u64, quota: Option<u64>) -> Result<()> {
        if let Some(quota) = quota
            && self.used_bytes.saturating_add(size) > quota
        {
            return Err(StorageError::OverQuota {
                reason: format!("mailbox full: {} of {quota} bytes used", self.used_bytes),
                permanent: size > quota,
            });
        }
        Ok(())
    }

    /// Applies `command`, sent by a client as `request` (`None`: no id). A request
    /// remembered from before is not applied again: its outcome comes back as
    /// [`IndexOutcome::Repeated`] (or its refusal again); an abandoned one is
    /// refused. Deterministic as [`Self::apply`] is (time is the command's).
    pub fn apply_request(
        &mut self,
        request: Option<Uuid>,
        command: IndexCommand,
        at_ms: i64,
        limits: &IndexLimits,
        changes: &mut Vec<Change>,
    ) -> Result<IndexOutcome> {
        let Some(id) = request else {
            return self.apply(command, at_ms, limits, changes);
        };
        let horizon = at_ms.saturating_sub(limits.request_ttl_ms);
        self.requests.retain(|r| r.at_ms >= horizon);
        if let Some(seen) = self.requests.iter().find(|r| r.id == id) {
            return match &seen.outcome {
                Ok(outcome) => Ok(IndexOutcome::Repeated(Box::new(outcome.clone()))),
                Err(refused) => Err(refused.clone()),
            };
        }
        let outcome = match command {
            IndexCommand::Abandon => Ok(IndexOutcome::Abandoned),
            command => self.apply(command, at_ms, limits, changes),
        };
        let remembered = match &outcome {
            Ok(IndexOutcome::Abandoned) => Err(StorageError::FailedPrecondition(
                "the request was given up before it arrived".into(),
            )),
            Ok(outcome) => Ok(outcome.remembered()),
            Err(refused) => Err(refused.clone()),
        };
        while self.requests.len() >= limits.max_requests.max(1) {
            self.requests.pop_front();
        }
        self.requests.push_back(Remembered {
            id,
            at_ms,
            outcome: remembered,
        });
        outcome
    }

    /// Applies one command at time `at_ms` (from the command record). On error
    /// nothing changed. Changes for other sessions are appended to `changes`.
    pub fn apply(
        &mut self,
        command: IndexCommand,
        at_ms: i64,
        limits: &IndexLimits,
        changes: &mut Vec<Change>,
    ) -> Result<IndexOutcome> {
        use IndexCommand as C;
        if !self.initialised && command != C::Init {
            self.apply(C::Init, at_ms, limits, changes)?;
        }
        match command {
            C::Init => {
                if !self.initialised {
                    // The default mailboxes are subscribed; others only when asked.
                    for (name, role) in DEFAULT_MAILBOXES {
                        self.create(name.to_owned(), role, at_ms);
                        self.subscriptions.insert(name.to_owned());
                    }
                    self.initialised = true;
                    changes.push(Change::MailboxesChanged);
                }
                Ok(IndexOutcome::Done)
            }
            C::CreateMailbox { name, role } => {
                let name = canonical_name(&name, limits)?;
                if self.mailbox(&name).is_some() {
                    return Err(StorageError::AlreadyExists(format!("mailbox {name}")));
                }
                if self.mailboxes.len() >= limits.max_mailboxes {
                    return Err(StorageError::OverQuota {
                        reason: format!("at most {} mailboxes", limits.max_mailboxes),
                        permanent: true,
                    });
                }
                let id = self.create(name, role, at_ms);
                changes.push(Change::MailboxesChanged);
                Ok(IndexOutcome::MailboxCreated {
                    id,
                    uidvalidity: self.mailboxes[&id].uidvalidity,
                })
            }
            C::RenameMailbox { from, to } => self.rename(&from, &to, at_ms, limits, changes),
            C::DeleteMailbox { name } => {
                let id = self.id_of(&name, limits)?;
                if self.mailboxes[&id].name == INBOX {
                    return Err(StorageError::FailedPrecondition(
                        "INBOX cannot be deleted".into(),
                    ));
                }
                let mut removed = Vec::new();
                if let Some(mailbox) = self.mailboxes.remove(&id) {
                    let freed: u64 = mailbox.messages.values().map(|m| m.size).sum();
                    self.used_bytes = self.used_bytes.saturating_sub(freed);
                    removed = mailbox.messages.into_values().map(|m| m.object).collect();
                }
                changes.push(Change::MailboxesChanged);
                Ok(IndexOutcome::MailboxDeleted { removed })
            }
            // A name, whether or not a mailbox has it (RFC 3501 §6.3.6); DELETE and
            // RENAME leave the list alone.
            C::Subscribe { name, subscribed } => {
                let name = canonical_name(&name, limits)?;
                if !subscribed {
                    self.subscriptions.remove(&name);
                } else if !self.subscriptions.contains(&name) {
                    if self.subscriptions.len() >= limits.max_mailboxes {
                        return Err(StorageError::OverQuota {
                            reason: format!("at most {} subscriptions", limits.max_mailboxes),
                            permanent: true,
                        });
                    }
                    self.subscriptions.insert(name);
                }
                Ok(IndexOutcome::Done)
            }
            C::Append {
                mailbox,
                message,
                delivery_key,
                quota_bytes,
            } => self.append(
                &mailbox,
                message,
                delivery_key,
                quota_bytes,
                at_ms,
                limits,
                changes,
            ),
            C::ClaimRecent {
                mailbox,
                uidvalidity,
                up_to,
            } => {
                let id = self.id_of(&mailbox, limits)?;
                let m = self.mailboxes.get_mut(&id).expect("id_of found it");
                let from = m.first_recent_uid;
                if m.uidvalidity != uidvalidity {
                    return Ok(IndexOutcome::RecentClaimed { from, to: from });
                }
                let to = up_to.min(m.uidnext).max(from);
                m.first_recent_uid = to;
                Ok(IndexOutcome::RecentClaimed { from, to })
            }
            // Without a request id there is nothing to give up.
            C::Abandon => Ok(IndexOutcome::Done),
            C::Store {
                mailbox,
                uids,
                action,
                flags,
                unchanged_since,
            } => {
                let id = self.id_of(&mailbox, limits)?;
                let mailbox = self.mailboxes.get_mut(&id).expect("id_of found it");
                let mut changed = Vec::new();
                let mut modified = Vec::new();
                let selected: Vec<Uid> = uids_in(&mailbox.messages, &uids).collect();
                let next_flags = |current: &Flags| match action {
                    StoreAction::Add => current.union(&flags),
                    StoreAction::Remove => current.minus(&flags),
                    StoreAction::Replace => flags.clone(),
                };
                // Check every message first: on error nothing may have changed.
                if selected.iter().any(|uid| {
                    next_flags(&mailbox.messages[uid].flags).keywords.len()
                        > limits.max_keywords_per_message
                }) {
                    return Err(StorageError::InvalidArgument("too many keywords".into()));
                }
                let mut new_modseq = None;
                for uid in selected {
                    let current = &mailbox.messages[&uid];
                    if unchanged_since.is_some_and(|since| current.modseq > since) {
                        modified.push(uid);
                        continue;
                    }
                    let next = next_flags(&current.flags);
                    if next == current.flags {
                        continue;
                    }
                    // One MODSEQ for every message this command changes (RFC 7162
                    // allows it: they change atomically).
                    let modseq = *new_modseq.get_or_insert_with(|| mailbox.bump());
                    let m = mailbox
                        .messages
                        .get_mut(&uid)
                        .expect("selected from the map");
                    m.flags = next.clone();
                    m.modseq = modseq;
                    changes.push(Change::Flags {
                        mailbox: id,
                        uid,
                        modseq,
                    });
                    changed.push((uid, next, modseq));
                }
                Ok(IndexOutcome::Stored { changed, modified })
            }
            C::Copy {
                from,
                to,
                objects,
                remove_source,
                quota_bytes,
            } => self.copy(
                &from,
                &to,
                objects,
                remove_source,
                quota_bytes,
                limits,
                changes,
            ),
            C::Expunge { mailbox, uids } => {
                let id = self.id_of(&mailbox, limits)?;
                let mailbox = self.mailboxes.get_mut(&id).expect("id_of found it");
                let candidates: Vec<Uid> = match &uids {
                    Some(ranges) => uids_in(&mailbox.messages, ranges).collect(),
                    None => mailbox.messages.keys().copied().collect(),
                };
                let doomed: Vec<Uid> = candidates
                    .into_iter()
                    .filter(|uid| mailbox.messages[uid].flags.deleted)
                    .collect();
                let mut removed = Vec::new();
                if !doomed.is_empty() {
                    let modseq = mailbox.bump();
                    for uid in doomed {
                        if let Some(m) = mailbox.messages.remove(&uid) {
                            self.used_bytes = self.used_bytes.saturating_sub(m.size);
                            mailbox.log_expunge(uid, modseq, limits.max_expunge_log);
                            changes.push(Change::Expunge { mailbox: id, uid });
                            removed.push((uid, m.object));
                        }
                    }
                }
                Ok(IndexOutcome::Expunged {
                    mailbox: id,
                    removed,
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        mailbox: &str,
        message: NewMessage,
        delivery_key: Option<String>,
        quota: Option<u64>,
        at_ms: i64,
        limits: &IndexLimits,
        changes: &mut Vec<Change>,
    ) -> Result<IndexOutcome> {
        // Forget delivery keys past their time; the map is ordered by key, so prune
        // by scanning only when it has grown (deterministic: time is the command's).
        let held = self.deliveries.len();
        if held > 1024 && held.is_power_of_two() {
            let mut horizon = at_ms - limits.delivery_key_ttl_ms;
            if held >= limits.max_delivery_keys {
                // Too many even within the TTL: keep the newest half of the bound, so
                // the next prune comes after as many deliveries again.
                let keep = (limits.max_delivery_keys / 2).max(1024);
                let mut times: Vec<i64> = self.deliveries.values().map(|d| d.at_ms).collect();
                let (_, newest_dropped, _) = times.select_nth_unstable(held - keep);
                horizon = horizon.max(*newest_dropped + 1);
            }
            self.deliveries.retain(|_, d| d.at_ms >= horizon);
        }
        if let Some(key) = &delivery_key
            && let Some(d) = self.deliveries.get(key)
            && let Some(m) = self.mailboxes.get(&d.mailbox)
        {
            return Ok(IndexOutcome::Appended {
                mailbox: d.mailbox,
                uidvalidity: m.uidvalidity,
                uid: d.uid,
                duplicate: true,
            });
        }
        let id = self.id_of(mailbox, limits)?;
        self.check_quota(message.size, quota)?;
        if message.flags.keywords.len() > limits.max_keywords_per_message {
            return Err(StorageError::InvalidArgument("too many keywords".into()));
        }
        let mailbox = self.mailboxes.get_mut(&id).expect("id_of found it");
        let uid = mailbox.uidnext;
        if uid == Uid::MAX {
            return Err(StorageError::FailedPrecondition(
                "mailbox UID space exhausted".into(),
            ));
        }
        mailbox.uidnext += 1;
        let modseq = mailbox.bump();
        mailbox.messages.insert(
            uid,
            Message {
                uid,
                object: message.object,
                size: message.size,
                internal_date_ms: message.internal_date_ms,
                flags: message.flags,
                modseq,
            },
        );
        let uidvalidity = mailbox.uidvalidity;
        self.used_bytes += message.size;
        if let Some(key) = delivery_key {
            self.deliveries.insert(
                key,
                Delivered {
                    mailbox: id,
                    uid,
                    at_ms,
                },
            );
        }
        changes.push(Change::Exists { mailbox: id, uid });
        Ok(IndexOutcome::Appended {
            mailbox: id,
            uidvalidity,
            uid,
            duplicate: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        from: &str,
        to: &str,
        objects: Vec<(Uid, String)>,
        remove_source: bool,
        quota: Option<u64>,
        limits: &IndexLimits,
        changes: &mut Vec<Change>,
    ) -> Result<IndexOutcome> {
        let src = self.id_of(from, limits)?;
        let dst = self.id_of(to, limits).map_err(|e| match e {
            // IMAP answers COPY to a missing mailbox with [TRYCREATE].
            StorageError::NotFound(m) => StorageError::NotFound(format!("{m} (trycreate)")),
            other => other,
        })?;
        let mut present = Vec::new();
        let mut unused = Vec::new();
        let mut seen = BTreeSet::new();
        for (uid, object) in objects {
            match self.mailboxes[&src].messages.get(&uid) {
                // Each source message once, even if the command names it twice.
                Some(m) if seen.insert(uid) => present.push((m.clone(), object)),
                _ => unused.push(object),
            }
        }
        // A move takes the bytes with it (within one mailbox too); a copy adds them.
        let added: u64 = if remove_source {
            0
        } else {
            present.iter().map(|(m, _)| m.size).sum()
        };
        self.check_quota(added, quota)?;

        let mut mapping = Vec::new();
        let mut expunged = Vec::new();
        let dst_box = self.mailboxes.get_mut(&dst).expect("id_of found it");
        if dst_box.uidnext.checked_add(present.len() as u32).is_none() {
            return Err(StorageError::FailedPrecondition(
                "mailbox UID space exhausted".into(),
            ));
        }
        let modseq = if present.is_empty() {
            dst_box.highest_modseq
        } else {
            dst_box.bump()
        };
        for (m, object) in &present {
            let uid = dst_box.uidnext;
            dst_box.uidnext += 1;
            dst_box.messages.insert(
                uid,
                Message {
                    uid,
                    object: object.clone(),
                    size: m.size,
                    internal_date_ms: m.internal_date_ms,
                    flags: m.flags.clone(),
                    modseq,
                },
            );
            changes.push(Change::Exists { mailbox: dst, uid });
            mapping.push((m.uid, uid));
        }
        let uidvalidity = dst_box.uidvalidity;
        self.used_bytes += added;
        if remove_source && !present.is_empty() {
            let src_box = self.mailboxes.get_mut(&src).expect("id_of found it");
            let modseq = src_box.bump();
            for (m, _) in &present {
                if let Some(old) = src_box.messages.remove(&m.uid) {
                    src_box.log_expunge(m.uid, modseq, limits.max_expunge_log);
                    changes.push(Change::Expunge {
                        mailbox: src,
                        uid: m.uid,
                    });
                    expunged.push((m.uid, old.object));
                }
            }
        }
        Ok(IndexOutcome::Copied {
            uidvalidity,
            mapping,
            unused_objects: unused,
            expunged,
        })
    }

    fn rename(
        &mut self,
        from: &str,
        to: &str,
        at_ms: i64,
        limits: &IndexLimits,
        changes: &mut Vec<Change>,
    ) -> Result<IndexOutcome> {
        let src = self.id_of(from, limits)?;
        let to = canonical_name(to, limits)?;
        if self.mailbox(&to).is_some() {
            return Err(StorageError::AlreadyExists(format!("mailbox {to}")));
        }
        let old_name = self.mailboxes[&src].name.clone();
        if to == old_name || to.starts_with(&format!("{old_name}{DELIMITER}")) {
            return Err(StorageError::InvalidArgument(
                "cannot rename a mailbox into itself".into(),
            ));
        }
        if old_name == INBOX {
            // RFC 3501 6.3.5: renaming INBOX moves its messages to a new mailbox and
            // leaves INBOX empty; INBOX's children stay where they are.
            if self.mailboxes.len() >= limits.max_mailboxes {
                return Err(StorageError::OverQuota {
                    reason: format!("at most {} mailboxes", limits.max_mailboxes),
                    permanent: true,
                });
            }
            let dst = self.create(to, None, at_ms);
            let inbox = self.mailboxes.get_mut(&src).expect("id_of found it");
            let messages = std::mem::take(&mut inbox.messages);
            let modseq = inbox.bump();
            let moved = messages.len();
            for uid in messages.keys() {
                inbox.log_expunge(*uid, modseq, limits.max_expunge_log);
                changes.push(Change::Expunge {
                    mailbox: src,
                    uid: *uid,
                });
            }
            let dst_box = self.mailboxes.get_mut(&dst).expect("just created");
            for (_, mut m) in messages {
                let uid = dst_box.uidnext;
                dst_box.uidnext += 1;
                m.uid = uid;
                m.modseq = dst_box.highest_modseq;
                dst_box.messages.insert(uid, m);
            }
            changes.push(Change::MailboxesChanged);
            return Ok(IndexOutcome::Renamed {
                moved_messages: moved,
            });
        }
        // Renaming a mailbox renames its inferiors too (RFC 3501 6.3.5).
        let prefix = format!("{old_name}{DELIMITER}");
        let mut renames = Vec::new();
        for m in self.mailboxes.values() {
            if m.name == old_name {
                renames.push((m.id, to.clone()));
            } else if let Some(rest) = m.name.strip_prefix(&prefix) {
                let new = format!("{to}{DELIMITER}{rest}");
                if new.len() > limits.max_mailbox_name_bytes {
                    return Err(StorageError::InvalidArgument(
                        "mailbox name: too long".into(),
                    ));
                }
                if self.mailbox(&new).is_some() {
                    return Err(StorageError::AlreadyExists(format!("mailbox {new}")));
                }
                renames.push((m.id, new));
            }
        }
        for (id, name) in renames {
            if let Some(m) = self.mailboxes.get_mut(&id) {
                m.name = name;
            }
        }
        changes.push(Change::MailboxesChanged);
        Ok(IndexOutcome::Renamed { moved_messages: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_780_000_000_000;

    struct Fixture {
        index: UserIndex,
        limits: IndexLimits,
        changes: Vec<Change>,
        clock: i64,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                index: UserIndex::default(),
                limits: IndexLimits::default(),
                changes: Vec::new(),
                clock: T0,
            }
        }

        fn apply(&mut self, command: IndexCommand) -> Result<IndexOutcome> {
            self.clock += 1;
            self.index
                .apply(command, self.clock, &self.limits, &mut self.changes)
        }

        fn append(
            &mut self,
            mailbox: &str,
            size: u64,
            key: Option<&str>,
            quota: Option<u64>,
        ) -> Result<IndexOutcome> {
            let object = format!("obj-{}", self.clock);
            self.apply(IndexCommand::Append {
                mailbox: mailbox.into(),
                message: NewMessage {
                    object,
                    size,
                    internal_date_ms: self.clock,
                    flags: Flags::default(),
                },
                delivery_key: key.map(str::to_owned),
                quota_bytes: quota,
            })
        }

        fn uid(&mut self, mailbox: &str) -> Uid {
            match self.append(mailbox, 100, None, None).unwrap() {
                IndexOutcome::Appended { uid, .. } => uid,
                other => panic!("{other:?}"),
            }
        }

        fn flags(
            &mut self,
            mailbox: &str,
            uids: &[Uid],
            action: StoreAction,
            names: &[&str],
            since: Option<ModSeq>,
        ) -> IndexOutcome {
            let flags = Flags::parse(names.iter().copied(), &self.limits).unwrap();
            self.apply(IndexCommand::Store {
                mailbox: mailbox.into(),
                uids: uids.iter().map(|u| UidRange::one(*u)).collect(),
                action,
                flags,
                unchanged_since: since,
            })
            .unwrap()
        }
    }

    impl Fixture {
        fn request(&mut self, id: Uuid, command: IndexCommand) -> Result<IndexOutcome> {
            self.clock += 1;
            self.index.apply_request(
                Some(id),
                command,
                self.clock,
                &self.limits,
                &mut self.changes,
            )
        }

        fn append_command(&self, mailbox: &str) -> IndexCommand {
            IndexCommand::Append {
                mailbox: mailbox.into(),
                message: NewMessage {
                    object: format!("obj-{}", self.clock),
                    size: 100,
                    internal_date_ms: self.clock,
                    flags: Flags::default(),
                },
                delivery_key: None,
                quota_bytes: None,
            }
        }

        fn count(&self, mailbox: &str) -> usize {
            self.index.mailbox(mailbox).map_or(0, |m| m.messages.len())
        }
    }

    #[test]
    fn a_request_sent_again_is_applied_once_and_answered_as_the_first_time() {
        let mut f = Fixture::new();
        let id = Uuid::new_v4();
        let append = f.append_command(INBOX);
        let first = f.request(id, append.clone()).unwrap();
        let changes = f.changes.len();
        let again = f.request(id, append.clone()).unwrap();
        assert_eq!(again, IndexOutcome::Repeated(Box::new(first.clone())));
        assert_eq!(f.count(INBOX), 1);
        assert_eq!(f.changes.len(), changes, "a repeat announces nothing");
        // Another id is another request.
        f.request(Uuid::new_v4(), append).unwrap();
        assert_eq!(f.count(INBOX), 2);
        // A repeated STORE keeps its [MODIFIED] answer rather than recomputing it
        // against the state it made itself.
        let IndexOutcome::Appended { uid, .. } = first else {
            panic!("{first:?}")
        };
        let modseq = f.index.mailbox(INBOX).unwrap().messages[&uid].modseq;
        let store = IndexCommand::Store {
            mailbox: INBOX.into(),
            uids: vec![UidRange::one(uid)],
            action: StoreAction::Add,
            flags: Flags::parse(["\\Seen"], &f.limits).unwrap(),
            unchanged_since: Some(modseq),
        };
        let id = Uuid::new_v4();
        let stored = f.request(id, store.clone()).unwrap();
        let IndexOutcome::Stored { modified, .. } = &stored else {
            panic!("{stored:?}")
        };
        assert!(modified.is_empty());
        assert_eq!(
            f.request(id, store).unwrap(),
            IndexOutcome::Repeated(Box::new(stored))
        );
    }

    #[test]
    fn an_abandoned_request_is_refused_when_it_arrives_late() {
        let mut f = Fixture::new();
        let id = Uuid::new_v4();
        assert_eq!(
            f.request(id, IndexCommand::Abandon).unwrap(),
            IndexOutcome::Abandoned
        );
        let late = f.append_command(INBOX);
        assert!(matches!(
            f.request(id, late),
            Err(StorageError::FailedPrecondition(_))
        ));
        assert_eq!(f.count(INBOX), 0);
        // Given up after it was applied: its outcome comes back.
        let id = Uuid::new_v4();
        let append = f.append_command(INBOX);
        let first = f.request(id, append).unwrap();
        assert_eq!(
            f.request(id, IndexCommand::Abandon).unwrap(),
            IndexOutcome::Repeated(Box::new(first))
        );
        assert_eq!(f.count(INBOX), 1);
    }

    #[test]
    fn a_refused_request_stays_refused() {
        let mut f = Fixture::new();
        f.apply(IndexCommand::CreateMailbox {
            name: "A".into(),
            role: None,
        })
        .unwrap();
        let create = IndexCommand::CreateMailbox {
            name: "A".into(),
            role: None,
        };
        let id = Uuid::new_v4();
        assert!(matches!(
            f.request(id, create.clone()),
            Err(StorageError::AlreadyExists(_))
        ));
        f.apply(IndexCommand::DeleteMailbox { name: "A".into() })
            .unwrap();
        // The client was told it failed: a late copy must not succeed now.
        assert!(matches!(
            f.request(id, create),
            Err(StorageError::AlreadyExists(_))
        ));
        assert!(f.index.mailbox("A").is_none());
    }

    #[test]
    fn requests_are_remembered_for_their_time_and_up_to_their_number() {
        let mut f = Fixture::new();
        f.limits.max_requests = 4;
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            let append = f.append_command(INBOX);
            f.request(*id, append).unwrap();
        }
        assert_eq!(f.index.requests.len(), 4);
        // The oldest was forgotten: sent again, it is a new request.
        let append = f.append_command(INBOX);
        assert!(matches!(
            f.request(ids[0], append).unwrap(),
            IndexOutcome::Appended { .. }
        ));
        let append = f.append_command(INBOX);
        assert!(matches!(
            f.request(ids[4], append).unwrap(),
            IndexOutcome::Repeated(_)
        ));
        f.clock += f.limits.request_ttl_ms + 1;
        let append = f.append_command(INBOX);
        assert!(matches!(
            f.request(ids[4], append).unwrap(),
            IndexOutcome::Appended { .. }
        ));
        assert_eq!(f.index.requests.len(), 1, "the expired ones are dropped");
        assert_eq!(f.count(INBOX), 7);
    }

    #[test]
    fn remembered_outcomes_keep_no_objects_and_no_long_lists() {
        let long: Vec<(Uid, Uid)> = (1..=REMEMBERED_ENTRIES as Uid + 1)
            .map(|u| (u, u))
            .collect();
        let copied = IndexOutcome::Copied {
            uidvalidity: 7,
            mapping: long,
            unused_objects: vec!["x".into()],
            expunged: vec![(1, "y".into())],
        };
        assert_eq!(
            copied.remembered(),
            IndexOutcome::Copied {
                uidvalidity: 7,
                mapping: Vec::new(),
                unused_objects: Vec::new(),
                expunged: Vec::new(),
            }
        );
        let expunged = IndexOutcome::Expunged {
            mailbox: MailboxId(1),
            removed: vec![(3, "obj".into())],
        };
        let stored = IndexOutcome::Stored {
            changed: Vec::new(),
            modified: (1..=REMEMBERED_MODIFIED as Uid + 1).collect(),
        };
        assert_eq!(
            stored.remembered(),
            IndexOutcome::Stored {
                changed: Vec::new(),
                modified: Vec::new(),
            },
            "a caller's oversized [MODIFIED] set does not grow the user's index"
        );
        assert_eq!(
            expunged.remembered(),
            IndexOutcome::Expunged {
                mailbox: MailboxId(1),
                removed: vec![(3, String::new())],
            }
        );
    }

    #[test]
    fn new_users_get_the_special_use_mailboxes() {
        let mut f = Fixture::new();
        f.apply(IndexCommand::Init).unwrap();
        let names: Vec<_> = f
            .index
            .mailboxes()
            .map(|m| (m.name.as_str(), m.role))
            .collect();
        assert_eq!(
            names,
            [
                ("INBOX", None),
                ("Sent", Some(SpecialUse::Sent)),
                ("Drafts", Some(SpecialUse::Drafts)),
                ("Trash", Some(SpecialUse::Trash)),
                (JUNK, Some(SpecialUse::Junk)),
                ("Archive", Some(SpecialUse::Archive)),
            ]
        );
        let validities: Vec<u32> = f.index.mailboxes().map(|m| m.uidvalidity).collect();
        assert!(validities.windows(2).all(|w| w[0] < w[1]), "{validities:?}");
        // Init again changes nothing.
        let before = f.index.clone();
        f.apply(IndexCommand::Init).unwrap();
        assert_eq!(f.index, before);
    }

    #[test]
    fn uids_increase_and_modseq_moves_with_every_change() {
        let mut f = Fixture::new();
        let a = f.uid("inbox");
        let b = f.uid("INBOX");
        assert_eq!((a, b), (1, 2));
        let status = f.index.mailbox(INBOX).unwrap().status();
        assert_eq!(status.messages, 2);
        assert_eq!(status.unseen, 2);
        assert_eq!(status.uidnext, 3);
        let before = status.highest_modseq;

        let IndexOutcome::Stored { changed, modified } = f.flags(
            INBOX,
            &[a, b],
            StoreAction::Add,
            &["\\Seen", "$Label1"],
            None,
        ) else {
            panic!()
        };
        assert!(modified.is_empty());
        assert_eq!(changed.len(), 2);
        let modseq = changed[0].2;
        assert!(modseq > before);
        assert_eq!(changed[1].2, modseq, "one command, one MODSEQ");
        assert_eq!(f.index.mailbox(INBOX).unwrap().status().unseen, 0);

        // Setting flags a message already has changes nothing and bumps nothing.
        let IndexOutcome::Stored { changed, .. } =
            f.flags(INBOX, &[a], StoreAction::Add, &["\\seen"], None)
        else {
            panic!()
        };
        assert!(changed.is_empty());
        assert_eq!(f.index.mailbox(INBOX).unwrap().highest_modseq, modseq);
    }

    #[test]
    fn unchanged_since_reports_modified_messages() {
        let mut f = Fixture::new();
        let a = f.uid(INBOX);
        let b = f.uid(INBOX);
        let IndexOutcome::Stored { changed, .. } =
            f.flags(INBOX, &[a], StoreAction::Add, &["\\Flagged"], None)
        else {
            panic!()
        };
        let a_modseq = changed[0].2;
        let b_modseq = f.index.mailbox(INBOX).unwrap().messages[&b].modseq;
        // A client that last saw both messages at b's MODSEQ: a changed since.
        let IndexOutcome::Stored { changed, modified } = f.flags(
            INBOX,
            &[a, b],
            StoreAction::Replace,
            &["\\Deleted"],
            Some(b_modseq),
        ) else {
            panic!()
        };
        assert!(a_modseq > b_modseq);
        assert_eq!(modified, [a]);
        assert_eq!(changed.iter().map(|c| c.0).collect::<Vec<_>>(), [b]);
        assert!(f.index.mailbox(INBOX).unwrap().messages[&a].flags.flagged);
    }

    #[test]
    fn expunge_removes_only_deleted_messages_and_logs_them() {
        let mut f = Fixture::new();
        let uids: Vec<Uid> = (0..4).map(|_| f.uid(INBOX)).collect();
        assert_eq!(f.index.used_bytes(), 400);
        f.flags(
            INBOX,
            &[uids[1], uids[3]],
            StoreAction::Add,
            &["\\Deleted"],
            None,
        );
        let IndexOutcome::Expunged { removed, .. } = f
            .apply(IndexCommand::Expunge {
                mailbox: INBOX.into(),
                uids: Some(vec![UidRange { first: 1, last: 2 }]),
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            removed.iter().map(|r| r.0).collect::<Vec<_>>(),
            [uids[1]],
            "UID EXPUNGE limits the set"
        );
        f.apply(IndexCommand::Expunge {
            mailbox: INBOX.into(),
            uids: None,
        })
        .unwrap();
        let inbox = f.index.mailbox(INBOX).unwrap();
        assert_eq!(
            inbox.messages.keys().copied().collect::<Vec<_>>(),
            [uids[0], uids[2]]
        );
        assert_eq!(
            inbox.expunged.keys().copied().collect::<Vec<_>>(),
            [uids[1], uids[3]]
        );
        assert_eq!(f.index.used_bytes(), 200);
        // UIDs are never reused.
        assert_eq!(f.uid(INBOX), 5);
    }

    #[test]
    fn a_trimmed_expunge_log_raises_the_vanished_floor() {
        let mut f = Fixture::new();
        f.append(INBOX, 10, None, None).unwrap();
        let mut mailbox = f.index.mailbox(INBOX).unwrap().clone();
        assert_eq!(mailbox.vanished_floor, Some(0));
        mailbox.log_expunge(5, 10, 2);
        mailbox.log_expunge(6, 11, 2);
        assert_eq!(mailbox.vanished_floor, Some(0), "nothing dropped yet");
        // An old message (low UID) expunged last: the oldest *expunge* goes, not it.
        mailbox.log_expunge(1, 12, 2);
        assert_eq!(mailbox.expunged.keys().copied().collect::<Vec<_>>(), [1, 6]);
        assert_eq!(mailbox.vanished_floor, Some(10));
        assert!(mailbox.expunges_complete_since(10, 2));
        assert!(
            !mailbox.expunges_complete_since(9, 2),
            "a client behind MODSEQ 10 gets no complete list"
        );
        // A snapshot from before the floor existed: complete only if never full.
        mailbox.vanished_floor = None;
        assert!(!mailbox.expunges_complete_since(50, 2));
        assert!(mailbox.expunges_complete_since(50, 3));
    }

    #[test]
    fn quota_is_temporary_when_it_could_fit_later_and_permanent_when_never() {
        let mut f = Fixture::new();
        f.append(INBOX, 600, None, Some(1000)).unwrap();
        let Err(StorageError::OverQuota { permanent, .. }) = f.append(INBOX, 500, None, Some(1000))
        else {
            panic!()
        };
        assert!(!permanent);
        let Err(StorageError::OverQuota { permanent, .. }) =
            f.append(INBOX, 5000, None, Some(1000))
        else {
            panic!()
        };
        assert!(permanent);
        assert_eq!(f.index.used_bytes(), 600);
    }

    #[test]
    fn a_replayed_delivery_stores_nothing_new() {
        let mut f = Fixture::new();
        let first = f.append(INBOX, 100, Some("q1/alice"), None).unwrap();
        let again = f.append(INBOX, 100, Some("q1/alice"), None).unwrap();
        let (
            IndexOutcome::Appended {
                uid: u1,
                duplicate: false,
                ..
            },
            IndexOutcome::Appended {
                uid: u2,
                duplicate: true,
                ..
            },
        ) = (first, again)
        else {
            panic!()
        };
        assert_eq!(u1, u2);
        assert_eq!(f.index.mailbox(INBOX).unwrap().messages.len(), 1);
        assert_eq!(f.index.used_bytes(), 100);
    }

    #[test]
    fn delivery_keys_are_bounded_in_number_as_well_as_time() {
        let mut f = Fixture::new();
        f.limits.max_delivery_keys = 2048;
        let duplicate =
            |o: IndexOutcome| matches!(o, IndexOutcome::Appended { duplicate, .. } if duplicate);
        for i in 0..5000 {
            f.append(INBOX, 1, Some(&format!("q{i}/alice")), None)
                .unwrap();
            assert!(f.index.deliveries.len() <= 2048, "after {i}");
        }
        // The newest keys still catch a redelivery; the oldest are forgotten.
        assert!(duplicate(
            f.append(INBOX, 1, Some("q4999/alice"), None).unwrap()
        ));
        assert!(duplicate(
            f.append(INBOX, 1, Some("q4000/alice"), None).unwrap()
        ));
        assert!(!duplicate(
            f.append(INBOX, 1, Some("q0/alice"), None).unwrap()
        ));
    }

    #[test]
    fn copy_and_move_map_uids_and_need_an_existing_target() {
        let mut f = Fixture::new();
        let a = f.uid(INBOX);
        let b = f.uid(INBOX);
        let err = f
            .apply(IndexCommand::Copy {
                from: INBOX.into(),
                to: "Nowhere".into(),
                objects: vec![(a, "copy-a".into())],
                remove_source: false,
                quota_bytes: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("trycreate"), "{err}");

        let IndexOutcome::Copied {
            mapping,
            unused_objects,
            expunged,
            ..
        } = f
            .apply(IndexCommand::Copy {
                from: INBOX.into(),
                to: "Archive".into(),
                objects: vec![(a, "copy-a".into()), (99, "copy-99".into())],
                remove_source: false,
                quota_bytes: None,
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(mapping, [(a, 1)]);
        assert_eq!(unused_objects, ["copy-99"]);
        assert!(expunged.is_empty());
        assert_eq!(f.index.used_bytes(), 300);

        let IndexOutcome::Copied {
            mapping, expunged, ..
        } = f
            .apply(IndexCommand::Copy {
                from: INBOX.into(),
                to: "Trash".into(),
                objects: vec![(b, "moved-b".into())],
                remove_source: true,
                quota_bytes: Some(300),
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(mapping, [(b, 1)]);
        assert_eq!(expunged.len(), 1);
        assert!(!f.index.mailbox(INBOX).unwrap().messages.contains_key(&b));
        assert_eq!(
            f.index.used_bytes(),
            300,
            "a move adds nothing to the quota"
        );
    }

    #[test]
    fn moves_within_a_mailbox_and_repeated_uids_keep_quota_exact() {
        let mut f = Fixture::new();
        let a = f.uid(INBOX);
        let b = f.uid(INBOX);
        assert_eq!(f.index.used_bytes(), 200);
        // MOVE into the same mailbox: new UIDs, same bytes.
        let IndexOutcome::Copied { mapping, .. } = f
            .apply(IndexCommand::Copy {
                from: INBOX.into(),
                to: INBOX.into(),
                objects: vec![(a, "a2".into())],
                remove_source: true,
                quota_bytes: None,
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(mapping, [(a, 3)]);
        assert_eq!(f.index.used_bytes(), 200);
        // COPY naming one message twice copies it once.
        let IndexOutcome::Copied {
            mapping,
            unused_objects,
            ..
        } = f
            .apply(IndexCommand::Copy {
                from: INBOX.into(),
                to: "Archive".into(),
                objects: vec![(b, "b2".into()), (b, "b3".into())],
                remove_source: false,
                quota_bytes: None,
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(mapping.len(), 1);
        assert_eq!(unused_objects, ["b3"]);
        assert_eq!(f.index.used_bytes(), 300);
    }

    #[test]
    fn a_refused_store_changes_nothing() {
        let mut f = Fixture::new();
        f.limits.max_keywords_per_message = 2;
        let a = f.uid(INBOX);
        let b = f.uid(INBOX);
        f.flags(INBOX, &[b], StoreAction::Add, &["k1", "k2"], None);
        let before = f.index.clone();
        let flags = Flags::parse(["k3"], &f.limits).unwrap();
        let err = f.apply(IndexCommand::Store {
            mailbox: INBOX.into(),
            uids: vec![UidRange { first: a, last: b }],
            action: StoreAction::Add,
            flags,
            unchanged_since: None,
        });
        assert!(err.is_err());
        assert_eq!(f.index, before, "message {a} must not have changed either");
    }

    #[test]
    fn mailbox_names_are_checked_and_renames_carry_children() {
        let mut f = Fixture::new();
        for bad in [
            "",
            "a//b",
            "/a",
            "a/",
            "../x",
            "a/./b",
            "x\u{0}y",
            &"n".repeat(300),
        ] {
            assert!(
                f.apply(IndexCommand::CreateMailbox {
                    name: bad.into(),
                    role: None
                })
                .is_err(),
                "{bad:?} accepted"
            );
        }
        f.apply(IndexCommand::CreateMailbox {
            name: "Work".into(),
            role: None,
        })
        .unwrap();
        f.apply(IndexCommand::CreateMailbox {
            name: "Work/2026".into(),
            role: None,
        })
        .unwrap();
        assert!(matches!(
            f.apply(IndexCommand::CreateMailbox {
                name: "Work".into(),
                role: None
            }),
            Err(StorageError::AlreadyExists(_))
        ));
        assert!(
            f.apply(IndexCommand::RenameMailbox {
                from: "Work".into(),
                to: "Work/inner".into()
            })
            .is_err()
        );
        f.apply(IndexCommand::RenameMailbox {
            from: "Work".into(),
            to: "Projects".into(),
        })
        .unwrap();
        assert!(f.index.mailbox("Projects/2026").is_some());
        assert!(f.index.mailbox("Work/2026").is_none());
        assert!(matches!(
            f.apply(IndexCommand::DeleteMailbox {
                name: "inbox".into()
            }),
            Err(StorageError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn renaming_inbox_moves_its_messages_and_keeps_it() {
        let mut f = Fixture::new();
        f.uid(INBOX);
        f.uid(INBOX);
        let IndexOutcome::Renamed { moved_messages } = f
            .apply(IndexCommand::RenameMailbox {
                from: "INBOX".into(),
                to: "Old".into(),
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(moved_messages, 2);
        assert!(f.index.mailbox(INBOX).unwrap().messages.is_empty());
        assert_eq!(f.index.mailbox("Old").unwrap().messages.len(), 2);
        assert_eq!(f.uid(INBOX), 3, "INBOX keeps its UID sequence");
    }

    #[test]
    fn a_deleted_and_recreated_mailbox_gets_a_new_uidvalidity() {
        let mut f = Fixture::new();
        f.apply(IndexCommand::CreateMailbox {
            name: "Lists".into(),
            role: None,
        })
        .unwrap();
        let first = f.index.mailbox("Lists").unwrap().uidvalidity;
        f.apply(IndexCommand::DeleteMailbox {
            name: "Lists".into(),
        })
        .unwrap();
        f.apply(IndexCommand::CreateMailbox {
            name: "Lists".into(),
            role: None,
        })
        .unwrap();
        assert!(f.index.mailbox("Lists").unwrap().uidvalidity > first);
    }

    /// RFC 3501 §6.3.6/§6.3.9: subscriptions are names of their own: a name without
    /// a mailbox can be subscribed, DELETE keeps it, CREATE does not add one; the
    /// default mailboxes are subscribed when the user is set up.
    #[test]
    fn subscriptions_are_names() {
        let mut f = Fixture::new();
        f.apply(IndexCommand::Init).unwrap();
        for name in ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"] {
            assert!(f.index.is_subscribed(name), "{name}");
        }
        f.apply(IndexCommand::CreateMailbox {
            name: "Work".into(),
            role: None,
        })
        .unwrap();
        assert!(!f.index.is_subscribed("Work"), "CREATE does not subscribe");
        let subscribe = |name: &str, subscribed: bool| IndexCommand::Subscribe {
            name: name.into(),
            subscribed,
        };
        f.apply(subscribe("Work", true)).unwrap();
        f.apply(subscribe("Later/On", true)).unwrap();
        f.apply(IndexCommand::DeleteMailbox {
            name: "Work".into(),
        })
        .unwrap();
        assert!(
            f.index.is_subscribed("Work"),
            "DELETE keeps the subscription"
        );
        let missing: Vec<&str> = f.index.subscribed_without_mailbox().collect();
        assert_eq!(missing, ["Later/On", "Work"]);
        f.apply(subscribe("inbox", false)).unwrap();
        assert!(!f.index.is_subscribed("INBOX"), "names are canonical");
        f.apply(subscribe("Later/On", false)).unwrap();
        f.apply(subscribe("Later/On", false)).unwrap();
        assert!(f.apply(subscribe("a//b", true)).is_err());
        f.limits.max_mailboxes = f.index.subscriptions.len();
        assert!(matches!(
            f.apply(subscribe("One/Too/Many", true)),
            Err(StorageError::OverQuota { .. })
        ));
    }

    /// A user written when subscriptions were a flag on each mailbox converts to
    /// the list of names (user format 1, v1 snapshots).
    #[test]
    fn flag_subscriptions_become_names() {
        let mut f = Fixture::new();
        f.apply(IndexCommand::Init).unwrap();
        let mut old = serde_json::to_value(&f.index).unwrap();
        old.as_object_mut().unwrap().remove("subscriptions");
        for (_, m) in old["mailboxes"].as_object_mut().unwrap() {
            let subscribed = m["name"] != "Junk";
            m.as_object_mut()
                .unwrap()
                .insert("subscribed".into(), subscribed.into());
        }
        let legacy: LegacyUserIndex = serde_json::from_value(old).unwrap();
        let index = UserIndex::from(legacy);
        assert!(index.is_subscribed("INBOX") && !index.is_subscribed("Junk"));
        assert_eq!(index.mailboxes().count(), 6);
        assert_eq!(index.subscriptions.len(), 5);
    }

    #[test]
    fn flags_parse_and_refuse_bad_names() {
        let limits = IndexLimits::default();
        let flags = Flags::parse(["\\SEEN", "\\Draft", "$Junk", "NonJunk"], &limits).unwrap();
        assert_eq!(flags.names(), ["\\Seen", "\\Draft", "$Junk", "NonJunk"]);
        for bad in ["\\Recent2", "with space", "par(en", "", &"k".repeat(101)] {
            assert!(Flags::parse([bad], &limits).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replay_is_deterministic_and_survives_serialisation() {
        let script = |f: &mut Fixture| {
            for i in 0..30 {
                let mailbox = ["INBOX", "Archive", "Sent"][i % 3];
                f.append(
                    mailbox,
                    10 + i as u64,
                    Some(&format!("q{}", i % 7)),
                    Some(10_000),
                )
                .unwrap();
            }
            f.flags(
                INBOX,
                &[1, 2, 3],
                StoreAction::Add,
                &["\\Deleted", "$x"],
                None,
            );
            f.apply(IndexCommand::Expunge {
                mailbox: INBOX.into(),
                uids: None,
            })
            .unwrap();
            f.apply(IndexCommand::RenameMailbox {
                from: "Archive".into(),
                to: "Old/Archive".into(),
            })
            .unwrap();
        };
        let mut one = Fixture::new();
        let mut two = Fixture::new();
        script(&mut one);
        script(&mut two);
        assert_eq!(one.index, two.index);
        assert_eq!(one.changes, two.changes);
        let json = serde_json::to_string(&one.index).unwrap();
        assert_eq!(serde_json::from_str::<UserIndex>(&json).unwrap(), one.index);
    }
}
