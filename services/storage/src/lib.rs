//! The storage service: mailmesh's system of record.
//!
//! - [`directory`]: tenants, domains, users, aliases and limits;
//! - [`index`]: per-user mailboxes, UIDs, flags, MODSEQ, expunge log and quota usage.
//!
//! Both are deterministic state machines: a command log (Kafka, or the embedded log)
//! orders commands, and every replica applies them to the same state
//! (docs/adr/0001-mailbox-index.md). Nothing in these modules does I/O.

pub mod client;
pub mod cluster;
pub mod directory;
pub mod engine;
pub mod forward;
pub mod grpc;
pub mod index;
pub mod index_store;
mod metrics;
pub mod owners;
pub mod password_policy;
pub mod passwords;
pub mod replica;
pub mod request;
pub mod retry_index;
pub mod sealed;
pub mod server;
pub mod session;
pub mod sweep;
pub mod testing;

/// Why a command was refused. Each variant maps to one gRPC status and, at the front
/// doors, to one SMTP/IMAP reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum StorageError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request conflicts with the current state (a domain still has users, …).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Over a quota or limit; `permanent` when the message could never fit.
    #[error("over quota: {reason}")]
    OverQuota { reason: String, permanent: bool },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A failure of the storage engine: a refused request, or a backend that did not
/// answer (which front doors report as temporary: `451 4.3.0`, `NO [UNAVAILABLE]`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Refused(#[from] StorageError),
    #[error("queue: {0}")]
    Queue(#[from] mailmesh_queue::QueueError),
    #[error("object store: {0}")]
    Objects(#[from] mailmesh_objstore::object_store::Error),
    #[error("object store: {0}")]
    Body(#[from] mailmesh_objstore::ObjectStoreError),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("undecodable stored data: {0}")]
    Codec(String),
    /// Another replica applies this mailbox partition (ADR 0005 §1): the call is
    /// routed there.
    #[error("mailbox partition {0} is served by another replica")]
    NotOwner(i32),
}
