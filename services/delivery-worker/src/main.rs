//! The `delivery-worker` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_delivery::ServiceConfig;
use mailmesh_delivery::worker::Worker;
use mailmesh_kit::service::Service;
use mailmesh_storage::client::GrpcMailstore;

fn main() -> anyhow::Result<()> {
    mailmesh_kit::service::main(run)
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let service = Service::start("delivery-worker", &config.admin, &config.telemetry).await?;
    let queue = mailmesh_queue::open_checked(&config.queue, &service.health)
        .await
        .context("opening the queue")?;
    let objects = mailmesh_objstore::open_checked(&config.object_store, &service.health)
        .context("opening the object store")?;
    let store = GrpcMailstore::new(&config.storage_endpoint, config.worker.max_message_bytes)?;

    let worker = Worker::new(queue, objects, Arc::new(store), config.worker);
    let mut consuming = tokio::spawn(worker.run(service.shutdown.clone()));
    tracing::info!(admin = %config.admin.listen, "delivery-worker is consuming");

    tokio::select! {
        () = mailmesh_kit::shutdown::signal() => {}
        // A worker that stops consuming must not look healthy: exit, get restarted.
        ended = &mut consuming => {
            ended??;
            anyhow::bail!("the consumer stopped");
        }
    }
    service.drain(&config.shutdown).await?;
    consuming.await??;
    Ok(())
}
