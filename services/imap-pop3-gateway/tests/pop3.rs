//! POP3 against the real storage service (its gRPC API over the embedded backends),
//! judged by clients written by others: Python's poplib over STLS, curl over
//! implicit TLS; transcripts for the edges; two gateway "pods" sharing the real
//! Redis for the maildrop lock and the login-failure limit.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{Site, memory, python, site};
use mailmesh_cache::Cache;
use mailmesh_gateway::{ImapConfig, Pop3Config};
use mailmesh_kit::Secret;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A gateway "pod" on two loopback ports: (POP3 with STLS, POP3 over TLS).
async fn pod(site: &Site, cache: Arc<dyn Cache>, config: Pop3Config) -> (u16, u16) {
    let pod = common::start(site, cache, config, ImapConfig::default()).await;
    (pod.pop3, pod.pop3s)
}

async fn inbox_uids(site: &Site) -> Vec<u32> {
    site.engine
        .read_index(&site.alice, |i| {
            i.and_then(|i| i.mailbox("INBOX"))
                .map(|m| m.messages.keys().copied().collect())
                .unwrap_or_default()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poplib_reads_and_deletes_over_stls() {
    let site = site().await;
    let (port, _) = pod(&site, memory(), Pop3Config::default()).await;
    let out = python(&format!(
        r#"
import poplib, ssl
p = poplib.POP3('127.0.0.1', {port}, timeout=30)
caps = p.capa()
print('caps', 'STLS' in caps, 'USER' in caps, 'UIDL' in caps, 'TOP' in caps)
try:
    p.user('alice@acme.test')
except poplib.error_proto as e:
    print('plain', e.args[0].decode())
p.stls(context=ssl._create_unverified_context())
caps = p.capa()
print('after tls', 'STLS' in caps, 'USER' in caps, 'SASL' in caps)
p.user('alice@acme.test')
p.pass_('pw')
print('stat', p.stat())
print('list', p.list()[1])
uidl = p.uidl()[1]
print('uidl', len(uidl), len(set(u.split()[1] for u in uidl)))
print('top', p.top(2, 1)[1])
print('retr', p.retr(1)[1])
print(p.dele(1).decode())
try:
    p.retr(1)
except poplib.error_proto as e:
    print('gone', e.args[0].decode())
print('stat', p.stat())
print(p.quit().decode())
"#
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "caps True False True True", "{out}");
    assert_eq!(
        lines[1],
        "plain -ERR [AUTH] Plaintext authentication is disabled: use STLS first"
    );
    assert_eq!(lines[2], "after tls False True True");
    assert!(lines[3].starts_with("stat (3, "), "{out}");
    assert!(lines[4].starts_with("list [b'1 "), "{out}");
    assert_eq!(lines[5], "uidl 3 3");
    // The stored message starts with Return-Path and Delivered-To.
    assert!(
        lines[6].contains("b'Subject: two'") && lines[6].ends_with("b'', b'second line 1']"),
        "{out}"
    );
    assert!(
        lines[7].contains("b'first', b'.starts with a dot'"),
        "dot-stuffing undone by the client: {out}"
    );
    assert_eq!(lines[8], "+OK Message 1 deleted");
    assert_eq!(lines[9], "gone -ERR No such message");
    assert!(lines[10].starts_with("stat (2, "), "{out}");
    assert_eq!(lines[11], "+OK Bye, 1 messages deleted");
    assert_eq!(inbox_uids(&site).await, vec![2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_over_implicit_tls_and_a_dropped_session_deletes_nothing() {
    let site = site().await;
    let (port, tls_port) = pod(&site, memory(), Pop3Config::default()).await;
    let curl = |url: String, extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "-k", "--max-time", "30", "-u", "alice@acme.test:pw"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listing = curl(format!("pop3s://127.0.0.1:{tls_port}/"), &[]);
    assert_eq!(listing.lines().count(), 3, "{listing}");
    let message = curl(format!("pop3s://127.0.0.1:{tls_port}/3"), &[]);
    assert!(
        message.starts_with("Return-Path: <bob@example.org>\r\n"),
        "{message}"
    );
    assert!(message.ends_with("Subject: three\r\nFrom: bob@example.org\r\n\r\nthird\r\n"));
    // STLS on the plain port, AUTH PLAIN (curl's choice when offered).
    let message = curl(
        format!("pop3://127.0.0.1:{port}/1"),
        &["--ssl-reqd", "--login-options", "AUTH=PLAIN"],
    );
    assert!(message.contains("\r\n.starts with a dot\r\n"), "{message}");

    // DELE without QUIT: the connection drops, nothing is deleted, the lock frees.
    let mut c = Client::tls(tls_port).await;
    c.expect("+OK").await;
    c.cmd("USER alice@acme.test", "+OK").await;
    c.cmd("PASS pw", "+OK Logged in, 3 messages").await;
    c.cmd("DELE 1", "+OK").await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inbox_uids(&site).await, vec![1, 2, 3]);
    let mut c = Client::tls(tls_port).await;
    c.expect("+OK").await;
    c.cmd("USER alice@acme.test", "+OK").await;
    c.cmd("PASS pw", "+OK Logged in, 3 messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_of_the_edges() {
    let site = site().await;
    let (port, _) = pod(
        &site,
        memory(),
        Pop3Config {
            allow_plaintext_auth: true,
            max_errors: 6,
            ..Pop3Config::default()
        },
    )
    .await;
    let mut c = Client::plain(port).await;
    c.expect("+OK localhost POP3").await;
    c.cmd("STAT", "-ERR Command not valid in this state").await;
    c.cmd("PASS pw", "-ERR Send USER first").await;
    c.cmd("AUTH", "+OK").await;
    assert_eq!(c.line().await, "PLAIN");
    assert_eq!(c.line().await, ".");
    c.cmd("AUTH CRAM-MD5", "-ERR Unsupported").await;
    // AUTH PLAIN in two steps, cancelled; then a wrong password (one second later).
    c.cmd("AUTH PLAIN", "+ ").await;
    c.cmd("*", "-ERR Authentication cancelled").await;
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGFjbWUudGVzdAB3cm9uZw==",
        "-ERR [AUTH] Invalid login",
    )
    .await;
    // Acting as someone else is refused.
    c.cmd(
        "AUTH PLAIN Ym9iQGFjbWUudGVzdABhbGljZUBhY21lLnRlc3QAcHc=",
        "-ERR [AUTH] Acting as another user",
    )
    .await;
    // alice@acme.test / pw
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGFjbWUudGVzdABwdw==",
        "+OK Logged in, 3 messages",
    )
    .await;
    c.cmd("USER x", "-ERR Command not valid in this state")
        .await;
    c.cmd("LIST 9", "-ERR No such message").await;
    c.cmd("LIST 2", "+OK 2 ").await;
    c.cmd("TOP 1", "-ERR TOP needs").await;
    c.cmd("DELE 2", "+OK").await;
    c.cmd("DELE 2", "-ERR No such message").await;
    c.cmd("RSET", "+OK Maildrop has 3 messages").await;
    c.cmd("NOOP", "+OK").await;
    // Pipelined commands are answered in order.
    c.send("STAT\r\nUIDL 1\r\nNOOP\r\n").await;
    c.expect("+OK 3 ").await;
    c.expect("+OK 1 ").await;
    c.expect("+OK").await;
    // A line longer than the limit is consumed and refused; the session goes on.
    c.send(&format!("{}\r\n", "X".repeat(5000))).await;
    c.expect("-ERR Line too long").await;
    c.cmd("BOGUS", "-ERR Unknown command").await;
    c.cmd("BOGUS", "-ERR Too many errors").await;
    assert_eq!(c.line().await, "", "closed after too many errors");
}

/// Two gateway pods on the real Redis: one maildrop lock and one failure count for
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_share_the_maildrop_lock_and_failure_limits_in_redis() {
    use mailmesh_cache::redis::{RedisCache, RedisConfig};
    let site = site().await;
    let redis = || async {
        Arc::new(
            RedisCache::connect(&RedisConfig {
                url: Secret::new(mailmesh_testkit::backend_env("MMTEST_REDIS")),
                key_prefix: format!("pop3test-{}:", std::process::id()),
                command_timeout: Duration::from_secs(2),
                sentinel: None,
            })
            .await
            .unwrap(),
        ) as Arc<dyn Cache>
    };
    let config = Pop3Config {
        allow_plaintext_auth: true,
        max_auth_failures: 3,
        // Short, so the test outlives it several times: the session renews it.
        lock_ttl: Duration::from_millis(600),
        ..Pop3Config::default()
    };
    let (one, _) = pod(&site, redis().await, config.clone()).await;
    let (two, _) = pod(&site, redis().await, config).await;

    let mut first = Client::plain(one).await;
    first.expect("+OK").await;
    first.cmd("USER alice@acme.test", "+OK").await;
    first.cmd("PASS pw", "+OK Logged in").await;
    let mut second = Client::plain(two).await;
    second.expect("+OK").await;
    second.cmd("USER ALICE@acme.test", "+OK").await;
    second.cmd("PASS pw", "-ERR [IN-USE]").await;
    // Three lock lifetimes later the first session still holds the maildrop.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    first.cmd("NOOP", "+OK").await;
    second.cmd("USER alice@acme.test", "+OK").await;
    second.cmd("PASS pw", "-ERR [IN-USE]").await;
    first.cmd("QUIT", "+OK Bye, 0 messages deleted").await;
    second.cmd("USER alice@acme.test", "+OK").await;
    second.cmd("PASS pw", "+OK Logged in").await;
    second.cmd("QUIT", "+OK").await;

    // Three wrong passwords from one address, spread over both pods, refuse that
    // address on both (the account itself is only slowed down, never locked out).
    for (port, user) in [
        (one, "carol@acme.test"),
        (two, "carol@acme.test"),
        (one, "carol@acme.test"),
    ] {
        let mut c = Client::plain(port).await;
        c.expect("+OK").await;
        c.cmd(&format!("USER {user}"), "+OK").await;
        c.cmd("PASS nope", "-ERR [AUTH] Invalid login").await;
    }
    let mut c = Client::plain(two).await;
    c.expect("+OK").await;
    c.cmd("USER carol@acme.test", "+OK").await;
    // Not [AUTH] (RFC 3206: that says the password is wrong): a temporary refusal.
    c.cmd("PASS nope", "-ERR [SYS/TEMP] Too many failed logins")
        .await;
}

/// A line-oriented client for transcripts.
struct Client<S> {
    io: BufReader<S>,
}

impl Client<TcpStream> {
    async fn plain(port: u16) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        Self {
            io: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }
}

impl Client<tokio_rustls::client::TlsStream<TcpStream>> {
    async fn tls(port: u16) -> Self {
        let config = mailmesh_testkit::tls::insecure_client_config();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        Self {
            io: BufReader::new(tls),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line))
            .await
            .expect("a reply within the timeout")
            .unwrap();
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    async fn send(&mut self, raw: &str) {
        self.io.get_mut().write_all(raw.as_bytes()).await.unwrap();
    }

    async fn expect(&mut self, prefix: &str) -> String {
        let line = self.line().await;
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}"
        );
        line
    }

    async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(prefix).await
    }

    /// A command with a multi-line `+OK` answer: its lines up to the final `.`.
    async fn lines(&mut self, line: &str) -> Vec<String> {
        self.cmd(line, "+OK").await;
        let mut lines = Vec::new();
        loop {
            match self.line().await {
                end if end == "." => return lines,
                l => lines.push(l),
            }
        }
    }
}

/// A POP3 session that deletes nothing writes nothing to storage's log (a record
/// counter of storage says so), on the embedded log and on real Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_sessions_write_no_log_records() {
    for site in [site().await, common::real_site().await] {
        let (_, tls_port) = pod(&site, memory(), Pop3Config::default()).await;
        let before = mailmesh_storage::testing::records_published();
        let mut c = Client::tls(tls_port).await;
        c.expect("+OK").await;
        c.cmd("USER alice@acme.test", "+OK").await;
        c.cmd("PASS pw", "+OK Logged in, 3 messages").await;
        c.cmd("STAT", "+OK 3 ").await;
        assert_eq!(c.lines("LIST").await.len(), 3);
        assert_eq!(c.lines("UIDL").await.len(), 3);
        assert!(
            c.lines("RETR 2")
                .await
                .contains(&"second line 2".to_owned())
        );
        assert!(
            c.lines("TOP 3 0")
                .await
                .contains(&"Subject: three".to_owned())
        );
        c.cmd("NOOP", "+OK").await;
        c.cmd("RSET", "+OK").await;
        c.cmd("QUIT", "+OK").await;
        assert_eq!(
            mailmesh_storage::testing::records_published() - before,
            0.0,
            "records written by reads"
        );
        assert_eq!(inbox_uids(&site).await, vec![1, 2, 3]);
    }
}

/// fetchmail (Debian) downloads the maildrop over STLS and, not told to keep it,
/// deletes what it fetched at QUIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchmail_downloads_and_empties_the_maildrop() {
    let site = site().await;
    let (port, _) = pod(&site, memory(), Pop3Config::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fetched");
    let rc = dir.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "poll 127.0.0.1 service {port} protocol POP3 auth password\n  \
             user \"alice@acme.test\" there with password \"pw\" is \"alice\" here\n  \
             sslproto \"tls1.2+\" no sslcertck\n  \
             mda \"/bin/sh -c 'cat >> {}; echo ===== >> {}'\"\n",
            out.display(),
            out.display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&rc).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(&rc, perms).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        Command::new("fetchmail")
            .args(["-f"])
            .arg(&rc)
            .args(["--nosyslog", "--nodetach", "--pidfile"])
            .arg(rc.with_extension("pid"))
            .env("HOME", rc.parent().unwrap())
            .output()
            .expect("fetchmail (scripts/backends.sh installs it)")
    })
    .await
    .unwrap();
    let fetched = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(
        fetched.matches("=====").count(),
        3,
        "fetchmail: {}\n{}\n{fetched}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    for subject in ["Subject: one", "Subject: two", "Subject: three"] {
        assert!(fetched.contains(subject), "{fetched}");
    }
    assert!(
        fetched.contains("\n.starts with a dot"),
        "dot-stuffing undone"
    );
    assert!(
        inbox_uids(&site).await.is_empty(),
        "fetched mail is deleted"
    );
}
