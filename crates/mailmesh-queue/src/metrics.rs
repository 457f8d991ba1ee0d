use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

static PUBLISH_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        HistogramVec::new(
            HistogramOpts::new(
                "queue_publish_seconds",
                "Time from publish to durable acknowledgement",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            &["backend"],
        )
        .expect("valid metric"),
    )
});

static PUBLISH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new("queue_publish_failures_total", "Publishes that failed"),
            &["backend"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn observe_publish(backend: &str, elapsed: Duration, ok: bool) {
    if ok {
        PUBLISH_SECONDS
            .with_label_values(&[backend])
            .observe(elapsed.as_secs_f64());
    } else {
        PUBLISH_FAILURES.with_label_values(&[backend]).inc();
    }
}

static PRODUCERS_REPLACED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        prometheus::IntCounter::new(
            "queue_producers_replaced_total",
            "Kafka producers replaced after a fatal error",
        )
        .expect("valid metric"),
    )
});

pub(crate) fn producer_replaced() {
    PRODUCERS_REPLACED.inc();
}
