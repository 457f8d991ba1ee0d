//! The `submission` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_ingress::Ingress;
use mailmesh_kit::service::Service;
use mailmesh_kit::tls::ReloadingCertResolver;
use mailmesh_storage::client::GrpcMailstore;
use mailmesh_submission::ServiceConfig;

fn main() -> anyhow::Result<()> {
    mailmesh_kit::service::main(run)
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let service = Service::start("submission", &config.admin, &config.telemetry).await?;
    let queue = mailmesh_queue::open_checked(&config.queue, &service.health)
        .await
        .context("opening the queue")?;
    let objects = mailmesh_objstore::open_checked(&config.object_store, &service.health)
        .context("opening the object store")?;
    let internal = mailmesh_kit::internal::InternalTls::load(
        &config.internal_tls,
        mailmesh_kit::internal::Role::Submission,
    )
    .context("loading the internal TLS certificate")?;
    internal.spawn_reloader(config.internal_tls.reload_interval, &service.shutdown);
    let directory = GrpcMailstore::new(&config.storage_endpoint, 1 << 20, &internal)?;
    let resolver = Arc::new(
        ReloadingCertResolver::load(&config.tls.cert_file, &config.tls.key_file)
            .context("loading the TLS certificate")?,
    );
    resolver.spawn_reloader(config.tls.reload_interval, &service.shutdown);
    let tls = mailmesh_kit::tls::server_config(resolver)?;
    // Not a readiness dependency: without the cache, limits are off, mail still flows.
    let cache = mailmesh_cache::open(&config.cache)
        .await
        .context("connecting to the cache")?;
    let ingress = Ingress::submission(
        queue,
        objects,
        Arc::new(directory),
        config.smtp,
        config.submission,
        Some(tls),
        cache,
    );
    ingress.follow_key_changes(service.shutdown.clone());

    let starttls = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the submission port {}", config.listen))?;
    let implicit = tokio::net::TcpListener::bind(config.listen_tls)
        .await
        .with_context(|| format!("binding the submissions port {}", config.listen_tls))?;
    tracing::info!(submission = %config.listen, submissions = %config.listen_tls, "submission is listening");
    let serving = tokio::spawn(mailmesh_ingress::serve(
        ingress.clone(),
        starttls,
        service.shutdown.clone(),
    ));
    let serving_tls = tokio::spawn(mailmesh_ingress::serve_implicit_tls(
        ingress,
        implicit,
        service.shutdown.clone(),
    ));

    service.wait_and_drain(&config.shutdown).await?;
    serving.await?;
    serving_tls.await?;
    Ok(())
}
