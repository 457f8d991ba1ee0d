//! Prometheus metrics. Each crate declares its metrics in its own `metrics.rs` and
//! registers them with [`registry`]; the admin port serves them at `/metrics`.
//! Labels stay low-cardinality: a tenant may be a label, a user or address never is.

use std::sync::LazyLock;

use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

static REGISTRY: LazyLock<Registry> =
    LazyLock::new(|| Registry::new_custom(Some("mailmesh".into()), None).expect("valid prefix"));

/// The registry every mailmesh metric is registered with.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Registers a collector. Metrics are process-wide statics, so each is registered once
/// even when `mailctl dev` runs every service in one process.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(collector: C) -> C {
    REGISTRY
        .register(Box::new(collector.clone()))
        .expect("each metric is registered once");
    collector
}

static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new("build_info", "Version of the running mailmesh binary"),
            &["service", "version"],
        )
        .expect("valid metric"),
    )
});

/// Marks the service as running in `mailmesh_build_info`.
pub fn set_build_info(service: &str) {
    BUILD_INFO
        .with_label_values(&[service, env!("CARGO_PKG_VERSION")])
        .set(1);
}

/// The text exposition format of every registered metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for the text format.
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

static INTERNAL_TLS_REFUSED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "internal_tls_refused_total",
            "Internal (mutual TLS) connections refused: no valid client certificate, or no handshake in time",
        )
        .expect("valid metric"),
    )
});

pub(crate) fn internal_tls_refused() {
    INTERNAL_TLS_REFUSED.inc();
}

static INTERNAL_CALLS_REFUSED: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    register(
        prometheus::IntCounterVec::new(
            Opts::new(
                "internal_calls_refused_total",
                "Internal gRPC calls refused because the caller's role may not make them",
            ),
            &["role"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn internal_call_refused(role: &str) {
    INTERNAL_CALLS_REFUSED.with_label_values(&[role]).inc();
}
