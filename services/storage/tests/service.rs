//! Two `storage` processes on real Kafka and S3, driven over gRPC as the other
//! services will: a change made through one is seen, and streamed, through the other.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_testkit::{backend_env, free_port};
use tonic::transport::Channel;

struct Storage {
    child: Child,
    endpoint: String,
    log: tempfile::NamedTempFile,
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(run: &str) -> Storage {
    let grpc = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_storage"))
        .env_clear()
        .env("MAILMESH_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env(
            "MAILMESH_ADMIN__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
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
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    Storage {
        child,
        endpoint: format!("http://127.0.0.1:{grpc}"),
        log,
    }
}

async fn channel(storage: &Storage) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) = Channel::from_shared(storage.endpoint.clone())
            .unwrap()
            .connect()
            .await
        {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_state_and_stream_changes() {
    let run = format!("svc{}", uuid::Uuid::new_v4().simple());
    let (one, two) = (start(&run), start(&run));
    let (c1, c2) = (channel(&one).await, channel(&two).await);
    let mut dir1 = DirectoryClient::new(c1.clone());
    let mut dir2 = DirectoryClient::new(c2.clone());
    let mut mb1 = MailboxesClient::new(c1);
    let mut mb2 = MailboxesClient::new(c2);

    dir1.add_tenant(v1::AddTenantRequest {
        tenant: "acme".into(),
        limits: None,
    })
    .await
    .unwrap();
    dir1.add_domain(v1::DomainRequest {
        tenant: "acme".into(),
        domain: "acme.test".into(),
    })
    .await
    .unwrap();
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

    // Replica two sees the user (its reads sync with the log first).
    let lookup = dir2
        .lookup(v1::AddressRequest {
            address: "Alice@ACME.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lookup.result, v1::lookup_response::Result::Deliver as i32);
    assert_eq!(lookup.users, std::slice::from_ref(&alice));
    let auth = dir2
        .authenticate(v1::AuthenticateRequest {
            address: "alice@acme.test".into(),
            password: "s3cret".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(auth.ok);
    let bad = dir2
        .authenticate(v1::AuthenticateRequest {
            address: "nobody@acme.test".into(),
            password: "s3cret".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!bad.ok && bad.user.is_none());

    let mut watch = mb2.watch(alice.clone()).await.unwrap().into_inner();

    let delivered = mb1
        .deliver(v1::DeliverRequest {
            user: Some(alice.clone()),
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
    let err = mb1
        .deliver(v1::DeliverRequest {
            user: Some(v1::UserRef {
                tenant: "acme".into(),
                user_id: "../../etc".into(),
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
    let c3 = channel(&three).await;
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
        })
        .await
        .unwrap()
        .into_inner();
    assert!(auth.ok);
}
