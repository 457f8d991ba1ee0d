//! Object storage behaviour on the local filesystem and on a real S3 server
//! (`MMTEST_S3*`, started by `scripts/backends.sh`).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use mailmesh_kit::Secret;
use mailmesh_objstore::object_store::path::Path;
use mailmesh_objstore::object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use mailmesh_objstore::{LocalConfig, ObjectStoreConfig, ObjectStoreError, S3Config, put_stream};
use mailmesh_testkit::backend_env;

fn s3() -> Arc<dyn ObjectStore> {
    mailmesh_objstore::open(&ObjectStoreConfig::S3(S3Config {
        bucket: backend_env("MMTEST_S3_BUCKET"),
        endpoint: Some(backend_env("MMTEST_S3")),
        region: "us-east-1".into(),
        access_key_id: Some(Secret::new(backend_env("MMTEST_S3_ACCESS_KEY"))),
        secret_access_key: Some(Secret::new(backend_env("MMTEST_S3_SECRET_KEY"))),
        path_style: true,
    }))
    .unwrap()
}

fn local(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
    mailmesh_objstore::open(&ObjectStoreConfig::Local(LocalConfig {
        dir: dir.to_owned(),
    }))
    .unwrap()
}

/// Deterministic, incompressible-looking content (xorshift).
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn chunks(data: &[u8], size: usize) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Unpin {
    futures::stream::iter(
        data.chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
}

async fn put_get_list_delete(store: Arc<dyn ObjectStore>) {
    let prefix = format!("t/test-{}", uuid::Uuid::new_v4().simple());
    let small = Path::from(format!("{prefix}/small.eml"));
    let large = Path::from(format!("{prefix}/large.eml"));

    let small_body = b"Subject: small\r\n\r\nhello\r\n".to_vec();
    let n = put_stream(&*store, &small, chunks(&small_body, 7), 8 << 20, u64::MAX)
        .await
        .unwrap();
    assert_eq!(n, small_body.len() as u64);
    let got = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), small_body.as_slice());

    // 20 MiB in 64 KiB chunks: a multipart upload of three 8 MiB parts.
    let large_body = content(20 << 20, 7);
    let n = put_stream(
        &*store,
        &large,
        chunks(&large_body, 64 << 10),
        8 << 20,
        u64::MAX,
    )
    .await
    .unwrap();
    assert_eq!(n, large_body.len() as u64);
    let meta = store.head(&large).await.unwrap();
    assert_eq!(meta.size, large_body.len() as u64);
    let got = store.get(&large).await.unwrap().bytes().await.unwrap();
    assert!(
        got.as_ref() == large_body.as_slice(),
        "20 MiB object differs"
    );
    let range = store
        .get_opts(
            &large,
            GetOptions {
                range: Some(GetRange::Bounded(10_000_000..10_000_100)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(range.as_ref(), &large_body[10_000_000..10_000_100]);

    let mut listed: Vec<String> = store
        .list(Some(&Path::from(prefix.clone())))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, [large.to_string(), small.to_string()]);

    // Over the limit: refused, and nothing is left behind.
    let too_big = Path::from(format!("{prefix}/too-big.eml"));
    let err = put_stream(
        &*store,
        &too_big,
        chunks(&content(9 << 20, 3), 1 << 20),
        8 << 20,
        8 << 20,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ObjectStoreError::TooLarge { .. }), "{err}");
    assert!(matches!(
        store.head(&too_big).await,
        Err(mailmesh_objstore::object_store::Error::NotFound { .. })
    ));

    store.delete(&small).await.unwrap();
    store.delete(&large).await.unwrap();
    let left: Vec<_> = store
        .list(Some(&Path::from(prefix)))
        .try_collect()
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn local_put_get_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    put_get_list_delete(local(dir.path())).await;
}

#[tokio::test]
async fn s3_put_get_list_delete() {
    put_get_list_delete(s3()).await;
}

#[tokio::test]
async fn readiness_tells_a_reachable_store_from_an_unreachable_one() {
    use mailmesh_kit::ReadinessCheck;
    use mailmesh_objstore::ObjectStoreReadiness;

    ObjectStoreReadiness(s3()).check().await.unwrap();
    let unreachable = mailmesh_objstore::open(&ObjectStoreConfig::S3(S3Config {
        bucket: "nowhere".into(),
        endpoint: Some("http://127.0.0.1:1".into()),
        region: "us-east-1".into(),
        access_key_id: Some(Secret::new("x".into())),
        secret_access_key: Some(Secret::new("y".into())),
        path_style: true,
    }))
    .unwrap();
    assert!(ObjectStoreReadiness(unreachable).check().await.is_err());
}
