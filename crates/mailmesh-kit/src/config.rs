//! Typed configuration read from a TOML file and `MAILMESH_*` environment variables.
//!
//! Environment variables override the file: `MAILMESH_ADMIN__LISTEN=0.0.0.0:9090` sets
//! `admin.listen` (a double underscore separates levels). The environment is injected
//! through [`ConfigSource`], so tests pass their own variables instead of touching the
//! process environment. Loading deserialises into the service's config type and then
//! runs its [`Validate`] checks; either failure names the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The prefix every environment variable mailmesh reads carries.
pub const ENV_PREFIX: &str = "MAILMESH_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value has the wrong type or syntax; the message names the key and its source.
    #[error("configuration: {0}")]
    Parse(String),
    /// A value parsed but is not acceptable.
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The command line is not what the binary takes.
    #[error("{0}")]
    Usage(String),
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Checks a configuration beyond what its types express, at start-up.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Where configuration comes from: an optional file and a set of environment variables.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl ConfigSource {
    /// The process environment, and the file named by `MAILMESH_CONFIG` if set.
    pub fn from_process() -> Self {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let file = env
            .iter()
            .find(|(k, _)| k == "MAILMESH_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        Self { file, env }
    }

    pub fn with_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    pub fn with_env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    pub fn with_var(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Reads, deserialises and validates a configuration of type `T`.
    pub fn load<T: DeserializeOwned + Validate>(&self) -> Result<T, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = &self.file {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.clone(),
                    reason: "not found or not a file".into(),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvVars(&self.env));
        let config: T = figment.extract_lossy().map_err(|e| {
            let errors: Vec<String> = e.into_iter().map(describe).collect();
            ConfigError::Parse(errors.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }
}

/// "key `admin.listen` (environment variable MAILMESH_ADMIN__LISTEN): …"
fn describe(e: figment::Error) -> String {
    let key = e.path.join(".");
    let source = match &e.metadata {
        Some(m) if m.name == ENV_METADATA => {
            format!(
                " (environment variable {ENV_PREFIX}{})",
                key.replace('.', "__").to_uppercase()
            )
        }
        Some(m) => m
            .source
            .as_ref()
            .map(|s| format!(" (in {s})"))
            .unwrap_or_default(),
        None => String::new(),
    };
    if key.is_empty() {
        format!("{}{source}", e.kind)
    } else {
        format!("key `{key}`{source}: {}", e.kind)
    }
}

const ENV_METADATA: &str = "environment variable";

/// The `MAILMESH_*` variables of a [`ConfigSource`] as a figment provider.
struct EnvVars<'a>(&'a [(String, String)]);

impl Provider for EnvVars<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_METADATA)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in self.0 {
            let Some(path) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if path == "CONFIG" || path.is_empty() {
                continue;
            }
            let path = path.to_lowercase().replace("__", ".");
            // Structured values (`[25, 587]`) are parsed; scalars stay strings and are
            // converted to the field's type by `extract_lossy`, so `MAILMESH_NAME=12345`
            // still fills a string field.
            let value = match value.parse::<Value>() {
                Ok(v @ (Value::Array(..) | Value::Dict(..))) => v,
                _ => Value::from(value.clone()),
            };
            let nested = figment::util::nest(&path, value);
            if let Value::Dict(_, d) = nested {
                merge_dict(&mut dict, d);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn merge_dict(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Dict(_, a)), Value::Dict(_, b)) => merge_dict(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The admin HTTP port every service exposes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// How a service stops on SIGTERM (see [`crate::shutdown`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Readiness fails this long before listeners close, so load balancers and
    /// Kubernetes endpoints stop sending new connections first.
    #[serde(with = "humantime_serde")]
    pub readiness_grace: Duration,
    /// How long open sessions get to finish before they are cut.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_grace: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Validate for ShutdownConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.drain_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "shutdown.drain_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Parses a human duration (`30s`, `5m`) from a config value.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime_serde::re::humantime::parse_duration(value)
        .map_err(|e| ConfigError::invalid(key, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        admin: AdminConfig,
        shutdown: ShutdownConfig,
        name: String,
        ports: Vec<u16>,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            self.shutdown.validate()
        }
    }

    #[test]
    fn defaults_file_and_env_layer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mailmesh.toml");
        std::fs::write(
            &file,
            "name = \"from-file\"\n[admin]\nlisten = \"127.0.0.1:1\"\n[shutdown]\ndrain_timeout = \"10s\"\n",
        )
        .unwrap();
        let cfg: Sample = ConfigSource::default()
            .with_file(&file)
            .with_var("MAILMESH_ADMIN__LISTEN", "127.0.0.1:9999")
            .with_var("MAILMESH_PORTS", "[25, 587]")
            .with_var("OTHER_THING", "ignored")
            .load()
            .unwrap();
        assert_eq!(cfg.name, "from-file");
        assert_eq!(cfg.admin.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(cfg.shutdown.drain_timeout, Duration::from_secs(10));
        assert_eq!(cfg.shutdown.readiness_grace, Duration::from_secs(5));
        assert_eq!(cfg.ports, [25, 587]);
    }

    #[test]
    fn numeric_looking_env_value_into_a_string_field() {
        let cfg: Sample = ConfigSource::default()
            .with_var("MAILMESH_NAME", "12345")
            .load()
            .unwrap();
        assert_eq!(cfg.name, "12345");
    }

    #[test]
    fn bad_value_names_the_key_and_the_variable() {
        let err = ConfigSource::default()
            .with_var("MAILMESH_ADMIN__LISTEN", "not-an-address")
            .load::<Sample>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.listen"), "{err}");
        assert!(err.contains("MAILMESH_ADMIN__LISTEN"), "{err}");

        let err = ConfigSource::default()
            .with_var("MAILMESH_SHUTDOWN__DRAIN_TIMEOUT", "soon")
            .load::<Sample>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("shutdown.drain_timeout"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = ConfigSource::default()
            .with_var("MAILMESH_ADMIN__LISTNE", "127.0.0.1:1")
            .load::<Sample>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn validation_failure_names_the_key() {
        let err = ConfigSource::default()
            .with_var("MAILMESH_SHUTDOWN__DRAIN_TIMEOUT", "0s")
            .load::<Sample>()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "configuration key `shutdown.drain_timeout`: must be greater than zero"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = ConfigSource::default()
            .with_file("/nonexistent/mailmesh.toml")
            .load::<Sample>()
            .unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }));
    }
}
