//! `mailctl tenant|domain|user|alias|quota`: administration over the storage gRPC API.

use std::io::BufRead;

/// `println!` that ends the program quietly when stdout is closed (`mailctl … | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*)
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(0);
        }
    }};
}

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use mailmesh_proto::v1;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_proto::v1::outbound_queue_client::OutboundQueueClient;
use mailmesh_types::{InboundPolicy, PolicyAction};
use serde_json::json;
use tonic::transport::Channel;

#[derive(Args)]
pub struct Target {
    /// The storage service's gRPC endpoint (always mutual TLS, whatever the scheme).
    #[arg(
        long,
        global = true,
        env = "MAILCTL_ENDPOINT",
        default_value = "https://127.0.0.1:7001"
    )]
    endpoint: String,
    /// A directory with the admin identity: `admin.crt`, `admin.key` and the
    /// internal CA's `ca.crt` (`mailctl dev` writes them to `mailmesh-data/pki`).
    #[arg(
        long,
        global = true,
        env = "MAILCTL_PKI_DIR",
        default_value = "mailmesh-data/pki"
    )]
    pki_dir: std::path::PathBuf,
    /// The admin certificate (PEM), instead of the one in --pki-dir.
    #[arg(long, global = true, env = "MAILCTL_CERT", requires_all = ["key", "ca"])]
    cert: Option<std::path::PathBuf>,
    /// The admin certificate's private key (PEM).
    #[arg(long, global = true, env = "MAILCTL_KEY", requires_all = ["cert", "ca"])]
    key: Option<std::path::PathBuf>,
    /// The internal CA certificate (PEM) that storage's certificate must chain to.
    #[arg(long, global = true, env = "MAILCTL_CA", requires_all = ["cert", "key"])]
    ca: Option<std::path::PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
}

impl Target {
    /// The admin identity's files.
    fn tls_config(&self) -> mailmesh_kit::internal::InternalTlsConfig {
        use mailmesh_kit::internal::{InternalTlsConfig, Role};
        let in_dir = InternalTlsConfig::in_dir(&self.pki_dir, Role::Admin);
        match (&self.cert, &self.key, &self.ca) {
            (Some(cert), Some(key), Some(ca)) => InternalTlsConfig {
                cert_file: cert.clone(),
                key_file: key.clone(),
                ca_file: ca.clone(),
                ..in_dir
            },
            _ => in_dir,
        }
    }
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Add {
        tenant: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List tenants with their domains and user counts.
    List,
    /// Change a tenant's limits (omitted limits become unlimited).
    Limits {
        tenant: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Set what happens to inbound mail failing authentication checks (omitted
    /// fields take their defaults: reject, junk, reject).
    Policy {
        tenant: String,
        /// For DMARC failures whose author domain publishes p=reject.
        #[arg(long, value_name = "reject|junk|tag")]
        dmarc_reject: Option<PolicyAction>,
        /// For DMARC failures whose author domain publishes p=quarantine.
        #[arg(long, value_name = "reject|junk|tag")]
        dmarc_quarantine: Option<PolicyAction>,
        /// For clients listed by a configured DNS block list.
        #[arg(long, value_name = "reject|junk|tag")]
        block_listed: Option<PolicyAction>,
    },
    /// Leave the sender's client address and name out of the Received header of
    /// the tenant's outgoing mail (on), or keep them (off).
    HideClient {
        tenant: String,
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// Remove a tenant that owns no domains.
    Remove { tenant: String },
}

#[derive(Args)]
pub struct LimitArgs {
    #[arg(long)]
    max_users: Option<u32>,
    #[arg(long)]
    max_storage_bytes: Option<u64>,
    #[arg(long)]
    max_message_bytes: Option<u64>,
    /// Recipients the tenant's users may send to per hour, together.
    #[arg(long)]
    send_rate_per_hour: Option<u32>,
}

impl LimitArgs {
    fn proto(&self) -> v1::TenantLimits {
        v1::TenantLimits {
            max_users: self.max_users.unwrap_or(0),
            max_storage_bytes: self.max_storage_bytes.unwrap_or(0),
            max_message_bytes: self.max_message_bytes.unwrap_or(0),
            send_rate_per_hour: self.send_rate_per_hour.unwrap_or(0),
        }
    }
}

#[derive(Subcommand)]
pub enum DomainCommand {
    /// Give a domain to a tenant (a domain has exactly one owner).
    Add { tenant: String, domain: String },
    /// Remove a domain that has no users or aliases left.
    Remove { tenant: String, domain: String },
    /// Send mail for unknown addresses of DOMAIN to TARGET (no TARGET: stop).
    CatchAll {
        domain: String,
        target: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Create a signing key for DOMAIN and print the DNS TXT record to publish. A
    /// domain's first key signs at once; a further one (a rotation) waits until
    /// `dkim activate` (publish its record first), unless --activate is given.
    Generate {
        domain: String,
        /// DNS label(s) naming the key (default: made from the date).
        #[arg(long)]
        selector: Option<String>,
        /// ed25519 (RFC 8463; small, but not every verifier knows it) or rsa
        /// (2048 bits; understood everywhere). One key signs at a time: prefer rsa.
        #[arg(long, default_value = "rsa", value_parser = ["rsa", "ed25519"])]
        algorithm: String,
        /// Sign with the new key at once.
        #[arg(long)]
        activate: bool,
    },
    /// Sign DOMAIN's mail with the key SELECTOR from now on (once its DNS record is
    /// published); the others stay valid for mail already sent.
    Activate { domain: String, selector: String },
    /// DOMAIN's keys and their DNS records; the last one signs.
    List { domain: String },
    /// Remove a key (its DNS record can go once no message signed with it is in
    /// flight).
    Remove { domain: String, selector: String },
}

fn dkim_json(k: &v1::DkimKeyInfo) -> serde_json::Value {
    json!({
        "domain": k.domain,
        "selector": k.selector,
        "algorithm": if k.algorithm == v1::DkimAlgorithm::Rsa2048 as i32 { "rsa" } else { "ed25519" },
        "dns_name": k.dns_name,
        "dns_record": k.dns_record,
        "signing": k.signing,
        "created_ms": k.created_ms,
    })
}

fn print_dkim(k: &v1::DkimKeyInfo) {
    out!(
        "{}. IN TXT {}{}",
        k.dns_name,
        zone_strings(&k.dns_record),
        if k.signing { " ; signing" } else { "" }
    );
}

/// A TXT value as zone-file character-strings: quoted pieces of at most 255 octets
/// (RFC 1035 3.3; an RSA-2048 DKIM record is about 410), which resolvers join.
fn zone_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|piece| format!("\"{}\"", String::from_utf8_lossy(piece)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn dkim(target: Target, command: DkimCommand) -> anyhow::Result<()> {
    let mut client = directory(&target).await?;
    match command {
        DkimCommand::Generate {
            domain,
            selector,
            algorithm,
            activate,
        } => {
            let key = client
                .add_dkim_key(v1::AddDkimKeyRequest {
                    domain,
                    selector: selector.unwrap_or_default(),
                    algorithm: if algorithm == "ed25519" {
                        v1::DkimAlgorithm::Ed25519
                    } else {
                        v1::DkimAlgorithm::Rsa2048
                    } as i32,
                    activate,
                })
                .await
                .map_err(refused)?
                .into_inner();
            if target.json {
                out!("{}", dkim_json(&key));
            } else if key.signing {
                out!(
                    "; publish this record; {} mail is signed with it from now on",
                    key.domain
                );
                print_dkim(&key);
            } else {
                out!(
                    "; publish this record, then `mailctl dkim activate {} {}`",
                    key.domain,
                    key.selector
                );
                print_dkim(&key);
            }
        }
        DkimCommand::Activate { domain, selector } => {
            client
                .activate_dkim_key(v1::DkimKeyRequest {
                    domain: domain.clone(),
                    selector: selector.clone(),
                })
                .await
                .map_err(refused)?;
            done(
                &target,
                format!("{domain} mail is signed with {selector} from now on"),
            );
        }
        DkimCommand::List { domain } => {
            let keys = client
                .list_dkim_keys(v1::DomainRequest {
                    tenant: String::new(),
                    domain,
                    user: None,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .keys;
            if target.json {
                out!(
                    "{}",
                    serde_json::Value::from(keys.iter().map(dkim_json).collect::<Vec<_>>())
                );
            } else if keys.is_empty() {
                out!("no DKIM keys: `mailctl dkim generate DOMAIN` makes one");
            } else {
                keys.iter().for_each(print_dkim);
            }
        }
        DkimCommand::Remove { domain, selector } => {
            client
                .remove_dkim_key(v1::DkimKeyRequest {
                    domain: domain.clone(),
                    selector: selector.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("DKIM key {selector} of {domain} removed"));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Mail waiting for another delivery attempt, next due first: `local` (a
    /// mailbox here: full, or storage not answering) or `outbound` (another
    /// domain's MX), each with its last error.
    List,
    /// One waiting message: envelope, attempts, last error and headers.
    Show { queue_id: String },
    /// Try waiting mail again now: one message, every one (`--all`), or those with
    /// a recipient at `--domain` (after the destination was fixed).
    Retry {
        queue_id: Option<String>,
        #[arg(long, conflicts_with_all = ["queue_id", "domain"])]
        all: bool,
        #[arg(long, conflicts_with = "queue_id")]
        domain: Option<String>,
    },
    /// Drop a waiting message (no report goes to the sender).
    Delete { queue_id: String },
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    mailmesh_types::rfc5322_date(t)
}

fn waiting_json(m: &v1::WaitingMessage) -> serde_json::Value {
    json!({
        "queue_id": m.queue_id,
        "tenant": m.tenant,
        "sender": m.sender,
        "recipients": m.recipients,
        "attempts": m.attempts,
        "due_ms": m.due_ms,
        "received_at_ms": m.received_at_ms,
        "last_error": m.last_error,
        "size": m.size,
        "delay_notified": m.delay_notified,
        "stage": m.stage,
    })
}

pub async fn queue(target: Target, command: QueueCommand) -> anyhow::Result<()> {
    let mut client = outbound_queue(&target).await?;
    match command {
        QueueCommand::List | QueueCommand::Show { .. } => {
            let (queue_id, headers) = match &command {
                QueueCommand::Show { queue_id } => (queue_id.clone(), true),
                _ => (String::new(), false),
            };
            let messages = client
                .list_waiting(v1::ListWaitingRequest {
                    queue_id: queue_id.clone(),
                    limit: 0,
                    headers,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .messages;
            if headers && messages.is_empty() {
                anyhow::bail!("not found: no waiting message {queue_id}");
            }
            if target.json {
                let list: Vec<_> = messages
                    .iter()
                    .map(|m| {
                        let mut j = waiting_json(m);
                        if headers {
                            j["headers"] = json!(m.headers);
                        }
                        j
                    })
                    .collect();
                out!("{}", serde_json::Value::from(list));
                return Ok(());
            }
            if messages.is_empty() {
                out!("no mail is waiting");
            }
            for m in &messages {
                out!(
                    "{}  {}  {} bytes  from <{}>  attempts {}  next {}",
                    m.queue_id,
                    m.stage,
                    m.size,
                    m.sender,
                    m.attempts,
                    when(m.due_ms)
                );
                for r in &m.recipients {
                    out!("    to <{r}>");
                }
                out!("    last error: {}", m.last_error);
                if headers {
                    out!(
                        "    tenant {}, received {}{}",
                        m.tenant,
                        when(m.received_at_ms),
                        if m.delay_notified {
                            ", sender told of the delay"
                        } else {
                            ""
                        }
                    );
                    out!();
                    out!("{}", m.headers.trim_end_matches("\r\n"));
                }
            }
        }
        QueueCommand::Retry {
            queue_id: Some(queue_id),
            ..
        } => {
            client
                .retry_waiting(v1::QueueIdRequest {
                    queue_id: queue_id.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("{queue_id} is due now"));
        }
        QueueCommand::Retry {
            queue_id: None,
            all,
            domain,
        } => {
            if !all && domain.is_none() {
                anyhow::bail!("name a queue id, --all or --domain DOMAIN");
            }
            let domain = domain
                .map(|d| {
                    d.trim_end_matches('.')
                        .parse::<mailmesh_types::Domain>()
                        .map(|d| d.as_str().to_ascii_lowercase())
                        .map_err(|_| anyhow::anyhow!("not a domain: {d:?}"))
                })
                .transpose()?;
            let waiting = client
                .list_waiting(v1::ListWaitingRequest {
                    queue_id: String::new(),
                    limit: 0,
                    headers: false,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .messages;
            // The storage service lists at most this many at once (next due first).
            let listed = waiting.len();
            let mut due = 0;
            for m in waiting {
                let wanted = domain.as_ref().is_none_or(|d| {
                    m.recipients.iter().any(|r| {
                        r.rsplit_once('@')
                            .is_some_and(|(_, at)| at.eq_ignore_ascii_case(d))
                    })
                });
                if !wanted {
                    continue;
                }
                match client
                    .retry_waiting(v1::QueueIdRequest {
                        queue_id: m.queue_id.clone(),
                    })
                    .await
                {
                    Ok(_) => due += 1,
                    // Taken by a worker since the listing: already being tried.
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => return Err(refused(status)),
                }
            }
            let more = if listed >= 1000 {
                " (of the first 1000 listed: run it again for the rest once they are sent)"
            } else {
                ""
            };
            done(&target, format!("{due} waiting message(s) due now{more}"));
        }
        QueueCommand::Delete { queue_id } => {
            client
                .delete_waiting(v1::QueueIdRequest {
                    queue_id: queue_id.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("{queue_id} deleted"));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user (and their INBOX, Sent, Drafts, Trash, Junk, Archive).
    Add {
        address: String,
        /// Read the password from the first line of standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Mailbox quota in bytes.
        #[arg(long)]
        quota: Option<u64>,
    },
    /// Set a user's password.
    Passwd {
        address: String,
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Stop a user from logging in (mail is still delivered).
    Disable {
        address: String,
    },
    Enable {
        address: String,
    },
    /// Set (or with no BYTES, remove) a user's quota.
    Quota {
        address: String,
        bytes: Option<u64>,
    },
    /// Remove a user and all their mail.
    Remove {
        address: String,
    },
    /// List a tenant's users.
    List {
        tenant: String,
    },
}

#[derive(Subcommand)]
pub enum AliasCommand {
    /// Deliver mail for ADDRESS to each TARGET (local or remote addresses).
    Add {
        address: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Remove an alias.
    Remove { address: String },
    /// List a tenant's aliases.
    List { tenant: String },
}

#[derive(Subcommand)]
pub enum QuotaCommand {
    /// Show a user's usage and limit.
    Show { address: String },
}

#[derive(Subcommand)]
pub enum MailboxCommand {
    /// List a user's mailboxes with message counts.
    List { address: String },
}

async fn channel(target: &Target) -> anyhow::Result<Channel> {
    use mailmesh_kit::internal::{InternalTls, Role};
    let url = &target.endpoint;
    let endpoint = Some(url)
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .and_then(|u| tonic::transport::Endpoint::from_shared(u.clone()).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--endpoint {:?} is not a URL such as https://127.0.0.1:7001",
                target.endpoint
            )
        })?
        .connect_timeout(std::time::Duration::from_secs(10));
    let config = target.tls_config();
    let tls = InternalTls::load(&config, Role::Admin).with_context(|| {
        format!(
            "loading the admin identity ({}, {}, {}); give --pki-dir, or --cert, --key and --ca (MAILCTL_PKI_DIR, MAILCTL_CERT …); `mailctl dev` writes one to mailmesh-data/pki",
            config.cert_file.display(),
            config.key_file.display(),
            config.ca_file.display()
        )
    })?;
    tls.connect(endpoint, Role::Storage).await.with_context(|| {
        format!(
            "connecting to {} (is `mailctl dev` running? is the admin certificate from its CA?)",
            target.endpoint
        )
    })
}

async fn directory(target: &Target) -> anyhow::Result<DirectoryClient<Channel>> {
    Ok(DirectoryClient::new(channel(target).await?))
}

async fn outbound_queue(target: &Target) -> anyhow::Result<OutboundQueueClient<Channel>> {
    Ok(OutboundQueueClient::new(channel(target).await?))
}

async fn mailboxes(target: &Target) -> anyhow::Result<MailboxesClient<Channel>> {
    Ok(MailboxesClient::new(channel(target).await?))
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(password)
}

/// A refused request: the server's message, without gRPC noise.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::ResourceExhausted => "over limit",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

fn done(target: &Target, what: String) {
    if target.json {
        out!("{}", json!({ "ok": true }));
    } else {
        out!("{what}");
    }
}

fn user_json(u: &v1::UserInfo) -> serde_json::Value {
    let user = u.user.clone().unwrap_or_default();
    json!({
        "address": u.address,
        "tenant": user.tenant,
        "user_id": user.user_id,
        "quota_bytes": (u.quota_bytes != 0).then_some(u.quota_bytes),
        "enabled": u.enabled,
    })
}

pub async fn tenant(target: Target, command: TenantCommand) -> anyhow::Result<()> {
    let mut client = directory(&target).await?;
    match command {
        TenantCommand::Add { tenant, limits } => {
            client
                .add_tenant(v1::AddTenantRequest {
                    tenant: tenant.clone(),
                    limits: Some(limits.proto()),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("tenant {tenant} added"));
        }
        TenantCommand::Limits { tenant, limits } => {
            client
                .set_tenant_limits(v1::AddTenantRequest {
                    tenant: tenant.clone(),
                    limits: Some(limits.proto()),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("limits of tenant {tenant} set"));
        }
        TenantCommand::Policy {
            tenant,
            dmarc_reject,
            dmarc_quarantine,
            block_listed,
        } => {
            let d = InboundPolicy::default();
            let policy = InboundPolicy {
                dmarc_reject: dmarc_reject.unwrap_or(d.dmarc_reject),
                dmarc_quarantine: dmarc_quarantine.unwrap_or(d.dmarc_quarantine),
                block_listed: block_listed.unwrap_or(d.block_listed),
            };
            client
                .set_inbound_policy(v1::SetInboundPolicyRequest {
                    tenant: tenant.clone(),
                    policy: Some(policy.into()),
                })
                .await
                .map_err(refused)?;
            done(
                &target,
                format!(
                    "inbound policy of tenant {tenant}: dmarc p=reject -> {}, \
                     p=quarantine -> {}, block-listed -> {}",
                    policy.dmarc_reject, policy.dmarc_quarantine, policy.block_listed
                ),
            );
        }
        TenantCommand::HideClient { tenant, setting } => {
            let hide_client = setting == "on";
            client
                .set_hide_client(v1::SetHideClientRequest {
                    tenant: tenant.clone(),
                    hide_client,
                })
                .await
                .map_err(refused)?;
            done(
                &target,
                format!(
                    "tenant {tenant}: the sender's client is {} in Received headers",
                    if hide_client { "left out" } else { "shown" }
                ),
            );
        }
        TenantCommand::Remove { tenant } => {
            client
                .remove_tenant(v1::TenantRequest {
                    tenant: tenant.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("tenant {tenant} removed"));
        }
        TenantCommand::List => {
            let tenants = client
                .list_tenants(v1::Empty {})
                .await
                .map_err(refused)?
                .into_inner()
                .tenants;
            if target.json {
                let list: Vec<_> = tenants
                    .iter()
                    .map(|t| {
                        let l = t.limits.unwrap_or_default();
                        let p = InboundPolicy::from(t.inbound_policy.unwrap_or_default());
                        json!({
                            "tenant": t.tenant,
                            "domains": t.domains,
                            "users": t.users,
                            "limits": {
                                "max_users": (l.max_users != 0).then_some(l.max_users),
                                "max_storage_bytes": (l.max_storage_bytes != 0).then_some(l.max_storage_bytes),
                                "max_message_bytes": (l.max_message_bytes != 0).then_some(l.max_message_bytes),
                                "send_rate_per_hour": (l.send_rate_per_hour != 0).then_some(l.send_rate_per_hour),
                            },
                            "inbound_policy": {
                                "dmarc_reject": p.dmarc_reject.to_string(),
                                "dmarc_quarantine": p.dmarc_quarantine.to_string(),
                                "block_listed": p.block_listed.to_string(),
                            },
                            "hide_client": t.hide_client,
                        })
                    })
                    .collect();
                out!("{}", serde_json::Value::Array(list));
            } else {
                for t in tenants {
                    let l = t.limits.unwrap_or_default();
                    let limit = |name: &str, v: u64| (v != 0).then(|| format!(" {name} {v}"));
                    let limits: String = [
                        limit("max-users", l.max_users.into()),
                        limit("max-storage-bytes", l.max_storage_bytes),
                        limit("max-message-bytes", l.max_message_bytes),
                        limit("send-rate-per-hour", l.send_rate_per_hour.into()),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    out!(
                        "{:<24} users {:<6} domains {}{}",
                        t.tenant,
                        t.users,
                        t.domains.join(","),
                        if limits.is_empty() {
                            String::new()
                        } else {
                            format!("  limits:{limits}")
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn domain(target: Target, command: DomainCommand) -> anyhow::Result<()> {
    let mut client = directory(&target).await?;
    match command {
        DomainCommand::Add { tenant, domain } => {
            client
                .add_domain(v1::DomainRequest {
                    tenant: tenant.clone(),
                    domain: domain.clone(),
                    user: None,
                })
                .await
                .map_err(refused)?;
            done(&target, format!("domain {domain} added to tenant {tenant}"));
        }
        DomainCommand::Remove { tenant, domain } => {
            client
                .remove_domain(v1::DomainRequest {
                    tenant,
                    domain: domain.clone(),
                    user: None,
                })
                .await
                .map_err(refused)?;
            done(&target, format!("domain {domain} removed"));
        }
        DomainCommand::CatchAll { domain, target: to } => {
            client
                .set_catch_all(v1::SetCatchAllRequest {
                    domain: domain.clone(),
                    target: to.clone().unwrap_or_default(),
                })
                .await
                .map_err(refused)?;
            let what = match to {
                Some(t) => format!("unknown addresses of {domain} go to {t}"),
                None => format!("catch-all of {domain} removed"),
            };
            done(&target, what);
        }
    }
    Ok(())
}

pub async fn user(target: Target, command: UserCommand) -> anyhow::Result<()> {
    let mut client = directory(&target).await?;
    match command {
        UserCommand::Add { address, quota, .. } => {
            let password = read_password()?;
            let info = client
                .add_user(v1::AddUserRequest {
                    address,
                    password,
                    quota_bytes: quota.unwrap_or(0),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if target.json {
                out!("{}", user_json(&info));
            } else {
                out!("user {} added", info.address);
            }
        }
        UserCommand::Passwd { address, .. } => {
            let password = read_password()?;
            client
                .set_password(v1::SetPasswordRequest {
                    address: address.clone(),
                    password,
                })
                .await
                .map_err(refused)?;
            done(&target, format!("password of {address} changed"));
        }
        UserCommand::Disable { address } => {
            client
                .set_enabled(v1::SetEnabledRequest {
                    address: address.clone(),
                    enabled: false,
                })
                .await
                .map_err(refused)?;
            done(&target, format!("user {address} disabled"));
        }
        UserCommand::Enable { address } => {
            client
                .set_enabled(v1::SetEnabledRequest {
                    address: address.clone(),
                    enabled: true,
                })
                .await
                .map_err(refused)?;
            done(&target, format!("user {address} enabled"));
        }
        UserCommand::Quota { address, bytes } => {
            client
                .set_quota(v1::SetQuotaRequest {
                    address: address.clone(),
                    quota_bytes: bytes.unwrap_or(0),
                })
                .await
                .map_err(refused)?;
            done(
                &target,
                match bytes {
                    Some(bytes) => format!("quota of {address} set to {bytes} bytes"),
                    None => format!("quota of {address} removed"),
                },
            );
        }
        UserCommand::Remove { address } => {
            client
                .remove_user(v1::AddressRequest {
                    address: address.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("user {address} removed"));
        }
        UserCommand::List { tenant } => {
            let users = client
                .list_users(v1::TenantRequest { tenant })
                .await
                .map_err(refused)?
                .into_inner()
                .users;
            if target.json {
                out!(
                    "{}",
                    serde_json::Value::Array(users.iter().map(user_json).collect())
                );
            } else {
                for u in users {
                    let quota = match u.quota_bytes {
                        0 => "unlimited".to_owned(),
                        q => format!("{q} bytes"),
                    };
                    let state = if u.enabled { "enabled" } else { "disabled" };
                    out!("{:<40} {state:<9} quota {quota}", u.address);
                }
            }
        }
    }
    Ok(())
}

pub async fn alias(target: Target, command: AliasCommand) -> anyhow::Result<()> {
    let mut client = directory(&target).await?;
    match command {
        AliasCommand::Add { address, targets } => {
            client
                .add_alias(v1::AddAliasRequest {
                    address: address.clone(),
                    targets: targets.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("{address} -> {}", targets.join(", ")));
        }
        AliasCommand::Remove { address } => {
            client
                .remove_alias(v1::AddressRequest {
                    address: address.clone(),
                })
                .await
                .map_err(refused)?;
            done(&target, format!("alias {address} removed"));
        }
        AliasCommand::List { tenant } => {
            let aliases = client
                .list_aliases(v1::TenantRequest { tenant })
                .await
                .map_err(refused)?
                .into_inner()
                .aliases;
            if target.json {
                let list: Vec<_> = aliases
                    .iter()
                    .map(|a| json!({ "address": a.address, "targets": a.targets }))
                    .collect();
                out!("{}", serde_json::Value::Array(list));
            } else {
                for a in aliases {
                    out!("{:<40} -> {}", a.address, a.targets.join(", "));
                }
            }
        }
    }
    Ok(())
}

async fn user_ref(target: &Target, address: &str) -> anyhow::Result<v1::UserRef> {
    let info = directory(target)
        .await?
        .get_user(v1::AddressRequest {
            address: address.to_owned(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    info.user.context("the server named no user")
}

pub async fn mailbox(target: Target, command: MailboxCommand) -> anyhow::Result<()> {
    let MailboxCommand::List { address } = command;
    let user = user_ref(&target, &address).await?;
    let list = mailboxes(&target)
        .await?
        .list_mailboxes(user)
        .await
        .map_err(refused)?
        .into_inner()
        .mailboxes;
    if target.json {
        let list: Vec<_> = list
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "special_use": (!m.special_use.is_empty()).then_some(&m.special_use),
                    "messages": m.messages,
                    "unseen": m.unseen,
                    "uid_validity": m.uid_validity,
                    "uid_next": m.uid_next,
                    "size": m.size,
                })
            })
            .collect();
        out!("{}", serde_json::Value::Array(list));
    } else {
        for m in list {
            out!(
                "{:<24} {:<10} messages {:<6} unseen {:<6} bytes {}",
                m.name,
                m.special_use,
                m.messages,
                m.unseen,
                m.size
            );
        }
    }
    Ok(())
}

pub async fn quota(target: Target, command: QuotaCommand) -> anyhow::Result<()> {
    let QuotaCommand::Show { address } = command;
    let user = user_ref(&target, &address).await?;
    let quota = mailboxes(&target)
        .await?
        .quota(user)
        .await
        .map_err(refused)?
        .into_inner();
    let limit = (quota.limit_bytes != 0).then_some(quota.limit_bytes);
    if target.json {
        out!(
            "{}",
            json!({ "address": address, "used_bytes": quota.used_bytes, "limit_bytes": limit })
        );
    } else {
        match limit {
            Some(l) => out!("{address}: {} of {l} bytes used", quota.used_bytes),
            None => out!("{address}: {} bytes used (no quota)", quota.used_bytes),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::zone_strings;

    #[test]
    fn long_txt_values_are_split_into_character_strings() {
        assert_eq!(zone_strings("v=DKIM1; p=abc"), "\"v=DKIM1; p=abc\"");
        let long = format!("v=DKIM1; k=rsa; p={}", "A".repeat(400));
        let split = zone_strings(&long);
        let pieces: Vec<&str> = split.split('"').skip(1).step_by(2).collect();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].len(), 255);
        assert_eq!(pieces.concat(), long);
    }
}
