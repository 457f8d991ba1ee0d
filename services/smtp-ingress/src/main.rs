//! The `smtp-ingress` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_auth::grpc::GrpcAuthCheck;
use mailmesh_ingress::{Ingress, ServiceConfig};
use mailmesh_kit::service::Service;
use mailmesh_kit::tls::ReloadingCertResolver;
use mailmesh_storage::client::GrpcMailstore;

fn main() -> anyhow::Result<()> {
    mailmesh_kit::service::main(run)
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let service = Service::start("smtp-ingress", &config.admin, &config.telemetry).await?;
    let queue = mailmesh_queue::open_checked(&config.queue, &service.health)
        .await
        .context("opening the queue")?;
    let objects = mailmesh_objstore::open_checked(&config.object_store, &service.health)
        .context("opening the object store")?;
    let internal = mailmesh_kit::internal::InternalTls::load(
        &config.internal_tls,
        mailmesh_kit::internal::Role::SmtpIngress,
    )
    .context("loading the internal TLS certificate")?;
    internal.spawn_reloader(config.internal_tls.reload_interval, &service.shutdown);
    let directory = GrpcMailstore::new(&config.storage_endpoint, 1 << 20, &internal)?;
    let tls = match &config.tls {
        Some(tls) => {
            let resolver = Arc::new(
                ReloadingCertResolver::load(&tls.cert_file, &tls.key_file)
                    .context("loading the TLS certificate")?,
            );
            resolver.spawn_reloader(tls.reload_interval, &service.shutdown);
            Some(mailmesh_kit::tls::server_config(resolver)?)
        }
        None => None,
    };
    // Not a readiness dependency: without the cache, limits are off, mail still flows.
    let cache = mailmesh_cache::open(&config.cache)
        .await
        .context("connecting to the cache")?;
    let auth = match &config.auth_check_endpoint {
        Some(endpoint) => Some(Arc::new(GrpcAuthCheck::new(
            endpoint,
            config.smtp.max_message_bytes,
            &internal,
        )?) as Arc<dyn mailmesh_auth::AuthCheck>),
        None => {
            tracing::warn!(
                "no auth_check_endpoint: mail is accepted without SPF/DKIM/DMARC checks"
            );
            None
        }
    };
    let ingress = Ingress::new(
        queue,
        objects,
        Arc::new(directory),
        config.smtp,
        tls,
        cache,
        auth,
    );

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the SMTP port {}", config.listen))?;
    tracing::info!(smtp = %config.listen, "smtp-ingress is listening");
    let serving = tokio::spawn(mailmesh_ingress::serve(
        ingress,
        listener,
        service.shutdown.clone(),
    ));

    service.wait_and_drain(&config.shutdown).await?;
    serving.await?;
    Ok(())
}
