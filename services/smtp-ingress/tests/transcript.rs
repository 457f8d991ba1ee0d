//! SMTP sessions driven in memory, command by command, against the real queue and
//! directory (embedded backends): the replies RFC 5321 requires, and what lands in
//! the queue.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailmesh_auth::{AuthCheck, AuthConfig, Checker, DnsConfig};
use mailmesh_delivery::worker::{Worker, WorkerConfig};
use mailmesh_ingress::IngressConfig;
use mailmesh_kit::{Secret, Shutdown};
use mailmesh_storage::index::INBOX;
use mailmesh_testkit::dns::DnsServer;
use mailmesh_types::{BodyRef, InboundPolicy, PolicyAction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::session::{Client, body, open, server, server_with, server_with_tls, test_tls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_queued_then_delivered() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org> BODY=8BITMIME", "250 2.1.0")
        .await;
    c.cmd(
        "RCPT TO:<Alice@ACME.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;Alice@ACME.test",
        "250 2.1.5",
    )
    .await;
    c.cmd("DATA", "354").await;
    c.send("Subject: hi\r\n\r\nhello\r\n..leading dot\r\n.\r\n")
        .await;
    let reply = c.expect("250 2.0.0 Ok: queued as ").await;
    c.cmd("QUIT", "221 2.0.0").await;

    let queued = s.queued(1).await;
    let e = &queued[0];
    assert!(reply.contains(&e.queue_id.to_string()));
    assert_eq!(e.tenant.as_str(), "acme");
    assert_eq!(e.mail_from.to_string(), "bob@example.org");
    assert_eq!(e.recipients[0].address.to_string(), "Alice@acme.test");
    assert!(e.recipients[0].notify.failure && !e.recipients[0].notify.success);
    assert_eq!(
        e.recipients[0].orcpt.as_deref(),
        Some("rfc822;Alice@ACME.test")
    );
    assert_eq!(e.client.as_ref().unwrap().ip.to_string(), "192.0.2.7");
    let text = body(&s, e).await;
    assert!(text.starts_with("Received: from client.example.org ([192.0.2.7])\r\n\tby mx.acme.test (mailmesh) with ESMTP id "), "{text}");
    assert!(
        text.ends_with("Subject: hi\r\n\r\nhello\r\n.leading dot\r\n"),
        "dot-stuffing undone: {text:?}"
    );

    // And the delivery worker puts it in the INBOX.
    let shutdown = Shutdown::new();
    let worker = Worker::new(
        s.queue.clone(),
        s.objects.clone(),
        Arc::new(s.engine.clone()),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        WorkerConfig::default(),
    );
    tokio::spawn(worker.run(shutdown.clone()));
    let alice = s
        .engine
        .authenticate(
            &"alice@acme.test".parse().unwrap(),
            Secret::new("pw".into()),
        )
        .await
        .unwrap()
        .unwrap();
    let user = mailmesh_storage::engine::UserRef {
        tenant: alice.tenant,
        user: alice.id,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = s
            .engine
            .read_index(&user, |i| {
                i.and_then(|i| i.mailbox(INBOX))
                    .map_or(0, |m| m.messages.len())
            })
            .await
            .unwrap();
        if n == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = s.engine.fetch(&user, INBOX, 1, None).await.unwrap();
    let stored = String::from_utf8(stored.to_vec()).unwrap();
    assert!(stored.starts_with("Return-Path: <bob@example.org>\r\nDelivered-To: Alice@acme.test\r\nReceived: from client.example.org"), "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_out_of_sequence_and_bad_input() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.cmd("MAIL FROM:<bob@example.org>", "503 5.5.1").await;
    c.cmd("RCPT TO:<alice@acme.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("FROB", "500 5.5.1").await;
    c.hello().await;
    c.cmd("RCPT TO:<alice@acme.test>", "503 5.5.1").await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("MAIL FROM:<bob@example.org>", "503 5.5.1").await;
    c.cmd("DATA", "554 5.5.1").await;
    c.cmd("RCPT TO:<someone@elsewhere.example>", "550 5.7.1")
        .await;
    c.cmd("RCPT TO:<ghost@acme.test>", "550 5.1.1").await;
    c.cmd("RCPT TO:<not an address>", "501").await;
    c.cmd("RCPT TO:<用户@acme.test>", "553 5.6.7").await;
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("VRFY alice", "252 2.1.5").await;
    c.cmd("STARTTLS", "502 5.5.1").await;
    c.cmd("AUTH PLAIN AGFsaWNlAHB3", "503 5.5.1").await;
    c.cmd("NOOP", "250 2.0.0").await;
    c.cmd(&format!("NOOP {}", "x".repeat(5000)), "500 5.5.2")
        .await;
    c.cmd("NOOP", "250 2.0.0").await;
    s.queued(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_are_answered_in_order() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.send("MAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@acme.test>\r\nRCPT TO:<ghost@acme.test>\r\nRCPT TO:<ALICE@acme.test>\r\nDATA\r\n").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("550 5.1.1").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.send("Subject: piped\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        .await;
    c.expect("250 2.0.0 Ok: queued").await;
    c.expect("250 2.0.0").await;
    c.expect("221").await;
    assert_eq!(s.queued(1).await[0].recipients.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_and_too_many_errors() {
    let s = server(IngressConfig {
        max_message_bytes: 1000,
        max_errors: 4,
        inline_body_bytes: 100,
        ..IngressConfig::default()
    })
    .await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org> SIZE=5000", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&format!(
        "Subject: big\r\n\r\n{}\r\n.\r\n",
        "y".repeat(2000)
    ))
    .await;
    c.expect("552 5.3.4").await;
    // The session is still in step, and a fitting message (stored as an object,
    // being over the inline size) goes through.
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&format!(
        "Subject: fits\r\n\r\n{}\r\n.\r\n",
        "z".repeat(500)
    ))
    .await;
    c.expect("250 2.0.0").await;
    let queued = s.queued(1).await;
    assert!(matches!(queued[0].body, BodyRef::Object { .. }));
    assert!(body(&s, &queued[0]).await.contains("Subject: fits"));

    c.cmd("FROB", "500").await;
    c.cmd("FROB", "500").await;
    c.cmd("FROB", "500").await;
    c.expect("421 4.7.0").await;
}

/// The recipient's tenant's size limit holds on the MX too, before any `250`: a
/// larger message declared with `SIZE=` is refused at RCPT, one that turns out
/// larger in DATA or BDAT is refused instead of the `250` (accepting it would
/// mean a bounce, with the message, to a sender that may be forged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipients_tenant_size_limit_is_kept_before_250() {
    let s = server(IngressConfig::default()).await;
    s.engine
        .set_tenant_limits(
            "acme".parse().unwrap(),
            mailmesh_storage::directory::TenantLimits {
                max_message_bytes: Some(10_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let big = format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(21_000));
    let mut c = Client::connect(&s).await;
    c.hello().await;
    // Declared: the port takes it, the recipient's tenant does not.
    c.cmd("MAIL FROM:<bob@example.org> SIZE=21000", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "552 5.3.4").await;
    c.cmd("RSET", "250").await;
    // Undeclared, in DATA.
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&format!("{big}.\r\n")).await;
    c.expect("552 5.3.4").await;
    // Undeclared, in BDAT.
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.send(&format!("BDAT {} LAST\r\n{big}", big.len())).await;
    c.expect("552 5.3.4").await;
    // What fits goes through.
    c.cmd("MAIL FROM:<bob@example.org> SIZE=5000", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("Subject: small\r\n\r\nfits\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    assert!(body(&s, &queued[0]).await.contains("Subject: small"));
}

/// A recipient whose mailbox storage knows to be full is refused for now at RCPT
/// (452 4.2.2, with the size declared at MAIL), not accepted into a retry loop;
/// it is taken again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_is_refused_for_now_at_rcpt() {
    use mailmesh_storage::directory::Lookup;
    use mailmesh_storage::engine::{Delivery, UserRef};
    use mailmesh_types::{EmailAddress, ReversePath};
    let s = server(IngressConfig::default()).await;
    let alice: EmailAddress = "alice@acme.test".parse().unwrap();
    let Lookup::Deliver(found) = s.engine.lookup(&alice).unwrap() else {
        panic!("alice is local");
    };
    let (tenant, user) = found.users[0].clone();
    let user_ref = UserRef { tenant, user };
    s.engine
        .set_quota(alice.clone(), Some(1_000))
        .await
        .unwrap();
    let fill = format!("Subject: fill\r\n\r\n{}\r\n", "x".repeat(800));
    let sender: ReversePath = "bob@example.org".parse().unwrap();
    s.engine
        .deliver(
            &user_ref,
            Delivery {
                mailbox: INBOX,
                return_path: &sender,
                delivered_to: &alice,
                message: fill.as_bytes(),
                key: "fill/1",
                internal_date_ms: 0,
            },
        )
        .await
        .unwrap();
    let (used, _) = s.engine.quota(&user_ref).await.unwrap();
    let left = 1_000 - used;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    // No room for one byte more than is left, room for what is left.
    c.cmd(
        &format!("MAIL FROM:<bob@example.org> SIZE={}", left + 1),
        "250",
    )
    .await;
    c.cmd("RCPT TO:<alice@acme.test>", "452 4.2.2").await;
    c.cmd("RSET", "250").await;
    c.cmd(&format!("MAIL FROM:<bob@example.org> SIZE={left}"), "250")
        .await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("RSET", "250").await;
    // Over the quota already (it was lowered): refused whatever the size.
    s.engine.set_quota(alice.clone(), Some(500)).await.unwrap();
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "452 4.2.2").await;
    c.cmd("RSET", "250").await;
    // Room again.
    s.engine.set_quota(alice, Some(100_000)).await.unwrap();
    c.cmd("MAIL FROM:<bob@example.org> SIZE=500", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("QUIT", "221").await;
}

/// SMTP smuggling: a bare `<LF>.<LF>` inside the data does not end the message, so a
/// second "transaction" hidden in it is just text of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_data_end_is_not_an_end() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.message("Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<admin@acme.test>\r\nRCPT TO:<alice@acme.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n").await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    assert_eq!(queued[0].mail_from.to_string(), "bob@example.org");
    let text = body(&s, &queued[0]).await;
    assert!(text.contains("Subject: smuggled"));
    // And the bare LFs are gone: no later hop can see an end of data in it.
    assert!(text.contains("first\r\n.\r\nMAIL FROM"), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_and_too_many_recipients() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    for _ in 0..100 {
        c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    }
    c.cmd("RCPT TO:<alice@acme.test>", "452 4.5.3").await;
    let first = "Subject: chunked\r\n\r\n";
    c.send(&format!("BDAT {}\r\n{first}", first.len())).await;
    c.expect(&format!("250 2.0.0 {} octets", first.len())).await;
    let second = "no dot-stuffing here:\r\n.\r\n";
    c.send(&format!("BDAT {} LAST\r\n{second}", second.len()))
        .await;
    c.expect("250 2.0.0 Ok: queued").await;
    let queued = s.queued(1).await;
    assert!(
        body(&s, &queued[0])
            .await
            .ends_with("Subject: chunked\r\n\r\nno dot-stuffing here:\r\n.\r\n")
    );
}

/// A client that asks for STARTTLS and then never starts the handshake is dropped
/// after `tls_handshake_timeout`, not after a command timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_handshake_is_cut_short() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = test_tls(dir.path());
    let config = IngressConfig {
        tls_handshake_timeout: Duration::from_millis(300),
        ..IngressConfig::default()
    };
    let s = server_with_tls(config, Some(tls)).await;
    let mut c = Client::connect(&s).await;
    c.cmd("EHLO client.example.org", "250-").await;
    c.cmd("STARTTLS", "220 2.0.0").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), c.io.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?} {rest:?}");
}

/// RFC 3207 §4: STARTTLS with a parameter is a syntax error (501), and the session
/// stays in the clear, still able to start TLS properly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_a_parameter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = test_tls(dir.path());
    let s = server_with_tls(IngressConfig::default(), Some(tls)).await;
    let mut c = Client::connect(&s).await;
    c.cmd("EHLO client.example.org", "250-").await;
    c.cmd("STARTTLS junk", "501 5.5.4").await;
    c.cmd("STARTTLS   ", "220 2.0.0").await;
}

/// STARTTLS (RFC 3207): commands sent before the handshake are thrown away, the
/// session starts afresh over TLS, and the message records that it came over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_discards_injected_commands() {
    let dir = tempfile::tempdir().unwrap();
    let tls = test_tls(dir.path());
    let s = server_with_tls(IngressConfig::default(), Some(tls)).await;
    let mut c = Client::connect(&s).await;
    let ehlo = c.cmd("EHLO client.example.org", "250-").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    // An attacker's command rides along in the same packet as STARTTLS.
    c.send("STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        .await;
    c.expect("220 2.0.0").await;
    let mut c = c.tls().await;
    let ehlo = c.cmd("EHLO client.example.org", "250-").await;
    assert!(!ehlo.contains("STARTTLS"), "not offered twice: {ehlo}");
    c.cmd("RCPT TO:<alice@acme.test>", "503 5.5.1").await;
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.message("Subject: secret\r\n\r\nover tls\r\n.\r\n").await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    assert_eq!(queued[0].mail_from.to_string(), "bob@example.org");
    assert!(queued[0].client.as_ref().unwrap().tls);
    assert!(body(&s, &queued[0]).await.contains("with ESMTPS id"));
}

/// Review findings, each a transcript: the first line of DATA, BDAT then DATA, lines
/// split over many segments, parameters we do not support.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_transcripts() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    // A message whose first line is dot-stuffed (a header field: a line without a
    // colon is no header, and is refused), and an empty one.
    c.message("..first: line\r\n\r\nbody\r\n.\r\n").await;
    c.message(".\r\n").await;
    // DATA after BDAT is refused.
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("BDAT 0", "250 2.0.0 0 octets").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("RSET", "250").await;
    // A command line sent in small segments is measured whole.
    c.send("NOOP ").await;
    for _ in 0..30 {
        c.send(&"a".repeat(100)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.send("\r\nQUIT\r\n").await;
    c.expect("500 5.5.2").await;
    c.expect("221").await;
    let queued = s.queued(2).await;
    let texts = [body(&s, &queued[0]).await, body(&s, &queued[1]).await];
    assert!(
        texts
            .iter()
            .any(|t| t.ends_with("\r\n.first: line\r\n\r\nbody\r\n")),
        "{texts:?}"
    );

    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org> REQUIRETLS", "555 5.5.4")
        .await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test> NOTIFY=NEVER,SUCCESS", "501")
        .await;
}

/// A draining server ends idle sessions with 421 at once, and lets a transaction
/// under way finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_ends_idle_sessions_and_finishes_transactions() {
    let s = server(IngressConfig::default()).await;
    let shutdown = Shutdown::new();
    let mut idle = open(&s, "192.0.2.9:40000", &shutdown);
    idle.expect("220").await;
    idle.hello().await;
    let mut busy = open(&s, "192.0.2.9:40001", &shutdown);
    busy.expect("220").await;
    busy.hello().await;
    busy.cmd("MAIL FROM:<bob@example.org>", "250").await;
    let drain = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown
                .drain(
                    &mailmesh_kit::Health::new(),
                    &mailmesh_kit::config::ShutdownConfig {
                        readiness_grace: Duration::ZERO,
                        drain_timeout: Duration::from_secs(20),
                    },
                )
                .await
        })
    };
    idle.expect("421 4.3.2").await;
    busy.cmd("RCPT TO:<alice@acme.test>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send("Subject: last one\r\n\r\nbye\r\n.\r\n").await;
    busy.expect("250 2.0.0").await;
    // Idle again, it is told goodbye without waiting for another command.
    busy.expect("421 4.3.2").await;
    assert!(drain.await.unwrap(), "every session ended within the drain");
    s.queued(1).await;
}

/// Random input, built from fragments of real commands and raw bytes: every session
/// ends (no hang), nothing panics, and a well-formed session still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_input_never_breaks_the_server() {
    let s = server(IngressConfig {
        max_message_bytes: 4096,
        command_timeout: Duration::from_secs(2),
        data_timeout: Duration::from_secs(2),
        ..IngressConfig::default()
    })
    .await;
    const PIECES: &[&[u8]] = &[
        b"EHLO x\r\n",
        b"HELO \r\n",
        b"MAIL FROM:<a@b.c> SIZE=99999999999999999999\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<alice@acme.test> NOTIFY=NEVER,FAILURE ORCPT=rfc822;+2B\r\n",
        b"RCPT TO:<\xff\xfe@acme.test>\r\n",
        b"DATA\r\n",
        b"BDAT 7\r\n",
        b"BDAT 0 LAST\r\n",
        b"BDAT 18446744073709551615 LAST\r\n",
        b".\r\n",
        b"\r\n.\n",
        b"\n.\n",
        b"\r",
        b"\n",
        b"\0\0\0",
        b"STARTTLS\r\n",
        b"RSET\r\n",
        b"AUTH LOGIN\r\n",
        b"VRFY\r\n",
        b"NOOP",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..150 {
        let mut input = Vec::new();
        for _ in 0..(next() % 40) {
            if next() % 4 == 0 {
                input.extend((0..next() % 64).map(|_| next() as u8));
            } else {
                input.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
        }
        let (mut client, server_side) = tokio::io::duplex(1 << 16);
        let ingress = s.ingress.clone();
        let session = tokio::spawn(async move {
            let peer: SocketAddr = "192.0.2.66:1".parse().unwrap();
            mailmesh_ingress::session::Session::new(&ingress, peer)
                .run(server_side, &Shutdown::new())
                .await
        });
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut sink)).await;
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert!(
            matches!(ended, Ok(Ok(_))),
            "a session hung or panicked on {input:?}"
        );
    }
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.message("Subject: after the storm\r\n\r\nok\r\n.\r\n")
        .await;
}

/// Behind a trusted load balancer the PROXY header names the client; anyone else
/// sending one is just sending a bad command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_trusted_balancers_only() {
    let s = server(IngressConfig {
        proxy: mailmesh_ingress::proxy::ProxyConfig {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            timeout: None,
        },
        ..IngressConfig::default()
    })
    .await;
    let mut c = open(&s, "10.0.0.9:5000", &Shutdown::new());
    c.send("PROXY TCP4 203.0.113.5 198.51.100.1 4567 25\r\n")
        .await;
    c.expect("220").await;
    c.hello().await;
    c.message("Subject: via the balancer\r\n\r\nx\r\n.\r\n")
        .await;
    let queued = s.queued(1).await;
    assert_eq!(
        queued[0].client.as_ref().unwrap().ip.to_string(),
        "203.0.113.5"
    );
    assert!(body(&s, &queued[0]).await.contains("([203.0.113.5])"));

    // A trusted peer without a header is cut off; an untrusted one cannot spoof.
    let mut c = open(&s, "10.0.0.9:5001", &Shutdown::new());
    c.send("EHLO sneaky\r\n").await;
    assert_eq!(c.reply().await, "", "closed without a greeting");
    let mut c = open(&s, "192.0.2.50:5002", &Shutdown::new());
    c.expect("220").await;
    c.cmd("PROXY TCP4 203.0.113.5 198.51.100.1 4567 25", "500 5.5.1")
        .await;
}

/// Connection and tenant rates are limited through the shared counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits() {
    let s = server(IngressConfig {
        connections_per_ip_per_minute: 2,
        messages_per_tenant_per_minute: 1,
        ..IngressConfig::default()
    })
    .await;
    let mut first = open(&s, "198.51.100.77:1000", &Shutdown::new());
    first.expect("220").await;
    first.hello().await;
    for expected in ["250 2.0.0", "451 4.7.1"] {
        first.cmd("MAIL FROM:<bob@example.org>", "250").await;
        first.cmd("RCPT TO:<alice@acme.test>", "250").await;
        first.cmd("DATA", "354").await;
        first.send("Subject: rate\r\n\r\nx\r\n.\r\n").await;
        first.expect(expected).await;
    }
    let mut second = open(&s, "198.51.100.77:1001", &Shutdown::new());
    second.expect("220").await;
    let mut third = open(&s, "198.51.100.77:1002", &Shutdown::new());
    third.expect("421 4.7.0 Too many connections").await;
    s.queued(1).await;
}

/// auth-check in this process, asking a real DNS server that publishes: SPF for
/// example.org allowing 192.0.2.7 only, DMARC p=reject for forged.test and
/// p=quarantine for quarantine.test, and a block list bl.test listing 192.0.2.66.
fn checker() -> (DnsServer, Arc<dyn AuthCheck>) {
    let dns = DnsServer::start(&[
        r#"txt-record=example.org,"v=spf1 ip4:192.0.2.7 -all""#.into(),
        r#"txt-record=forged.test,"v=spf1 -all""#.into(),
        r#"txt-record=_dmarc.forged.test,"v=DMARC1; p=reject""#.into(),
        r#"txt-record=_dmarc.quarantine.test,"v=DMARC1; p=quarantine""#.into(),
        "host-record=66.2.0.192.bl.test,127.0.0.2".into(),
    ]);
    let checker = Checker::new(AuthConfig {
        authserv_id: "mx.acme.test".into(),
        dns: DnsConfig {
            servers: vec![dns.addr],
            ..DnsConfig::default()
        },
        block_lists: vec!["bl.test".into()],
        ..AuthConfig::default()
    })
    .unwrap();
    (dns, Arc::new(checker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_results_and_the_tenants_inbound_policy() {
    let (_dns, auth) = checker();
    let s = server_with(IngressConfig::default(), None, Some(auth)).await;

    // Passing SPF: queued with our header on top; a header forged under our
    // authserv-id is removed, another site's is kept.
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.message(
        "Authentication-Results: MX.ACME.TEST; dkim=pass header.d=example.org\r\n\
         Authentication-Results: other.example;\r\n spf=pass\r\n\
         From: Bob <bob@example.org>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n",
    )
    .await;
    // DMARC p=reject: refused after the data, nothing queued.
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("From: ceo@forged.test\r\nSubject: wire money\r\n\r\nnow\r\n.\r\n")
        .await;
    c.expect("550 5.7.1 Rejected by the DMARC policy of forged.test")
        .await;
    // DMARC p=quarantine: accepted and filed as junk.
    c.message("From: news@quarantine.test\r\nSubject: offer\r\n\r\nbuy\r\n.\r\n")
        .await;
    c.cmd("QUIT", "221").await;

    let queued = s.queued(2).await;
    let ok = queued.iter().find(|e| !e.junk).expect("one for INBOX");
    let junk = queued.iter().find(|e| e.junk).expect("one for Junk");
    assert!(body(&s, junk).await.contains("From: news@quarantine.test"));
    let text = body(&s, ok).await;
    assert!(
        text.starts_with("Authentication-Results: mx.acme.test;\r\n\tdkim=none;\r\n\tspf=pass"),
        "{text}"
    );
    assert!(!text.contains("dkim=pass header.d=example.org"), "{text}");
    assert!(text.contains("Authentication-Results: other.example;\r\n spf=pass\r\nFrom: Bob"));
    let value = ok.authentication_results.as_deref().unwrap();
    assert!(
        value.starts_with("mx.acme.test;") && value.contains("spf=pass"),
        "{value}"
    );

    // A listed client is refused per recipient, at RCPT.
    let shutdown = Shutdown::new();
    let mut c = open(&s, "192.0.2.66:40000", &shutdown);
    c.expect("220").await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd(
        "RCPT TO:<alice@acme.test>",
        "550 5.7.1 Client address 192.0.2.66 is listed by bl.test",
    )
    .await;
    c.cmd("QUIT", "221").await;

    // A tenant that only tags: the same client gets through, to INBOX.
    s.engine
        .set_inbound_policy(
            "acme".parse().unwrap(),
            InboundPolicy {
                block_listed: PolicyAction::Tag,
                ..InboundPolicy::default()
            },
        )
        .await
        .unwrap();
    let mut c = open(&s, "192.0.2.66:40001", &shutdown);
    c.expect("220").await;
    c.hello().await;
    c.message("From: bob@example.org\r\n\r\nlisted but tagged\r\n.\r\n")
        .await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(3).await;
    let mut tagged = Vec::new();
    for e in &queued {
        let text = body(&s, e).await;
        if text.contains("listed but tagged") {
            assert!(!e.junk);
            tagged.push(text);
        }
    }
    assert_eq!(tagged.len(), 1);
    assert!(tagged[0].contains("spf=fail"), "{}", tagged[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_policy_per_transaction_and_auth_check_outages_defer() {
    // auth-check that never answers: mail is deferred, never accepted unchecked.
    let port = mailmesh_testkit::free_port();
    let gone = mailmesh_auth::grpc::GrpcAuthCheck::new(
        &format!("http://127.0.0.1:{port}"),
        1 << 20,
        &mailmesh_kit::internal::testing::tls(mailmesh_kit::internal::Role::SmtpIngress),
    )
    .unwrap();
    let s = server_with(IngressConfig::default(), None, Some(Arc::new(gone))).await;
    s.engine
        .add_tenant("beta".parse().unwrap(), Default::default())
        .await
        .unwrap();
    s.engine
        .add_domain("beta".parse().unwrap(), "beta.test".parse().unwrap())
        .await
        .unwrap();
    s.engine
        .add_user(
            "carol@beta.test".parse().unwrap(),
            Secret::new("pw".into()),
            None,
        )
        .await
        .unwrap();
    s.engine
        .set_inbound_policy(
            "beta".parse().unwrap(),
            InboundPolicy {
                dmarc_reject: PolicyAction::Tag,
                block_listed: PolicyAction::Tag,
                ..InboundPolicy::default()
            },
        )
        .await
        .unwrap();
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    // acme rejects block-listed clients, so the client check runs: it is down.
    c.cmd("RCPT TO:<alice@acme.test>", "451 4.7.0").await;
    // beta only tags: accepted without asking.
    c.cmd("RCPT TO:<carol@beta.test>", "250").await;
    // acme's policy differs from beta's: not in this transaction.
    c.cmd("RCPT TO:<alice@acme.test>", "452 4.5.3").await;
    c.cmd("DATA", "354").await;
    c.send("From: bob@example.org\r\n\r\nx\r\n.\r\n").await;
    c.expect("451 4.7.0 Temporary authentication failure").await;
    c.cmd("QUIT", "221").await;
    s.queued(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_without_a_domain_is_accepted() {
    let s = server(IngressConfig {
        postmaster: Some("alice@acme.test".into()),
        ..IngressConfig::default()
    })
    .await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<Postmaster>", "250 2.1.5").await;
    // The null path is no recipient (the parser gives it as it gives <Postmaster>).
    c.cmd("RCPT TO:<>", "501 5.1.3").await;
    // A local domain without a postmaster of its own: the deployment's (RFC 5321
    // 4.5.1); an unknown user there or a foreign postmaster still not.
    c.cmd("RCPT TO:<PostMaster@acme.test>", "250 2.1.5").await;
    c.cmd("RCPT TO:<postmistress@acme.test>", "550 5.1.1").await;
    c.cmd("RCPT TO:<postmaster@example.org>", "550 5.7.1").await;
    c.cmd("DATA", "354").await;
    c.send("Subject: abuse report\r\n\r\nx\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    let queued = s.queued(1).await;
    let recipients = &queued[0].recipients;
    assert_eq!(recipients.len(), 2);
    assert!(
        recipients
            .iter()
            .all(|r| r.address.to_string() == "alice@acme.test")
    );
    assert_eq!(
        recipients[1].orcpt.as_deref(),
        Some("rfc822;PostMaster@acme.test")
    );

    // A deployment postmaster that is not a local address (the default,
    // postmaster@<hostname>, before anyone created it): unknown user, not "relaying".
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<postmaster@acme.test>", "550 5.1.1").await;
}

/// The fuzz target's seeds and every input it ever found a fault with
/// (`fuzz/seeds/smtp_session`), replayed with the same checks: well-formed replies
/// only, and the session ends when the input does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_seeds_and_regressions_replay_cleanly() {
    let s = server(IngressConfig {
        max_message_bytes: 64 << 10,
        command_timeout: Duration::from_secs(1),
        data_timeout: Duration::from_secs(1),
        ..IngressConfig::default()
    })
    .await;
    // Read when the test runs (a shared build cache may hold a binary compiled in
    // another checkout).
    let dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .join("../../fuzz/seeds/smtp_session");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let shutdown = Shutdown::new();
        let mut c = open(&s, "192.0.2.9:1", &shutdown);
        let _ = c.io.write_all(&input).await;
        let _ = c.io.shutdown().await;
        let mut output = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.io.read_to_end(&mut output))
            .await
            .unwrap_or_else(|_| panic!("{} did not end", path.display()))
            .unwrap();
        let text = String::from_utf8(output).unwrap();
        for line in text.split_terminator("\r\n") {
            let b = line.as_bytes();
            assert!(
                b.len() >= 3
                    && b[..3].iter().all(u8::is_ascii_digit)
                    && (b.len() == 3 || b[3] == b' ' || b[3] == b'-'),
                "{}: malformed reply {line:?}",
                path.display()
            );
        }
        replayed += 1;
    }
    assert!(replayed >= 2, "the seeds are missing");
}

/// Issue 16 §3: `From\0:` (and `Fr\0om:`, `\0From:`) passed the MX's DMARC check and
/// reached the reader as `From:`. NUL bytes and header names that are not printable
/// ASCII are refused at the end of the data, before any `250`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_odd_header_names_are_refused() {
    let (_dns, auth) = checker();
    let s = server_with(IngressConfig::default(), None, Some(auth)).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    for (data, reply) in [
        (
            "From\0: ceo@forged.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0",
        ),
        ("Fr\0om: ceo@forged.test\r\n\r\nhi\r\n.\r\n", "550 5.6.0"),
        ("\0From: ceo@forged.test\r\n\r\nhi\r\n.\r\n", "550 5.6.0"),
        (
            "From: bob@example.org\r\n\r\nNUL \0 in the body\r\n.\r\n",
            "550 5.6.0 NUL",
        ),
        (
            "Fr\x01om: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0 Malformed header",
        ),
        (
            "Fr om: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0 Malformed header",
        ),
        (
            "Fr\u{e9}om: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0 Malformed header",
        ),
        // mail-auth drops a field with space before the colon and ends the header
        // section at a line without one: DMARC saw no From while clients show it.
        (
            "From : ceo@forged.test\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0 Malformed header field name",
        ),
        (
            "junk\r\nFrom: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0 Malformed header field (no colon)",
        ),
        (
            " folded: first\r\nFrom: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
            "550 5.6.0 Malformed header",
        ),
    ] {
        c.cmd("MAIL FROM:<bob@example.org>", "250").await;
        c.cmd("RCPT TO:<alice@acme.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(data).await;
        c.expect(reply).await;
    }
    // Folded fields and every printable name are fine.
    c.message("From: bob@example.org\r\nX-Odd_Name!: a\r\n\tfolded\r\n\r\nok\r\n.\r\n")
        .await;
    c.cmd("QUIT", "221").await;
    assert_eq!(s.queued(1).await.len(), 1);
}

/// RFC 7489 §6.6.1: a message without exactly one From field has no author domain
/// for DMARC; it is handled as failing with p=reject (the tenant decides: reject by
/// default, Junk if asked), and Authentication-Results never carries an empty
/// `header.from=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_single_from_fails_dmarc_handling() {
    let (_dns, auth) = checker();
    let s = server_with(IngressConfig::default(), None, Some(auth)).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    for data in [
        "Subject: no author\r\n\r\nhi\r\n.\r\n",
        "From: bob@example.org\r\nFrom: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
        "From: bob@example.org\r\nfrom: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
        // One field, but no single author domain mail-auth would evaluate.
        "From: bob@example.org, ceo@forged.test\r\n\r\nhi\r\n.\r\n",
        "From: undisclosed-recipients:;\r\n\r\nhi\r\n.\r\n",
        "From: \"ceo@forged.test\" <>\r\n\r\nhi\r\n.\r\n",
        // A blank first line: no header section, the From is in the body.
        "\r\nFrom: ceo@forged.test\r\n\r\nhi\r\n.\r\n",
    ] {
        c.cmd("MAIL FROM:<bob@example.org>", "250").await;
        c.cmd("RCPT TO:<alice@acme.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(data).await;
        c.expect("550 5.7.1 A message must have exactly one From field")
            .await;
    }
    // A tenant that files DMARC failures as Junk gets it, marked so.
    s.engine
        .set_inbound_policy(
            "acme".parse().unwrap(),
            InboundPolicy {
                dmarc_reject: PolicyAction::Junk,
                ..InboundPolicy::default()
            },
        )
        .await
        .unwrap();
    c.message("Subject: no author\r\n\r\nto junk\r\n.\r\n")
        .await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    assert!(queued[0].junk);
    let text = body(&s, &queued[0]).await;
    assert!(
        text.contains("dmarc=permerror (not exactly one From field)"),
        "{text}"
    );
    assert!(!text.contains("header.from=;"), "{text}");
    assert!(!text.contains("header.from=\r\n"), "{text}");
}

/// A forwarding loop grew each pass (ARC set, Received, results) for ever: more
/// than `max_received_fields` Received fields is refused as a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_loop_ends_at_the_received_limit() {
    let s = server(IngressConfig {
        max_received_fields: 5,
        ..IngressConfig::default()
    })
    .await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    let hops = |n: usize| "Received: from a by b; Mon, 7 Dec 2026 00:00:00 +0000\r\n".repeat(n);
    c.cmd("MAIL FROM:<bob@example.org>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&format!(
        "{}From: bob@example.org\r\n\r\nloop\r\n.\r\n",
        hops(6)
    ))
    .await;
    c.expect("554 5.4.6").await;
    c.message(&format!(
        "{}From: bob@example.org\r\n\r\nfine\r\n.\r\n",
        hops(5)
    ))
    .await;
    c.cmd("QUIT", "221").await;
    assert_eq!(s.queued(1).await.len(), 1);
}

/// Issue 16 §7: `<CRLF>.<CR><CR><LF>` ended the data; only `<CRLF>.<CRLF>` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_crlf_dot_crlf_ends_the_data() {
    let s = server(IngressConfig::default()).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.message(
        "Subject: one\r\n\r\nfirst\r\n.\r\r\nMAIL FROM:<admin@acme.test>\r\nRCPT TO:<alice@acme.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n",
    )
    .await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    assert_eq!(queued[0].mail_from.to_string(), "bob@example.org");
    assert!(body(&s, &queued[0]).await.contains("Subject: smuggled"));
}

/// Issue 16 §7: `localhost.`, `localhost\;` and ARC-Authentication-Results claiming
/// our authserv-id survived on the MX; they are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_our_results_is_removed() {
    let (_dns, auth) = checker();
    let s = server_with(IngressConfig::default(), None, Some(auth)).await;
    let mut c = Client::connect(&s).await;
    c.hello().await;
    c.message(
        "Authentication-Results: mx.acme.test.; dmarc=pass\r\n\
         Authentication-Results: mx.acme.test\\; dmarc=pass\r\n\
         ARC-Authentication-Results: i=1; mx.acme.test; dmarc=pass\r\n\
         ARC-Authentication-Results: i=1 (a;b); mx.acme.test; dmarc=pass\r\n\
         ARC-Authentication-Results: mx.acme.test; i=1; dmarc=pass\r\n\
         From: Bob <bob@example.org>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n",
    )
    .await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    let text = body(&s, &queued[0]).await;
    assert_eq!(text.matches("dmarc=pass").count(), 0, "{text}");
    assert!(text.contains("From: Bob"), "{text}");
}

/// Issue 16 §6 on port 25: a byte every few hundred milliseconds kept a session
/// alive, and a few addresses took every connection slot. A command line must be
/// complete within `command_timeout` of its first byte; each address (counted
/// across pods in the cache) holds at most `max_connections_per_ip`; another address
/// is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_neither_last_nor_take_every_slot() {
    let s = server(IngressConfig {
        command_timeout: Duration::from_secs(2),
        max_connections_per_ip: 3,
        ..IngressConfig::default()
    })
    .await;
    let shutdown = Shutdown::new();
    let mut held = Vec::new();
    for i in 0..3 {
        let mut c = open(&s, &format!("192.0.2.50:{}", 40_000 + i), &shutdown);
        c.expect("220").await;
        held.push(c);
    }
    let mut fourth = open(&s, "192.0.2.50:40010", &shutdown);
    fourth
        .expect("421 4.7.0 Too many connections from your address")
        .await;
    let mut other = open(&s, "192.0.2.51:40000", &shutdown);
    other.expect("220").await;
    other.cmd("EHLO other.example", "250").await;
    // One byte every 300 ms: the line's deadline cuts it off after 2 s.
    let c = &mut held[0];
    let started = std::time::Instant::now();
    for b in b"NOOP and a very long trickle of a command line" {
        if c.io.write_all(&[*b]).await.is_err() {
            break;
        }
        if c.complete_reply().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), c.io.read(&mut buf)).await
        {
            c.pending.extend_from_slice(&buf[..n]);
        }
    }
    let reply = c.reply().await;
    assert!(reply.starts_with("421 4.4.2"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(12));
    // Its slot is given back: the address may connect again.
    drop(held);
    let mut again = None;
    for _ in 0..50 {
        let mut c = open(&s, "192.0.2.50:40020", &shutdown);
        let reply = c.reply().await;
        if reply.starts_with("220") {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the address never got a slot back");
}
