//! MTA-STS (RFC 8461) against real parts on loopback: dnsmasq publishes the MX and
//! `_mta-sts` TXT records, an HTTPS server serves the policy with a certificate from
//! a test CA, and the test MX offers STARTTLS with a certificate that does or does
//! not verify. The worker trusts the test CA through `tls_ca_files`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Setup, envelope, setup};
use mailmesh_delivery::outbound::{OutboundConfig, schedule};
use mailmesh_kit::Shutdown;
use mailmesh_testkit::dns::DnsServer;
use mailmesh_testkit::https::HttpsServer;
use mailmesh_testkit::mx::TestMx;
use mailmesh_testkit::tls::TestCa;

/// How the test MX presents itself.
enum MxTls {
    /// A certificate for mx.secure.test from the trusted test CA.
    Trusted,
    /// A self-signed certificate: encrypted, not authenticated.
    SelfSigned,
    /// No STARTTLS at all.
    None,
}

struct World {
    mx: TestMx,
    policy: HttpsServer,
    _dns: DnsServer,
    _ca_dir: tempfile::TempDir,
    config: OutboundConfig,
}

fn policy_body(mode: &str, mx: &str) -> (String, String, Vec<u8>) {
    (
        "200 OK".into(),
        "text/plain".into(),
        format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n").into_bytes(),
    )
}

/// `secure.test`: MX mx.secure.test (→ 127.0.0.1), `_mta-sts` TXT with id 1 and a
/// policy server at mta-sts.secure.test answering `policy`.
fn world(mx_tls: MxTls, policy: (String, String, Vec<u8>)) -> World {
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let tls = match mx_tls {
        MxTls::Trusted => Some(ca.server_config(&["mx.secure.test"])),
        MxTls::SelfSigned => Some(TestCa::new().server_config(&["mx.secure.test"])),
        MxTls::None => None,
    };
    let mx = TestMx::start(tls, Arc::new(|_: &str, _: usize| "250 2.1.5 ok".to_owned()));
    let policy = HttpsServer::start(ca.server_config(&["mta-sts.secure.test"]), policy);
    let dns = DnsServer::start(&[
        "mx-host=secure.test,mx.secure.test,10".into(),
        "host-record=mx.secure.test,127.0.0.1".into(),
        "host-record=mta-sts.secure.test,127.0.0.1".into(),
        "txt-record=_mta-sts.secure.test,\"v=STSv1; id=1;\"".into(),
    ]);
    let run = format!("s{}", uuid::Uuid::new_v4().simple());
    let mut config = OutboundConfig {
        port: mx.addr.port(),
        allow_private_destinations: true,
        retry_schedule: vec![Duration::from_secs(60)],
        retry_scan_interval: Duration::from_millis(200),
        retry_prefix: format!("{run}/retry"),
        group: format!("{run}.outbound"),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(10),
        tls_ca_files: vec![ca_file],
        dns: mailmesh_delivery::outbound::route::DnsConfig {
            servers: vec![dns.addr],
            ..Default::default()
        },
        ..OutboundConfig::default()
    };
    config.mta_sts.https_port = policy.addr.port();
    World {
        mx,
        policy,
        _dns: dns,
        _ca_dir: ca_dir,
        config,
    }
}

fn start(s: &Setup, config: OutboundConfig) -> Shutdown {
    s.start_outbound(config, Arc::new(mailmesh_cache::memory::MemoryCache::new()))
}

async fn relay(s: &Setup, to: &str, subject: &str) {
    s.relay(&envelope("alice@acme.test", &[to], subject)).await;
}

/// Waits until the message is in the due-time index and returns its last error.
async fn deferred(s: &Setup, w: &World) -> String {
    for _ in 0..300 {
        let waiting = schedule::list(&*s.objects, &w.config.retry_prefix, 10)
            .await
            .unwrap();
        if let Some(entry) = waiting.first() {
            return entry.last_error.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the message was never deferred");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_policy_delivers_over_verified_tls() {
    let s = setup(false).await;
    let w = world(MxTls::Trusted, policy_body("enforce", "mx.secure.test"));
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    let got = w.mx.wait_for(1, Duration::from_secs(30));
    assert!(got[0].tls);
    assert_eq!(w.policy.requests(), 1);
    // The policy is cached for its max_age: the next message does not fetch it, and
    // reuses the authenticated connection.
    relay(&s, "carol@secure.test", "two").await;
    let got = w.mx.wait_for(2, Duration::from_secs(30));
    assert_eq!(got[1].earlier_on_connection, 1, "{got:?}");
    assert_eq!(w.policy.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_policy_refuses_a_certificate_that_does_not_verify() {
    let s = setup(false).await;
    let w = world(MxTls::SelfSigned, policy_body("enforce", "mx.secure.test"));
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    let error = deferred(&s, &w).await;
    assert!(error.contains("MTA-STS"), "{error}");
    assert!(
        w.mx.received().is_empty(),
        "no clear-text or unauthenticated fallback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_policy_needs_starttls_and_a_listed_mx() {
    let s = setup(false).await;
    let w = world(MxTls::None, policy_body("enforce", "mx.secure.test"));
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    let error = deferred(&s, &w).await;
    assert!(error.contains("STARTTLS not offered"), "{error}");
    assert!(w.mx.received().is_empty());

    // A policy that does not list the MX host: skipped before connecting.
    let s = setup(false).await;
    let w = world(MxTls::Trusted, policy_body("enforce", "*.elsewhere.test"));
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    let error = deferred(&s, &w).await;
    assert!(
        error.contains("not in secure.test's MTA-STS policy"),
        "{error}"
    );
    assert!(w.mx.attempts().is_empty());
}

/// RFC 8461 5.1: when DNS no longer shows the record (an attacker dropping it, or
/// an outage), the cached policy still applies until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_policy_outlives_its_record() {
    let s = setup(false).await;
    let w = world(MxTls::Trusted, policy_body("enforce", "mx.secure.test"));
    let cache: Arc<dyn mailmesh_cache::Cache> =
        Arc::new(mailmesh_cache::memory::MemoryCache::new());
    let _first = s.start_outbound(w.config.clone(), cache.clone());
    relay(&s, "bob@secure.test", "one").await;
    w.mx.wait_for(1, Duration::from_secs(30));

    // Another worker sharing the cache (another queue here), and the TXT record gone and the MX offers an unverifiable certificate.
    let s = setup(false).await;
    let rogue = TestMx::start(
        Some(TestCa::new().server_config(&["mx.secure.test"])),
        Arc::new(|_: &str, _: usize| "250 2.1.5 ok".to_owned()),
    );
    let dns = DnsServer::start(&[
        "mx-host=secure.test,mx.secure.test,10".into(),
        "host-record=mx.secure.test,127.0.0.1".into(),
    ]);
    let mut config = w.config.clone();
    config.port = rogue.addr.port();
    config.dns.servers = vec![dns.addr];
    config.retry_prefix = format!("{}-second", w.config.retry_prefix);
    config.group = format!("{}-second", w.config.group);
    let _stop = s.start_outbound(config.clone(), cache);
    relay(&s, "carol@secure.test", "two").await;
    let second = World {
        mx: rogue,
        policy: w.policy,
        _dns: dns,
        _ca_dir: w._ca_dir,
        config,
    };
    let error = deferred(&s, &second).await;
    assert!(error.contains("MTA-STS"), "{error}");
    assert!(second.mx.received().is_empty());
    assert_eq!(second.policy.requests(), 1, "nothing fetched: no record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_mode_and_unusable_policies_deliver_as_usual() {
    // testing: the certificate does not verify, the mail goes anyway (encrypted).
    let s = setup(false).await;
    let w = world(MxTls::SelfSigned, policy_body("testing", "mx.secure.test"));
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    let got = w.mx.wait_for(1, Duration::from_secs(30));
    assert!(got[0].tls);
    assert_eq!(w.policy.requests(), 1);

    // A policy served as HTML (or any non-text/plain type) is no policy.
    let s = setup(false).await;
    let mut html = policy_body("enforce", "*.elsewhere.test");
    html.1 = "text/html".into();
    let w = world(MxTls::SelfSigned, html);
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    w.mx.wait_for(1, Duration::from_secs(30));
    assert_eq!(w.policy.requests(), 1);

    // A missing policy (404) is no policy, and a failed fetch is not repeated for
    // every message.
    let s = setup(false).await;
    let w = world(
        MxTls::None,
        ("404 Not Found".into(), "text/plain".into(), b"no".to_vec()),
    );
    let _stop = start(&s, w.config.clone());
    relay(&s, "bob@secure.test", "one").await;
    w.mx.wait_for(1, Duration::from_secs(30));
    relay(&s, "carol@secure.test", "two").await;
    w.mx.wait_for(2, Duration::from_secs(30));
    assert_eq!(w.policy.requests(), 1);
}
