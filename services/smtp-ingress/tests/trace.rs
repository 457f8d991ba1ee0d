//! One trace per message: the span that accepts a message at the front door and the
//! span that delivers it share a trace, carried in the queue record. Checked with an
//! in-process OTLP collector. Its own test binary: telemetry is process-global.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;
use mailmesh_delivery::worker::{Worker, WorkerConfig};
use mailmesh_ingress::{Ingress, IngressConfig};
use mailmesh_kit::Shutdown;
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
    let ingress = Ingress::new(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        IngressConfig::default(),
        None,
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
    );
    let shutdown = Shutdown::new();
    let worker = Worker::new(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
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
        .write_all(b"Subject: traced\r\n\r\nx\r\n.\r\nQUIT\r\n")
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
        found.extend(collector.exported_spans(2, Duration::from_secs(20)).await);
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
}
