//! A whole SMTP session fed arbitrary client bytes: the server must answer only
//! with well-formed replies, end the session when the input ends, and never panic
//! or hang. The platform behind it is real (embedded queue, local object store,
//! the storage engine with tenant `acme` and user `alice@acme.test`).
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mailmesh_ingress::{Ingress, IngressConfig};
use mailmesh_kit::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Site {
    runtime: tokio::runtime::Runtime,
    ingress: Arc<Ingress>,
    _dir: tempfile::TempDir,
}

fn site() -> &'static Site {
    static SITE: OnceLock<Site> = OnceLock::new();
    SITE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ingress = runtime.block_on(async {
            let platform = mailmesh_storage::testing::embedded(dir.path(), 1)
                .await
                .unwrap();
            mailmesh_storage::testing::tenant_with_user(
                &platform.engine,
                "acme",
                "alice@acme.test",
                "pw",
            )
            .await
            .unwrap();
            let (queue, objects, engine) = (platform.queue, platform.objects, platform.engine);
            Ingress::new(
                queue,
                objects,
                Arc::new(engine),
                IngressConfig {
                    max_message_bytes: 64 << 10,
                    command_timeout: Duration::from_secs(1),
                    data_timeout: Duration::from_secs(1),
                    // Every input comes from the same address.
                    connections_per_ip_per_minute: 0,
                    ..IngressConfig::default()
                },
                None,
                Arc::new(mailmesh_cache::memory::MemoryCache::new()),
                None,
            )
        });
        Site {
            runtime,
            ingress,
            _dir: dir,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let site = site();
    site.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let ingress = site.ingress.clone();
        let peer: SocketAddr = "192.0.2.9:1".parse().unwrap();
        let session = tokio::spawn(async move {
            mailmesh_ingress::handle(&ingress, server, peer, &Shutdown::new()).await;
        });
        let input = input.to_vec();
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let write = async {
            // The server may close first (421, QUIT): a failed write is fine.
            let _ = writer.write_all(&input).await;
            let _ = writer.shutdown().await;
        };
        let mut output = Vec::new();
        let read = reader.read_to_end(&mut output);
        let (_, read) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
                .await
                .expect("the session ends when the client's input does");
        read.unwrap();
        session.await.expect("the session never panics");
        let text = String::from_utf8(output).expect("replies are UTF-8");
        for line in text.split_terminator("\r\n") {
            let b = line.as_bytes();
            assert!(
                b.len() >= 3
                    && b[..3].iter().all(u8::is_ascii_digit)
                    && (b.len() == 3 || b[3] == b' ' || b[3] == b'-'),
                "malformed reply line {line:?}"
            );
        }
        assert!(
            text.is_empty() || text.ends_with("\r\n"),
            "unterminated reply"
        );
    });
});
