//! The selected mailbox: the session's view of it (sequence numbers, UIDs, flags)
//! and the commands that work on messages: FETCH, STORE, SEARCH, COPY, MOVE,
//! EXPUNGE, CLOSE, UNSELECT.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::num::{NonZeroU32, NonZeroU64};

use chrono::{DateTime, FixedOffset, Utc};
use imap_codec::imap_types::IntoStatic;
use imap_codec::imap_types::command::{CommandBody, FetchModifier, StoreModifier};
use imap_codec::imap_types::core::{Atom, IString, LiteralMode, NString, NString8, Tag, Vec1};
use imap_codec::imap_types::datetime::DateTime as ImapDateTime;
use imap_codec::imap_types::extensions::binary::Literal8;
use imap_codec::imap_types::extensions::uidplus::{UidElement, UidSet};
use imap_codec::imap_types::fetch::{
    MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName,
};
use imap_codec::imap_types::flag::{Flag, FlagFetch, FlagPerm, StoreResponse, StoreType};
use imap_codec::imap_types::response::{Code, Data, Response, StatusKind};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use mailmesh_proto::v1;
use tokio::io::{AsyncRead, AsyncWrite};

use super::message::{Parsed, istring_bytes};
use super::search::{Candidate, needs_content};
use super::{Conn, Session, code, status, storage_failure};
use crate::Gateway;

/// One message as the session sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub uid: u32,
    pub flags: Vec<String>,
    pub size: u64,
    pub internal_date_ms: i64,
    pub modseq: u64,
    /// `\Recent` to this session: it was the first told of the message
    /// (IMAP4rev1 only; storage decides, `Selected::claim_recent`).
    pub recent: bool,
}

impl From<v1::MessageInfo> for Msg {
    fn from(m: v1::MessageInfo) -> Self {
        Self {
            uid: m.uid,
            flags: m.flags,
            size: m.size,
            internal_date_ms: m.internal_date_ms,
            modseq: m.modseq,
            recent: false,
        }
    }
}

/// Pauses before reading the mailbox again when a refresh's read failed (a storage
/// replica restarting, a balancer moving the connection); then the session ends.
const REFRESH_RETRIES: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(100),
    std::time::Duration::from_millis(400),
    std::time::Duration::from_millis(1500),
];

/// A refresh's read of the mailbox: every message (`vanished` is `None`), or the
/// messages changed since the view's listing and the UIDs expunged since.
struct Listing {
    messages: Vec<v1::MessageInfo>,
    vanished: Option<Vec<u32>>,
    uid_next: u32,
    highest_modseq: u64,
    first_recent_uid: u32,
}

pub struct Selected {
    pub name: String,
    user: v1::UserRef,
    read_only: bool,
    uid_validity: u32,
    messages: Vec<Msg>,
    /// UIDs gone from storage but not yet announced (no EXPUNGE during FETCH,
    /// STORE or SEARCH).
    gone: HashSet<u32>,
    /// Keywords seen in this mailbox, for FLAGS.
    keywords: Vec<String>,
    uid_next: u32,
    highest_modseq: u64,
    /// The HIGHESTMODSEQ of the latest listing or change list: the view holds every
    /// change up to it (`highest_modseq` may be ahead, from single flag changes).
    listed_modseq: u64,
    /// Selected under CONDSTORE, or told HIGHESTMODSEQ by a CONDSTORE enabling
    /// command since (RFC 7162 §3.1).
    pub(crate) modseq_told: bool,
    /// An IMAP4rev1 session sees `\Recent` (IMAP4rev2 has none)…
    shows_recent: bool,
    /// …and one that selected read-write claims it for the messages it is the
    /// first to learn of; EXAMINE shows it without claiming (RFC 3501 §6.3.2).
    claims_recent: bool,
    /// The lowest UID storage had told no session about, as last heard.
    first_recent_uid: u32,
}

impl Selected {
    /// The user's renewed session token, for the calls from now on.
    pub(crate) fn renewed(&mut self, user: &v1::UserRef) {
        self.user = user.clone();
    }
}

/// `* OK [HIGHESTMODSEQ n]` (1 for a mailbox that never changed).
pub(crate) fn highest_modseq(modseq: u64) -> Response<'static> {
    status(
        None,
        StatusKind::Ok,
        Some(Code::HighestModSeq(
            NonZeroU64::new(modseq).unwrap_or(NonZeroU64::MIN),
        )),
        "Highest",
    )
}

/// The flag in the storage's notation (`\Seen`, or a keyword).
pub fn flag_string(f: &Flag<'_>) -> String {
    f.to_string()
}

fn to_flag(s: &str) -> Option<Flag<'static>> {
    match s.strip_prefix('\\') {
        Some(system) => Atom::try_from(system.to_owned()).ok().map(Flag::system),
        None => Atom::try_from(s.to_owned()).ok().map(Flag::Keyword),
    }
}

fn ranges(uids: &[u32]) -> Vec<v1::UidRange> {
    let mut out: Vec<v1::UidRange> = Vec::new();
    for &uid in uids {
        match out.last_mut() {
            Some(r) if r.last + 1 == uid => r.last = uid,
            _ => out.push(v1::UidRange {
                first: uid,
                last: uid,
            }),
        }
    }
    out
}

fn uid_set(uids: &[u32]) -> Option<UidSet> {
    let elements: Vec<UidElement> = ranges(uids)
        .into_iter()
        .filter_map(|r| {
            let first = NonZeroU32::new(r.first)?;
            let last = NonZeroU32::new(r.last)?;
            Some(if first == last {
                UidElement::Single(first)
            } else {
                UidElement::Range(first, last)
            })
        })
        .collect();
    Vec1::try_from(elements).ok().map(UidSet)
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

impl Selected {
    pub async fn open(
        gw: &Gateway,
        user: v1::UserRef,
        name: &str,
        read_only: bool,
        rev2: bool,
    ) -> Result<Self, tonic::Status> {
        let r = gw
            .store
            .mailboxes()
            .list_messages(v1::MailboxRequest {
                user: Some(gw.store.at(&user)),
                mailbox: name.to_owned(),
            })
            .await?
            .into_inner();
        let mut messages: Vec<Msg> = r.messages.into_iter().map(Msg::from).collect();
        messages.sort_by_key(|m| m.uid);
        let mut s = Self {
            name: name.to_owned(),
            user,
            read_only,
            uid_validity: r.uid_validity,
            messages,
            gone: HashSet::new(),
            keywords: Vec::new(),
            uid_next: r.uid_next,
            highest_modseq: r.highest_modseq,
            listed_modseq: r.highest_modseq,
            modseq_told: false,
            shows_recent: !rev2,
            claims_recent: !rev2 && !read_only,
            first_recent_uid: r.first_recent_uid,
        };
        s.learn_keywords();
        s.take_recent(gw, r.first_recent_uid).await?;
        Ok(s)
    }

    /// Marks the view's messages that are `\Recent` to this session: those no
    /// session was told about (from `first_recent_uid`, as storage last said). A
    /// read-write IMAP4rev1 session claims them first, so exactly one session on
    /// any pod gets each (one log record; nothing is written when there is nothing
    /// new to claim); EXAMINE only shows them.
    async fn take_recent(
        &mut self,
        gw: &Gateway,
        first_recent_uid: u32,
    ) -> Result<(), tonic::Status> {
        self.first_recent_uid = self.first_recent_uid.max(first_recent_uid);
        if !self.shows_recent {
            return Ok(());
        }
        let up_to = self
            .uid_next
            .max(self.messages.last().map_or(1, |m| m.uid + 1));
        let (from, to) = if !self.claims_recent {
            (self.first_recent_uid, up_to)
        } else if up_to > self.first_recent_uid {
            let r = gw
                .store
                .write(
                    v1::ClaimRecentRequest {
                        user: Some(gw.store.at(&self.user)),
                        mailbox: self.name.clone(),
                        uid_validity: self.uid_validity,
                        up_to,
                    },
                    |mut c, r| async move { c.claim_recent(r).await },
                )
                .await?
                .into_inner();
            self.first_recent_uid = self.first_recent_uid.max(r.to);
            (r.from, r.to)
        } else {
            return Ok(());
        };
        let start = self.messages.partition_point(|m| m.uid < from);
        for m in self.messages[start..].iter_mut().take_while(|m| m.uid < to) {
            m.recent = true;
        }
        Ok(())
    }

    /// How many of the view's messages are `\Recent` to this session.
    fn recent_count(&self) -> u32 {
        self.messages.iter().filter(|m| m.recent).count() as u32
    }

    fn learn_keywords(&mut self) {
        for m in &self.messages {
            for f in &m.flags {
                if !f.starts_with('\\') && !self.keywords.contains(f) {
                    self.keywords.push(f.clone());
                }
            }
        }
    }

    fn flags_response(&self) -> Response<'static> {
        let mut flags: Vec<Flag<'static>> = vec![
            Flag::Answered,
            Flag::Flagged,
            Flag::Deleted,
            Flag::Seen,
            Flag::Draft,
        ];
        flags.extend(self.keywords.iter().filter_map(|k| to_flag(k)));
        Response::Data(Data::Flags(flags))
    }

    /// The untagged replies of SELECT / EXAMINE.
    pub fn greet<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: &mut Conn<S>, rev2: bool) {
        conn.push(&self.flags_response());
        conn.push(&Response::Data(Data::Exists(self.messages.len() as u32)));
        // IMAP4rev2 has neither \Recent nor the UNSEEN code.
        if !rev2 {
            conn.push(&Response::Data(Data::Recent(self.recent_count())));
        }
        if let Some(i) = self
            .messages
            .iter()
            .position(|m| !m.flags.iter().any(|f| f == "\\Seen"))
            && !rev2
        {
            conn.push(&status(
                None,
                StatusKind::Ok,
                Some(Code::Unseen(nz(i as u32 + 1))),
                "First unseen",
            ));
        }
        conn.push(&status(
            None,
            StatusKind::Ok,
            Some(Code::UidValidity(nz(self.uid_validity))),
            "UIDs valid",
        ));
        let uid_next = self
            .uid_next
            .max(self.messages.last().map_or(1, |m| m.uid + 1));
        conn.push(&status(
            None,
            StatusKind::Ok,
            Some(Code::UidNext(nz(uid_next))),
            "Predicted next UID",
        ));
        let perm = if self.read_only {
            vec![]
        } else {
            vec![
                FlagPerm::Flag(Flag::Answered),
                FlagPerm::Flag(Flag::Flagged),
                FlagPerm::Flag(Flag::Deleted),
                FlagPerm::Flag(Flag::Seen),
                FlagPerm::Flag(Flag::Draft),
                FlagPerm::Asterisk,
            ]
        };
        conn.push(&status(
            None,
            StatusKind::Ok,
            Some(Code::PermanentFlags(perm)),
            "Flags permitted",
        ));
        conn.push(&highest_modseq(self.highest_modseq));
    }

    /// The sequence numbers of `uids` still in the view, as a set string.
    pub fn seq_set_of(&self, uids: &[u32]) -> Option<String> {
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        let seqs: Vec<u32> = self
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| wanted.contains(&m.uid))
            .map(|(i, _)| i as u32 + 1)
            .collect();
        set_string(&seqs)
    }

    pub fn highest_modseq(&self) -> u64 {
        self.highest_modseq
    }

    pub fn uid_validity(&self) -> u32 {
        self.uid_validity
    }

    pub fn pending_expunges(&self) -> bool {
        !self.gone.is_empty()
    }

    /// Re-reads the mailbox and announces the differences: EXPUNGE (when allowed),
    /// EXISTS, FETCH FLAGS. False when the session must end, the client told BYE:
    /// the mailbox is gone (deleted or renamed by another session), or storage
    /// could not be read even after retries — the changes that asked for this
    /// refresh are taken, so the view would stay stale and commands on it (a UID
    /// STORE of a message it never learned of) would answer OK for nothing; the
    /// client reconnects and resynchronises instead.
    pub async fn refresh<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        gw: &Gateway,
        conn: &mut Conn<S>,
        expunges: bool,
        condstore: bool,
        qresync: bool,
    ) -> bool {
        let mut read = self.changes(gw).await;
        for pause in REFRESH_RETRIES {
            match &read {
                Err(e) if e.code() != tonic::Code::NotFound => {
                    tracing::info!(error = %e, retry_in = ?pause, "refreshing the selected mailbox");
                    tokio::time::sleep(pause).await;
                    read = self.changes(gw).await;
                }
                _ => break,
            }
        }
        let listed = match read {
            Ok(listed) => listed,
            Err(e) if e.code() == tonic::Code::NotFound => {
                // Deleted or renamed away under us.
                conn.push(&Response::Status(
                    imap_codec::imap_types::response::Status::Bye(
                        imap_codec::imap_types::response::Bye {
                            code: None,
                            text: imap_codec::imap_types::core::Text::unvalidated(
                                "Selected mailbox was removed",
                            ),
                        },
                    ),
                ));
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the selected mailbox could not be refreshed; ending the session");
                crate::metrics::event(super::PROTOCOL, "refresh_failed");
                conn.push(&Response::Status(
                    imap_codec::imap_types::response::Status::Bye(
                        imap_codec::imap_types::response::Bye {
                            code: Some(code("UNAVAILABLE")),
                            text: imap_codec::imap_types::core::Text::unvalidated(
                                "Mail storage is unavailable; reconnect to resynchronise",
                            ),
                        },
                    ),
                ));
                return false;
            }
        };
        let now: BTreeMap<u32, Msg> = listed
            .messages
            .into_iter()
            .map(|m| (m.uid, Msg::from(m)))
            .collect();
        match &listed.vanished {
            // Changes only: what is not listed did not change.
            Some(vanished) => {
                for uid in vanished {
                    if self.messages.binary_search_by_key(uid, |m| m.uid).is_ok() {
                        self.gone.insert(*uid);
                    }
                }
            }
            None => {
                for m in &self.messages {
                    if !now.contains_key(&m.uid) {
                        self.gone.insert(m.uid);
                    }
                }
            }
        }
        self.uid_next = self.uid_next.max(listed.uid_next);
        self.highest_modseq = self.highest_modseq.max(listed.highest_modseq);
        self.listed_modseq = listed.highest_modseq;
        if expunges && !self.gone.is_empty() {
            let gone = std::mem::take(&mut self.gone);
            self.remove(conn, &gone, qresync);
        }
        let keywords_before = self.keywords.len();
        let mut changed = Vec::new();
        for (i, m) in self.messages.iter_mut().enumerate() {
            if let Some(n) = now.get(&m.uid)
                && (n.flags != m.flags || n.modseq != m.modseq)
            {
                m.flags = n.flags.clone();
                m.modseq = n.modseq;
                changed.push(i);
            }
        }
        let last = self.messages.last().map_or(0, |m| m.uid);
        let new: Vec<Msg> = now.range(last + 1..).map(|(_, m)| m.clone()).collect();
        let grew = !new.is_empty();
        self.messages.extend(new);
        self.learn_keywords();
        if self.keywords.len() != keywords_before {
            conn.push(&self.flags_response());
        }
        if grew {
            // A failed claim leaves the messages to the next session that asks.
            if let Err(e) = self.take_recent(gw, listed.first_recent_uid).await {
                tracing::info!(error = %e, "claiming recent messages failed");
            }
            conn.push(&Response::Data(Data::Exists(self.messages.len() as u32)));
            if self.shows_recent {
                conn.push(&Response::Data(Data::Recent(self.recent_count())));
            }
        }
        self.announce_flags(conn, changed, condstore);
        true
    }

    /// What changed since the view's last listing, read at one state of the
    /// mailbox: only the changes when storage still knows every expunge since
    /// then (`vanished` is `Some`), else the whole mailbox.
    async fn changes(&self, gw: &Gateway) -> Result<Listing, tonic::Status> {
        if self.listed_modseq > 0 {
            let r = gw
                .store
                .mailboxes()
                .list_changes(v1::ChangesRequest {
                    user: Some(gw.store.at(&self.user)),
                    mailbox: self.name.clone(),
                    since_modseq: self.listed_modseq,
                })
                .await?
                .into_inner();
            if r.complete && r.uid_validity == self.uid_validity {
                crate::metrics::event(super::PROTOCOL, "refresh_changes");
                return Ok(Listing {
                    messages: r.changed,
                    vanished: Some(r.vanished),
                    uid_next: r.uid_next,
                    highest_modseq: r.highest_modseq,
                    first_recent_uid: r.first_recent_uid,
                });
            }
        }
        crate::metrics::event(super::PROTOCOL, "refresh_listing");
        let r = gw
            .store
            .mailboxes()
            .list_messages(v1::MailboxRequest {
                user: Some(gw.store.at(&self.user)),
                mailbox: self.name.clone(),
            })
            .await?
            .into_inner();
        Ok(Listing {
            messages: r.messages,
            vanished: None,
            uid_next: r.uid_next,
            highest_modseq: r.highest_modseq,
            first_recent_uid: r.first_recent_uid,
        })
    }

    /// FETCH (UID FLAGS [MODSEQ]) for the messages at these view positions.
    fn announce_flags<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<S>,
        changed: Vec<usize>,
        condstore: bool,
    ) {
        for i in changed {
            let m = &self.messages[i];
            let mut items = vec![
                MessageDataItem::Uid(nz(m.uid)),
                MessageDataItem::Flags(fetch_flags(m)),
            ];
            if condstore && let Some(modseq) = NonZeroU64::new(m.modseq) {
                items.push(MessageDataItem::ModSeq(modseq));
            }
            conn.push(&Response::Data(Data::Fetch {
                seq: nz(i as u32 + 1),
                items: Vec1::try_from(items).expect("not empty"),
            }));
        }
    }

    /// Applies flag changes that came with their flags (no listing): each one newer
    /// than what the view has is taken and announced as FETCH FLAGS.
    pub fn apply_flags<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        updates: BTreeMap<u32, (u64, Vec<String>)>,
        condstore: bool,
    ) {
        let keywords_before = self.keywords.len();
        let mut changed = Vec::new();
        for (uid, (modseq, flags)) in updates {
            let Ok(i) = self.messages.binary_search_by_key(&uid, |m| m.uid) else {
                continue;
            };
            let m = &mut self.messages[i];
            if modseq > m.modseq {
                m.flags = flags;
                m.modseq = modseq;
                self.highest_modseq = self.highest_modseq.max(modseq);
                changed.push(i);
            }
        }
        self.learn_keywords();
        if self.keywords.len() != keywords_before {
            conn.push(&self.flags_response());
        }
        self.announce_flags(conn, changed, condstore);
    }

    /// Takes `uids` out of the view and tells the client: EXPUNGE with sequence
    /// numbers, or VANISHED with UIDs once QRESYNC is enabled (RFC 7162 §3.2.10).
    pub fn remove<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        uids: &HashSet<u32>,
        qresync: bool,
    ) {
        let mut removed = Vec::new();
        // Highest first, so every number is right when the client applies it.
        for i in (0..self.messages.len()).rev() {
            if uids.contains(&self.messages[i].uid) {
                let m = self.messages.remove(i);
                if !qresync {
                    conn.push(&Response::Data(Data::Expunge(nz(i as u32 + 1))));
                }
                removed.push(nz(m.uid));
            }
        }
        for uid in uids {
            self.gone.remove(uid);
        }
        if qresync && !removed.is_empty() {
            removed.reverse();
            if let Ok(set) = SequenceSet::try_from(removed) {
                conn.push(&Response::Data(Data::Vanished {
                    earlier: false,
                    known_uids: set,
                }));
            }
        }
    }

    /// QRESYNC on SELECT (RFC 7162 §3.2.5): what changed since the client's MODSEQ,
    /// as VANISHED (EARLIER) and FETCH replies. `known` limits the UIDs reported.
    pub async fn resync<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        gw: &Gateway,
        conn: &mut Conn<S>,
        since: u64,
        known: Option<&SequenceSet>,
    ) -> Result<(), tonic::Status> {
        self.vanished_earlier(gw, conn, since, known).await?;
        for (i, m) in self.messages.iter().enumerate() {
            if m.modseq > since {
                conn.push(&Response::Data(Data::Fetch {
                    seq: nz(i as u32 + 1),
                    items: Vec1::try_from(vec![
                        MessageDataItem::Uid(nz(m.uid)),
                        MessageDataItem::Flags(fetch_flags(m)),
                        MessageDataItem::ModSeq(
                            NonZeroU64::new(m.modseq).unwrap_or(NonZeroU64::MIN),
                        ),
                    ])
                    .expect("not empty"),
                }));
            }
        }
        Ok(())
    }

    /// `* VANISHED (EARLIER)` for the UIDs (within `known`) expunged after `since`.
    /// When storage's bounded log no longer reaches back that far, every known UID
    /// that does not exist is reported (the client already forgot the rest).
    async fn vanished_earlier<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        gw: &Gateway,
        conn: &mut Conn<S>,
        since: u64,
        known: Option<&SequenceSet>,
    ) -> Result<(), tonic::Status> {
        let r = gw
            .store
            .mailboxes()
            .vanished(v1::VanishedRequest {
                user: Some(gw.store.at(&self.user)),
                mailbox: self.name.clone(),
                since_modseq: since,
            })
            .await?
            .into_inner();
        // Here `*` is the highest UID ever assigned: "1:*" covers expunged ones too.
        let star = self.uid_next.saturating_sub(1);
        let mut gaps: Vec<(u32, u32)> = if r.complete {
            r.uids
                .into_iter()
                .filter(|&u| known.is_none_or(|k| contains(k, u, star)))
                .map(|u| (u, u))
                .collect()
        } else {
            // The log no longer reaches back: every UID the client may know that
            // does not exist now, as ranges (the gaps between existing UIDs).
            let wanted: Vec<(u32, u32)> = match known {
                Some(k) => k.0.as_ref().iter().map(|s| bounds(s, star)).collect(),
                None => vec![(1, star)],
            };
            let existing: Vec<u32> = self.messages.iter().map(|m| m.uid).collect();
            gaps(&existing, &wanted)
        };
        gaps.sort_unstable();
        let sequences: Vec<Sequence> = gaps
            .into_iter()
            .filter(|(lo, hi)| *lo >= 1 && lo <= hi)
            .map(|(lo, hi)| {
                if lo == hi {
                    Sequence::Single(SeqOrUid::Value(nz(lo)))
                } else {
                    Sequence::Range(SeqOrUid::Value(nz(lo)), SeqOrUid::Value(nz(hi)))
                }
            })
            .collect();
        if let Ok(set) = SequenceSet::try_from(sequences) {
            conn.push(&Response::Data(Data::Vanished {
                earlier: true,
                known_uids: set,
            }));
        }
        Ok(())
    }

    pub fn contains_seq(&self, set: &SequenceSet, seq: u32) -> bool {
        contains(set, seq, self.messages.len() as u32)
    }

    /// `*` is the highest UID in the mailbox, so "n:*" always includes it
    /// (RFC 3501 §6.4.8).
    pub fn contains_uid(&self, set: &SequenceSet, uid: u32) -> bool {
        contains(set, uid, self.messages.last().map_or(0, |m| m.uid))
    }

    /// The UID ranges storage is asked about, in batches it accepts (at most
    /// `MAX_RANGES` ranges and `MAX_BATCH` messages each). UIDs next to each other in
    /// the view share a range: a gap below the highest UID seen holds no message
    /// (UIDs only grow), so scattered sets stay compact.
    fn batches(&self, uids: &[u32]) -> Vec<Vec<v1::UidRange>> {
        const MAX_RANGES: usize = 1000;
        const MAX_BATCH: usize = 5000;
        let mut sorted = uids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut batches: Vec<Vec<v1::UidRange>> = Vec::new();
        let mut current: Vec<v1::UidRange> = Vec::new();
        let mut in_batch = 0;
        let mut last_index: Option<usize> = None;
        for uid in sorted {
            let index = self.messages.binary_search_by_key(&uid, |m| m.uid).ok();
            let adjacent = matches!((last_index, index), (Some(a), Some(b)) if b == a + 1);
            if in_batch == MAX_BATCH || (!adjacent && current.len() == MAX_RANGES) {
                batches.push(std::mem::take(&mut current));
                in_batch = 0;
            }
            match current.last_mut() {
                Some(r) if adjacent && in_batch > 0 => r.last = uid,
                _ => current.push(v1::UidRange {
                    first: uid,
                    last: uid,
                }),
            }
            in_batch += 1;
            last_index = index;
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }

    /// Indexes into `messages` a sequence or UID set names, in order; `Err` for a
    /// sequence number that does not exist (a client error). `*` in an empty
    /// mailbox names nothing.
    fn resolve(&self, set: &SequenceSet, uid: bool) -> Result<Vec<usize>, ()> {
        let star_only = |v: &SeqOrUid| matches!(v, SeqOrUid::Asterisk);
        if self.messages.is_empty()
            && set.0.as_ref().iter().all(|s| match s {
                Sequence::Single(v) => star_only(v),
                Sequence::Range(a, b) => star_only(a) || star_only(b),
            })
        {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if uid {
            for (i, m) in self.messages.iter().enumerate() {
                if self.contains_uid(set, m.uid) {
                    out.push(i);
                }
            }
            // "n:*" always includes the highest UID, even when n is above it.
            if let Some(last) = self.messages.len().checked_sub(1)
                && !out.contains(&last)
                && set.0.as_ref().iter().any(|s| {
                    matches!(
                        s,
                        Sequence::Range(_, SeqOrUid::Asterisk)
                            | Sequence::Range(SeqOrUid::Asterisk, _)
                            | Sequence::Single(SeqOrUid::Asterisk)
                    )
                })
            {
                out.push(last);
            }
            return Ok(out);
        }
        let n = self.messages.len() as u32;
        for s in set.0.as_ref() {
            let (a, b) = bounds(s, n);
            if a == 0 || b > n {
                return Err(());
            }
        }
        for (i, _) in self.messages.iter().enumerate() {
            if self.contains_seq(set, i as u32 + 1) {
                out.push(i);
            }
        }
        Ok(out)
    }
}

/// The UIDs in `wanted` (inclusive ranges) that are not in `existing` (ascending),
/// as ranges.
fn gaps(existing: &[u32], wanted: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut gaps = Vec::new();
    for &(lo, hi) in wanted {
        let lo = lo.max(1);
        let mut next = lo;
        let from = existing.partition_point(|&u| u < lo);
        for &uid in existing[from..].iter().take_while(|&&u| u <= hi) {
            if uid > next {
                gaps.push((next, uid - 1));
            }
            next = uid + 1;
        }
        if next <= hi {
            gaps.push((next, hi));
        }
    }
    gaps
}

fn read_only(tag: &Tag<'_>) -> Response<'static> {
    status(
        Some(tag),
        StatusKind::No,
        Some(code("READ-ONLY")),
        "Mailbox is read-only",
    )
}

fn invalid_set(tag: &Tag<'_>) -> Response<'static> {
    status(Some(tag), StatusKind::Bad, None, "Invalid sequence set")
}

/// The range a sequence names, `*` being `star` (ranges may be written backwards).
fn bounds(s: &Sequence, star: u32) -> (u32, u32) {
    let value = |v: &SeqOrUid| match v {
        SeqOrUid::Value(n) => n.get(),
        SeqOrUid::Asterisk => star,
    };
    match s {
        Sequence::Single(v) => (value(v), value(v)),
        Sequence::Range(a, b) => {
            let (a, b) = (value(a), value(b));
            (a.min(b), a.max(b))
        }
    }
}

fn contains(set: &SequenceSet, n: u32, star: u32) -> bool {
    set.0.as_ref().iter().any(|s| {
        let (a, b) = bounds(s, star);
        (a..=b).contains(&n)
    })
}

/// STORE over batches of UIDs; the replies merged.
async fn store_batched(
    gw: &Gateway,
    sel: &Selected,
    uids: &[u32],
    action: v1::store_flags_request::Action,
    flags: Vec<String>,
    unchanged_since: Option<u64>,
) -> Result<v1::StoreFlagsResponse, tonic::Status> {
    let mut all = v1::StoreFlagsResponse::default();
    for batch in sel.batches(uids) {
        let r = gw
            .store
            .write(
                v1::StoreFlagsRequest {
                    user: Some(gw.store.at(&sel.user)),
                    mailbox: sel.name.clone(),
                    uids: batch,
                    action: action.into(),
                    flags: flags.clone(),
                    unchanged_since,
                },
                |mut c, r| async move { c.store_flags(r).await },
            )
            .await?
            .into_inner();
        all.changed.extend(r.changed);
        all.modified.extend(r.modified);
    }
    Ok(all)
}

/// COPY/MOVE over batches of UIDs; the replies merged (a failure part-way leaves
/// the earlier batches done, as separate commands would).
async fn copy_batched(
    gw: &Gateway,
    sel: &Selected,
    uids: &[u32],
    to: &str,
    remove_source: bool,
) -> Result<v1::CopyResponse, tonic::Status> {
    let mut all = v1::CopyResponse::default();
    for batch in sel.batches(uids) {
        let r = gw
            .store
            .write(
                v1::CopyRequest {
                    user: Some(gw.store.at(&sel.user)),
                    from: sel.name.clone(),
                    to: to.to_owned(),
                    uids: batch,
                    remove_source,
                },
                |mut c, r| async move { c.copy(r).await },
            )
            .await?
            .into_inner();
        all.uid_validity = r.uid_validity;
        all.source_uids.extend(r.source_uids);
        all.destination_uids.extend(r.destination_uids);
    }
    Ok(all)
}

/// A message's FLAGS as FETCH tells them, `\Recent` included when it is.
fn fetch_flags(m: &Msg) -> Vec<FlagFetch<'static>> {
    let mut flags: Vec<FlagFetch<'static>> = m
        .flags
        .iter()
        .filter_map(|f| to_flag(f))
        .map(FlagFetch::Flag)
        .collect();
    if m.recent {
        flags.push(FlagFetch::Recent);
    }
    flags
}

fn internal_date(ms: i64) -> ImapDateTime {
    let utc = DateTime::<Utc>::from_timestamp_millis(ms - ms.rem_euclid(1000)).unwrap_or_default();
    let fixed: DateTime<FixedOffset> = utc.fixed_offset();
    ImapDateTime::try_from(fixed).unwrap_or_else(|_| {
        ImapDateTime::try_from(DateTime::<Utc>::UNIX_EPOCH.fixed_offset()).expect("valid date")
    })
}

/// `1:3,5` for ascending numbers; `None` for none.
pub fn set_string(numbers: &[u32]) -> Option<String> {
    let parts: Vec<String> = ranges(numbers)
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}:{}", r.first, r.last)
            }
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// Stored bytes for a non-BINARY item: a string or literal as usual; bytes that hold
/// NUL (which an IMAP literal may not) become a placeholder literal of the same
/// length, replaced on the wire by the bytes themselves (`Conn::fetch_item`):
/// the message is served as stored, never altered.
fn stored<'r>(data: &'r [u8], verbatim: &mut Vec<&'r [u8]>) -> IString<'static> {
    if !data.contains(&0) {
        return istring_bytes(data);
    }
    verbatim.push(data);
    let placeholder: Vec<u8> = data.iter().map(|&b| if b == 0 { 1 } else { b }).collect();
    IString::Literal(
        imap_codec::imap_types::core::Literal::try_from(placeholder)
            .expect("no NUL left in the placeholder"),
    )
}

/// BINARY data: a string or literal when it can be one, a literal8 (`~{n}`) when
/// it holds NUL bytes (RFC 3516 §4.2).
fn binary_value(data: &[u8]) -> NString8<'static> {
    if data.contains(&0) {
        NString8::Literal8(Literal8 {
            data: data.to_vec().into(),
            mode: LiteralMode::Sync,
        })
    } else {
        NString8::NString(NString(Some(istring_bytes(data))))
    }
}

/// BINARY sections of one message, decoded.
type Binaries<'s, 'r> = HashMap<&'s [NonZeroU32], std::borrow::Cow<'r, [u8]>>;

/// The bytes `item` puts on the wire for a message (its literal; 0 for the small
/// items), before any copy is made.
fn item_bytes(
    item: &MessageDataItemName<'_>,
    raw: Option<&[u8]>,
    p: Option<&Parsed<'_>>,
    binaries: &Binaries<'_, '_>,
) -> usize {
    match item {
        MessageDataItemName::Rfc822 => raw.map_or(0, <[u8]>::len),
        MessageDataItemName::Rfc822Header => p.map_or(0, |p| p.header().len()),
        MessageDataItemName::Rfc822Text => p.map_or(0, |p| p.text().len()),
        MessageDataItemName::BodyExt {
            section, partial, ..
        } => {
            let len = p.map_or(0, |p| p.section_len(section.as_ref()));
            partial.map_or(len, |(start, n)| {
                len.saturating_sub(start as usize).min(n.get() as usize)
            })
        }
        MessageDataItemName::Binary {
            section, partial, ..
        } => {
            let len = binaries.get(section.as_slice()).map_or(0, |b| b.len());
            partial.map_or(len, |(start, n)| {
                len.saturating_sub(start as usize).min(n.get() as usize)
            })
        }
        _ => 0,
    }
}

/// One FETCH item of message `m` (content items need `raw` and `p`; BINARY's
/// transfer encoding is known to be one we undo).
fn fetch_item<'r>(
    item: &MessageDataItemName<'static>,
    m: &Msg,
    seen_now: bool,
    raw: Option<&'r [u8]>,
    p: Option<&Parsed<'r>>,
    binaries: &Binaries<'_, 'r>,
    verbatim: &mut Vec<&'r [u8]>,
) -> MessageDataItem<'static> {
    let content = || p.expect("content");
    match item {
        MessageDataItemName::Uid => MessageDataItem::Uid(nz(m.uid)),
        MessageDataItemName::Flags => {
            let mut flags = fetch_flags(m);
            if seen_now {
                flags.push(FlagFetch::Flag(Flag::Seen));
            }
            MessageDataItem::Flags(flags)
        }
        MessageDataItemName::InternalDate => {
            MessageDataItem::InternalDate(internal_date(m.internal_date_ms))
        }
        MessageDataItemName::Rfc822Size => {
            MessageDataItem::Rfc822Size(u32::try_from(m.size).unwrap_or(u32::MAX))
        }
        MessageDataItemName::ModSeq => {
            MessageDataItem::ModSeq(NonZeroU64::new(m.modseq).unwrap_or(NonZeroU64::MIN))
        }
        MessageDataItemName::Envelope => MessageDataItem::Envelope(content().envelope()),
        MessageDataItemName::BodyStructure => {
            MessageDataItem::BodyStructure(content().body_structure(true))
        }
        MessageDataItemName::Body => MessageDataItem::Body(content().body_structure(false)),
        MessageDataItemName::Rfc822 => {
            MessageDataItem::Rfc822(NString(Some(stored(raw.unwrap_or_default(), verbatim))))
        }
        MessageDataItemName::Rfc822Header => {
            MessageDataItem::Rfc822Header(NString(Some(stored(content().header(), verbatim))))
        }
        MessageDataItemName::Rfc822Text => {
            MessageDataItem::Rfc822Text(NString(Some(stored(content().text(), verbatim))))
        }
        MessageDataItemName::BodyExt {
            section, partial, ..
        } => {
            let bytes = content().section(section.as_ref());
            let (range, origin) = match partial {
                Some((start, len)) => {
                    let s = (*start as usize).min(bytes.len());
                    let e = s.saturating_add(len.get() as usize).min(bytes.len());
                    (s..e, Some(*start))
                }
                None => (0..bytes.len(), None),
            };
            let data = match bytes {
                // A piece of the stored message: verbatim if it must be.
                std::borrow::Cow::Borrowed(b) => stored(&b[range], verbatim),
                // HEADER.FIELDS: lines picked from it.
                std::borrow::Cow::Owned(o) => istring_bytes(&o[range]),
            };
            MessageDataItem::BodyExt {
                section: section.clone(),
                origin,
                data: NString(Some(data)),
            }
        }
        MessageDataItemName::Binary {
            section, partial, ..
        } => {
            let bytes = binaries
                .get(section.as_slice())
                .map_or(&[][..], |b| b.as_ref());
            let data = match partial {
                Some((start, len)) => {
                    let s = (*start as usize).min(bytes.len());
                    let e = s.saturating_add(len.get() as usize).min(bytes.len());
                    &bytes[s..e]
                }
                None => bytes,
            };
            MessageDataItem::Binary {
                section: section.clone(),
                value: binary_value(data),
            }
        }
        MessageDataItemName::BinarySize { section } => MessageDataItem::BinarySize {
            section: section.clone(),
            size: u32::try_from(binaries.get(section.as_slice()).map_or(0, |b| b.len()))
                .unwrap_or(u32::MAX),
        },
    }
}

/// A fetch item needs the message content (not only the index metadata).
fn needs_body(item: &MessageDataItemName<'_>) -> bool {
    !matches!(
        item,
        MessageDataItemName::Flags
            | MessageDataItemName::InternalDate
            | MessageDataItemName::Rfc822Size
            | MessageDataItemName::Uid
            | MessageDataItemName::ModSeq
    )
}

/// A fetch item that sets \Seen (RFC 3501: BODY[...] without PEEK, RFC822, RFC822.TEXT).
fn sets_seen(item: &MessageDataItemName<'_>) -> bool {
    matches!(
        item,
        MessageDataItemName::BodyExt { peek: false, .. }
            | MessageDataItemName::Rfc822
            | MessageDataItemName::Rfc822Text
            | MessageDataItemName::Binary { peek: false, .. }
    )
}

impl Session {
    pub(super) async fn selected_command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        body: CommandBody<'static>,
    ) -> io::Result<()> {
        let gw = self.gw.clone();
        let is_move = matches!(body, CommandBody::Move { .. });
        let qresync = self.qresync;
        // The target of COPY/MOVE, named before the selected view is borrowed.
        let target = match &body {
            CommandBody::Copy { mailbox, .. } | CommandBody::Move { mailbox, .. } => {
                self.mailbox_name(mailbox)
            }
            _ => String::new(),
        };
        if self.extras.saved_empty
            && matches!(
                body,
                CommandBody::Fetch { .. }
                    | CommandBody::Store { .. }
                    | CommandBody::Copy { .. }
                    | CommandBody::Move { .. }
                    | CommandBody::ExpungeUid { .. }
            )
        {
            // `$` of an empty saved result: nothing to act on (RFC 5182 §2.1).
            conn.push(&status(Some(tag), StatusKind::Ok, None, "No messages"));
            return Ok(());
        }
        let Some(sel) = self.selected.as_mut() else {
            return Ok(());
        };
        match body {
            CommandBody::Unselect => {
                self.selected = None;
                self.saved.clear();
                conn.push(&status(
                    Some(tag),
                    StatusKind::Ok,
                    None,
                    "UNSELECT completed",
                ));
            }
            CommandBody::Close => {
                if !sel.read_only {
                    // Every \Deleted message, whoever flagged it (RFC 3501 §6.4.2).
                    let r = gw
                        .store
                        .write(
                            v1::ExpungeRequest {
                                user: Some(gw.store.at(&sel.user)),
                                mailbox: sel.name.clone(),
                                uids: Vec::new(),
                            },
                            |mut c, r| async move { c.expunge(r).await },
                        )
                        .await;
                    if let Err(e) = r {
                        conn.push(&storage_failure(tag, &e));
                        return Ok(());
                    }
                }
                self.selected = None;
                self.saved.clear();
                conn.push(&status(Some(tag), StatusKind::Ok, None, "CLOSE completed"));
            }
            CommandBody::Expunge | CommandBody::ExpungeUid { .. } => {
                if sel.read_only {
                    conn.push(&read_only(tag));
                    return Ok(());
                }
                // EXPUNGE: every \Deleted message, whoever flagged it (RFC 3501
                // §6.4.3); UID EXPUNGE: those of the set this session knows.
                let batches = match &body {
                    CommandBody::ExpungeUid { sequence_set } => {
                        let uids: Vec<u32> = sel
                            .messages
                            .iter()
                            .filter(|m| m.flags.iter().any(|f| f == "\\Deleted"))
                            .filter(|m| sel.contains_uid(sequence_set, m.uid))
                            .map(|m| m.uid)
                            .collect();
                        if uids.is_empty() {
                            Vec::new()
                        } else {
                            sel.batches(&uids)
                        }
                    }
                    _ => vec![Vec::new()],
                };
                for batch in batches {
                    let r = gw
                        .store
                        .write(
                            v1::ExpungeRequest {
                                user: Some(gw.store.at(&sel.user)),
                                mailbox: sel.name.clone(),
                                uids: batch,
                            },
                            |mut c, r| async move { c.expunge(r).await },
                        )
                        .await;
                    match r {
                        Ok(r) => sel.gone.extend(r.into_inner().uids),
                        Err(e) => {
                            conn.push(&storage_failure(tag, &e));
                            return Ok(());
                        }
                    }
                }
                // Announce exactly what is gone (ours and anyone's).
                let gone = std::mem::take(&mut sel.gone);
                sel.remove(conn, &gone, qresync);
                conn.push(&status(
                    Some(tag),
                    StatusKind::Ok,
                    None,
                    "EXPUNGE completed",
                ));
            }
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                if let Some(c) = &charset {
                    let c = c.as_ref().to_ascii_uppercase();
                    if c != "UTF-8" && c != "US-ASCII" {
                        conn.push(&status(
                            Some(tag),
                            StatusKind::No,
                            Some(Code::BadCharset {
                                allowed: vec![
                                    imap_codec::imap_types::core::Charset::try_from("UTF-8")
                                        .expect("charset"),
                                    imap_codec::imap_types::core::Charset::try_from("US-ASCII")
                                        .expect("charset"),
                                ],
                            }),
                            "Unsupported charset",
                        ));
                        return Ok(());
                    }
                }
                let key = match criteria.as_ref().len() {
                    1 => criteria.as_ref()[0].clone(),
                    _ => SearchKey::And(criteria.clone()),
                };
                let uses_modseq = search_uses_modseq(&key);
                if uses_modseq {
                    self.condstore_used(conn);
                }
                let sel = self.selected.as_ref().expect("selected");
                let content = needs_content(&key);
                let mut hits = Vec::new();
                let mut hit_uids = Vec::new();
                let mut hit_modseqs = Vec::new();
                let mut highest = 0;
                for (i, m) in sel.messages.iter().enumerate() {
                    // The stored bytes and their decoded text.
                    let _memory = match content {
                        true => Some(hold_memory(&gw, m.size.saturating_mul(2)).await),
                        false => None,
                    };
                    let raw = if content {
                        match fetch_message(&gw, sel, m.uid).await {
                            Ok(raw) => Some(raw),
                            Err(_) => continue,
                        }
                    } else {
                        None
                    };
                    let parsed = raw
                        .as_deref()
                        .map(|r| Parsed::new(r, gw.imap.mime_limits()));
                    let headers = std::cell::OnceCell::new();
                    let body_text = std::cell::OnceCell::new();
                    let c = Candidate {
                        seq: i as u32 + 1,
                        msg: m,
                        view: sel,
                        content: parsed.as_ref(),
                        headers: &headers,
                        body: &body_text,
                    };
                    if c.matches(&key) {
                        hits.push(nz(if uid { m.uid } else { i as u32 + 1 }));
                        hit_uids.push(m.uid);
                        hit_modseqs.push(m.modseq);
                        highest = highest.max(m.modseq);
                    }
                }
                let modseq = if uses_modseq {
                    NonZeroU64::new(highest)
                } else {
                    None
                };
                let modseqs = uses_modseq.then_some(hit_modseqs.as_slice());
                // ESEARCH when asked with RETURN, and always for IMAP4rev2 clients.
                match self
                    .extras
                    .search_return
                    .take()
                    .or(self.rev2.then(Vec::new))
                {
                    Some(mut options) => {
                        if let Some(at) = options.iter().position(|o| o == "SAVE") {
                            // SEARCHRES (RFC 5182 §2.4): MIN and/or MAX alone save just
                            // those; otherwise the whole result is saved.
                            options.remove(at);
                            let only_ends = !options.is_empty()
                                && options.iter().all(|o| o == "MIN" || o == "MAX");
                            self.saved = if only_ends {
                                let mut ends = Vec::new();
                                if options.iter().any(|o| o == "MIN") {
                                    ends.extend(hit_uids.first());
                                }
                                if options.iter().any(|o| o == "MAX") {
                                    ends.extend(hit_uids.last());
                                }
                                ends.dedup();
                                ends
                            } else {
                                hit_uids
                            };
                            if !options.is_empty() {
                                conn.push_raw(&esearch(tag, uid, &options, &hits, modseqs));
                            }
                        } else {
                            conn.push_raw(&esearch(tag, uid, &options, &hits, modseqs));
                        }
                    }
                    None => conn.push(&Response::Data(Data::Search(hits, modseq))),
                }
                conn.push(&status(Some(tag), StatusKind::Ok, None, "SEARCH completed"));
            }
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                let mut items = match macro_or_item_names {
                    MacroOrMessageDataItemNames::Macro(m) => {
                        m.expand().into_iter().map(|i| i.into_static()).collect()
                    }
                    MacroOrMessageDataItemNames::MessageDataItemNames(items) => items,
                };
                let mut changed_since = None;
                let mut vanished = false;
                for m in &modifiers {
                    match m {
                        FetchModifier::ChangedSince(v) => {
                            changed_since = Some(v.get());
                            self.condstore_used(conn);
                        }
                        FetchModifier::Vanished => vanished = true,
                    }
                }
                if vanished {
                    // RFC 7162 §3.2.6: only UID FETCH, with CHANGEDSINCE, once enabled.
                    let (Some(since), true, true) = (changed_since, uid, self.qresync) else {
                        conn.push(&status(
                            Some(tag),
                            StatusKind::Bad,
                            None,
                            "VANISHED needs UID FETCH, CHANGEDSINCE and ENABLE QRESYNC",
                        ));
                        return Ok(());
                    };
                    let sel = self.selected.as_ref().expect("selected");
                    if let Err(e) = sel
                        .vanished_earlier(&self.gw, conn, since, Some(&sequence_set))
                        .await
                    {
                        conn.push(&storage_failure(tag, &e));
                        return Ok(());
                    }
                }
                if items
                    .iter()
                    .any(|i| matches!(i, MessageDataItemName::ModSeq))
                {
                    self.condstore_used(conn);
                }
                if uid && !items.iter().any(|i| matches!(i, MessageDataItemName::Uid)) {
                    items.insert(0, MessageDataItemName::Uid);
                }
                if self.condstore
                    && changed_since.is_some()
                    && !items
                        .iter()
                        .any(|i| matches!(i, MessageDataItemName::ModSeq))
                {
                    items.push(MessageDataItemName::ModSeq);
                }
                self.fetch(conn, tag, &sequence_set, uid, &items, changed_since)
                    .await?;
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                if sel.read_only {
                    conn.push(&read_only(tag));
                    return Ok(());
                }
                let Ok(indexes) = sel.resolve(&sequence_set, uid) else {
                    conn.push(&invalid_set(tag));
                    return Ok(());
                };
                let mut unchanged_since = None;
                for m in &modifiers {
                    let StoreModifier::UnchangedSince(v) = m;
                    unchanged_since = Some(*v);
                    self.condstore_used(conn);
                }
                let condstore = self.condstore;
                let sel = self.selected.as_mut().expect("selected");
                let uids: Vec<u32> = indexes.iter().map(|&i| sel.messages[i].uid).collect();
                if uids.is_empty() {
                    conn.push(&status(Some(tag), StatusKind::Ok, None, "STORE completed"));
                    return Ok(());
                }
                let action = match kind {
                    StoreType::Add => v1::store_flags_request::Action::Add,
                    StoreType::Remove => v1::store_flags_request::Action::Remove,
                    StoreType::Replace => v1::store_flags_request::Action::Replace,
                };
                let r = store_batched(
                    &gw,
                    sel,
                    &uids,
                    action,
                    flags.iter().map(flag_string).collect(),
                    unchanged_since,
                )
                .await;
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        conn.push(&storage_failure(tag, &e));
                        return Ok(());
                    }
                };
                let changed: BTreeMap<u32, v1::MessageInfo> =
                    r.changed.into_iter().map(|m| (m.uid, m)).collect();
                let keywords_before = sel.keywords.len();
                for m in sel.messages.iter_mut() {
                    if let Some(c) = changed.get(&m.uid) {
                        m.flags = c.flags.clone();
                        m.modseq = c.modseq;
                    }
                }
                sel.learn_keywords();
                if sel.keywords.len() != keywords_before {
                    conn.push(&sel.flags_response());
                }
                for &i in &indexes {
                    let m = &sel.messages[i];
                    // .SILENT still reports MODSEQ changes under CONDSTORE (RFC 7162 §3.1.3).
                    let silent = matches!(response, StoreResponse::Silent);
                    let report = if silent {
                        // Under CONDSTORE a changed message's new MODSEQ is reported
                        // even for .SILENT (RFC 7162 §3.1.4), without FLAGS.
                        condstore && changed.contains_key(&m.uid)
                    } else {
                        changed.contains_key(&m.uid) || unchanged_since.is_none()
                    };
                    if !report {
                        continue;
                    }
                    let mut items = Vec::new();
                    if !silent {
                        items.push(MessageDataItem::Flags(fetch_flags(m)));
                    }
                    if uid {
                        items.insert(0, MessageDataItem::Uid(nz(m.uid)));
                    }
                    if condstore && let Some(modseq) = NonZeroU64::new(m.modseq) {
                        items.push(MessageDataItem::ModSeq(modseq));
                    }
                    conn.push(&Response::Data(Data::Fetch {
                        seq: nz(i as u32 + 1),
                        items: Vec1::try_from(items).expect("not empty"),
                    }));
                }
                if r.modified.is_empty() {
                    conn.push(&status(Some(tag), StatusKind::Ok, None, "STORE completed"));
                } else {
                    let ids: Vec<NonZeroU32> = if uid {
                        r.modified.iter().map(|&u| nz(u)).collect()
                    } else {
                        sel.messages
                            .iter()
                            .enumerate()
                            .filter(|(_, m)| r.modified.contains(&m.uid))
                            .map(|(i, _)| nz(i as u32 + 1))
                            .collect()
                    };
                    let set = SequenceSet::try_from(ids).ok();
                    conn.push(&status(
                        Some(tag),
                        StatusKind::Ok,
                        set.map(Code::Modified),
                        "Conditional STORE failed for some messages",
                    ));
                }
            }
            CommandBody::Copy {
                sequence_set, uid, ..
            }
            | CommandBody::Move {
                sequence_set, uid, ..
            } => {
                if is_move && sel.read_only {
                    conn.push(&read_only(tag));
                    return Ok(());
                }
                let Ok(indexes) = sel.resolve(&sequence_set, uid) else {
                    conn.push(&invalid_set(tag));
                    return Ok(());
                };
                let uids: Vec<u32> = indexes.iter().map(|&i| sel.messages[i].uid).collect();
                let name = if is_move { "MOVE" } else { "COPY" };
                if uids.is_empty() {
                    conn.push(&status(
                        Some(tag),
                        StatusKind::Ok,
                        None,
                        &format!("{name} completed"),
                    ));
                    return Ok(());
                }
                let r = copy_batched(&gw, sel, &uids, &target, is_move).await;
                let r = match r {
                    Ok(r) => r,
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        conn.push(&status(
                            Some(tag),
                            StatusKind::No,
                            Some(Code::TryCreate),
                            "No such mailbox",
                        ));
                        return Ok(());
                    }
                    Err(e) => {
                        conn.push(&storage_failure(tag, &e));
                        return Ok(());
                    }
                };
                let copyuid = match (
                    NonZeroU32::new(r.uid_validity),
                    uid_set(&r.source_uids),
                    uid_set(&r.destination_uids),
                ) {
                    (Some(uid_validity), Some(source), Some(destination)) => Some(Code::CopyUid {
                        uid_validity,
                        source,
                        destination,
                    }),
                    _ => None,
                };
                // A copy into the selected mailbox itself shows up as EXISTS next.
                if let Some(w) = &self.watcher {
                    w.changes.mark(Some(&target));
                }
                if is_move {
                    // RFC 6851: COPYUID in an untagged OK, then the EXPUNGEs.
                    conn.push(&status(None, StatusKind::Ok, copyuid, "Moved"));
                    let moved: HashSet<u32> = r.source_uids.into_iter().collect();
                    sel.remove(conn, &moved, qresync);
                    conn.push(&status(Some(tag), StatusKind::Ok, None, "MOVE completed"));
                } else {
                    conn.push(&status(
                        Some(tag),
                        StatusKind::Ok,
                        copyuid,
                        "COPY completed",
                    ));
                }
            }
            _ => conn.push(&status(
                Some(tag),
                StatusKind::Bad,
                None,
                "Command not supported",
            )),
        }
        Ok(())
    }

    async fn fetch<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        tag: &Tag<'_>,
        set: &SequenceSet,
        uid: bool,
        items: &[MessageDataItemName<'static>],
        changed_since: Option<u64>,
    ) -> io::Result<()> {
        let gw = self.gw.clone();
        let condstore = self.condstore;
        let sel = self.selected.as_mut().expect("selected");
        let Ok(indexes) = sel.resolve(set, uid) else {
            conn.push(&invalid_set(tag));
            return Ok(());
        };
        // The same item named twice is answered once (FETCH 1 (BODY[] BODY[] …) asked
        // for 4,000 copies of a message in one reply).
        let mut seen_items = std::collections::HashSet::with_capacity(items.len());
        let items: Vec<&MessageDataItemName<'static>> = items
            .iter()
            .filter(|&item| seen_items.insert(item))
            .collect();
        let budget = gw.imap.max_fetch_response_bytes;
        let content = items.iter().copied().any(needs_body);
        let mark_seen = !sel.read_only && items.iter().copied().any(sets_seen);
        let mut missing = false;
        let mut to_mark = Vec::new();
        // A message that cannot be sent ends the reply; \Seen is still set on the
        // ones that were.
        let mut refused = None;
        for i in indexes {
            let m = sel.messages[i].clone();
            if changed_since.is_some_and(|c| m.modseq <= c) {
                continue;
            }
            // The stored bytes, one item made of them and its encoding, until the
            // reply is on the wire.
            let _memory = match content {
                true => Some(hold_memory(&gw, m.size.saturating_mul(3)).await),
                false => None,
            };
            let raw = if content {
                match fetch_message(&gw, sel, m.uid).await {
                    Ok(raw) => Some(raw),
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        missing = true;
                        continue;
                    }
                    Err(e) => {
                        conn.push(&storage_failure(tag, &e));
                        return Ok(());
                    }
                }
            } else {
                None
            };
            let parsed = raw
                .as_deref()
                .map(|r| Parsed::new(r, gw.imap.mime_limits()));
            // Each BINARY section is decoded once, however many items (partials,
            // BINARY.SIZE) name it: they asked for one decode per item before.
            let mut binaries = HashMap::new();
            let mut unknown_cte = false;
            if let Some(p) = parsed.as_ref() {
                for &item in &items {
                    if let MessageDataItemName::Binary { section, .. }
                    | MessageDataItemName::BinarySize { section } = item
                        && !binaries.contains_key(section.as_slice())
                    {
                        match p.binary(section) {
                            Ok(bytes) => {
                                binaries.insert(section.as_slice(), bytes);
                            }
                            Err(_) => {
                                unknown_cte = true;
                                break;
                            }
                        }
                    }
                }
            }
            // What this message's reply carries, counted before anything is made:
            // over the budget, or BINARY of an unknown transfer encoding, and nothing
            // of it is sent.
            let size = items.iter().fold(0usize, |size, &item| {
                size.saturating_add(item_bytes(
                    item,
                    raw.as_deref().map(Vec::as_slice),
                    parsed.as_ref(),
                    &binaries,
                ))
            });
            if size > budget {
                crate::metrics::event(super::PROTOCOL, "fetch_over_limit");
                refused = Some(status(
                    Some(tag),
                    StatusKind::No,
                    Some(code("LIMIT")),
                    "FETCH reply too large; ask for fewer or smaller items",
                ));
                break;
            }
            if unknown_cte {
                refused = Some(status(
                    Some(tag),
                    StatusKind::No,
                    Some(Code::UnknownCte),
                    "Unknown Content-Transfer-Encoding",
                ));
                break;
            }
            let mut seen_now = false;
            if mark_seen && !m.flags.iter().any(|f| f == "\\Seen") {
                to_mark.push(m.uid);
                seen_now = true;
            }
            // One item at a time on the wire: memory holds the message and one copy
            // of one item, whatever was asked for.
            let seq = nz(i as u32 + 1);
            conn.begin_fetch(seq);
            for &item in &items {
                // Stored bytes go out as stored: literals holding NUL (not allowed in
                // an IMAP literal, so never altered either) are written verbatim.
                let mut verbatim: Vec<&[u8]> = Vec::new();
                let built = fetch_item(
                    item,
                    &m,
                    seen_now,
                    raw.as_deref().map(Vec::as_slice),
                    parsed.as_ref(),
                    &binaries,
                    &mut verbatim,
                );
                let origin = match item {
                    MessageDataItemName::Binary {
                        partial: Some((start, _)),
                        ..
                    } => Some(*start),
                    _ => None,
                };
                conn.fetch_item(seq, built, &verbatim, origin).await?;
            }
            if seen_now
                && !items
                    .iter()
                    .any(|i| matches!(i, MessageDataItemName::Flags))
            {
                // The implicit \Seen is reported even when FLAGS was not asked for.
                let mut flags = fetch_flags(&m);
                flags.push(FlagFetch::Flag(Flag::Seen));
                conn.fetch_item(seq, MessageDataItem::Flags(flags), &[], None)
                    .await?;
            }
            if condstore
                && !items
                    .iter()
                    .any(|i| matches!(i, MessageDataItemName::ModSeq))
                && changed_since.is_some()
            {
                let modseq = NonZeroU64::new(m.modseq).unwrap_or(NonZeroU64::MIN);
                conn.fetch_item(seq, MessageDataItem::ModSeq(modseq), &[], None)
                    .await?;
            }
            conn.end_fetch().await?;
        }
        if !to_mark.is_empty() {
            let r = store_batched(
                &gw,
                sel,
                &to_mark,
                v1::store_flags_request::Action::Add,
                vec!["\\Seen".into()],
                None,
            )
            .await;
            match r {
                Ok(r) => {
                    for c in r.changed {
                        if let Some(m) = sel.messages.iter_mut().find(|m| m.uid == c.uid) {
                            m.flags = c.flags;
                            m.modseq = c.modseq;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "setting \\Seen after FETCH"),
            }
        }
        if let Some(refused) = refused {
            conn.push(&refused);
        } else if missing {
            conn.push(&status(
                Some(tag),
                StatusKind::No,
                Some(code("EXPUNGEISSUED")),
                "Some messages were expunged",
            ));
        } else {
            conn.push(&status(Some(tag), StatusKind::Ok, None, "FETCH completed"));
        }
        Ok(())
    }
}

/// The ESEARCH reply (RFC 4731 §3.1): MIN, MAX, COUNT, ALL as `options` ask (ALL when
/// none is named), for `hits` in ascending order. With `modseqs` (the hits' MODSEQs,
/// when the search used them), MODSEQ is that of the messages returned: of MIN
/// and/or MAX when only those are asked for, else the highest of all (RFC 7162
/// §3.1.5).
fn esearch(
    tag: &Tag<'_>,
    uid: bool,
    options: &[String],
    hits: &[NonZeroU32],
    modseqs: Option<&[u64]>,
) -> Vec<u8> {
    use std::fmt::Write;
    let all = options.is_empty() || options.iter().any(|o| o == "ALL");
    let mut line = format!("* ESEARCH (TAG \"{}\")", tag.as_ref());
    if uid {
        line.push_str(" UID");
    }
    let wants = |o: &str| options.iter().any(|x| x == o);
    if let (true, Some(min)) = (wants("MIN"), hits.first()) {
        let _ = write!(line, " MIN {min}");
    }
    if let (true, Some(max)) = (wants("MAX"), hits.last()) {
        let _ = write!(line, " MAX {max}");
    }
    if wants("COUNT") {
        let _ = write!(line, " COUNT {}", hits.len());
    }
    if all {
        let numbers: Vec<u32> = hits.iter().map(|h| h.get()).collect();
        if let Some(set) = set_string(&numbers) {
            let _ = write!(line, " ALL {set}");
        }
    }
    let only_ends = !options.is_empty() && options.iter().all(|o| o == "MIN" || o == "MAX");
    let modseq = modseqs.and_then(|all| {
        let returned: Vec<u64> = if only_ends {
            let mut ends = Vec::new();
            if wants("MIN") {
                ends.extend(all.first());
            }
            if wants("MAX") {
                ends.extend(all.last());
            }
            ends
        } else {
            all.to_vec()
        };
        returned.into_iter().max().and_then(NonZeroU64::new)
    });
    if let Some(m) = modseq {
        let _ = write!(line, " MODSEQ {m}");
    }
    line.push_str("\r\n");
    line.into_bytes()
}

fn search_uses_modseq(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::ModSequence { .. } => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(search_uses_modseq),
        SearchKey::Not(k) => search_uses_modseq(k),
        SearchKey::Or(a, b) => search_uses_modseq(a) || search_uses_modseq(b),
        _ => false,
    }
}

/// The whole stored message: from the pod's message cache, else from storage (and
/// kept there).
async fn fetch_message(
    gw: &Gateway,
    sel: &Selected,
    uid: u32,
) -> Result<std::sync::Arc<Vec<u8>>, tonic::Status> {
    if let Some(message) = gw.messages.get(&sel.user, &sel.name, sel.uid_validity, uid) {
        return Ok(message);
    }
    let message = std::sync::Arc::new(gw.store.fetch(&sel.user, &sel.name, uid).await?);
    gw.messages
        .put(&sel.user, &sel.name, sel.uid_validity, uid, &message);
    Ok(message)
}

/// Holds `bytes` of `imap.max_fetch_memory` while a message is in memory; waits
/// while other sessions hold it all. A session holds one at a time, so no session
/// waits on itself.
async fn hold_memory(gw: &Gateway, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
    let kib = u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, gw.fetch_memory_kib);
    match gw.fetch_memory.clone().try_acquire_many_owned(kib) {
        Ok(permit) => permit,
        Err(_) => {
            crate::metrics::event(super::PROTOCOL, "fetch_memory_wait");
            gw.fetch_memory
                .clone()
                .acquire_many_owned(kib)
                .await
                .expect("the semaphore is never closed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(uids: impl IntoIterator<Item = u32>) -> Selected {
        Selected {
            name: "INBOX".into(),
            user: v1::UserRef::default(),
            read_only: false,
            uid_validity: 1,
            messages: uids
                .into_iter()
                .map(|uid| Msg {
                    uid,
                    flags: vec![],
                    size: 1,
                    internal_date_ms: 0,
                    modseq: 1,
                    recent: false,
                })
                .collect(),
            gone: HashSet::new(),
            keywords: vec![],
            uid_next: 1,
            highest_modseq: 1,
            listed_modseq: 1,
            modseq_told: false,
            shows_recent: true,
            claims_recent: false,
            first_recent_uid: 1,
        }
    }

    #[test]
    fn scattered_uids_that_are_neighbours_in_the_view_share_a_range() {
        let v = view((1..=1500).map(|i| i * 2));
        let all: Vec<u32> = (1..=1500).map(|i| i * 2).collect();
        let b = v.batches(&all);
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0],
            [v1::UidRange {
                first: 2,
                last: 3000
            }]
        );
        // Every other message of the view: 750 ranges, one request.
        let half: Vec<u32> = (0..750).map(|i| 2 + i * 4).collect();
        let b = v.batches(&half);
        assert_eq!((b.len(), b[0].len()), (1, 750));
        // Over the range and message limits: split.
        let big = view(1..=24_000);
        let odd: Vec<u32> = (0..12_000).map(|i| 1 + i * 2).collect();
        let b = big.batches(&odd);
        assert!(b.iter().all(|r| r.len() <= 1000), "{}", b.len());
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 12_000);
        let everything: Vec<u32> = (1..=24_000).collect();
        let b = big.batches(&everything);
        assert_eq!(b.len(), 5, "5000 messages per request at most");
    }

    #[test]
    fn vanished_gaps_are_ranges_between_existing_uids() {
        assert_eq!(gaps(&[2, 3, 7], &[(1, 10)]), [(1, 1), (4, 6), (8, 10)]);
        assert_eq!(gaps(&[2, 3, 7], &[(3, 3), (5, 6)]), [(5, 6)]);
        assert_eq!(gaps(&[], &[(1, 4_000_000_000)]), [(1, 4_000_000_000)]);
    }

    #[test]
    fn star_is_the_highest_existing_uid_so_n_star_includes_it() {
        let v = view([3, 8]);
        let set = SequenceSet::try_from("20:*").unwrap();
        assert!(v.contains_uid(&set, 8));
        assert!(!v.contains_uid(&set, 3));
        assert_eq!(
            view([]).resolve(&SequenceSet::try_from("1:*").unwrap(), false),
            Ok(vec![])
        );
        assert_eq!(
            v.resolve(&SequenceSet::try_from("3").unwrap(), false),
            Err(())
        );
    }
}
