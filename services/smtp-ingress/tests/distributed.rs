//! The inbound path as deployed: `storage`, `auth-check`, `delivery-worker`,
//! `smtp-ingress` and `imap-pop3-gateway` as separate processes on real Kafka, S3 and
//! Redis (`MMTEST_*`), with
//! a real DNS server (dnsmasq) publishing SPF and DMARC records. Python's smtplib
//! sends over STARTTLS; the message ends up in the user's INBOX with its trace and
//! Authentication-Results headers; a DMARC p=reject forgery is refused and a
//! p=quarantine one is filed in Junk; a second recipient reads the message over POP3
//! (poplib, STLS) and deletes it, the first reads hers over IMAP (imaplib, implicit
//! TLS) and finds the junked one in Junk; an IMAP IDLE started before the mail was
//! sent is woken by its delivery.

mod common;

use std::process::Command;

use common::processes::{
    acme_with_users, backends, spawn, spawn_storage, stateless, uuid_like, wait_for,
    wait_for_messages,
};
use futures::StreamExt;
use mailmesh_proto::v1;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_testkit::{backend_env, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_to_inbox_through_separate_processes() {
    let run = format!("e2e{}", uuid_like());
    let grpc = free_port();
    let auth_grpc = free_port();
    let smtp = free_port();
    let dns = mailmesh_testkit::dns::DnsServer::start(&[
        r#"txt-record=example.org,"v=spf1 ip4:127.0.0.1 -all""#.into(),
        r#"txt-record=_dmarc.example.org,"v=DMARC1; p=reject""#.into(),
        r#"txt-record=_dmarc.quarantine.test,"v=DMARC1; p=quarantine""#.into(),
        "ptr-record=1.0.0.127.in-addr.arpa,client.example.org".into(),
        "host-record=client.example.org,127.0.0.1".into(),
    ]);
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let topic = format!("{run}.mail");

    let storage = spawn_storage(&run, grpc);

    // auth-check keeps no state: it is only told where DNS is.
    let mut env = stateless(&run);
    env.push(("MAILMESH_GRPC_LISTEN", format!("127.0.0.1:{auth_grpc}")));
    env.push(("MAILMESH_AUTH__AUTHSERV_ID", "mx.acme.test".into()));
    env.push(("MAILMESH_AUTH__DNS__SERVERS", format!("[\"{}\"]", dns.addr)));
    let auth = spawn("auth-check", &env);

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = mailmesh_kit::tls::ensure_self_signed(dir.path(), &["localhost"]).unwrap();
    let mut env = backends(&run);
    env.push(("MAILMESH_LISTEN", format!("127.0.0.1:{smtp}")));
    env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
    env.push((
        "MAILMESH_AUTH_CHECK_ENDPOINT",
        format!("http://127.0.0.1:{auth_grpc}"),
    ));
    env.push(("MAILMESH_SMTP__TOPIC", topic.clone()));
    env.push(("MAILMESH_SMTP__HOSTNAME", "mx.acme.test".into()));
    env.push(("MAILMESH_TLS__CERT_FILE", cert.display().to_string()));
    env.push(("MAILMESH_TLS__KEY_FILE", key.display().to_string()));
    // Rate limits counted in the real Redis.
    env.push(("MAILMESH_CACHE__REDIS__URL", backend_env("MMTEST_REDIS")));
    env.push(("MAILMESH_CACHE__REDIS__KEY_PREFIX", format!("{run}:")));
    let ingress = spawn("smtp-ingress", &env);

    let mut env = backends(&run);
    env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
    env.push(("MAILMESH_WORKER__TOPIC", topic.clone()));
    env.push(("MAILMESH_WORKER__GROUP", format!("{run}.workers")));
    env.push((
        "MAILMESH_WORKER__RETRY_PREFIX",
        format!("{run}/local-retry"),
    ));
    // Not the default outbound group, which other tests' workers share.
    env.push(("MAILMESH_OUTBOUND__GROUP", format!("{run}.outbound")));
    env.push(("MAILMESH_WORKER__HOSTNAME", "mx.acme.test".into()));
    let worker = spawn("delivery-worker", &env);
    // The gateway reads what was delivered: POP3 with STLS, locks in Redis.
    let pop3 = free_port();
    let mut env = stateless(&run);
    let imaps = free_port();
    env.push(("MAILMESH_POP3_LISTEN", format!("127.0.0.1:{pop3}")));
    env.push(("MAILMESH_IMAP_LISTEN", format!("127.0.0.1:{}", free_port())));
    env.push(("MAILMESH_IMAPS_LISTEN", format!("127.0.0.1:{imaps}")));
    env.push((
        "MAILMESH_POP3S_LISTEN",
        format!("127.0.0.1:{}", free_port()),
    ));
    env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
    env.push(("MAILMESH_TLS__CERT_FILE", cert.display().to_string()));
    env.push(("MAILMESH_TLS__KEY_FILE", key.display().to_string()));
    env.push(("MAILMESH_CACHE__REDIS__URL", backend_env("MMTEST_REDIS")));
    env.push(("MAILMESH_CACHE__REDIS__KEY_PREFIX", format!("{run}:")));
    let gateway = spawn("imap-pop3-gateway", &env);
    let logs = [&storage, &auth, &ingress, &worker, &gateway];

    let (channel, users, admin) = acme_with_users(
        &storage,
        &endpoint,
        &["alice@acme.test", "carol@acme.test", "dave@acme.test"],
    )
    .await;
    let (alice, carol) = (users[0].clone(), users[1].clone());
    let mailboxes = MailboxesClient::new(channel);

    wait_for("auth-check listening", &logs, || async {
        std::net::TcpStream::connect(("127.0.0.1", auth_grpc)).ok()
    })
    .await;
    // Carol idles on her empty INBOX through the gateway (imaplib over implicit TLS,
    // IDLE by hand: Python 3.11's imaplib has no idle()); the mail sent below must
    // wake her.
    wait_for("the gateway listening", &logs, || async {
        std::net::TcpStream::connect(("127.0.0.1", imaps)).ok()
    })
    .await;
    let idle_script = format!(
        r#"
import imaplib, ssl, sys
m = imaplib.IMAP4_SSL('127.0.0.1', {imaps}, ssl_context=ssl._create_unverified_context(), timeout=30)
m.login('carol@acme.test', 'pw')
# Never hang the test: a missing wake-up ends in a timeout, and the test says so.
m.sock.settimeout(90)
m.select('INBOX')
m.send(b'i1 IDLE\r\n')
print(m.readline().decode().strip(), flush=True)
print(m.readline().decode().strip(), flush=True)
m.send(b'DONE\r\n')
while True:
    line = m.readline().decode().strip()
    print(line, flush=True)
    if not line or line.startswith('i1 '):
        break
"#
    );
    let mut idler = Command::new("python3")
        .args(["-c", &idle_script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut idle_out = std::io::BufReader::new(idler.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut idle_out, &mut first).unwrap();
    assert_eq!(
        first.trim(),
        "+ idling",
        "IDLE did not start: {}",
        gateway.log()
    );
    wait_for("smtp-ingress listening", &logs, || async {
        std::net::TcpStream::connect(("127.0.0.1", smtp)).ok()
    })
    .await;
    let script = format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP('127.0.0.1', {smtp}, timeout=60)
s.ehlo('client.example.org')
s.starttls(context=ssl._create_unverified_context())
s.ehlo('client.example.org')
s.sendmail('bob@example.org', ['alice@acme.test', 'carol@acme.test'],
    b'Subject: distributed\r\nFrom: bob@example.org\r\n\r\nthrough three processes\r\n')
try:
    s.sendmail('mallory@elsewhere.test', ['alice@acme.test'],
        b'Subject: forged\r\nFrom: bob@example.org\r\n\r\npay me\r\n')
    print('forgery accepted')
except smtplib.SMTPDataError as e:
    print('refused', e.smtp_code, e.smtp_error.decode())
s.sendmail('news@quarantine.test', ['alice@acme.test'],
    b'Subject: offer\r\nFrom: news@quarantine.test\r\n\r\nbuy\r\n')
s.quit()
print('sent')
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "refused 550 5.7.1 Rejected by the DMARC policy of example.org\nsent\n",
        "smtplib: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ingress.log()
    );

    // What storage knows before the 250: dave's mailbox is full (a quota of one
    // byte), acme takes nothing over 100,000 bytes. Refused at RCPT (smtplib
    // declares SIZE), through the ingress's gRPC calls to storage.
    let mut directory = v1::directory_client::DirectoryClient::new(admin);
    directory
        .set_quota(v1::SetQuotaRequest {
            address: "dave@acme.test".into(),
            quota_bytes: 1,
        })
        .await
        .unwrap();
    directory
        .set_tenant_limits(v1::AddTenantRequest {
            tenant: "acme".into(),
            limits: Some(v1::TenantLimits {
                max_message_bytes: 100_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let refusals = format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP('127.0.0.1', {smtp}, timeout=60)
s.ehlo('client.example.org')
s.starttls(context=ssl._create_unverified_context())
s.ehlo('client.example.org')
for to, body in [('dave@acme.test', b'Subject: hi\r\n\r\nhi\r\n'),
                 ('alice@acme.test', b'Subject: big\r\n\r\n' + b'y' * 200000 + b'\r\n')]:
    try:
        s.sendmail('bob@example.org', [to], body)
        print('accepted')
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients[to]
        print('refused', code, text.decode().split(' ')[0])
s.quit()
"#
    );
    let out = Command::new("python3")
        .args(["-c", &refusals])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "refused 452 4.2.2\nrefused 552 5.3.4\n",
        "smtplib: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ingress.log()
    );

    // The delivery woke carol's IDLE.
    let woke = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut idle_out, &mut rest).unwrap();
        let _ = idler.wait();
        rest
    })
    .await
    .unwrap();
    // The idler is the first IMAP4rev1 session told: the message is \Recent to it.
    assert!(
        woke.starts_with("* 1 EXISTS\n* 1 RECENT\ni1 OK"),
        "IDLE was not woken by the delivery: {woke:?}\n{}",
        gateway.log()
    );

    let inbox = wait_for_messages(&logs, &mailboxes, &alice, "INBOX", 1).await;
    // The second recipient has it once too.
    let other = wait_for_messages(&logs, &mailboxes, &carol, "INBOX", 1).await;
    assert_eq!(other.messages, 1);
    assert_eq!(inbox.uid_next, 2);
    let mut stream = mailboxes
        .clone()
        .fetch(v1::FetchRequest {
            user: Some(alice.clone()),
            mailbox: "INBOX".into(),
            uid: 1,
            start: 0,
            end: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut message = Vec::new();
    while let Some(chunk) = stream.next().await {
        message.extend(chunk.unwrap().data);
    }
    let message = String::from_utf8(message).unwrap();
    // The quarantined message.
    let junk = wait_for_messages(&logs, &mailboxes, &alice, "Junk", 1).await;
    assert_eq!(junk.messages, 1);
    // The connection was counted in Redis (the per-IP limit is cluster-wide).
    let counted = Command::new("redis-cli")
        .args([
            "-u",
            &backend_env("MMTEST_REDIS"),
            "GET",
            &format!("{run}:smtp:conn:127.0.0.1"),
        ])
        .output()
        .unwrap();
    let counted: u32 = String::from_utf8_lossy(&counted.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(counted >= 1, "no connection counted in Redis");
    assert!(
        message.starts_with(
            "Return-Path: <bob@example.org>\r\nDelivered-To: alice@acme.test\r\n\
             Authentication-Results: mx.acme.test;\r\n\tdkim=none;\r\n\tspf=pass"
        ),
        "{message}"
    );
    for expected in [
        "iprev=pass policy.iprev=127.0.0.1",
        "dmarc=pass",
        "\r\nReceived: from client.example.org ([127.0.0.1])\r\n\tby mx.acme.test (mailmesh) with ESMTPS id ",
    ] {
        assert!(message.contains(expected), "{expected} missing: {message}");
    }
    assert!(
        message.ends_with(
            "Subject: distributed\r\nFrom: bob@example.org\r\n\r\nthrough three processes\r\n"
        ),
        "{message}"
    );

    // The readers, through the gateway process: carol over POP3, alice over IMAP.
    let script = format!(
        r#"
import imaplib, poplib, ssl
ctx = ssl._create_unverified_context()
p = poplib.POP3('127.0.0.1', {pop3}, timeout=30)
p.stls(context=ctx)
p.user('carol@acme.test')
p.pass_('pw')
print('pop3', p.stat()[0], b'through three processes' in b'\n'.join(p.retr(1)[1]))
p.dele(1)
p.quit()
m = imaplib.IMAP4_SSL('127.0.0.1', {imaps}, ssl_context=ctx)
m.login('alice@acme.test', 'pw')
print('imap', m.select('INBOX')[1][0].decode(), m.search(None, 'SUBJECT', 'distributed')[1][0].decode())
typ, data = m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)] FLAGS)')
print('subject', data[0][1].decode().strip())
m.select('Junk')
print('junk', m.search(None, 'FROM', 'news@quarantine.test')[1][0].decode())
m.logout()
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pop3 1 True\nimap 1 1\nsubject Subject: distributed\njunk 1\n",
        "readers: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    // Carol's POP3 deletion.
    let gone = wait_for_messages(&logs, &mailboxes, &carol, "INBOX", 0).await;
    assert_eq!(gone.messages, 0);
}
