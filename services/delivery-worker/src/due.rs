//! Waiting mail goes back to its topic when due. Mail waits in a due-time index in
//! object storage (`mailmesh_storage::retry_index`): the local path's for mailboxes
//! here, the outbound path's for other domains. Every worker scans them; the cache
//! decides which worker publishes an entry, and without the cache nothing is taken
//! (a retry waits rather than going out twice).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mailmesh_cache::Cache;
use mailmesh_kit::Shutdown;
use mailmesh_objstore::object_store::ObjectStore;
use mailmesh_queue::Queue;
use mailmesh_storage::retry_index::{self as schedule, Waiting};

use crate::worker::publish_envelope;

/// Entries published per scan at most; the rest wait for the next.
const PER_SCAN: usize = 1000;

/// One due-time index and where its due entries go.
pub(crate) struct DueScan {
    pub objects: Arc<dyn ObjectStore>,
    pub cache: Arc<dyn Cache>,
    pub queue: Arc<dyn Queue>,
    /// The index's prefix in object storage.
    pub prefix: String,
    /// The topic due entries are published to.
    pub topic: String,
    /// Cache lock names are `<lock>:<key>`.
    pub lock: &'static str,
    pub every: Duration,
    /// Record headers carrying what the entry remembers (attempts, rounds…).
    pub headers: fn(&Waiting) -> Vec<(String, Bytes)>,
}

impl DueScan {
    /// Publishes due entries until the shutdown closes.
    pub(crate) async fn run(self, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.closing() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
            let keys = match schedule::due(
                &*self.objects,
                &self.prefix,
                SystemTime::now(),
                PER_SCAN,
            )
            .await
            {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, error = %e, "reading a retry index failed");
                    continue;
                }
            };
            for key in keys {
                if shutdown.is_closing() {
                    return;
                }
                if let Err(e) = self.publish(&key).await {
                    tracing::warn!(%key, error = %e, "re-queueing a due message failed");
                }
            }
        }
    }

    async fn publish(&self, key: &str) -> anyhow::Result<()> {
        let lock = format!("{}:{key}", self.lock);
        let Some(token) = self.cache.try_lock(&lock, Duration::from_secs(300)).await? else {
            return Ok(());
        };
        let result = async {
            let Some(waiting) = schedule::get(&*self.objects, key).await? else {
                return Ok(());
            };
            publish_envelope(
                &*self.queue,
                &self.topic,
                &waiting.envelope,
                (self.headers)(&waiting),
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.0))?;
            schedule::remove(&*self.objects, key).await?;
            anyhow::Ok(())
        }
        .await;
        // A failed removal keeps the lock until it expires, so the entry is not
        // published again at the next scan (recipients already done are skipped
        // after that anyway).
        if result.is_ok() {
            let _ = self.cache.unlock(&lock, &token).await;
        }
        result
    }
}
