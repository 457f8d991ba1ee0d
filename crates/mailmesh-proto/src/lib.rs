//! mailmesh's protocol buffers, compiled from `proto/` by `build.rs`, and their
//! conversions into validated domain types.
//!
//! Business code never handles the generated types: a decoded [`v1::QueueRecord`] is
//! turned into a [`mailmesh_types::Envelope`] with `TryFrom`, which refuses anything
//! that does not validate, and [`encode_envelope`] is the only way back.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("mailmesh.v1");
}

/// Response metadata of the storage service's mailbox calls: `<user id> <position>`,
/// how far the answering replica had applied that user's log. Callers send the
/// highest they have seen back in `UserRef.position`.
pub const POSITION_METADATA: &str = "mailmesh-position";

/// Request metadata of a mailbox write: the caller's id for it (a UUID), the same
/// on every attempt. Storage applies a request once; a repeat gets the first
/// outcome (`services/storage/src/request.rs`).
pub const REQUEST_ID_METADATA: &str = "mailmesh-request-id";

mod policy;
mod queue;

pub use queue::{InvalidRecord, decode_envelope, encode_envelope};
