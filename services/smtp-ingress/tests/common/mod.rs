//! The platform behind the front door in tests: embedded queue and object store, the
//! storage engine, tenant `acme` with domain `acme.test` and user `alice@acme.test`.
#![allow(dead_code)]

use std::sync::Arc;

use mailmesh_kit::Secret;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig};
use mailmesh_queue::Queue;
use mailmesh_queue::embedded::{EmbeddedConfig, EmbeddedLog};
use mailmesh_storage::directory::TenantLimits;
use mailmesh_storage::engine::{StorageConfig, StorageEngine, UserRef};

pub struct Platform {
    pub queue: Arc<dyn Queue>,
    pub objects: Arc<dyn ObjectStore>,
    pub engine: Arc<StorageEngine>,
    pub alice: UserRef,
    /// Holds the embedded backends' files for as long as the platform lives.
    pub dir: tempfile::TempDir,
}

pub async fn platform() -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn Queue> = Arc::new(
        EmbeddedLog::open(&EmbeddedConfig::new(dir.path().join("queue")))
            .await
            .unwrap(),
    );
    let objects = mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
        dir: dir.path().join("objects"),
    }))
    .unwrap();
    let engine = StorageEngine::open(
        queue.clone(),
        objects.clone(),
        StorageConfig {
            mailbox_partitions: 2,
            ..StorageConfig::default()
        },
    )
    .await
    .unwrap();
    engine
        .add_tenant("acme".parse().unwrap(), TenantLimits::default())
        .await
        .unwrap();
    engine
        .add_domain("acme".parse().unwrap(), "acme.test".parse().unwrap())
        .await
        .unwrap();
    let alice = engine
        .add_user(
            "alice@acme.test".parse().unwrap(),
            Secret::new("pw".into()),
            None,
        )
        .await
        .unwrap();
    Platform {
        queue,
        objects,
        engine,
        alice,
        dir,
    }
}
