//! What every service binary does around its own work: telemetry, the admin port,
//! health, and the SIGTERM drain.

use std::net::SocketAddr;

use tokio::task::JoinHandle;

use crate::admin::AdminServer;
use crate::config::{AdminConfig, ShutdownConfig};
use crate::telemetry::{TelemetryConfig, TelemetryError, TelemetryGuard};
use crate::{Health, Shutdown};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("binding the admin port {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin port: {0}")]
    AdminServe(std::io::Error),
}

/// A running service's shared parts. Dependencies register readiness checks on
/// `health`; work is tracked by `shutdown`.
pub struct Service {
    pub shutdown: Shutdown,
    pub health: Health,
    admin: JoinHandle<std::io::Result<()>>,
    _telemetry: TelemetryGuard,
}

impl Service {
    /// Installs telemetry for `name` and opens the admin port.
    pub async fn start(
        name: &'static str,
        admin: &AdminConfig,
        telemetry: &TelemetryConfig,
    ) -> Result<Self, ServiceError> {
        let guard = crate::telemetry::init(name, telemetry)?;
        let shutdown = Shutdown::new();
        let health = Health::new();
        // Live at once, ready only when `run` reaches `wait_and_drain` (its listeners
        // are open by then): a pod gets no traffic while it loads its state.
        health.set_starting();
        let server = AdminServer::bind(admin.listen, health.clone())
            .await
            .map_err(|source| ServiceError::Admin {
                addr: admin.listen,
                source,
            })?;
        let admin = tokio::spawn(server.serve(shutdown.clone()));
        Ok(Self {
            shutdown,
            health,
            admin,
            _telemetry: guard,
        })
    }

    /// Waits for SIGTERM/SIGINT, then drains (readiness off, listeners closed,
    /// sessions finished or cut) and closes the admin port.
    pub async fn wait_and_drain(self, config: &ShutdownConfig) -> Result<(), ServiceError> {
        self.health.set_started();
        crate::shutdown::signal().await;
        self.drain(config).await
    }

    /// Drains now (see [`Self::wait_and_drain`]).
    pub async fn drain(self, config: &ShutdownConfig) -> Result<(), ServiceError> {
        self.health.set_started();
        self.shutdown.drain(&self.health, config).await;
        match self.admin.await {
            Ok(served) => served.map_err(ServiceError::AdminServe),
            Err(e) => Err(ServiceError::AdminServe(std::io::Error::other(e))),
        }
    }
}

/// A service binary's `main`: reads its configuration (file + `MAILMESH_*`), starts
/// the runtime and runs `run` on it. Configuration errors stop it before anything
/// starts, naming the key.
pub fn main<C, F, Fut, E>(run: F) -> Result<(), E>
where
    C: serde::de::DeserializeOwned + crate::config::Validate,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: From<crate::ConfigError> + From<std::io::Error>,
{
    let mut source = crate::ConfigSource::from_process();
    match command_line(std::env::args())? {
        CommandLine::Run { config: Some(file) } => source = source.with_file(file),
        CommandLine::Run { config: None } => {}
        CommandLine::Print(text) => {
            println!("{text}");
            return Ok(());
        }
    }
    let config: C = source.load()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

/// What a service binary's command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum CommandLine {
    /// Run, with this configuration file instead of `MAILMESH_CONFIG`'s.
    Run { config: Option<std::path::PathBuf> },
    /// Print this (help, version) and exit.
    Print(String),
}

fn command_line(args: impl IntoIterator<Item = String>) -> Result<CommandLine, crate::ConfigError> {
    let mut args = args.into_iter();
    let name = args
        .next()
        .as_deref()
        .and_then(|a| {
            std::path::Path::new(a)
                .file_name()?
                .to_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "mailmesh".into());
    let version = format!("{name} {}", env!("CARGO_PKG_VERSION"));
    let usage = format!("usage: {name} [--config FILE]  (--help for more)");
    let mut config = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                return Ok(CommandLine::Print(format!(
                    "{version}: a mailmesh service\n\n\
                     Usage: {name} [--config FILE]\n\n\
                     Configuration comes from FILE (or the file MAILMESH_CONFIG names) and from\n\
                     MAILMESH_* environment variables, which override it; a double underscore\n\
                     separates levels (MAILMESH_ADMIN__LISTEN=0.0.0.0:9090 sets admin.listen).\n\
                     Unknown keys are refused. Keys and defaults: README.md, \"Configuration\".\n\n\
                     Options:\n  \
                     --config FILE  the TOML configuration file\n  \
                     -h, --help     print this and exit\n  \
                     -V, --version  print the version and exit"
                )));
            }
            "-V" | "--version" => return Ok(CommandLine::Print(version)),
            "--config" => match args.next() {
                Some(file) if !file.is_empty() => config = Some(file.into()),
                _ => {
                    return Err(crate::ConfigError::Usage(format!(
                        "--config needs a file; {usage}"
                    )));
                }
            },
            other => match other.strip_prefix("--config=") {
                Some(file) if !file.is_empty() => config = Some(file.into()),
                _ => {
                    return Err(crate::ConfigError::Usage(format!(
                        "unexpected argument {other:?}; {usage}"
                    )));
                }
            },
        }
    }
    Ok(CommandLine::Run { config })
}

#[cfg(test)]
mod tests {
    use super::{CommandLine, command_line};

    fn parse(args: &[&str]) -> Result<CommandLine, String> {
        command_line(args.iter().map(|a| a.to_string())).map_err(|e| e.to_string())
    }

    #[test]
    fn the_command_line_names_a_file_or_asks_for_help() {
        assert_eq!(
            parse(&["/usr/local/bin/storage"]),
            Ok(CommandLine::Run { config: None })
        );
        for args in [
            &["storage", "--config", "/etc/mailmesh/storage.toml"][..],
            &["storage", "--config=/etc/mailmesh/storage.toml"],
        ] {
            assert_eq!(
                parse(args),
                Ok(CommandLine::Run {
                    config: Some("/etc/mailmesh/storage.toml".into())
                })
            );
        }
        let Ok(CommandLine::Print(help)) = parse(&["/usr/local/bin/storage", "--help"]) else {
            panic!("no help");
        };
        assert!(
            help.starts_with("storage 0.") && help.contains("MAILMESH_CONFIG"),
            "{help}"
        );
        assert_eq!(
            parse(&["smtp-ingress", "-V"]),
            Ok(CommandLine::Print(format!(
                "smtp-ingress {}",
                env!("CARGO_PKG_VERSION")
            )))
        );
        let refused = parse(&["storage", "--confg", "x"]).unwrap_err();
        assert!(
            refused.starts_with("unexpected argument \"--confg\"; usage: storage [--config FILE]"),
            "{refused}"
        );
        assert!(
            parse(&["storage", "--config"])
                .unwrap_err()
                .starts_with("--config needs a file")
        );
    }
}
