//! The sending path as deployed: `storage`, `submission` and `delivery-worker` as
//! separate processes on real Kafka, S3 and Redis (`MMTEST_*`). swaks submits on the
//! STARTTLS port with AUTH LOGIN and Python's smtplib on the implicit-TLS port with
//! AUTH PLAIN; the messages are DKIM-signed with a key made through the storage API,
//! a local recipient gets hers in the INBOX, and the remote MX (a test MX found
//! through dnsmasq) first answers 451, then takes it on the retry from the due-time
//! index in S3. dkimpy verifies what it received.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::processes::{
    acme_with_users, backends, spawn, spawn_storage, uuid_like, wait_for, wait_for_messages,
};
use mailmesh_proto::v1;
use mailmesh_testkit::mx::TestMx;
use mailmesh_testkit::{backend_env, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_mail_is_signed_delivered_and_relayed_through_separate_processes() {
    let run = format!("out{}", uuid_like());
    let grpc = free_port();
    let (starttls, implicit) = (free_port(), free_port());
    let mx = TestMx::start(
        None,
        Arc::new(|rcpt, n| {
            if rcpt.starts_with("friend@") && n == 1 {
                "451 4.7.1 greylisted".to_owned()
            } else {
                "250 2.1.5 ok".to_owned()
            }
        }),
    );
    let dns = mailmesh_testkit::dns::DnsServer::start(&[
        "mx-host=remote.test,mx.remote.test,10".into(),
        "host-record=mx.remote.test,127.0.0.1".into(),
    ]);
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let topic = format!("{run}.mail");
    let redis = |env: &mut Vec<(&'static str, String)>| {
        env.push(("MAILMESH_CACHE__REDIS__URL", backend_env("MMTEST_REDIS")));
        env.push(("MAILMESH_CACHE__REDIS__KEY_PREFIX", format!("{run}:")));
    };

    let storage = spawn_storage(&run, grpc);

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = mailmesh_kit::tls::ensure_self_signed(dir.path(), &["localhost"]).unwrap();
    let mut env = backends(&run);
    env.push(("MAILMESH_LISTEN", format!("127.0.0.1:{starttls}")));
    env.push(("MAILMESH_LISTEN_TLS", format!("127.0.0.1:{implicit}")));
    env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
    env.push(("MAILMESH_SMTP__TOPIC", topic.clone()));
    env.push(("MAILMESH_SMTP__HOSTNAME", "smtp.acme.test".into()));
    env.push(("MAILMESH_TLS__CERT_FILE", cert.display().to_string()));
    env.push(("MAILMESH_TLS__KEY_FILE", key.display().to_string()));
    redis(&mut env);
    let submission = spawn("submission", &env);

    let mut env = backends(&run);
    env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
    env.push(("MAILMESH_WORKER__TOPIC", topic.clone()));
    env.push(("MAILMESH_WORKER__GROUP", format!("{run}.workers")));
    env.push((
        "MAILMESH_WORKER__RETRY_PREFIX",
        format!("{run}/local-retry"),
    ));
    env.push(("MAILMESH_WORKER__OUTBOUND_TOPIC", format!("{run}.outbound")));
    env.push(("MAILMESH_WORKER__DEAD_LETTER_TOPIC", format!("{run}.dead")));
    env.push(("MAILMESH_WORKER__HOSTNAME", "mx.acme.test".into()));
    env.push((
        "MAILMESH_OUTBOUND__GROUP",
        format!("{run}.outbound-workers"),
    ));
    env.push(("MAILMESH_OUTBOUND__PORT", mx.addr.port().to_string()));
    env.push((
        "MAILMESH_OUTBOUND__ALLOW_PRIVATE_DESTINATIONS",
        "true".into(),
    ));
    env.push((
        "MAILMESH_OUTBOUND__DNS__SERVERS",
        format!("[\"{}\"]", dns.addr),
    ));
    env.push(("MAILMESH_OUTBOUND__RETRY_SCHEDULE", "[\"1s\"]".into()));
    env.push(("MAILMESH_OUTBOUND__RETRY_SCAN_INTERVAL", "500ms".into()));
    env.push(("MAILMESH_OUTBOUND__RETRY_PREFIX", format!("{run}/retry")));
    redis(&mut env);
    let worker = spawn("delivery-worker", &env);
    let logs = [&storage, &submission, &worker];

    let (channel, users, admin) =
        acme_with_users(&storage, &endpoint, &["alice@acme.test", "carol@acme.test"]).await;
    let carol = users[1].clone();
    let mut directory = v1::directory_client::DirectoryClient::new(admin);
    let key = directory
        .add_dkim_key(v1::AddDkimKeyRequest {
            domain: "acme.test".into(),
            selector: "k1".into(),
            algorithm: v1::DkimAlgorithm::Ed25519 as i32,
            activate: false,
        })
        .await
        .unwrap()
        .into_inner();
    wait_for("submission listening", &logs, || async {
        std::net::TcpStream::connect(("127.0.0.1", implicit)).ok()
    })
    .await;

    // swaks: STARTTLS, AUTH LOGIN, to the local user.
    let swaks = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{starttls}"), "--tls"])
        .args([
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice@acme.test",
            "--auth-password",
            "pw",
        ])
        .args(["--from", "alice@acme.test", "--to", "carol@acme.test"])
        .args(["--header", "Subject: from swaks", "--body", "hello carol"])
        .output()
        .unwrap();
    let transcript = String::from_utf8_lossy(&swaks.stdout);
    assert!(swaks.status.success(), "swaks failed:\n{transcript}");
    assert!(transcript.contains("235 2.7.0"), "{transcript}");

    // smtplib: implicit TLS, AUTH PLAIN, to the remote friend.
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                r#"
import smtplib, ssl
s = smtplib.SMTP_SSL('127.0.0.1', {implicit}, context=ssl._create_unverified_context(), timeout=30)
s.login('alice@acme.test', 'pw')
print(s.sendmail('alice@acme.test', ['friend@remote.test'],
    b'From: alice@acme.test\r\nTo: friend@remote.test\r\nSubject: over the wall\r\n\r\nHi friend.\r\n'))
s.quit()
"#
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "{}",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Carol has hers.
    let mut mailboxes = v1::mailboxes_client::MailboxesClient::new(channel);
    wait_for_messages(&logs, &mailboxes, &carol, "INBOX", 1).await;
    let listed = mailboxes
        .list_messages(v1::MailboxRequest {
            user: Some(carol.clone()),
            mailbox: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.messages.len(), 1);

    // The friend's MX got it on the second attempt, signed.
    let got = wait_for("the relayed message", &logs, || async {
        mx.received().first().cloned()
    })
    .await;
    assert_eq!(
        mx.attempts()
            .iter()
            .filter(|a| a.starts_with("friend@"))
            .count(),
        2,
        "deferred once, then delivered"
    );
    let text = String::from_utf8_lossy(&got.data).into_owned();
    assert!(text.contains("s=k1; d=acme.test;"), "{text}");
    assert!(
        mailmesh_testkit::dkimpy_verifies(text.as_bytes(), &key.dns_name, &key.dns_record),
        "{text}"
    );
}
