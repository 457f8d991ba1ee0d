//! `mailctl`: the mailmesh admin CLI, and `mailctl dev`, which runs the whole platform
//! in one process on embedded backends.

mod admin;
mod cluster;
mod dev;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mailctl",
    version,
    about = "mailmesh admin CLI and dev platform"
)]
struct Cli {
    #[command(flatten)]
    target: admin::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every mailmesh service in this process on embedded backends (local log,
    /// local object store, in-process cache). Stops cleanly on Ctrl-C or SIGTERM.
    Dev(DevArgs),
    /// Tenants: add, list, limits, remove.
    #[command(subcommand)]
    Tenant(admin::TenantCommand),
    /// Domains: add, remove, catch-all.
    #[command(subcommand)]
    Domain(admin::DomainCommand),
    /// DKIM signing keys: generate (prints the DNS record), list, remove.
    #[command(subcommand)]
    Dkim(admin::DkimCommand),
    /// Mail waiting for a retry (local or outbound): list, show, retry, delete.
    #[command(subcommand)]
    Queue(admin::QueueCommand),
    /// Users: add, passwd, disable, enable, quota, remove, list.
    #[command(subcommand)]
    User(admin::UserCommand),
    /// Aliases: add, remove, list.
    #[command(subcommand)]
    Alias(admin::AliasCommand),
    /// Quota usage.
    #[command(subcommand)]
    Quota(admin::QuotaCommand),
    /// A user's mailboxes.
    #[command(subcommand)]
    Mailbox(admin::MailboxCommand),
    /// Certificates for mutual TLS between the services (without cert-manager or
    /// the chart): an internal CA and one certificate per role.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The cluster identity storage checks between its directory log and the
    /// bucket: show it, or adopt an emptied log (with storage's configuration file).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Write a new internal CA (`ca.crt`, `ca.key`) and a certificate for each role
    /// (`<role>.crt`, `<role>.key`: admin, storage, auth-check, smtp-ingress,
    /// submission, delivery-worker, gateway) into DIR.
    Init {
        dir: PathBuf,
        /// Replace a CA already in DIR (every service then needs the new files).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
pub struct DevArgs {
    /// Configuration file (TOML); `MAILMESH_*` environment variables override it.
    #[arg(long, env = "MAILMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Where the queue log, objects and certificate live [default: ./mailmesh-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin port address (`/livez`, `/readyz`, `/metrics`) [default: 127.0.0.1:9090].
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, each cause once: what an operator needs,
            // no backtrace.
            let mut message = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !message.contains(&text) {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&text);
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn pki_init(dir: &std::path::Path, force: bool) -> anyhow::Result<()> {
    if dir.join("ca.crt").exists() && !force {
        anyhow::bail!(
            "{} already holds a CA; --force replaces it (and every certificate)",
            dir.display()
        );
    }
    mailmesh_kit::internal::write_pki(dir)?;
    println!(
        "wrote an internal CA and certificates for {} to {}",
        mailmesh_kit::internal::Role::ALL
            .map(|r| r.name())
            .join(", "),
        dir.display()
    );
    println!("keep ca.key offline; each service needs its <role>.crt, <role>.key and ca.crt");
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let target = cli.target;
    runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Tenant(c) => admin::tenant(target, c).await,
            Command::Domain(c) => admin::domain(target, c).await,
            Command::Dkim(c) => admin::dkim(target, c).await,
            Command::Queue(c) => admin::queue(target, c).await,
            Command::User(c) => admin::user(target, c).await,
            Command::Alias(c) => admin::alias(target, c).await,
            Command::Quota(c) => admin::quota(target, c).await,
            Command::Mailbox(c) => admin::mailbox(target, c).await,
            Command::Pki(PkiCommand::Init { dir, force }) => pki_init(&dir, force),
            Command::Cluster(c) => cluster::run(c).await,
        }
    })
}
