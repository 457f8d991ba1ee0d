//! Kafka over TLS, for real: a tansu broker of the test's own behind HAProxy, which
//! terminates TLS (tansu speaks plaintext) and is the address tansu advertises, so
//! every connection librdkafka makes (bootstrap, metadata, produce, fetch, the group
//! coordinator) is TLS, with the certificate checked against the test's CA. Needs
//! `tansu` (scripts/backends.sh puts it on PATH) and Debian's haproxy.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mailmesh_queue::kafka::{KafkaConfig, KafkaQueue};
use mailmesh_queue::{OutgoingRecord, Queue};
use mailmesh_testkit::free_port;

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &str, args: &[&str]) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (see scripts/backends.sh)")),
    )
}

async fn listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config(port: u16, properties: &[(&str, String)], timeout: Duration) -> KafkaConfig {
    KafkaConfig {
        brokers: format!("127.0.0.1:{port}"),
        properties: properties
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        sasl_password: None,
        publish_timeout: timeout,
        replication_factor: 1,
        session_timeout: Duration::from_secs(10),
        producer_recovery_timeout: Duration::from_secs(120),
    }
}

fn record(topic: &str, payload: &'static str) -> OutgoingRecord {
    OutgoingRecord {
        topic: topic.to_owned(),
        key: Bytes::from_static(b"k"),
        payload: Bytes::from_static(payload.as_bytes()),
        headers: Vec::new(),
        partition: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_publishes_and_consumes_with_a_verified_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, tls) = (free_port(), free_port());
    let _tansu = spawn(
        "tansu",
        &[
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{plain}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{tls}"),
            "--storage-engine",
            "memory://tansu/",
        ],
    );
    let (cert, key) = mailmesh_kit::tls::self_signed_pem(&["127.0.0.1", "localhost"]).unwrap();
    let pem = dir.path().join("broker.pem");
    std::fs::write(&pem, format!("{cert}{key}")).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
             timeout client 60s\n  timeout server 60s\nfrontend kafka\n  \
             bind 127.0.0.1:{tls} ssl crt {}\n  default_backend tansu\nbackend tansu\n  \
             server tansu 127.0.0.1:{plain}\n",
            pem.display()
        ),
    )
    .unwrap();
    let _haproxy = spawn("haproxy", &["-f", &cfg.display().to_string(), "-db"]);
    listening(plain).await;
    listening(tls).await;

    let trusted = [
        ("security.protocol", "SSL".to_owned()),
        ("ssl.ca.location", ca.display().to_string()),
    ];
    let queue = KafkaQueue::connect(&config(tls, &trusted, Duration::from_secs(30))).unwrap();
    let topic = "mail.tls";
    queue.ensure_topic(topic, 1).await.unwrap();
    queue.publish(record(topic, "over tls")).await.unwrap();
    let mut consumer = queue.consumer("tls-workers", &[topic]).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a record within a minute")
        .unwrap();
    assert_eq!(delivery.record.payload, "over tls");
    consumer.close().await.unwrap();

    // A client that does not trust the broker's certificate gets nothing through.
    let untrusting = [("security.protocol", "SSL".to_owned())];
    let stranger = KafkaQueue::connect(&config(tls, &untrusting, Duration::from_secs(3))).unwrap();
    assert!(stranger.publish(record(topic, "refused")).await.is_err());
}
