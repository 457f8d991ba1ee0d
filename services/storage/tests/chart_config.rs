//! The configuration the Helm chart renders (k8s/mailmesh.yaml) is one the storage
//! binary accepts, with the credentials the chart injects from Secrets.

use mailmesh_kit::ConfigSource;
use mailmesh_objstore::ObjectStoreConfig;
use mailmesh_queue::QueueConfig;
use mailmesh_storage::server::ServiceConfig;

/// The body of a `key: |` block scalar in the rendered ConfigMap.
fn block(rendered: &str, key: &str) -> String {
    let header = format!("  {key}: |");
    let start = rendered
        .lines()
        .position(|l| l == header)
        .unwrap_or_else(|| panic!("{key} not in k8s/mailmesh.yaml"));
    rendered
        .lines()
        .skip(start + 1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_rendered_storage_config_loads() {
    let rendered = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../k8s/mailmesh.yaml"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("storage.toml");
    std::fs::write(&file, block(&rendered, "storage.toml")).unwrap();

    // The variables the Deployment sets from Secrets.
    for var in [
        "MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID",
        "MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY",
        "MAILMESH_QUEUE__KAFKA__SASL_PASSWORD",
    ] {
        assert!(
            rendered.contains(&format!("name: {var}")),
            "{var} not set by the chart"
        );
    }
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID", "id")
        .with_var("MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY", "secret")
        .with_var("MAILMESH_QUEUE__KAFKA__SASL_PASSWORD", "pw")
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
}
