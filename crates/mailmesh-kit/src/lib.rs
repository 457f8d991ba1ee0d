//! What every mailmesh service stands on: typed configuration, telemetry, the admin
//! port (`/livez`, `/readyz`, `/metrics`), graceful shutdown, reloadable TLS and the
//! PROXY protocol of the load balancers in front of the mail ports.

pub mod admin;
pub mod config;
pub mod dns;
pub mod grpc;
pub mod health;
pub mod internal;
pub mod io;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use config::{ConfigError, ConfigSource};
pub use health::{Health, ReadinessCheck};
pub use secret::Secret;
pub use shutdown::Shutdown;

/// Every mailmesh process allocates with jemalloc (any binary linking this crate).
/// glibc's allocator raises its mmap threshold each time a large block is freed, after
/// which large buffers — Argon2's 19 MiB per password check, message bodies — are
/// carved from per-thread arenas and kept: `mailctl dev` held 288 MB after 16 IMAP
/// logins, 22 MB with the threshold pinned (`loadtest/imap-idle.sh`). jemalloc returns
/// freed pages on its own and fragments less under many threads.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
