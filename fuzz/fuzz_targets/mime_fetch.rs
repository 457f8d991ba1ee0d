//! Every FETCH item over hostile MIME trees: the input drives a small generator of
//! nested multiparts and message/rfc822 parts (any depth and width, broken, reused
//! or missing boundaries, bad transfer encodings, junk lines), or is taken as the
//! raw message itself. ENVELOPE, BODYSTRUCTURE (encoded as the session sends it),
//! every section and BINARY of the part paths that exist and many that do not, and
//! SEARCH's header and body text must come out without a panic, a stack overflow or
//! a section that is not a piece of the stored bytes.
#![no_main]

use std::borrow::Cow;
use std::num::NonZeroU32;

use imap_codec::ResponseCodec;
use imap_codec::encode::Encoder;
use imap_codec::imap_types::core::{AString, Vec1};
use imap_codec::imap_types::fetch::{MessageDataItem, Part, Section};
use imap_codec::imap_types::response::{Data, Response};
use libfuzzer_sys::fuzz_target;
use mailmesh_gateway::imap::message::{self, MimeLimits, Parsed};

/// Builds a message from `ops` (no recursion: containers are a stack).
fn generate(ops: &[u8]) -> Vec<u8> {
    let mut out = b"From: Fuzz <f@example.org>\r\nTo: a@acme.test, (c) g: x@y;\r\n".to_vec();
    // Open containers: Some(boundary) for a multipart, None for message/rfc822.
    let mut open: Vec<Option<String>> = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        let op = ops[i];
        let arg = ops.get(i + 1).copied().unwrap_or(0);
        i += 2;
        match op % 9 {
            0 => {
                // A multipart; its boundary may repeat an outer one.
                let boundary = if arg % 7 == 0 {
                    open.iter()
                        .flatten()
                        .next()
                        .cloned()
                        .unwrap_or_else(|| "b".into())
                } else {
                    format!("b{}x{}", open.len(), arg)
                };
                out.extend_from_slice(
                    format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n")
                        .as_bytes(),
                );
                open.push(Some(boundary));
            }
            1 => {
                out.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n");
                open.push(None);
            }
            2 | 6 | 3 => {
                let (cte, body): (&str, &[u8]) = match op % 9 {
                    2 => ("7bit", b"text line\r\n"),
                    3 => (
                        "base64",
                        if arg % 2 == 0 {
                            b"aGVsbG8=\r\n"
                        } else {
                            b"!!not base64\r\n"
                        },
                    ),
                    _ => ("quoted-printable", b"a=3Db =\r\nsoft=\r\n= \r\n"),
                };
                out.extend_from_slice(
                    format!("Content-Type: text/plain\r\nContent-Transfer-Encoding: {cte}\r\n\r\n")
                        .as_bytes(),
                );
                out.extend_from_slice(body);
                // Next sibling, if inside a multipart.
                if let Some(Some(b)) = open.last()
                    && arg % 3 != 0
                {
                    out.extend_from_slice(format!("--{b}\r\n").as_bytes());
                }
            }
            4 => {
                // Close the innermost container, with or without its delimiter.
                match open.pop() {
                    Some(Some(b)) if arg % 4 != 0 => {
                        out.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes())
                    }
                    _ => {}
                }
                if let Some(Some(b)) = open.last() {
                    out.extend_from_slice(format!("--{b}\r\n").as_bytes());
                }
            }
            5 => out.extend_from_slice(b"--\r\n-- \r\n--junk\r\n"),
            7 => {
                // Odd header lines: folded, NUL, very long, no colon.
                out.extend_from_slice(b"X-Odd: a\r\n\tfolded\r\nX-\0Nul: b\r\nno colon\r\n");
                out.extend(std::iter::repeat_n(b'h', usize::from(arg) * 8));
                out.extend_from_slice(b": long\r\n");
            }
            _ => {
                let n = usize::from(arg);
                out.extend(std::iter::repeat_n(b'x', n));
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\nend\r\n");
    out
}

fn encode(item: MessageDataItem<'static>) -> Vec<u8> {
    let response = Response::Data(Data::Fetch {
        seq: NonZeroU32::MIN,
        items: Vec1::from(item),
    });
    ResponseCodec::default().encode(&response).dump()
}

fn piece_of(raw: &[u8], got: &Cow<'_, [u8]>) -> bool {
    match got {
        Cow::Borrowed(b) => {
            b.is_empty()
                || (raw.as_ptr() <= b.as_ptr()
                    && b.as_ptr() as usize + b.len() <= raw.as_ptr() as usize + raw.len())
        }
        // HEADER.FIELDS builds its answer from the header's lines.
        Cow::Owned(o) => o.len() <= raw.len() + 2,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let raw = if mode % 2 == 0 {
        generate(rest)
    } else {
        rest.to_vec()
    };
    let limits = MimeLimits {
        max_depth: 1 + usize::from(mode / 2) % 120,
        max_parts: 1 + usize::from(mode) * 64,
    };
    let p = Parsed::new(&raw, limits);
    let _ = encode(MessageDataItem::Envelope(p.envelope()));
    let _ = encode(MessageDataItem::BodyExt {
        section: None,
        origin: None,
        data: imap_codec::imap_types::core::NString(None),
    });
    let _ = encode(MessageDataItem::BodyStructure(p.body_structure(true)));
    let _ = encode(MessageDataItem::Body(p.body_structure(false)));
    let _ = message::header_text(&p);
    let _ = message::body_text(&p);
    let _ = message::sent_date(&p);
    // Part paths: every one up to three levels with numbers 1..=3, and a deep one.
    let mut paths: Vec<Vec<NonZeroU32>> = Vec::new();
    for a in 1..=3u32 {
        paths.push(vec![NonZeroU32::new(a).unwrap()]);
        for b in 1..=3u32 {
            paths.push(vec![
                NonZeroU32::new(a).unwrap(),
                NonZeroU32::new(b).unwrap(),
            ]);
            for c in 1..=3u32 {
                paths.push(vec![
                    NonZeroU32::new(a).unwrap(),
                    NonZeroU32::new(b).unwrap(),
                    NonZeroU32::new(c).unwrap(),
                ]);
            }
        }
    }
    paths.push(vec![NonZeroU32::MIN; 300]);
    let names = Vec1::from(AString::try_from("subject").unwrap());
    for path in &paths {
        let part = Part(Vec1::try_from(path.clone()).unwrap());
        for section in [
            Section::Part(part.clone()),
            Section::Mime(part.clone()),
            Section::Header(Some(part.clone())),
            Section::Text(Some(part.clone())),
            Section::HeaderFields(Some(part.clone()), names.clone()),
            Section::HeaderFieldsNot(Some(part.clone()), names.clone()),
        ] {
            let got = p.section(Some(&section));
            assert!(
                piece_of(&raw, &got),
                "{section:?} is not a piece of the message"
            );
        }
        let _ = p.binary(path);
    }
    for section in [
        None,
        Some(Section::Header(None)),
        Some(Section::Text(None)),
        Some(Section::HeaderFields(None, names.clone())),
    ] {
        let got = p.section(section.as_ref());
        assert!(piece_of(&raw, &got));
    }
});
