//! auth-check metrics: results by method, and how long checks take.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "auth_check_results_total",
                "Verdicts given, by method (spf, dkim, arc, dmarc, iprev, dnsbl, dnswl) and result",
            ),
            &["method", "result"],
        )
        .expect("valid metric"),
    )
});

static SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        HistogramVec::new(
            HistogramOpts::new("auth_check_seconds", "Time to judge a client or a message")
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
                ]),
            &["check"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn result(method: &str, result: &str) {
    RESULTS.with_label_values(&[method, result]).inc();
}

pub(crate) fn took(check: &str, elapsed: Duration) {
    SECONDS
        .with_label_values(&[check])
        .observe(elapsed.as_secs_f64());
}
