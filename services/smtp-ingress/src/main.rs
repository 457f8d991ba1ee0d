//! The `smtp-ingress` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_ingress::{Ingress, ServiceConfig};
use mailmesh_kit::admin::AdminServer;
use mailmesh_kit::tls::ReloadingCertResolver;
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
    let _telemetry = mailmesh_kit::telemetry::init("smtp-ingress", &config.telemetry)?;
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
    let directory = GrpcMailstore::new(&config.storage_endpoint, 1 << 20)?;
    let tls = match &config.tls {
        Some(tls) => {
            let resolver = Arc::new(
                ReloadingCertResolver::load(&tls.cert_file, &tls.key_file)
                    .context("loading the TLS certificate")?,
            );
            resolver.spawn_reloader(tls.reload_interval, &shutdown);
            Some(mailmesh_kit::tls::server_config(resolver)?)
        }
        None => None,
    };
    let ingress = Ingress::new(queue, objects, Arc::new(directory), config.smtp, tls);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the SMTP port {}", config.listen))?;
    tracing::info!(smtp = %config.listen, "smtp-ingress is listening");
    let serving = tokio::spawn(mailmesh_ingress::serve(ingress, listener, shutdown.clone()));

    mailmesh_kit::shutdown::signal().await;
    shutdown.drain(&health, &config.shutdown).await;
    serving.await?;
    admin_task.await??;
    Ok(())
}
