//! The configuration the Helm chart renders for smtp-ingress is one the binary accepts.

use mailmesh_ingress::ServiceConfig;
use mailmesh_kit::ConfigSource;
use mailmesh_testkit::{rendered_config, rendered_sets_env};

#[test]
fn the_rendered_ingress_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smtp-ingress.toml");
    std::fs::write(&file, rendered_config("smtp-ingress.toml")).unwrap();
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID", "id")
        .with_var("MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY", "secret")
        .with_var("MAILMESH_QUEUE__KAFKA__SASL_PASSWORD", "pw")
        .with_var("MAILMESH_CACHE__REDIS__URL", "redis://redis:6379/0")
        .with_var(
            "MAILMESH_SMTP__SRS__SECRET",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .load()
        .unwrap();
    assert!(rendered_sets_env("MAILMESH_SMTP__SRS__SECRET"));
    assert!(
        config.smtp.srs.is_some(),
        "bounces to forwarded senders come back"
    );
    assert_eq!(config.listen.port(), 2525);
    assert_eq!(config.smtp.hostname, "mx.example.com");
    assert_eq!(config.smtp.max_message_bytes, 26_214_400);
    assert_eq!(
        config.auth_check_endpoint.as_deref(),
        Some("https://mailmesh-auth-check:7002")
    );
    assert!(config.smtp.proxy.trusts("10.1.2.3".parse().unwrap()));
    assert!(rendered_sets_env("MAILMESH_CACHE__REDIS__URL"));
    assert!(matches!(
        config.cache,
        mailmesh_cache::CacheConfig::Redis(_)
    ));
    let tls = config.tls.expect("STARTTLS is configured");
    assert_eq!(tls.cert_file.to_str(), Some("/etc/mailmesh/tls/tls.crt"));
}
