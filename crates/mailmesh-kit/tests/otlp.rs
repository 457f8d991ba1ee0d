//! Spans reach an OTLP collector, and trace context carried in a record (as a queue
//! record or Kafka header carries it) links the consumer's span to the producer's.
//! Its own test binary: telemetry installs a process-global subscriber.

use std::collections::BTreeMap;
use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;
use mailmesh_kit::telemetry::{self, LogFormat, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_and_trace_context_crosses_a_record() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let guard = telemetry::init(
        "otlp-test",
        &TelemetryConfig {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: Some(collector.endpoint()),
        },
    )
    .unwrap();

    let mut carrier = BTreeMap::new();
    {
        let accept = tracing::info_span!("accept_message");
        let _entered = accept.enter();
        telemetry::inject_context(&mut carrier);
    }
    assert!(
        carrier
            .get("traceparent")
            .is_some_and(|t| t.starts_with("00-")),
        "{carrier:?}"
    );
    {
        let deliver = tracing::info_span!("deliver_message");
        telemetry::extract_context(&deliver, &carrier);
        let _entered = deliver.enter();
        tracing::info!("delivered");
    }
    // Flushes the batch exporter; it blocks, so off the async workers.
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();

    let spans = collector.exported_spans(2, Duration::from_secs(20)).await;
    let accept = spans
        .iter()
        .find(|s| s.name == "accept_message")
        .expect("accept span");
    let deliver = spans
        .iter()
        .find(|s| s.name == "deliver_message")
        .expect("deliver span");
    assert_eq!(
        deliver.trace_id, accept.trace_id,
        "one trace across the record"
    );
    assert_eq!(deliver.parent_span_id, accept.span_id);
    let traceparent = &carrier["traceparent"];
    assert!(traceparent.contains(&accept.trace_id), "{traceparent}");
}
