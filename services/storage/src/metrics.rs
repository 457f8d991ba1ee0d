//! Storage metrics. `log` is `directory` or `mailboxes`; no tenant or user labels
//! here (a partition holds many tenants).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

static APPLIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "storage_commands_applied_total",
                "Log records applied by this replica, by outcome",
            ),
            &["log", "outcome"],
        )
        .expect("valid metric"),
    )
});

static WRITE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        HistogramVec::new(
            HistogramOpts::new(
                "storage_write_seconds",
                "Time from publishing a command to its applied outcome",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ]),
            &["log"],
        )
        .expect("valid metric"),
    )
});

static SNAPSHOTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new("storage_snapshots_total", "Snapshots written, by outcome"),
            &["log", "outcome"],
        )
        .expect("valid metric"),
    )
});

/// `outcome`: `ok`, `refused` (the command's rules said no) or `barrier`.
pub(crate) fn applied(log: &str, outcome: &str) {
    APPLIED.with_label_values(&[log, outcome]).inc();
}

pub(crate) fn write(log: &str, elapsed: Duration) {
    WRITE_SECONDS
        .with_label_values(&[log])
        .observe(elapsed.as_secs_f64());
}

pub(crate) fn snapshot(log: &str, ok: bool) {
    SNAPSHOTS
        .with_label_values(&[log, if ok { "ok" } else { "failed" }])
        .inc();
}

static PUBLISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "storage_records_published_total",
                "Log records this replica produced, by kind: `command` (a change) or \
                 `barrier` (written by a read to see every earlier change)",
            ),
            &["log", "kind"],
        )
        .expect("valid metric"),
    )
});

static APPLIED_AT_ACK: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "storage_applied_at_ack_total",
                "Records this replica applied as soon as the broker acknowledged them \
                 (they landed right after everything applied here), without waiting to \
                 read them back",
            ),
            &["log"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn published(log: &str, barrier: bool) {
    PUBLISHED
        .with_label_values(&[log, if barrier { "barrier" } else { "command" }])
        .inc();
}

pub(crate) fn applied_at_ack(log: &str) {
    APPLIED_AT_ACK.with_label_values(&[log]).inc();
}

static INDEX_BYTES: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "storage_index_bytes",
                "The mailbox index on this replica: `cached` (users held in memory, \
                 bounded by storage.index_cache_bytes) and `disk` (its database)",
            ),
            &["where"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn index_cached_bytes(cached: usize) {
    INDEX_BYTES
        .with_label_values(&["cached"])
        .set(i64::try_from(cached).unwrap_or(i64::MAX));
}

pub(crate) fn index_disk_bytes(disk: u64) {
    INDEX_BYTES
        .with_label_values(&["disk"])
        .set(i64::try_from(disk).unwrap_or(i64::MAX));
}

static PARTITIONS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        prometheus::IntGaugeVec::new(
            Opts::new(
                "storage_mailbox_partitions",
                "Mailbox partitions of this replica: `owned` (assigned to it by the \
                 owners' group), `standby` (kept warm here for their owners) and \
                 `open` (applied here: owned or standby)",
            ),
            &["state"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn partitions(state: &str, count: usize) {
    PARTITIONS
        .with_label_values(&[state])
        .set(i64::try_from(count).unwrap_or(i64::MAX));
}

static TAKEN_OVER: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "storage_partition_takeovers_total",
                "Mailbox partitions this replica began to serve as their owner, by \
                 where their state came from: `standby` (it was applying the log \
                 already) or `restore` (its disk or a checkpoint, then the log)",
            ),
            &["from"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn taken_over(from: &str) {
    TAKEN_OVER.with_label_values(&[from]).inc();
}

static FORWARDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "storage_calls_forwarded_total",
                "Mailbox calls this replica sent to the owner of their partition, by \
                 outcome: `answered` (whatever the answer) or `rerouted` (the target \
                 was not the owner, or could not be reached, and the call went again)",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn forwarded(outcome: &str) {
    FORWARDED.with_label_values(&[outcome]).inc();
}

static EXPUNGED_KEPT: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        prometheus::IntGauge::new(
            "storage_expunged_bodies_kept",
            "Objects of expunged messages kept for sessions that may still fetch them \
             (storage.expunged_retention, at most storage.expunged_retention_max)",
        )
        .expect("valid metric"),
    )
});

pub(crate) fn expunged_kept(count: usize) {
    EXPUNGED_KEPT.set(i64::try_from(count).unwrap_or(i64::MAX));
}

static OBJECTS_DELETED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        IntCounterVec::new(
            Opts::new(
                "storage_unreferenced_objects_deleted_total",
                "Message objects deleted once the index no longer named them: \
                 `expunged` (after the retention, or at shutdown), `overflow` (the \
                 kept queue was full), `orphan` (found by the orphan sweep)",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

pub(crate) fn objects_deleted(reason: &str, count: u64) {
    OBJECTS_DELETED.with_label_values(&[reason]).inc_by(count);
}

static USAGE_ASKED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    mailmesh_kit::metrics::register(
        prometheus::IntCounter::new(
            "storage_tenant_usage_asked_total",
            "Times this replica asked the other owners for a tenant's stored bytes (at \
             most one question per tenant at a time; answers are used for 5 s)",
        )
        .expect("valid metric"),
    )
});

pub(crate) fn tenant_usage_asked() {
    USAGE_ASKED.inc();
}
