//! The `delivery-worker` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_delivery::ServiceConfig;
use mailmesh_delivery::outbound::Outbound;
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
    let tls = mailmesh_kit::internal::InternalTls::load(
        &config.internal_tls,
        mailmesh_kit::internal::Role::DeliveryWorker,
    )
    .context("loading the internal TLS certificate")?;
    tls.spawn_reloader(config.internal_tls.reload_interval, &service.shutdown);
    let store = GrpcMailstore::new(
        &config.storage_endpoint,
        config.worker.max_message_bytes,
        &tls,
    )?;

    let cache = match &config.cache {
        Some(c) => mailmesh_cache::open(c)
            .await
            .context("connecting to the cache")?,
        None => {
            tracing::warn!("no [cache]: retries are re-queued by this worker alone");
            mailmesh_cache::open(&mailmesh_cache::CacheConfig::Memory).await?
        }
    };
    let outbound = config
        .outbound
        .enabled
        .then(|| {
            Outbound::new(
                queue.clone(),
                objects.clone(),
                cache.clone(),
                config.outbound.clone(),
                config.worker.clone(),
            )
        })
        .transpose()?;

    let worker = Worker::new(queue, objects, Arc::new(store), cache, config.worker);
    // Ready only once both group consumers exist: from then on the queue's
    // readiness check follows their assignments (a probe in between saw 200).
    let local_joined = worker.subscribed();
    let relay_joined = outbound.as_ref().map(|o| o.subscribed());
    let mut joined = std::pin::pin!(async move {
        let _ = local_joined.await;
        if let Some(relay) = relay_joined {
            let _ = relay.await;
        }
    });
    let mut consuming = tokio::spawn(worker.run(service.shutdown.clone()));
    let mut relaying = match outbound {
        Some(o) => tokio::spawn(o.run(service.shutdown.clone())),
        None => tokio::spawn(std::future::pending()),
    };

    let mut started = false;
    loop {
        tokio::select! {
            () = &mut joined, if !started => {
                started = true;
                service.health.set_started();
                tracing::info!(admin = %config.admin.listen, outbound = config.outbound.enabled, "delivery-worker is consuming");
            }
            () = mailmesh_kit::shutdown::signal() => break,
            // A worker that stops consuming must not look healthy: exit, get restarted.
            ended = &mut consuming => {
                ended??;
                anyhow::bail!("the consumer stopped");
            }
            ended = &mut relaying => {
                ended??;
                anyhow::bail!("the outbound consumer stopped");
            }
        }
    }
    service.drain(&config.shutdown).await?;
    consuming.await??;
    if config.outbound.enabled {
        relaying.await??;
    }
    Ok(())
}
