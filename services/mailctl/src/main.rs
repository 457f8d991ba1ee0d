//! `mailctl`: the mailmesh admin CLI, and `mailctl dev`, which runs the whole platform
//! in one process on embedded backends.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every mailmesh service in this process on embedded backends (local log,
    /// local object store, in-process cache). Stops cleanly on Ctrl-C or SIGTERM.
    Dev(DevArgs),
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Dev(args) => runtime.block_on(dev::run(args)),
    }
}
