//! The configuration the Helm chart renders for submission is one the binary accepts.

use mailmesh_kit::ConfigSource;
use mailmesh_submission::ServiceConfig;
use mailmesh_testkit::rendered_config;

#[test]
fn the_rendered_submission_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("submission.toml");
    std::fs::write(&file, rendered_config("submission.toml")).unwrap();
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID", "id")
        .with_var("MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY", "secret")
        .with_var("MAILMESH_QUEUE__KAFKA__SASL_PASSWORD", "pw")
        .with_var("MAILMESH_CACHE__REDIS__URL", "redis://redis:6379/0")
        .load()
        .unwrap();
    assert_eq!(config.listen.port(), 2587);
    assert_eq!(config.listen_tls.port(), 2465);
    assert_eq!(config.smtp.hostname, "smtp.example.com");
    assert_eq!(config.storage_endpoint, "https://mailmesh-storage:7001");
    assert!(config.submission.dkim_sign && config.submission.hide_client);
    assert!(!config.submission.allow_plaintext_auth);
    assert_eq!(config.submission.max_auth_failures, 10);
    assert!(config.smtp.proxy.trusts("10.1.2.3".parse().unwrap()));
    assert_eq!(
        config.tls.cert_file.to_str(),
        Some("/etc/mailmesh/tls/tls.crt")
    );
}
