//! `mailctl cluster`: the identity storage checks between its directory log and the
//! bucket (`mailmesh_storage::cluster`). Run with storage's own configuration file:
//! storage need not (and, when the two disagree, cannot) be running.

use std::path::PathBuf;

use anyhow::Context;
use mailmesh_storage::cluster;

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// The cluster the bucket names for storage's directory log.
    Show(StorageConfig),
    /// Start storage's directory log afresh as the bucket's cluster, after it was
    /// emptied or replaced and you chose not to restore it: appends the bucket's
    /// identity to the log, and storage then starts on it. Nothing the lost log
    /// held comes back (tenants, domains and users must be added again; mail in the
    /// bucket stays where it is).
    Adopt(StorageConfig),
}

#[derive(clap::Args)]
pub struct StorageConfig {
    /// The storage service's configuration file (TOML) as its pods use it;
    /// `MAILMESH_*` environment variables override it.
    #[arg(long)]
    config: PathBuf,
}

fn load(args: &StorageConfig) -> anyhow::Result<mailmesh_storage::server::ServiceConfig> {
    mailmesh_kit::ConfigSource::from_process()
        .with_file(&args.config)
        .load()
        .with_context(|| format!("reading {}", args.config.display()))
}

pub async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Show(args) => {
            let config = load(&args)?;
            let objects = mailmesh_objstore::open(&config.object_store)
                .context("opening the object store")?;
            let topic = &config.storage.directory_topic;
            match cluster::marked(&*objects, topic).await? {
                Some(id) => println!("{id}"),
                None => println!("none (the bucket names no cluster for the log {topic})"),
            }
        }
        ClusterCommand::Adopt(args) => {
            let config = load(&args)?;
            let objects = mailmesh_objstore::open(&config.object_store)
                .context("opening the object store")?;
            let queue = mailmesh_queue::open(&config.queue)
                .await
                .context("opening the queue")?;
            let topic = &config.storage.directory_topic;
            let (id, offset) = cluster::adopt(&*queue, &*objects, topic).await?;
            println!(
                "the directory log {topic} now belongs to cluster {id} (record at offset {offset}); storage starts on it"
            );
        }
    }
    Ok(())
}
