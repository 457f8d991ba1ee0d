//! A whole storage platform in one directory, for tests, fuzzing and tools: the
//! embedded durable log, a local object store and a storage engine over them, with
//! a tenant, a domain and a user when asked; and the real backends of the integration
//! tests.

use std::path::Path;
use std::sync::Arc;

use mailmesh_kit::Secret;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig};
use mailmesh_queue::Queue;
use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};

use mailmesh_testkit::backend_env;

use crate::directory::TenantLimits;
use crate::engine::{StorageConfig, StorageEngine, UserRef};

pub struct Embedded {
    pub queue: Arc<dyn Queue>,
    pub objects: Arc<dyn ObjectStore>,
    pub engine: Arc<StorageEngine>,
}

/// Opens (or reopens) the platform kept under `dir`.
pub async fn embedded(dir: &Path, mailbox_partitions: i32) -> anyhow::Result<Embedded> {
    embedded_with(
        dir,
        StorageConfig {
            mailbox_partitions,
            // Tests log in with short passwords; the policy has its own tests.
            password_policy: crate::password_policy::PasswordPolicy::relaxed(),
            ..StorageConfig::default()
        },
    )
    .await
}

/// Like [`embedded`], with the storage configuration given.
pub async fn embedded_with(dir: &Path, config: StorageConfig) -> anyhow::Result<Embedded> {
    let queue: Arc<dyn Queue> =
        Arc::new(EmbeddedLog::open(&EmbeddedConfig::new(dir.join("queue"))).await?);
    let objects = mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
        dir: dir.join("objects"),
    }))?;
    let engine = StorageEngine::open(queue.clone(), objects.clone(), config).await?;
    Ok(Embedded {
        queue,
        objects,
        engine,
    })
}

/// Creates `tenant` owning the domain of `address`, and the user `address`.
pub async fn tenant_with_user(
    engine: &StorageEngine,
    tenant: &str,
    address: &str,
    password: &str,
) -> anyhow::Result<UserRef> {
    let address: mailmesh_types::EmailAddress = address.parse()?;
    let tenant: mailmesh_types::TenantId = tenant.parse()?;
    engine
        .add_tenant(tenant.clone(), TenantLimits::default())
        .await?;
    engine.add_domain(tenant, address.domain().clone()).await?;
    Ok(engine
        .add_user(address, Secret::new(password.into()), None)
        .await?)
}

/// The real Kafka-compatible broker of the tests (`MMTEST_KAFKA`).
pub fn real_queue() -> Arc<dyn Queue> {
    use mailmesh_queue::kafka::{KafkaConfig, KafkaQueue};
    Arc::new(
        KafkaQueue::connect(&KafkaConfig {
            brokers: backend_env("MMTEST_KAFKA"),
            properties: Default::default(),
            sasl_password: None,
            publish_timeout: std::time::Duration::from_secs(30),
            replication_factor: 1,
            session_timeout: std::time::Duration::from_secs(10),
            producer_recovery_timeout: std::time::Duration::from_secs(120),
        })
        .expect("connecting to MMTEST_KAFKA"),
    )
}

/// The real S3 server of the tests (`MMTEST_S3*`), under a prefix of its own so runs
/// never see each other's objects.
pub fn real_objects() -> Arc<dyn ObjectStore> {
    use mailmesh_objstore::S3Config;
    let store = mailmesh_objstore::open(&ObjectStoreConfig::S3(S3Config {
        bucket: backend_env("MMTEST_S3_BUCKET"),
        endpoint: Some(backend_env("MMTEST_S3")),
        region: "us-east-1".into(),
        access_key_id: Some(Secret::new(backend_env("MMTEST_S3_ACCESS_KEY"))),
        secret_access_key: Some(Secret::new(backend_env("MMTEST_S3_SECRET_KEY"))),
        path_style: true,
    }))
    .expect("opening MMTEST_S3");
    Arc::new(mailmesh_objstore::object_store::prefix::PrefixStore::new(
        store,
        format!("run-{}", uuid::Uuid::new_v4().simple()),
    ))
}

/// Serves `engine` over gRPC on a loopback port with the storage identity of the
/// test PKI (mutual TLS, as in a cluster) until `shutdown`; returns the endpoint.
pub async fn serve(engine: Arc<StorageEngine>, shutdown: mailmesh_kit::Shutdown) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let endpoint = format!("https://{addr}");
    engine.advertise(addr);
    let cache = mailmesh_cache::open(&mailmesh_cache::CacheConfig::Memory)
        .await
        .expect("an in-process cache");
    let service = crate::server::service(engine, cache, true).expect("the storage service");
    let tls = mailmesh_kit::internal::testing::tls(mailmesh_kit::internal::Role::Storage);
    tokio::spawn(async move { crate::server::serve_grpc(service, listener, &tls, shutdown).await });
    endpoint
}

/// Log records this process's storage replicas have produced so far, of every kind
/// (`storage_records_published_total`): a read that writes nothing leaves it as is.
pub fn records_published() -> f64 {
    mailmesh_kit::metrics::render()
        .lines()
        .filter(|l| l.starts_with("mailmesh_storage_records_published_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
