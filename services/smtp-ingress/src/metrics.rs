use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};

static ACCEPTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new("smtp_messages_accepted_total", "Messages queued, by tenant"),
            &["tenant"],
        )
        .expect("valid metric"),
    )
});

static REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "smtp_rejections_total",
                "Commands or connections refused, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

static SESSIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntGauge::new("smtp_sessions", "Open SMTP sessions").expect("valid metric"),
    )
});

static QUEUE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        Histogram::with_opts(
            HistogramOpts::new(
                "smtp_queue_seconds",
                "From the end of DATA to the message being durable in the queue",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric"),
    )
});

pub(crate) fn accepted(tenant: &str) {
    ACCEPTED.with_label_values(&[tenant]).inc();
}

pub(crate) fn rejected(reason: &str) {
    REJECTED.with_label_values(&[reason]).inc();
}

pub(crate) fn session_opened() {
    SESSIONS.inc();
}

pub(crate) fn session_closed() {
    SESSIONS.dec();
}

pub(crate) fn queued(elapsed: Duration) {
    QUEUE_SECONDS.observe(elapsed.as_secs_f64());
}
