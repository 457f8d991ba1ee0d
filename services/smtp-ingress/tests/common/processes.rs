//! The services as separate processes, as deployed: spawned from the workspace's
//! binaries with `MAILMESH_*` configuration, their output kept for failure reports.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailmesh_kit::internal::Role;
use mailmesh_testkit::{backend_env, free_port};

/// A binary of the workspace, built next to this package's.
pub fn binary(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_smtp-ingress"));
    let path = dir.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built: run the workspace's tests (cargo nextest run --workspace)",
        path.display()
    );
    path
}

pub struct Process(pub Child, pub tempfile::NamedTempFile);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.1.path()).unwrap_or_default()
    }
}

/// The role a service binary's certificate names (ADR 0006).
fn role_of(binary: &str) -> Role {
    match binary {
        "imap-pop3-gateway" => Role::Gateway,
        other => other.parse().unwrap_or_else(|e| panic!("{e}")),
    }
}

/// Spawns a service with `env`, and its identity from the test PKI.
pub fn spawn(name: &str, env: &[(&str, String)]) -> Process {
    let log = tempfile::NamedTempFile::new().unwrap();
    let identity = mailmesh_kit::internal::testing::env(role_of(name));
    let child = Command::new(binary(name))
        .env_clear()
        .envs(identity.iter().map(|(k, v)| (*k, v.as_str())))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Process(child, log)
}

pub fn backends(run: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MAILMESH_TELEMETRY__LOG_FORMAT", "text".into()),
        ("MAILMESH_SHUTDOWN__READINESS_GRACE", "0s".into()),
        (
            "MAILMESH_ADMIN__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        (
            "MAILMESH_QUEUE__KAFKA__BROKERS",
            backend_env("MMTEST_KAFKA"),
        ),
        ("MAILMESH_QUEUE__KAFKA__REPLICATION_FACTOR", "1".into()),
        (
            "MAILMESH_OBJECT_STORE__S3__BUCKET",
            backend_env("MMTEST_S3_BUCKET"),
        ),
        (
            "MAILMESH_OBJECT_STORE__S3__ENDPOINT",
            backend_env("MMTEST_S3"),
        ),
        (
            "MAILMESH_OBJECT_STORE__S3__ACCESS_KEY_ID",
            backend_env("MMTEST_S3_ACCESS_KEY"),
        ),
        (
            "MAILMESH_OBJECT_STORE__S3__SECRET_ACCESS_KEY",
            backend_env("MMTEST_S3_SECRET_KEY"),
        ),
        ("RUN", run.to_owned()),
    ]
    .into_iter()
    .filter(|(k, _)| *k != "RUN")
    .collect()
}

pub async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    logs: &[&Process],
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!("{what} did not happen; logs:\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `user`'s `mailbox` holds `messages` messages; returns its status.
pub async fn wait_for_messages(
    logs: &[&Process],
    mailboxes: &mailmesh_proto::v1::mailboxes_client::MailboxesClient<tonic::transport::Channel>,
    user: &mailmesh_proto::v1::UserRef,
    mailbox: &str,
    messages: u32,
) -> mailmesh_proto::v1::MailboxInfo {
    let what = format!(
        "{messages} message(s) in {mailbox} of user {}",
        user.user_id
    );
    wait_for(&what, logs, || {
        let mut mailboxes = mailboxes.clone();
        let request = mailmesh_proto::v1::MailboxRequest {
            user: Some(user.clone()),
            mailbox: mailbox.into(),
        };
        async move {
            let s = mailboxes.status(request).await.ok()?.into_inner();
            (s.messages == messages).then_some(s)
        }
    })
    .await
}

/// The variables of a service that keeps no state (no queue, no object store).
pub fn stateless(run: &str) -> Vec<(&'static str, String)> {
    backends(run)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("MAILMESH_QUEUE") && !k.starts_with("MAILMESH_OBJECT"))
        .collect()
}

impl Process {
    /// SIGTERM, then waits for the exit (the drain) up to `within`.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A unique suffix without pulling a UUID crate into this test.
pub fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}{}", std::process::id())
}

/// The storage service of run `run` on its own topics, serving gRPC on `port`.
pub fn spawn_storage(run: &str, port: u16) -> Process {
    spawn("storage", &storage_env(run, port))
}

/// HAProxy in the foreground with the configuration file `config` (the tests' load
/// balancer; `scripts/backends.sh` installs it), its output kept like a service's.
pub fn spawn_haproxy(config: &std::path::Path) -> Process {
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(config)
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("haproxy (scripts/backends.sh installs it)");
    Process(child, log)
}

/// A storage replica's settings: the run's topics (4 mailbox partitions), gRPC on
/// `port`, the tests' short passwords allowed.
pub fn storage_env(run: &str, port: u16) -> Vec<(&'static str, String)> {
    let mut env = backends(run);
    env.push(("MAILMESH_GRPC_LISTEN", format!("127.0.0.1:{port}")));
    env.push((
        "MAILMESH_STORAGE__DIRECTORY_TOPIC",
        format!("{run}.directory"),
    ));
    env.push((
        "MAILMESH_STORAGE__MAILBOX_TOPIC",
        format!("{run}.mailboxes"),
    ));
    env.push(("MAILMESH_STORAGE__MAILBOX_PARTITIONS", "4".into()));
    env.extend(relaxed_passwords());
    env
}

/// An imap-pop3-gateway's settings: IMAP on `imap` (plaintext logins allowed), the
/// other ports free, storage at `endpoint`, the certificate pair, the run's Redis
/// prefix.
pub fn gateway_env(
    run: &str,
    imap: u16,
    endpoint: &str,
    (cert, key): (&std::path::Path, &std::path::Path),
) -> Vec<(&'static str, String)> {
    let mut env = stateless(run);
    env.push(("MAILMESH_IMAP_LISTEN", format!("127.0.0.1:{imap}")));
    for key in [
        "MAILMESH_IMAPS_LISTEN",
        "MAILMESH_POP3_LISTEN",
        "MAILMESH_POP3S_LISTEN",
    ] {
        env.push((key, format!("127.0.0.1:{}", free_port())));
    }
    env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.to_owned()));
    env.push(("MAILMESH_TLS__CERT_FILE", cert.display().to_string()));
    env.push(("MAILMESH_TLS__KEY_FILE", key.display().to_string()));
    env.push(("MAILMESH_CACHE__REDIS__URL", backend_env("MMTEST_REDIS")));
    env.push(("MAILMESH_CACHE__REDIS__KEY_PREFIX", format!("{run}:")));
    env.push(("MAILMESH_IMAP__ALLOW_PLAINTEXT_AUTH", "true".into()));
    env
}

/// Storage settings that let the tests' short passwords be set (the policy has
/// tests of its own).
pub fn relaxed_passwords() -> [(&'static str, String); 2] {
    [
        ("MAILMESH_STORAGE__PASSWORD_POLICY__MIN_LENGTH", "1".into()),
        (
            "MAILMESH_STORAGE__PASSWORD_POLICY__REFUSE_COMMON",
            "false".into(),
        ),
    ]
}

/// A channel to storage with `role`'s identity from the test PKI, once it answers.
pub async fn channel_as(
    storage: &Process,
    endpoint: &str,
    role: Role,
) -> tonic::transport::Channel {
    let tls = mailmesh_kit::internal::testing::tls(role);
    wait_for("storage listening", &[storage], || {
        let tls = tls.clone();
        async move {
            let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap();
            tls.connect(endpoint, Role::Storage).await.ok()
        }
    })
    .await
}

/// Tenant `acme` with domain `acme.test` and the users `addresses` (password `pw`),
/// created through the storage gRPC API (as the admin) once it answers. Returns a
/// channel with the gateway's identity and the users as it knows them after their
/// login (with session tokens), for reading their mailboxes as the gateway does, and
/// the admin's channel.
pub async fn acme_with_users(
    storage: &Process,
    endpoint: &str,
    addresses: &[&str],
) -> (
    tonic::transport::Channel,
    Vec<mailmesh_proto::v1::UserRef>,
    tonic::transport::Channel,
) {
    use mailmesh_proto::v1;
    let admin = channel_as(storage, endpoint, Role::Admin).await;
    let mut directory = v1::directory_client::DirectoryClient::new(admin.clone());
    directory
        .add_tenant(v1::AddTenantRequest {
            tenant: "acme".into(),
            limits: None,
        })
        .await
        .unwrap();
    directory
        .add_domain(v1::DomainRequest {
            tenant: "acme".into(),
            domain: "acme.test".into(),
            user: None,
        })
        .await
        .unwrap();
    for address in addresses {
        directory
            .add_user(v1::AddUserRequest {
                address: (*address).to_owned(),
                password: "pw".into(),
                quota_bytes: 0,
            })
            .await
            .unwrap();
    }
    let reader = channel_as(storage, endpoint, Role::Gateway).await;
    let mut users = Vec::new();
    for address in addresses {
        users.push(login(&reader, address).await);
    }
    (reader, users, admin)
}

/// `address` (password `pw`) logged in through `gateway` (a channel with the
/// gateway's identity): the user with a session token.
pub async fn login(
    gateway: &tonic::transport::Channel,
    address: &str,
) -> mailmesh_proto::v1::UserRef {
    use mailmesh_proto::v1;
    let r = v1::directory_client::DirectoryClient::new(gateway.clone())
        .authenticate(v1::AuthenticateRequest {
            address: address.to_owned(),
            password: "pw".into(),
            client_ip: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.ok, "{address} logs in");
    r.user.unwrap().user.unwrap()
}
