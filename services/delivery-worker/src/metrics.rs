use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};

static OUTCOMES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "delivery_outcomes_total",
                "Local delivery outcomes: stored, failed (bounced), bounced, outbound, requeued, dead_letter, replayed (a finished record seen again)",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

static SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        Histogram::with_opts(
            HistogramOpts::new(
                "delivery_seconds",
                "Time to deliver one queue record to all its local recipients",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ]),
        )
        .expect("valid metric"),
    )
});

static RELAYED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "outbound_recipients_total",
                "Outbound recipients by outcome: delivered, failed, deferred, expired; replayed counts finished records seen again",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn relayed(outcome: &str) {
    RELAYED.with_label_values(&[outcome]).inc();
}

pub(crate) fn delivered(outcome: &str) {
    OUTCOMES.with_label_values(&[outcome]).inc();
}

pub(crate) fn delivery_seconds(elapsed: Duration) {
    SECONDS.observe(elapsed.as_secs_f64());
}

static BODIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "delivery_queue_bodies_total",
                "Queue bodies in object storage: freed (every record holding one finished), release_failed (left to the sweep), swept (objects the age sweep removed)",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn bodies(outcome: &str, count: u64) {
    BODIES.with_label_values(&[outcome]).inc_by(count);
}
