//! What IMAP FETCH reads out of a message: ENVELOPE, BODYSTRUCTURE and body sections
//! (RFC 3501 §6.4.5, §7.4.2), from the MIME structure `mail-parser` finds.
//!
//! Sections are byte ranges of the stored message, never re-encoded: a client that
//! asks for `BODY[1.2.MIME]` gets exactly the bytes of that part's header.
//!
//! Hostile structure is bounded before it reaches a parser or a recursion: a message
//! with more MIME containers or boundary lines than `max_parts` is not parsed at all
//! (it is described as one opaque part), parts deeper than `max_depth` are opaque
//! leaves, and the parsed tree is taken apart without recursion.

use std::borrow::Cow;
use std::ops::Range;

use imap_codec::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
    SinglePartExtensionData, SpecificFields,
};
use imap_codec::imap_types::core::{IString, NString, Vec1};
use imap_codec::imap_types::envelope::{Address, Envelope};
use imap_codec::imap_types::fetch::{Part, Section};
use mail_parser::{
    HeaderName, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType,
};

/// How much MIME structure a message may have before it is treated as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MimeLimits {
    /// Nesting below which parts are opaque leaves (BODYSTRUCTURE, sections).
    pub max_depth: usize,
    /// Containers (multipart, message parts) and boundary lines; a message with
    /// more is not parsed (its parser state would be larger than the message).
    pub max_parts: usize,
}

impl Default for MimeLimits {
    fn default() -> Self {
        Self {
            max_depth: 100,
            max_parts: 10_000,
        }
    }
}

/// A stored message, MIME-parsed on first need (BODY[] and the header/text
/// sections of the top level are byte ranges and need no parse).
pub struct Parsed<'a> {
    raw: &'a [u8],
    limits: MimeLimits,
    parsed: std::cell::OnceCell<Option<Message<'a>>>,
}

impl Drop for Parsed<'_> {
    fn drop(&mut self) {
        if let Some(Some(message)) = self.parsed.take() {
            drop_flat(message);
        }
    }
}

/// Drops a message whose message/rfc822 parts nest others, one level at a time: the
/// derived drop would recurse once per level.
fn drop_flat(message: Message<'_>) {
    let mut pending = vec![message];
    while let Some(mut m) = pending.pop() {
        for part in &mut m.parts {
            if let PartType::Message(inner) = &mut part.body {
                pending.push(std::mem::take(inner));
            }
        }
    }
}

/// Whether `raw` has more MIME structure than `max_parts` allows: counted as
/// `multipart/` and `message/` media types plus lines starting with `--` (every
/// boundary line does), an upper bound that needs no parse.
fn too_structured(raw: &[u8], max_parts: usize) -> bool {
    let mut count = 0usize;
    let mut at_line_start = true;
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if at_line_start && raw[i..].starts_with(b"--") {
            count += 1;
        }
        if b == b'/' {
            // The type may be folded or spaced from its slash (`message /rfc822`).
            let before = raw[..i].trim_ascii_end();
            let ends = |word: &[u8]| {
                before.len() >= word.len()
                    && before[before.len() - word.len()..].eq_ignore_ascii_case(word)
            };
            if ends(b"multipart") || ends(b"message") {
                count += 1;
            }
        }
        if count > max_parts {
            return true;
        }
        at_line_start = b == b'\n';
        i += 1;
    }
    false
}

/// Where a part lies in the stored message.
struct Located<'m, 'a> {
    /// The part's own MIME header.
    mime: Range<usize>,
    /// The part's body (for message/rfc822, the whole nested message).
    body: Range<usize>,
    /// Where the next part number is looked up: the nested message (message/rfc822
    /// parts stored unencoded) or the multipart itself.
    nested: Option<(&'m Message<'a>, usize)>,
    /// A message/rfc822 part (or the top level): HEADER and TEXT apply to it.
    is_message: bool,
    /// The part's Content-Transfer-Encoding, lower-case (`None`: 7bit).
    encoding: Option<String>,
    /// A multipart or message part (BINARY gives those as they are).
    container: bool,
}

/// A part whose Content-Transfer-Encoding is not one BINARY can undo.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownCte;

impl<'a> Parsed<'a> {
    pub fn new(raw: &'a [u8], limits: MimeLimits) -> Self {
        Self {
            raw,
            limits,
            parsed: std::cell::OnceCell::new(),
        }
    }

    /// The MIME structure; `None` when the message has none worth parsing (no
    /// header) or more than the limits allow.
    fn message(&self) -> Option<&Message<'a>> {
        self.parsed
            .get_or_init(|| {
                if too_structured(self.raw, self.limits.max_parts) {
                    crate::metrics::event("imap", "mime_opaque");
                    return None;
                }
                MessageParser::default().parse(self.raw)
            })
            .as_ref()
    }

    /// The header section of the top-level message, blank line included.
    pub fn header(&self) -> &'a [u8] {
        &self.raw[..header_end(self.raw, 0..self.raw.len())]
    }

    /// The body of the top-level message.
    pub fn text(&self) -> &'a [u8] {
        &self.raw[header_end(self.raw, 0..self.raw.len())..]
    }

    pub fn envelope(&self) -> Envelope<'static> {
        match self.message().and_then(|m| m.parts.first()) {
            Some(part) => envelope_of(part, Some(self.raw)),
            None => envelope(None),
        }
    }

    pub fn body_structure(&self, extensions: bool) -> BodyStructure<'static> {
        match self.message() {
            Some(m) => structure(
                &Walk {
                    ext: extensions,
                    max_depth: self.limits.max_depth,
                    seen: Default::default(),
                },
                self.raw,
                m,
                0,
                0,
            ),
            None => fallback_structure(self.raw.len(), self.raw),
        }
    }

    /// The bytes `section` names; an empty slice for a part that does not exist
    /// (RFC 3501 lets the server answer an empty string).
    pub fn section(&self, section: Option<&Section<'_>>) -> Cow<'a, [u8]> {
        let raw = self.raw;
        let Some(section) = section else {
            return Cow::Borrowed(raw);
        };
        // The top level needs no parse; a part's HEADER and TEXT apply only to the
        // message/rfc822 it holds (empty for anything else).
        let part = |p: &Option<Part>| -> Option<Range<usize>> {
            match p {
                None => Some(0..raw.len()),
                Some(p) => self
                    .locate(p.0.as_ref())
                    .filter(|l| l.is_message)
                    .map(|l| l.body),
            }
        };
        let bytes: Option<Cow<'a, [u8]>> = match section {
            Section::Part(p) => self
                .locate(p.0.as_ref())
                .map(|l| Cow::Borrowed(&raw[l.body])),
            Section::Mime(p) => self
                .locate(p.0.as_ref())
                .map(|l| Cow::Borrowed(&raw[l.mime])),
            Section::Header(p) => part(p).map(|r| {
                let end = header_end(raw, r.clone());
                Cow::Borrowed(&raw[r.start..end])
            }),
            Section::Text(p) => part(p).map(|r| {
                let end = header_end(raw, r.clone());
                Cow::Borrowed(&raw[end..r.end])
            }),
            Section::HeaderFields(p, names) | Section::HeaderFieldsNot(p, names) => {
                let keep = matches!(section, Section::HeaderFields(..));
                part(p).map(|r| {
                    let end = header_end(raw, r.clone());
                    let names: Vec<&[u8]> = names.as_ref().iter().map(|n| n.as_ref()).collect();
                    Cow::Owned(header_fields(&raw[r.start..end], &names, keep))
                })
            }
        };
        bytes.unwrap_or(Cow::Borrowed(&[]))
    }

    /// How many bytes `section` holds (what FETCH would send, before any partial).
    pub fn section_len(&self, section: Option<&Section<'_>>) -> usize {
        self.section(section).len()
    }

    /// BINARY[path] (RFC 3516): the part with its Content-Transfer-Encoding undone;
    /// the whole message for an empty path; empty for a part that does not exist.
    pub fn binary(&self, path: &[std::num::NonZeroU32]) -> Result<Cow<'a, [u8]>, UnknownCte> {
        if path.is_empty() {
            return Ok(Cow::Borrowed(self.raw));
        }
        let Some(l) = self.locate(path) else {
            return Ok(Cow::Borrowed(&[]));
        };
        let body = &self.raw[l.body];
        if l.container {
            return Ok(Cow::Borrowed(body));
        }
        match l.encoding.as_deref() {
            None | Some("7bit" | "8bit" | "binary") => Ok(Cow::Borrowed(body)),
            Some("base64") => {
                use base64::Engine;
                let clean: Vec<u8> = body
                    .iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                base64::engine::general_purpose::STANDARD
                    .decode(clean.trim_ascii_end())
                    .or_else(|_| {
                        base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(clean.trim_ascii_end().trim_ascii_end())
                    })
                    .map(Cow::Owned)
                    .map_err(|_| UnknownCte)
            }
            Some("quoted-printable") => Ok(Cow::Owned(quoted_printable(body))),
            Some(_) => Err(UnknownCte),
        }
    }

    /// Follows a part number path (`1.2.3`) from the top-level message.
    fn locate(&self, path: &[std::num::NonZeroU32]) -> Option<Located<'_, 'a>> {
        // Below the depth limit parts are opaque: they have no numbers of their own.
        if path.len() > self.limits.max_depth {
            return None;
        }
        let mut message = self.message()?;
        let mut root = 0usize;
        let mut located = None;
        for (depth, n) in path.iter().enumerate() {
            if depth > 0 {
                // Descending below a part: only a message/rfc822 part has children here
                // (a multipart's children are indexed from the multipart itself).
                let l: &Located = located.as_ref()?;
                let (nested, nested_root) = l.nested?;
                message = nested;
                root = nested_root;
            }
            let n = n.get() as usize;
            let top = message.parts.get(root)?;
            let index = match &top.body {
                PartType::Multipart(children) => *children.get(n - 1)? as usize,
                // A single-part message has exactly one part, its body.
                _ if n == 1 => root,
                _ => return None,
            };
            let part = message.parts.get(index)?;
            let mut l = Located {
                mime: part.offset_header as usize..part.offset_body as usize,
                body: part.offset_body as usize..part.offset_end as usize,
                nested: None,
                is_message: false,
                encoding: part
                    .content_transfer_encoding()
                    .map(|e| e.trim().to_ascii_lowercase()),
                container: matches!(part.body, PartType::Multipart(_) | PartType::Message(_)),
            };
            if index == root && !matches!(top.body, PartType::Multipart(_)) {
                // The body of a single-part message: its MIME header is the message's.
                l.mime = top.offset_header as usize..top.offset_body as usize;
            }
            if let PartType::Message(inner) = &part.body
                && same_bytes(inner, self.raw)
            {
                l.nested = Some((inner, 0));
                l.is_message = true;
            }
            // Multipart children are walked on the next step from this index.
            if let PartType::Multipart(_) = part.body {
                l.nested = Some((message, index));
            }
            located = Some(l);
        }
        let mut l = located?;
        if l.body.end > self.raw.len() || l.body.start > l.body.end {
            return None;
        }
        l.mime.end = l.mime.end.min(self.raw.len());
        l.mime.start = l.mime.start.min(l.mime.end);
        Some(l)
    }
}

/// Undoes quoted-printable (RFC 2045 §6.7), line by line: whitespace at the end of
/// an encoded line was added in transport and goes (rule 3); a line that then ends
/// in `=` is a soft line break (rule 5, `=` before transport padding included);
/// `=XX` escapes are decoded; a malformed `=` stays as it is.
fn quoted_printable(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    for line in input.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let ending = &line[text.len()..];
        let mut text = text;
        while let [rest @ .., b' ' | b'\t'] = text {
            text = rest;
        }
        let (text, soft) = match text.strip_suffix(b"=") {
            Some(text) => (text, true),
            None => (text, false),
        };
        let mut i = 0;
        while i < text.len() {
            if text[i] == b'='
                && let (Some(h), Some(l)) = (
                    text.get(i + 1).and_then(|&c| hex(c)),
                    text.get(i + 2).and_then(|&c| hex(c)),
                )
            {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            out.push(text[i]);
            i += 1;
        }
        if !soft {
            out.extend_from_slice(ending);
        }
    }
    out
}

/// mail-parser parses an unencoded message/rfc822 part in place (offsets into the
/// same bytes); an encoded one is decoded into bytes of its own.
fn same_bytes(inner: &Message<'_>, raw: &[u8]) -> bool {
    inner.raw_message.len() == raw.len() && inner.raw_message.as_ref() == raw
}

/// The end of the header section (after the blank line) of the message in `range`.
fn header_end(raw: &[u8], range: Range<usize>) -> usize {
    let bytes = &raw[range.clone()];
    if bytes.starts_with(b"\r\n") {
        return range.start + 2;
    }
    if bytes.starts_with(b"\n") {
        return range.start + 1;
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            if bytes[i + 1..].starts_with(b"\r\n") {
                return range.start + i + 3;
            }
            if bytes[i + 1..].starts_with(b"\n") {
                return range.start + i + 2;
            }
        }
        i += 1;
    }
    range.end
}

/// The header fields named in `names` (or all but those), each with its folded
/// lines, followed by the blank line (RFC 3501 HEADER.FIELDS).
fn header_fields(header: &[u8], names: &[&[u8]], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut fields: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    for (i, &b) in header.iter().enumerate() {
        let next_continues = matches!(header.get(i + 1), Some(b' ' | b'\t'));
        if b == b'\n' && !next_continues {
            fields.push(&header[start..=i]);
            start = i + 1;
        }
    }
    for field in fields {
        if field == b"\r\n" || field == b"\n" {
            continue;
        }
        let name = field.split(|&b| b == b':').next().unwrap_or_default();
        let name = name.trim_ascii();
        let listed = names.iter().any(|n| n.eq_ignore_ascii_case(name));
        if listed == keep {
            out.extend_from_slice(field);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn nstring(value: Option<&str>) -> NString<'static> {
    match value {
        Some(v) => NString(Some(istring(v))),
        None => NString(None),
    }
}

/// A string as IMAP can carry it: quoted when it can be, else a literal; bytes a
/// literal cannot hold (NUL) are dropped.
pub fn istring(value: &str) -> IString<'static> {
    istring_bytes(value.as_bytes())
}

pub fn istring_bytes(value: &[u8]) -> IString<'static> {
    match IString::try_from(value.to_vec()) {
        Ok(s) => s,
        Err(_) => {
            let clean: Vec<u8> = value.iter().copied().filter(|&b| b != 0).collect();
            IString::try_from(clean).unwrap_or_else(|_| IString::try_from("").unwrap())
        }
    }
}

/// The unfolded raw value of the first `name` field of `part`.
fn raw_value<'p>(part: &'p MessagePart<'_>, name: HeaderName<'_>, raw: &'p [u8]) -> Option<String> {
    let h = part.headers.iter().find(|h| h.name == name)?;
    let bytes = raw.get(h.offset_start as usize..h.offset_end as usize)?;
    let text = String::from_utf8_lossy(bytes);
    let unfolded: String = text.replace("\r\n", "").replace('\n', "");
    Some(unfolded.trim().to_owned())
}

fn envelope(part: Option<&MessagePart<'_>>) -> Envelope<'static> {
    if let Some(part) = part {
        return envelope_of(part, None);
    }
    Envelope {
        date: NString(None),
        subject: NString(None),
        from: vec![],
        sender: vec![],
        reply_to: vec![],
        to: vec![],
        cc: vec![],
        bcc: vec![],
        in_reply_to: NString(None),
        message_id: NString(None),
    }
}

/// ENVELOPE of a message whose top part is `part`; `raw` holds the bytes the header
/// offsets point into (the top-level message when `None` is not known).
fn envelope_of(part: &MessagePart<'_>, raw: Option<&[u8]>) -> Envelope<'static> {
    let text = |name: HeaderName<'_>| -> NString<'static> {
        let v = match raw {
            Some(raw) => raw_value(part, name.clone(), raw),
            None => None,
        }
        .or_else(|| {
            match part
                .headers
                .iter()
                .find(|h| h.name == name)
                .map(|h| &h.value)
            {
                Some(HeaderValue::Text(t)) => Some(t.to_string()),
                Some(HeaderValue::TextList(l)) => Some(l.join(" ")),
                Some(HeaderValue::DateTime(d)) => Some(d.to_rfc822()),
                _ => None,
            }
        });
        nstring(v.as_deref())
    };
    let ids = |name: HeaderName<'_>| -> NString<'static> {
        match part
            .headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| &h.value)
        {
            Some(HeaderValue::Text(t)) => nstring(Some(&format!("<{t}>"))),
            Some(HeaderValue::TextList(l)) => nstring(Some(
                &l.iter()
                    .map(|t| format!("<{t}>"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )),
            _ => NString(None),
        }
    };
    let addresses = |name: HeaderName<'_>| -> Vec<Address<'static>> {
        match part
            .headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| &h.value)
        {
            Some(HeaderValue::Address(a)) => address_list(a),
            _ => vec![],
        }
    };
    let from = addresses(HeaderName::From);
    let sender = match addresses(HeaderName::Sender) {
        s if s.is_empty() => from.clone(),
        s => s,
    };
    let reply_to = match addresses(HeaderName::ReplyTo) {
        r if r.is_empty() => from.clone(),
        r => r,
    };
    Envelope {
        date: text(HeaderName::Date),
        subject: text(HeaderName::Subject),
        from,
        sender,
        reply_to,
        to: addresses(HeaderName::To),
        cc: addresses(HeaderName::Cc),
        bcc: addresses(HeaderName::Bcc),
        in_reply_to: ids(HeaderName::InReplyTo),
        message_id: ids(HeaderName::MessageId),
    }
}

fn address_list(a: &mail_parser::Address<'_>) -> Vec<Address<'static>> {
    let one = |addr: &mail_parser::Addr<'_>| {
        let (mailbox, host) = match addr.address.as_deref() {
            Some(a) => match a.rsplit_once('@') {
                Some((m, h)) => (Some(m.to_owned()), Some(h.to_owned())),
                None => (Some(a.to_owned()), None),
            },
            None => (None, None),
        };
        // An obsolete source route (`<@a,@b:user@host>`, RFC 5322 §4.4) is the
        // address's `adl` (RFC 3501 §7.4.2).
        let (adl, mailbox) = match mailbox
            .as_deref()
            .map(|m| (m.starts_with('@'), m.split_once(':')))
        {
            Some((true, Some((route, local)))) => (Some(route.to_owned()), Some(local.to_owned())),
            _ => (None, mailbox),
        };
        Address {
            name: nstring(addr.name.as_deref().map(encode_word).as_deref()),
            adl: nstring(adl.as_deref()),
            mailbox: nstring(mailbox.as_deref()),
            // RFC 3501: NIL host with a non-NIL mailbox marks a group; an address
            // without a domain gets an empty host instead.
            host: nstring(Some(host.as_deref().unwrap_or(""))),
        }
    };
    match a {
        mail_parser::Address::List(list) => list.iter().map(one).collect(),
        mail_parser::Address::Group(groups) => {
            let mut out = Vec::new();
            for g in groups {
                match &g.name {
                    Some(name) => {
                        out.push(Address {
                            name: NString(None),
                            adl: NString(None),
                            mailbox: nstring(Some(name)),
                            host: NString(None),
                        });
                        // A comment alone (`group: (foo) ;`) is no member.
                        out.extend(g.addresses.iter().filter(|a| a.address.is_some()).map(one));
                        out.push(Address {
                            name: NString(None),
                            adl: NString(None),
                            mailbox: NString(None),
                            host: NString(None),
                        });
                    }
                    None => out.extend(g.addresses.iter().map(one)),
                }
            }
            out
        }
    }
}

/// A decoded display name back in header form: RFC 2047 when it is not ASCII.
fn encode_word(name: &str) -> String {
    use base64::Engine;
    if name.is_ascii() {
        name.to_owned()
    } else {
        format!(
            "=?utf-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(name.as_bytes())
        )
    }
}

fn params(ct: Option<&mail_parser::ContentType<'_>>) -> Vec<(IString<'static>, IString<'static>)> {
    ct.and_then(|c| c.attributes.as_ref())
        .map(|attrs| {
            attrs
                .iter()
                .map(|a| (istring(&a.name.to_ascii_uppercase()), istring(&a.value)))
                .collect()
        })
        .unwrap_or_default()
}

fn disposition(part: &MessagePart<'_>) -> Option<Disposition<'static>> {
    let language = match part.content_language() {
        HeaderValue::Text(t) => vec![istring(t)],
        HeaderValue::TextList(l) => l.iter().map(|t| istring(t)).collect(),
        _ => vec![],
    };
    Some(Disposition {
        disposition: part
            .content_disposition()
            .map(|d| (istring(&d.c_type.to_ascii_uppercase()), params(Some(d)))),
        tail: Some(Language {
            language,
            tail: Some(Location {
                location: nstring(part.content_location()),
                extensions: vec![],
            }),
        }),
    })
}

fn lines(bytes: &[u8]) -> u32 {
    let n = bytes.iter().filter(|&&b| b == b'\n').count();
    let partial = usize::from(!bytes.is_empty() && !bytes.ends_with(b"\n"));
    u32::try_from(n + partial).unwrap_or(u32::MAX)
}

/// What BODYSTRUCTURE is asked for: extension data, and how deep parts are
/// described before the rest is one opaque leaf.
struct Walk {
    ext: bool,
    max_depth: usize,
    /// The parts described so far, as (message, part index). On broken boundaries
    /// mail-parser can list a part under two multiparts, or under itself or its own
    /// parent: followed naively that is a cycle or a DAG whose walk doubles at every
    /// level (a 5 KB message took 4 GB within the depth limit). Each part is
    /// described once; a second mention is an opaque leaf.
    seen: std::cell::RefCell<std::collections::HashSet<(usize, usize)>>,
}

/// A part below the depth limit: its bytes, as one opaque application part.
fn opaque(size: usize) -> BodyStructure<'static> {
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: Vec::new(),
                id: NString(None),
                description: NString(None),
                content_transfer_encoding: istring("7BIT"),
                size: u32::try_from(size).unwrap_or(u32::MAX),
            },
            specific: SpecificFields::Basic {
                r#type: istring("APPLICATION"),
                subtype: istring("OCTET-STREAM"),
            },
        },
        extension_data: None,
    }
}

fn structure(
    walk: &Walk,
    raw: &[u8],
    message: &Message<'_>,
    index: usize,
    depth: usize,
) -> BodyStructure<'static> {
    let ext = walk.ext;
    let Some(part) = message.parts.get(index) else {
        return fallback_structure(raw.len(), raw);
    };
    let ct = part.content_type();
    let body_bytes = raw
        .get(part.offset_body as usize..part.offset_end as usize)
        .unwrap_or_default();
    let first_visit = walk
        .seen
        .borrow_mut()
        .insert((std::ptr::from_ref(message) as usize, index));
    if depth >= walk.max_depth || !first_visit {
        return opaque(body_bytes.len());
    }
    if let PartType::Multipart(children) = &part.body {
        let bodies: Vec<BodyStructure<'static>> = children
            .iter()
            .map(|&c| structure(walk, raw, message, c as usize, depth + 1))
            .collect();
        let subtype = ct
            .and_then(|c| c.c_subtype.as_deref())
            .unwrap_or("mixed")
            .to_ascii_uppercase();
        return match Vec1::try_from(bodies) {
            Ok(bodies) => BodyStructure::Multi {
                bodies,
                subtype: istring(&subtype),
                extension_data: ext.then(|| MultiPartExtensionData {
                    parameter_list: params(ct),
                    tail: disposition(part),
                }),
            },
            Err(_) => fallback_structure(body_bytes.len(), body_bytes),
        };
    }
    let (c_type, c_subtype) = match ct {
        Some(c) => (
            c.c_type.to_ascii_uppercase(),
            c.c_subtype
                .as_deref()
                .map(str::to_ascii_uppercase)
                .unwrap_or_else(|| "PLAIN".into()),
        ),
        // multipart/digest's default (RFC 2046 §5.1.5), which mail-parser applies.
        None if matches!(part.body, PartType::Message(_)) => {
            ("MESSAGE".to_owned(), "RFC822".to_owned())
        }
        None => ("TEXT".to_owned(), "PLAIN".to_owned()),
    };
    let mut parameter_list = params(ct);
    if ct.is_none() && c_type == "TEXT" {
        parameter_list.push((istring("CHARSET"), istring("US-ASCII")));
    }
    let basic = BasicFields {
        parameter_list,
        id: nstring(part.content_id().map(|id| format!("<{id}>")).as_deref()),
        description: nstring(part.content_description()),
        content_transfer_encoding: istring(
            &part
                .content_transfer_encoding()
                .unwrap_or("7BIT")
                .to_ascii_uppercase(),
        ),
        size: u32::try_from(body_bytes.len()).unwrap_or(u32::MAX),
    };
    let specific = match (&part.body, c_type.as_str()) {
        (PartType::Message(inner), "MESSAGE") if c_subtype == "RFC822" => {
            let inner_raw: &[u8] = if same_bytes(inner, raw) {
                raw
            } else {
                inner.raw_message.as_ref()
            };
            SpecificFields::Message {
                envelope: Box::new(match inner.parts.first() {
                    Some(p) => envelope_of(p, Some(inner_raw)),
                    None => envelope(None),
                }),
                body_structure: Box::new(structure(walk, inner_raw, inner, 0, depth + 1)),
                number_of_lines: lines(body_bytes),
            }
        }
        // A message/rfc822 part mail-parser could not read as one: anything but the
        // message form would break clients' parsers, so it is described as opaque.
        (_, "MESSAGE") if c_subtype == "RFC822" => SpecificFields::Basic {
            r#type: istring("APPLICATION"),
            subtype: istring("OCTET-STREAM"),
        },
        (_, "TEXT") => SpecificFields::Text {
            subtype: istring(&c_subtype),
            number_of_lines: lines(body_bytes),
        },
        _ => SpecificFields::Basic {
            r#type: istring(&c_type),
            subtype: istring(&c_subtype),
        },
    };
    BodyStructure::Single {
        body: Body { basic, specific },
        extension_data: ext.then(|| SinglePartExtensionData {
            md5: NString(None),
            tail: disposition(part),
        }),
    }
}

/// A message mail-parser could not make sense of: one text/plain body.
fn fallback_structure(size: usize, bytes: &[u8]) -> BodyStructure<'static> {
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: vec![(istring("CHARSET"), istring("US-ASCII"))],
                id: NString(None),
                description: NString(None),
                content_transfer_encoding: istring("7BIT"),
                size: u32::try_from(size).unwrap_or(u32::MAX),
            },
            specific: SpecificFields::Text {
                subtype: istring("PLAIN"),
                number_of_lines: lines(bytes),
            },
        },
        extension_data: None,
    }
}

/// The header fields, decoded, for SEARCH HEADER/FROM/SUBJECT...: (lower-case name,
/// value as text).
pub fn header_text(p: &Parsed<'_>) -> Vec<(String, String)> {
    let header = p.header();
    let text = String::from_utf8_lossy(header);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    // Decoded forms too, so a search for a word of an encoded subject matches.
    if let Some(m) = p.message() {
        for h in m
            .parts
            .first()
            .map(|p| p.headers.as_slice())
            .unwrap_or_default()
        {
            let decoded = match &h.value {
                HeaderValue::Text(t) => t.to_string(),
                HeaderValue::TextList(l) => l.join(" "),
                HeaderValue::Address(a) => {
                    let mut s = String::new();
                    for addr in a.iter() {
                        if let Some(n) = &addr.name {
                            s.push_str(n);
                            s.push(' ');
                        }
                        if let Some(e) = &addr.address {
                            s.push_str(e);
                            s.push(' ');
                        }
                    }
                    s
                }
                _ => continue,
            };
            out.push((h.name.as_str().to_ascii_lowercase(), decoded));
        }
    }
    out
}

/// The body as text for SEARCH BODY: decoded text parts when the message parses.
pub fn body_text(p: &Parsed<'_>) -> String {
    match p.message() {
        Some(m) => {
            let mut s = String::new();
            for part in &m.parts {
                match &part.body {
                    PartType::Text(t) | PartType::Html(t) => {
                        s.push_str(t);
                        s.push('\n');
                    }
                    _ => {}
                }
            }
            s
        }
        None => String::from_utf8_lossy(p.text()).into_owned(),
    }
}

/// The Date: header, for SENTBEFORE/SENTON/SENTSINCE.
pub fn sent_date(p: &Parsed<'_>) -> Option<chrono::NaiveDate> {
    let d = p.message()?.date()?;
    chrono::NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
}

/// Messages with hostile MIME structure, for tests and the fuzz target.
pub mod hostile {
    /// `levels` multipart/mixed parts, each the only child of the one above.
    pub fn nested_multipart(levels: usize) -> Vec<u8> {
        let mut m = b"From: a@example.org\r\nSubject: deep\r\n".to_vec();
        for i in 0..levels {
            m.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        }
        m.extend_from_slice(b"Content-Type: text/plain\r\n\r\nleaf\r\n");
        for i in (0..levels).rev() {
            m.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
        }
        m
    }

    /// `levels` message/rfc822 bodies, each holding the next message.
    pub fn nested_messages(levels: usize) -> Vec<u8> {
        let mut m = b"From: a@example.org\r\nSubject: deep\r\n".to_vec();
        for _ in 0..levels {
            m.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n");
        }
        m.extend_from_slice(b"\r\nleaf\r\n");
        m
    }

    /// One multipart with `parts` tiny children.
    pub fn wide(parts: usize) -> Vec<u8> {
        let mut m =
            b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=w\r\n\r\n".to_vec();
        for _ in 0..parts {
            m.extend_from_slice(b"--w\r\n\r\nx\r\n");
        }
        m.extend_from_slice(b"--w--\r\n");
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::core::AString;

    /// A FETCH response carrying `structure`, as the session encodes it.
    fn encoded(structure: BodyStructure<'static>) -> Vec<u8> {
        use imap_codec::ResponseCodec;
        use imap_codec::encode::Encoder;
        use imap_codec::imap_types::fetch::MessageDataItem;
        use imap_codec::imap_types::response::{Data, Response};
        let response = Response::Data(Data::Fetch {
            seq: std::num::NonZeroU32::new(1).unwrap(),
            items: Vec1::from(MessageDataItem::BodyStructure(structure)),
        });
        ResponseCodec::default().encode(&response).dump()
    }

    fn depth_of(s: &BodyStructure<'_>) -> usize {
        let mut depth = 0;
        let mut at: &BodyStructure<'_> = s;
        loop {
            match at {
                BodyStructure::Multi { bodies, .. } => {
                    depth += 1;
                    at = &bodies.as_ref()[0];
                }
                BodyStructure::Single {
                    body:
                        Body {
                            specific: SpecificFields::Message { body_structure, .. },
                            ..
                        },
                    ..
                } => {
                    depth += 1;
                    at = body_structure;
                }
                BodyStructure::Single { .. } => return depth,
            }
        }
    }

    /// 2,500 nested multiparts (a few hundred KB, accepted on port 25) overflowed the
    /// gateway's stack at BODYSTRUCTURE: now the first 100 levels are described and
    /// the rest is one opaque part; deep section numbers name nothing.
    #[test]
    fn deep_nesting_is_cut_at_the_depth_limit() {
        let limits = MimeLimits::default();
        for raw in [
            hostile::nested_multipart(2_500),
            hostile::nested_messages(5_000),
        ] {
            let p = Parsed::new(&raw, limits);
            let s = p.body_structure(true);
            assert_eq!(depth_of(&s), limits.max_depth, "cut at the limit");
            let bytes = encoded(s);
            let leaf: &[u8] = b"\"APPLICATION\" \"OCTET-STREAM\"";
            assert!(bytes.windows(leaf.len()).any(|w| w == leaf));
            let _ = p.envelope();
            let one = std::num::NonZeroU32::new(1).unwrap();
            let deep = Part(Vec1::try_from(vec![one; 150]).unwrap());
            assert!(p.section(Some(&Section::Part(deep))).is_empty());
            let shallow = Part(Vec1::try_from(vec![one; 3]).unwrap());
            assert!(!p.section(Some(&Section::Mime(shallow))).is_empty());
            assert!(p.binary(&[one; 150]).unwrap().is_empty());
            let _ = body_text(&p);
            let _ = header_text(&p);
        }
        // The largest depth the configuration allows fits a tokio worker's 2 MiB
        // stack, in this unoptimised build too.
        let raw: &'static [u8] = hostile::nested_multipart(2_500).leak();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let limits = MimeLimits {
                    max_depth: crate::MAX_MIME_DEPTH,
                    max_parts: 10_000,
                };
                let s = Parsed::new(raw, limits).body_structure(true);
                assert_eq!(depth_of(&s), crate::MAX_MIME_DEPTH);
                encoded(s).len()
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// More containers or boundary lines than max_parts: not parsed at all (its parser
    /// state would outgrow the message), served as one opaque body.
    #[test]
    fn too_much_structure_is_served_opaque() {
        let limits = MimeLimits {
            max_depth: 100,
            max_parts: 1_000,
        };
        for raw in [
            hostile::wide(5_000),
            hostile::nested_messages(2_000),
            hostile::nested_multipart(1_000),
            // The type spaced or folded from its slash (mail-parser reads both).
            String::from_utf8(hostile::nested_messages(2_000))
                .unwrap()
                .replace("message/rfc822", "message\r\n /rfc822")
                .into_bytes(),
            String::from_utf8(hostile::nested_messages(2_000))
                .unwrap()
                .replace("message/rfc822", "Message /rfc822")
                .into_bytes(),
        ] {
            let p = Parsed::new(&raw, limits);
            assert!(p.message().is_none());
            assert!(matches!(
                p.body_structure(false),
                BodyStructure::Single { .. }
            ));
        }
        // Under the limit it is parsed as usual.
        let raw = hostile::wide(400);
        let p = Parsed::new(&raw, limits);
        let BodyStructure::Multi { bodies, .. } = p.body_structure(false) else {
            panic!("multipart expected");
        };
        assert_eq!(bodies.as_ref().len(), 400);
    }

    /// The parsed tree of a deep message/rfc822 chain is taken apart without
    /// recursion (the derived drop recursed once per level).
    #[test]
    fn a_deep_chain_of_messages_drops_without_recursion() {
        let raw: &'static [u8] = hostile::nested_messages(9_000).leak();
        let p = Parsed::new(raw, MimeLimits::default());
        assert!(p.message().is_some());
        // Dropped on a small stack: 9,000 levels of derived drop would not fit.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || drop(p))
            .unwrap()
            .join()
            .unwrap();
    }

    const MULTI: &[u8] = b"From: Alice <alice@example.org>\r\n\
To: bob@example.com, \"Carol\" <carol@example.com>\r\n\
Subject: =?utf-8?q?h=C3=A9llo?=\r\n\
Message-ID: <id1@example.org>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
\r\n\
preamble\r\n\
--b1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
first part\r\nline two\r\n\
--b1\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
Subject: inner\r\n\
\r\n\
inner body\r\n\
--b1--\r\n";

    #[test]
    fn sections_are_byte_ranges_of_the_stored_message() {
        let p = Parsed::new(MULTI, MimeLimits::default());
        let one = std::num::NonZeroU32::new(1).unwrap();
        let two = std::num::NonZeroU32::new(2).unwrap();
        let part = |v: Vec<std::num::NonZeroU32>| Part(Vec1::try_from(v).unwrap());
        assert_eq!(
            &*p.section(Some(&Section::Part(part(vec![one])))),
            b"first part\r\nline two"
        );
        assert_eq!(
            &*p.section(Some(&Section::Mime(part(vec![one])))),
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        assert_eq!(
            &*p.section(Some(&Section::Header(Some(part(vec![two]))))),
            b"Subject: inner\r\n\r\n"
        );
        assert_eq!(
            &*p.section(Some(&Section::Text(Some(part(vec![two]))))),
            b"inner body"
        );
        assert_eq!(
            &*p.section(Some(&Section::Part(part(vec![two, one])))),
            b"inner body"
        );
        let names = Vec1::from(AString::try_from("subject").unwrap());
        assert_eq!(
            &*p.section(Some(&Section::HeaderFields(None, names))),
            b"Subject: =?utf-8?q?h=C3=A9llo?=\r\n\r\n"
        );
        assert!(
            p.section(Some(&Section::Part(part(vec![two, two]))))
                .is_empty()
        );
        assert!(p.text().starts_with(b"preamble"));
    }

    #[test]
    fn envelope_keeps_raw_subject_and_splits_addresses() {
        let e = Parsed::new(MULTI, MimeLimits::default()).envelope();
        assert_eq!(
            e.subject.into_option().unwrap().as_ref(),
            b"=?utf-8?q?h=C3=A9llo?="
        );
        assert_eq!(e.to.len(), 2);
        assert_eq!(
            e.from[0].host.clone().into_option().unwrap().as_ref(),
            b"example.org"
        );
        assert_eq!(e.sender, e.from);
        assert_eq!(
            e.message_id.into_option().unwrap().as_ref(),
            b"<id1@example.org>"
        );
    }

    /// RFC 3501 §7.4.2: a group holding only a comment has no members; a source
    /// route goes to the address's `adl`.
    #[test]
    fn envelope_groups_and_source_routes() {
        let m = b"From: <@route1,@route2:user@example.org>\r\n\
To: group1: a@example.org, (just a comment) ;, b@example.org\r\n\
Cc: group2: (foo) ;\r\n\r\nbody\r\n";
        let e = Parsed::new(m, MimeLimits::default()).envelope();
        let s = |v: &NString<'_>| {
            v.0.as_ref()
                .map(|v| String::from_utf8_lossy(v.as_ref()).into_owned())
        };
        let show = |list: &[Address<'_>]| -> Vec<[Option<String>; 4]> {
            list.iter()
                .map(|a| [s(&a.name), s(&a.adl), s(&a.mailbox), s(&a.host)])
                .collect()
        };
        let some = |v: &str| Some(v.to_owned());
        assert_eq!(
            show(&e.from),
            [[
                None,
                some("@route1,@route2"),
                some("user"),
                some("example.org")
            ]]
        );
        assert_eq!(
            show(&e.to),
            [
                [None, None, some("group1"), None],
                [None, None, some("a"), some("example.org")],
                [None, None, None, None],
                [None, None, some("b"), some("example.org")],
            ]
        );
        assert_eq!(
            show(&e.cc),
            [[None, None, some("group2"), None], [None, None, None, None]]
        );
    }

    /// Found by the `mime_fetch` fuzz target: on this message mail-parser lists part
    /// 1 as a child of itself and of the root, and BODYSTRUCTURE grew by two at every
    /// level down to the depth limit (out of memory).
    #[test]
    fn parts_listed_twice_are_described_once() {
        let raw = include_bytes!("../../tests/data/mime-cycle.eml");
        let m = MessageParser::default().parse(&raw[..]).unwrap();
        let cyclic = m.parts.iter().enumerate().any(|(i, p)| {
            matches!(&p.body, PartType::Multipart(c) if c.iter().any(|&c| c as usize <= i))
        });
        assert!(
            cyclic,
            "the premise: a part listed under itself or its parent"
        );
        let limits = MimeLimits {
            max_depth: 64,
            max_parts: 8129,
        };
        fn nodes(s: &BodyStructure<'_>) -> usize {
            match s {
                BodyStructure::Single { body, .. } => match &body.specific {
                    SpecificFields::Message { body_structure, .. } => 1 + nodes(body_structure),
                    _ => 1,
                },
                BodyStructure::Multi { bodies, .. } => {
                    1 + bodies.as_ref().iter().map(nodes).sum::<usize>()
                }
            }
        }
        let s = Parsed::new(raw, limits).body_structure(true);
        assert!(nodes(&s) <= 2 * m.parts.len() + 2, "{} nodes", nodes(&s));
    }

    #[test]
    fn body_structure_of_a_multipart_with_a_nested_message() {
        let s = Parsed::new(MULTI, MimeLimits::default()).body_structure(true);
        let BodyStructure::Multi {
            bodies, subtype, ..
        } = s
        else {
            panic!("multipart expected");
        };
        assert_eq!(subtype.as_ref(), b"MIXED");
        let bodies = bodies.into_iter().collect::<Vec<_>>();
        assert_eq!(bodies.len(), 2);
        let BodyStructure::Single { body, .. } = &bodies[1] else {
            panic!("single part expected");
        };
        assert!(matches!(body.specific, SpecificFields::Message { .. }));
    }

    #[test]
    fn binary_undoes_the_transfer_encoding() {
        let m = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
Content-Transfer-Encoding: base64\r\n\r\nAAEC/w==\r\n--b\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 =\r\nsoft\r\n--b\r\n\
Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n--b--\r\n";
        let p = Parsed::new(m, MimeLimits::default());
        let n = |v: u32| std::num::NonZeroU32::new(v).unwrap();
        assert_eq!(&*p.binary(&[n(1)]).unwrap(), &[0, 1, 2, 255]);
        assert_eq!(&*p.binary(&[n(2)]).unwrap(), "café soft".as_bytes());
        assert_eq!(p.binary(&[n(3)]), Err(UnknownCte));
        assert!(p.binary(&[n(4)]).unwrap().is_empty());
        assert_eq!(&*p.binary(&[]).unwrap(), &m[..]);
    }

    /// RFC 2045 §6.7 rules 3 and 5: trailing whitespace on an encoded line is not
    /// content, and `=` followed by whitespace ends a soft line break.
    #[test]
    fn quoted_printable_drops_transport_padding() {
        assert_eq!(
            quoted_printable(b"padded   \r\nline=3D1\t\r\nsoft = \t\r\nbreak=\nbare =ZZ end"),
            b"padded\r\nline=1\r\nsoft breakbare =ZZ end"
        );
        assert_eq!(quoted_printable(b"last line="), b"last line");
    }

    #[test]
    fn header_fields_not_and_bare_lf() {
        let h = b"A: 1\nB: 2\n continued\nC: 3\n\n";
        assert_eq!(header_fields(h, &[b"b"], true), b"B: 2\n continued\n\r\n");
        assert_eq!(header_fields(h, &[b"b"], false), b"A: 1\nC: 3\n\r\n");
    }
}
