//! The configuration the Helm chart renders for the gateway is one the binary accepts.

use mailmesh_gateway::ServiceConfig;
use mailmesh_kit::ConfigSource;
use mailmesh_testkit::{rendered_config, rendered_sets_env};

#[test]
fn the_rendered_gateway_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imap-pop3-gateway.toml");
    std::fs::write(&file, rendered_config("imap-pop3-gateway.toml")).unwrap();
    let config: ServiceConfig = ConfigSource::default()
        .with_file(&file)
        .with_var("MAILMESH_CACHE__REDIS__URL", "redis://redis:6379/0")
        .load()
        .unwrap();
    assert_eq!(config.imap_listen.port(), 1143);
    assert_eq!(config.imaps_listen.port(), 1993);
    assert_eq!(config.imap.hostname, "mail.example.com");
    assert_eq!(config.imap.max_message_bytes, 64 << 20);
    assert!(!config.imap.allow_plaintext_auth);
    assert!(config.proxy.trusts("10.1.2.3".parse().unwrap()));
    assert_eq!(config.pop3_listen.port(), 1110);
    assert_eq!(config.pop3s_listen.port(), 1995);
    assert_eq!(config.pop3.hostname, "mail.example.com");
    assert!(!config.pop3.allow_plaintext_auth);
    assert_eq!(config.storage_endpoint, "https://mailmesh-storage:7001");
    assert!(matches!(
        config.cache,
        mailmesh_cache::CacheConfig::Redis(_)
    ));
    assert!(rendered_sets_env("MAILMESH_CACHE__REDIS__URL"));
    assert_eq!(
        config.tls.cert_file.to_str(),
        Some("/etc/mailmesh/tls/tls.crt")
    );
}
