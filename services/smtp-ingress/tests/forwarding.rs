//! Issue 16 §4: an alias that forwards to another domain laundered SPF for every
//! domain. A stranger sent `MAIL FROM:<ceo@corp.test>` to `fwd@evil.test` (whose
//! tenant accepts DMARC failures), and mailmesh relayed it from the platform's
//! addresses, which corp.test's SPF authorises, so it passed SPF and DMARC at the
//! destination. Here the whole path runs: the MX (with auth-check over a real DNS
//! server), the delivery worker and the outbound relay to a test MX; the receiving
//! side's verdict is computed by an independent checker over the same DNS records.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::session::{Client, open};
use mail_auth::common::crypto::Ed25519Key;
use mailmesh_auth::srs::SrsConfig;
use mailmesh_auth::{AuthCheck, AuthConfig, AuthResult, Checker, DnsConfig, MessageFacts};
use mailmesh_delivery::outbound::{Outbound, OutboundConfig};
use mailmesh_delivery::worker::{Worker, WorkerConfig};
use mailmesh_ingress::{Ingress, IngressConfig};
use mailmesh_kit::{Secret, Shutdown};
use mailmesh_testkit::dns::DnsServer;
use mailmesh_testkit::mx::TestMx;
use mailmesh_types::{InboundPolicy, PolicyAction};

const SRS_SECRET: &str = "c2Vuc2libGUgc3JzIHNlY3JldCBmb3IgdGVzdHM=";
/// The platform's own outgoing address (the loopback the relay uses).
const PLATFORM: &str = "127.0.0.1";
/// The stranger.
const STRANGER: &str = "192.0.2.99";

fn srs() -> SrsConfig {
    SrsConfig {
        secret: Secret::new(SRS_SECRET.into()),
        previous_secrets: Vec::new(),
        max_age: Duration::from_secs(21 * 86_400),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_mail_no_longer_passes_as_the_forged_domain() {
    // DNS: corp.test (a hosted domain: its SPF authorises the platform) publishes
    // p=reject; evil.test, the forwarding tenant's domain, authorises the platform
    // too; remote.test is where the alias forwards; the ARC key of the platform.
    let arc_pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
    let arc_public = base64::engine::general_purpose::STANDARD
        .encode(Ed25519Key::from_pkcs8_der(&arc_pkcs8).unwrap().public_key());
    let dns = DnsServer::start(&[
        format!(r#"txt-record=corp.test,"v=spf1 ip4:{PLATFORM} -all""#),
        r#"txt-record=_dmarc.corp.test,"v=DMARC1; p=reject""#.into(),
        format!(r#"txt-record=evil.test,"v=spf1 ip4:{PLATFORM} -all""#),
        format!(r#"txt-record=arc._domainkey.mx.acme.test,"v=DKIM1; k=ed25519; p={arc_public}""#),
        "mx-host=remote.test,mx.remote.test,10".into(),
        "mx-host=example.org,mx.remote.test,10".into(),
        "host-record=mx.remote.test,127.0.0.1".into(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let arc_key = dir.path().join("arc.pem");
    std::fs::write(
        &arc_key,
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&arc_pkcs8)
        ),
    )
    .unwrap();
    let checker_config = |arc: bool| AuthConfig {
        authserv_id: "mx.acme.test".into(),
        dns: DnsConfig {
            servers: vec![dns.addr],
            ..DnsConfig::default()
        },
        arc_seal: arc.then(|| mailmesh_auth::sign::ArcSealConfig {
            key_file: arc_key.clone(),
            domain: "mx.acme.test".into(),
            selector: "arc".into(),
        }),
        ..AuthConfig::default()
    };
    let auth: Arc<dyn AuthCheck> = Arc::new(Checker::new(checker_config(true)).unwrap());

    // The platform: the evil tenant with its forwarding alias, accepting DMARC
    // failures (its own choice).
    let p = common::platform().await;
    let evil: mailmesh_types::TenantId = "evil".parse().unwrap();
    p.engine
        .add_tenant(evil.clone(), Default::default())
        .await
        .unwrap();
    p.engine
        .add_domain(evil.clone(), "evil.test".parse().unwrap())
        .await
        .unwrap();
    p.engine
        .add_alias(
            "fwd@evil.test".parse().unwrap(),
            vec!["friend@remote.test".parse().unwrap()],
        )
        .await
        .unwrap();
    p.engine
        .set_inbound_policy(
            evil,
            InboundPolicy {
                dmarc_reject: PolicyAction::Tag,
                ..InboundPolicy::default()
            },
        )
        .await
        .unwrap();
    let ingress = Ingress::new(
        p.queue.clone(),
        p.objects.clone(),
        Arc::new(p.engine.clone()),
        IngressConfig {
            hostname: "mx.acme.test".into(),
            srs: Some(srs()),
            max_srs_bounces_per_minute: 2,
            ..IngressConfig::default()
        },
        None,
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        Some(auth),
    );
    let server = common::session::Server {
        ingress,
        queue: p.queue.clone(),
        engine: p.engine.clone(),
        objects: p.objects.clone(),
        _dir: tempfile::tempdir().unwrap(),
    };
    let mx = TestMx::start(None, Arc::new(|_, _| "250 2.1.5 ok".to_owned()));
    let worker_config = WorkerConfig {
        hostname: "mx.acme.test".into(),
        srs: Some(srs()),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        retry_window: Duration::from_secs(2),
        ..WorkerConfig::default()
    };
    p.queue
        .ensure_topic(&worker_config.outbound_topic, 2)
        .await
        .unwrap();
    let shutdown = Shutdown::new();
    let worker = Worker::new(
        p.queue.clone(),
        p.objects.clone(),
        Arc::new(p.engine.clone()),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        worker_config.clone(),
    );
    tokio::spawn(worker.run(shutdown.clone()));
    let outbound = Outbound::new(
        p.queue.clone(),
        p.objects.clone(),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        OutboundConfig {
            port: mx.addr.port(),
            allow_private_destinations: true,
            opportunistic_tls: false,
            dns: mailmesh_delivery::outbound::route::DnsConfig {
                servers: vec![dns.addr],
                ..Default::default()
            },
            ..OutboundConfig::default()
        },
        worker_config,
    )
    .unwrap();
    tokio::spawn(outbound.run(shutdown.clone()));

    // The stranger's forgery: accepted (the tenant tags DMARC failures), delivered
    // nowhere outside: mail that failed p=reject is not forwarded.
    let forgery =
        "From: CEO <ceo@corp.test>\r\nTo: fwd@evil.test\r\nSubject: wire money\r\n\r\nnow\r\n";
    let mut c = open(&server, &format!("{STRANGER}:40000"), &Shutdown::new());
    c.expect("220").await;
    c.cmd("EHLO stranger.example", "250").await;
    send(&mut c, "ceo@corp.test", "fwd@evil.test", forgery, "250").await;

    // Mail that passed (or was not judged) is forwarded: sender rewritten (SRS),
    // sealed (ARC).
    let honest = "From: Bob <bob@example.org>\r\nTo: fwd@evil.test\r\nSubject: hello\r\n\r\nhi\r\n";
    send(&mut c, "bob@example.org", "fwd@evil.test", honest, "250").await;
    let got = mx.wait_for(1, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "only the honest one is forwarded: {got:?}");
    let forwarded = &got[0];
    assert_eq!(forwarded.recipients, ["friend@remote.test"]);
    assert!(
        forwarded.mail_from.starts_with("SRS0=") && forwarded.mail_from.ends_with("@evil.test"),
        "{}",
        forwarded.mail_from
    );
    let text = String::from_utf8_lossy(&forwarded.data).into_owned();
    assert!(text.starts_with("ARC-Seal: i=1;"), "{text}");
    assert!(
        text.contains("ARC-Authentication-Results: i=1; mx.acme.test;"),
        "{text}"
    );

    // The receiving side's view, computed independently over the same DNS: with
    // the forgery's own sender (what was relayed before) SPF and DMARC pass for
    // corp.test; with the rewritten one SPF passes for evil.test only, so DMARC for
    // corp.test fails.
    let receiver = Checker::new(checker_config(false)).unwrap();
    let platform: IpAddr = PLATFORM.parse().unwrap();
    let before = receiver
        .check_message(MessageFacts {
            ip: platform,
            helo: "mx.acme.test",
            mail_from: "ceo@corp.test",
            message: forgery.as_bytes(),
            arc_seal: false,
        })
        .await
        .unwrap();
    assert_eq!(
        (before.spf, before.dmarc),
        (AuthResult::Pass, AuthResult::Pass),
        "what forwarding without SRS let through"
    );
    let rewritten = mailmesh_auth::srs::SrsConfig::build(&srs())
        .unwrap()
        .forward(
            &"ceo@corp.test".parse().unwrap(),
            &"evil.test".parse().unwrap(),
        )
        .unwrap()
        .unwrap()
        .to_string();
    let after = receiver
        .check_message(MessageFacts {
            ip: platform,
            helo: "mx.acme.test",
            mail_from: &rewritten,
            message: forgery.as_bytes(),
            arc_seal: false,
        })
        .await
        .unwrap();
    assert_eq!(after.spf, AuthResult::Pass, "SPF for evil.test: {after:?}");
    assert_eq!(after.dmarc, AuthResult::Fail, "{after:?}");
    // The sealed honest copy's ARC chain verifies at the receiver.
    let honest_received = receiver
        .check_message(MessageFacts {
            ip: platform,
            helo: "mx.acme.test",
            mail_from: &forwarded.mail_from,
            message: &forwarded.data,
            arc_seal: false,
        })
        .await
        .unwrap();
    assert_eq!(honest_received.arc, AuthResult::Pass, "{honest_received:?}");

    // A bounce to the rewritten sender comes back to our MX and goes on to the
    // original sender; a forged or tampered SRS address is refused, and a valid
    // one is no relay: it takes bounces only, one per transaction, a few a minute.
    let mut b = open(&server, "198.51.100.5:40000", &Shutdown::new());
    b.expect("220").await;
    b.cmd("EHLO mx.remote.test", "250").await;
    b.cmd("MAIL FROM:<spammer@remote.test>", "250").await;
    b.cmd(&format!("RCPT TO:<{}>", forwarded.mail_from), "550 5.7.1")
        .await;
    b.cmd("RSET", "250").await;
    b.cmd("MAIL FROM:<>", "250").await;
    let tampered = forwarded.mail_from.replace("=bob", "=boss");
    b.cmd(&format!("RCPT TO:<{tampered}>"), "550 5.1.1").await;
    b.cmd(&format!("RCPT TO:<{}>", forwarded.mail_from), "250")
        .await;
    b.cmd(&format!("RCPT TO:<{}>", forwarded.mail_from), "452 4.5.3")
        .await;
    b.cmd("DATA", "354").await;
    b.send(
        "From: MAILER-DAEMON@remote.test\r\nSubject: Undelivered\r\n\r\nfriend is gone\r\n.\r\n",
    )
    .await;
    b.expect("250").await;
    let got = mx.wait_for(2, Duration::from_secs(30));
    let bounce = &got[1];
    assert_eq!(bounce.recipients, ["bob@example.org"]);
    assert_eq!(bounce.mail_from, "", "a bounce stays a bounce");
    // A forged author whose domain rejects DMARC failures is not passed on, even
    // though the forwarding tenant tags such mail for itself.
    b.cmd("MAIL FROM:<>", "250").await;
    b.cmd(&format!("RCPT TO:<{}>", forwarded.mail_from), "250")
        .await;
    b.cmd("DATA", "354").await;
    b.send("From: security@corp.test\r\nSubject: reset\r\n\r\nclick\r\n.\r\n")
        .await;
    b.expect("550 5.7.1").await;
    // The third bounce to bob this minute waits.
    b.cmd("MAIL FROM:<>", "250").await;
    b.cmd(&format!("RCPT TO:<{}>", forwarded.mail_from), "450 4.7.1")
        .await;
    shutdown.stopped_token().cancel();
}

async fn send(c: &mut Client, from: &str, to: &str, data: &str, reply: &str) {
    c.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
    c.cmd(&format!("RCPT TO:<{to}>"), "250").await;
    c.cmd("DATA", "354").await;
    c.send(&format!("{data}.\r\n")).await;
    c.expect(reply).await;
}
