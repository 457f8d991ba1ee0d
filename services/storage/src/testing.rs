//! A whole storage platform in one directory, for tests, fuzzing and tools: the
//! embedded durable log, a local object store and a storage engine over them, with
//! a tenant, a domain and a user when asked.

use std::path::Path;
use std::sync::Arc;

use mailmesh_kit::Secret;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig};
use mailmesh_queue::Queue;
use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};

use crate::directory::TenantLimits;
use crate::engine::{StorageConfig, StorageEngine, UserRef};

pub struct Embedded {
    pub queue: Arc<dyn Queue>,
    pub objects: Arc<dyn ObjectStore>,
    pub engine: Arc<StorageEngine>,
}

/// Opens (or reopens) the platform kept under `dir`.
pub async fn embedded(dir: &Path, mailbox_partitions: i32) -> anyhow::Result<Embedded> {
    let queue: Arc<dyn Queue> =
        Arc::new(EmbeddedLog::open(&EmbeddedConfig::new(dir.join("queue"))).await?);
    let objects = mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
        dir: dir.join("objects"),
    }))?;
    let engine = StorageEngine::open(
        queue.clone(),
        objects.clone(),
        StorageConfig {
            mailbox_partitions,
            ..StorageConfig::default()
        },
    )
    .await?;
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
