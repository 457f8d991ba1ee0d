//! Two `storage` processes on real Kafka and S3, driven over gRPC as the other
//! services will: a change made through one is seen, and streamed, through the other.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mailmesh_kit::internal::{Role, testing};
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_testkit::{backend_env, free_port};
use tonic::transport::Channel;

/// The session secret both replicas share (tokens from one work on the other).
const SESSION_SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

struct Storage {
    child: Child,
    endpoint: String,
    admin: u16,
    log: tempfile::NamedTempFile,
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(run: &str) -> Storage {
    start_with(run, &[])
}

fn start_with(run: &str, env: &[(&str, &str)]) -> Storage {
    let grpc = free_port();
    let admin = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_storage"))
        .env_clear()
        .envs(testing::env(Role::Storage))
        .env("MAILMESH_STORAGE__SESSION_SECRET", SESSION_SECRET)
        .env("MAILMESH_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env("MAILMESH_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("MAILMESH_TELEMETRY__LOG_FORMAT", "text")
        .env("MAILMESH_SHUTDOWN__READINESS_GRACE", "0s")
        .env(
            "MAILMESH_QUEUE__KAFKA__BROKERS",
            backend_env("MMTEST_KAFKA"),
        )
        .env("MAILMESH_QUEUE__KAFKA__REPLICATION_FACTOR", "1")
        .env(
            "MAILMESH_OBJECT_STORE__S3__BUCKET",
            backend_env("MMTEST_S3_BUCKET"),
        )
        .env(
            "MAILMESH_OBJECT_STORE__S3__ENDPOINT",
            backend_env("MMTEST_S3"),
        )
        .env(
            "MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID",
            backend_env("MMTEST_S3_ACCESS_KEY"),
        )
        .env(
            "MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY",
            backend_env("MMTEST_S3_SECRET_KEY"),
        )
        .env(
            "MAILMESH_STORAGE__DIRECTORY_TOPIC",
            format!("{run}.directory"),
        )
        .env(
            "MAILMESH_STORAGE__MAILBOX_TOPIC",
            format!("{run}.mailboxes"),
        )
        .env("MAILMESH_STORAGE__MAILBOX_PARTITIONS", "4")
        .env("MAILMESH_STORAGE__MAX_MESSAGE_BYTES", "100000")
        // Short test passwords; the policy has tests of its own.
        .env("MAILMESH_STORAGE__PASSWORD_POLICY__MIN_LENGTH", "1")
        .env("MAILMESH_STORAGE__PASSWORD_POLICY__REFUSE_COMMON", "false")
        .envs(env.iter().copied())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    Storage {
        child,
        endpoint: format!("http://127.0.0.1:{grpc}"),
        admin,
        log,
    }
}

/// A channel to `storage` with `role`'s identity (mutual TLS).
async fn channel(storage: &Storage, role: Role) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    let tls = testing::tls(role);
    loop {
        let endpoint = tonic::transport::Endpoint::from_shared(storage.endpoint.clone()).unwrap();
        if let Ok(channel) = tls.connect(endpoint, Role::Storage).await {
            return channel;
        }
        assert!(
            Instant::now() < deadline,
            "storage never listened; its log:\n{}",
            std::fs::read_to_string(storage.log.path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates `tenant` owning `domain`, as the admin.
async fn tenant_with_domain(directory: &mut DirectoryClient<Channel>, tenant: &str, domain: &str) {
    directory
        .add_tenant(v1::AddTenantRequest {
            tenant: tenant.into(),
            limits: None,
        })
        .await
        .unwrap();
    directory
        .add_domain(v1::DomainRequest {
            tenant: tenant.into(),
            domain: domain.into(),
            user: None,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_state_and_stream_changes() {
    let run = format!("svc{}", uuid::Uuid::new_v4().simple());
    let (one, two) = (start(&run), start(&run));
    // The admin sets up; the delivery worker delivers; the gateway logs in and reads.
    let mut dir1 = DirectoryClient::new(channel(&one, Role::Admin).await);
    let mut lookup2 = DirectoryClient::new(channel(&two, Role::SmtpIngress).await);
    let (g1, g2) = (
        channel(&one, Role::Gateway).await,
        channel(&two, Role::Gateway).await,
    );
    let mut dir2 = DirectoryClient::new(g2.clone());
    let mut deliver1 = MailboxesClient::new(channel(&one, Role::DeliveryWorker).await);
    let mut mb1 = MailboxesClient::new(g1);
    let mut mb2 = MailboxesClient::new(g2);

    tenant_with_domain(&mut dir1, "acme", "acme.test").await;
    let alice = dir1
        .add_user(v1::AddUserRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            quota_bytes: 50_000,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    // Replica two sees the user once its reader has applied the change: the
    // SMTP lookup is served from the tailed directory without a barrier (a new
    // user may be unknown to other replicas for the tailing lag).
    let deadline = Instant::now() + Duration::from_secs(30);
    let lookup = loop {
        let lookup = lookup2
            .lookup(v1::AddressRequest {
                address: "Alice@ACME.test".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if lookup.result != v1::lookup_response::Result::Unknown as i32 || Instant::now() > deadline
        {
            break lookup;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lookup.result, v1::lookup_response::Result::Deliver as i32);
    assert_eq!(lookup.users, std::slice::from_ref(&alice));
    let auth = dir2
        .authenticate(v1::AuthenticateRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            client_ip: "192.0.2.10".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(auth.ok);
    let bad = dir2
        .authenticate(v1::AuthenticateRequest {
            address: "nobody@acme.test".into(),
            password: "s3cret".into(),
            client_ip: "192.0.2.10".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!bad.ok && bad.user.is_none());
    // Logged in through replica two; the token opens alice's mailboxes on both.
    let delivered_to = alice.clone();
    let alice = auth.user.unwrap().user.unwrap();
    assert!(!alice.session.is_empty());

    let mut watch = mb2.watch(alice.clone()).await.unwrap().into_inner();

    let delivered = deliver1
        .deliver(v1::DeliverRequest {
            user: Some(delivered_to.clone()),
            mailbox: String::new(),
            return_path: "bob@example.org".into(),
            delivered_to: "alice@acme.test".into(),
            message: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
            delivery_key: "q-1/alice@acme.test".into(),
            internal_date_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((delivered.uid, delivered.duplicate), (1, false));

    let change = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("a change within the timeout")
        .unwrap()
        .unwrap();
    assert_eq!(change.kind, v1::mailbox_change::Kind::Exists as i32);
    assert_eq!((change.mailbox.as_str(), change.uid), ("INBOX", 1));

    // Content streamed back through the other replica.
    let mut fetched = Vec::new();
    let mut stream = mb2
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
    while let Some(chunk) = stream.next().await {
        fetched.extend(chunk.unwrap().data);
    }
    assert_eq!(
        fetched,
        b"Return-Path: <bob@example.org>\r\nDelivered-To: alice@acme.test\r\nSubject: hi\r\n\r\nhello\r\n"
    );

    mb1.store_flags(v1::StoreFlagsRequest {
        user: Some(alice.clone()),
        mailbox: "INBOX".into(),
        uids: vec![v1::UidRange { first: 1, last: 1 }],
        action: v1::store_flags_request::Action::Add as i32,
        flags: vec!["\\Seen".into()],
        unchanged_since: None,
    })
    .await
    .unwrap();
    let change = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("a change within the timeout")
        .unwrap()
        .unwrap();
    assert_eq!(change.kind, v1::mailbox_change::Kind::Flags as i32);
    let status = mb2
        .status(v1::MailboxRequest {
            user: Some(alice.clone()),
            mailbox: "inbox".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.messages, status.unseen, status.uid_next), (1, 0, 2));
    let seen = mb2
        .search(v1::SearchRequest {
            user: Some(alice.clone()),
            mailbox: "INBOX".into(),
            has_flags: vec!["\\Seen".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.uids, [1]);

    // Bad input: the field is named; limits map to codes the front doors use.
    let err = deliver1
        .deliver(v1::DeliverRequest {
            user: Some(v1::UserRef {
                tenant: "acme".into(),
                user_id: "../../etc".into(),
                session: String::new(),
                position: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("user.user_id"), "{}", err.message());
    let err = mb1
        .append(v1::AppendRequest {
            user: Some(alice.clone()),
            mailbox: "INBOX".into(),
            message: vec![b'x'; 60_000],
            flags: vec![],
            internal_date_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.metadata().get("mailmesh-permanent").is_some(),
        "60 kB never fits a 50 kB quota"
    );
    let err = mb1
        .append(v1::AppendRequest {
            user: Some(alice.clone()),
            mailbox: "Nowhere".into(),
            message: b"x".to_vec(),
            flags: vec![],
            internal_date_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("trycreate"), "{}", err.message());

    // Every pod killed at once (SIGKILL), then a fresh one: acknowledged changes are
    // all there. Redis plays no part in storage, so flushing it cannot matter.
    drop((one, two));
    let three = start(&run);
    let c3 = channel(&three, Role::Gateway).await;
    let status = MailboxesClient::new(c3.clone())
        .status(v1::MailboxRequest {
            user: Some(alice.clone()),
            mailbox: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.messages, status.unseen, status.uid_next), (1, 0, 2));
    let auth = DirectoryClient::new(c3)
        .authenticate(v1::AuthenticateRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(auth.ok);
}

/// ADR 0006 against the real binary: nobody without a certificate from the
/// internal CA gets in; each role reaches only its calls; a front door acts for a
/// user only with that user's session token, so a compromised gateway cannot walk
/// other users' mail, reset passwords or read DKIM keys; storage counts password
/// failures itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_known_roles_reach_their_calls_and_users_need_their_session() {
    let run = format!("authz{}", uuid::Uuid::new_v4().simple());
    let storage = start_with(&run, &[("MAILMESH_STORAGE__LOGIN_MAX_FAILURES", "5")]);
    let admin = channel(&storage, Role::Admin).await;
    let mut directory = DirectoryClient::new(admin.clone());
    tenant_with_domain(&mut directory, "acme", "acme.test").await;
    let mut users = Vec::new();
    for address in ["alice@acme.test", "bob@acme.test"] {
        users.push(
            directory
                .add_user(v1::AddUserRequest {
                    address: address.into(),
                    password: "s3cret".into(),
                    quota_bytes: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap(),
        );
    }
    let bob = users[1].clone();
    directory
        .add_dkim_key(v1::AddDkimKeyRequest {
            domain: "acme.test".into(),
            selector: "k1".into(),
            algorithm: v1::DkimAlgorithm::Ed25519 as i32,
            activate: true,
        })
        .await
        .unwrap();

    // No certificate at all, or one from another CA: no connection.
    let plain = Channel::from_shared(storage.endpoint.clone())
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(c) => DirectoryClient::new(c)
            .list_tenants(v1::Empty {})
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client was served");
    let strange = tempfile::tempdir().unwrap();
    mailmesh_kit::internal::write_pki(strange.path()).unwrap();
    let stranger = mailmesh_kit::internal::InternalTls::load(
        &mailmesh_kit::internal::InternalTlsConfig::in_dir(strange.path(), Role::Admin),
        Role::Admin,
    )
    .unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(storage.endpoint.clone()).unwrap();
    assert!(stranger.connect(endpoint, Role::Storage).await.is_err());

    // A gateway: logs alice in; everything else it tries is refused.
    let gateway = channel(&storage, Role::Gateway).await;
    let mut gw_dir = DirectoryClient::new(gateway.clone());
    let mut gw_mb = MailboxesClient::new(gateway.clone());
    let login = gw_dir
        .authenticate(v1::AuthenticateRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            client_ip: "198.51.100.7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let alice = login.user.unwrap().user.unwrap();
    assert!(login.session_expires_ms > 0);
    let denied = |r: Result<_, tonic::Status>, code: tonic::Code, what: &str| match r {
        Err(s) if s.code() == code => {}
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    };
    denied(
        gw_dir.list_tenants(v1::Empty {}).await.map(drop),
        tonic::Code::PermissionDenied,
        "listing tenants",
    );
    denied(
        gw_dir
            .set_password(v1::SetPasswordRequest {
                address: "bob@acme.test".into(),
                password: "taken-over".into(),
            })
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "resetting a password",
    );
    denied(
        gw_dir
            .get_signing_key(v1::DomainRequest {
                tenant: String::new(),
                domain: "acme.test".into(),
                user: Some(alice.clone()),
            })
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "reading a DKIM key",
    );
    let inbox = |user: &v1::UserRef| v1::MailboxRequest {
        user: Some(user.clone()),
        mailbox: "INBOX".into(),
    };
    // Alice's own mailbox opens with her token…
    gw_mb.list_messages(inbox(&alice)).await.unwrap();
    // …bob's does not, with no token, with alice's, or with a forged one.
    let mut with_alices = bob.clone();
    with_alices.session = alice.session.clone();
    let mut forged = bob.clone();
    forged.session = format!("v1.{}.AAAA", i64::MAX);
    for (user, what) in [
        (&bob, "no token"),
        (&with_alices, "alice's token"),
        (&forged, "a forged token"),
    ] {
        denied(
            gw_mb.list_messages(inbox(user)).await.map(drop),
            tonic::Code::Unauthenticated,
            what,
        );
        denied(
            gw_mb
                .append(v1::AppendRequest {
                    user: Some(user.clone()),
                    mailbox: "INBOX".into(),
                    message: b"Subject: planted\r\n\r\nx\r\n".to_vec(),
                    flags: vec![],
                    internal_date_ms: 0,
                })
                .await
                .map(drop),
            tonic::Code::Unauthenticated,
            what,
        );
    }
    denied(
        gw_mb
            .deliver(v1::DeliverRequest {
                user: Some(bob.clone()),
                ..Default::default()
            })
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "delivering as the gateway",
    );
    // The admin sees counts, not content; the MX front door only looks addresses up.
    let mut admin_mb = MailboxesClient::new(admin.clone());
    admin_mb.status(inbox(&bob)).await.unwrap();
    denied(
        admin_mb
            .fetch(v1::FetchRequest {
                user: Some(bob.clone()),
                mailbox: "INBOX".into(),
                uid: 1,
                start: 0,
                end: 0,
            })
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "the admin reading mail",
    );
    let ingress = channel(&storage, Role::SmtpIngress).await;
    denied(
        MailboxesClient::new(ingress.clone())
            .list_mailboxes(bob.clone())
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "the MX listing mailboxes",
    );
    denied(
        DirectoryClient::new(ingress)
            .authenticate(v1::AuthenticateRequest {
                address: "bob@acme.test".into(),
                password: "guess".into(),
                client_ip: String::new(),
            })
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "the MX checking passwords",
    );

    // Submission gets the signing key of its user's own domain only.
    let submission = channel(&storage, Role::Submission).await;
    let mut sub_dir = DirectoryClient::new(submission);
    let sub_login = sub_dir
        .authenticate(v1::AuthenticateRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            client_ip: "198.51.100.7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sub_alice = sub_login.user.unwrap().user.unwrap();
    let key = sub_dir
        .get_signing_key(v1::DomainRequest {
            tenant: String::new(),
            domain: "acme.test".into(),
            user: Some(sub_alice.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!key.private_key.is_empty());
    // The gateway's token is not submission's.
    denied(
        sub_dir
            .get_signing_key(v1::DomainRequest {
                tenant: String::new(),
                domain: "acme.test".into(),
                user: Some(alice.clone()),
            })
            .await
            .map(drop),
        tonic::Code::Unauthenticated,
        "a gateway token at submission",
    );
    tenant_with_domain(&mut directory, "other", "other.test").await;
    denied(
        sub_dir
            .get_signing_key(v1::DomainRequest {
                tenant: String::new(),
                domain: "other.test".into(),
                user: Some(sub_alice),
            })
            .await
            .map(drop),
        tonic::Code::PermissionDenied,
        "another tenant's key",
    );

    // Renewal: a fresh token while the account is enabled; none once disabled.
    let renewed = gw_dir
        .refresh_session(alice.clone())
        .await
        .unwrap()
        .into_inner();
    let renewed_alice = renewed.user.unwrap();
    gw_mb.list_messages(inbox(&renewed_alice)).await.unwrap();
    directory
        .set_enabled(v1::SetEnabledRequest {
            address: "alice@acme.test".into(),
            enabled: false,
        })
        .await
        .unwrap();
    denied(
        gw_dir.refresh_session(renewed_alice).await.map(drop),
        tonic::Code::Unauthenticated,
        "renewing a disabled account's session",
    );

    // Password guessing straight at storage (a caller that skips the front door's
    // limits) is counted per client address: refused after login_max_failures.
    let mut refused_at = None;
    for attempt in 1..=10 {
        let r = gw_dir
            .authenticate(v1::AuthenticateRequest {
                address: "bob@acme.test".into(),
                password: format!("guess{attempt}"),
                client_ip: "203.0.113.99".into(),
            })
            .await;
        match r {
            Ok(r) => assert!(!r.into_inner().ok),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                refused_at = Some(attempt);
                break;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!(refused_at, Some(6), "refused after login_max_failures (5)");
    // Bob himself, from elsewhere, still gets in.
    let bob_in = gw_dir
        .authenticate(v1::AuthenticateRequest {
            address: "bob@acme.test".into(),
            password: "s3cret".into(),
            client_ip: "192.0.2.200".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(bob_in.ok);
    // The client address is the caller's word: a guess naming yet another one
    // meets the account's pace (one check per login_account_pace once it has
    // login_max_failures failures), not a fresh budget.
    let r = gw_dir
        .authenticate(v1::AuthenticateRequest {
            address: "bob@acme.test".into(),
            password: "guess-from-a-new-address".into(),
            client_ip: "192.0.2.201".into(),
        })
        .await;
    assert_eq!(
        r.map(|r| r.into_inner().ok).map_err(|s| s.code()),
        Err(tonic::Code::Unavailable)
    );
    let log = std::fs::read_to_string(storage.log.path()).unwrap_or_default();
    assert!(log.contains("internal call refused"), "{log}");
}

/// A Watch opened with a session lasts as long as the session: the gateway
/// watches again with a renewed token (refused once the account is disabled), so a
/// revoked session no longer follows the mailbox for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_with_its_session() {
    let run = format!("watch{}", uuid::Uuid::new_v4().simple());
    let storage = start_with(&run, &[("MAILMESH_STORAGE__SESSION_TTL", "10s")]);
    let (gateway, alice) = alice_logged_in(&storage).await;
    let started = Instant::now();
    let mut watch = MailboxesClient::new(gateway)
        .watch(alice)
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(change) = watch.next().await {
            change.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "the watch outlived its session");
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// Tenant acme with the user alice, logged in as a gateway logs users in: the
/// gateway's channel and alice with her session token.
async fn alice_logged_in(storage: &Storage) -> (Channel, v1::UserRef) {
    let mut directory = DirectoryClient::new(channel(storage, Role::Admin).await);
    tenant_with_domain(&mut directory, "acme", "acme.test").await;
    directory
        .add_user(v1::AddUserRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            quota_bytes: 0,
        })
        .await
        .unwrap();
    let gateway = channel(storage, Role::Gateway).await;
    let alice = DirectoryClient::new(gateway.clone())
        .authenticate(v1::AuthenticateRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
            client_ip: "198.51.100.7".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .user
        .unwrap();
    (gateway, alice)
}

/// The lines of a replica's log that mention any of `words` (the last 40), for
/// a failure's message.
fn log_lines(storage: &Storage, words: &[&str]) -> String {
    let log = std::fs::read_to_string(storage.log.path()).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| words.iter().any(|w| l.contains(w)))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `message` as a call carrying request id `id` (`mailmesh-request-id`).
fn as_request<T>(id: uuid::Uuid, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        mailmesh_proto::REQUEST_ID_METADATA,
        id.to_string().parse().unwrap(),
    );
    request
}

async fn count_in(
    mailboxes: &mut MailboxesClient<Channel>,
    user: &v1::UserRef,
    mailbox: &str,
) -> u32 {
    mailboxes
        .status(v1::MailboxRequest {
            user: Some(user.clone()),
            mailbox: mailbox.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages
}

/// A streamed APPEND of `body` (or, with `resume`, the call that finishes one
/// whose answer was lost) under request id `id`.
async fn append_stream(
    mailboxes: &mut MailboxesClient<Channel>,
    user: &v1::UserRef,
    id: uuid::Uuid,
    body: &[u8],
    resume: bool,
) -> Result<v1::AppendResponse, tonic::Status> {
    let chunks = vec![v1::AppendChunk {
        start: Some(v1::AppendStart {
            user: Some(user.clone()),
            mailbox: "INBOX".into(),
            size: body.len() as u64,
            resume,
            ..Default::default()
        }),
        data: if resume { Vec::new() } else { body.to_vec() },
        end: true,
    }];
    mailboxes
        .append_stream(as_request(id, futures::stream::iter(chunks)))
        .await
        .map(tonic::Response::into_inner)
}

/// Issue 20, defect 2: a client that did not hear the answer to a write sends it
/// again with the same request id, and storage applies it once and answers it as
/// the first time; a streamed APPEND whose answer was lost is finished with
/// `resume`, and one that never arrived is given up for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_again_with_their_request_id_are_applied_once() {
    let run = format!("again{}", uuid::Uuid::new_v4().simple());
    let storage = start(&run);
    let (gateway, alice) = alice_logged_in(&storage).await;
    let mut mailboxes = MailboxesClient::new(gateway);

    // APPEND twice under one id: one message, the same UID both times.
    let id = uuid::Uuid::new_v4();
    let append = v1::AppendRequest {
        user: Some(alice.clone()),
        mailbox: "INBOX".into(),
        message: b"Subject: once\r\n\r\nbody\r\n".to_vec(),
        ..Default::default()
    };
    let first = mailboxes
        .append(as_request(id, append.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = mailboxes
        .append(as_request(id, append.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.uid, again.uid_validity),
        (first.uid, first.uid_validity)
    );
    assert_eq!(count_in(&mut mailboxes, &alice, "INBOX").await, 1);
    // Without an id (or with another) it is another message.
    mailboxes.append(append.clone()).await.unwrap();
    assert_eq!(count_in(&mut mailboxes, &alice, "INBOX").await, 2);

    // CREATE sent again is not "already exists"; COPY sent again copies once.
    let id = uuid::Uuid::new_v4();
    let create = v1::MailboxRequest {
        user: Some(alice.clone()),
        mailbox: "Projects".into(),
    };
    mailboxes
        .create_mailbox(as_request(id, create.clone()))
        .await
        .unwrap();
    mailboxes
        .create_mailbox(as_request(id, create))
        .await
        .expect("a repeated CREATE answers as the first");
    let id = uuid::Uuid::new_v4();
    let copy = v1::CopyRequest {
        user: Some(alice.clone()),
        from: "INBOX".into(),
        to: "Projects".into(),
        uids: vec![v1::UidRange {
            first: first.uid,
            last: first.uid,
        }],
        remove_source: false,
    };
    let copied = mailboxes
        .copy(as_request(id, copy.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = mailboxes
        .copy(as_request(id, copy))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.destination_uids, copied.destination_uids);
    assert_eq!(count_in(&mut mailboxes, &alice, "Projects").await, 1);

    // A whole streamed APPEND, then `resume` under its id: the same message.
    let id = uuid::Uuid::new_v4();
    let body = b"Subject: streamed\r\n\r\nbody\r\n";
    let streamed = append_stream(&mut mailboxes, &alice, id, body, false)
        .await
        .unwrap();
    let resumed = append_stream(&mut mailboxes, &alice, id, body, true)
        .await
        .unwrap();
    assert_eq!(resumed.uid, streamed.uid);
    assert_eq!(count_in(&mut mailboxes, &alice, "INBOX").await, 3);

    // `resume` for an APPEND whose body never arrived: certainly not stored, and
    // the first attempt arriving late is refused.
    let id = uuid::Uuid::new_v4();
    let given_up = append_stream(&mut mailboxes, &alice, id, body, true)
        .await
        .unwrap_err();
    assert_eq!(
        given_up.code(),
        tonic::Code::FailedPrecondition,
        "{given_up}"
    );
    let late = append_stream(&mut mailboxes, &alice, id, body, false)
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late}");
    assert_eq!(count_in(&mut mailboxes, &alice, "INBOX").await, 3);
}

/// A gauge or counter from a replica's `/metrics` (summed over the series that
/// contain `labels`), 0 when absent or unreachable.
async fn metric(storage: &Storage, name: &str, labels: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", storage.admin)).await else {
        return 0.0;
    };
    let _ = tcp
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = tcp.read_to_string(&mut body).await;
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Adds `count` users `user<i>@acme.test`, as the admin.
async fn add_users(directory: &mut DirectoryClient<Channel>, count: usize) -> Vec<v1::UserRef> {
    let mut users = Vec::new();
    for i in 0..count {
        users.push(
            directory
                .add_user(v1::AddUserRequest {
                    address: format!("user{i}@acme.test"),
                    password: "s3cret-passphrase".into(),
                    quota_bytes: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap(),
        );
    }
    users
}

/// Partitions a replica owns (its metrics).
async fn owned(storage: &Storage) -> f64 {
    partitions(storage, "owned").await
}

/// Partitions a replica began to serve from its warm standby (its metrics).
async fn warm_takeovers(storage: &Storage) -> f64 {
    metric(
        storage,
        "mailmesh_storage_partition_takeovers_total",
        "from=\"standby\"",
    )
    .await
}

/// A replica's mailbox partitions in `state` (its metrics).
async fn partitions(storage: &Storage, state: &str) -> f64 {
    metric(
        storage,
        "mailmesh_storage_mailbox_partitions",
        &format!("state=\"{state}\""),
    )
    .await
}

/// Waits until each of `replicas` owns at least one partition.
async fn until_each_owns(replicas: &[&Storage]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for replica in replicas {
        while owned(replica).await < 1.0 {
            assert!(
                Instant::now() < deadline,
                "a replica was given no partition"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Messages in a user's INBOX as the admin sees them through `storage`.
async fn inbox_count(mailboxes: &mut MailboxesClient<Channel>, user: &v1::UserRef) -> Option<u32> {
    mailboxes
        .status(v1::MailboxRequest {
            user: Some(user.clone()),
            mailbox: "INBOX".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().messages)
}

/// Each partition is applied by one replica (ADR 0005 §1): two replicas split the
/// partitions, every call reaches the owner through either of them, and when one
/// is killed the other takes its partitions over with nothing acknowledged lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_split_partitions_and_a_killed_owner_is_taken_over() {
    const PARTITIONS: f64 = 4.0;
    let run = format!("own{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let (one, mut two) = (start(&run), start(&run));
    let mut dir1 = DirectoryClient::new(channel(&one, Role::Admin).await);
    tenant_with_domain(&mut dir1, "acme", "acme.test").await;
    let users = add_users(&mut dir1, 12).await;
    // The group gives each replica a share, and each opens only its own.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (a, b) = (owned(&one).await, owned(&two).await);
        if a >= 1.0 && b >= 1.0 && a + b == PARTITIONS {
            eprintln!(
                "partitions split {a} + {b} {:?} after the start",
                started.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "owned partitions {a} + {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Deliveries through one replica, reads through the other: every call for a
    // partition the receiving replica does not own is forwarded to its owner.
    let mut deliver1 = MailboxesClient::new(channel(&one, Role::DeliveryWorker).await);
    let mut admin2 = MailboxesClient::new(channel(&two, Role::Admin).await);
    for (i, user) in users.iter().enumerate() {
        deliver1
            .deliver(v1::DeliverRequest {
                user: Some(user.clone()),
                message: format!("Subject: first {i}\r\n\r\nbody\r\n").into_bytes(),
                delivered_to: format!("user{i}@acme.test"),
                delivery_key: format!("q1/{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for user in &users {
        // Read at the owner: the delivery is there at once, wherever it came in.
        assert_eq!(inbox_count(&mut admin2, user).await, Some(1), "{user:?}");
    }
    let forwarded = metric(&one, "mailmesh_storage_calls_forwarded_total", "answered").await
        + metric(&two, "mailmesh_storage_calls_forwarded_total", "answered").await;
    assert!(forwarded >= 1.0, "no call was forwarded");
    // Each replica applies what it owns, and keeps the other's partitions warm (a
    // standby per partition by default; with two replicas, the other one).
    let deadline = Instant::now() + Duration::from_secs(60);
    for replica in [&one, &two] {
        loop {
            let (mine, open, standby) = (
                owned(replica).await,
                partitions(replica, "open").await,
                partitions(replica, "standby").await,
            );
            assert!(
                open <= mine + standby,
                "a replica applies only what it owns or stands by for: {open} open, {mine} owned, {standby} standby"
            );
            if open == PARTITIONS && standby == PARTITIONS - mine {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "standbys not open: {open} open, {mine} owned, {standby} standby; the replica said:\n{}",
                log_lines(replica, &["standby", "partition", "WARN", "ERROR"])
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let lost = owned(&two).await;
    let warm_before = warm_takeovers(&one).await;

    // SIGKILL: no leave, the group notices when the session times out.
    let _ = two.child.kill();
    let _ = two.child.wait();
    let killed = Instant::now();
    let mut admin1 = MailboxesClient::new(channel(&one, Role::Admin).await);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mine = owned(&one).await;
        if mine == PARTITIONS {
            eprintln!(
                "the survivor owns every partition {:?} after the kill",
                killed.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor owns {mine} partitions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What the killed replica owned was warm here: served without a restore.
    assert_eq!(
        warm_takeovers(&one).await - warm_before,
        lost,
        "partitions taken over from the standby"
    );
    for (i, user) in users.iter().enumerate() {
        assert_eq!(
            inbox_count(&mut admin1, user).await,
            Some(1),
            "{user:?} after the takeover"
        );
        // A replay of an acknowledged delivery stores nothing new; a new one lands.
        for key in [format!("q1/{i}"), format!("q2/{i}")] {
            deliver1
                .deliver(v1::DeliverRequest {
                    user: Some(user.clone()),
                    message: format!("Subject: {key}\r\n\r\nbody\r\n").into_bytes(),
                    delivered_to: format!("user{i}@acme.test"),
                    delivery_key: key,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        assert_eq!(inbox_count(&mut admin1, user).await, Some(2), "{user:?}");
    }
}

/// The tenant storage limit counts the tenant's mail in every partition, whichever
/// replica owns it: an owner asks the others (their answer is used for a few
/// seconds), it does not open their partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_storage_limit_counts_every_owners_partitions() {
    const LIMIT: u64 = 10_000;
    const SIZE: usize = 500;
    let run = format!("lim{}", uuid::Uuid::new_v4().simple());
    let (one, two) = (start(&run), start(&run));
    let mut dir1 = DirectoryClient::new(channel(&one, Role::Admin).await);
    dir1.add_tenant(v1::AddTenantRequest {
        tenant: "acme".into(),
        limits: Some(v1::TenantLimits {
            max_storage_bytes: LIMIT,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    dir1.add_domain(v1::DomainRequest {
        tenant: "acme".into(),
        domain: "acme.test".into(),
        user: None,
    })
    .await
    .unwrap();
    // Enough users that both replicas own some of them (one side only: 2^-23).
    let users = add_users(&mut dir1, 24).await;
    until_each_owns(&[&one, &two]).await;
    let mut deliver = MailboxesClient::new(channel(&one, Role::DeliveryWorker).await);
    let message = |key: &str| {
        let head = format!("Subject: {key}\r\n\r\n");
        let mut m = head.into_bytes();
        m.resize(SIZE, b'x');
        m
    };
    let mut accepted = 0u64;
    for (i, user) in users.iter().enumerate() {
        let key = format!("q/{i}");
        match deliver
            .deliver(v1::DeliverRequest {
                user: Some(user.clone()),
                message: message(&key),
                delivered_to: format!("user{i}@acme.test"),
                delivery_key: key,
                ..Default::default()
            })
            .await
        {
            Ok(_) => accepted += 1,
            Err(s) => assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}"),
        }
    }
    // Each owner refuses only once what it knows of exceeds the limit, so at least
    // the limit's worth went in (more when an owner's view of the other was old).
    assert!(accepted * SIZE as u64 >= LIMIT, "{accepted} accepted");
    // Once the answers of the other owner are fresh again, no owner takes more:
    // its own partitions alone hold well under the limit. The deliveries go at
    // once, and each replica asks the other one question for all of them.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let asked = |s| metric(s, "mailmesh_storage_tenant_usage_asked_total", "");
    let before = asked(&one).await + asked(&two).await;
    let late = users.iter().enumerate().map(|(i, user)| {
        let mut deliver = deliver.clone();
        let key = format!("late/{i}");
        let request = v1::DeliverRequest {
            user: Some(user.clone()),
            message: message(&key),
            delivered_to: format!("user{i}@acme.test"),
            delivery_key: key,
            ..Default::default()
        };
        async move { deliver.deliver(request).await }
    });
    for refused in futures::future::join_all(late).await {
        let refused = refused.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
    }
    let questions = asked(&one).await + asked(&two).await - before;
    assert!(
        (1.0..=2.0).contains(&questions),
        "{questions} questions for {} deliveries",
        users.len()
    );
}

/// Deliveries keep being acknowledged while partition owners come and go (one
/// killed, one added), each exactly once: a caller that retries an unanswered
/// delivery with its key (as the delivery worker does) never stores it twice, and
/// nothing acknowledged is lost in a move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_survive_owners_coming_and_going_exactly_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const USERS: usize = 12;
    const MESSAGES: usize = 240;
    let run = format!("mov{}", uuid::Uuid::new_v4().simple());
    let (one, mut two) = (start(&run), start(&run));
    let mut dir1 = DirectoryClient::new(channel(&one, Role::Admin).await);
    tenant_with_domain(&mut dir1, "acme", "acme.test").await;
    let users = add_users(&mut dir1, USERS).await;
    // Both replicas own partitions before the writes start.
    until_each_owns(&[&one, &two]).await;
    let deliver = MailboxesClient::new(channel(&one, Role::DeliveryWorker).await);
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (users, done) = (users.clone(), done.clone());
        tokio::spawn(async move {
            let mut deliver = deliver;
            let mut retries = 0;
            for i in 0..MESSAGES {
                let request = v1::DeliverRequest {
                    user: Some(users[i % USERS].clone()),
                    message: format!("Subject: m{i}\r\n\r\nbody\r\n").into_bytes(),
                    delivered_to: format!("user{}@acme.test", i % USERS),
                    delivery_key: format!("q/{i}"),
                    ..Default::default()
                };
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match deliver.deliver(request.clone()).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            assert!(Instant::now() < deadline, "m{i} never acknowledged: {s:?}");
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(s) => panic!("m{i}: {s:?}"),
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                if i >= 2 * MESSAGES / 3 {
                    // Slower, so the newcomer joins while deliveries go on.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            retries
        })
    };
    let reached = async |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(180);
        while done.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "stuck at {} deliveries",
                done.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    reached(MESSAGES / 3).await;
    let _ = two.child.kill();
    let _ = two.child.wait();
    reached(2 * MESSAGES / 3).await;
    let three = start(&run);
    until_each_owns(&[&three]).await;
    let joined_at = done.load(Ordering::Relaxed);
    let retries = writer.await.unwrap();
    eprintln!("the newcomer owned partitions after {joined_at} deliveries");
    eprintln!("{MESSAGES} deliveries acknowledged, {retries} retried after UNAVAILABLE");
    // Read through the newcomer (forwarded to each owner): every user holds each
    // of their deliveries once.
    let mut admin3 = MailboxesClient::new(channel(&three, Role::Admin).await);
    for user in &users {
        let deadline = Instant::now() + Duration::from_secs(60);
        let count = loop {
            if let Some(count) = inbox_count(&mut admin3, user).await {
                break count;
            }
            assert!(Instant::now() < deadline, "{user:?} unreadable");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(count as usize, MESSAGES / USERS, "{user:?}");
    }
}
