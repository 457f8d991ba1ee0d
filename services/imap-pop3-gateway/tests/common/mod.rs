//! What the gateway tests share: storage served over gRPC on the embedded backends
//! with alice@acme.test and three messages, gateway "pods", Python.
#![allow(dead_code)]

use std::process::Command;
use std::sync::Arc;

use mailmesh_cache::Cache;
use mailmesh_gateway::{Gateway, ImapConfig, Pop3Config, ProxyConfig, Store};
use mailmesh_kit::Shutdown;
use mailmesh_storage::engine::{Delivery, StorageEngine, UserRef};
use mailmesh_types::ReversePath;

pub struct Site {
    pub engine: Arc<StorageEngine>,
    pub alice: UserRef,
    pub endpoint: String,
    pub tls: Arc<rustls::ServerConfig>,
    /// The self-signed certificate (PEM), for clients that verify it.
    pub cert: std::path::PathBuf,
    pub shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

pub const MESSAGES: [&str; 3] = [
    "Subject: one\r\nFrom: bob@example.org\r\n\r\nfirst\r\n.starts with a dot\r\n",
    "Subject: two\r\nFrom: bob@example.org\r\n\r\nsecond line 1\r\nsecond line 2\r\n",
    "Subject: three\r\nFrom: bob@example.org\r\n\r\nthird\r\n",
];

/// Storage (served over gRPC as in a cluster) with alice@acme.test and three
/// messages in her INBOX.
pub async fn site() -> Site {
    site_with(mailmesh_storage::engine::StorageConfig {
        mailbox_partitions: 2,
        ..Default::default()
    })
    .await
}

/// [`site`] with storage configured as given.
pub async fn site_with(mut config: mailmesh_storage::engine::StorageConfig) -> Site {
    // Short test passwords; the policy has tests of its own.
    config.password_policy = mailmesh_storage::password_policy::PasswordPolicy::relaxed();
    let dir = tempfile::tempdir().unwrap();
    let engine = mailmesh_storage::testing::embedded_with(dir.path(), config)
        .await
        .unwrap()
        .engine;
    populate(engine, dir).await
}

/// [`site`] on the real broker and S3 server of the tests (`MMTEST_*`), in topics
/// and a prefix of its own.
pub async fn real_site() -> Site {
    let run = format!("gw{}", uuid::Uuid::new_v4().simple());
    let config = mailmesh_storage::engine::StorageConfig {
        directory_topic: format!("{run}.directory"),
        mailbox_topic: format!("{run}.mailboxes"),
        outbound_retry_prefix: format!("{run}/retry"),
        local_retry_prefix: format!("{run}/local-retry"),
        mailbox_partitions: 2,
        password_policy: mailmesh_storage::password_policy::PasswordPolicy::relaxed(),
        ..Default::default()
    };
    let engine = mailmesh_storage::engine::StorageEngine::open(
        mailmesh_storage::testing::real_queue(),
        mailmesh_storage::testing::real_objects(),
        config,
    )
    .await
    .unwrap();
    populate(engine, tempfile::tempdir().unwrap()).await
}

/// alice@acme.test with [`MESSAGES`] in her INBOX, storage served over gRPC.
async fn populate(engine: Arc<StorageEngine>, dir: tempfile::TempDir) -> Site {
    let alice =
        mailmesh_storage::testing::tenant_with_user(&engine, "acme", "alice@acme.test", "pw")
            .await
            .unwrap();
    let from: ReversePath = "bob@example.org".parse().unwrap();
    let to = "alice@acme.test".parse().unwrap();
    for (i, m) in MESSAGES.iter().enumerate() {
        engine
            .deliver(
                &alice,
                Delivery {
                    mailbox: "INBOX",
                    return_path: &from,
                    delivered_to: &to,
                    message: m.as_bytes(),
                    key: &format!("seed/{i}"),
                    internal_date_ms: 1_795_752_725_000,
                },
            )
            .await
            .unwrap();
    }
    let shutdown = Shutdown::new();
    let endpoint = mailmesh_storage::testing::serve(engine.clone(), shutdown.clone()).await;
    let (cert, key) =
        mailmesh_kit::tls::ensure_self_signed(&dir.path().join("tls"), &["localhost", "127.0.0.1"])
            .unwrap();
    let resolver = Arc::new(mailmesh_kit::tls::ReloadingCertResolver::load(&cert, &key).unwrap());
    let tls = mailmesh_kit::tls::server_config(resolver).unwrap();
    Site {
        engine,
        alice,
        endpoint,
        tls,
        cert,
        shutdown,
        _dir: dir,
    }
}

/// A gateway "pod"'s loopback ports.
pub struct Pod {
    pub pop3: u16,
    pub pop3s: u16,
    pub imap: u16,
    pub imaps: u16,
}

/// A gateway "pod" serving POP3 and IMAP, each with STARTTLS and implicit TLS.
pub async fn start(site: &Site, cache: Arc<dyn Cache>, pop3: Pop3Config, imap: ImapConfig) -> Pod {
    start_with_proxy(site, cache, pop3, imap, ProxyConfig::default()).await
}

/// A pod behind a load balancer that speaks the PROXY protocol.
pub async fn start_with_proxy(
    site: &Site,
    cache: Arc<dyn Cache>,
    pop3: Pop3Config,
    imap: ImapConfig,
    proxy: ProxyConfig,
) -> Pod {
    start_at(site, &site.endpoint, cache, pop3, imap, proxy).await
}

/// A pod reaching storage at `endpoint` (a [`Link`] to the site's).
pub async fn start_at(
    site: &Site,
    endpoint: &str,
    cache: Arc<dyn Cache>,
    pop3: Pop3Config,
    imap: ImapConfig,
    proxy: ProxyConfig,
) -> Pod {
    let store = Store::new(
        endpoint,
        1 << 20,
        &mailmesh_kit::internal::testing::tls(mailmesh_kit::internal::Role::Gateway),
    )
    .unwrap();
    let gateway = Gateway::new(store, cache, site.tls.clone(), pop3, imap, proxy);
    let mut ports = Vec::new();
    for (is_imap, implicit) in [(false, false), (false, true), (true, false), (true, true)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        let (gateway, shutdown) = (gateway.clone(), site.shutdown.clone());
        if is_imap {
            tokio::spawn(mailmesh_gateway::serve_imap(
                gateway, listener, implicit, shutdown,
            ));
        } else {
            tokio::spawn(mailmesh_gateway::serve_pop3(
                gateway, listener, implicit, shutdown,
            ));
        }
    }
    Pod {
        pop3: ports[0],
        pop3s: ports[1],
        imap: ports[2],
        imaps: ports[3],
    }
}

pub fn memory() -> Arc<dyn Cache> {
    Arc::new(mailmesh_cache::memory::MemoryCache::new())
}

pub fn python(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A TCP link to storage that a test cuts (every connection through it dropped,
/// new ones closed at once) and mends: storage unreachable from one gateway.
pub struct Link {
    pub endpoint: String,
    up: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Link {
    pub async fn to(endpoint: &str) -> Self {
        let target = endpoint.trim_start_matches("https://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(tokio::sync::watch::channel(true).0);
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = state.subscribe();
                if !*watch.borrow() {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self {
            endpoint: format!("https://127.0.0.1:{port}"),
            up,
        }
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn mend(&self) {
        self.up.send_replace(true);
    }
}
