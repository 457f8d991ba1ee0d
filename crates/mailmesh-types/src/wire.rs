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

#[cfg(test)]
mod tests {
    use super::*;

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
