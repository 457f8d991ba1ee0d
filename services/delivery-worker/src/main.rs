//! The `delivery-worker` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_delivery::ServiceConfig;
use mailmesh_delivery::worker::Worker;
use mailmesh_kit::admin::AdminServer;
use mailmesh_kit::{ConfigSource, Health, Shutdown};
use mailmesh_objstore::ObjectStoreReadiness;
use mailmesh_queue::QueueReadiness;
use mailmesh_storage::client::GrpcMailstore;

fn main() -> anyhow::Result<()> {
    let config: ServiceConfig = ConfigSource::from_process().load()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let _telemetry = mailmesh_kit::telemetry::init("delivery-worker", &config.telemetry)?;
    let shutdown = Shutdown::new();
    let health = Health::new();
    let admin = AdminServer::bind(config.admin.listen, health.clone())
        .await
        .with_context(|| format!("binding the admin port {}", config.admin.listen))?;
    let admin_task = tokio::spawn(admin.serve(shutdown.clone()));

    let queue = mailmesh_queue::open(&config.queue)
        .await
        .context("opening the queue")?;
    health.add_check(Arc::new(QueueReadiness(queue.clone())));
    let objects =
        mailmesh_objstore::open(&config.object_store).context("opening the object store")?;
    health.add_check(Arc::new(ObjectStoreReadiness(objects.clone())));
    let store = GrpcMailstore::new(&config.storage_endpoint, config.worker.max_message_bytes)?;

    let worker = Worker::new(queue, objects, Arc::new(store), config.worker);
    let mut consuming = tokio::spawn(worker.run(shutdown.clone()));
    tracing::info!(admin = %config.admin.listen, "delivery-worker is consuming");

    tokio::select! {
        () = mailmesh_kit::shutdown::signal() => {}
        // A worker that stops consuming must not look healthy: exit, get restarted.
        ended = &mut consuming => {
            ended??;
            anyhow::bail!("the consumer stopped");
        }
    }
    shutdown.drain(&health, &config.shutdown).await;
    consuming.await??;
    admin_task.await??;
    Ok(())
}
