//! The platform behind the front door in tests: embedded queue and object store, the
//! storage engine, tenant `acme` with domain `acme.test` and user `alice@acme.test`.
#![allow(dead_code)]

pub mod processes;
pub mod session;

use std::sync::Arc;

use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_queue::Queue;
use mailmesh_storage::engine::{StorageEngine, UserRef};

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
    let embedded = mailmesh_storage::testing::embedded(dir.path(), 2)
        .await
        .unwrap();
    let alice = mailmesh_storage::testing::tenant_with_user(
        &embedded.engine,
        "acme",
        "alice@acme.test",
        "pw",
    )
    .await
    .unwrap();
    Platform {
        queue: embedded.queue,
        objects: embedded.objects,
        engine: embedded.engine,
        alice,
        dir,
    }
}
