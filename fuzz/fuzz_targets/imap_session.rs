//! A whole IMAP session fed arbitrary client bytes: every reply must parse with an
//! independent IMAP response parser (imap-codec's), the session must end when the
//! input ends, and nothing may panic or hang. Behind it is the real storage service
//! over gRPC (embedded backends) with alice@acme.test and two messages.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imap_codec::decode::{Decoder, ResponseDecodeError};
use imap_codec::{GreetingCodec, ResponseCodec};
use libfuzzer_sys::fuzz_target;
use mailmesh_gateway::{Gateway, ImapConfig, Pop3Config, Store};
use mailmesh_kit::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Site {
    runtime: tokio::runtime::Runtime,
    gateway: Arc<Gateway>,
    _dir: tempfile::TempDir,
}

const MESSAGES: [&str; 2] = [
    "Subject: one\r\nFrom: Bob <bob@example.org>\r\nTo: alice@acme.test\r\n\r\nfirst\r\n",
    "Subject: two\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
     Content-Transfer-Encoding: base64\r\n\r\nAGFi\r\n--b\r\n\
     Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nin\r\n--b--\r\n",
];

fn site() -> &'static Site {
    static SITE: OnceLock<Site> = OnceLock::new();
    SITE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let gateway = runtime.block_on(async {
            let engine = mailmesh_storage::testing::embedded(dir.path(), 1)
                .await
                .unwrap()
                .engine;
            let alice = mailmesh_storage::testing::tenant_with_user(
                &engine,
                "acme",
                "alice@acme.test",
                "pw",
            )
            .await
            .unwrap();
            for (i, m) in MESSAGES.iter().enumerate() {
                engine
                    .deliver(
                        &alice,
                        mailmesh_storage::engine::Delivery {
                            mailbox: "INBOX",
                            return_path: &"bob@example.org".parse().unwrap(),
                            delivered_to: &"alice@acme.test".parse().unwrap(),
                            message: m.as_bytes(),
                            key: &format!("seed/{i}"),
                            internal_date_ms: 1_795_752_725_000,
                        },
                    )
                    .await
                    .unwrap();
            }
            let endpoint = mailmesh_storage::testing::serve(engine, Shutdown::new()).await;
            let (cert, key) =
                mailmesh_kit::tls::ensure_self_signed(&dir.path().join("tls"), &["localhost"])
                    .unwrap();
            let resolver =
                Arc::new(mailmesh_kit::tls::ReloadingCertResolver::load(&cert, &key).unwrap());
            Gateway::new(
                Store::new(
                    &endpoint,
                    1 << 20,
                    &mailmesh_kit::internal::testing::tls(mailmesh_kit::internal::Role::Gateway),
                )
                .unwrap(),
                Arc::new(mailmesh_cache::memory::MemoryCache::new()),
                mailmesh_kit::tls::server_config(resolver).unwrap(),
                Pop3Config::default(),
                ImapConfig {
                    allow_plaintext_auth: true,
                    failure_delay: Duration::ZERO,
                    max_auth_failures: u32::MAX,
                    max_command_bytes: 4096,
                    max_message_bytes: 16 << 10,
                    login_timeout: Duration::from_secs(2),
                    idle_timeout: Duration::from_secs(2),
                    ..ImapConfig::default()
                },
                Default::default(),
            )
        });
        Site {
            runtime,
            gateway,
            _dir: dir,
        }
    })
}

/// Every reply the server wrote parses as IMAP (ESEARCH, which the parser does not
/// know, is checked for its shape only).
fn check_replies(mut out: &[u8]) {
    let (rest, _) = GreetingCodec::default()
        .decode(out)
        .expect("the greeting parses");
    out = rest;
    while !out.is_empty() {
        if out.starts_with(b"* ESEARCH (TAG \"") {
            let end = out.windows(2).position(|w| w == b"\r\n").expect("terminated");
            out = &out[end + 2..];
            continue;
        }
        match ResponseCodec::default().decode(out) {
            Ok((rest, _)) => out = rest,
            // A session cut off mid-reply (the client went away) is fine at the end.
            Err(ResponseDecodeError::Incomplete) => return,
            Err(e) => panic!(
                "unparsable reply {e:?}: {:?}",
                String::from_utf8_lossy(&out[..out.len().min(300)])
            ),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let site = site();
    site.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let gateway = site.gateway.clone();
        let peer: SocketAddr = "192.0.2.9:1".parse().unwrap();
        let session = tokio::spawn(async move {
            mailmesh_gateway::imap::run(gateway, server, peer, false, &Shutdown::new()).await;
        });
        let input = input.to_vec();
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let write = async {
            let _ = writer.write_all(&input).await;
            let _ = writer.shutdown().await;
        };
        let mut output = Vec::new();
        let read = reader.read_to_end(&mut output);
        let (_, read) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
                .await
                .expect("the session ends when the client's input does");
        read.unwrap();
        session.await.expect("the session never panics");
        check_replies(&output);
    });
});
