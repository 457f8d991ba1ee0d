//! Object storage for mailmesh through the `object_store` crate: any S3-compatible
//! server (custom endpoint, path-style addressing for MinIO, Garage, Ceph, s3s) or a
//! local directory for `mailctl dev` and unit tests. Callers get an
//! `Arc<dyn ObjectStore>` either way, plus [`put_stream`] for message bodies of any
//! size (one PUT when small, a multipart upload when large).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use mailmesh_kit::Secret;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Deserialize;

pub use object_store;

pub type Result<T, E = ObjectStoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("object store directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the object body: {0}")]
    Body(std::io::Error),
    #[error("object body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectStoreConfig {
    S3(S3Config),
    Local(LocalConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible server; AWS when absent.
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Static credentials; when absent, the usual AWS environment, web identity (IRSA)
    /// and instance metadata are used.
    pub access_key_id: Option<Secret<String>>,
    pub secret_access_key: Option<Secret<String>>,
    /// Path-style requests (`endpoint/bucket/key`), which most self-hosted servers want.
    #[serde(default = "yes")]
    pub path_style: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub dir: PathBuf,
}

/// Opens the configured store.
pub fn open(config: &ObjectStoreConfig) -> Result<Arc<dyn ObjectStore>> {
    match config {
        ObjectStoreConfig::S3(c) => {
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(&c.bucket)
                .with_region(&c.region)
                .with_virtual_hosted_style_request(!c.path_style);
            if let Some(endpoint) = &c.endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
                builder = builder
                    .with_access_key_id(id.expose())
                    .with_secret_access_key(secret.expose());
            }
            Ok(Arc::new(builder.build()?))
        }
        ObjectStoreConfig::Local(c) => {
            std::fs::create_dir_all(&c.dir).map_err(|source| ObjectStoreError::Dir {
                path: c.dir.clone(),
                source,
            })?;
            Ok(Arc::new(
                // fsync files and directories before a write returns: what S3 promises,
                // and what a 250 that is then delivered relies on.
                LocalFileSystem::new_with_prefix(&c.dir)?
                    .with_automatic_cleanup(true)
                    .with_fsync(true),
            ))
        }
    }
}

/// Opens the configured store and makes `/readyz` depend on it.
pub fn open_checked(
    config: &ObjectStoreConfig,
    health: &mailmesh_kit::Health,
) -> Result<Arc<dyn ObjectStore>> {
    let store = open(config)?;
    health.add_check(Arc::new(ObjectStoreReadiness(store.clone())));
    Ok(store)
}

/// Part size for multipart uploads; S3 requires at least 5 MiB for all but the last.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;

/// Writes a body that arrives in chunks. Bodies up to `part_size` go up in one PUT;
/// larger ones as a multipart upload of `part_size` parts, aborted on any error so no
/// half-written object is ever visible. Fails with `TooLarge` past `limit` bytes.
/// Returns the object size.
pub async fn put_stream<S>(
    store: &dyn ObjectStore,
    path: &Path,
    mut body: S,
    part_size: usize,
    limit: u64,
) -> Result<u64>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let mut first = BytesMut::new();
    let mut size = 0u64;
    while first.len() < part_size {
        match body.next().await {
            Some(chunk) => {
                let chunk = chunk.map_err(ObjectStoreError::Body)?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ObjectStoreError::TooLarge { limit });
                }
                first.extend_from_slice(&chunk);
            }
            None => {
                store.put(path, PutPayload::from(first.freeze())).await?;
                return Ok(size);
            }
        }
    }

    let upload = store.put_multipart(path).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
    writer.write(&first);
    drop(first);
    let outcome: Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(ObjectStoreError::Body)?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ObjectStoreError::TooLarge { limit });
            }
            // Bounds memory: waits while too many parts are in flight.
            writer.wait_for_capacity(2).await?;
            writer.write(&chunk);
        }
        Ok(())
    }
    .await;
    match outcome {
        Ok(()) => {
            writer.finish().await?;
            Ok(size)
        }
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                // The bucket's lifecycle rules clean up uploads that could not be aborted.
                tracing::warn!(%path, error = %abort, "aborting a multipart upload failed");
            }
            Err(e)
        }
    }
}

/// A readiness check: the store answers (a missing probe object still proves that).
pub struct ObjectStoreReadiness(pub Arc<dyn ObjectStore>);

#[async_trait]
impl mailmesh_kit::ReadinessCheck for ObjectStoreReadiness {
    fn name(&self) -> &str {
        "object-store"
    }

    async fn check(&self) -> Result<(), String> {
        match self.0.head(&Path::from(".mailmesh-readiness")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}
