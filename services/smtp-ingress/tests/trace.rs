//! One trace per message: the span that accepts a message at the front door, the
//! auth-check span it causes over gRPC, the worker's span that delivers it and the
//! storage span that stores it share one trace, carried in gRPC metadata and the
//! queue record. Checked with an in-process OTLP
//! collector. Its own test binary: telemetry is process-global.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;
use mailmesh_delivery::worker::{Worker, WorkerConfig};
use mailmesh_ingress::{Ingress, IngressConfig};
use mailmesh_kit::Shutdown;
use mailmesh_kit::internal::Role;
use mailmesh_kit::telemetry::{self, LogFormat, TelemetryConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_one_trace_from_smtp_to_mailbox() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let guard = telemetry::init(
        "trace-test",
        &TelemetryConfig {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: Some(collector.endpoint()),
        },
    )
    .unwrap();

    let platform = common::platform().await;
    let (queue, objects, engine) = (
        platform.queue.clone(),
        platform.objects.clone(),
        platform.engine.clone(),
    );
    // auth-check as its own gRPC server, asking a DNS server that knows nothing.
    let dns = mailmesh_testkit::dns::DnsServer::start(&[]);
    let checker = mailmesh_auth::Checker::new(mailmesh_auth::AuthConfig {
        dns: mailmesh_auth::DnsConfig {
            servers: vec![dns.addr],
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth_endpoint = format!("http://{}", listener.local_addr().unwrap());
    let auth_shutdown = Shutdown::new();
    tokio::spawn(mailmesh_auth::grpc::serve(
        Arc::new(checker),
        listener,
        mailmesh_kit::internal::testing::tls(Role::AuthCheck),
        auth_shutdown.clone(),
    ));
    let auth = mailmesh_auth::grpc::GrpcAuthCheck::new(
        &auth_endpoint,
        1 << 20,
        &mailmesh_kit::internal::testing::tls(Role::SmtpIngress),
    )
    .unwrap();
    let ingress = Ingress::new(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        IngressConfig::default(),
        None,
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        Some(Arc::new(auth)),
    );
    let shutdown = Shutdown::new();
    // The worker reaches storage over gRPC, as in a cluster.
    let storage_endpoint =
        mailmesh_storage::testing::serve(engine.clone(), auth_shutdown.clone()).await;
    let worker = Worker::new(
        queue.clone(),
        objects.clone(),
        Arc::new(
            mailmesh_storage::client::GrpcMailstore::new(
                &storage_endpoint,
                1 << 20,
                &mailmesh_kit::internal::testing::tls(Role::DeliveryWorker),
            )
            .unwrap(),
        ),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        WorkerConfig::default(),
    );
    tokio::spawn(worker.run(shutdown.clone()));

    let (mut client, server_side) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let peer: SocketAddr = "192.0.2.1:1".parse().unwrap();
        mailmesh_ingress::handle(&ingress, server_side, peer, &Shutdown::new()).await;
    });
    client
        .write_all(b"EHLO c\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<alice@acme.test>\r\nDATA\r\n")
        .await
        .unwrap();
    // Wait for 354 before the data (the greeting, EHLO, MAIL and RCPT replies first).
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("354") {
        let mut buf = [0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    client
        .write_all(b"From: b@example.org\r\nSubject: traced\r\n\r\nx\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    client.read_to_string(&mut rest).await.unwrap();
    assert!(rest.contains("250 2.0.0 Ok: queued"), "{rest}");

    // The worker's span closes once the message is stored.
    let spans = {
        let mut found = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let stored = engine
                .read_index(&platform.alice, |i| {
                    i.and_then(|i| i.mailbox("INBOX"))
                        .map_or(0, |m| m.messages.len())
                })
                .await
                .unwrap();
            if stored == 1 {
                break;
            }
        }
        shutdown.stopped_token().cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::spawn_blocking(move || drop(guard))
            .await
            .unwrap();
        found.extend(collector.exported_spans(4, Duration::from_secs(20)).await);
        found
    };
    let accept = spans
        .iter()
        .find(|s| s.name == "smtp_message")
        .expect("the front door's span");
    let deliver = spans
        .iter()
        .find(|s| s.name == "deliver_record")
        .expect("the worker's span");
    assert_eq!(
        deliver.trace_id, accept.trace_id,
        "one trace from SMTP to the mailbox"
    );
    assert_eq!(deliver.parent_span_id, accept.span_id);
    let check = spans
        .iter()
        .find(|s| s.name == "auth.check_message")
        .expect("auth-check's span");
    assert_eq!(
        check.trace_id, accept.trace_id,
        "auth-check joins the trace"
    );
    assert_eq!(check.parent_span_id, accept.span_id);
    let store = spans
        .iter()
        .find(|s| s.name == "storage.deliver")
        .expect("storage's span");
    assert_eq!(store.trace_id, accept.trace_id, "storage joins the trace");
    assert_eq!(store.parent_span_id, deliver.span_id);
}
