//! Server TLS from PEM files that reloads when the files change.
//!
//! cert-manager renews a certificate by rewriting the Secret, which the kubelet swaps
//! into the pod's volume through a symlink. Watching inodes is unreliable across such
//! swaps, so the resolver re-reads the files on an interval and switches to the new
//! certificate when their content changed and parses; a bad renewal keeps the old one.
//! Every new handshake uses the current certificate; sessions in flight keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

use crate::config::{ConfigError, Validate};
use crate::shutdown::Shutdown;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the files are checked for a renewed certificate.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(30)
}

impl Validate for TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.reload_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "tls.reload_interval",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("private key: {0}")]
    Key(rustls::Error),
    #[error("tls config: {0}")]
    Config(rustls::Error),
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
}

/// The files' content last loaded, to notice a renewal.
#[derive(PartialEq, Eq)]
struct Loaded {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A certificate resolver whose certificate can be replaced while serving.
pub struct ReloadingCertResolver {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for ReloadingCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCertResolver")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certified_key(
    loaded: &Loaded,
    cert_file: &Path,
    key_file: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&loaded.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_file.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_file.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&loaded.key).map_err(|e| TlsError::Pem {
        path: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    let signing_key = aws_lc_rs::sign::any_supported_type(&key).map_err(TlsError::Key)?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(TlsError::Key)?;
    Ok(certified)
}

impl ReloadingCertResolver {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let loaded = Loaded {
            cert: read(cert_file)?,
            key: read(key_file)?,
        };
        let key = certified_key(&loaded, cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(key),
            loaded: Mutex::new(loaded),
        })
    }

    /// Re-reads the files; returns `Ok(true)` when a new certificate is now served.
    /// On error the previous certificate stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let fresh = Loaded {
            cert: read(&self.cert_file)?,
            key: read(&self.key_file)?,
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == fresh {
            return Ok(false);
        }
        let key = certified_key(&fresh, &self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(key));
        *loaded = fresh;
        Ok(true)
    }

    /// The certificate chain currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Reloads every `interval` until the shutdown stops.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration, shutdown: &Shutdown) {
        let resolver = Arc::clone(self);
        every(interval, shutdown, move || match resolver.reload() {
            Ok(true) => {
                tracing::info!(cert = %resolver.cert_file.display(), "tls certificate reloaded")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "tls certificate reload failed, keeping the previous one")
            }
        });
    }
}

/// Runs `f` every `interval` (the first time after one interval) until the shutdown
/// stops: the reloaders' loop.
pub(crate) fn every(interval: Duration, shutdown: &Shutdown, mut f: impl FnMut() + Send + 'static) {
    let stopped = shutdown.stopped_token();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = tick.tick() => {}
            }
            f();
        }
    });
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server config serving the resolver's current certificate.
pub fn server_config(
    resolver: Arc<ReloadingCertResolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}

/// Writes a self-signed certificate for `names` into `dir` (for `mailctl dev` and tests)
/// unless one is there already; returns the certificate and key paths.
pub fn ensure_self_signed(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    if cert_path.is_file() && key_path.is_file() {
        return Ok((cert_path, key_path));
    }
    let (cert, key) = self_signed_pem(names)?;
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.to_owned(),
        source,
    })?;
    write_private(&key_path, key.as_bytes())?;
    std::fs::write(&cert_path, cert).map_err(|source| TlsError::Read {
        path: cert_path.clone(),
        source,
    })?;
    Ok((cert_path, key_path))
}

/// A fresh self-signed certificate and key for `names`, in PEM.
pub fn self_signed_pem(names: &[&str]) -> Result<(String, String), TlsError> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((generated.cert.pem(), generated.signing_key.serialize_pem()))
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Accepts any certificate and records the leaf it was shown.
    #[derive(Debug)]
    struct RecordLeaf(Arc<Mutex<Option<Vec<u8>>>>);

    impl rustls::client::danger::ServerCertVerifier for RecordLeaf {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            *self.0.lock().unwrap() = Some(end_entity.to_vec());
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Runs one TLS handshake against `config` and returns the leaf certificate seen.
    async fn served_leaf(config: Arc<rustls::ServerConfig>) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            tls.write_all(b"220 ok\r\n").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let seen = Arc::new(Mutex::new(None));
        let client =
            rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RecordLeaf(seen.clone())))
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut greeting = String::new();
        tls.read_to_string(&mut greeting).await.unwrap();
        assert_eq!(greeting, "220 ok\r\n");
        server.await.unwrap();
        seen.lock().unwrap().take().unwrap()
    }

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn renewed_certificate_is_served_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = ensure_self_signed(dir.path(), &["localhost"]).unwrap();
        let first = std::fs::read_to_string(&cert_path).unwrap();
        let resolver = Arc::new(ReloadingCertResolver::load(&cert_path, &key_path).unwrap());
        let config = server_config(resolver.clone()).unwrap();
        assert_eq!(served_leaf(config.clone()).await, der_of(&first));

        // Unchanged files: nothing to do.
        assert!(!resolver.reload().unwrap());

        // A broken renewal keeps the old certificate.
        std::fs::write(&cert_path, "garbage").unwrap();
        assert!(resolver.reload().is_err());
        assert_eq!(served_leaf(config.clone()).await, der_of(&first));

        // A good renewal is picked up by the next handshake on the same config.
        let (cert, key) = self_signed_pem(&["localhost"]).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        std::fs::write(&cert_path, &cert).unwrap();
        assert!(resolver.reload().unwrap());
        assert_eq!(served_leaf(config).await, der_of(&cert));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, _) = self_signed_pem(&["a"]).unwrap();
        let (_, key_b) = self_signed_pem(&["b"]).unwrap();
        std::fs::write(dir.path().join("c"), cert_a).unwrap();
        std::fs::write(dir.path().join("k"), key_b).unwrap();
        let err =
            ReloadingCertResolver::load(&dir.path().join("c"), &dir.path().join("k")).unwrap_err();
        assert!(matches!(err, TlsError::Key(_)), "{err}");
    }
}

/// The client side of authenticated TLS (MTA-STS MX hosts and policy servers): the
/// server's certificate must chain to a trust anchor, be valid now and name the
/// host (RFC 6125). The anchors are the system's (`/etc/ssl/certs`, or
/// `SSL_CERT_FILE`/`SSL_CERT_DIR`) and the PEM files in `extra_ca_files`.
pub fn verified_client_config(
    extra_ca_files: &[PathBuf],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "reading the system's trust anchors");
    }
    let (_, unusable) = roots.add_parsable_certificates(native.certs);
    if unusable > 0 {
        tracing::debug!(unusable, "system trust anchors rustls cannot use");
    }
    for path in extra_ca_files {
        let pem = std::fs::read(path).map_err(|e| TlsError::Pem {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| TlsError::Pem {
            path: path.clone(),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trust anchors: authenticated TLS (MTA-STS) will fail");
    }
    let provider = Arc::new(aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The client side of opportunistic TLS between MTAs (RFC 7435, RFC 3207): the
/// connection is encrypted, the server is not authenticated (most MX certificates
/// would not pass: self-signed, or named for another host). Handshake signatures
/// are still checked; authenticated delivery (MTA-STS, DANE) needs a verifier.
pub fn opportunistic_client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unauthenticated(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct Unauthenticated(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unauthenticated {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
