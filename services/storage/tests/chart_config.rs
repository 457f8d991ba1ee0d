//! The configuration the Helm chart renders (k8s/mailmesh.yaml) is one the storage
//! binary accepts, with the credentials the chart injects from Secrets.

use mailmesh_kit::ConfigSource;
use mailmesh_objstore::ObjectStoreConfig;
use mailmesh_queue::QueueConfig;
use mailmesh_storage::server::ServiceConfig;
use mailmesh_testkit::{rendered_config, rendered_sets_env};

#[test]
fn the_rendered_storage_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("storage.toml");
    std::fs::write(&file, rendered_config("storage.toml")).unwrap();

    // The variables the Deployment sets from Secrets.
    for var in [
        "MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID",
        "MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY",
        "MAILMESH_QUEUE__KAFKA__SASL_PASSWORD",
        "MAILMESH_STORAGE__SESSION_SECRET",
        "MAILMESH_CACHE__REDIS__URL",
    ] {
        assert!(rendered_sets_env(var), "{var} not set by the chart");
    }
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID", "id")
        .with_var("MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY", "secret")
        .with_var("MAILMESH_QUEUE__KAFKA__SASL_PASSWORD", "pw")
        .with_var("MAILMESH_CACHE__REDIS__URL", "redis://redis:6379/0")
        .with_var(
            "MAILMESH_STORAGE__SESSION_SECRET",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .load()
        .unwrap();
    let QueueConfig::Kafka(kafka) = &config.queue else {
        panic!("the chart configures Kafka")
    };
    assert_eq!(kafka.replication_factor, 3);
    assert_eq!(kafka.properties["security.protocol"], "SASL_SSL");
    assert!(kafka.sasl_password.is_some());
    let ObjectStoreConfig::S3(s3) = &config.object_store else {
        panic!("the chart configures S3")
    };
    assert_eq!(s3.bucket, "mailmesh");
    assert_eq!(config.storage.mailbox_partitions, 64);
    assert_eq!(config.grpc_listen.port(), 7001);
    // Its identity between the services, from the mounted Secret (ADR 0006).
    assert_eq!(
        config.internal_tls.cert_file,
        std::path::Path::new("/etc/mailmesh/internal-tls/tls.crt")
    );
    assert_eq!(
        config.internal_tls.ca_file,
        std::path::Path::new("/etc/mailmesh/internal-tls/ca.crt")
    );
    assert!(config.storage.session_secret.is_some());
}
