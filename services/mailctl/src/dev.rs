//! `mailctl dev`: every service that exists, in one process, on embedded backends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mailmesh_auth::{AuthCheck, AuthConfig, Checker};
use mailmesh_cache::CacheReadiness;
use mailmesh_delivery::worker::{Worker, WorkerConfig};
use mailmesh_ingress::{Ingress, IngressConfig};
use mailmesh_kit::admin::AdminServer;
use mailmesh_kit::config::{AdminConfig, ConfigError, ShutdownConfig, Validate};
use mailmesh_kit::telemetry::{LogFormat, TelemetryConfig};
use mailmesh_kit::tls::{ReloadingCertResolver, TlsConfig};
use mailmesh_kit::{ConfigSource, Health, Shutdown};
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig, ObjectStoreReadiness};
use mailmesh_queue::QueueReadiness;
use mailmesh_queue::embedded::EmbeddedConfig;
use mailmesh_storage::engine::{StorageConfig, StorageEngine};
use mailmesh_storage::server::serve_grpc;
use serde::Deserialize;

use crate::DevArgs;

/// The topic the front doors write accepted mail to.
const MAIL_TOPIC: &str = "mail.queue";

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DevConfig {
    data_dir: PathBuf,
    /// Address every mail listener binds to.
    bind: IpAddr,
    ports: Ports,
    /// Certificate for STARTTLS and implicit TLS; a self-signed one is generated in
    /// `data_dir/tls` when absent.
    tls: Option<TlsConfig>,
    /// fsync the queue before acknowledging (keep on: a `250` is a promise).
    queue_fsync: bool,
    storage: StorageConfig,
    /// SPF/DKIM/DMARC checks (`[auth]`; DNS from /etc/resolv.conf unless
    /// `auth.dns.servers` is set).
    auth: AuthConfig,
    /// SMTP limits (`[smtp]`, as smtp-ingress has them; the topic is always the dev
    /// queue's).
    smtp: IngressConfig,
    /// Submission (`[submission]`: login limits, privacy, send rates, DKIM signing).
    submission: mailmesh_ingress::submit::SubmissionConfig,
    /// Relaying to other domains (`[outbound]`: MX port, DNS servers, retries).
    outbound: mailmesh_delivery::outbound::OutboundConfig,
    /// POP3 limits (`[pop3]`).
    pop3: mailmesh_gateway::Pop3Config,
    /// IMAP limits (`[imap]`).
    imap: mailmesh_gateway::ImapConfig,
    admin: AdminConfig,
    telemetry: TelemetryConfig,
    shutdown: ShutdownConfig,
}

/// The ports of the dev platform, unprivileged so no root is needed.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Ports {
    /// The storage gRPC API, which `mailctl` commands talk to.
    storage: u16,
    smtp: u16,
    submission: u16,
    submissions: u16,
    imap: u16,
    imaps: u16,
    pop3: u16,
    pop3s: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            storage: 7001,
            smtp: 2525,
            submission: 2587,
            submissions: 2465,
            imap: 2143,
            imaps: 2993,
            pop3: 2110,
            pop3s: 2995,
        }
    }
}

impl Ports {
    fn named(&self) -> [(&'static str, u16); 8] {
        [
            ("storage", self.storage),
            ("smtp", self.smtp),
            ("submission", self.submission),
            ("submissions", self.submissions),
            ("imap", self.imap),
            ("imaps", self.imaps),
            ("pop3", self.pop3),
            ("pop3s", self.pop3s),
        ]
    }
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("mailmesh-data"),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ports: Ports::default(),
            tls: None,
            queue_fsync: true,
            storage: StorageConfig {
                // One process: a few partitions keep start-up and memory small.
                mailbox_partitions: 4,
                ..StorageConfig::default()
            },
            auth: AuthConfig {
                // A laptop without a reachable resolver should not stall each message.
                dns: mailmesh_auth::DnsConfig {
                    timeout: Duration::from_secs(2),
                    attempts: 1,
                    ..mailmesh_auth::DnsConfig::default()
                },
                ..AuthConfig::default()
            },
            smtp: IngressConfig::default(),
            submission: Default::default(),
            outbound: Default::default(),
            pop3: mailmesh_gateway::Pop3Config::default(),
            imap: mailmesh_gateway::ImapConfig::default(),
            admin: AdminConfig {
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)),
            },
            telemetry: TelemetryConfig {
                log_format: LogFormat::Text,
                ..TelemetryConfig::default()
            },
            shutdown: ShutdownConfig {
                // Nothing balances traffic in front of a dev process.
                readiness_grace: Duration::ZERO,
                drain_timeout: Duration::from_secs(10),
            },
        }
    }
}

impl Validate for DevConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.shutdown.validate()?;
        self.storage.validate()?;
        self.auth.validate()?;
        self.smtp.validate()?;
        self.submission.validate()?;
        self.outbound.validate()?;
        self.pop3.validate()?;
        self.imap.validate()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        let named = self.ports.named();
        for (i, (name, port)) in named.iter().enumerate() {
            if *port == 0 {
                return Err(ConfigError::invalid(
                    format!("ports.{name}"),
                    "must not be 0",
                ));
            }
            if let Some((other, _)) = named[..i].iter().find(|(_, p)| p == port) {
                return Err(ConfigError::invalid(
                    format!("ports.{name}"),
                    format!("port {port} is already used by ports.{other}"),
                ));
            }
        }
        Ok(())
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut source = ConfigSource::from_process();
    if let Some(file) = &args.config {
        source = source.with_file(file);
    }
    let mut config: DevConfig = source.load()?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.admin_listen {
        config.admin.listen = listen;
    }
    let _telemetry = mailmesh_kit::telemetry::init("mailctl-dev", &config.telemetry)?;

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let shutdown = Shutdown::new();
    let health = Health::new();

    let queue = mailmesh_queue::open(&mailmesh_queue::QueueConfig::Embedded(EmbeddedConfig {
        fsync: config.queue_fsync,
        ..EmbeddedConfig::new(config.data_dir.join("queue"))
    }))
    .await
    .context("opening the embedded queue")?;
    queue.ensure_topic(MAIL_TOPIC, 4).await?;
    health.add_check(Arc::new(QueueReadiness(queue.clone())));

    let objects = mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
        dir: config.data_dir.join("objects"),
    }))
    .context("opening the local object store")?;
    health.add_check(Arc::new(ObjectStoreReadiness(objects.clone())));

    // Mutual TLS between the services, as deployed: a dev CA and a certificate per
    // role, made once; `mailctl` commands use the admin one from here.
    let pki = config.data_dir.join("pki");
    mailmesh_kit::internal::ensure_pki(&pki)
        .with_context(|| format!("writing the dev certificates to {}", pki.display()))?;
    let internal = |role| {
        mailmesh_kit::internal::InternalTls::load(
            &mailmesh_kit::internal::InternalTlsConfig::in_dir(&pki, role),
            role,
        )
        .with_context(|| {
            format!(
                "loading the dev certificate of {role} from {}",
                pki.display()
            )
        })
    };
    // Forwarded mail's senders are rewritten (SRS) with a secret kept in the data
    // directory, so bounces to them are taken back after a restart too.
    let srs = match config.smtp.srs.clone() {
        Some(srs) => srs,
        None => mailmesh_auth::srs::SrsConfig {
            secret: mailmesh_kit::secret::ensure_secret_file(&config.data_dir.join("srs.secret"))
                .context("writing the SRS secret")?,
            previous_secrets: Vec::new(),
            max_age: Duration::from_secs(21 * 86_400),
        },
    };
    let storage_tls = internal(mailmesh_kit::internal::Role::Storage)?;
    let gateway_tls = internal(mailmesh_kit::internal::Role::Gateway)?;

    let mut storage = config.storage.clone();
    // The index beside the log, so a restart replays only what came after its last
    // write-back.
    storage
        .index_dir
        .get_or_insert_with(|| config.data_dir.join("index"));
    let engine = StorageEngine::open(queue.clone(), objects.clone(), storage)
        .await
        .context("starting storage")?;
    let postmaster = config.smtp.postmaster_address()?;
    ensure_postmaster(&engine, &postmaster, &config.data_dir)
        .await
        .with_context(|| format!("making the postmaster mailbox {postmaster}"))?;
    let storage_addr = SocketAddr::new(config.bind, config.ports.storage);
    let storage_listener = tokio::net::TcpListener::bind(storage_addr)
        .await
        .with_context(|| format!("binding the storage gRPC port {storage_addr}"))?;
    let cache = mailmesh_cache::open(&mailmesh_cache::CacheConfig::Memory).await?;
    // One storage: without a configured session secret it makes its own at start.
    let storage_service = mailmesh_storage::server::service(engine.clone(), cache.clone(), true)?;
    let storage_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_grpc(storage_service, storage_listener, &storage_tls, shutdown).await
        })
    };

    let tls = match &config.tls {
        Some(tls) => tls.clone(),
        None => {
            let (cert_file, key_file) = mailmesh_kit::tls::ensure_self_signed(
                &config.data_dir.join("tls"),
                &["localhost", "127.0.0.1"],
            )?;
            TlsConfig {
                cert_file,
                key_file,
                reload_interval: Duration::from_secs(30),
            }
        }
    };
    let resolver = Arc::new(
        ReloadingCertResolver::load(&tls.cert_file, &tls.key_file)
            .context("loading the TLS certificate")?,
    );
    resolver.spawn_reloader(tls.reload_interval, &shutdown);

    // The MX front door, checking recipients against the engine in this process.
    // auth-check in this process. Without a usable resolver configuration mail still
    // flows, unchecked, and the banner says so.
    let auth = match Checker::new(config.auth.clone()) {
        Ok(checker) => Some(Arc::new(checker.with_cache(cache.clone())) as Arc<dyn AuthCheck>),
        Err(e) => {
            tracing::warn!(error = %e, "auth-check disabled: no DNS resolver");
            None
        }
    };
    let auth_on = auth.is_some();
    let smtp_addr = SocketAddr::new(config.bind, config.ports.smtp);
    let smtp_listener = tokio::net::TcpListener::bind(smtp_addr)
        .await
        .with_context(|| format!("binding the SMTP port {smtp_addr}"))?;
    let ingress = Ingress::new(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        IngressConfig {
            topic: MAIL_TOPIC.into(),
            srs: Some(srs.clone()),
            ..config.smtp.clone()
        },
        Some(mailmesh_kit::tls::server_config(resolver.clone())?),
        cache.clone(),
        auth,
    );
    let smtp_task = tokio::spawn(mailmesh_ingress::serve(
        ingress,
        smtp_listener,
        shutdown.clone(),
    ));

    // Submission (587-style STARTTLS and 465-style implicit TLS), same engine.
    let submission = Ingress::submission(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        IngressConfig {
            topic: MAIL_TOPIC.into(),
            ..config.smtp.clone()
        },
        config.submission.clone(),
        Some(mailmesh_kit::tls::server_config(resolver.clone())?),
        cache.clone(),
    );
    submission.follow_key_changes(shutdown.clone());
    let mut submission_tasks = Vec::new();
    for (port, implicit_tls) in [
        (config.ports.submission, false),
        (config.ports.submissions, true),
    ] {
        let addr = SocketAddr::new(config.bind, port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the submission port {addr}"))?;
        let serve = if implicit_tls {
            tokio::spawn(mailmesh_ingress::serve_implicit_tls(
                submission.clone(),
                listener,
                shutdown.clone(),
            ))
        } else {
            tokio::spawn(mailmesh_ingress::serve(
                submission.clone(),
                listener,
                shutdown.clone(),
            ))
        };
        submission_tasks.push(serve);
    }

    // Local delivery straight into the engine, in this process.
    let worker = Worker::new(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        cache.clone(),
        WorkerConfig {
            topic: MAIL_TOPIC.into(),
            hostname: config.smtp.hostname.clone(),
            srs: Some(srs.clone()),
            ..WorkerConfig::default()
        },
    );
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    // Outbound relay to other domains' MX hosts, retries in the local object store.
    // Without a resolver configuration (no nameserver in /etc/resolv.conf, no
    // `[outbound.dns] servers`) it is off, as auth-check is, and the banner says so.
    let outbound = if config.outbound.enabled {
        match mailmesh_delivery::outbound::Outbound::new(
            queue.clone(),
            objects.clone(),
            cache.clone(),
            config.outbound.clone(),
            WorkerConfig {
                topic: MAIL_TOPIC.into(),
                hostname: config.smtp.hostname.clone(),
                ..WorkerConfig::default()
            },
        ) {
            Ok(outbound) => Some(outbound),
            Err(e) => {
                tracing::warn!(error = %e, "outbound relay disabled: no DNS resolver");
                None
            }
        }
    } else {
        None
    };
    let outbound_on = outbound.is_some();
    let shutdown_for_outbound = shutdown.clone();
    let outbound_task = tokio::spawn(async move {
        match outbound {
            Some(outbound) => outbound.run(shutdown_for_outbound).await,
            None => Ok(()),
        }
    });

    // IMAP and POP3 (STARTTLS and implicit TLS), through the storage gRPC API above.
    let store = mailmesh_gateway::Store::new(
        &format!("https://{storage_addr}"),
        config
            .pop3
            .max_message_bytes
            .max(config.imap.max_message_bytes),
        &gateway_tls,
    )?;
    let gateway = mailmesh_gateway::Gateway::new(
        store,
        cache.clone(),
        mailmesh_kit::tls::server_config(resolver.clone())?,
        config.pop3.clone(),
        config.imap.clone(),
        mailmesh_gateway::ProxyConfig::default(),
    );
    let mut gateway_tasks = Vec::new();
    for (port, implicit_tls) in [(config.ports.imap, false), (config.ports.imaps, true)] {
        let addr = SocketAddr::new(config.bind, port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the IMAP port {addr}"))?;
        gateway_tasks.push(tokio::spawn(mailmesh_gateway::serve_imap(
            gateway.clone(),
            listener,
            implicit_tls,
            shutdown.clone(),
        )));
    }
    for (port, implicit_tls) in [(config.ports.pop3, false), (config.ports.pop3s, true)] {
        let addr = SocketAddr::new(config.bind, port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the POP3 port {addr}"))?;
        gateway_tasks.push(tokio::spawn(mailmesh_gateway::serve_pop3(
            gateway.clone(),
            listener,
            implicit_tls,
            shutdown.clone(),
        )));
    }

    health.add_check(Arc::new(CacheReadiness(cache.clone())));

    let admin = AdminServer::bind(config.admin.listen, health.clone())
        .await
        .with_context(|| format!("binding the admin port {}", config.admin.listen))?;
    let admin_addr = admin.local_addr()?;
    let admin_task = tokio::spawn(admin.serve(shutdown.clone()));

    print_banner(&config, admin_addr, &tls, auth_on, outbound_on);
    tracing::info!(admin = %admin_addr, data_dir = %config.data_dir.display(), "mailmesh dev is running");

    mailmesh_kit::shutdown::signal().await;
    let clean = shutdown.drain(&health, &config.shutdown).await;
    smtp_task.await?;
    for task in submission_tasks.into_iter().chain(gateway_tasks) {
        task.await?;
    }
    worker_task.await??;
    outbound_task.await??;
    // Open Watch streams do not end by themselves; they are cut here.
    if let Ok(served) = tokio::time::timeout(Duration::from_secs(5), storage_task).await {
        served??;
    }
    admin_task.await??;
    engine.release_expunged().await;
    tracing::info!(clean, "mailmesh dev stopped");
    Ok(())
}

/// RFC 5321 4.5.1: every domain taking mail takes `<Postmaster>`, which the MX
/// hands to the deployment's postmaster (`smtp.postmaster`, default
/// `postmaster@<hostname>`). A fresh dev platform has no such mailbox: it is made
/// here once, in a tenant of its own (`postmaster`) when its domain is not local
/// yet, with a random password kept in `<data dir>/postmaster.password` (owner-only)
/// for reading its mail over IMAP or POP3.
async fn ensure_postmaster(
    engine: &StorageEngine,
    address: &mailmesh_types::EmailAddress,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use mailmesh_storage::directory::Lookup;
    match engine.lookup(address)? {
        Lookup::Deliver(_) => return Ok(()),
        Lookup::NotLocal => {
            let tenant: mailmesh_types::TenantId = "postmaster".parse()?;
            if !engine.directory(|d| d.tenant(&tenant).is_some())? {
                engine
                    .add_tenant(tenant.clone(), Default::default())
                    .await?;
            }
            engine.add_domain(tenant, address.domain().clone()).await?;
        }
        Lookup::Unknown => {}
    }
    let password = mailmesh_kit::secret::ensure_secret_file(&data_dir.join(POSTMASTER_PASSWORD))?;
    engine.add_user(address.clone(), password, None).await?;
    tracing::info!(%address, "postmaster mailbox made (its password is in {POSTMASTER_PASSWORD})");
    Ok(())
}

/// Where dev keeps the password of the postmaster mailbox it made.
const POSTMASTER_PASSWORD: &str = "postmaster.password";

fn print_banner(
    config: &DevConfig,
    admin: SocketAddr,
    tls: &TlsConfig,
    auth: bool,
    outbound: bool,
) {
    println!("mailmesh dev is running (Ctrl-C stops it)");
    println!("  admin        http://{admin}/readyz  /livez  /metrics");
    println!("  data         {}", config.data_dir.display());
    if let Ok(postmaster) = config.smtp.postmaster_address() {
        let password = config.data_dir.join(POSTMASTER_PASSWORD);
        match password.exists() {
            true => println!(
                "  postmaster   {postmaster} (RCPT TO:<Postmaster> lands here; password in {})",
                password.display()
            ),
            false => println!("  postmaster   {postmaster}"),
        }
    }
    println!("  tls          {}", tls.cert_file.display());
    println!("  queue        embedded log, topic {MAIL_TOPIC} (a delivery worker consumes it)");
    println!(
        "  storage      https://{}:{}  (gRPC, mutual TLS; `mailctl tenant|domain|user|alias|quota` talk to it with {}/pki/admin.crt)",
        config.bind,
        config.ports.storage,
        config.data_dir.display()
    );
    println!(
        "  smtp         {}:{}  (MX, STARTTLS with the certificate above)",
        config.bind, config.ports.smtp
    );
    if auth {
        println!(
            "  auth-check   in process: SPF, DKIM, ARC, DMARC, iprev{} (DNS {})",
            if config.auth.block_lists.is_empty() {
                ""
            } else {
                ", DNS block lists"
            },
            if config.auth.dns.servers.is_empty() {
                "from /etc/resolv.conf".to_owned()
            } else {
                format!("{:?}", config.auth.dns.servers)
            }
        );
    } else {
        println!("  auth-check   OFF (no DNS resolver configuration): mail is not checked");
    }
    if outbound {
        println!(
            "  outbound     MX relay on port {}, retries in {}/objects/outbound/retry",
            config.outbound.port,
            config.data_dir.display()
        );
    } else if config.outbound.enabled {
        println!(
            "  outbound     OFF (no DNS resolver configuration): mail for other domains stays queued"
        );
    } else {
        println!(
            "  outbound     OFF (outbound.enabled = false): mail for other domains stays queued"
        );
    }
    println!(
        "  imap         {}:{}  (STARTTLS; LOGIN and AUTHENTICATE PLAIN after it)",
        config.bind, config.ports.imap
    );
    println!(
        "  imaps        {}:{}  (implicit TLS)",
        config.bind, config.ports.imaps
    );
    println!(
        "  pop3         {}:{}  (STLS; USER/PASS and AUTH PLAIN after it)",
        config.bind, config.ports.pop3
    );
    println!(
        "  pop3s        {}:{}  (implicit TLS)",
        config.bind, config.ports.pop3s
    );
    println!(
        "  submission   {}:{}  (STARTTLS, then AUTH PLAIN/LOGIN; DKIM-signed with `mailctl dkim`)",
        config.bind, config.ports.submission
    );
    println!(
        "  submissions  {}:{}  (implicit TLS)",
        config.bind, config.ports.submissions
    );
}
