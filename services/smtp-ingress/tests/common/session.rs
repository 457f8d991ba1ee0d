//! The transcript harness: a front door on the test platform, driven in memory by a
//! small client DSL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailmesh_auth::AuthCheck;
use mailmesh_ingress::{Ingress, IngressConfig};
use mailmesh_kit::Shutdown;
use mailmesh_proto::decode_envelope;
use mailmesh_queue::Queue;
use mailmesh_storage::engine::StorageEngine;
use mailmesh_types::{BodyRef, Envelope, EnvelopeLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

pub struct Server {
    pub ingress: Arc<Ingress>,
    pub queue: Arc<dyn Queue>,
    pub engine: Arc<StorageEngine>,
    pub objects: Arc<dyn mailmesh_objstore::object_store::ObjectStore>,
    pub _dir: tempfile::TempDir,
}

pub async fn server(config: IngressConfig) -> Server {
    server_with_tls(config, None).await
}

pub async fn server_with_tls(
    config: IngressConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Server {
    server_with(config, tls, None).await
}

pub async fn server_with(
    config: IngressConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    auth: Option<Arc<dyn AuthCheck>>,
) -> Server {
    let super::Platform {
        queue,
        objects,
        engine,
        dir,
        ..
    } = super::platform().await;
    let ingress = Ingress::new(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        IngressConfig {
            hostname: "mx.acme.test".into(),
            ..config
        },
        tls,
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
        auth,
    );
    Server {
        ingress,
        queue,
        engine,
        objects,
        _dir: dir,
    }
}

/// The client side of one session, with a small transcript DSL.
pub struct Client<S = DuplexStream> {
    pub io: S,
    pub pending: Vec<u8>,
}

impl Client<DuplexStream> {
    pub async fn connect(server: &Server) -> Self {
        let mut c = open(server, "192.0.2.7:40000", &Shutdown::new());
        c.expect("220 mx.acme.test ESMTP").await;
        c
    }

    /// Completes a TLS handshake after `220` to STARTTLS.
    pub async fn tls(self) -> Client<tokio_rustls::client::TlsStream<DuplexStream>> {
        assert!(self.pending.is_empty(), "replies left before the handshake");
        let config = mailmesh_testkit::tls::insecure_client_config();
        let io = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("mx.acme.test").unwrap(),
                self.io,
            )
            .await
            .unwrap();
        Client {
            io,
            pending: Vec::new(),
        }
    }
}

/// A connection from `peer`, handled as `serve` handles one (PROXY header from
/// trusted peers, then the session), tracked by `shutdown` as `serve` tracks it.
pub fn open(server: &Server, peer: &str, shutdown: &Shutdown) -> Client {
    let (client, server_side) = tokio::io::duplex(1 << 20);
    let ingress = server.ingress.clone();
    let peer: SocketAddr = peer.parse().unwrap();
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        mailmesh_ingress::handle(&ingress, server_side, peer, &stop).await;
    });
    Client {
        io: client,
        pending: Vec::new(),
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    /// The next complete reply (all lines up to the one with a space after the code).
    pub async fn reply(&mut self) -> String {
        loop {
            if let Some(end) = self.complete_reply() {
                let reply: Vec<u8> = self.pending.drain(..end).collect();
                return String::from_utf8(reply).unwrap();
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut buf))
                .await
                .expect("a reply within the timeout")
                .unwrap();
            if n == 0 {
                return String::from_utf8(std::mem::take(&mut self.pending)).unwrap();
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    pub fn complete_reply(&self) -> Option<usize> {
        let mut start = 0;
        while let Some(pos) = self.pending[start..].windows(2).position(|w| w == b"\r\n") {
            let line = &self.pending[start..start + pos];
            let end = start + pos + 2;
            if line.len() >= 4 && line[3] == b' ' || line.len() == 3 {
                return Some(end);
            }
            start = end;
        }
        None
    }

    pub async fn send(&mut self, raw: &str) {
        self.io.write_all(raw.as_bytes()).await.unwrap();
    }

    pub async fn expect(&mut self, prefix: &str) -> String {
        let reply = self.reply().await;
        assert!(
            reply.starts_with(prefix),
            "expected {prefix:?}, got {reply:?}"
        );
        reply
    }

    /// Sends one command and checks the reply starts with `prefix`.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.expect(prefix).await
    }

    /// One whole transaction, bob@example.org to alice@acme.test, that must be queued.
    pub async fn message(&mut self, data: &str) {
        self.cmd("MAIL FROM:<bob@example.org>", "250").await;
        self.cmd("RCPT TO:<alice@acme.test>", "250").await;
        self.cmd("DATA", "354").await;
        self.send(data).await;
        self.expect("250 2.0.0").await;
    }

    pub async fn hello(&mut self) {
        let ehlo = self
            .cmd(
                "EHLO client.example.org",
                "250-mx.acme.test Hello client.example.org",
            )
            .await;
        for extension in [
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "SIZE ",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ] {
            assert!(ehlo.contains(extension), "{extension} missing in {ehlo}");
        }
        assert!(!ehlo.contains("AUTH"), "no AUTH on the MX port");
    }
}

impl Server {
    /// The envelopes queued so far.
    pub async fn queued(&self, count: usize) -> Vec<Envelope> {
        let mut out = Vec::new();
        for p in 0..self.queue.partition_count("mail.queue").await.unwrap() {
            let mut reader = self.queue.reader("mail.queue", p, 0).await.unwrap();
            while let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(300), reader.recv()).await
            {
                out.push(decode_envelope(&r.payload, &EnvelopeLimits::default()).unwrap());
            }
        }
        assert_eq!(out.len(), count, "{out:?}");
        out
    }
}

pub async fn body(server: &Server, envelope: &Envelope) -> String {
    match &envelope.body {
        BodyRef::Inline(b) => String::from_utf8(b.to_vec()).unwrap(),
        BodyRef::Object { key, .. } => {
            use mailmesh_objstore::object_store::ObjectStoreExt;
            let bytes = server
                .objects
                .get(&mailmesh_objstore::object_store::path::Path::from(
                    key.as_str(),
                ))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        }
    }
}

/// The submission service on the test platform, with a self-signed certificate for
/// `mx.acme.test`.
/// A server TLS configuration with a self-signed certificate for mx.acme.test (the
/// directory holds the files and must outlive the server's use of them).
pub fn test_tls(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
    let (cert, key) = mailmesh_kit::tls::ensure_self_signed(dir, &["mx.acme.test"]).unwrap();
    let resolver = Arc::new(mailmesh_kit::tls::ReloadingCertResolver::load(&cert, &key).unwrap());
    mailmesh_kit::tls::server_config(resolver).unwrap()
}

pub async fn submission_server(submission: mailmesh_ingress::submit::SubmissionConfig) -> Server {
    let super::Platform {
        queue,
        objects,
        engine,
        dir,
        ..
    } = super::platform().await;
    let tls = test_tls(&dir.path().join("tls"));
    let ingress = Ingress::submission(
        queue.clone(),
        objects.clone(),
        Arc::new(engine.clone()),
        IngressConfig {
            hostname: "mx.acme.test".into(),
            ..IngressConfig::default()
        },
        submission,
        Some(tls),
        Arc::new(mailmesh_cache::memory::MemoryCache::new()),
    );
    Server {
        ingress,
        queue,
        engine,
        objects,
        _dir: dir,
    }
}

/// A connection to an implicit-TLS port (465): the handshake first.
pub async fn open_implicit_tls(
    server: &Server,
    peer: &str,
) -> Client<tokio_rustls::client::TlsStream<DuplexStream>> {
    let (client, server_side) = tokio::io::duplex(1 << 20);
    let ingress = server.ingress.clone();
    let peer: SocketAddr = peer.parse().unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(async move {
        mailmesh_ingress::handle_implicit_tls(&ingress, server_side, peer, &shutdown).await;
    });
    // The handshake comes first here, as after `220` to STARTTLS.
    Client {
        io: client,
        pending: Vec::new(),
    }
    .tls()
    .await
}
