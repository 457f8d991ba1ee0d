//! Mail waiting for its next delivery attempt: a due-time index in object storage.
//! Each waiting message is one object under `outbound/retry/`, named by its due
//! time (zero-padded milliseconds) so a listing returns them in due order; it
//! holds the queue record and its attempt count. The queue never waits on them:
//! a due entry is published to the outbound topic again and removed.
//!
//! Object storage is where the durable state is (DESIGN invariant 3); the cache
//! only decides which worker re-publishes an entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use mailmesh_proto::{decode_envelope, encode_envelope};
use mailmesh_types::{Envelope, EnvelopeLimits, QueueId};

/// Where the index of mail for other domains lives unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "outbound/retry";
/// Where the index of mail for local mailboxes (a full mailbox, storage not
/// answering) lives unless configured otherwise.
pub const LOCAL_PREFIX: &str = "local/retry";
const MAGIC: &[u8] = b"MMRETRY1 ";

/// A message waiting for another attempt.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub key: String,
    pub due: SystemTime,
    pub queue_id: QueueId,
    /// Attempts made so far.
    pub attempts: u32,
    /// A delay notice went to the sender already.
    pub delay_notified: bool,
    pub envelope: Envelope,
    /// The last temporary failure, for the queue listing.
    pub last_error: String,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn key_for(prefix: &str, due: SystemTime, queue_id: QueueId, attempts: u32) -> String {
    format!("{prefix}/{:013}-{queue_id}-{attempts}", millis(due))
}

/// Parses the due time and queue id out of a key.
fn parse_key(key: &str) -> Option<(SystemTime, QueueId)> {
    let name = key.rsplit('/').next()?;
    let mut parts = name.splitn(3, '-');
    let due: u64 = parts.next()?.parse().ok()?;
    let id: QueueId = parts.next()?.parse().ok()?;
    Some((UNIX_EPOCH + Duration::from_millis(due), id))
}

/// Writes `envelope` to be tried again at `due`.
pub async fn put(
    objects: &dyn ObjectStore,
    prefix: &str,
    due: SystemTime,
    envelope: &Envelope,
    attempts: u32,
    delay_notified: bool,
    last_error: &str,
) -> Result<String, mailmesh_objstore::object_store::Error> {
    let key = key_for(prefix, due, envelope.queue_id, attempts);
    let error: String = last_error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(500)
        .collect();
    let mut content = Vec::new();
    content.extend_from_slice(MAGIC);
    content
        .extend_from_slice(format!("{attempts} {} {error}\n", u8::from(delay_notified)).as_bytes());
    content.extend_from_slice(&encode_envelope(envelope));
    objects
        .put(&Path::from(key.as_str()), PutPayload::from(content))
        .await?;
    Ok(key)
}

/// Reads one entry; `None` if it is gone (another worker took it).
pub async fn get(
    objects: &dyn ObjectStore,
    key: &str,
) -> Result<Option<Waiting>, mailmesh_objstore::object_store::Error> {
    use mailmesh_objstore::object_store::Error as E;
    let bytes = match objects.get(&Path::from(key)).await {
        Ok(r) => r.bytes().await?,
        Err(E::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let waiting = decode(key, &bytes);
    if waiting.is_none() {
        tracing::error!(%key, "a retry entry cannot be read; it stays for an operator");
    }
    Ok(waiting)
}

/// The entries of one message (usually one), without reading any other.
pub async fn find(
    objects: &dyn ObjectStore,
    prefix: &str,
    queue_id: QueueId,
) -> Result<Vec<Waiting>, mailmesh_objstore::object_store::Error> {
    let mut keys: Vec<String> = objects
        .list(Some(&Path::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_filter(|key| std::future::ready(parse_key(key).is_some_and(|(_, id)| id == queue_id)))
        .try_collect()
        .await?;
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        if let Some(w) = get(objects, &key).await? {
            out.push(w);
        }
    }
    Ok(out)
}

fn decode(key: &str, bytes: &Bytes) -> Option<Waiting> {
    let (due, queue_id) = parse_key(key)?;
    let rest = bytes.strip_prefix(MAGIC)?;
    let newline = rest.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&rest[..newline]).ok()?;
    let mut fields = header.splitn(3, ' ');
    let attempts = fields.next()?.parse().ok()?;
    let delay_notified = fields.next()? == "1";
    let last_error = fields.next().unwrap_or_default().to_owned();
    let envelope = decode_envelope(&rest[newline + 1..], &EnvelopeLimits::default()).ok()?;
    Some(Waiting {
        key: key.to_owned(),
        due,
        queue_id,
        attempts,
        delay_notified,
        envelope,
        last_error,
    })
}

/// Keys of the entries due at `now` or earlier, oldest first, at most `limit`.
pub async fn due(
    objects: &dyn ObjectStore,
    prefix: &str,
    now: SystemTime,
    limit: usize,
) -> Result<Vec<String>, mailmesh_objstore::object_store::Error> {
    let now_ms = millis(now);
    let mut keys = Vec::new();
    let mut listing = objects.list(Some(&Path::from(prefix)));
    while let Some(meta) = listing.try_next().await? {
        let key = meta.location.to_string();
        match parse_key(&key) {
            Some((due, _)) if millis(due) <= now_ms => keys.push(key),
            Some(_) => {}
            None => tracing::warn!(%key, "ignoring a malformed retry entry"),
        }
    }
    // Listings are in key order on S3, in no particular order elsewhere.
    keys.sort();
    keys.truncate(limit);
    Ok(keys)
}

/// The first `limit` waiting entries (for `mailctl queue`), in due order.
pub async fn list(
    objects: &dyn ObjectStore,
    prefix: &str,
    limit: usize,
) -> Result<Vec<Waiting>, mailmesh_objstore::object_store::Error> {
    let mut keys: Vec<String> = objects
        .list(Some(&Path::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await?;
    keys.sort();
    keys.truncate(limit);
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(w) = get(objects, &key).await? {
            out.push(w);
        }
    }
    Ok(out)
}

pub async fn remove(
    objects: &dyn ObjectStore,
    key: &str,
) -> Result<(), mailmesh_objstore::object_store::Error> {
    use mailmesh_objstore::object_store::Error as E;
    match objects.delete(&Path::from(key)).await {
        Ok(()) | Err(E::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Moves an entry to be due now (`mailctl queue retry`).
pub async fn due_now(
    objects: &dyn ObjectStore,
    prefix: &str,
    waiting: &Waiting,
) -> Result<(), mailmesh_objstore::object_store::Error> {
    put(
        objects,
        prefix,
        SystemTime::now(),
        &waiting.envelope,
        waiting.attempts,
        waiting.delay_notified,
        &waiting.last_error,
    )
    .await?;
    remove(objects, &waiting.key).await
}
