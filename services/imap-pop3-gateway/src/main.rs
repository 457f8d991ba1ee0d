//! The `imap-pop3-gateway` binary.

use std::sync::Arc;

use anyhow::Context;
use mailmesh_gateway::{Gateway, ServiceConfig, Store};
use mailmesh_kit::service::Service;
use mailmesh_kit::tls::ReloadingCertResolver;

fn main() -> anyhow::Result<()> {
    mailmesh_kit::service::main(run)
}

async fn run(config: ServiceConfig) -> anyhow::Result<()> {
    let service = Service::start("imap-pop3-gateway", &config.admin, &config.telemetry).await?;
    let internal = mailmesh_kit::internal::InternalTls::load(
        &config.internal_tls,
        mailmesh_kit::internal::Role::Gateway,
    )
    .context("loading the internal TLS certificate")?;
    internal.spawn_reloader(config.internal_tls.reload_interval, &service.shutdown);
    let store = Store::new(
        &config.storage_endpoint,
        config
            .pop3
            .max_message_bytes
            .max(config.imap.max_message_bytes),
        &internal,
    )?
    .with_write_patience(config.storage_write_patience);
    let resolver = Arc::new(
        ReloadingCertResolver::load(&config.tls.cert_file, &config.tls.key_file)
            .context("loading the TLS certificate")?,
    );
    resolver.spawn_reloader(config.tls.reload_interval, &service.shutdown);
    let tls = mailmesh_kit::tls::server_config(resolver)?;
    // The maildrop locks live here: without the cache no POP3 login succeeds
    // (answered [SYS/TEMP]), so it is a readiness dependency.
    let cache = mailmesh_cache::open(&config.cache)
        .await
        .context("connecting to the cache")?;
    service
        .health
        .add_check(Arc::new(mailmesh_cache::CacheReadiness(cache.clone())));
    let gateway = Gateway::new(store, cache, tls, config.pop3, config.imap, config.proxy);

    let mut tasks = Vec::new();
    for (addr, implicit_tls) in [(config.pop3_listen, false), (config.pop3s_listen, true)] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the POP3 port {addr}"))?;
        tasks.push(tokio::spawn(mailmesh_gateway::serve_pop3(
            gateway.clone(),
            listener,
            implicit_tls,
            service.shutdown.clone(),
        )));
    }
    for (addr, implicit_tls) in [(config.imap_listen, false), (config.imaps_listen, true)] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the IMAP port {addr}"))?;
        tasks.push(tokio::spawn(mailmesh_gateway::serve_imap(
            gateway.clone(),
            listener,
            implicit_tls,
            service.shutdown.clone(),
        )));
    }
    tracing::info!(imap = %config.imap_listen, imaps = %config.imaps_listen, pop3 = %config.pop3_listen, pop3s = %config.pop3s_listen, "imap-pop3-gateway is listening");
    service.wait_and_drain(&config.shutdown).await?;
    for task in tasks {
        task.await?;
    }
    Ok(())
}
