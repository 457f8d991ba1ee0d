//! Outbound relay against a test MX on loopback found through a real DNS server
//! (dnsmasq MX and A records): STARTTLS, pipelined transactions, retries through
//! the due-time index, failure and delay reports to the sender's INBOX, null MX and
//! unknown domains, lifetimes, and no report ever for the null sender. The retry
//! test also runs on the real Kafka + S3 + Redis.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{envelope, setup};
use mailmesh_delivery::outbound::{OutboundConfig, schedule};
use mailmesh_testkit::dns::DnsServer;
use mailmesh_testkit::mx::{Script, TestMx};
use mailmesh_types::{BodyRef, DsnNotify};

struct Remote {
    mx: TestMx,
    _dns: DnsServer,
    config: OutboundConfig,
}

/// A test MX for `remote.test` (MX mx.remote.test → 127.0.0.1), `nomail.test`
/// with a null MX, and DNS answering NXDOMAIN for everything else.
fn remote(script: Arc<Script>, run: &str) -> Remote {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) =
        mailmesh_kit::tls::ensure_self_signed(dir.path(), &["mx.remote.test"]).unwrap();
    let resolver = Arc::new(mailmesh_kit::tls::ReloadingCertResolver::load(&cert, &key).unwrap());
    let tls = mailmesh_kit::tls::server_config(resolver).unwrap();
    let mx = TestMx::start(Some(tls), script);
    let dns = DnsServer::start(&[
        "mx-host=remote.test,mx.remote.test,10".into(),
        "host-record=mx.remote.test,127.0.0.1".into(),
        "mx-host=nomail.test,,0".into(),
    ]);
    let config = OutboundConfig {
        port: mx.addr.port(),
        allow_private_destinations: true,
        retry_schedule: vec![Duration::from_millis(500)],
        retry_scan_interval: Duration::from_millis(200),
        retry_prefix: format!("{run}/retry"),
        // Each test its own group: a shared one is rebalanced by every other test
        // consuming at the same time (and one wedged on tansu stays wedged).
        group: format!("{run}.outbound"),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(10),
        dns: mailmesh_delivery::outbound::route::DnsConfig {
            servers: vec![dns.addr],
            ..Default::default()
        },
        ..OutboundConfig::default()
    };
    Remote {
        mx,
        _dns: dns,
        config,
    }
}

fn accept_all() -> Arc<Script> {
    Arc::new(|_, _| "250 2.1.5 ok".to_owned())
}

fn memory_cache() -> Arc<dyn mailmesh_cache::Cache> {
    Arc::new(mailmesh_cache::memory::MemoryCache::new())
}

fn run_id() -> String {
    format!("o{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_for_remote_domains_reaches_their_mx_over_tls() {
    let s = setup(false).await;
    let r = remote(accept_all(), &run_id());
    let _outbound = s.start_outbound(r.config.clone(), memory_cache());
    // Through the local path: a local user's message with remote recipients.
    let (_stop, _task) = s.start();
    let _alice = s.user("alice@acme.test").await;
    let mut e = envelope(
        "alice@acme.test",
        &["bob@remote.test", "carol@Remote.Test"],
        "hello",
    );
    e.body = BodyRef::Inline(Bytes::from_static(
        b"Subject: hello\r\n\r\n.a line with a dot\r\n..two\r\nend\r\n",
    ));
    s.enqueue(&e).await;
    let got = r.mx.wait_for(1, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "one transaction for both: {got:?}");
    let m = &got[0];
    assert!(m.tls, "STARTTLS was offered, so it was used");
    assert_eq!(m.mail_from, "alice@acme.test");
    assert_eq!(m.recipients, ["bob@remote.test", "carol@remote.test"]);
    assert!(m.parameters.contains("SIZE="), "{}", m.parameters);
    assert!(!m.parameters.contains("BODY="), "7-bit: {}", m.parameters);
    assert_eq!(
        String::from_utf8_lossy(&m.data),
        "Subject: hello\r\n\r\n.a line with a dot\r\n..two\r\nend\r\n"
    );
    // The next message to the same host reuses the connection. Its 8-bit text was
    // not declared (the envelope says 7-bit); the relay declares it.
    let mut again = envelope("alice@acme.test", &["dave@remote.test"], "again");
    again.body = BodyRef::Inline(Bytes::from("Subject: café\r\n\r\nnaïve\r\n"));
    s.relay(&again).await;
    let got = r.mx.wait_for(2, Duration::from_secs(30));
    assert_eq!(got[1].earlier_on_connection, 1, "{got:?}");
    assert!(
        got[1].parameters.contains("BODY=8BITMIME"),
        "{}",
        got[1].parameters
    );
    // The first record once more (a redelivery after a crash, or an alias's
    // forward handed over again): its recipients are done, nothing is resent.
    s.relay(&e).await;
    s.relay(&envelope(
        "alice@acme.test",
        &["erin@remote.test"],
        "marker",
    ))
    .await;
    let got = r.mx.wait_for(3, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.mx.received().len(), 3, "{got:?}");
    assert_eq!(got[2].recipients, ["erin@remote.test"]);
}

async fn temporary_failures_are_retried_later(real: bool) {
    let s = setup(real).await;
    let run = run_id();
    // The first RCPT for slow@ gets a 451; later ones are accepted.
    let script: Arc<Script> = Arc::new(|rcpt, n| {
        if rcpt.starts_with("slow@") && n == 1 {
            "451 4.7.1 greylisted, try again".to_owned()
        } else {
            "250 2.1.5 ok".to_owned()
        }
    });
    let r = remote(script, &run);
    let cache = cache_for(real, &run).await;
    let _outbound = s.start_outbound(r.config.clone(), cache);
    s.relay(&envelope(
        "alice@acme.test",
        &["slow@remote.test", "fast@remote.test"],
        "retry",
    ))
    .await;
    let got = r.mx.wait_for(2, Duration::from_secs(60));
    assert_eq!(got[0].recipients, ["fast@remote.test"]);
    assert_eq!(got[1].recipients, ["slow@remote.test"], "{got:?}");
    assert_eq!(
        r.mx.attempts()
            .iter()
            .filter(|a| a.starts_with("slow@"))
            .count(),
        2
    );
    // Nothing is left waiting, and nothing is sent twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        schedule::list(&*s.objects, &r.config.retry_prefix, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(r.mx.received().len(), 2);
}

/// A large body (in object storage) shared by the local delivery, the outbound
/// record and its wait in the due-time index is freed when the last of them
/// finishes, not before; the original record seen again afterwards (a redelivery
/// before its offset was committed) is recognised as finished, not parked.
async fn queue_bodies_are_freed_when_the_last_record_finishes(real: bool) {
    let s = setup(real).await;
    let run = run_id();
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let held = hold.clone();
    let script: Arc<Script> = Arc::new(move |rcpt, _| {
        if rcpt.starts_with("slow@") && held.load(std::sync::atomic::Ordering::SeqCst) {
            "451 4.7.1 greylisted, try again".to_owned()
        } else {
            "250 2.1.5 ok".to_owned()
        }
    });
    let r = remote(script, &run);
    let cache = cache_for(real, &run).await;
    let _outbound = s.start_outbound(r.config.clone(), cache);
    let (_stop, _task) = s.start();
    let alice = s.user("alice@acme.test").await;
    let mut e = envelope(
        "sender@acme.test",
        &["alice@acme.test", "slow@remote.test", "fast@remote.test"],
        "big",
    );
    let content = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(300_000));
    let key = s.store_body(&mut e, &content).await;
    s.enqueue(&e).await;
    let got = r.mx.wait_for(1, Duration::from_secs(60));
    assert_eq!(got[0].recipients, ["fast@remote.test"]);
    assert_eq!(got[0].data, content.as_bytes());
    assert_eq!(s.inbox(&alice, 1).await.len(), 1);
    // slow@ keeps failing: its entry in the due-time index still holds the body.
    while r
        .mx
        .attempts()
        .iter()
        .filter(|a| a.starts_with("slow@"))
        .count()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prefix = format!("t/acme/queue/{}", e.queue_id);
    let held_now = s.objects_under("t/acme/queue").await;
    assert!(held_now.contains(&key), "{held_now:?}");
    assert!(
        !held_now.contains(&format!("{prefix}.done")),
        "{held_now:?}"
    );

    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    let got = r.mx.wait_for(2, Duration::from_secs(60));
    assert_eq!(got[1].recipients, ["slow@remote.test"], "{got:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.objects_under("t/acme/queue").await != [format!("{prefix}.done")] {
        assert!(
            std::time::Instant::now() < deadline,
            "the body and its claims are gone, the marker stays: {:?}",
            s.objects_under("t/acme/queue").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first record once more: nothing stored, sent or parked.
    s.enqueue(&e).await;
    s.relay(&e).await;
    let marker = envelope("sender@acme.test", &["alice@acme.test"], "marker");
    s.enqueue(&marker).await;
    assert_eq!(s.inbox(&alice, 2).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.mx.received().len(), 2);
    assert_eq!(s.inbox(&alice, 2).await.len(), 2);
    assert!(s.dead_letters(Duration::from_secs(2)).await.is_empty());

    // What is left goes once it is older than the lifetime plus the grace.
    let swept =
        mailmesh_delivery::bodies::sweep(&*s.objects, SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap();
    assert!(swept.objects >= 1, "{swept:?}");
    assert!(s.objects_under(&prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bodies_are_freed_when_the_last_record_finishes_embedded() {
    queue_bodies_are_freed_when_the_last_record_finishes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bodies_are_freed_when_the_last_record_finishes_on_kafka_s3_and_redis() {
    queue_bodies_are_freed_when_the_last_record_finishes(true).await;
}

/// The cache the outbound relay uses: Redis for the real platform, else memory.
async fn cache_for(real: bool, run: &str) -> Arc<dyn mailmesh_cache::Cache> {
    if !real {
        return memory_cache();
    }
    Arc::new(
        mailmesh_cache::redis::RedisCache::connect(&mailmesh_cache::redis::RedisConfig {
            url: mailmesh_kit::Secret::new(mailmesh_testkit::backend_env("MMTEST_REDIS")),
            key_prefix: format!("{run}:"),
            command_timeout: Duration::from_secs(5),
            sentinel: None,
        })
        .await
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failures_are_retried_later_embedded() {
    temporary_failures_are_retried_later(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failures_are_retried_later_on_kafka_s3_and_redis() {
    temporary_failures_are_retried_later(true).await;
}

/// RFC 3461: NOTIFY=SUCCESS mail to a server that takes DSN is left to it (the
/// parameters go along); to one without DSN, the sender hears "relayed" from us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_notices_for_servers_without_dsn() {
    let s = setup(false).await;
    let r = remote(accept_all(), &run_id());
    // Each message on a new connection, which sees what the MX offers then.
    let config = OutboundConfig {
        reuse_connections_for: Duration::ZERO,
        ..r.config.clone()
    };
    let _outbound = s.start_outbound(config, memory_cache());
    let (_stop, _task) = s.start();
    let alice = s.user("alice@acme.test").await;
    let asked = DsnNotify {
        success: true,
        failure: true,
        delay: false,
    };
    let mut e = envelope("alice@acme.test", &["bob@remote.test"], "with dsn");
    e.recipients[0].notify = asked;
    s.relay(&e).await;
    r.mx.wait_for(1, Duration::from_secs(30));
    r.mx.offer_dsn(false);
    let mut e = envelope(
        "alice@acme.test",
        &["carol@remote.test", "dave@remote.test"],
        "no dsn",
    );
    e.recipients[0].notify = asked;
    s.relay(&e).await;
    r.mx.wait_for(2, Duration::from_secs(30));
    s.inbox(&alice, 1).await;
    // Time for a wrong notice about the first message to arrive too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let inbox = s.inbox(&alice, 1).await;
    assert_eq!(
        inbox.len(),
        1,
        "one notice, for the server without DSN: {inbox:?}"
    );
    let notice = &inbox[0];
    for needed in [
        "Subject: Successful Mail Delivery Report",
        "Final-Recipient: rfc822; carol@remote.test\r\nAction: relayed\r\nStatus: 2.0.0\r\n",
        "Remote-MTA: dns; mx.remote.test\r\n",
        "Subject: no dsn\r\n",
    ] {
        assert!(notice.contains(needed), "{needed:?} missing in {notice}");
    }
    assert!(
        !notice.contains("dave@remote.test"),
        "dave did not ask: {notice}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_bounce_to_the_sender_with_the_original_headers() {
    let s = setup(false).await;
    let script: Arc<Script> = Arc::new(|rcpt, _| {
        if rcpt.starts_with("gone@") {
            "550 5.1.1 <gone@remote.test>: no such user".to_owned()
        } else {
            "250 2.1.5 ok".to_owned()
        }
    });
    let r = remote(script, &run_id());
    let _outbound = s.start_outbound(r.config.clone(), memory_cache());
    let (_stop, _task) = s.start();
    let alice = s.user("alice@acme.test").await;
    s.relay(&envelope(
        "alice@acme.test",
        &[
            "gone@remote.test",
            "ok@remote.test",
            "x@nomail.test",
            "y@nowhere.test",
        ],
        "lunch plans",
    ))
    .await;
    let inbox = s.inbox(&alice, 1).await;
    assert_eq!(inbox.len(), 1, "one report for all failures: {inbox:?}");
    let report = &inbox[0];
    for expected in [
        "Subject: Undelivered Mail Returned to Sender",
        "Content-Type: multipart/report; report-type=delivery-status",
        "Final-Recipient: rfc822; gone@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        // The remote reply as it came, and who gave it.
        "Diagnostic-Code: smtp; 550 5.1.1 <gone@remote.test>: no such user\r\nRemote-MTA: dns; mx.remote.test\r\n",
        "gone@remote.test: 550 5.1.1 <gone@remote.test>: no such user (from mx.remote.test)\r\n",
        // What mailmesh found itself (null MX, no such domain) in its own words, no
        // invented SMTP reply.
        "Final-Recipient: rfc822; x@nomail.test\r\nAction: failed\r\nStatus: 5.1.10\r\n\
         Diagnostic-Code: X-mailmesh; nomail.test does not accept mail (null MX)\r\n",
        "Final-Recipient: rfc822; y@nowhere.test\r\nAction: failed\r\nStatus: 5.1.2\r\n\
         Diagnostic-Code: X-mailmesh; domain nowhere.test does not exist\r\n",
        // The original comes back.
        "Subject: lunch plans\r\n",
    ] {
        assert!(
            report.contains(expected),
            "{expected:?} missing in {report}"
        );
    }
    assert!(!report.contains("ok@remote.test"), "{report}");
    assert!(
        !report.contains("550 5.1.2") && !report.contains("550 5.1.10"),
        "{report}"
    );
    assert_eq!(r.mx.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_are_reported_once_and_expired_mail_bounces() {
    let s = setup(false).await;
    let script: Arc<Script> = Arc::new(|_, _| "451 4.3.0 come back later".to_owned());
    let r = remote(script, &run_id());
    let config = OutboundConfig {
        delay_notify_after: Duration::ZERO,
        ..r.config.clone()
    };
    let _outbound = s.start_outbound(config, memory_cache());
    let (_stop, _task) = s.start();
    let alice = s.user("alice@acme.test").await;
    s.relay(&envelope(
        "alice@acme.test",
        &["later@remote.test"],
        "delayed",
    ))
    .await;
    let inbox = s.inbox(&alice, 1).await;
    assert!(inbox[0].contains("Subject: Delayed Mail"), "{}", inbox[0]);
    assert!(
        inbox[0].contains("Action: delayed\r\nStatus: 4.3.0\r\n"),
        "{}",
        inbox[0]
    );
    assert!(inbox[0].contains("Will-Retry-Until: "), "{}", inbox[0]);
    assert!(inbox[0].contains("text/rfc822-headers"), "{}", inbox[0]);
    // Retried a few more times, no second notice.
    while r.mx.attempts().len() < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.inbox(&alice, 1).await.len(), 1);
    // Still waiting for the next attempt, visible in the index.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let waiting = schedule::list(&*s.objects, &r.config.retry_prefix, 100)
            .await
            .unwrap();
        if !waiting.is_empty() {
            break waiting;
        }
        assert!(std::time::Instant::now() < deadline, "nothing waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        waiting.iter().all(|w| w.delay_notified && w.attempts >= 1),
        "{waiting:?}"
    );

    // A message older than the lifetime (5 days) is not retried but returned.
    let mut old = envelope("alice@acme.test", &["old@remote.test"], "ancient");
    old.received_at = SystemTime::now() - Duration::from_secs(6 * 24 * 3600);
    s.relay(&old).await;
    let inbox = s.inbox(&alice, 2).await;
    let expired = inbox
        .iter()
        .find(|m| m.contains("old@remote.test"))
        .expect("a report for the expired message");
    assert!(
        expired.contains("Action: failed\r\nStatus: 4.4.7\r\n"),
        "{expired}"
    );
    assert!(expired.contains("Subject: ancient"), "{expired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounces_are_never_bounced() {
    let s = setup(false).await;
    let script: Arc<Script> = Arc::new(|_, _| "550 5.1.1 no such user".to_owned());
    let r = remote(script, &run_id());
    let _outbound = s.start_outbound(r.config.clone(), memory_cache());
    let (_stop, _task) = s.start();
    let alice = s.user("alice@acme.test").await;
    // A report (null sender) that cannot be delivered, then a normal message whose
    // report must arrive: the first one must not have produced anything.
    s.relay(&envelope("", &["gone@remote.test"], "a bounce"))
        .await;
    while r.mx.attempts().is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.relay(&envelope(
        "alice@acme.test",
        &["gone2@remote.test"],
        "normal",
    ))
    .await;
    let inbox = s.inbox(&alice, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let inbox_after = s.inbox(&alice, 1).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox_after.len(), 1, "{inbox_after:?}");
    assert!(inbox_after[0].contains("gone2@remote.test"));
    assert!(!inbox_after[0].contains("a bounce"));
}
