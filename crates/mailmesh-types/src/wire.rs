//! Text on the wire of the line protocols.

/// Appends `message` as the lines of a multi-line transfer that ends with a line
/// holding a single `.` (SMTP DATA, RFC 5321 §4.5.2; POP3, RFC 1939 §3): every line
/// that starts with `.` gets another one, and the last line is ended with CRLF. The
/// terminating `.` line is the caller's to add. An empty message appends nothing.
pub fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 64 + 2);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads the lines of an SMTP DATA transfer (RFC 5321 §4.5.2) until the line that
/// holds a single `.`: the end is exactly `<CRLF>.<CRLF>`, so no other byte sequence
/// (`<LF>.<LF>`, `<CRLF>.<CR><CR><LF>` …) that another receiver might take for the
/// end can end a message here (SMTP smuggling). A `.` that starts a line is removed
/// (the sender doubled it); bytes are otherwise passed on as they came.
#[derive(Debug, Clone)]
pub struct DotReader {
    /// The previous byte ended a line with CRLF.
    line_start: bool,
    /// The previous byte was CR (a LF now ends a line).
    prev_cr: bool,
    pending: Pending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// A `.` at the start of a line.
    Dot,
    /// `.` then CR at the start of a line.
    DotCr,
}

impl Default for DotReader {
    fn default() -> Self {
        Self::new()
    }
}

impl DotReader {
    /// After the DATA command: its CRLF precedes the first line.
    pub fn new() -> Self {
        Self {
            line_start: true,
            prev_cr: false,
            pending: Pending::None,
        }
    }

    /// Appends the message bytes of `input` to `out`; `Some(n)` once the end line
    /// is complete, `n` being the bytes of `input` consumed up to it (what follows
    /// is the client's next command).
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.pending {
                Pending::Dot => {
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        self.pending = Pending::DotCr;
                    } else {
                        // A doubled dot (or a lone one before other text): removed.
                        self.pending = Pending::None;
                        self.emit(b, out);
                    }
                    continue;
                }
                Pending::DotCr => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        return Some(i);
                    }
                    self.pending = Pending::None;
                    self.emit(b'\r', out);
                    self.emit(b, out);
                    continue;
                }
                Pending::None => {}
            }
            if self.line_start {
                self.line_start = false;
                if input[i] == b'.' {
                    self.pending = Pending::Dot;
                    self.prev_cr = false;
                    i += 1;
                    continue;
                }
            }
            // Everything up to and including the next LF goes out as it is.
            let rest = &input[i..];
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |p| p + 1);
            let chunk = &rest[..end];
            out.extend_from_slice(chunk);
            if let [.., before, b'\n'] = chunk {
                self.line_start = *before == b'\r';
                self.prev_cr = false;
            } else if chunk == b"\n" {
                self.line_start = self.prev_cr;
                self.prev_cr = false;
            } else {
                self.prev_cr = chunk.last() == Some(&b'\r');
            }
            i += end;
        }
        None
    }

    fn emit(&mut self, b: u8, out: &mut Vec<u8>) {
        out.push(b);
        if b == b'\n' {
            self.line_start = self.prev_cr;
            self.prev_cr = false;
        } else {
            self.prev_cr = b == b'\r';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `input` in every split into two chunks; the message and the bytes
    /// consumed must not depend on where the network cut it.
    fn read_split(input: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut first = None;
        for cut in 0..=input.len() {
            let mut reader = DotReader::new();
            let mut out = Vec::new();
            let got = match reader.ingest(&input[..cut], &mut out) {
                Some(n) => Some(n),
                None => reader.ingest(&input[cut..], &mut out).map(|n| n + cut),
            };
            match &first {
                None => first = Some((out, got)),
                Some(f) => assert_eq!(f, &(out, got), "cut at {cut} of {input:?}"),
            }
        }
        first.unwrap()
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_data() {
        let (m, end) = read_split(b"Subject: a\r\n\r\nline\r\n.\r\nQUIT\r\n");
        assert_eq!(m, b"Subject: a\r\n\r\nline\r\n");
        assert_eq!(end, Some(b"Subject: a\r\n\r\nline\r\n.\r\n".len()));
        // A message that is only the end line.
        assert_eq!(read_split(b".\r\n"), (Vec::new(), Some(3)));
        // Smuggling attempts: none of these ends the message.
        for sneaky in [
            &b"a\n.\nMAIL FROM:<x>\r\n"[..],
            b"a\r\n.\r\r\nMAIL FROM:<x>\r\n",
            b"a\n.\r\nMAIL FROM:<x>\r\n",
            b"a\r.\r\nMAIL FROM:<x>\r\n",
            b"a\r\n.\nMAIL FROM:<x>\r\n",
            b"a\r\n. \r\nx\r\n",
        ] {
            let (m, end) = read_split(sneaky);
            assert_eq!(end, None, "{sneaky:?} ended the data");
            assert!(m.windows(4).any(|w| w == b"MAIL") || m.ends_with(b"x\r\n"));
        }
    }

    #[test]
    fn leading_dots_are_unstuffed() {
        let (m, end) = read_split(b"..hidden\r\na\r\n...two\r\n.x\r\n.\r\n");
        assert_eq!(m, b".hidden\r\na\r\n..two\r\nx\r\n");
        assert!(end.is_some());
        // What dot_stuff writes comes back as it was.
        let original = b"Subject: x\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r\n";
        let mut stuffed = Vec::new();
        dot_stuff(original, &mut stuffed);
        stuffed.extend_from_slice(b".\r\n");
        assert_eq!(
            read_split(&stuffed),
            (original.to_vec(), Some(stuffed.len()))
        );
    }

    #[test]
    fn leading_dots_are_doubled_and_the_last_line_ended() {
        let stuffed = |m: &[u8]| {
            let mut out = Vec::new();
            dot_stuff(m, &mut out);
            out
        };
        assert_eq!(stuffed(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(
            stuffed(b"Subject: x\r\n\r\n.hidden\r\n..two\r\nend"),
            b"Subject: x\r\n\r\n..hidden\r\n...two\r\nend\r\n"
        );
        assert_eq!(stuffed(b"no end"), b"no end\r\n");
        assert_eq!(stuffed(b""), b"");
    }
}
