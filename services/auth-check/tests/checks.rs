//! auth-check against a real DNS server (dnsmasq on loopback) serving SPF, DKIM,
//! DMARC, PTR and DNS-list records for `example.test`, in process and over gRPC.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use mailmesh_auth::grpc::GrpcAuthCheck;
use mailmesh_auth::{
    AuthCheck, AuthConfig, AuthResult, Checker, DmarcPolicy, DnsConfig, MessageFacts,
};
use mailmesh_kit::internal::{Role, testing};
use mailmesh_testkit::dns::DnsServer;

/// Authorised by example.test's SPF record, with matching forward and reverse DNS.
const GOOD_IP: &str = "192.0.2.10";
/// Not authorised, and listed by the block list bl.test.
const BAD_IP: &str = "192.0.2.66";

struct Site {
    _dns: DnsServer,
    checker: Arc<Checker>,
    /// The DKIM signing key (PKCS#8) whose public half example.test publishes.
    key: Vec<u8>,
}

fn site() -> Site {
    let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    let records = vec![
        r#"txt-record=example.test,"v=spf1 ip4:192.0.2.10 -all""#.to_owned(),
        r#"txt-record=_dmarc.example.test,"v=DMARC1; p=reject""#.to_owned(),
        format!(r#"txt-record=sel._domainkey.example.test,"v=DKIM1; k=ed25519; p={public}""#),
        // The mailing list that forwards (and ARC-seals) with the same key.
        format!(r#"txt-record=arc._domainkey.lists.test,"v=DKIM1; k=ed25519; p={public}""#),
        "host-record=mx.example.test,192.0.2.10".to_owned(),
        "ptr-record=10.2.0.192.in-addr.arpa,mx.example.test".to_owned(),
        "host-record=66.2.0.192.bl.test,127.0.0.2".to_owned(),
        // The list refuses this query (as Spamhaus does for public resolvers).
        "host-record=88.2.0.192.bl.test,127.255.255.254".to_owned(),
        "host-record=10.2.0.192.wl.test,127.0.0.5".to_owned(),
    ];
    let dns = DnsServer::start(&records);
    let checker = Checker::new(AuthConfig {
        authserv_id: "mx.mailmesh.test".into(),
        dns: DnsConfig {
            servers: vec![dns.addr],
            ..DnsConfig::default()
        },
        block_lists: vec!["bl.test".into()],
        allow_lists: vec!["wl.test".into()],
        ..AuthConfig::default()
    })
    .unwrap();
    Site {
        _dns: dns,
        checker: Arc::new(checker),
        key: pkcs8,
    }
}

const MESSAGE: &str = "From: Alice <alice@example.test>\r\nTo: bob@mailmesh.test\r\n\
    Subject: hello\r\nDate: Fri, 27 Nov 2026 06:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n\
    Hello Bob.\r\n";

fn signed(pkcs8: &[u8], message: &str) -> Vec<u8> {
    let signature = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(pkcs8).unwrap())
        .domain("example.test")
        .selector("sel")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(message.as_bytes())
        .unwrap();
    let mut out = signature.to_header().into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

fn facts<'a>(ip: &str, message: &'a [u8]) -> MessageFacts<'a> {
    MessageFacts {
        ip: ip.parse::<IpAddr>().unwrap(),
        helo: "mx.example.test",
        mail_from: "alice@example.test",
        message,
        arc_seal: false,
    }
}

#[tokio::test]
async fn an_authorised_signed_message_passes_everything() {
    let site = site();
    let message = signed(&site.key, MESSAGE);
    let v = site
        .checker
        .check_message(facts(GOOD_IP, &message))
        .await
        .unwrap();
    assert_eq!(v.spf, AuthResult::Pass, "{v:?}");
    // mx.example.test publishes no SPF record of its own.
    assert_eq!(v.spf_helo, AuthResult::None, "{v:?}");
    assert!(
        v.authentication_results
            .contains("smtp.helo=mx.example.test")
    );
    assert_eq!(v.dkim, AuthResult::Pass, "{v:?}");
    assert_eq!(v.dmarc, AuthResult::Pass, "{v:?}");
    assert_eq!(v.dmarc_failure(), None);
    assert_eq!(v.client.iprev, AuthResult::Pass);
    assert_eq!(v.client.ptr.as_deref(), Some("mx.example.test"));
    assert_eq!(v.client.allow_listed, vec!["wl.test".to_owned()]);
    assert_eq!(v.client.blocked_by(), None);
    let header = &v.authentication_results;
    assert!(
        header.starts_with("Authentication-Results: mx.mailmesh.test;"),
        "{header}"
    );
    for expected in [
        "spf=pass",
        "dkim=pass",
        "header.d=example.test",
        "dmarc=pass",
        "iprev=pass",
    ] {
        assert!(header.contains(expected), "{expected} missing in {header}");
    }
    assert!(header.ends_with("\r\n"));
}

#[tokio::test]
async fn a_forgery_fails_dmarc_with_the_domains_policy() {
    let site = site();
    // Unsigned, from an address SPF does not authorise, listed by the block list.
    let v = site
        .checker
        .check_message(facts(BAD_IP, MESSAGE.as_bytes()))
        .await
        .unwrap();
    assert_eq!(v.spf, AuthResult::Fail, "{v:?}");
    assert_eq!(v.dkim, AuthResult::None, "{v:?}");
    assert_eq!(v.dmarc, AuthResult::Fail, "{v:?}");
    assert_eq!(v.dmarc_failure(), Some(DmarcPolicy::Reject));
    assert_eq!(v.dmarc_domain, "example.test");
    assert_eq!(v.client.blocked_by(), Some("bl.test"));
    assert_eq!(v.client.iprev, AuthResult::PermError, "no PTR record");
    assert!(
        v.authentication_results.contains("dmarc=fail"),
        "{}",
        v.authentication_results
    );
    assert!(v.authentication_results.contains("spf=fail"));
    assert!(
        v.authentication_results.contains("\tdkim=none;"),
        "{}",
        v.authentication_results
    );
}

#[tokio::test]
async fn a_tampered_body_breaks_the_signature() {
    let site = site();
    let mut message = signed(&site.key, MESSAGE);
    let at = message.len() - 3;
    message[at] = b'!';
    let v = site
        .checker
        .check_message(facts(BAD_IP, &message))
        .await
        .unwrap();
    assert!(
        matches!(v.dkim, AuthResult::Fail | AuthResult::Neutral),
        "{v:?}"
    );
    assert_eq!(v.dmarc, AuthResult::Fail);
    assert!(
        v.authentication_results.contains("dkim=fail")
            || v.authentication_results.contains("dkim=neutral")
    );
}

#[tokio::test]
async fn the_null_sender_is_judged_by_its_helo() {
    let site = site();
    let v = site
        .checker
        .check_message(MessageFacts {
            mail_from: "",
            helo: "unknown.test",
            ..facts(GOOD_IP, MESSAGE.as_bytes())
        })
        .await
        .unwrap();
    assert_eq!(v.spf, AuthResult::None, "{v:?}");
    assert!(
        v.authentication_results.contains("smtp.helo=unknown.test"),
        "{}",
        v.authentication_results
    );
}

#[tokio::test]
async fn verdicts_cross_grpc_unchanged() {
    let site = site();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = mailmesh_kit::Shutdown::new();
    tokio::spawn(mailmesh_auth::grpc::serve(
        site.checker.clone(),
        listener,
        testing::tls(Role::AuthCheck),
        shutdown.clone(),
    ));
    let client = GrpcAuthCheck::new(&endpoint, 1 << 20, &testing::tls(Role::SmtpIngress)).unwrap();
    let message = signed(&site.key, MESSAGE);
    let local = site
        .checker
        .check_message(facts(GOOD_IP, &message))
        .await
        .unwrap();
    let remote = client
        .check_message(facts(GOOD_IP, &message))
        .await
        .unwrap();
    assert_eq!(remote, local);
    let client_verdict = client.check_client(BAD_IP.parse().unwrap()).await.unwrap();
    assert_eq!(client_verdict.blocked_by(), Some("bl.test"));
    // A message above the configured limit is refused by the server, not buffered.
    let big = vec![b'x'; (25 << 20) + (128 << 10)];
    let big_client =
        GrpcAuthCheck::new(&endpoint, 64 << 20, &testing::tls(Role::SmtpIngress)).unwrap();
    assert!(
        big_client
            .check_message(facts(GOOD_IP, &big))
            .await
            .is_err()
    );
    // Only the MX front door may ask (ADR 0006): the gateway's identity is refused,
    // and a client without a certificate from the internal CA never gets through.
    for role in [Role::Gateway, Role::Submission, Role::Admin] {
        let other = GrpcAuthCheck::new(&endpoint, 1 << 20, &testing::tls(role)).unwrap();
        let refused = other
            .check_client(BAD_IP.parse().unwrap())
            .await
            .unwrap_err();
        assert!(refused.0.contains("may not call"), "{role}: {}", refused.0);
    }
    let plain = mailmesh_proto::v1::auth_check_client::AuthCheckClient::new(
        tonic::transport::Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect_lazy(),
    )
    .check_client(mailmesh_proto::v1::CheckClientRequest { ip: BAD_IP.into() })
    .await;
    assert!(plain.is_err(), "{plain:?}");
}

/// Client verdicts (iprev, DNS lists) are shared through the real Redis: a second
/// pod whose resolver is gone still knows the client is listed; a lookup that failed
/// is never remembered.
#[tokio::test]
async fn client_verdicts_are_shared_between_pods_through_redis() {
    use mailmesh_cache::redis::{RedisCache, RedisConfig};
    let cache: Arc<dyn mailmesh_cache::Cache> = Arc::new(
        RedisCache::connect(&RedisConfig {
            url: mailmesh_kit::Secret::new(mailmesh_testkit::backend_env("MMTEST_REDIS")),
            key_prefix: format!("authtest-{}:", std::process::id()),
            command_timeout: std::time::Duration::from_secs(2),
            sentinel: None,
        })
        .await
        .unwrap(),
    );
    let pod = |dns: std::net::SocketAddr| {
        Checker::new(AuthConfig {
            dns: DnsConfig {
                servers: vec![dns],
                timeout: std::time::Duration::from_millis(300),
                attempts: 1,
                ..DnsConfig::default()
            },
            block_lists: vec!["bl.test".into()],
            ..AuthConfig::default()
        })
        .unwrap()
        .with_cache(cache.clone())
    };
    let site = site();
    let first = pod(site._dns.addr);
    let bad: IpAddr = BAD_IP.parse().unwrap();
    assert_eq!(
        first.check_client(bad).await.unwrap().blocked_by(),
        Some("bl.test")
    );
    let stored = cache.get(&format!("auth:client:{bad}")).await.unwrap();
    assert!(stored.is_some(), "the verdict is in Redis");

    // A pod with no resolver at all (nothing listens there) answers from Redis.
    let nowhere = std::net::SocketAddr::from(([127, 0, 0, 1], mailmesh_testkit::free_port()));
    let second = pod(nowhere);
    assert_eq!(
        second.check_client(bad).await.unwrap().blocked_by(),
        Some("bl.test")
    );
    // A refusal by the list is no answer: not listed, and not remembered.
    let refused: IpAddr = "192.0.2.88".parse().unwrap();
    assert_eq!(
        first.check_client(refused).await.unwrap().blocked_by(),
        None
    );
    assert!(
        cache
            .get(&format!("auth:client:{refused}"))
            .await
            .unwrap()
            .is_none()
    );
    // What it could not look up itself is not cached for the others.
    let other: IpAddr = "192.0.2.77".parse().unwrap();
    assert_eq!(second.check_client(other).await.unwrap().blocked_by(), None);
    assert!(
        cache
            .get(&format!("auth:client:{other}"))
            .await
            .unwrap()
            .is_none()
    );
}

/// A mailing list changes the body (breaking the author's DKIM signature and DMARC)
/// and ARC-seals what it received; the chain verifies, and the list's own
/// Authentication-Results are what a receiver may choose to trust.
#[tokio::test]
async fn an_arc_sealed_forward_verifies_its_chain() {
    use mail_auth::arc::ArcSealer;
    use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};

    let site = site();
    let original = signed(&site.key, MESSAGE);
    // The list adds a footer, then seals with its view of the original.
    let mut forwarded = original.clone();
    forwarded.extend_from_slice(b"--\r\nlist footer\r\n");
    let parsed = AuthenticatedMessage::parse(&forwarded).unwrap();
    let list_results = AuthenticationResults::new("lists.test").with_spf_mailfrom_result(
        &mail_auth::SpfOutput::default(),
        GOOD_IP.parse().unwrap(),
        "alice@example.test",
        "mx.example.test",
    );
    let seal = ArcSealer::from_key(Ed25519Key::from_pkcs8_der(&site.key).unwrap())
        .domain("lists.test")
        .selector("arc")
        .headers(["From", "To", "Subject", "DKIM-Signature"])
        .seal(&parsed, &list_results, &ArcOutput::default())
        .unwrap();
    let mut sealed = seal.to_header().into_bytes();
    sealed.extend_from_slice(&forwarded);

    let v = site
        .checker
        .check_message(MessageFacts {
            mail_from: "bounces@lists.test",
            ..facts(BAD_IP, &sealed)
        })
        .await
        .unwrap();
    assert_eq!(v.arc, AuthResult::Pass, "{v:?}");
    assert_ne!(
        v.dkim,
        AuthResult::Pass,
        "the footer broke the author's signature"
    );
    assert!(
        v.authentication_results.contains("arc=pass"),
        "{}",
        v.authentication_results
    );
}

/// Issue 16 §4: mail an alias forwards to another domain is ARC-sealed with what
/// this hop found; a receiver verifies the chain (here another checker, over the
/// same DNS) and sees this hop's results even once the forward broke SPF.
#[tokio::test]
async fn forwarded_mail_is_sealed_and_the_seal_verifies() {
    let site = site();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("arc.pem");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&site.key)
    );
    std::fs::write(&key_file, pem).unwrap();
    let sealer = Checker::new(AuthConfig {
        authserv_id: "lists.test".into(),
        dns: DnsConfig {
            servers: vec![site._dns.addr],
            ..DnsConfig::default()
        },
        arc_seal: Some(mailmesh_auth::sign::ArcSealConfig {
            key_file,
            domain: "lists.test".into(),
            selector: "arc".into(),
        }),
        ..AuthConfig::default()
    })
    .unwrap();
    let message = signed(&site.key, MESSAGE);
    // Only when asked (a recipient forwards).
    let plain = sealer
        .check_message(facts(GOOD_IP, &message))
        .await
        .unwrap();
    assert!(plain.arc_set.is_none());
    let v = sealer
        .check_message(MessageFacts {
            arc_seal: true,
            ..facts(GOOD_IP, &message)
        })
        .await
        .unwrap();
    let set = v.arc_set.expect("a seal");
    assert!(set.contains("ARC-Seal: i=1;"), "{set}");
    assert!(set.contains("cv=none"), "{set}");
    assert!(
        set.contains("ARC-Authentication-Results: i=1; lists.test;"),
        "{set}"
    );
    assert!(set.contains("spf=pass"), "{set}");
    // The forwarded copy, from the forwarder's address (SPF fails there now).
    let mut forwarded = set.into_bytes();
    forwarded.extend_from_slice(&message);
    let received = site
        .checker
        .check_message(MessageFacts {
            mail_from: "SRS0=abcdefgh=aa=example.test=alice@lists.test",
            ..facts(BAD_IP, &forwarded)
        })
        .await
        .unwrap();
    assert_eq!(received.arc, AuthResult::Pass, "{received:?}");
}
