//! Mutual TLS between mailmesh services (ADR 0006).
//!
//! Every workload holds a certificate from the deployment's internal CA that names
//! its role as a DNS name under [`TRUST_DOMAIN`] (`storage.mailmesh.internal`,
//! `gateway.mailmesh.internal`, …). The same certificate is the workload's server
//! identity (clients verify the name of the role they expect, whatever address they
//! dialled) and its client identity (servers accept only chains to the internal CA
//! naming exactly one role, and authorise each call by that role). Certificates and
//! the CA are re-read on an interval, so a renewal (cert-manager) or a CA rotation is
//! picked up without a restart; a broken file keeps the previous material.
//!
//! Only TLS 1.3, with `h2` negotiated by ALPN (gRPC).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ConfigError, Validate};
use crate::shutdown::Shutdown;
use crate::tls::{ReloadingCertResolver, TlsError};

/// The DNS suffix under which certificates name roles.
pub const TRUST_DOMAIN: &str = "mailmesh.internal";

/// Who a workload is, as its certificate says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `mailctl` (operators): the directory, keys, the queue.
    Admin,
    Storage,
    AuthCheck,
    SmtpIngress,
    Submission,
    DeliveryWorker,
    Gateway,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Admin,
        Role::Storage,
        Role::AuthCheck,
        Role::SmtpIngress,
        Role::Submission,
        Role::DeliveryWorker,
        Role::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Storage => "storage",
            Role::AuthCheck => "auth-check",
            Role::SmtpIngress => "smtp-ingress",
            Role::Submission => "submission",
            Role::DeliveryWorker => "delivery-worker",
            Role::Gateway => "gateway",
        }
    }

    /// The DNS name a certificate for this role carries.
    pub fn dns_name(self) -> String {
        format!("{}.{TRUST_DOMAIN}", self.name())
    }

    fn server_name(self) -> ServerName<'static> {
        ServerName::try_from(self.dns_name()).expect("role names are DNS names")
    }

    /// The role a certificate names: exactly one, else none (a wildcard or a
    /// certificate naming two roles identifies nobody).
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Option<Role> {
        let cert = webpki::EndEntityCert::try_from(cert).ok()?;
        let mut named = Role::ALL.into_iter().filter(|role| {
            cert.verify_is_valid_for_subject_name(&role.server_name())
                .is_ok()
        });
        let role = named.next()?;
        named.next().is_none().then_some(role)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?}"))
    }
}

/// `[internal_tls]`: this workload's certificate and the internal CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalTlsConfig {
    /// PEM certificate chain naming this workload's role, leaf first.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM certificates of the internal CA (several during a rotation).
    pub ca_file: PathBuf,
    /// How often the three files are checked for a renewal.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// A peer that has not finished its handshake by then is dropped.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_handshake_timeout() -> Duration {
    // Peers are in the cluster: a handshake takes milliseconds.
    Duration::from_secs(3)
}

impl InternalTlsConfig {
    /// The files of `role` in a directory laid out as `mailctl pki init` writes it
    /// (`<role>.crt`, `<role>.key`, `ca.crt`).
    pub fn in_dir(dir: &Path, role: Role) -> Self {
        Self {
            cert_file: dir.join(format!("{role}.crt")),
            key_file: dir.join(format!("{role}.key")),
            ca_file: dir.join("ca.crt"),
            reload_interval: default_reload_interval(),
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

impl Validate for InternalTlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.reload_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "internal_tls.reload_interval",
                "must be at least 1s",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "internal_tls.handshake_timeout",
                "must be above 0",
            ));
        }
        Ok(())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// The internal CA, re-read from its file; verifies both directions.
struct Roots {
    ca_file: PathBuf,
    loaded: Mutex<Vec<u8>>,
    client: ArcSwap<Arc<dyn ClientCertVerifier>>,
    server: ArcSwap<Arc<dyn ServerCertVerifier>>,
}

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Roots")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

type Verifiers = (Arc<dyn ClientCertVerifier>, Arc<dyn ServerCertVerifier>);

fn verifiers(pem: &[u8], path: &Path) -> Result<Verifiers, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CA certificate found".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    let roots = Arc::new(roots);
    let client =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| bad(e.to_string()))?;
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok((client, server))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Roots {
    fn load(ca_file: &Path) -> Result<Self, TlsError> {
        let pem = read(ca_file)?;
        let (client, server) = verifiers(&pem, ca_file)?;
        Ok(Self {
            ca_file: ca_file.to_owned(),
            loaded: Mutex::new(pem),
            client: ArcSwap::from_pointee(client),
            server: ArcSwap::from_pointee(server),
        })
    }

    fn reload(&self) -> Result<bool, TlsError> {
        let pem = read(&self.ca_file)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == pem {
            return Ok(false);
        }
        let (client, server) = verifiers(&pem, &self.ca_file)?;
        self.client.store(Arc::new(client));
        self.server.store(Arc::new(server));
        *loaded = pem;
        Ok(true)
    }
}

impl ClientCertVerifier for Roots {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every workload has exactly one certificate to show.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .client
            .load()
            .verify_client_cert(end_entity, intermediates, now)?;
        if Role::of_certificate(end_entity).is_none() {
            return Err(rustls::Error::General(format!(
                "the client certificate names no single {TRUST_DOMAIN} role"
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.client
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.client
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.client.load().supported_verify_schemes()
    }
}

impl ServerCertVerifier for Roots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.server.load().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.server
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.server
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.server.load().supported_verify_schemes()
    }
}

/// This workload's internal identity: what it presents and whom it trusts.
#[derive(Clone)]
pub struct InternalTls {
    role: Role,
    certs: Arc<ReloadingCertResolver>,
    roots: Arc<Roots>,
    handshake_timeout: Duration,
}

impl fmt::Debug for InternalTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InternalTls")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InternalTlsError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: the certificate names {found}, but this workload is {expected} ({expected_name})", expected_name = expected.dns_name())]
    WrongRole {
        path: PathBuf,
        found: String,
        expected: Role,
    },
}

impl InternalTls {
    /// Loads the files of `config` for a workload of `role`; the certificate must
    /// name that role.
    pub fn load(config: &InternalTlsConfig, role: Role) -> Result<Self, InternalTlsError> {
        let certs = Arc::new(ReloadingCertResolver::load(
            &config.cert_file,
            &config.key_file,
        )?);
        let found = certs.current().cert.first().and_then(Role::of_certificate);
        if found != Some(role) {
            return Err(InternalTlsError::WrongRole {
                path: config.cert_file.clone(),
                found: found.map_or_else(|| "no single role".to_owned(), |r| r.dns_name()),
                expected: role,
            });
        }
        Ok(Self {
            role,
            certs,
            roots: Arc::new(Roots::load(&config.ca_file)?),
            handshake_timeout: config.handshake_timeout,
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Re-reads the certificate and the CA every `interval` until shutdown.
    pub fn spawn_reloader(&self, interval: Duration, shutdown: &Shutdown) {
        self.certs.spawn_reloader(interval, shutdown);
        let roots = self.roots.clone();
        crate::tls::every(interval, shutdown, move || match roots.reload() {
            Ok(true) => tracing::info!(ca = %roots.ca_file.display(), "internal CA reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "internal CA reload failed, keeping the previous one")
            }
        });
    }

    /// Server side: client certificates required, TLS 1.3, `h2`.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_client_cert_verifier(self.roots.clone())
            .with_cert_resolver(self.certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        // Every connection shows its certificate: a resumed session would carry the
        // identity of a certificate since replaced, or of a CA no longer trusted.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    /// Client side: this workload's certificate, the server verified against the CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(self.roots.clone())
            .with_client_cert_resolver(self.certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A lazily connecting channel to the service of role `server` at `endpoint`'s
    /// address (the URL's scheme is ignored: the connection is always mutual TLS,
    /// and the server must present a certificate for `server`, whatever its host
    /// name).
    pub fn channel(
        &self,
        endpoint: tonic::transport::Endpoint,
        server: Role,
    ) -> tonic::transport::Channel {
        endpoint.connect_with_connector_lazy(Connector {
            tls: tokio_rustls::TlsConnector::from(self.client_config()),
            server,
            handshake_timeout: self.handshake_timeout,
        })
    }

    /// Like [`Self::channel`], but connects now (for command-line tools, which
    /// should say at once when the server cannot be reached).
    pub async fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
        server: Role,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        endpoint
            .connect_with_connector(Connector {
                tls: tokio_rustls::TlsConnector::from(self.client_config()),
                server,
                handshake_timeout: self.handshake_timeout,
            })
            .await
    }

    /// The authenticated connections a gRPC server accepts on `listener`: the
    /// handshakes run concurrently, bounded in number and time; peers without a
    /// valid client certificate never reach the server.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
    ) -> impl futures::Stream<Item = Result<PeerConn, std::io::Error>> + Send + 'static {
        const MAX_HANDSHAKES: usize = 256;
        // One address (a compromised pod) cannot take every handshake slot.
        const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        let timeout = self.handshake_timeout;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let stopped = shutdown.stopped_token();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let per_address: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
            Arc::default();
        // Refusals are counted in a metric and logged at most once a second: a
        // flood of bad handshakes must not flood the logs too.
        let log = Arc::new(LogPace::default());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an internal connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    crate::metrics::internal_tls_refused();
                    if log.allows() {
                        tracing::warn!(%addr, "too many internal TLS handshakes at once; connection dropped");
                    }
                    continue;
                };
                let Some(source) =
                    AddressSlot::take(&per_address, addr.ip(), MAX_HANDSHAKES_PER_ADDRESS)
                else {
                    crate::metrics::internal_tls_refused();
                    if log.allows() {
                        tracing::warn!(%addr, "too many internal TLS handshakes from this address at once; connection dropped");
                    }
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx, log) = (acceptor.clone(), tx.clone(), log.clone());
                tokio::spawn(async move {
                    let _slot = (slot, source);
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let role = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(Role::of_certificate);
                            match role {
                                Some(role) => {
                                    let _ = tx
                                        .send(Ok(PeerConn {
                                            inner: tls,
                                            peer: Peer { addr, role },
                                        }))
                                        .await;
                                }
                                None => tracing::warn!(%addr, "internal peer without a role"),
                            }
                        }
                        Ok(Err(e)) => {
                            crate::metrics::internal_tls_refused();
                            if log.allows() {
                                tracing::warn!(%addr, error = %e, "internal TLS handshake refused");
                            }
                        }
                        Err(_) => {
                            crate::metrics::internal_tls_refused();
                            if log.allows() {
                                tracing::warn!(%addr, "internal TLS handshake timed out");
                            }
                        }
                    }
                });
            }
        });
        tokio_stream_from(rx)
    }
}

/// How long an internal connection lives: then it closes (gracefully, calls in
/// flight get [`CONNECTION_GRACE`]) and the client connects again, showing its
/// current certificate, checked against the current CA.
pub const CONNECTION_AGE: Duration = Duration::from_secs(60 * 60);
/// Time calls on a connection past [`CONNECTION_AGE`] have to finish.
pub const CONNECTION_GRACE: Duration = Duration::from_secs(15 * 60);

/// One handshake from an address, counted until dropped.
struct AddressSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl AddressSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Allows one log line per second.
#[derive(Default)]
struct LogPace(std::sync::atomic::AtomicU64);

impl LogPace {
    fn allows(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.0.load(Ordering::Relaxed);
        now > last
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// The authenticated peer of a call: in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub role: Role,
}

/// The caller of a gRPC request (`UNAUTHENTICATED` if the connection was not
/// mutual TLS, which a server built on [`InternalTls::incoming`] never accepts).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Peer, tonic::Status> {
    request
        .extensions()
        .get::<Peer>()
        .copied()
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))
}

/// An accepted, authenticated internal connection.
pub struct PeerConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Dials the endpoint's address and runs the client handshake.
#[derive(Clone)]
struct Connector {
    tls: tokio_rustls::TlsConnector,
    server: Role,
    handshake_timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let handshake = this.tls.connect(this.server.server_name(), tcp);
            let tls = tokio::time::timeout(this.handshake_timeout, handshake)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "internal TLS handshake timed out",
                    )
                })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

impl rustls::client::ResolvesClientCert for ReloadingCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Which roles may call which gRPC methods: a server's whole policy in one table,
/// enforced for every request before it reaches a handler. Methods the table does
/// not list are refused to everyone.
pub type Policy = fn(service: &str, method: &str, role: Role) -> bool;

/// A tower layer that refuses calls their caller's role may not make
/// (`PERMISSION_DENIED`), and logs and counts each refusal.
#[derive(Clone, Copy)]
pub struct AuthorizeLayer {
    policy: Policy,
}

impl AuthorizeLayer {
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: self.policy,
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: Policy,
}

/// `/package.Service/Method` split into its service and method names.
fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let service = service.rsplit('.').next()?;
    Some((service, method))
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Authorize<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<Peer>().copied();
        let path = request.uri().path();
        let allowed = match (peer, service_and_method(path)) {
            (Some(peer), Some((service, method))) => (self.policy)(service, method, peer.role),
            _ => false,
        };
        if allowed {
            return Box::pin(self.inner.call(request));
        }
        let role = peer.map_or("unauthenticated", |p| p.role.name());
        let addr = peer.map(|p| p.addr.to_string()).unwrap_or_default();
        tracing::warn!(%role, peer = %addr, method = %path, "internal call refused");
        crate::metrics::internal_call_refused(role);
        let status =
            tonic::Status::permission_denied(format!("{role} may not call {path}")).into_http();
        Box::pin(std::future::ready(Ok(status)))
    }
}

/// Writes a CA and one certificate per role into `dir` (`ca.crt`, `ca.key`,
/// `<role>.crt`, `<role>.key`) unless they are all there already (a partial set is
/// replaced as a whole: a new CA and new certificates): for `mailctl dev`,
/// `mailctl pki init` and tests. Production certificates come from cert-manager or
/// the chart. Returns whether new files were written.
pub fn ensure_pki(dir: &Path) -> Result<bool, TlsError> {
    let files = std::iter::once(dir.join("ca.crt"))
        .chain(std::iter::once(dir.join("ca.key")))
        .chain(Role::ALL.into_iter().flat_map(|role| {
            [
                dir.join(format!("{role}.crt")),
                dir.join(format!("{role}.key")),
            ]
        }));
    if files.into_iter().all(|f| f.is_file()) {
        return Ok(false);
    }
    write_pki(dir)?;
    Ok(true)
}

/// Writes a new CA and one certificate per role into `dir`, replacing any there.
pub fn write_pki(dir: &Path) -> Result<(), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let write_public = |path: PathBuf, pem: String| {
        std::fs::write(&path, pem).map_err(|source| TlsError::Read { path, source })
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mailmesh internal CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_key = rcgen::KeyPair::generate().map_err(generate)?;
    let ca_cert = params.self_signed(&ca_key).map_err(generate)?;
    crate::tls::write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    write_public(dir.join("ca.crt"), ca_cert.pem())?;
    let issuer = rcgen::Issuer::new(params, ca_key);
    for role in Role::ALL {
        let mut params = rcgen::CertificateParams::new(vec![role.dns_name()]).map_err(generate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, role.dns_name());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &issuer).map_err(generate)?;
        crate::tls::write_private(
            &dir.join(format!("{role}.key")),
            key.serialize_pem().as_bytes(),
        )?;
        write_public(dir.join(format!("{role}.crt")), cert.pem())?;
    }
    Ok(())
}

/// The internal PKI every test on this machine shares (made once, in the system's
/// temporary directory): tests and tools only.
pub mod testing {
    use std::path::PathBuf;

    use super::{InternalTls, InternalTlsConfig, Role, write_pki};

    /// The directory (`ca.crt`, `<role>.crt`, `<role>.key`).
    pub fn pki() -> PathBuf {
        let dir = std::env::temp_dir().join("mailmesh-test-pki-v1");
        if dir.join("gateway.key").is_file() {
            return dir;
        }
        // Written aside and renamed into place: concurrent test processes each make
        // one, the first rename wins and the others use it.
        let mine = std::env::temp_dir().join(format!(
            "mailmesh-test-pki-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        write_pki(&mine).expect("writing the test PKI");
        if std::fs::rename(&mine, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&mine);
        }
        assert!(dir.join("gateway.key").is_file(), "the test PKI at {dir:?}");
        dir
    }

    pub fn config(role: Role) -> InternalTlsConfig {
        InternalTlsConfig::in_dir(&pki(), role)
    }

    /// `role`'s identity in the test PKI.
    pub fn tls(role: Role) -> InternalTls {
        InternalTls::load(&config(role), role).expect("the test PKI's certificate")
    }

    /// The `MAILMESH_INTERNAL_TLS__*` variables of a service process of `role`.
    pub fn env(role: Role) -> Vec<(&'static str, String)> {
        let c = config(role);
        vec![
            (
                "MAILMESH_INTERNAL_TLS__CERT_FILE",
                c.cert_file.display().to_string(),
            ),
            (
                "MAILMESH_INTERNAL_TLS__KEY_FILE",
                c.key_file.display().to_string(),
            ),
            (
                "MAILMESH_INTERNAL_TLS__CA_FILE",
                c.ca_file.display().to_string(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn load(dir: &Path, role: Role) -> InternalTls {
        InternalTls::load(&InternalTlsConfig::in_dir(dir, role), role).unwrap()
    }

    /// Serves one connection on `server`'s identity; returns the peer the server saw
    /// (None when the handshake was refused) and whether the client got through.
    async fn exchange(
        server: &InternalTls,
        client: &InternalTls,
        expect: Role,
    ) -> (Option<Peer>, bool) {
        let shutdown = Shutdown::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(server.incoming(listener, &shutdown));
        let connector = tokio_rustls::TlsConnector::from(client.client_config());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client_side = tokio::spawn(async move {
            let mut tls = connector.connect(expect.server_name(), tcp).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            Some(buf)
        });
        let seen = tokio::time::timeout(Duration::from_secs(2), incoming.next()).await;
        let peer = match seen {
            Ok(Some(Ok(mut conn))) => {
                let mut buf = [0u8; 4];
                conn.read_exact(&mut buf).await.unwrap();
                conn.write_all(b"pong").await.unwrap();
                conn.flush().await.unwrap();
                Some(tonic::transport::server::Connected::connect_info(&conn))
            }
            _ => None,
        };
        let got = client_side.await.unwrap();
        shutdown.stopped_token().cancel();
        (peer, got == Some(*b"pong"))
    }

    #[tokio::test]
    async fn callers_are_known_by_their_role() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_pki(dir.path()).unwrap());
        assert!(!ensure_pki(dir.path()).unwrap(), "kept when complete");
        let storage = load(dir.path(), Role::Storage);
        for role in [Role::Gateway, Role::Admin, Role::DeliveryWorker] {
            let (peer, ok) = exchange(&storage, &load(dir.path(), role), Role::Storage).await;
            assert!(ok);
            assert_eq!(peer.unwrap().role, role);
        }
    }

    #[tokio::test]
    async fn strangers_and_impostors_are_refused() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        write_pki(ours.path()).unwrap();
        write_pki(theirs.path()).unwrap();
        let storage = load(ours.path(), Role::Storage);
        // A client certificate from another CA, naming a valid role.
        let (peer, ok) = exchange(&storage, &load(theirs.path(), Role::Admin), Role::Storage).await;
        assert!(peer.is_none() && !ok);
        // A server that is not the role the client expects (a gateway posing as
        // storage) is refused by the client.
        let gateway = load(ours.path(), Role::Gateway);
        let (_, ok) = exchange(&gateway, &load(ours.path(), Role::Admin), Role::Storage).await;
        assert!(!ok);
        // A certificate naming no role, or two, identifies nobody.
        let ca = std::fs::read_to_string(ours.path().join("ca.key")).unwrap();
        let key = rcgen::KeyPair::from_pem(&ca).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mailmesh internal CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        // Re-signing the same CA subject with the same key gives an equivalent issuer.
        let issuer = rcgen::Issuer::new(params, key);
        for names in [
            vec!["other.example".to_owned()],
            vec![Role::Admin.dns_name(), Role::Gateway.dns_name()],
            vec![format!("*.{TRUST_DOMAIN}")],
        ] {
            let leaf = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names.clone())
                .unwrap()
                .signed_by(&leaf, &issuer)
                .unwrap();
            let der = cert.der().clone();
            assert_eq!(Role::of_certificate(&der), None, "{names:?}");
            std::fs::write(ours.path().join("odd.crt"), cert.pem()).unwrap();
            std::fs::write(ours.path().join("odd.key"), leaf.serialize_pem()).unwrap();
            let config = InternalTlsConfig {
                cert_file: ours.path().join("odd.crt"),
                key_file: ours.path().join("odd.key"),
                ..InternalTlsConfig::in_dir(ours.path(), Role::Admin)
            };
            let err = InternalTls::load(&config, Role::Admin).unwrap_err();
            assert!(matches!(err, InternalTlsError::WrongRole { .. }), "{err}");
        }
    }

    /// Every connection shows its certificate (a resumed session would keep the
    /// identity of one since replaced), and one address that opens connections
    /// and never handshakes does not take the slots of the others.
    #[tokio::test]
    async fn no_resumption_and_no_address_takes_every_handshake() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path()).unwrap();
        let storage = load(dir.path(), Role::Storage);
        let admin = load(dir.path(), Role::Admin);
        let shutdown = Shutdown::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(storage.incoming(listener, &shutdown));
        tokio::spawn(async move {
            while let Some(Ok(mut conn)) = incoming.next().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1];
                    while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        let _ = conn.write_all(&buf).await;
                    }
                });
            }
        });
        let connector = tokio_rustls::TlsConnector::from(admin.client_config());
        let handshake = |source: &'static str| {
            let connector = connector.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket
                    .bind(SocketAddr::new(source.parse().unwrap(), 0))
                    .unwrap();
                let tcp = socket.connect(addr).await.unwrap();
                let mut tls = tokio::time::timeout(
                    Duration::from_secs(5),
                    connector.connect(Role::Storage.server_name(), tcp),
                )
                .await
                .ok()?
                .ok()?;
                // The server's tickets (if any) arrive with its first data.
                tls.write_all(b"x").await.ok()?;
                let mut buf = [0u8; 1];
                tls.read_exact(&mut buf).await.ok()?;
                Some(tls.get_ref().1.handshake_kind())
            }
        };
        for _ in 0..2 {
            assert_eq!(
                handshake("127.0.0.1").await,
                Some(Some(rustls::HandshakeKind::Full))
            );
        }
        // 40 silent connections from 127.0.0.3: 32 wait for their handshake, the
        // rest are dropped; another address still gets through.
        let mut silent = Vec::new();
        for _ in 0..40 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
            silent.push(socket.connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut dropped = 0;
        for s in &mut silent {
            let mut buf = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await
            {
                dropped += 1;
            }
        }
        assert_eq!(dropped, 40 - 32);
        assert!(handshake("127.0.0.4").await.is_some());
        shutdown.stopped_token().cancel();
    }

    #[tokio::test]
    async fn a_new_ca_is_picked_up_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path()).unwrap();
        let storage = load(dir.path(), Role::Storage);
        let old_admin = load(dir.path(), Role::Admin);
        // Rotation: new CA and certificates on disk; the server still has the old CA.
        let next = tempfile::tempdir().unwrap();
        write_pki(next.path()).unwrap();
        let new_admin = load(next.path(), Role::Admin);
        assert!(!exchange(&storage, &new_admin, Role::Storage).await.1);
        // During the rotation both CAs are trusted (ca.crt holds both).
        let both = [dir.path(), next.path()]
            .map(|d| std::fs::read_to_string(d.join("ca.crt")).unwrap())
            .concat();
        for d in [dir.path(), next.path()] {
            std::fs::write(d.join("ca.crt"), &both).unwrap();
        }
        assert!(storage.roots.reload().unwrap());
        assert!(new_admin.roots.reload().unwrap());
        assert!(exchange(&storage, &new_admin, Role::Storage).await.1);
        assert!(exchange(&storage, &old_admin, Role::Storage).await.1);
        // A broken CA file keeps the previous one.
        std::fs::write(dir.path().join("ca.crt"), "garbage").unwrap();
        assert!(storage.roots.reload().is_err());
        assert!(exchange(&storage, &new_admin, Role::Storage).await.1);
    }
}
