//! Mail through `mailctl dev` as a user sends it: Python's smtplib and swaks (clients
//! written by others) talk to the SMTP port over STARTTLS, and the message lands in
//! the user's INBOX, or Junk when the tenant's policy says so. auth-check asks a real
//! DNS server (dnsmasq) that the test starts.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Dev, mailctl, start, wait_ready};

fn ok(dev: &Dev, args: &[&str], stdin: &str) -> String {
    let out = mailctl(dev, args, stdin);
    assert!(
        out.status.success(),
        "mailctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a Python smtplib script against the dev SMTP port; returns its output.
fn smtplib(dev: &Dev, script: &str) -> String {
    python(&format!(
        "import smtplib\ns = smtplib.SMTP('127.0.0.1', {port}, timeout=30)\n{script}\n",
        port = dev.smtp_port
    ))
}

/// Runs a Python program (a client written by others); returns its output.
fn python(program: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `mailctl --json queue list` once it shows `n` waiting messages.
async fn waiting_until(dev: &Dev, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&ok(dev, &["--json", "queue", "list"], "")).unwrap();
        let list = list.as_array().unwrap().clone();
        if list.len() == n {
            return list;
        }
        assert!(Instant::now() < deadline, "waiting for {n}: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn inbox_count(dev: &Dev, address: &str) -> u64 {
    count(dev, address, "INBOX")
}

fn count(dev: &Dev, address: &str, mailbox: &str) -> u64 {
    let list: serde_json::Value =
        serde_json::from_str(&ok(dev, &["--json", "mailbox", "list", address], "")).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == mailbox)
        .unwrap_or_else(|| panic!("no {mailbox} in {list}"))["messages"]
        .as_u64()
        .unwrap()
}

/// A DNS server for the dev platform's auth-check, and the variable pointing it there.
fn dns() -> (mailmesh_testkit::dns::DnsServer, String) {
    let dns = mailmesh_testkit::dns::DnsServer::start(&[
        r#"txt-record=example.org,"v=spf1 ip4:127.0.0.1 -all""#.into(),
        r#"txt-record=_dmarc.forged.test,"v=DMARC1; p=reject""#.into(),
    ]);
    let servers = format!("[\"{}\"]", dns.addr);
    (dns, servers)
}

/// `mailctl dev` asking its own DNS server, with tenant acme and alice@acme.test.
async fn dev_with_alice() -> (mailmesh_testkit::dns::DnsServer, Dev) {
    let (dns, servers) = dns();
    let dev = start(&[("MAILMESH_AUTH__DNS__SERVERS", &servers)]);
    wait_ready(&dev).await;
    ok(&dev, &["tenant", "add", "acme"], "");
    ok(&dev, &["domain", "add", "acme", "acme.test"], "");
    ok(
        &dev,
        &["user", "add", "alice@acme.test", "--password-stdin"],
        "pw\n",
    );
    (dns, dev)
}

/// Every stored message file under the dev data directory that contains `needle`.
fn stored_with(dev: &Dev, needle: &str) -> Vec<String> {
    fn walk(dir: &std::path::Path, needle: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, needle, out);
            } else if let Ok(text) = std::fs::read_to_string(&path)
                && text.contains(needle)
                && text.starts_with("Return-Path:")
            {
                out.push(text);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dev.data, needle, &mut out);
    out
}

#[tokio::test]
async fn smtplib_sends_and_the_message_lands_in_the_inbox() {
    let (_dns, dev) = dev_with_alice().await;
    ok(
        &dev,
        &["user", "add", "bob@acme.test", "--password-stdin"],
        "pw\n",
    );

    let script = r#"
import ssl
s.ehlo('client.example.org')
s.starttls(context=ssl._create_unverified_context())
s.ehlo('client.example.org')
print('pipelining' in s.esmtp_features, 'smtputf8' in s.esmtp_features)
refused = s.sendmail('sender@example.org', ['alice@acme.test', 'bob@acme.test'],
    b'Subject: hello\r\nFrom: sender@example.org\r\n\r\nHi from smtplib\r\n')
print('refused', refused)
try:
    s.sendmail('sender@example.org', ['nobody@elsewhere.example'], b'Subject: x\r\n\r\nx\r\n')
except smtplib.SMTPRecipientsRefused as e:
    print('relay', e.recipients['nobody@elsewhere.example'][0])
s.quit()
"#;
    let out = smtplib(&dev, script);
    assert_eq!(out, "True True\nrefused {}\nrelay 550\n");

    // A message to two local users lands once in each.
    let deadline = Instant::now() + Duration::from_secs(30);
    while inbox_count(&dev, "alice@acme.test") < 1 || inbox_count(&dev, "bob@acme.test") < 1 {
        assert!(
            Instant::now() < deadline,
            "the message never reached both INBOXes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(inbox_count(&dev, "alice@acme.test"), 1);
    assert_eq!(inbox_count(&dev, "bob@acme.test"), 1);
}

/// Issue 19: mail for a mailbox that fills up between RCPT and delivery is not
/// lost in a worker's retry loop: it waits in `mailctl queue list` as `local`, with
/// the reason, and arrives once there is room and an operator retries it.
#[tokio::test]
async fn mail_for_a_full_mailbox_waits_in_the_queue_list_with_its_reason() {
    let (_dns, dev) = dev_with_alice().await;
    ok(&dev, &["user", "quota", "alice@acme.test", "3000"], "");
    // No SIZE declared (smtplib's mail/rcpt/data): RCPT sees room left, and only
    // the delivery of the second message finds the mailbox full.
    let send = |subject: &str| {
        smtplib(
            &dev,
            &format!(
                r#"
s.ehlo('client.example.org')
s.mail('sender@example.org')
print(s.rcpt('alice@acme.test')[0])
print(s.data(b'Subject: {subject}\r\nFrom: sender@example.org\r\n\r\n' + b'x' * 2000 + b'\r\n')[0])
s.quit()
"#
            ),
        )
    };
    assert_eq!(send("first"), "250\n250\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while inbox_count(&dev, "alice@acme.test") < 1 {
        assert!(Instant::now() < deadline, "the first message never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(send("second"), "250\n250\n");

    let waiting = waiting_until(&dev, 1).await;
    let m = &waiting[0];
    assert_eq!(m["stage"], "local", "{m}");
    assert_eq!(
        m["recipients"],
        serde_json::json!(["alice@acme.test"]),
        "{m}"
    );
    assert_eq!(m["attempts"], 1, "{m}");
    let error = m["last_error"].as_str().unwrap();
    assert!(
        error.contains("<alice@acme.test>: 4.2.2"),
        "the reason is shown: {error}"
    );
    let listed = ok(&dev, &["queue", "list"], "");
    assert!(
        listed.contains("  local  ") && listed.contains("to <alice@acme.test>"),
        "{listed}"
    );
    let queue_id = m["queue_id"].as_str().unwrap().to_owned();
    let shown = ok(&dev, &["queue", "show", &queue_id], "");
    assert!(shown.contains("Subject: second"), "{shown}");

    // Room made and the message retried: it arrives, once, and waits no more.
    ok(&dev, &["user", "quota", "alice@acme.test", "1000000"], "");
    ok(&dev, &["queue", "retry", &queue_id], "");
    let deadline = Instant::now() + Duration::from_secs(30);
    while inbox_count(&dev, "alice@acme.test") < 2 {
        assert!(
            Instant::now() < deadline,
            "the second message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    waiting_until(&dev, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(inbox_count(&dev, "alice@acme.test"), 2);
}

/// RFC 5321 4.5.1: `RCPT TO:<Postmaster>` is accepted on a fresh dev platform, and
/// the message is in the postmaster mailbox dev made, readable over IMAP with the
/// password dev keeps in its data directory.
#[tokio::test]
async fn a_fresh_dev_takes_mail_for_the_postmaster() {
    let (dns, servers) = dns();
    let dev = start(&[("MAILMESH_AUTH__DNS__SERVERS", &servers)]);
    wait_ready(&dev).await;
    let out = smtplib(
        &dev,
        r#"
s.ehlo('client.example.org')
print(s.sendmail('sender@example.org', ['Postmaster'],
    b'Subject: for the postmaster\r\nFrom: sender@example.org\r\n\r\nhello\r\n'))
s.quit()
"#,
    );
    assert_eq!(out, "{}\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while inbox_count(&dev, "postmaster@localhost") < 1 {
        assert!(Instant::now() < deadline, "no mail for the postmaster");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let password = std::fs::read_to_string(dev.data.join("postmaster.password")).unwrap();
    let out = python(&format!(
        r#"
import imaplib, ssl
m = imaplib.IMAP4('127.0.0.1', {port})
m.starttls(ssl_context=ssl._create_unverified_context())
m.login('postmaster@localhost', {password:?})
m.select('INBOX')
print(m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')[1][0][1].decode().strip())
"#,
        port = dev.imap_port,
        password = password.trim()
    ));
    assert_eq!(out, "Subject: for the postmaster\n");
    drop(dns);
}

/// `mailctl dev` relaying to a test MX for remote.test (answering as `script`
/// says, found through its own DNS server), with tenant acme, domain acme.test and
/// the users `users` (password `pw`).
async fn dev_relaying_to(
    script: std::sync::Arc<mailmesh_testkit::mx::Script>,
    users: &[&str],
) -> (
    mailmesh_testkit::mx::TestMx,
    mailmesh_testkit::dns::DnsServer,
    Dev,
) {
    let mx = mailmesh_testkit::mx::TestMx::start(None, script);
    let dns = mailmesh_testkit::dns::DnsServer::start(&[
        "mx-host=remote.test,mx.remote.test,10".into(),
        "host-record=mx.remote.test,127.0.0.1".into(),
    ]);
    let servers = format!("[\"{}\"]", dns.addr);
    let port = mx.addr.port().to_string();
    let dev = start(&[
        ("MAILMESH_AUTH__DNS__SERVERS", &servers),
        ("MAILMESH_OUTBOUND__DNS__SERVERS", &servers),
        ("MAILMESH_OUTBOUND__PORT", &port),
        ("MAILMESH_OUTBOUND__ALLOW_PRIVATE_DESTINATIONS", "true"),
    ]);
    wait_ready(&dev).await;
    ok(&dev, &["tenant", "add", "acme"], "");
    ok(&dev, &["domain", "add", "acme", "acme.test"], "");
    for user in users {
        ok(&dev, &["user", "add", user, "--password-stdin"], "pw\n");
    }
    (mx, dns, dev)
}

/// A key made with `mailctl dkim generate` signs the very next message, though
/// submission had just cached that the domain has none (storage announces key
/// changes through the cache; `key_cache_ttl` is a minute).
#[tokio::test]
async fn a_new_dkim_key_signs_the_next_message() {
    let (mx, _dns, dev) = dev_relaying_to(
        std::sync::Arc::new(|_: &str, _| "250 2.1.5 ok".to_owned()),
        &["alice@acme.test"],
    )
    .await;
    let send = |subject: &str| {
        python(&format!(
            r#"
import smtplib, ssl
s = smtplib.SMTP('127.0.0.1', {port}, timeout=30)
s.starttls(context=ssl._create_unverified_context())
s.login('alice@acme.test', 'pw')
s.sendmail('alice@acme.test', ['friend@remote.test'],
    b'From: alice@acme.test\r\nSubject: {subject}\r\n\r\nhello\r\n')
s.quit()
"#,
            port = dev.submission_port
        ))
    };
    send("before the key");
    mx.wait_for(1, Duration::from_secs(60));
    ok(
        &dev,
        &["dkim", "generate", "acme.test", "--selector", "fresh"],
        "",
    );
    send("after the key");
    let got = mx.wait_for(2, Duration::from_secs(60));
    let text = |subject: &str| {
        got.iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned())
            .find(|m| m.contains(subject))
            .unwrap_or_else(|| panic!("no {subject:?} at the MX"))
    };
    assert!(!text("before the key").contains("DKIM-Signature"));
    assert!(
        text("after the key").contains("DKIM-Signature: v=1; a=rsa-sha256; s=fresh; d=acme.test;"),
        "{}",
        text("after the key")
    );
}

#[tokio::test]
async fn swaks_delivers_and_the_tenant_policy_files_forgeries_as_junk() {
    let (_dns, dev) = dev_with_alice().await;
    let swaks = |from: &str, header_from: &str, body: &str| {
        Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{}", dev.smtp_port)])
            .args(["--tls", "--ehlo", "client.example.org"])
            .args(["--from", from, "--to", "alice@acme.test"])
            .args(["--header", &format!("From: {header_from}")])
            .args(["--body", body, "--timeout", "30"])
            .output()
            .expect("swaks (scripts/backends.sh installs it)")
    };
    let out = swaks("bob@example.org", "bob@example.org", "hello from swaks");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{transcript}");
    assert!(
        transcript.contains("<~  250 2.0.0 Ok: queued as "),
        "{transcript}"
    );

    // DMARC p=reject: the default policy refuses it, at the end of the data.
    let out = swaks("bob@example.org", "ceo@forged.test", "forged, refused");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{transcript}");
    assert!(
        transcript.contains("* 550 5.7.1 Rejected by the DMARC policy of forged.test"),
        "{transcript}"
    );

    // The tenant asks for Junk instead: the next forgery is accepted there.
    let said = ok(
        &dev,
        &["tenant", "policy", "acme", "--dmarc-reject", "junk"],
        "",
    );
    assert!(said.contains("p=reject -> junk"), "{said}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&dev, &["--json", "tenant", "list"], "")).unwrap();
    assert_eq!(listed[0]["inbound_policy"]["dmarc_reject"], "junk");
    let out = swaks("bob@example.org", "ceo@forged.test", "forged, junked");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&dev, "alice@acme.test", "INBOX") < 1 || count(&dev, "alice@acme.test", "Junk") < 1
    {
        assert!(Instant::now() < deadline, "messages not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&dev, "alice@acme.test", "INBOX"), 1);
    assert_eq!(count(&dev, "alice@acme.test", "Junk"), 1);
    let stored = stored_with(&dev, "hello from swaks");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let m = &stored[0];
    assert!(
        m.starts_with(
            "Return-Path: <bob@example.org>\r\nDelivered-To: alice@acme.test\r\n\
             Authentication-Results: localhost;\r\n\tdkim=none;\r\n\tspf=pass"
        ),
        "{m}"
    );
    assert!(
        m.contains("\r\nReceived: from client.example.org ([127.0.0.1])"),
        "{m}"
    );
    let junked = stored_with(&dev, "forged, junked");
    assert_eq!(junked.len(), 1);
    assert!(junked[0].contains("dmarc=fail"), "{}", junked[0]);

    // And alice reads her INBOX with a POP3 client (Python's poplib, over STLS).
    let script = format!(
        r#"
import poplib, ssl
p = poplib.POP3('127.0.0.1', {port}, timeout=30)
p.stls(context=ssl._create_unverified_context())
p.user('alice@acme.test')
p.pass_('pw')
print(p.stat()[0])
print(b'\n'.join(p.retr(1)[1]).decode())
p.quit()
"#,
        port = dev.pop3_port
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("1\nReturn-Path: <bob@example.org>\n"),
        "{text}"
    );
    assert!(text.contains("\nhello from swaks\n"), "{text}");

    // And with an IMAP client (Python's imaplib, STARTTLS): the junked one is in Junk.
    let out = python(&format!(
        r#"
import imaplib, ssl
m = imaplib.IMAP4('127.0.0.1', {port})
m.starttls(ssl_context=ssl._create_unverified_context())
m.login('alice@acme.test', 'pw')
m.select('Junk')
print(m.search(None, 'TEXT', 'junked')[1][0].decode())
m.logout()
"#,
        port = dev.imap_port
    ));
    assert_eq!(out, "1\n");
}

/// The issue's whole outbound path with clients written by others: Python's smtplib
/// submits over STARTTLS with AUTH; the message is DKIM-signed with the key
/// `mailctl dkim generate` made, relayed to the MX a real DNS server names (a test
/// MX on loopback), and dkimpy verifies it with the record mailctl printed. A local
/// recipient of the same message gets it in the INBOX; a forged sender is refused.
#[tokio::test]
async fn submitted_mail_is_signed_and_relayed_to_the_remote_mx() {
    // busy@ and stay@ are deferred until the test lets them through.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opened = open.clone();
    let (mx, _dns, dev) = dev_relaying_to(
        std::sync::Arc::new(move |rcpt: &str, _| {
            let held = rcpt.starts_with("busy@") || rcpt.starts_with("stay@");
            if held && !opened.load(std::sync::atomic::Ordering::SeqCst) {
                "452 4.2.2 mailbox busy, try later".to_owned()
            } else {
                "250 2.1.5 ok".to_owned()
            }
        }),
        &["alice@acme.test", "bob@acme.test"],
    )
    .await;
    let printed = ok(
        &dev,
        &["dkim", "generate", "acme.test", "--selector", "mm1"],
        "",
    );
    let record_line = printed
        .lines()
        .find(|l| l.starts_with("mm1._domainkey.acme.test. IN TXT "))
        .unwrap_or_else(|| panic!("no DNS record in {printed}"));
    // Quoted character-strings of at most 255 octets each, joined as resolvers do.
    let pieces: Vec<&str> = record_line.split('"').skip(1).step_by(2).collect();
    assert!(
        pieces.len() > 1 && pieces.iter().all(|p| p.len() <= 255),
        "{record_line}"
    );
    let record = pieces.concat();
    assert!(record.starts_with("v=DKIM1; k=rsa; p="), "{record}");

    let out = python(&format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP('127.0.0.1', {port}, timeout=30)
s.ehlo('laptop')
print('auth' in s.esmtp_features)
s.starttls(context=ssl._create_unverified_context())
s.ehlo('laptop')
print('auth' in s.esmtp_features)
s.login('alice@acme.test', 'pw')
try:
    s.sendmail('bob@acme.test', ['friend@remote.test'], b'Subject: x\r\n\r\nx\r\n')
except smtplib.SMTPSenderRefused as e:
    print('forged', e.smtp_code)
refused = s.sendmail('alice@acme.test', ['friend@remote.test', 'bob@acme.test'],
    b'From: Alice <alice@acme.test>\r\nTo: friend@remote.test\r\nSubject: signed and sent\r\n\r\nHello from mailmesh.\r\n')
print('refused', refused)
s.sendmail('alice@acme.test', ['busy@remote.test'], b'Subject: wait for it\r\n\r\nlater\r\n')
s.sendmail('alice@acme.test', ['stay@remote.test'], b'Subject: never mind\r\n\r\ndrop me\r\n')
s.quit()
"#,
        port = dev.submission_port
    ));
    assert_eq!(out, "False\nTrue\nforged 553\nrefused {}\n");

    let got = mx.wait_for(1, Duration::from_secs(60));
    let sent = got
        .iter()
        .find(|m| m.recipients == ["friend@remote.test"])
        .unwrap_or_else(|| panic!("nothing for friend@remote.test: {got:?}"));
    let relayed = String::from_utf8_lossy(&sent.data).into_owned();
    assert_eq!(sent.mail_from, "alice@acme.test");
    assert!(
        relayed.contains("DKIM-Signature: v=1; a=rsa-sha256; s=mm1; d=acme.test;"),
        "{relayed}"
    );
    assert!(relayed.contains("with ESMTPSA id"), "{relayed}");
    assert!(relayed.contains("\r\nMessage-ID: <"), "{relayed}");
    // dkimpy (Debian python3-dkim) checks it against the record mailctl printed.
    assert!(
        mailmesh_testkit::dkimpy_verifies(relayed.as_bytes(), "mm1._domainkey.acme.test", &record),
        "{relayed}"
    );

    // The two deferred messages wait in the queue, due in 5 minutes.
    let waiting = waiting_until(&dev, 2).await;
    let id_of = |rcpt: &str| {
        waiting
            .iter()
            .find(|m| m["recipients"][0] == rcpt)
            .unwrap_or_else(|| panic!("{rcpt} not waiting: {waiting:?}"))["queue_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (busy, stay) = (id_of("busy@remote.test"), id_of("stay@remote.test"));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for m in &waiting {
        assert_eq!(m["attempts"], 1, "{m}");
        assert_eq!(m["sender"], "alice@acme.test", "{m}");
        assert!(m["due_ms"].as_i64().unwrap() > now_ms + 60_000, "{m}");
        let error = m["last_error"].as_str().unwrap();
        assert!(
            error.contains("452 4.2.2 mailbox busy") && error.contains("mx.remote.test"),
            "{error}"
        );
    }
    let shown = ok(&dev, &["queue", "show", &busy], "");
    assert!(
        shown.contains("to <busy@remote.test>") && shown.contains("attempts 1"),
        "{shown}"
    );
    assert!(
        shown.contains("Subject: wait for it"),
        "headers shown: {shown}"
    );
    assert!(
        !mailctl(
            &dev,
            &["queue", "show", "0190a4d1c0de7000800000000000abcd"],
            ""
        )
        .status
        .success()
    );
    // Deleted: it is gone and never sent.
    ok(&dev, &["queue", "delete", &stay], "");
    let waiting = waiting_until(&dev, 1).await;
    assert_eq!(waiting[0]["queue_id"], busy.as_str());
    // The destination is fixed: retrying its domain sends the waiting message now.
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    let retried = ok(&dev, &["queue", "retry", "--domain", "Remote.Test"], "");
    assert!(
        retried.contains("1 waiting message(s) due now"),
        "{retried}"
    );
    let got = mx.wait_for(2, Duration::from_secs(60));
    assert_eq!(got[1].recipients, ["busy@remote.test"]);
    waiting_until(&dev, 0).await;
    // The deleted one is gone for the queue commands too.
    for command in ["show", "retry", "delete"] {
        let out = mailctl(&dev, &["queue", command, &stay], "");
        assert!(
            !out.status.success(),
            "queue {command} of a deleted message"
        );
    }
    assert!(
        !mailctl(&dev, &["queue", "retry"], "").status.success(),
        "an id, --all or --domain"
    );

    // The local copy of the same message.
    let deadline = Instant::now() + Duration::from_secs(30);
    while inbox_count(&dev, "bob@acme.test") < 1 {
        assert!(Instant::now() < deadline, "bob never got the message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = stored_with(&dev, "signed and sent");
    assert!(
        stored.iter().any(|m| m.contains("DKIM-Signature:")),
        "{stored:?}"
    );
}
