//! The `storage` service binary.

use anyhow::Context;
use mailmesh_kit::internal::{InternalTls, Role};
use mailmesh_kit::service::Service;
use mailmesh_storage::engine::StorageEngine;
use mailmesh_storage::server::{ServiceConfig, serve_grpc};

fn main() -> anyhow::Result<()> {
    mailmesh_kit::service::main(run)
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let service = Service::start("storage", &config.admin, &config.telemetry).await?;
    let queue = mailmesh_queue::open_checked(&config.queue, &service.health)
        .await
        .context("opening the queue")?;
    let objects = mailmesh_objstore::open_checked(&config.object_store, &service.health)
        .context("opening the object store")?;
    let engine = StorageEngine::open(queue, objects, config.storage.clone())
        .await
        .context("loading the directory")?;

    let tls = InternalTls::load(&config.internal_tls, Role::Storage)
        .context("loading the internal TLS certificate")?;
    tls.spawn_reloader(config.internal_tls.reload_interval, &service.shutdown);
    let cache = mailmesh_cache::open(&config.cache)
        .await
        .context("connecting to the cache")?;
    let grpc_service = mailmesh_storage::server::service(engine.clone(), cache, false)?;

    let listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC port {}", config.grpc_listen))?;
    // Other replicas forward calls for this one's partitions here.
    match engine.advertise(listener.local_addr()?) {
        Some(addr) => {
            tracing::info!(%addr, "other replicas forward calls for this replica's partitions here")
        }
        None if config.storage.owned_partitions => tracing::warn!(
            "storage.advertise_host is not set and the gRPC port listens on every address: other replicas cannot forward calls for this replica's partitions"
        ),
        None => {}
    }
    tracing::info!(grpc = %config.grpc_listen, admin = %config.admin.listen, "storage is serving (mutual TLS)");
    let shutdown = service.shutdown.clone();
    let grpc =
        tokio::spawn(async move { serve_grpc(grpc_service, listener, &tls, shutdown).await });

    service.wait_and_drain(&config.shutdown).await?;
    engine.leave();
    // The next owner of these partitions does not know them.
    engine.release_expunged().await;
    // Open Watch streams do not end by themselves; they are cut here.
    match tokio::time::timeout(std::time::Duration::from_secs(5), grpc).await {
        Ok(served) => served??,
        Err(_) => tracing::warn!("gRPC streams still open at exit"),
    }
    Ok(())
}
