//! Issue 16 §5 and §6 against the gateway: what a logged-in user could amplify (a
//! FETCH reply of one message 4,000 times, a LIST pattern that burnt 50 s of CPU,
//! APPEND literals held in memory before the quota was asked) and what anyone could
//! hold (sessions kept alive by a byte at a time, every slot taken from a few
//! addresses).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Site, memory, site};
use mailmesh_gateway::{ImapConfig, Pop3Config};
use mailmesh_storage::engine::Delivery;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

fn plaintext() -> ImapConfig {
    ImapConfig {
        allow_plaintext_auth: true,
        ..ImapConfig::default()
    }
}

fn plaintext_pop3() -> Pop3Config {
    Pop3Config {
        allow_plaintext_auth: true,
        ..Pop3Config::default()
    }
}

/// A connection from `source` (any 127.x.y.z is this host).
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

struct Client {
    r: BufReader<tokio::io::ReadHalf<TcpStream>>,
    w: tokio::io::WriteHalf<TcpStream>,
}

impl Client {
    async fn new(stream: TcpStream) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            r: BufReader::new(r),
            w,
        }
    }

    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), self.r.read_until(b'\n', &mut line))
            .await
            .expect("a line within 20 s")
            .unwrap();
        String::from_utf8_lossy(&line).into_owned()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }

    /// Everything up to the tagged reply, literals included, as bytes.
    async fn until(&mut self, tag: &str) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let mut line = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), self.r.read_until(b'\n', &mut line))
                .await
                .expect("a reply within 30 s")
                .unwrap();
            assert!(
                !line.is_empty(),
                "closed: {}",
                String::from_utf8_lossy(&all)
            );
            all.extend_from_slice(&line);
            if line.starts_with(format!("{tag} ").as_bytes()) {
                return all;
            }
            // A literal follows `{n}\r\n`: read it whole.
            if let Some(n) = line
                .strip_suffix(b"}\r\n")
                .and_then(|l| l.iter().rposition(|&b| b == b'{').map(|p| &l[p + 1..]))
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
            {
                let mut literal = vec![0; n];
                self.r.read_exact(&mut literal).await.unwrap();
                all.extend_from_slice(&literal);
            }
        }
    }

    /// Everything until the server closes the connection.
    async fn until_closed(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), self.r.read_to_end(&mut all))
            .await
            .expect("closed within 20 s")
            .unwrap();
        all
    }

    async fn cmd(&mut self, tag: &str, command: &str) -> String {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await;
        String::from_utf8_lossy(&self.until(tag).await).into_owned()
    }

    async fn login(port: u16) -> Self {
        let mut c = Self::new(connect_from("127.0.0.1", port).await).await;
        assert!(c.line().await.starts_with("* OK"));
        let r = c.cmd("l", "LOGIN alice@acme.test pw").await;
        assert!(r.contains("l OK"), "{r}");
        c
    }
}

async fn pod(site: &Site, imap: ImapConfig) -> u16 {
    common::start(site, memory(), Pop3Config::default(), imap)
        .await
        .imap
}

/// Delivers a message of `lines` 33-byte lines (key `big`) and returns it.
async fn deliver_big(site: &Site, lines: usize) -> String {
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef0123456789abcde\r\n".repeat(lines)
    );
    deliver(site, "big", big.as_bytes()).await;
    big
}

async fn deliver(site: &Site, key: &str, message: &[u8]) {
    site.engine
        .deliver(
            &site.alice,
            Delivery {
                mailbox: "INBOX",
                return_path: &"bob@example.org".parse().unwrap(),
                delivered_to: &"alice@acme.test".parse().unwrap(),
                message,
                key,
                internal_date_ms: 1_795_752_725_000,
            },
        )
        .await
        .unwrap();
}

/// `FETCH n (BODY.PEEK[] ×4000)` on a 200 KB message built an 800 MB reply: the same
/// item is answered once, and distinct items beyond the reply budget end the command
/// with `NO [LIMIT]` before anything is copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_reply_is_bounded() {
    let site = site().await;
    let big = deliver_big(&site, 6_400).await;
    let port = pod(
        &site,
        ImapConfig {
            max_message_bytes: 1 << 20,
            max_fetch_response_bytes: 1 << 20,
            ..plaintext()
        },
    )
    .await;
    let mut c = Client::login(port).await;
    assert!(c.cmd("s", "SELECT INBOX").await.contains("s OK"));
    let items = vec!["BODY.PEEK[]"; 4_000].join(" ");
    let r = c.until_after(&format!("f FETCH 4 ({items})"), "f").await;
    let reply = String::from_utf8_lossy(&r);
    assert!(reply.contains("f OK"), "{}", &reply[reply.len() - 200..]);
    assert_eq!(reply.matches("BODY[] {").count(), 1, "answered once");
    assert!(r.len() < 2 * big.len() + 4096, "{} bytes", r.len());
    // Twenty distinct partial ranges of 200 KB: over the 1 MiB budget.
    let partials: Vec<String> = (0..20)
        .map(|i| format!("BODY.PEEK[]<{i}.200000>"))
        .collect();
    let r = c
        .cmd("g", &format!("FETCH 4 ({})", partials.join(" ")))
        .await;
    assert!(r.contains("g NO [LIMIT]"), "{}", &r[..r.len().min(300)]);
    // The session goes on.
    assert!(c.cmd("n", "NOOP").await.contains("n OK"));
}

impl Client {
    async fn until_after(&mut self, command: &str, tag: &str) -> Vec<u8> {
        self.send(format!("{command}\r\n").as_bytes()).await;
        self.until(tag).await
    }
}

/// `LIST "" "%*%*…"` (60,000 characters) over many mailboxes took 50 s of CPU on one
/// worker thread: patterns are bounded, wildcard runs collapse, matching is linear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_patterns_are_bounded() {
    let site = site().await;
    for i in 0..200 {
        site.engine
            .index(
                &site.alice,
                mailmesh_storage::index::IndexCommand::CreateMailbox {
                    name: format!("Folder{i}/Sub"),
                    role: None,
                },
            )
            .await
            .unwrap();
    }
    let port = pod(&site, plaintext()).await;
    let mut c = Client::login(port).await;
    let long = "%*".repeat(30_000);
    let r = c.cmd("a", &format!("LIST \"\" \"{long}\"")).await;
    assert!(r.contains("a BAD [TOOBIG]"), "{}", &r[..r.len().min(200)]);
    // Within the bound: wildcard runs are one wildcard.
    let runs = "%*".repeat(400);
    let r = c.cmd("b", &format!("LIST \"\" \"Folder1{runs}Sub\"")).await;
    assert!(r.contains("b OK"), "{r}");
    assert!(r.contains(" Folder1/Sub\r\n"), "{r}");
    assert!(r.contains(" Folder199/Sub\r\n"), "{r}");
    assert!(!r.contains(" Folder2/Sub\r\n"), "{r}");
    assert_eq!(r.matches("* LIST").count(), 111, "Folder1, 10-19, 100-199");
}

/// APPEND literals up to 64 MiB were taken into memory before the quota was asked:
/// now size, quota and mailbox are checked when the literal is announced (no `+`
/// for a refused one), a refused LITERAL+ literal is read and dropped, and the
/// message goes to storage as it arrives; an upload cut short stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_is_checked_when_announced_and_streamed() {
    let site = site().await;
    site.engine
        .set_quota("alice@acme.test".parse().unwrap(), Some(20_000))
        .await
        .unwrap();
    let port = pod(&site, plaintext()).await;
    let mut c = Client::login(port).await;
    // Over quota, synchronising literal: refused, no continuation.
    c.send(b"a APPEND INBOX {50000}\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("a NO [OVERQUOTA]"), "{r}");
    // No such mailbox: refused before the client sends anything.
    c.send(b"b APPEND Nowhere {10}\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("b NO [TRYCREATE]"), "{r}");
    // LITERAL+ over quota: the bytes come anyway; read, dropped, refused.
    let mut plus = b"c APPEND INBOX {50000+}\r\n".to_vec();
    plus.extend(std::iter::repeat_n(b'x', 50_000));
    plus.extend_from_slice(b"\r\nd NOOP\r\n");
    c.send(&plus).await;
    let r = c.line().await;
    assert!(r.starts_with("c NO [OVERQUOTA]"), "{r}");
    let r = c.line().await;
    assert!(r.starts_with("d OK"), "{r}");

    // With room: a 3 MiB message streamed through, byte for byte.
    site.engine
        .set_quota("alice@acme.test".parse().unwrap(), None)
        .await
        .unwrap();
    let body: Vec<u8> = (0..3 << 20)
        .map(|i: usize| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    let mut message = b"Subject: streamed\r\n\r\n".to_vec();
    message.extend_from_slice(&body);
    c.send(format!("e APPEND INBOX {{{}}}\r\n", message.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    for chunk in message.chunks(100_000) {
        c.send(chunk).await;
    }
    c.send(b"\r\n").await;
    let r = String::from_utf8_lossy(&c.until("e").await).into_owned();
    assert!(r.contains("e OK [APPENDUID "), "{r}");
    let uid: u32 = r
        .split("[APPENDUID ")
        .nth(1)
        .and_then(|s| s.split(' ').nth(1))
        .and_then(|s| s.trim_end_matches(']').parse().ok())
        .unwrap();
    let stored = site
        .engine
        .fetch(&site.alice, "INBOX", uid, None)
        .await
        .unwrap();
    assert_eq!(stored.as_ref(), message.as_slice());

    // An upload that stops half way (the client goes away): nothing is stored.
    let before = site
        .engine
        .read_index(&site.alice, |i| i.map(|i| i.used_bytes()))
        .await
        .unwrap();
    let mut cut = Client::login(port).await;
    cut.send(b"f APPEND INBOX {1000000}\r\n").await;
    assert!(cut.line().await.starts_with("+ "));
    cut.send(&vec![b'y'; 400_000]).await;
    drop(cut);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = site
        .engine
        .read_index(&site.alice, |i| i.map(|i| i.used_bytes()))
        .await
        .unwrap();
    assert_eq!(before, after);

    // MULTIAPPEND is not offered: a second literal after the message would have its
    // bytes read as commands, so the session ends there and nothing is stored.
    let mut multi = Client::login(port).await;
    multi
        .send(b"g APPEND INBOX {5+}\r\nfirst INBOX {23+}\r\nh LOGOUT\r\nx DELETE Y\r\n")
        .await;
    let rest = String::from_utf8_lossy(&multi.until_closed().await).into_owned();
    assert!(rest.contains("* BYE Unexpected data"), "{rest}");
    assert!(!rest.contains("h OK") && !rest.contains("x "), "{rest:?}");
    let last = site
        .engine
        .read_index(&site.alice, |i| i.map(|i| i.used_bytes()))
        .await
        .unwrap();
    assert_eq!(before, last);
}

/// A user's sessions on one pod are capped: the one over the cap is refused and
/// may log in once another ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_user_are_capped() {
    let site = site().await;
    let port = pod(
        &site,
        ImapConfig {
            max_sessions_per_user: 2,
            ..plaintext()
        },
    )
    .await;
    let first = Client::login(port).await;
    let _second = Client::login(port).await;
    let mut third = Client::new(connect_from("127.0.0.1", port).await).await;
    assert!(third.line().await.starts_with("* OK"));
    let r = third.cmd("l", "LOGIN alice@acme.test pw").await;
    assert!(r.contains("l NO [UNAVAILABLE]"), "{r}");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = third.cmd("m", "LOGIN alice@acme.test pw").await;
    assert!(r.contains("m OK"), "{r}");
}

/// One byte every few hundred milliseconds kept sessions alive before login, and a
/// few addresses took every slot: the login deadline holds however the time is
/// spent, each address has its own cap (counted across pods), and another address
/// is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_neither_last_nor_take_every_slot() {
    let site = site().await;
    let pod = common::start(
        &site,
        memory(),
        Pop3Config {
            login_timeout: Duration::from_secs(3),
            max_connections_per_ip: 3,
            ..plaintext_pop3()
        },
        ImapConfig {
            login_timeout: Duration::from_secs(3),
            max_connections_per_ip: 3,
            ..plaintext()
        },
    )
    .await;
    for (port, greeting, refused, closing) in [
        (
            pod.imap,
            "* OK",
            "* BYE [UNAVAILABLE] Too many connections from your address",
            "* BYE",
        ),
        (
            pod.pop3,
            "+OK",
            "-ERR [SYS/TEMP] Too many connections from your address",
            "",
        ),
    ] {
        let mut tricklers = Vec::new();
        for _ in 0..3 {
            let mut c = Client::new(connect_from("127.0.0.2", port).await).await;
            assert!(c.line().await.starts_with(greeting));
            tricklers.push(c);
        }
        // A fourth from the same address is refused; another address is served.
        let mut extra = Client::new(connect_from("127.0.0.2", port).await).await;
        let r = extra.line().await;
        assert!(r.starts_with(refused), "{r}");
        let mut other = Client::new(connect_from("127.0.0.3", port).await).await;
        assert!(other.line().await.starts_with(greeting));
        // The tricklers send a byte every 300 ms and are still cut at the deadline.
        let started = tokio::time::Instant::now();
        let mut closed = 0;
        while closed < tricklers.len() && started.elapsed() < Duration::from_secs(15) {
            for c in &mut tricklers {
                let _ = c.w.write_all(b"N").await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            closed = 0;
            for c in &mut tricklers {
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(1), c.r.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                    Ok(Ok(n)) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        assert!(text.starts_with(closing), "{text}");
                        closed += 1;
                    }
                    Err(_) => {}
                }
            }
        }
        assert_eq!(
            closed,
            tricklers.len(),
            "trickling outlived the login deadline"
        );
    }
}

/// Sessions fetching large messages each held the message and every item copied
/// from it: many of them grew the process without bound. The process now holds at
/// most `imap.max_fetch_memory` of messages for FETCH (each counted three times: the
/// stored bytes, one item, its encoding), items are written one at a time, and
/// sessions beyond the budget wait their turn; every reply is still whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_share_a_memory_budget() {
    let site = site().await;
    // 8 MB: a FETCH of two items of it is a 16 MB reply, more than the sockets
    // buffer, so a client that does not read keeps its FETCH (and its share of the
    // budget) going.
    let big = deliver_big(&site, 250_000).await;
    // 32 MiB: one FETCH of the message holds 24 MiB, so two never fit at once.
    let port = pod(
        &site,
        ImapConfig {
            max_fetch_memory: 32 << 20,
            ..plaintext()
        },
    )
    .await;
    let waits = || {
        mailmesh_kit::metrics::render()
            .lines()
            .filter(|l| l.contains("fetch_memory_wait"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = waits();
    let mut a = Client::login(port).await;
    assert!(a.cmd("s", "SELECT INBOX").await.contains("s OK"));
    let mut b = Client::login(port).await;
    assert!(b.cmd("s", "SELECT INBOX").await.contains("s OK"));
    // A asks and does not read yet; B's FETCH then waits for A's share.
    a.send(b"f FETCH 4 (BODY.PEEK[] BODY.PEEK[TEXT] RFC822.SIZE)\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.send(b"g FETCH 4 (BODY.PEEK[HEADER] RFC822.SIZE)\r\n")
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while waits() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not wait for the memory A holds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A reads: its reply is whole, one FETCH closed once; then B gets its turn.
    let r = a.until("f").await;
    let reply = String::from_utf8_lossy(&r);
    assert!(reply.contains("f OK"), "{}", &reply[reply.len() - 200..]);
    assert!(r.len() > 2 * big.len(), "{} bytes", r.len());
    assert!(reply.starts_with("* 4 FETCH (BODY[] {"), "{}", &reply[..80]);
    let tail = &reply[reply.rfind(" RFC822.SIZE ").expect("size")..];
    assert!(tail.contains(")\r\nf OK"), "{tail}");
    assert_eq!(reply.matches(" FETCH (").count(), 1);
    let r = b.until("g").await;
    let reply = String::from_utf8_lossy(&r);
    assert!(
        reply.contains("BODY[HEADER] {") && reply.contains("g OK"),
        "{reply}"
    );
}

/// A client that asks for a large FETCH and stops reading held its session, the
/// message and its share of the FETCH memory for as long as it liked: the write
/// now gives up after `write_timeout` without progress, and the next FETCH runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let site = site().await;
    let big = deliver_big(&site, 250_000).await;
    let port = pod(
        &site,
        ImapConfig {
            max_fetch_memory: 32 << 20,
            write_timeout: Duration::from_secs(1),
            ..plaintext()
        },
    )
    .await;
    let mut a = Client::login(port).await;
    assert!(a.cmd("s", "SELECT INBOX").await.contains("s OK"));
    let mut b = Client::login(port).await;
    assert!(b.cmd("s", "SELECT INBOX").await.contains("s OK"));
    a.send(b"f FETCH 4 (BODY.PEEK[] BODY.PEEK[TEXT])\r\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B's FETCH needs A's share of the memory; A never reads again.
    let r = b.cmd("g", "FETCH 4 (BODY.PEEK[TEXT])").await;
    assert!(r.contains("g OK"), "{}", &r[r.len().saturating_sub(200)..]);
    // A's session was closed: what it reads now ends before its FETCH does.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), a.r.read_to_end(&mut rest))
        .await
        .expect("A's connection closed")
        .unwrap();
    assert!(rest.len() < 2 * big.len(), "{} bytes", rest.len());
    assert!(!String::from_utf8_lossy(&rest).contains("f OK"));
}

/// A FETCH that stops at a message over the reply limit still sets \Seen on the
/// messages it sent (it returned before storing them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seen_is_kept_for_what_a_refused_fetch_sent() {
    let site = site().await;
    deliver_big(&site, 75_000).await;
    let port = pod(
        &site,
        ImapConfig {
            max_fetch_response_bytes: 1 << 20,
            ..plaintext()
        },
    )
    .await;
    let mut c = Client::login(port).await;
    assert!(c.cmd("s", "SELECT INBOX").await.contains("s OK"));
    let r = c.cmd("a", "FETCH 3 FLAGS").await;
    assert!(!r.contains("\\Seen"), "{r}");
    let r = c.cmd("f", "FETCH 3:4 BODY[]").await;
    assert!(
        r.contains("* 3 FETCH (") && r.contains("f NO [LIMIT]"),
        "{r}"
    );
    assert!(!r.contains("* 4 FETCH ("), "{r}");
    let r = c.cmd("b", "FETCH 3 FLAGS").await;
    assert!(r.contains("\\Seen"), "{r}");
}
