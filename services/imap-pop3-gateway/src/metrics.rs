//! Gateway metrics: sessions, commands by name, login failures. No user labels.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};

static SESSIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntGaugeVec::new(
            Opts::new("gateway_sessions", "Open sessions, by protocol"),
            &["protocol"],
        )
        .expect("valid metric"),
    )
});

static COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "gateway_commands_total",
                "Commands, by protocol, command and outcome (ok, err)",
            ),
            &["protocol", "command", "outcome"],
        )
        .expect("valid metric"),
    )
});

static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "gateway_events_total",
                "auth_failed, auth_throttled, in_use, refused (too many sessions), tls_failed, proxy_header (a trusted balancer sent no valid PROXY header), refresh_changes / refresh_listing (an IMAP session caught up with its mailbox from the changes since its view, or by listing it whole), refresh_failed (storage could not be read after retries: the session was ended with BYE); with protocol=\"storage\": write_resent (a mailbox write whose outcome was unknown sent again under its request id), write_unknown (still unknown after storage_write_patience: the client heard NO [UNAVAILABLE])",
            ),
            &["protocol", "event"],
        )
        .expect("valid metric"),
    )
});

static WATCH_STREAMS: LazyLock<IntGauge> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntGauge::new(
            "gateway_watch_streams",
            "Storage change streams followed: one per user with IMAP sessions on this gateway",
        )
        .expect("valid metric"),
    )
});

pub(crate) fn watch_streams(n: usize) {
    WATCH_STREAMS.set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Counts a session while it lives.
pub(crate) struct SessionGauge(&'static str);

impl SessionGauge {
    pub(crate) fn open(protocol: &'static str) -> Self {
        SESSIONS.with_label_values(&[protocol]).inc();
        Self(protocol)
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        SESSIONS.with_label_values(&[self.0]).dec();
    }
}

pub(crate) fn command(protocol: &str, command: &str, ok: bool) {
    COMMANDS
        .with_label_values(&[protocol, command, if ok { "ok" } else { "err" }])
        .inc();
}

pub(crate) fn event(protocol: &str, event: &str) {
    EVENTS.with_label_values(&[protocol, event]).inc();
}
