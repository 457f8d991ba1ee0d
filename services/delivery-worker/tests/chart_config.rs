//! The configuration the Helm chart renders for the delivery worker is one the binary
//! accepts.

use std::time::Duration;

use mailmesh_delivery::ServiceConfig;
use mailmesh_kit::ConfigSource;
use mailmesh_testkit::{rendered_config, rendered_sets_env};

#[test]
fn the_rendered_worker_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("delivery-worker.toml");
    std::fs::write(&file, rendered_config("delivery-worker.toml")).unwrap();
    assert!(rendered_sets_env(
        "MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY"
    ));
    assert!(rendered_sets_env("MAILMESH_WORKER__SRS__SECRET"));
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID", "id")
        .with_var("MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY", "secret")
        .with_var("MAILMESH_QUEUE__KAFKA__SASL_PASSWORD", "pw")
        .with_var("MAILMESH_CACHE__REDIS__URL", "redis://redis:6379/0")
        .with_var(
            "MAILMESH_WORKER__SRS__SECRET",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .load()
        .unwrap();
    assert!(
        config.worker.srs.is_some(),
        "forwarded senders are rewritten"
    );
    assert_eq!(config.storage_endpoint, "https://mailmesh-storage:7001");
    assert_eq!(config.worker.topic, "mail.queue");
    assert_eq!(config.worker.hostname, "mx.example.com");
    assert_eq!(
        config.worker.max_lifetime,
        Duration::from_secs(5 * 24 * 3600)
    );
    assert!(config.outbound.enabled);
    assert_eq!(config.outbound.retry_schedule.len(), 6);
    assert_eq!(
        config.outbound.retry_schedule[5],
        Duration::from_secs(4 * 3600)
    );
    assert_eq!(
        config.outbound.delay_notify_after,
        Duration::from_secs(4 * 3600)
    );
    assert!(matches!(
        config.cache,
        Some(mailmesh_cache::CacheConfig::Redis(_))
    ));
    assert!(rendered_sets_env("MAILMESH_CACHE__REDIS__URL"));
}
