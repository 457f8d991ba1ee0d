//! The cluster identity (issue 20, defect 5): a directory log and a bucket serve
//! together only when they belong to one cluster.
//!
//! The bucket holds the mail; the logs hold the newest state. A replica that
//! started against an emptied log (topics deleted, a new broker) used to serve an
//! empty directory as ready, and the MX then refused every local domain with `550
//! 5.7.1 Relaying denied`, permanently. Now a new cluster writes an identity into
//! both: first an `Identify` record in its directory log, then the object
//! `cluster/<directory topic>` in the bucket. At every start the two must agree; a
//! replica whose log does not know the bucket's cluster (emptied, or another
//! cluster's), or names another one, refuses to start, so front doors answer `451`
//! (storage unreachable), never 5xx. A state restored from a checkpoint or the
//! pod's disk that is ahead of its log's end is refused too ([`crate::replica`]),
//! where the queue reports that end (`Queue::end_offset`: the embedded log; the
//! Kafka queue does not implement it yet).
//!
//! An operator who means to start the log afresh for the bucket's cluster (after
//! restoring it, or accepting what the bucket alone holds) says so with `mailctl
//! cluster adopt`, which appends the bucket's identity to the log ([`adopt`]).

use std::sync::Arc;

use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use mailmesh_queue::Queue;
use uuid::Uuid;

use crate::EngineError;
use crate::directory::{Directory, DirectoryCommand};
use crate::replica::Replica;

/// Where the bucket names the cluster of the directory log `topic`.
pub fn marker_path(topic: &str) -> Path {
    Path::from(format!("cluster/{topic}"))
}

/// The cluster the bucket names for the directory log `topic`, if any.
pub async fn marked(objects: &dyn ObjectStore, topic: &str) -> Result<Option<Uuid>, EngineError> {
    let path = marker_path(topic);
    let bytes = match objects.get(&path).await {
        Ok(found) => found.bytes().await?,
        Err(mailmesh_objstore::object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let text = std::str::from_utf8(&bytes).unwrap_or_default().trim();
    Uuid::try_parse(text)
        .map(Some)
        .map_err(|_| EngineError::Codec(format!("{path}: not a cluster identity")))
}

async fn mark(objects: &dyn ObjectStore, topic: &str, cluster: Uuid) -> Result<(), EngineError> {
    objects
        .put(
            &marker_path(topic),
            PutPayload::from(format!("{cluster}\n").into_bytes()),
        )
        .await?;
    Ok(())
}

/// Checks (and for a new cluster, writes) the identity at start; the directory
/// replica has applied its whole log. Returns the cluster's identity.
pub(crate) async fn check(
    directory: &Replica<Directory>,
    objects: &Arc<dyn ObjectStore>,
    topic: &str,
) -> Result<Uuid, EngineError> {
    let in_bucket = marked(&**objects, topic).await?;
    // The bucket is written after the log: the record of an identity another
    // replica has just marked is in the log before this barrier.
    directory.sync().await?;
    let in_log = directory.read(Directory::cluster)?;
    match (in_log, in_bucket) {
        (Some(log), Some(bucket)) if log == bucket => Ok(log),
        (Some(log), Some(bucket)) => Err(EngineError::Unavailable(format!(
            "the directory log {topic} belongs to cluster {log}, but the bucket's {} names cluster {bucket}: they are not one cluster's, and storage will not serve them together",
            marker_path(topic)
        ))),
        (None, Some(bucket)) => Err(EngineError::Unavailable(format!(
            "the directory log {topic} does not know cluster {bucket}, which the bucket's {} names: the log was emptied or is another cluster's. Storage will not serve an empty directory over the mail the bucket holds; restore the log, or start it afresh for this bucket with `mailctl cluster adopt --config <storage.toml>`",
            marker_path(topic)
        ))),
        // The log first: a crash before the bucket is written leaves this case,
        // and the next start finishes it.
        (Some(log), None) => {
            mark(&**objects, topic, log).await?;
            tracing::info!(cluster = %log, "the bucket now names this cluster");
            Ok(log)
        }
        (None, None) => {
            match directory
                .submit(DirectoryCommand::Identify {
                    cluster: Uuid::new_v4(),
                })
                .await
            {
                // Refused: another replica starting at once identified it first.
                Ok(_) | Err(EngineError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
            let cluster = directory.read(Directory::cluster)?.ok_or_else(|| {
                EngineError::Unavailable("the cluster identity was not applied".into())
            })?;
            mark(&**objects, topic, cluster).await?;
            tracing::info!(%cluster, "a new cluster: its identity is in the directory log and the bucket");
            Ok(cluster)
        }
    }
}

/// `mailctl cluster adopt`: appends the identity the bucket names to the directory
/// log `topic` (which storage has created: it refuses after creating its topics),
/// so storage starts on that log as the bucket's cluster. A log that already
/// belongs to another cluster ignores it (and storage keeps refusing). Returns the
/// identity and the record's offset.
pub async fn adopt(
    queue: &dyn Queue,
    objects: &dyn ObjectStore,
    topic: &str,
) -> Result<(Uuid, i64), EngineError> {
    let cluster = marked(objects, topic).await?.ok_or_else(|| {
        EngineError::Unavailable(format!(
            "the bucket names no cluster for {topic} ({} is missing): storage identifies a new cluster by itself",
            marker_path(topic)
        ))
    })?;
    let offset =
        crate::replica::append_only(queue, topic, 0, DirectoryCommand::Identify { cluster })
            .await?;
    Ok((cluster, offset))
}
