//! The configuration the Helm chart renders for auth-check is one the binary accepts.

use mailmesh_auth::ServiceConfig;
use mailmesh_kit::ConfigSource;
use mailmesh_kit::config::Validate;
use mailmesh_testkit::rendered_config;

#[test]
fn the_rendered_auth_check_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth-check.toml");
    std::fs::write(&file, rendered_config("auth-check.toml")).unwrap();
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_CACHE__REDIS__URL", "redis://redis:6379/0")
        .load()
        .unwrap();
    config.validate().unwrap();
    assert_eq!(config.grpc_listen.port(), 7002);
    assert_eq!(config.auth.authserv_id, "mx.example.com");
    assert_eq!(config.auth.block_lists, vec!["zen.spamhaus.org".to_owned()]);
    assert_eq!(config.auth.dns.servers[0].to_string(), "10.96.0.53:53");
    assert_eq!(config.auth.max_message_bytes, 26_214_400);
    let seal = config
        .auth
        .arc_seal
        .as_ref()
        .expect("the chart seals forwarded mail");
    assert_eq!(seal.key_file.to_str(), Some("/etc/mailmesh/arc/key.pem"));
    assert_eq!(seal.domain, "example.com");
    assert!(!seal.selector.is_empty());
    assert!(matches!(
        config.cache,
        mailmesh_cache::CacheConfig::Redis(_)
    ));
}
