//! The `auth-check` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_auth::{Checker, ServiceConfig};
use mailmesh_kit::service::Service;

fn main() -> anyhow::Result<()> {
    mailmesh_kit::service::main(run)
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let service = Service::start("auth-check", &config.admin, &config.telemetry).await?;
    // Not a readiness dependency: without the cache every pod just asks DNS itself.
    let cache = mailmesh_cache::open(&config.cache)
        .await
        .context("connecting to the cache")?;
    let checker = Arc::new(
        Checker::new(config.auth)
            .context("starting the checks")?
            .with_cache(cache),
    );
    let tls = mailmesh_kit::internal::InternalTls::load(
        &config.internal_tls,
        mailmesh_kit::internal::Role::AuthCheck,
    )
    .context("loading the internal TLS certificate")?;
    tls.spawn_reloader(config.internal_tls.reload_interval, &service.shutdown);
    let listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC port {}", config.grpc_listen))?;
    tracing::info!(grpc = %config.grpc_listen, "auth-check is serving (mutual TLS)");
    let grpc = tokio::spawn(mailmesh_auth::grpc::serve(
        checker,
        listener,
        tls,
        service.shutdown.clone(),
    ));
    service.wait_and_drain(&config.shutdown).await?;
    grpc.await??;
    Ok(())
}
