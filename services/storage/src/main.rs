//! The `storage` service binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_kit::admin::AdminServer;
use mailmesh_kit::{ConfigSource, Health, Shutdown};
use mailmesh_objstore::ObjectStoreReadiness;
use mailmesh_queue::QueueReadiness;
use mailmesh_storage::engine::StorageEngine;
use mailmesh_storage::server::{ServiceConfig, serve_grpc};

fn main() -> anyhow::Result<()> {
    let config: ServiceConfig = ConfigSource::from_process().load()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let _telemetry = mailmesh_kit::telemetry::init("storage", &config.telemetry)?;
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
    let engine = StorageEngine::open(queue, objects, config.storage.clone())
        .await
        .context("loading the directory")?;

    let listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC port {}", config.grpc_listen))?;
    tracing::info!(grpc = %config.grpc_listen, admin = %config.admin.listen, "storage is serving");
    let grpc = tokio::spawn(serve_grpc(engine, listener, shutdown.clone()));

    mailmesh_kit::shutdown::signal().await;
    shutdown.drain(&health, &config.shutdown).await;
    // Open Watch streams do not end by themselves; they are cut here.
    match tokio::time::timeout(std::time::Duration::from_secs(5), grpc).await {
        Ok(served) => served??,
        Err(_) => tracing::warn!("gRPC streams still open at exit"),
    }
    admin_task.await??;
    Ok(())
}
