//! IMAP against the real storage service (its gRPC API over the embedded backends),
//! judged by clients written by others: Python's imaplib, curl and mbsync;
//! transcripts for the edges; two gateway "pods" on one storage for IDLE.

mod common;

use std::time::{Duration, Instant};

use common::{Site, memory, python, site};
use mailmesh_gateway::{ImapConfig, Pop3Config};
use mailmesh_storage::engine::Delivery;
use mailmesh_types::ReversePath;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn pod(site: &Site, imap: ImapConfig) -> (u16, u16) {
    let pod = common::start(site, memory(), Pop3Config::default(), imap).await;
    (pod.imap, pod.imaps)
}

fn plaintext() -> ImapConfig {
    ImapConfig {
        allow_plaintext_auth: true,
        ..ImapConfig::default()
    }
}

async fn deliver(site: &Site, key: &str, message: &str) {
    let from: ReversePath = "bob@example.org".parse().unwrap();
    let to = "alice@acme.test".parse().unwrap();
    site.engine
        .deliver(
            &site.alice,
            Delivery {
                mailbox: "INBOX",
                return_path: &from,
                delivered_to: &to,
                message: message.as_bytes(),
                key,
                internal_date_ms: 1_795_752_725_000,
            },
        )
        .await
        .unwrap();
}

const IMAPLIB_PRELUDE: &str = r#"
import imaplib, ssl, sys, re
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def ok(r):
    typ, data = r
    assert typ == 'OK', (typ, data)
    return data
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_reads_searches_changes_and_moves_over_starttls() {
    let site = site().await;
    let (port, _) = pod(&site, ImapConfig::default()).await;
    let script = format!(
        r#"{IMAPLIB_PRELUDE}
m = imaplib.IMAP4('127.0.0.1', {port})
assert 'LOGINDISABLED' in m.capabilities, m.capabilities
assert 'STARTTLS' in m.capabilities
try:
    m.login('alice@acme.test', 'pw')
    raise SystemExit('login before TLS must fail')
except imaplib.IMAP4.error:
    pass
ok(m.starttls(ssl_context=ctx))
assert 'AUTH=PLAIN' in m.capabilities, m.capabilities
try:
    m.login('alice@acme.test', 'wrong')
    raise SystemExit('a wrong password must fail')
except imaplib.IMAP4.error as e:
    assert 'AUTHENTICATIONFAILED' in str(e), e
ok(m.login('alice@acme.test', 'pw'))
for cap in ['IDLE', 'UIDPLUS', 'MOVE', 'CONDSTORE', 'SPECIAL-USE', 'NAMESPACE', 'LITERAL+']:
    assert cap in m.capabilities or cap in str(ok(m.capability())), cap
boxes = b' '.join(ok(m.list()))
assert b'INBOX' in boxes and b'\\Sent' in boxes and b'\\Junk' in boxes, boxes
print('exists', ok(m.select('INBOX'))[0].decode())
print('all', ok(m.search(None, 'ALL'))[0].decode())
print('subject', ok(m.search(None, 'SUBJECT', 'two'))[0].decode())
print('body', ok(m.search(None, 'BODY', 'third'))[0].decode())
print('or', ok(m.search(None, 'OR', 'SUBJECT', 'one', 'SUBJECT', 'three'))[0].decode())
print('unseen', ok(m.search(None, 'UNSEEN'))[0].decode())
data = ok(m.fetch('2', '(BODY.PEEK[] RFC822.SIZE FLAGS)'))
print('peek', data[0][1].decode().replace('\r\n', '|'))
assert str(len(data[0][1])) in data[0][0].decode(), data
print('still unseen', ok(m.search(None, 'UNSEEN'))[0].decode())
data = ok(m.fetch('1', '(BODY[TEXT])'))
print('text', data[0][1].decode().replace('\r\n', '|'))
data = ok(m.fetch('1', '(FLAGS)'))
print('seen now', data[0].decode())
data = ok(m.fetch('3', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE BODYSTRUCTURE INTERNALDATE)'))
print('fields', data[0][1].decode().replace('\r\n', '|'))
print('envelope', data[0][0].decode() + data[1].decode())
ok(m.store('2', '+FLAGS', '(\\Flagged $Important)'))
print('flagged', ok(m.search(None, 'FLAGGED'))[0].decode())
print('keyword', ok(m.search(None, 'KEYWORD', '$Important'))[0].decode())
ok(m.create('Archive/2026'))
typ, data = m.uid('COPY', '1:2', 'Archive/2026')
assert typ == 'OK', data
print('copyuid', m.untagged_responses.get('COPYUID', data))
typ, data = m.uid('MOVE', '3', 'Archive/2026')
assert typ == 'OK', data
print('status', ok(m.status('Archive/2026', '(MESSAGES UIDNEXT UNSEEN)'))[0].decode())
print('after move', ok(m.search(None, 'ALL'))[0].decode())
typ, data = m.copy('1', 'Nowhere')
assert typ == 'NO' and 'TRYCREATE' in str(m.untagged_responses) + str(data), (typ, data)
typ, data = m.append('Archive/2026', '(\\Seen)', imaplib.Time2Internaldate(1700000000), b'Subject: appended\r\n\r\nhello\r\n')
assert typ == 'OK' and b'APPENDUID' in data[0], (typ, data)
ok(m.store('1', '+FLAGS', '\\Deleted'))
ok(m.expunge())
print('after expunge', ok(m.search(None, 'ALL'))[0].decode())
ok(m.select('Archive/2026', readonly=True))
print('archive', ok(m.uid('SEARCH', None, 'ALL'))[0].decode())
print('archive subjects', ok(m.uid('FETCH', '1:*', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')))
typ, data = m.store('1', '+FLAGS', '\\Deleted')
assert typ == 'NO', (typ, data)
assert m.logout()[0] == 'BYE'
"#
    );
    let out = tokio::task::spawn_blocking(move || python(&script))
        .await
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let line = |prefix: &str| -> &str {
        lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{out}"))
    };
    assert_eq!(line("exists "), "exists 3");
    assert_eq!(line("all "), "all 1 2 3");
    assert_eq!(line("subject "), "subject 2");
    assert_eq!(line("body "), "body 3");
    assert_eq!(line("or "), "or 1 3");
    assert_eq!(line("unseen "), "unseen 1 2 3");
    assert!(
        line("peek ").contains("|Subject: two|From: bob@example.org||second line 1|second line 2|"),
        "{out}"
    );
    assert_eq!(line("still unseen "), "still unseen 1 2 3");
    assert_eq!(line("text "), "text first|.starts with a dot|");
    assert!(line("seen now ").contains("\\Seen"), "{out}");
    assert_eq!(line("fields "), "fields Subject: three||");
    let envelope = line("envelope ");
    assert!(envelope.contains("\"three\""), "{envelope}");
    assert!(
        envelope.contains("((NIL NIL \"bob\" \"example.org\"))"),
        "{envelope}"
    );
    assert!(
        envelope.contains("BODYSTRUCTURE (\"TEXT\" \"PLAIN\""),
        "{envelope}"
    );
    assert!(envelope.contains("INTERNALDATE \""), "{envelope}");
    assert_eq!(line("flagged "), "flagged 2");
    assert_eq!(line("keyword "), "keyword 2");
    assert!(line("copyuid ").contains("1:2"), "{out}");
    assert!(line("status ").contains("MESSAGES 3"), "{out}");
    assert_eq!(line("after move "), "after move 1 2");
    assert_eq!(line("after expunge "), "after expunge 1");
    assert_eq!(line("archive "), "archive 1 2 3 4");
    let subjects = line("archive subjects ");
    for s in ["one", "two", "three", "appended"] {
        assert!(subjects.contains(&format!("Subject: {s}")), "{subjects}");
    }
}

/// A raw IMAP connection for transcripts.
struct Raw {
    r: BufReader<tokio::io::ReadHalf<TcpStream>>,
    w: tokio::io::WriteHalf<TcpStream>,
}

impl Raw {
    async fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (r, w) = tokio::io::split(s);
        let mut raw = Self {
            r: BufReader::new(r),
            w,
        };
        let greeting = raw.line().await;
        assert!(
            greeting.starts_with("* OK [CAPABILITY IMAP4REV1 "),
            "{greeting}"
        );
        raw
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line))
            .await
            .expect("a reply within 10 s")
            .unwrap();
        line
    }

    async fn send(&mut self, raw: &str) {
        self.w.write_all(raw.as_bytes()).await.unwrap();
    }

    /// Sends a command and collects lines until the one starting with `tag `.
    async fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(&format!("{tag} {command}\r\n")).await;
        self.until(tag).await
    }

    async fn until(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            assert!(!line.is_empty(), "connection closed after {lines:?}");
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    async fn login(port: u16) -> Self {
        let mut raw = Self::connect(port).await;
        let r = raw.cmd("l", "LOGIN alice@acme.test pw").await;
        assert!(r.last().unwrap().starts_with("l OK"), "{r:?}");
        raw
    }
}

fn last(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or_default()
}

/// RFC 3501 §2.3.2: a message is `\Recent` to exactly one IMAP4rev1 session, the
/// first to learn of it, on whichever pod; EXAMINE shows it without taking it
/// (§6.3.2); STATUS counts what no session was told about; IMAP4rev2 never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_goes_to_exactly_one_session_across_pods() {
    let site = site().await;
    let (one, _) = pod(&site, plaintext()).await;
    let (two, _) = pod(&site, plaintext()).await;
    let recent = |r: &[String]| -> Option<u32> {
        r.iter().find_map(|l| {
            l.strip_prefix("* ")?
                .strip_suffix(" RECENT\r\n")?
                .parse()
                .ok()
        })
    };
    let mut status = Raw::login(two).await;
    let r = status.cmd("s1", "STATUS INBOX (MESSAGES RECENT)").await;
    assert_eq!(r[0], "* STATUS INBOX (MESSAGES 3 RECENT 3)\r\n", "{r:?}");
    // EXAMINE sees the three as recent and takes nothing.
    let mut examine = Raw::login(two).await;
    let r = examine.cmd("e1", "EXAMINE INBOX").await;
    assert_eq!(recent(&r), Some(3), "{r:?}");
    let r = status.cmd("s2", "STATUS INBOX (RECENT)").await;
    assert_eq!(r[0], "* STATUS INBOX (RECENT 3)\r\n", "{r:?}");
    // The first SELECT takes them: FLAGS and SEARCH say so.
    let mut a = Raw::login(one).await;
    let r = a.cmd("a1", "SELECT INBOX").await;
    assert_eq!(recent(&r), Some(3), "{r:?}");
    let r = a.cmd("a2", "FETCH 1 FLAGS").await;
    assert!(r[0].contains("\\Recent"), "{r:?}");
    let r = a.cmd("a3", "SEARCH RECENT").await;
    assert_eq!(r[0], "* SEARCH 1 2 3\r\n", "{r:?}");
    let r = status.cmd("s3", "STATUS INBOX (RECENT)").await;
    assert_eq!(r[0], "* STATUS INBOX (RECENT 0)\r\n", "{r:?}");
    // A second SELECT, on the other pod, gets none of them.
    let mut b = Raw::login(two).await;
    let r = b.cmd("b1", "SELECT INBOX").await;
    assert_eq!(recent(&r), Some(0), "{r:?}");
    let r = b.cmd("b2", "SEARCH NEW").await;
    assert_eq!(r[0], "* SEARCH\r\n", "{r:?}");
    let r = b.cmd("b3", "SEARCH OLD").await;
    assert_eq!(r[0], "* SEARCH 1 2 3\r\n", "{r:?}");
    let r = b.cmd("b4", "FETCH 1 FLAGS").await;
    assert!(!r[0].contains("\\Recent"), "{r:?}");
    // A new message goes to exactly one of the two selected sessions.
    deliver(&site, "recent/4", "Subject: fresh\r\n\r\nnew\r\n").await;
    let mut told = Vec::new();
    for (c, base) in [(&mut a, 3u32), (&mut b, 0)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let count = loop {
            let r = c.cmd("n", "NOOP").await;
            if r.iter().any(|l| l == "* 4 EXISTS\r\n") {
                break recent(&r).expect("RECENT follows EXISTS");
            }
            assert!(std::time::Instant::now() < deadline, "never told: {r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        told.push(count - base);
    }
    told.sort_unstable();
    assert_eq!(
        told,
        [0, 1],
        "exactly one session has the new message as recent"
    );
    let r = status.cmd("s4", "STATUS INBOX (RECENT)").await;
    assert_eq!(r[0], "* STATUS INBOX (RECENT 0)\r\n", "{r:?}");
    // The EXAMINE session learned of it too, and was shown nothing more than
    // what was still unclaimed when it looked.
    let r = examine.cmd("e2", "SEARCH RECENT").await;
    assert!(r.iter().any(|l| l == "* SEARCH 1 2 3\r\n"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_of_the_edges() {
    let site = site().await;
    let (plain, _) = pod(&site, plaintext()).await;
    let (strict, _) = pod(&site, ImapConfig::default()).await;

    // Without TLS the strict pod refuses credentials, whatever the mechanism.
    let mut c = Raw::connect(strict).await;
    let r = c.cmd("a", "LOGIN alice@acme.test pw").await;
    assert!(last(&r).starts_with("a NO [PRIVACYREQUIRED]"), "{r:?}");
    let r = c
        .cmd("b", "AUTHENTICATE PLAIN AGFsaWNlQGFjbWUudGVzdABwdw==")
        .await;
    assert!(last(&r).starts_with("b NO [PRIVACYREQUIRED]"), "{r:?}");
    let r = c.cmd("c", "SELECT INBOX").await;
    assert!(last(&r).starts_with("c BAD"), "{r:?}");
    // ID works before authentication (RFC 2971 §3.1).
    let r = c.cmd("d", "ID (\"name\" \"test\")").await;
    assert!(r[0].starts_with("* ID (\"name\" \"mailmesh\""), "{r:?}");
    assert!(last(&r).starts_with("d OK"), "{r:?}");

    let mut c = Raw::connect(plain).await;
    // Garbage, unknown commands, bad sequence sets, deep nesting: BAD, session lives.
    let r = c.cmd("a", "FROBNICATE").await;
    assert!(last(&r).starts_with("a BAD"), "{r:?}");
    c.send("\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("* BAD"), "{r}");
    // AUTHENTICATE PLAIN with a continuation, then SASL-IR.
    c.send("b AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ \r\n");
    let r = {
        c.send("AGFsaWNlQGFjbWUudGVzdAB3cm9uZw==\r\n").await;
        c.until("b").await
    };
    assert!(last(&r).starts_with("b NO [AUTHENTICATIONFAILED]"), "{r:?}");
    c.send("c AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ \r\n");
    c.send("*\r\n").await;
    let r = c.until("c").await;
    assert!(last(&r).starts_with("c BAD"), "{r:?}");
    let r = c
        .cmd("d", "AUTHENTICATE PLAIN AGFsaWNlQGFjbWUudGVzdABwdw==")
        .await;
    assert!(last(&r).starts_with("d OK [CAPABILITY IMAP4REV1 "), "{r:?}");
    let r = c.cmd("e", "LOGIN alice@acme.test pw").await;
    assert!(last(&r).starts_with("e BAD"), "{r:?}");
    let r = c.cmd("f", "FETCH 1 FLAGS").await;
    assert!(last(&r).starts_with("f BAD"), "no mailbox selected: {r:?}");
    let r = c.cmd("g", "SELECT INBOX").await;
    assert!(r.iter().any(|l| l == "* 3 EXISTS\r\n"), "{r:?}");
    assert!(
        r.iter().any(|l| l.starts_with("* OK [UIDVALIDITY ")),
        "{r:?}"
    );
    assert!(r.iter().any(|l| l.starts_with("* OK [UIDNEXT 4]")), "{r:?}");
    assert!(last(&r).starts_with("g OK [READ-WRITE]"), "{r:?}");
    let r = c.cmd("h", "FETCH 9 FLAGS").await;
    assert!(last(&r).starts_with("h BAD"), "{r:?}");
    let r = c.cmd("i", "FETCH 0:2 FLAGS").await;
    assert!(last(&r).starts_with("i BAD"), "{r:?}");
    let nested = format!("j SEARCH {}ALL{}", "(".repeat(200), ")".repeat(200));
    let r = c.cmd("j", &nested[2..]).await;
    assert!(
        last(&r).starts_with("j BAD") || last(&r).starts_with("j OK"),
        "{r:?}"
    );
    let r = c.cmd("k", "UID FETCH 2:* (UID RFC822.SIZE)").await;
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(r[0].starts_with("* 2 FETCH (UID 2 RFC822.SIZE "), "{r:?}");
    // Partial fetch: <start.length> of the body.
    let r = c.cmd("l", "FETCH 1 BODY.PEEK[TEXT]<0.5>").await;
    assert_eq!(r[0], "* 1 FETCH (BODY[TEXT]<0> \"first\")\r\n");
    // A literal larger than allowed is refused before it is sent.
    c.send("m APPEND INBOX {999999999}\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("m NO [TOOBIG]"), "{r}");
    // LITERAL+: the client does not wait; the bytes are read and dropped.
    let r = c.cmd("n", "APPEND INBOX {10+}\r\n0123456789").await;
    assert!(last(&r).starts_with("n OK [APPENDUID "), "{r:?}");
    assert!(
        r.iter().any(|l| l == "* 4 EXISTS\r\n"),
        "our own APPEND shows up: {r:?}"
    );
    // CONDSTORE: STORE ... UNCHANGEDSINCE and MODSEQ.
    let r = c.cmd("o", "FETCH 1 (MODSEQ)").await;
    // The first command using MODSEQ tells the mailbox's HIGHESTMODSEQ first.
    assert!(r[0].starts_with("* OK [HIGHESTMODSEQ "), "{r:?}");
    let modseq: u64 = r[1]
        .split("MODSEQ (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{r:?}"));
    let r = c
        .cmd(
            "p",
            &format!("STORE 1 (UNCHANGEDSINCE {modseq}) +FLAGS (\\Answered)"),
        )
        .await;
    assert!(last(&r).starts_with("p OK"), "{r:?}");
    let r = c
        .cmd(
            "q",
            &format!("STORE 1 (UNCHANGEDSINCE {modseq}) +FLAGS (\\Draft)"),
        )
        .await;
    assert!(last(&r).starts_with("q OK [MODIFIED 1]"), "{r:?}");
    let r = c.cmd("r", "SEARCH CHARSET KOI8-R ALL").await;
    assert!(last(&r).starts_with("r NO [BADCHARSET"), "{r:?}");
    let r = c.cmd("s", "NAMESPACE").await;
    assert_eq!(r[0], "* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
    let r = c.cmd("t", "GETQUOTAROOT INBOX").await;
    assert!(r[0].starts_with("* QUOTAROOT INBOX \"\""), "{r:?}");
    let r = c.cmd("u", "STATUS INBOX (MESSAGES UNSEEN SIZE)").await;
    assert!(
        r[0].starts_with("* STATUS INBOX (MESSAGES 4 UNSEEN "),
        "{r:?}"
    );
    // A message fetched without PEEK reports its new \Seen even without FLAGS.
    let r = c.cmd("y1", "FETCH 3 BODY[TEXT]").await;
    assert!(
        r.iter().any(|l| l.contains("FLAGS (\\Recent \\Seen)")),
        "{r:?}"
    );
    let r = c.cmd("v", "CREATE INBOX").await;
    assert!(last(&r).starts_with("v NO"), "{r:?}");
    let r = c.cmd("w", "SELECT Nowhere").await;
    assert!(last(&r).starts_with("w NO [NONEXISTENT]"), "{r:?}");
    let r = c.cmd("x", "FETCH 1 FLAGS").await;
    assert!(
        last(&r).starts_with("x BAD"),
        "a failed SELECT deselects: {r:?}"
    );
    let r = c.cmd("y", "LOGOUT").await;
    assert!(r[0].starts_with("* BYE"), "{r:?}");

    // A selected mailbox deleted by another session ends the session with BYE.
    let mut c = Raw::login(plain).await;
    let mut other = Raw::login(plain).await;
    other.cmd("c", "CREATE Doomed").await;
    c.cmd("s", "SELECT Doomed").await;
    let r = other.cmd("d", "DELETE Doomed").await;
    assert!(last(&r).starts_with("d OK"), "{r:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send("n NOOP\r\n").await;
    let line = c.line().await;
    assert!(line.starts_with("* BYE"), "{line}");
    assert!(c.line().await.starts_with("n OK"));
    assert_eq!(c.line().await, "", "and the connection closes");

    // An endless line is cut off: memory stays bounded.
    let mut c = Raw::connect(plain).await;
    c.send(&format!("a LOGIN {}", "x".repeat(200_000))).await;
    let line = c.line().await;
    assert!(line.starts_with("* BYE"), "{line}");

    // Too many errors end the session with BYE.
    let mut c = Raw::connect(plain).await;
    let mut bye = false;
    for i in 0..30 {
        c.send(&format!("e{i} NONSENSE\r\n")).await;
        let line = c.line().await;
        if line.starts_with("* BYE") {
            bye = true;
            break;
        }
    }
    assert!(bye, "the session must close after too many errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_on_one_pod_sees_changes_made_through_another_and_new_mail() {
    let site = site().await;
    let (a, _) = pod(&site, plaintext()).await;
    let (b, _) = pod(&site, plaintext()).await;
    let mut watcher = Raw::login(b).await;
    watcher.cmd("s", "SELECT INBOX").await;
    watcher.send("i IDLE\r\n").await;
    assert_eq!(watcher.line().await, "+ idling\r\n");

    let mut changer = Raw::login(a).await;
    changer.cmd("s", "SELECT INBOX").await;
    let started = Instant::now();
    let r = changer.cmd("f", "STORE 2 +FLAGS.SILENT (\\Flagged)").await;
    assert!(last(&r).starts_with("f OK"), "{r:?}");
    let line = watcher.line().await;
    // The watcher selected first: the three messages are recent to it.
    assert!(
        line.starts_with("* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))"),
        "{line}"
    );
    let flag_seen = started.elapsed();

    deliver(&site, "idle/1", "Subject: four\r\n\r\nnew\r\n").await;
    assert_eq!(watcher.line().await, "* 4 EXISTS\r\n");
    let r = changer.cmd("x", "STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    assert!(last(&r).starts_with("x OK"), "{r:?}");
    changer.cmd("y", "EXPUNGE").await;
    // The flag change and then the expunge reach the idler.
    let mut saw_expunge = false;
    for _ in 0..4 {
        let line = watcher.line().await;
        if line == "* 1 EXPUNGE\r\n" {
            saw_expunge = true;
            break;
        }
    }
    assert!(saw_expunge, "EXPUNGE from the other pod reaches IDLE");
    watcher.send("DONE\r\n").await;
    let r = watcher.until("i").await;
    assert!(last(&r).starts_with("i OK"), "{r:?}");
    let r = watcher.cmd("n", "SEARCH ALL").await;
    assert_eq!(r[0], "* SEARCH 1 2 3\r\n");
    println!("flag change seen through the other pod after {flag_seen:?}");
    // The sessions caught up from the changes since their view, never by listing
    // the mailbox again.
    assert!(refreshes("refresh_changes") >= 2.0);
    assert_eq!(refreshes("refresh_listing"), 0.0);
}

/// A message another session expunged still exists for a session not yet told
/// (RFC 2180 §4.1): its FETCH gets the data, not `NO [EXPUNGEISSUED]` (storage
/// keeps the object for `expunged_retention`); the EXPUNGE comes at its next NOOP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_not_yet_told_of_an_expunge_still_fetches_the_message() {
    let site = site().await;
    let (a, _) = pod(&site, plaintext()).await;
    let (b, _) = pod(&site, plaintext()).await;
    let mut reader = Raw::login(a).await;
    reader.cmd("s", "SELECT INBOX").await;
    let mut expunger = Raw::login(b).await;
    expunger.cmd("s", "SELECT INBOX").await;
    let r = expunger.cmd("x", "STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    assert!(last(&r).starts_with("x OK"), "{r:?}");
    let r = expunger.cmd("y", "EXPUNGE").await;
    assert_eq!(r[0], "* 1 EXPUNGE\r\n", "{r:?}");
    // The reader's own change notice has arrived by now or soon: either way its
    // view still has message 1 until it may announce the expunge.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = reader
        .cmd("f", "FETCH 1 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        .await;
    assert!(last(&r).starts_with("f OK"), "{r:?}");
    assert!(r[0].starts_with("* 1 FETCH (UID 1 "), "{r:?}");
    assert!(r.concat().contains("Subject: "), "{r:?}");
    let r = reader.cmd("n", "NOOP").await;
    assert!(r.contains(&"* 1 EXPUNGE\r\n".to_owned()), "{r:?}");
}

/// How often this process's IMAP sessions caught up with their mailbox one way.
fn refreshes(how: &str) -> f64 {
    mailmesh_kit::metrics::render()
        .lines()
        .filter(|l| l.starts_with("mailmesh_gateway_events_total") && l.contains(how))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `mailmesh_gateway_watch_streams` of this process's registry (one pod per test).
fn watch_streams() -> String {
    mailmesh_kit::metrics::render()
        .lines()
        .find(|l| l.starts_with("mailmesh_gateway_watch_streams "))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_one_user_share_one_change_stream() {
    let site = site().await;
    let (a, _) = pod(&site, plaintext()).await;
    let mut idlers = Vec::new();
    for i in 0..3 {
        let mut c = Raw::login(a).await;
        c.cmd("s", "SELECT INBOX").await;
        c.send(&format!("i{i} IDLE\r\n")).await;
        assert_eq!(c.line().await, "+ idling\r\n");
        idlers.push(c);
    }
    assert_eq!(watch_streams(), "mailmesh_gateway_watch_streams 1");
    deliver(&site, "shared/1", "Subject: four\r\n\r\nnew\r\n").await;
    for c in &mut idlers {
        assert_eq!(c.line().await, "* 4 EXISTS\r\n");
        // IMAP4rev1 sessions: one of them has it as \Recent.
        assert!(c.line().await.ends_with(" RECENT\r\n"));
    }
    // One leaves; the others are still told, through the same stream.
    let mut gone = idlers.remove(0);
    gone.send("DONE\r\n").await;
    let r = gone.until("i0").await;
    assert!(last(&r).starts_with("i0 OK"), "{r:?}");
    gone.cmd("l", "LOGOUT").await;
    drop(gone);
    deliver(&site, "shared/2", "Subject: five\r\n\r\nnew\r\n").await;
    for c in &mut idlers {
        assert_eq!(c.line().await, "* 5 EXISTS\r\n");
        assert!(c.line().await.ends_with(" RECENT\r\n"));
    }
    // When the last session of the user ends, the stream is closed.
    for (i, mut c) in idlers.into_iter().enumerate() {
        c.send("DONE\r\n").await;
        c.until(&format!("i{}", i + 1)).await;
        c.cmd("l", "LOGOUT").await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while watch_streams() != "mailmesh_gateway_watch_streams 0" {
        assert!(Instant::now() < deadline, "{}", watch_streams());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new session starts a new stream and is told of new mail again.
    let mut c = Raw::login(a).await;
    c.cmd("s", "SELECT INBOX").await;
    c.send("i IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling\r\n");
    deliver(&site, "shared/3", "Subject: six\r\n\r\nnew\r\n").await;
    assert_eq!(c.line().await, "* 6 EXISTS\r\n");
    assert_eq!(watch_streams(), "mailmesh_gateway_watch_streams 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_over_implicit_tls_and_starttls() {
    let site = site().await;
    let (plain, tls) = pod(&site, ImapConfig::default()).await;
    let out = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-k", "--max-time", "20"])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "curl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let user = ["-u", "alice@acme.test:pw"];
        let one = run(&[
            &format!("imaps://127.0.0.1:{tls}/INBOX;UID=1"),
            user[0],
            user[1],
        ]);
        let listing = run(&[&format!("imaps://127.0.0.1:{tls}/"), user[0], user[1]]);
        let two = run(&[
            "--ssl-reqd",
            &format!("imap://127.0.0.1:{plain}/INBOX;UID=2"),
            user[0],
            user[1],
        ]);
        let search = run(&[
            "--ssl-reqd",
            &format!("imap://127.0.0.1:{plain}/INBOX"),
            "-X",
            "SEARCH SUBJECT three",
            user[0],
            user[1],
        ]);
        (one, listing, two, search)
    })
    .await
    .unwrap();
    assert!(
        out.0.contains("Subject: one") && out.0.contains("first"),
        "{}",
        out.0
    );
    assert!(
        out.1.contains("INBOX") && out.1.contains("Sent"),
        "{}",
        out.1
    );
    assert!(out.2.contains("Subject: two"), "{}", out.2);
    assert_eq!(out.3.trim(), "* SEARCH 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mbsync_syncs_a_mailbox_both_ways() {
    let site = site().await;
    let (_, tls) = pod(&site, ImapConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("mail");
    std::fs::create_dir_all(&local).unwrap();
    let rc = dir.path().join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount acme\nHost 127.0.0.1\nPort {tls}\nUser alice@acme.test\nPass pw\n\
             SSLType IMAPS\nCertificateFile {}\nSystemCertificates no\n\n\
             IMAPStore remote\nAccount acme\n\n\
             MaildirStore local\nPath {}/\nInbox {}/INBOX\n\n\
             Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\nCreate Near\nExpunge Both\nSyncState *\n",
            site.cert.display(),
            local.display(),
            local.display()
        ),
    )
    .unwrap();
    let mbsync = |rc: std::path::PathBuf| {
        let out = std::process::Command::new("mbsync")
            .args(["-c", rc.to_str().unwrap(), "-a"])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, log) = tokio::task::spawn_blocking({
        let rc = rc.clone();
        move || mbsync(rc)
    })
    .await
    .unwrap();
    assert!(ok, "mbsync pull: {log}");
    let cur = local.join("INBOX").join("cur");
    let new = local.join("INBOX").join("new");
    let files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let pulled: Vec<_> = files(&cur).into_iter().chain(files(&new)).collect();
    assert_eq!(pulled.len(), 3, "{log}");
    let bodies: Vec<String> = pulled
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        bodies.iter().any(|b| b.contains("Subject: two")),
        "{bodies:?}"
    );

    // Push: a new local message goes up; a locally deleted one goes away remotely.
    std::fs::write(
        new.join("1700000000.local.host"),
        "Subject: from mbsync\r\n\r\nlocal\r\n",
    )
    .unwrap();
    let victim = pulled
        .iter()
        .find(|p| std::fs::read_to_string(p).unwrap().contains("Subject: one"))
        .unwrap();
    // Maildir flag T (trashed) = \Deleted; with Expunge Both it is removed everywhere.
    let trashed = format!(
        "{}{}",
        victim.display(),
        if victim.to_string_lossy().contains(":2,") {
            "T"
        } else {
            ":2,T"
        }
    );
    std::fs::rename(victim, &trashed).unwrap();
    let (ok, log) = tokio::task::spawn_blocking(move || mbsync(rc))
        .await
        .unwrap();
    assert!(ok, "mbsync push: {log}");
    let remote = site
        .engine
        .read_index(&site.alice, |i| {
            i.and_then(|i| i.mailbox("INBOX"))
                .map(|m| m.messages.len())
                .unwrap_or_default()
        })
        .await
        .unwrap();
    assert_eq!(remote, 3, "one pushed, one expunged: {log}");
    let mut c = {
        let (plain, _) = pod(&site, plaintext()).await;
        Raw::login(plain).await
    };
    c.cmd("s", "SELECT INBOX").await;
    let r = c.cmd("f", "SEARCH SUBJECT mbsync").await;
    assert_eq!(r[0], "* SEARCH 3\r\n", "{r:?}");
    let r = c.cmd("g", "SEARCH SUBJECT one").await;
    assert_eq!(r[0], "* SEARCH\r\n", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_of_esearch_list_extended_names_and_imap4rev2() {
    let site = site().await;
    let (plain, _) = pod(&site, plaintext()).await;
    let mut c = Raw::login(plain).await;
    let r = c.cmd("a", "CAPABILITY").await;
    for cap in [
        "ESEARCH",
        "SEARCHRES",
        "LIST-EXTENDED",
        "LIST-STATUS",
        "IMAP4rev2",
        "BINARY",
        "QRESYNC",
    ] {
        assert!(r[0].contains(&format!(" {cap}")), "{cap}: {r:?}");
    }
    // A non-ASCII name from an IMAP4rev1 client is modified UTF-7 on the wire and
    // UTF-8 in storage.
    let r = c.cmd("b", "CREATE Entw&APw-rfe/2026").await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");
    let names = site
        .engine
        .read_index(&site.alice, |i| {
            i.map(|i| i.mailboxes().map(|m| m.name.clone()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .await
        .unwrap();
    assert!(names.iter().any(|n| n == "Entwürfe/2026"), "{names:?}");
    // CREATE does not subscribe (RFC 3501 §6.3.6: subscriptions are the client's).
    let r = c.cmd("c", "LIST \"\" \"Entw&APw-rfe/*\"").await;
    assert_eq!(r[0], "* LIST (\\HasNoChildren) \"/\" Entw&APw-rfe/2026\r\n");
    let r = c.cmd("c2", "SUBSCRIBE Entw&APw-rfe/2026").await;
    assert!(last(&r).starts_with("c2 OK"), "{r:?}");
    let r = c.cmd("c3", "LIST \"\" \"Entw&APw-rfe/*\"").await;
    assert_eq!(
        r[0],
        "* LIST (\\HasNoChildren \\Subscribed) \"/\" Entw&APw-rfe/2026\r\n"
    );
    let r = c.cmd("d", "UNSUBSCRIBE Entw&APw-rfe/2026").await;
    assert!(last(&r).starts_with("d OK"), "{r:?}");
    // LIST-EXTENDED selection and LIST-STATUS return options.
    let r = c
        .cmd(
            "e",
            "LIST (SUBSCRIBED) \"\" \"*\" RETURN (CHILDREN STATUS (MESSAGES UIDNEXT))",
        )
        .await;
    let lists: Vec<&String> = r.iter().filter(|l| l.starts_with("* LIST")).collect();
    assert!(
        lists.iter().all(|l| l.contains("\\Subscribed")),
        "only subscribed ones: {r:?}"
    );
    assert!(
        r.iter()
            .any(|l| l == "* STATUS INBOX (MESSAGES 3 UIDNEXT 4)\r\n"),
        "{r:?}"
    );
    assert!(!r.iter().any(|l| l.contains("Entw")), "unsubscribed: {r:?}");
    let r = c.cmd("f", "LIST (SPECIAL-USE) \"\" \"*\"").await;
    assert!(
        r.iter()
            .filter(|l| l.starts_with("* LIST"))
            .all(|l| l.contains("\\Sent")
                || l.contains("\\Junk")
                || l.contains("\\Trash")
                || l.contains("\\Drafts")
                || l.contains("\\Archive")),
        "{r:?}"
    );
    assert!(!r.iter().any(|l| l.contains("INBOX")), "{r:?}");
    // Several patterns in one LIST (RFC 5258 §3): each match once.
    let r = c.cmd("l1", "LIST \"\" (INBOX \"Sen*\" inbox)").await;
    let names: Vec<&String> = r.iter().filter(|l| l.starts_with("* LIST")).collect();
    assert_eq!(names.len(), 2, "{r:?}");
    assert!(
        names[0].ends_with(" INBOX\r\n") || names[1].ends_with(" INBOX\r\n"),
        "{r:?}"
    );
    assert!(names.iter().any(|l| l.ends_with(" Sent\r\n")), "{r:?}");
    // Unknown options and RECURSIVEMATCH alone are BAD.
    for (t, command) in [
        ("l2", "LIST (FOO) \"\" *"),
        ("l3", "LIST (RECURSIVEMATCH) \"\" *"),
        ("l4", "LIST \"\" * RETURN (BOGUS)"),
    ] {
        let r = c.cmd(t, command).await;
        assert!(
            last(&r).starts_with(&format!("{t} BAD")),
            "{command}: {r:?}"
        );
    }
    // RECURSIVEMATCH: a name not subscribed itself, with a subscribed mailbox below
    // it, is listed with CHILDINFO; without RECURSIVEMATCH it is not.
    c.cmd("r1", "CREATE Projekt/Alpha").await;
    c.cmd("r2", "CREATE Projekt").await;
    let r = c.cmd("r3", "SUBSCRIBE Projekt/Alpha").await;
    assert!(last(&r).starts_with("r3 OK"), "{r:?}");
    let r = c.cmd("r4", "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" %").await;
    assert!(
        r.iter()
            .any(|l| l
                == "* LIST (\\HasChildren) \"/\" Projekt (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n"),
        "{r:?}"
    );
    assert!(
        !r.iter().any(|l| l.contains("Projekt/Alpha")),
        "% stops at the level: {r:?}"
    );
    let r = c.cmd("r5", "LIST (SUBSCRIBED) \"\" %").await;
    assert!(!r.iter().any(|l| l.contains("Projekt")), "{r:?}");
    // Subscriptions are names (RFC 3501 §6.3.6): one without a mailbox is taken,
    // listed as \NonExistent (\Noselect in LSUB), and DELETE keeps it.
    let r = c.cmd("s1", "SUBSCRIBE Nowhere/Deep").await;
    assert!(last(&r).starts_with("s1 OK"), "{r:?}");
    let r = c.cmd("s2", "LIST (SUBSCRIBED) \"\" \"Nowhere*\"").await;
    assert_eq!(
        r[0], "* LIST (\\NonExistent \\Subscribed) \"/\" Nowhere/Deep\r\n",
        "{r:?}"
    );
    let r = c.cmd("s3", "LSUB \"\" \"Nowhere*\"").await;
    assert_eq!(r[0], "* LSUB (\\Noselect) \"/\" Nowhere/Deep\r\n", "{r:?}");
    let r = c.cmd("s4", "LIST \"\" \"Nowhere*\"").await;
    assert!(last(&r).starts_with("s4 OK") && r.len() == 1, "{r:?}");
    let r = c
        .cmd("s5", "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" Nowhere")
        .await;
    assert_eq!(
        r[0], "* LIST (\\NonExistent) \"/\" Nowhere (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n",
        "{r:?}"
    );
    c.cmd("s6", "CREATE Gone").await;
    c.cmd("s7", "SUBSCRIBE Gone").await;
    let r = c.cmd("s8", "DELETE Gone").await;
    assert!(last(&r).starts_with("s8 OK"), "{r:?}");
    let r = c.cmd("s9", "LIST (SUBSCRIBED) \"\" Gone").await;
    assert_eq!(
        r[0], "* LIST (\\NonExistent \\Subscribed) \"/\" Gone\r\n",
        "{r:?}"
    );
    // `%` lists the levels that are only above mailboxes (RFC 3501 §6.3.8), and
    // LSUB the levels above subscribed names that are not subscribed themselves
    // (§6.3.9), as \Noselect; `*` lists mailboxes only.
    c.cmd("p1", "CREATE Level/Leaf").await;
    c.cmd("p2", "SUBSCRIBE Level/Leaf").await;
    let r = c.cmd("p3", "LIST \"\" Lev%").await;
    assert_eq!(
        r,
        [
            "* LIST (\\Noselect \\HasChildren) \"/\" Level\r\n",
            "p3 OK LIST completed\r\n"
        ],
        "{r:?}"
    );
    let r = c.cmd("p4", "LIST \"\" Level/%").await;
    assert_eq!(
        r[0], "* LIST (\\HasNoChildren \\Subscribed) \"/\" Level/Leaf\r\n",
        "{r:?}"
    );
    assert_eq!(r.len(), 2, "{r:?}");
    let r = c.cmd("p5", "LIST \"\" Lev*").await;
    assert_eq!(r.len(), 2, "{r:?}");
    let r = c.cmd("p6", "LSUB \"\" Lev%").await;
    assert_eq!(
        r,
        [
            "* LSUB (\\Noselect) \"/\" Level\r\n",
            "p6 OK LSUB completed\r\n"
        ],
        "{r:?}"
    );
    // ESEARCH with RETURN options.
    c.cmd("g", "SELECT INBOX").await;
    c.cmd("h", "STORE 2 +FLAGS (\\Seen)").await;
    let r = c.cmd("i", "SEARCH RETURN (MIN MAX COUNT) UNSEEN").await;
    assert_eq!(r[0], "* ESEARCH (TAG \"i\") MIN 1 MAX 3 COUNT 2\r\n");
    let r = c.cmd("j", "UID SEARCH RETURN () ALL").await;
    assert_eq!(r[0], "* ESEARCH (TAG \"j\") UID ALL 1:3\r\n");
    let r = c
        .cmd("k", "SEARCH RETURN (COUNT) SUBJECT nothing-matches")
        .await;
    assert_eq!(r[0], "* ESEARCH (TAG \"k\") COUNT 0\r\n");
    let r = c.cmd("l", "SEARCH UNSEEN").await;
    assert_eq!(r[0], "* SEARCH 1 3\r\n");
    // SEARCHRES: RETURN (SAVE) and `$`.
    let r = c.cmd("q1", "SEARCH RETURN (SAVE) UNSEEN").await;
    assert_eq!(
        r,
        ["q1 OK SEARCH completed\r\n"],
        "SAVE alone answers nothing"
    );
    let r = c.cmd("q2", "FETCH $ (UID)").await;
    assert_eq!(r[..2], ["* 1 FETCH (UID 1)\r\n", "* 3 FETCH (UID 3)\r\n"]);
    let r = c.cmd("q3", "UID SEARCH UID $").await;
    assert_eq!(r[0], "* SEARCH 1 3\r\n");
    let r = c.cmd("q4", "SEARCH RETURN (SAVE MIN) ALL").await;
    assert_eq!(r[0], "* ESEARCH (TAG \"q4\") MIN 1\r\n");
    let r = c.cmd("q5", "UID FETCH $ (FLAGS)").await;
    assert_eq!(r.len(), 2, "only the minimum was saved: {r:?}");
    c.cmd("q6", "SEARCH RETURN (SAVE) SUBJECT nothing-matches")
        .await;
    let r = c.cmd("q7", "STORE $ +FLAGS (\\Flagged)").await;
    assert_eq!(r, ["q7 OK No messages\r\n"]);
    let r = c.cmd("q8", "SEARCH $").await;
    assert_eq!(r[0], "* SEARCH\r\n");
    // IMAP4rev2: ESEARCH for every SEARCH, no RECENT, UTF-8 names.
    let r = c.cmd("m", "ENABLE IMAP4rev2").await;
    assert_eq!(r[0], "* ENABLED IMAP4rev2\r\n");
    let r = c.cmd("n", "SEARCH UNSEEN").await;
    assert_eq!(r[0], "* ESEARCH (TAG \"n\") ALL 1,3\r\n");
    let r = c.cmd("o", "SELECT INBOX").await;
    assert!(!r.iter().any(|l| l.contains("RECENT")), "{r:?}");
    let r = c.cmd("p", "LIST \"\" \"Entw*\"").await;
    // UTF-8 goes out as a literal (valid in both revisions).
    assert_eq!(r[0], "* LIST (\\HasNoChildren) \"/\" {14}\r\n");
    assert_eq!(r[1], "Entwürfe/2026\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_of_qresync() {
    let site = site().await;
    let (plain, _) = pod(&site, plaintext()).await;
    let mut fresh = Raw::login(plain).await;
    let r = fresh.cmd("a", "SELECT INBOX (QRESYNC (1 1))").await;
    assert!(
        last(&r).starts_with("a BAD"),
        "QRESYNC must be enabled first: {r:?}"
    );

    let mut c = Raw::login(plain).await;
    let r = c.cmd("a", "ENABLE QRESYNC").await;
    assert_eq!(r[0], "* ENABLED QRESYNC\r\n");
    let r = c.cmd("b", "SELECT INBOX").await;
    let code = |r: &[String], name: &str| -> u64 {
        r.iter()
            .find_map(|l| l.split(&format!("[{name} ")).nth(1))
            .and_then(|s| s.split(']').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {r:?}"))
    };
    let validity = code(&r, "UIDVALIDITY");
    let modseq = code(&r, "HIGHESTMODSEQ");
    c.cmd("c", "STORE 1 +FLAGS.SILENT (\\Flagged)").await;
    c.cmd("d", "STORE 3 +FLAGS.SILENT (\\Deleted)").await;
    let r = c.cmd("e", "EXPUNGE").await;
    assert_eq!(r[0], "* VANISHED 3\r\n", "VANISHED replaces EXPUNGE: {r:?}");
    // Reconnecting with what the client knew: only the differences come back.
    let r = c
        .cmd(
            "f",
            &format!("SELECT INBOX (QRESYNC ({validity} {modseq} 1:3))"),
        )
        .await;
    assert!(
        r.iter().any(|l| l.starts_with("* OK [CLOSED]")),
        "the previous mailbox is closed first: {r:?}"
    );
    assert!(r.iter().any(|l| l == "* VANISHED (EARLIER) 3\r\n"), "{r:?}");
    assert!(
        r.iter()
            .any(|l| l.starts_with("* 1 FETCH (UID 1 FLAGS (\\Flagged) MODSEQ (")),
        "{r:?}"
    );
    assert!(
        !r.iter().any(|l| l.starts_with("* 2 FETCH")),
        "unchanged messages are not sent: {r:?}"
    );
    let r = c
        .cmd(
            "g",
            &format!("UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)"),
        )
        .await;
    assert_eq!(r[0], "* VANISHED (EARLIER) 3\r\n", "{r:?}");
    assert!(
        r[1].starts_with("* 1 FETCH (UID 1 FLAGS (\\Flagged) MODSEQ ("),
        "{r:?}"
    );
    assert!(last(&r).starts_with("g OK"), "{r:?}");
    let r = c
        .cmd(
            "h",
            &format!("FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)"),
        )
        .await;
    assert!(
        last(&r).starts_with("h BAD"),
        "VANISHED needs UID FETCH: {r:?}"
    );
    // RFC 7162 §3.1.5: with MIN or MAX alone, MODSEQ is that of the message
    // returned (message 1 was flagged above, message 2 never changed).
    let esearch_modseq = |r: &[String]| -> u64 {
        r[0].rsplit("MODSEQ ")
            .next()
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or_else(|| panic!("no MODSEQ in {r:?}"))
    };
    let min = c.cmd("m1", "SEARCH RETURN (MIN) MODSEQ 1").await;
    assert!(
        min[0].starts_with("* ESEARCH (TAG \"m1\") MIN 1 MODSEQ "),
        "{min:?}"
    );
    let max = c.cmd("m2", "SEARCH RETURN (MAX) MODSEQ 1").await;
    assert!(
        max[0].starts_with("* ESEARCH (TAG \"m2\") MAX 2 MODSEQ "),
        "{max:?}"
    );
    assert!(
        esearch_modseq(&max) < esearch_modseq(&min),
        "{min:?} {max:?}"
    );
    let both = c.cmd("m3", "SEARCH RETURN (MIN MAX) MODSEQ 1").await;
    assert_eq!(esearch_modseq(&both), esearch_modseq(&min), "{both:?}");
    let all = c.cmd("m4", "SEARCH RETURN (MAX COUNT) MODSEQ 1").await;
    assert_eq!(esearch_modseq(&all), esearch_modseq(&min), "{all:?}");
    // A different UIDVALIDITY: a plain SELECT, nothing resynchronised.
    let r = c.cmd("i", "SELECT INBOX (QRESYNC (999 1))").await;
    assert!(!r.iter().any(|l| l.contains("VANISHED")), "{r:?}");
    assert!(last(&r).starts_with("i OK"), "{r:?}");
}

/// RFC 7162 §3.1: CONDSTORE enabled while a mailbox is selected (by ENABLE, or by
/// a command using MODSEQ) brings the mailbox's HIGHESTMODSEQ with it, and the
/// first command using MODSEQ after it has it too; later ones do not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condstore_enabled_while_selected_tells_the_highest_modseq() {
    let site = site().await;
    let (plain, _) = pod(&site, plaintext()).await;
    let told = |r: &[String]| r.iter().any(|l| l.starts_with("* OK [HIGHESTMODSEQ "));
    let mut c = Raw::login(plain).await;
    c.cmd("s", "SELECT INBOX").await;
    let r = c.cmd("e", "ENABLE CONDSTORE").await;
    assert!(told(&r), "{r:?}");
    let r = c.cmd("f", "FETCH 1 (FLAGS MODSEQ)").await;
    assert!(told(&r), "{r:?}");
    assert!(
        r.iter()
            .any(|l| l.starts_with("* 1 FETCH (FLAGS (") && l.contains("MODSEQ (")),
        "{r:?}"
    );
    let r = c.cmd("g", "FETCH 1 (MODSEQ)").await;
    assert!(!told(&r), "{r:?}");

    // Without ENABLE: the first FETCH with MODSEQ enables it and tells.
    let mut d = Raw::login(plain).await;
    d.cmd("s", "SELECT INBOX").await;
    let r = d.cmd("f", "UID FETCH 1 (MODSEQ)").await;
    assert!(told(&r), "{r:?}");
    assert!(last(&r).starts_with("f OK"), "{r:?}");
    // A mailbox selected with CONDSTORE was told at SELECT.
    let r = d.cmd("t", "SELECT INBOX (CONDSTORE)").await;
    assert!(told(&r), "{r:?}");
    let r = d.cmd("u", "SEARCH MODSEQ 1").await;
    assert!(!told(&r), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_of_binary() {
    let site = site().await;
    deliver(
        &site,
        "binary/1",
        "Subject: bin\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
         Content-Type: text/plain\r\n\r\nhello\r\n--b\r\n\
         Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         AGFiYwA=\r\n--b\r\nContent-Transfer-Encoding: x-unknown\r\n\r\n???\r\n--b--\r\n",
    )
    .await;
    let (plain, _) = pod(&site, plaintext()).await;
    let mut c = Raw::login(plain).await;
    c.cmd("s", "SELECT INBOX").await;
    let r = c.cmd("a", "FETCH 4 (BINARY.SIZE[2] BINARY.PEEK[1])").await;
    assert_eq!(
        r[0], "* 4 FETCH (BINARY.SIZE[2] 5 BINARY[1] \"hello\")\r\n",
        "{r:?}"
    );
    // NUL bytes travel as a literal8.
    c.send("b FETCH 4 BINARY.PEEK[2]\r\n").await;
    let head = c.line().await;
    assert_eq!(head, "* 4 FETCH (BINARY[2] ~{5}\r\n");
    let mut body = [0u8; 7];
    tokio::io::AsyncReadExt::read_exact(&mut c.r, &mut body)
        .await
        .unwrap();
    assert_eq!(&body, b"\0abc\0)\r");
    c.line().await;
    let r = c.until("b").await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");
    let r = c.cmd("c", "FETCH 4 BINARY.PEEK[3]").await;
    assert!(last(&r).starts_with("c NO [UNKNOWN-CTE]"), "{r:?}");
    // A partial BINARY answer names its origin (RFC 3516 §4.2), the full one not.
    let r = c
        .cmd(
            "p",
            "FETCH 4 (BINARY.PEEK[1]<1.3> BINARY.PEEK[1] BINARY.PEEK[1]<9.2>)",
        )
        .await;
    assert_eq!(
        r[0], "* 4 FETCH (BINARY[1]<1> \"ell\" BINARY[1] \"hello\" BINARY[1]<9> \"\")\r\n",
        "{r:?}"
    );
    // APPEND of a literal8 (binary content) is accepted.
    c.send("d APPEND INBOX ~{7+}\r\nA\0\r\n\r\nx\r\n").await;
    let r = c.until("d").await;
    assert!(last(&r).starts_with("d OK [APPENDUID"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_deletes_and_limits_before_login() {
    let site = site().await;
    let (plain, _) = pod(&site, plaintext()).await;
    // Before login, no command (APPEND included) may carry more than max_command_bytes.
    let mut c = Raw::connect(plain).await;
    c.send("a APPEND INBOX {100000}\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("a NO [TOOBIG]"), "{r}");

    let mut c = Raw::login(plain).await;
    c.cmd("a", "CREATE Projects").await;
    c.cmd("a2", "SELECT INBOX").await;
    let r = c.cmd("b", "COPY 1:2 Projects").await;
    assert!(last(&r).starts_with("b OK [COPYUID "), "{r:?}");
    let r = c.cmd("c", "SELECT Projects").await;
    assert!(r.iter().any(|l| l == "* 2 EXISTS\r\n"), "{r:?}");
    // Renaming the selected mailbox keeps the session on it.
    let r = c.cmd("d", "RENAME Projects Archive/Projects").await;
    assert!(last(&r).starts_with("d OK"), "{r:?}");
    let r = c.cmd("e", "STORE 1 +FLAGS (\\Deleted)").await;
    assert!(last(&r).starts_with("e OK"), "{r:?}");
    let r = c.cmd("f", "NOOP").await;
    assert!(!r.iter().any(|l| l.starts_with("* BYE")), "{r:?}");
    let r = c
        .cmd("g", "STATUS Archive/Projects (MESSAGES DELETED)")
        .await;
    assert_eq!(r[0], "* STATUS Archive/Projects (MESSAGES 2 DELETED 1)\r\n");
    // A DELETE that fails changes nothing; one that succeeds deselects.
    let r = c.cmd("h", "DELETE INBOX").await;
    assert!(last(&r).starts_with("h NO"), "{r:?}");
    let r = c.cmd("i", "FETCH 1 FLAGS").await;
    assert!(last(&r).starts_with("i OK"), "still selected: {r:?}");
    let r = c.cmd("j", "DELETE Archive/Projects").await;
    assert!(last(&r).starts_with("j OK"), "{r:?}");
    let r = c.cmd("k", "FETCH 1 FLAGS").await;
    assert!(last(&r).starts_with("k BAD"), "deselected: {r:?}");

    // Not logging in ends the session at the login deadline, whatever is sent.
    let (quick, _) = pod(
        &site,
        ImapConfig {
            login_timeout: Duration::from_millis(800),
            ..plaintext()
        },
    )
    .await;
    let mut c = Raw::connect(quick).await;
    let mut closed = false;
    for i in 0..40 {
        c.send(&format!("n{i} NOOP\r\n")).await;
        let line = c.line().await;
        if line.starts_with("* BYE") || line.is_empty() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(closed, "NOOPs do not keep a session that never logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_protocol_balancer_the_real_client_is_counted() {
    let site = site().await;
    let cache: std::sync::Arc<dyn mailmesh_cache::Cache> =
        std::sync::Arc::new(mailmesh_cache::memory::MemoryCache::new());
    let pod = common::start_with_proxy(
        &site,
        cache.clone(),
        Pop3Config::default(),
        plaintext(),
        mailmesh_gateway::ProxyConfig {
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
            timeout: Some(Duration::from_secs(2)),
        },
    )
    .await;
    // PROXY v1 naming the client, then IMAP: the failed login counts for it.
    let s = TcpStream::connect(("127.0.0.1", pod.imap)).await.unwrap();
    let (r, w) = tokio::io::split(s);
    let mut c = Raw {
        r: BufReader::new(r),
        w,
    };
    c.send("PROXY TCP4 203.0.113.7 127.0.0.1 5555 143\r\n")
        .await;
    assert!(c.line().await.starts_with("* OK [CAPABILITY"));
    let r = c.cmd("a", "LOGIN alice@acme.test wrong").await;
    assert!(last(&r).starts_with("a NO [AUTHENTICATIONFAILED]"), "{r:?}");
    let window = Duration::from_secs(900);
    assert_eq!(
        cache
            .incr("authfail:ip:203.0.113.7", 0, window)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        cache
            .incr("authfail:ip:127.0.0.1", 0, window)
            .await
            .unwrap(),
        0,
        "the balancer's own address is never blamed"
    );
    // Implicit TLS after the header (curl sends PROXY v1 with --haproxy-protocol).
    let port = pod.imaps;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-k", "--max-time", "20", "--haproxy-protocol"])
            .arg(format!("imaps://127.0.0.1:{port}/INBOX;UID=2"))
            .args(["-u", "alice@acme.test:pw"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Subject: two"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A trusted peer that sends no header is closed without a word.
    let mut s = TcpStream::connect(("127.0.0.1", pod.imap)).await.unwrap();
    s.write_all(b"a LOGIN alice@acme.test pw\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // Closed with unread input, the socket may be reset rather than ended.
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
}

/// The gateway acts for a user only with the session token storage gave at login
/// (ADR 0006): it renews the token at commands once half its life is gone, so a
/// long session keeps working past the first token's expiry, and a disabled account
/// ends the session at the next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_renew_their_token_and_end_with_the_account() {
    let site = common::site_with(mailmesh_storage::engine::StorageConfig {
        mailbox_partitions: 2,
        session_ttl: Duration::from_secs(10),
        ..Default::default()
    })
    .await;
    let (plain, _) = pod(&site, plaintext()).await;
    let mut c = Raw::connect(plain).await;
    let r = c.cmd("a", "LOGIN alice@acme.test pw").await;
    assert!(last(&r).starts_with("a OK"), "{r:?}");
    let r = c.cmd("b", "SELECT INBOX").await;
    assert!(last(&r).starts_with("b OK"), "{r:?}");
    // Past half the token's life: this command renews it…
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = c.cmd("c", "NOOP").await;
    assert!(last(&r).starts_with("c OK"), "{r:?}");
    // …so past the first token's expiry, reads still work.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = c.cmd("d", "FETCH 1 (FLAGS)").await;
    assert!(last(&r).starts_with("d OK"), "{r:?}");
    // The account is disabled: the next renewal fails and the session ends.
    site.engine
        .set_enabled("alice@acme.test".parse().unwrap(), false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    c.send("e NOOP\r\n").await;
    let bye = c.line().await;
    assert!(bye.starts_with("* BYE Session ended"), "{bye}");
}

/// Issue 16 §3: the gateway deleted NUL bytes when serving BODY[], so a stored
/// `From\0:` reached the reader as `From:`. Stored bytes go out as stored (a NUL is
/// not allowed in a literal, and never altered either); BINARY uses literal8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bytes_are_served_as_stored() {
    let site = site().await;
    let stored = "From\0: alice@acme.test\r\nSubject: nul\r\n\r\nbody \0 here\r\n";
    deliver(&site, "nul", stored).await;
    let (plain, _) = pod(&site, plaintext()).await;
    let mut c = Raw::login(plain).await;
    let r = c.cmd("s", "SELECT INBOX").await;
    assert!(last(&r).starts_with("s OK"), "{r:?}");
    // Storage adds Return-Path and Delivered-To above what was delivered.
    let whole = site
        .engine
        .fetch(&site.alice, "INBOX", 4, None)
        .await
        .unwrap();
    assert!(whole.ends_with(stored.as_bytes()));
    for (item, expected) in [
        ("BODY.PEEK[]", &whole[..]),
        ("RFC822", &whole[..]),
        ("BODY.PEEK[TEXT]", b"body \0 here\r\n".as_slice()),
    ] {
        let r = c.cmd("f", &format!("FETCH 4 ({item})")).await;
        let served = r.concat();
        let literal = format!("{{{}}}\r\n", expected.len());
        let at = served.find(&literal).unwrap_or_else(|| {
            panic!(
                "{item}: no literal of {} bytes in {served:?}",
                expected.len()
            )
        }) + literal.len();
        assert_eq!(
            &served.as_bytes()[at..at + expected.len()],
            expected,
            "{item} altered the stored bytes"
        );
        assert!(last(&r).starts_with("f OK"), "{r:?}");
    }
    let r = c.cmd("b", "FETCH 4 (BINARY.PEEK[1])").await;
    assert!(r.concat().contains("~{13}\r\nbody \0 here\r\n"), "{r:?}");
}

/// Read-only commands write nothing to the log, on the embedded log and on real
/// Kafka: storage answers each once it has applied the position the session carries
/// (what it has seen and written), never through a barrier record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_write_no_log_records() {
    for site in [common::site().await, common::real_site().await] {
        deliver(&site, "r1", "Subject: one\r\n\r\nbody\r\n").await;
        let (port, _) = pod(&site, plaintext()).await;
        let records = mailmesh_storage::testing::records_published;
        let mut c = Raw::login(port).await;
        // The first SELECT after new mail takes it as its \Recent (one record, by
        // design: RFC 3501 §2.3.2); from then on reads write nothing.
        let r = c.cmd("p", "SELECT INBOX").await;
        assert!(
            r.iter()
                .any(|l| l.ends_with(" RECENT\r\n") && l != "* 0 RECENT\r\n"),
            "{r:?}"
        );
        let before = records();
        for (tag, command) in [
            ("a", "SELECT INBOX"),
            ("b", "STATUS INBOX (MESSAGES UIDNEXT UNSEEN)"),
            ("c", "LIST \"\" *"),
            ("d", "FETCH 1:* (FLAGS UID BODY.PEEK[HEADER])"),
            ("e", "UID SEARCH ALL"),
            ("f", "EXAMINE INBOX"),
            ("g", "NOOP"),
            ("h", "GETQUOTAROOT INBOX"),
            ("i", "UID FETCH 1:* (BODY.PEEK[])"),
        ] {
            let r = c.cmd(tag, command).await;
            assert!(last(&r).starts_with(&format!("{tag} OK")), "{r:?}");
        }
        assert_eq!(records() - before, 0.0, "records written by reads");
        // A change still writes one, and the session then sees it.
        let r = c.cmd("j", "SELECT INBOX").await;
        assert!(last(&r).starts_with("j OK"), "{r:?}");
        let r = c.cmd("k", "STORE 1 +FLAGS.SILENT (\\Flagged)").await;
        assert!(last(&r).starts_with("k OK"), "{r:?}");
        assert!(records() - before >= 1.0);
        let r = c.cmd("l", "FETCH 1 (FLAGS)").await;
        assert!(r.concat().contains("\\Flagged"), "{r:?}");
    }
}

/// A session whose view cannot be refreshed (storage unreachable from its pod after
/// retries) ends with `BYE [UNAVAILABLE]` instead of answering commands against a
/// view it knows is stale: before, the failure was logged at debug level and a
/// later `UID STORE` on a message the view never learned of answered OK for
/// nothing. The client reconnects and sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_storage_cannot_refresh_ends_the_session() {
    let site = site().await;
    let link = common::Link::to(&site.endpoint).await;
    let pod = common::start_at(
        &site,
        &link.endpoint,
        memory(),
        Pop3Config::default(),
        plaintext(),
        mailmesh_gateway::ProxyConfig::default(),
    )
    .await;
    let mut c = Raw::login(pod.imap).await;
    let r = c.cmd("s", "SELECT INBOX").await;
    assert!(last(&r).starts_with("s OK"), "{r:?}");
    link.cut();
    // New mail the session has not seen; its change stream broke with the link, so
    // the next command must read the mailbox again, and cannot.
    deliver(&site, "cut/1", "Subject: four\r\n\r\nnew\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send("n NOOP\r\n").await;
    let mut lines = Vec::new();
    loop {
        let line = c.line().await;
        if line.is_empty() || line.starts_with("n ") {
            lines.push(line);
            break;
        }
        lines.push(line);
    }
    assert!(
        lines.iter().any(|l| l.starts_with("* BYE [UNAVAILABLE]")),
        "{lines:?}"
    );
    // NOOP itself did what it says; then the session is over: no later command
    // runs on the stale view.
    if !last(&lines).is_empty() {
        assert_eq!(c.line().await, "", "the session goes on after BYE");
    }
    // Once storage is reachable again, a new session sees the new mail.
    link.mend();
    let mut again = Raw::login(pod.imap).await;
    let r = again.cmd("s", "SELECT INBOX").await;
    assert!(r.iter().any(|l| l == "* 4 EXISTS\r\n"), "{r:?}");
}
