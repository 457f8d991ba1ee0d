//! Command syntax the pinned `imap-codec` does not parse yet: `SEARCH RETURN (...)`
//! (ESEARCH, RFC 4731 / RFC 9051), LIST selection and return options
//! (LIST-EXTENDED, RFC 5258; LIST-STATUS, RFC 5819) and the saved search result `$`
//! (SEARCHRES, RFC 5182), which is replaced by the set it stands for. They are taken out of the command
//! where the grammar puts them, on its first line (SEARCH, LIST selection) or at its
//! end (LIST RETURN), and handed to the session; the rest goes to the codec as a
//! plain IMAP4rev1 command. Anything else is left alone, so the codec judges it.

use imap_codec::imap_types::status::StatusDataItemName;

/// What was cut out of a command.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extras {
    /// `SEARCH RETURN (...)` options, upper-cased (empty list: ALL).
    pub search_return: Option<Vec<String>>,
    /// LIST selection options (SUBSCRIBED, SPECIAL-USE, RECURSIVEMATCH, REMOTE).
    pub list_select: Vec<String>,
    /// LIST return options (SUBSCRIBED, CHILDREN, SPECIAL-USE; STATUS separately).
    pub list_return: Vec<String>,
    /// `RETURN (STATUS (...))`.
    pub list_status: Option<Vec<StatusDataItemName>>,
    /// `LIST <reference> (<pattern> ...)`: every pattern, as sent (RFC 5258 §3);
    /// the codec is handed the first.
    pub list_patterns: Option<Vec<String>>,
    /// The command used `$` while the saved result was empty: it acts on nothing.
    pub saved_empty: bool,
}

/// What `$` stands for in a rewritten command: a UID set (`uid`) or a sequence set;
/// `None` when the saved result is empty.
pub type Saved<'a> = &'a dyn Fn(bool) -> Option<String>;

/// A UID no mailbox reaches: `$` of an empty saved result becomes it, so the command
/// still parses and matches nothing.
const NO_MESSAGE: &str = "4294967295";

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// The index of the `)` closing the `(` at `open`, on one line, with no nesting
/// deeper than `max_depth`.
fn closing(bytes: &[u8], open: usize, max_depth: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, &b) in bytes.iter().enumerate().skip(open) {
        match b {
            b'(' => {
                depth += 1;
                if depth > max_depth {
                    return None;
                }
            }
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'\r' | b'\n' | b'"' | b'{' => return None,
            _ => {}
        }
    }
    None
}

/// The index of the `"` closing the quoted string opened at `open`, on one line.
fn quoted_end(bytes: &[u8], open: usize) -> Option<usize> {
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate().skip(open + 1) {
        match (escaped, b) {
            (_, b'\r' | b'\n') => return None,
            (false, b'\\') => escaped = true,
            (false, b'"') => return Some(i),
            _ => escaped = false,
        }
    }
    None
}

/// A quoted string's content without its escapes.
fn unquote(inner: &[u8]) -> String {
    let mut out = Vec::with_capacity(inner.len());
    let mut escaped = false;
    for &b in inner {
        if !escaped && b == b'\\' {
            escaped = true;
            continue;
        }
        escaped = false;
        out.push(b);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `LIST <reference> (<pattern> ...)` after the command name at `name_end`: where
/// the pattern list opens and closes, and its patterns (unquoted). `None` for one
/// pattern, an empty list, or syntax this does not know (a literal): the codec then
/// judges the command.
fn pattern_list(bytes: &[u8], name_end: usize) -> Option<(usize, usize, Vec<String>)> {
    if bytes.get(name_end) != Some(&b' ') {
        return None;
    }
    let start = name_end + 1;
    // The reference: a quoted string or an atom.
    let after = match bytes.get(start)? {
        b'"' => quoted_end(bytes, start)? + 1,
        b'{' | b'(' | b'~' => return None,
        _ => start + bytes[start..].iter().position(|&b| b == b' ')?,
    };
    if bytes.get(after) != Some(&b' ') || bytes.get(after + 1) != Some(&b'(') {
        return None;
    }
    let open = after + 1;
    let mut patterns = Vec::new();
    let mut i = open + 1;
    loop {
        match *bytes.get(i)? {
            b' ' => i += 1,
            b')' => break,
            b'"' => {
                let end = quoted_end(bytes, i)?;
                patterns.push(unquote(&bytes[i + 1..end]));
                i = end + 1;
            }
            b'\r' | b'\n' | b'{' | b'(' | b'~' => return None,
            _ => {
                let end = i + bytes[i..]
                    .iter()
                    .position(|&b| matches!(b, b' ' | b')' | b'\r' | b'\n'))?;
                patterns.push(String::from_utf8_lossy(&bytes[i..end]).into_owned());
                i = end;
            }
        }
    }
    (!patterns.is_empty()).then_some((open, i, patterns))
}

fn words(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).to_ascii_uppercase())
        .collect()
}

fn status_items(inner: &[u8]) -> Option<Vec<StatusDataItemName>> {
    words(inner)
        .iter()
        .map(|w| {
            Some(match w.as_str() {
                "MESSAGES" => StatusDataItemName::Messages,
                "RECENT" => StatusDataItemName::Recent,
                "UIDNEXT" => StatusDataItemName::UidNext,
                "UIDVALIDITY" => StatusDataItemName::UidValidity,
                "UNSEEN" => StatusDataItemName::Unseen,
                "DELETED" => StatusDataItemName::Deleted,
                "SIZE" => StatusDataItemName::Size,
                "HIGHESTMODSEQ" => StatusDataItemName::HighestModSeq,
                _ => return None,
            })
        })
        .collect()
}

/// The command with the extension syntax removed and `$` replaced, and what it said;
/// `None` when the command has none (the usual case: no copy is made).
pub fn rewrite(message: &[u8], saved: Saved<'_>) -> Option<(Vec<u8>, Extras)> {
    let first = syntax(message);
    let (bytes, mut extras) = match &first {
        Some((b, e)) => (b.as_slice(), e.clone()),
        None => (message, Extras::default()),
    };
    match substitute_saved(bytes, saved) {
        Some((out, empty)) => {
            extras.saved_empty = empty;
            Some((out, extras))
        }
        None => first,
    }
}

/// Replaces each `$` token on the command's first line (outside quoted strings) with
/// the saved result: as UIDs where it is the set of a UID command or follows a
/// `UID` search key, else as sequence numbers. `Some((bytes, empty))` when any was
/// replaced.
fn substitute_saved(message: &[u8], saved: Saved<'_>) -> Option<(Vec<u8>, bool)> {
    let line_end = message
        .iter()
        .position(|&b| b == b'\r' || b == b'\n' || b == b'{' || b == b'~')
        .unwrap_or(message.len());
    let line = &message[..line_end];
    if !line.contains(&b'$') {
        return None;
    }
    // Only commands that take a sequence set (never LOGIN's password or a name).
    let mut head = line.split(|&b| b == b' ').skip(1);
    let command = match head.next() {
        Some(w) if eq(w, "UID") => head.next()?,
        Some(w) => w,
        None => return None,
    };
    if !["FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE"]
        .iter()
        .any(|c| eq(command, c))
    {
        return None;
    }
    let mut out = Vec::with_capacity(message.len() + 32);
    let mut in_quote = false;
    let mut escaped = false;
    let mut words: Vec<&[u8]> = Vec::new();
    let mut word_start = 0;
    let mut empty = false;
    let mut replaced = false;
    let uid_command = line
        .split(|&b| b == b' ')
        .nth(1)
        .is_some_and(|w| eq(w, "UID"));
    let first_argument = if uid_command { 3 } else { 2 };
    for (i, &b) in line.iter().enumerate() {
        if in_quote {
            out.push(b);
            match (escaped, b) {
                (false, b'\\') => escaped = true,
                (false, b'"') => in_quote = false,
                _ => escaped = false,
            }
            continue;
        }
        match b {
            b'"' => {
                in_quote = true;
                out.push(b);
            }
            b'$' if matches!(line.get(i.wrapping_sub(1)), Some(b' ' | b'('))
                && matches!(line.get(i + 1), None | Some(b' ' | b')')) =>
            {
                let index = words.len();
                let command = words.get(first_argument - 1).copied().unwrap_or_default();
                let uid = if index == first_argument && !eq(command, "SEARCH") {
                    uid_command
                } else {
                    words.last().is_some_and(|w| eq(w, "UID"))
                };
                match saved(uid) {
                    Some(set) => out.extend_from_slice(set.as_bytes()),
                    None => {
                        empty = true;
                        out.extend_from_slice(NO_MESSAGE.as_bytes());
                    }
                }
                replaced = true;
            }
            _ => out.push(b),
        }
        if b == b' ' {
            words.push(&line[word_start..i]);
            word_start = i + 1;
        }
    }
    out.extend_from_slice(&message[line_end..]);
    replaced.then_some((out, empty))
}

fn syntax(message: &[u8]) -> Option<(Vec<u8>, Extras)> {
    let mut parts = message.splitn(4, |&b| b == b' ');
    let tag = parts.next()?;
    let first = parts.next()?;
    let mut extras = Extras::default();
    // Where the command name ends, and the name.
    let (name_end, name) = if eq(first, "UID") {
        let second = parts.next()?;
        (tag.len() + 1 + first.len() + 1 + second.len(), second)
    } else {
        (tag.len() + 1 + first.len(), first)
    };
    let rest = message.get(name_end..)?;
    if eq(name, "SEARCH") {
        let after = rest.strip_prefix(b" ")?;
        let opts = after.get(..8)?;
        if !eq(opts, "RETURN (") {
            return None;
        }
        let open = name_end + 1 + 7;
        let close = closing(message, open, 1)?;
        extras.search_return = Some(words(&message[open + 1..close]));
        let mut out = message[..name_end].to_vec();
        out.extend_from_slice(&message[close + 1..]);
        return Some((out, extras));
    }
    if !eq(name, "LIST") || name_end != tag.len() + 1 + first.len() {
        return None;
    }
    let mut out = message.to_vec();
    let mut changed = false;
    // Selection options: LIST (SUBSCRIBED) "" "*"
    if rest.starts_with(b" (") {
        let open = name_end + 1;
        let close = closing(message, open, 1)?;
        extras.list_select = words(&message[open + 1..close]);
        out = message[..name_end].to_vec();
        out.extend_from_slice(&message[close + 1..]);
        changed = true;
    }
    // Several patterns: LIST "" ("a/*" b/c). The codec takes one: the first stays
    // in the command, all go to the session.
    if let Some((open, close, patterns)) = pattern_list(&out, name_end) {
        let mut cut = out[..open].to_vec();
        cut.extend_from_slice(quote(&patterns[0]).as_bytes());
        cut.extend_from_slice(&out[close + 1..]);
        out = cut;
        extras.list_patterns = Some(patterns);
        changed = true;
    }
    // Return options at the end: ... RETURN (CHILDREN STATUS (MESSAGES))
    let end = out.len()
        - out
            .iter()
            .rev()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
    if end > 0 && out[end - 1] == b')' {
        let mut depth = 0usize;
        let mut open = None;
        for i in (0..end).rev() {
            match out[i] {
                b')' => depth += 1,
                b'(' => {
                    depth -= 1;
                    if depth == 0 {
                        open = Some(i);
                        break;
                    }
                }
                b'"' | b'}' => break,
                _ => {}
            }
        }
        if let Some(open) = open
            && open >= 8
            && eq(&out[open - 8..open], " RETURN ")
        {
            let inner = out[open + 1..end - 1].to_vec();
            let mut i = 0;
            while i < inner.len() {
                let word_end = inner[i..]
                    .iter()
                    .position(|&b| b == b' ' || b == b'(')
                    .map_or(inner.len(), |p| i + p);
                let word = String::from_utf8_lossy(&inner[i..word_end]).to_ascii_uppercase();
                i = word_end;
                if word == "STATUS" {
                    let start = inner[i..].iter().position(|&b| b == b'(')? + i;
                    let stop = inner[start..].iter().position(|&b| b == b')')? + start;
                    extras.list_status = Some(status_items(&inner[start + 1..stop])?);
                    i = stop + 1;
                } else if word.is_empty() {
                    // A parenthesis where an option belongs: not syntax this knows
                    // (found by fuzzing: it used to spin here).
                    return None;
                } else {
                    extras.list_return.push(word);
                }
                while i < inner.len() && inner[i] == b' ' {
                    i += 1;
                }
            }
            let tail = out[end..].to_vec();
            out.truncate(open - 8);
            out.extend_from_slice(&tail);
            changed = true;
        }
    }
    changed.then_some((out, extras))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: bool) -> Option<String> {
        Some("NONE".into())
    }

    fn rewrite(message: &[u8]) -> Option<(Vec<u8>, Extras)> {
        super::rewrite(message, &none)
    }

    #[test]
    fn saved_result_is_substituted_by_kind() {
        let saved = |uid: bool| {
            Some(if uid {
                "10:12".to_owned()
            } else {
                "1:3".to_owned()
            })
        };
        let r = |m: &[u8]| super::rewrite(m, &saved).map(|(b, _)| String::from_utf8(b).unwrap());
        assert_eq!(r(b"a FETCH $ FLAGS\r\n").unwrap(), "a FETCH 1:3 FLAGS\r\n");
        assert_eq!(
            r(b"a UID FETCH $ FLAGS\r\n").unwrap(),
            "a UID FETCH 10:12 FLAGS\r\n"
        );
        assert_eq!(
            r(b"a UID SEARCH $ UNSEEN\r\n").unwrap(),
            "a UID SEARCH 1:3 UNSEEN\r\n"
        );
        assert_eq!(
            r(b"a SEARCH UID $ (OR $ SEEN)\r\n").unwrap(),
            "a SEARCH UID 10:12 (OR 1:3 SEEN)\r\n"
        );
        assert_eq!(
            r(b"a SEARCH RETURN (SAVE) SUBJECT \"$\" $\r\n").unwrap(),
            "a SEARCH SUBJECT \"$\" 1:3\r\n"
        );
        assert_eq!(
            r(b"a COPY $ Archive\r\n").unwrap(),
            "a COPY 1:3 Archive\r\n"
        );
        assert!(r(b"a SEARCH SUBJECT a$b\r\n").is_none());
        assert!(
            r(b"a LOGIN alice $\r\n").is_none(),
            "a password is never touched"
        );
        assert!(r(b"a CREATE $\r\n").is_none());
        let empty = |_: bool| None;
        let (b, e) = super::rewrite(b"a MOVE $ Trash\r\n", &empty).unwrap();
        assert_eq!(b, b"a MOVE 4294967295 Trash\r\n");
        assert!(e.saved_empty);
    }

    #[test]
    fn search_return_is_cut_out() {
        let (out, e) = rewrite(b"a UID SEARCH RETURN (MIN COUNT) UNSEEN\r\n").unwrap();
        assert_eq!(out, b"a UID SEARCH UNSEEN\r\n");
        assert_eq!(e.search_return, Some(vec!["MIN".into(), "COUNT".into()]));
        let (out, e) = rewrite(b"b search return () ALL\r\n").unwrap();
        assert_eq!(out, b"b search ALL\r\n");
        assert_eq!(e.search_return, Some(vec![]));
        assert!(rewrite(b"c SEARCH ALL\r\n").is_none());
        assert!(rewrite(b"c SEARCH RETURN (PARTIAL (1:5)) ALL\r\n").is_none());
    }

    #[test]
    fn several_list_patterns_are_cut_out() {
        let (out, e) =
            rewrite(b"a LIST \"\" (\"a/*\" b/c \"q\\\"x\") RETURN (CHILDREN)\r\n").unwrap();
        assert_eq!(out, b"a LIST \"\" \"a/*\"\r\n");
        assert_eq!(
            e.list_patterns,
            Some(vec!["a/*".to_owned(), "b/c".to_owned(), "q\"x".to_owned()])
        );
        assert_eq!(e.list_return, vec!["CHILDREN".to_owned()]);
        let (out, e) = rewrite(b"b LIST (SUBSCRIBED) INBOX (% \"x\")\r\n").unwrap();
        assert_eq!(out, b"b LIST INBOX \"%\"\r\n");
        assert_eq!(e.list_patterns, Some(vec!["%".to_owned(), "x".to_owned()]));
        // One pattern, an empty list or a literal: left to the codec.
        assert!(rewrite(b"c LIST \"\" *\r\n").is_none());
        assert!(rewrite(b"d LIST \"\" ()\r\n").is_none());
        assert!(rewrite(b"e LIST \"\" ({1}\r\n").is_none());
    }

    #[test]
    fn list_options_are_cut_out() {
        let (out, e) = rewrite(
            b"a LIST (SUBSCRIBED) \"\" \"*\" RETURN (CHILDREN STATUS (MESSAGES UNSEEN))\r\n",
        )
        .unwrap();
        assert_eq!(out, b"a LIST \"\" \"*\"\r\n");
        assert_eq!(e.list_select, vec!["SUBSCRIBED".to_owned()]);
        assert_eq!(e.list_return, vec!["CHILDREN".to_owned()]);
        assert_eq!(
            e.list_status,
            Some(vec![
                StatusDataItemName::Messages,
                StatusDataItemName::Unseen
            ])
        );
        let (out, e) = rewrite(b"b LIST \"\" % RETURN (SPECIAL-USE)\r\n").unwrap();
        assert_eq!(out, b"b LIST \"\" %\r\n");
        assert_eq!(e.list_return, vec!["SPECIAL-USE".to_owned()]);
        assert!(rewrite(b"c LIST \"\" \"*\"\r\n").is_none());
        assert!(rewrite(b"e LIST \"\" x RETURN (()\r\n").is_none());
        assert!(rewrite(b"e LIST \"\" x RETURN ((a) b)\r\n").is_none());
        assert!(rewrite(b"d FETCH 1 (FLAGS)\r\n").is_none());
    }
}
