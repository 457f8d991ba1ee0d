//! Queue bodies in object storage (messages the front doors store beside their queue
//! records, above `inline_body_bytes`, and forwarded copies a worker seals) are freed
//! once every record that refers to one is finished.
//!
//! Several records may share a body: the record queued for a message hands it on to
//! the outbound path (remote recipients), to forwarded copies and to its own retry
//! (recipients failing temporarily), and an outbound record hands it to its entry in
//! the due-time index. Each record holds the body through a *claim*: the first record
//! implicitly, every record handed the body by another through a claim object
//! `<key>.claims/<name>`, its name derived from the parent's claim and the child's
//! role (a replayed parent writes the same names). A parent writes every child's
//! claim before it publishes the first child and releases its own after the last
//! (an outbound record that waits in the due-time index keeps its claim there). A
//! release deletes the claim, then lists the others, so whichever release comes last
//! finds none and frees the body: a `<key>.done` marker is written, then the body
//! deleted. A record that finds the body gone and the marker there is a replay of
//! finished work (redelivered before its offset was committed) and is acknowledged
//! without doing anything again.
//!
//! What a crash or an outage leaves behind (claims never released, a body whose
//! release failed), the markers, and the bodies of parked (dead-lettered) records are
//! removed by [`sweep`] once older than every record that can still need them: the
//! message lifetime, after which every record is bounced, plus a grace.

use std::time::SystemTime;

use futures::TryStreamExt;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{Error, ObjectStore, ObjectStoreExt, PutPayload};
use mailmesh_types::BodyRef;

const CLAIMS: &str = ".claims";
const DONE: &str = ".done";

/// The claim of a record handed a body by the record holding `parent`, in `role`.
pub(crate) fn child_claim(parent: Option<&str>, role: &str) -> String {
    // The same name in every process and version, so a replayed parent writes (and
    // its children release) the same claims.
    let name = format!("{}/{role}", parent.unwrap_or(""));
    format!("{:016x}", mailmesh_types::fnv1a(name.as_bytes()))
}

/// `body` as a record handed it in `role` holds it: the same object under the
/// child's claim (an inline body is simply copied).
pub(crate) fn handed(body: &BodyRef, role: &str) -> BodyRef {
    match body {
        BodyRef::Inline(_) => body.clone(),
        BodyRef::Object { key, size, claim } => BodyRef::Object {
            key: key.clone(),
            size: *size,
            claim: Some(child_claim(claim.as_deref(), role)),
        },
    }
}

fn claims_of(key: &str) -> Path {
    Path::from(format!("{key}{CLAIMS}"))
}

fn done_marker(key: &str) -> Path {
    Path::from(format!("{key}{DONE}"))
}

fn gone(result: Result<(), Error>) -> Result<(), Error> {
    match result {
        Err(Error::NotFound { .. }) => Ok(()),
        other => other,
    }
}

/// Writes `claims` on the body at `key`, before the records holding them exist.
pub(crate) async fn hold<'a>(
    objects: &dyn ObjectStore,
    key: &str,
    claims: impl IntoIterator<Item = &'a str>,
) -> Result<(), Error> {
    let prefix = claims_of(key);
    for claim in claims {
        objects
            .put(&prefix.clone().join(claim), PutPayload::default())
            .await?;
    }
    Ok(())
}

/// Releases `claim` (`None`: the first record's) on the body at `key`; true when it
/// was the last one and the body is freed.
pub(crate) async fn release(
    objects: &dyn ObjectStore,
    key: &str,
    claim: Option<&str>,
) -> Result<bool, Error> {
    let prefix = claims_of(key);
    if let Some(claim) = claim {
        gone(objects.delete(&prefix.clone().join(claim)).await)?;
    }
    if objects.list(Some(&prefix)).try_next().await?.is_some() {
        return Ok(false);
    }
    objects
        .put(&done_marker(key), PutPayload::from_static(b"finished\n"))
        .await?;
    gone(objects.delete(&Path::from(key)).await)?;
    Ok(true)
}

/// Releases a record's claim on its body, if it has one in object storage. A failure
/// only leaves the body to [`sweep`] (the record's outcomes are durable already).
pub(crate) async fn release_body(objects: &dyn ObjectStore, body: &BodyRef) {
    let BodyRef::Object { key, claim, .. } = body else {
        return;
    };
    match release(objects, key, claim.as_deref()).await {
        Ok(true) => crate::metrics::bodies("freed", 1),
        Ok(false) => {}
        Err(e) => {
            crate::metrics::bodies("release_failed", 1);
            tracing::warn!(%key, error = %e, "releasing a queue body failed; the sweep removes it later");
        }
    }
}

/// Whether the body at `key` was freed after every record holding it finished.
pub(crate) async fn finished(objects: &dyn ObjectStore, key: &str) -> Result<bool, Error> {
    match objects.head(&done_marker(key)).await {
        Ok(_) => Ok(true),
        Err(Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub objects: u64,
    pub bytes: u64,
}

/// Deletes everything under every tenant's `t/<tenant>/queue/` last written before
/// `before`: bodies, claims and markers no record can need any more.
pub async fn sweep(objects: &dyn ObjectStore, before: SystemTime) -> Result<Swept, Error> {
    let before_ms = mailmesh_types::unix_millis(before);
    let mut swept = Swept::default();
    let tenants = objects
        .list_with_delimiter(Some(&Path::from("t")))
        .await?
        .common_prefixes;
    for tenant in tenants {
        let mut listing = objects.list(Some(&tenant.clone().join("queue")));
        let mut old = Vec::new();
        while let Some(meta) = listing.try_next().await? {
            if meta.last_modified.timestamp_millis() < before_ms {
                old.push(meta);
            }
        }
        for meta in old {
            gone(objects.delete(&meta.location).await)?;
            swept.objects += 1;
            swept.bytes += meta.size;
        }
    }
    crate::metrics::bodies("swept", swept.objects);
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailmesh_objstore::object_store::memory::InMemory;

    #[test]
    fn claims_are_stable_and_distinct() {
        assert_eq!(child_claim(None, "outbound"), child_claim(None, "outbound"));
        let names = [
            child_claim(None, "outbound"),
            child_claim(None, "requeue"),
            child_claim(Some(&child_claim(None, "requeue")), "requeue"),
            child_claim(Some(&child_claim(None, "requeue")), "outbound"),
        ];
        for (i, a) in names.iter().enumerate() {
            assert_eq!(a.len(), 16);
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[tokio::test]
    async fn the_last_release_frees_the_body() {
        let objects = InMemory::new();
        let key = "t/acme/queue/q1";
        objects
            .put(&Path::from(key), PutPayload::from_static(b"body"))
            .await
            .unwrap();
        let (a, b) = (child_claim(None, "outbound"), child_claim(None, "requeue"));
        hold(&objects, key, [a.as_str(), b.as_str()]).await.unwrap();
        // The first record is done; its children still hold the body.
        assert!(!release(&objects, key, None).await.unwrap());
        assert!(!release(&objects, key, Some(&a)).await.unwrap());
        assert!(!finished(&objects, key).await.unwrap());
        assert!(objects.head(&Path::from(key)).await.is_ok());
        assert!(release(&objects, key, Some(&b)).await.unwrap());
        assert!(finished(&objects, key).await.unwrap());
        assert!(matches!(
            objects.head(&Path::from(key)).await,
            Err(Error::NotFound { .. })
        ));
        // A replayed release changes nothing and does not fail.
        assert!(release(&objects, key, Some(&b)).await.unwrap());
    }

    #[tokio::test]
    async fn the_sweep_removes_only_what_is_old_and_only_under_queue() {
        let objects = InMemory::new();
        for key in ["t/acme/queue/old", "t/acme/u/1/INBOX/cur/m"] {
            objects
                .put(&Path::from(key), PutPayload::from_static(b"12345"))
                .await
                .unwrap();
        }
        let swept = sweep(
            &objects,
            SystemTime::now() - std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(swept, Swept::default(), "nothing is old yet");
        let swept = sweep(
            &objects,
            SystemTime::now() + std::time::Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(
            swept,
            Swept {
                objects: 1,
                bytes: 5
            }
        );
        assert!(objects.head(&Path::from("t/acme/queue/old")).await.is_err());
        assert!(
            objects
                .head(&Path::from("t/acme/u/1/INBOX/cur/m"))
                .await
                .is_ok()
        );
    }
}
