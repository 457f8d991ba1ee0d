//! Validated mail domain types shared by every mailmesh service.
//!
//! Values of these types are valid by construction: everything that arrives from a
//! client, a queue record or a gRPC call is converted with `FromStr`/`TryFrom` at the
//! edge, so business code never handles raw strings. Identifiers that end up in object
//! keys ([`TenantId`], [`QueueId`]) are restricted to characters that are safe there.

mod address;
mod date;
mod envelope;
mod ids;
mod policy;
pub mod wire;

pub use address::{Domain, EmailAddress, ReversePath};
pub use date::{rfc5322_date, unix_millis};
pub use envelope::{
    BodyRef, BodyType, ClientInfo, DsnNotify, DsnRet, Envelope, EnvelopeLimits, Recipient,
};
pub use ids::{QueueId, TenantId, fnv1a};
pub use policy::{InboundPolicy, PolicyAction};

/// Why a value was refused. The message names what was wrong, in lowercase, and is
/// safe to show to the client that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("invalid tenant id: {0}")]
    TenantId(&'static str),
    #[error("invalid queue id: {0}")]
    QueueId(&'static str),
    #[error("invalid domain: {0}")]
    Domain(&'static str),
    #[error("invalid address: {0}")]
    Address(&'static str),
    #[error("invalid envelope: {0}")]
    Envelope(&'static str),
}
