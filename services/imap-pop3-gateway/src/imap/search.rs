//! SEARCH keys (RFC 3501 §6.4.4) evaluated against one message: metadata from the
//! session's view, the content only when a key needs it.

use chrono::{DateTime, NaiveDate, Utc};
use imap_codec::imap_types::search::SearchKey;

use super::message::{self, Parsed};
use super::selected::{Msg, Selected};

/// Whether any key reads the message content (headers or body).
pub fn needs_content(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_content),
        SearchKey::Not(k) => needs_content(k),
        SearchKey::Or(a, b) => needs_content(a) || needs_content(b),
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(..)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        _ => false,
    }
}

/// What one message is matched against.
pub struct Candidate<'a, 'm> {
    pub seq: u32,
    pub msg: &'a Msg,
    pub view: &'a Selected,
    pub content: Option<&'a Parsed<'m>>,
    /// Decoded header fields and body text, computed once per message on demand.
    pub headers: &'a std::cell::OnceCell<Vec<(String, String)>>,
    pub body: &'a std::cell::OnceCell<String>,
}

fn contains(haystack: &str, needle: &[u8]) -> bool {
    let needle = String::from_utf8_lossy(needle).to_lowercase();
    needle.is_empty() || haystack.to_lowercase().contains(&needle)
}

impl Candidate<'_, '_> {
    fn has(&self, flag: &str) -> bool {
        self.msg.flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
    }

    fn internal_date(&self) -> NaiveDate {
        DateTime::<Utc>::from_timestamp_millis(self.msg.internal_date_ms)
            .unwrap_or_default()
            .date_naive()
    }

    fn headers(&self) -> &[(String, String)] {
        self.headers.get_or_init(|| match self.content {
            Some(p) => message::header_text(p),
            None => Vec::new(),
        })
    }

    fn header(&self, name: &str, needle: &[u8]) -> bool {
        let name = name.to_ascii_lowercase();
        let mut fields = self.headers().iter().filter(|(n, _)| *n == name).peekable();
        if fields.peek().is_none() {
            return false;
        }
        fields.any(|(_, v)| contains(v, needle))
    }

    fn body(&self) -> &str {
        self.body.get_or_init(|| match self.content {
            Some(p) => message::body_text(p),
            None => String::new(),
        })
    }

    pub fn matches(&self, key: &SearchKey<'_>) -> bool {
        let sent = || self.content.and_then(message::sent_date);
        match key {
            SearchKey::And(keys) => keys.as_ref().iter().all(|k| self.matches(k)),
            SearchKey::Not(k) => !self.matches(k),
            SearchKey::Or(a, b) => self.matches(a) || self.matches(b),
            SearchKey::All => true,
            SearchKey::SequenceSet(set) => self.view.contains_seq(set, self.seq),
            SearchKey::Uid(set) => self.view.contains_uid(set, self.msg.uid),
            SearchKey::Answered => self.has("\\Answered"),
            SearchKey::Unanswered => !self.has("\\Answered"),
            SearchKey::Deleted => self.has("\\Deleted"),
            SearchKey::Undeleted => !self.has("\\Deleted"),
            SearchKey::Draft => self.has("\\Draft"),
            SearchKey::Undraft => !self.has("\\Draft"),
            SearchKey::Flagged => self.has("\\Flagged"),
            SearchKey::Unflagged => !self.has("\\Flagged"),
            SearchKey::Seen => self.has("\\Seen"),
            SearchKey::Unseen => !self.has("\\Seen"),
            // Recent to this session (never in IMAP4rev2, which has no \Recent).
            SearchKey::Recent => self.msg.recent,
            SearchKey::New => self.msg.recent && !self.has("\\Seen"),
            SearchKey::Old => !self.msg.recent,
            SearchKey::Keyword(k) => self.has(k.as_ref()),
            SearchKey::Unkeyword(k) => !self.has(k.as_ref()),
            SearchKey::Larger(n) => self.msg.size > u64::from(*n),
            SearchKey::Smaller(n) => self.msg.size < u64::from(*n),
            SearchKey::Before(d) => self.internal_date() < *d.as_ref(),
            SearchKey::On(d) => self.internal_date() == *d.as_ref(),
            SearchKey::Since(d) => self.internal_date() >= *d.as_ref(),
            SearchKey::SentBefore(d) => sent().is_some_and(|s| s < *d.as_ref()),
            SearchKey::SentOn(d) => sent().is_some_and(|s| s == *d.as_ref()),
            SearchKey::SentSince(d) => sent().is_some_and(|s| s >= *d.as_ref()),
            SearchKey::From(s) => self.header("from", s.as_ref()),
            SearchKey::To(s) => self.header("to", s.as_ref()),
            SearchKey::Cc(s) => self.header("cc", s.as_ref()),
            SearchKey::Bcc(s) => self.header("bcc", s.as_ref()),
            SearchKey::Subject(s) => self.header("subject", s.as_ref()),
            SearchKey::Header(name, s) => {
                self.header(&String::from_utf8_lossy(name.as_ref()), s.as_ref())
            }
            SearchKey::Body(s) => contains(self.body(), s.as_ref()),
            SearchKey::Text(s) => {
                contains(self.body(), s.as_ref())
                    || self.headers().iter().any(|(_, v)| contains(v, s.as_ref()))
            }
            SearchKey::ModSequence { modseq, .. } => self.msg.modseq >= *modseq,
        }
    }
}
