//! The submission agent (RFC 6409) driven in memory: AUTH only over TLS, senders
//! and From headers checked against the user's addresses, header fix-ups, limits,
//! implicit TLS; DKIM signatures checked by an independent verifier (dkimpy).

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::session::{Client, Server, body, open, open_implicit_tls, submission_server};
use mailmesh_ingress::submit::SubmissionConfig;
use mailmesh_kit::Shutdown;
use mailmesh_storage::directory::DkimAlgorithm;
use mailmesh_testkit::dkimpy_verifies;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// alice@acme.test (password `pw`) after STARTTLS and AUTH PLAIN.
async fn logged_in(s: &Server) -> Client<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let mut c = open(s, "192.0.2.7:40000", &Shutdown::new());
    c.expect("220 mx.acme.test").await;
    c.cmd("EHLO laptop", "250").await;
    c.cmd("STARTTLS", "220").await;
    let mut c = c.tls().await;
    c.cmd("EHLO laptop", "250").await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0pw")),
        "235 2.7.0",
    )
    .await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_authenticate_over_tls_and_send_only_as_themselves() {
    let s = submission_server(SubmissionConfig::default()).await;
    s.engine
        .add_alias(
            "team@acme.test".parse().unwrap(),
            vec!["alice@acme.test".parse().unwrap()],
        )
        .await
        .unwrap();
    let mut c = open(&s, "192.0.2.7:40000", &Shutdown::new());
    c.expect("220 mx.acme.test").await;
    let ehlo = c.cmd("EHLO laptop", "250-").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    // No password in clear text, no mail without a login (no open relay).
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0pw")),
        "538 5.7.11",
    )
    .await;
    c.cmd("MAIL FROM:<alice@acme.test>", "530 5.7.0").await;
    c.cmd("STARTTLS", "220").await;
    let mut c = c.tls().await;
    let ehlo = c.cmd("EHLO laptop", "250-").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.cmd("MAIL FROM:<alice@acme.test>", "530 5.7.0").await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0wrong")),
        "535 5.7.8",
    )
    .await;
    // Same answer for a user that does not exist.
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0nobody@acme.test\0pw")),
        "535 5.7.8",
    )
    .await;
    // Acting for someone else is not allowed.
    c.cmd(
        &format!("AUTH PLAIN {}", b64("bob@acme.test\0alice@acme.test\0pw")),
        "535 5.7.8",
    )
    .await;
    c.cmd("AUTH CRAM-MD5", "504 5.5.4").await;
    c.cmd("AUTH PLAIN !!!", "501 5.5.2").await;
    // PLAIN without an initial response, cancelled.
    c.cmd("AUTH PLAIN", "334").await;
    c.cmd("*", "501 5.7.0").await;
    // LOGIN, step by step.
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd(&b64("alice@acme.test"), "334 UGFzc3dvcmQ6").await;
    c.cmd(&b64("pw"), "235 2.7.0").await;
    c.cmd("AUTH LOGIN", "503 5.5.1").await;
    let ehlo = c.cmd("EHLO laptop", "250-").await;
    assert!(!ehlo.contains("AUTH"), "not offered once logged in: {ehlo}");

    // Envelope senders: own address, alias and subaddress yes, others no.
    c.cmd("MAIL FROM:<mallory@acme.test>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<bob@example.org>", "553 5.7.1").await;
    for own in ["team@acme.test", "alice+lists@acme.test", ""] {
        c.cmd(&format!("MAIL FROM:<{own}>"), "250").await;
        c.cmd("RSET", "250").await;
    }
    // Not an alias shared with someone else, not an address only the catch-all
    // gives her.
    s.engine
        .add_user(
            "bob@acme.test".parse().unwrap(),
            mailmesh_kit::Secret::new("pw".into()),
            None,
        )
        .await
        .unwrap();
    s.engine
        .add_alias(
            "all@acme.test".parse().unwrap(),
            vec![
                "alice@acme.test".parse().unwrap(),
                "bob@acme.test".parse().unwrap(),
            ],
        )
        .await
        .unwrap();
    c.cmd("MAIL FROM:<all@acme.test>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<alice@acme.test> AUTH=<>", "250").await;
    c.cmd("RCPT TO:<nobody@acme.test>", "550 5.1.1").await;
    c.cmd("RCPT TO:<friend@remote.example>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("From: Mallory <mallory@acme.test>\r\nSubject: forged\r\n\r\nx\r\n.\r\n")
        .await;
    c.expect("550 5.7.1").await;
    c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
    c.cmd("RCPT TO:<friend@remote.example>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(
        "From: Alice <alice@acme.test>, Team <team@acme.test>\r\nTo: friend@remote.example\r\n\
         Bcc: alice@acme.test\r\nSubject: lunch\r\n\r\nAt noon?\r\n.\r\n",
    )
    .await;
    c.expect("250 2.0.0 Ok: queued as").await;
    // With alice as the domain's catch-all, unassigned addresses are still not hers.
    s.engine
        .set_catch_all(
            "acme.test".parse().unwrap(),
            Some("alice@acme.test".parse().unwrap()),
        )
        .await
        .unwrap();
    c.cmd("MAIL FROM:<security@acme.test>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<alice+still@acme.test>", "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("QUIT", "221").await;

    let queued = s.queued(1).await;
    let e = &queued[0];
    assert_eq!(e.tenant.as_str(), "acme");
    assert_eq!(e.recipients.len(), 2);
    let client = e.client.as_ref().unwrap();
    assert_eq!(
        client
            .authenticated_as
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("alice@acme.test")
    );
    assert!(e.authentication_results.is_none());
    let text = body(&s, e).await;
    assert!(
        text.starts_with(
            "Received: from laptop ([192.0.2.7])\r\n\tby mx.acme.test (mailmesh) with ESMTPSA id "
        ),
        "{text}"
    );
    assert!(!text.contains("Bcc"), "{text}");
    assert!(
        text.contains(&format!(
            "\r\nMessage-ID: <{}@mx.acme.test>\r\n",
            e.queue_id
        )),
        "{text}"
    );
    assert!(text.contains("\r\nDate: "), "{text}");
    assert!(
        !text.contains("DKIM-Signature"),
        "no key, no signature: {text}"
    );
    assert!(text.ends_with("\r\n\r\nAt noon?\r\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_signed_with_the_domains_newest_key() {
    let s = submission_server(SubmissionConfig {
        key_cache_ttl: Duration::ZERO,
        ..SubmissionConfig::default()
    })
    .await;
    let domain: mailmesh_types::Domain = "acme.test".parse().unwrap();
    let send = || async {
        let mut c = logged_in(&s).await;
        c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
        c.cmd("RCPT TO:<friend@remote.example>", "250").await;
        c.cmd("DATA", "354").await;
        c.send("From: alice@acme.test\r\nTo: friend@remote.example\r\nSubject: signed\r\n\r\nBody  with  spaces \r\n\r\n.\r\n")
            .await;
        c.expect("250 2.0.0").await;
        c.cmd("QUIT", "221").await;
    };
    // The domain's first key signs at once.
    let rsa = s
        .engine
        .add_dkim_key(
            domain.clone(),
            Some("s1".into()),
            DkimAlgorithm::Rsa2048,
            false,
        )
        .await
        .unwrap();
    send().await;
    // A second one waits (its DNS record is not published yet) until activated.
    let ed = s
        .engine
        .add_dkim_key(
            domain.clone(),
            Some("e1".into()),
            DkimAlgorithm::Ed25519,
            false,
        )
        .await
        .unwrap();
    send().await;
    s.engine
        .activate_dkim_key(domain.clone(), "e1".into())
        .await
        .unwrap();
    send().await;
    let mut selectors = Vec::new();
    for envelope in s.queued(3).await {
        let text = body(&s, &envelope).await;
        let key = if text.contains("s=e1;") { &ed } else { &rsa };
        assert!(text.contains(&format!("s={};", key.selector)), "{text}");
        selectors.push(key.selector.clone());
        assert!(
            dkimpy_verifies(text.as_bytes(), &key.dns_name(), &key.dns_record()),
            "dkimpy rejects the {:?} signature: {text}",
            key.algorithm
        );
        // Changed in transit, the signature no longer holds.
        let tampered = text.replace("Subject: signed", "Subject: changed");
        assert!(!dkimpy_verifies(
            tampered.as_bytes(),
            &key.dns_name(),
            &key.dns_record()
        ));
    }
    selectors.sort();
    assert_eq!(selectors, ["e1", "s1", "s1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failures_send_rates_and_implicit_tls() {
    let s = submission_server(SubmissionConfig {
        max_auth_failures: 2,
        failure_delay: Duration::from_millis(10),
        recipients_per_user_per_hour: 2,
        ..SubmissionConfig::default()
    })
    .await;
    // The tenant asks for privacy: its users' clients stay out of Received.
    s.engine
        .set_hide_client("acme".parse().unwrap(), true)
        .await
        .unwrap();
    // Implicit TLS (465): greeting over TLS, AUTH offered at once.
    let mut c = open_implicit_tls(&s, "192.0.2.8:40000").await;
    c.expect("220 mx.acme.test").await;
    let ehlo = c.cmd("EHLO laptop", "250-").await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0pw")),
        "235",
    )
    .await;
    c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send("Subject: one\r\n\r\nx\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    // Two recipients per hour for this user: one more, then no more.
    c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
    c.cmd("RCPT TO:<someone@remote.test>", "250").await;
    c.cmd("RCPT TO:<other@remote.test>", "450 4.7.1").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "450 4.7.1").await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    let text = body(&s, &queued[0]).await;
    // Tenant privacy: nothing about the client's name or address.
    assert!(
        text.starts_with("Received: by mx.acme.test (mailmesh) with ESMTPSA id "),
        "{text}"
    );
    assert!(
        !text.contains("192.0.2.8") && !text.contains("laptop"),
        "{text}"
    );
    assert!(
        text.contains("From: <alice@acme.test>\r\n"),
        "From added: {text}"
    );

    // Failed logins from one address: two allowed, then the connection is refused.
    let mut c = open_implicit_tls(&s, "192.0.2.9:40000").await;
    c.expect("220").await;
    c.cmd("EHLO x", "250").await;
    for _ in 0..2 {
        c.cmd(
            &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0guess")),
            "535 5.7.8",
        )
        .await;
    }
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0pw")),
        "421 4.7.0",
    )
    .await;
    // Another address still gets in.
    let mut c = open_implicit_tls(&s, "192.0.2.10:40000").await;
    c.expect("220").await;
    c.cmd("EHLO x", "250").await;
    c.cmd(
        &format!("AUTH PLAIN {}", b64("\0alice@acme.test\0pw")),
        "235",
    )
    .await;
}

/// Issue 16 §3 and §7 on the submission port: `From\0:` passed the "From must be
/// yours" check; Authentication-Results claiming our authserv-id were passed on in
/// submitted mail (to a local recipient, a forged "dmarc=pass" from us).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_header_names_and_our_forged_results_do_not_pass_submission() {
    let s = submission_server(SubmissionConfig::default()).await;
    let mut c = logged_in(&s).await;
    for data in [
        "From\0: ceo@other.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
        "From: alice@acme.test\r\nFr\0om: ceo@other.test\r\n\r\nhi\r\n.\r\n",
        "From: alice@acme.test\r\n\r\nNUL \0 here\r\n.\r\n",
    ] {
        c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
        c.cmd("RCPT TO:<alice@acme.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(data).await;
        c.expect("550 5.6.0").await;
    }
    c.cmd("MAIL FROM:<alice@acme.test>", "250").await;
    c.cmd("RCPT TO:<alice@acme.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(
        "Authentication-Results: mx.acme.test; dmarc=pass header.from=bank.test\r\n\
         Authentication-Results: mx.acme.test.; dkim=pass\r\n\
         ARC-Authentication-Results: i=1; MX.ACME.TEST; spf=pass\r\n\
         Authentication-Results: elsewhere.example; spf=none\r\n\
         From: alice@acme.test\r\nSubject: hi\r\n\r\nbody\r\n.\r\n",
    )
    .await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
    let queued = s.queued(1).await;
    let text = body(&s, &queued[0]).await;
    assert!(!text.contains("=pass"), "{text}");
    assert!(text.contains("elsewhere.example; spf=none"), "{text}");
}

/// Issue 16 §6 on submission: a client that never logs in cannot hold a session by
/// sending a command now and then; it has `login_timeout` in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_does_not_log_in_is_closed() {
    let s = submission_server(SubmissionConfig {
        login_timeout: Duration::from_secs(2),
        ..SubmissionConfig::default()
    })
    .await;
    let mut c = open(&s, "192.0.2.7:40000", &Shutdown::new());
    c.expect("220").await;
    let mut last = String::new();
    for _ in 0..20 {
        // The 421 may come while we wait; a write after it finds the door shut.
        use tokio::io::AsyncWriteExt;
        let _ = c.io.write_all(b"NOOP\r\n").await;
        last = c.reply().await;
        if !last.starts_with("250") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(last.starts_with("421 4.4.2"), "{last:?}");
}
