//! Running `mailctl dev` and `mailctl` commands as a user does, from tests.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use mailmesh_testkit::free_port;

pub struct Dev {
    pub child: Child,
    pub admin: String,
    pub storage: String,
    pub smtp_port: String,
    pub pop3_port: String,
    pub imap_port: String,
    pub submission_port: String,
    _dir: tempfile::TempDir,
    pub data: std::path::PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mailctl dev` on free ports with a fresh data directory.
pub fn start(env: &[(&str, &str)]) -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = format!("127.0.0.1:{}", free_port());
    let storage_port = free_port().to_string();
    let smtp_port = free_port().to_string();
    let pop3_port = free_port().to_string();
    let imap_port = free_port().to_string();
    let submission_port = free_port().to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(["dev", "--data-dir"])
        .arg(&data)
        .args(["--admin-listen", &admin])
        .env("MAILMESH_PORTS__STORAGE", &storage_port)
        // Short test passwords; `a_weak_password_is_refused_with_the_reason` keeps
        // the default policy.
        .env("MAILMESH_STORAGE__PASSWORD_POLICY__MIN_LENGTH", "1")
        .env("MAILMESH_STORAGE__PASSWORD_POLICY__REFUSE_COMMON", "false")
        .env("MAILMESH_PORTS__SMTP", &smtp_port)
        .env("MAILMESH_PORTS__POP3", &pop3_port)
        .env("MAILMESH_PORTS__POP3S", free_port().to_string())
        .env("MAILMESH_PORTS__IMAP", &imap_port)
        .env("MAILMESH_PORTS__IMAPS", free_port().to_string())
        .env("MAILMESH_PORTS__SUBMISSION", &submission_port)
        .env("MAILMESH_PORTS__SUBMISSIONS", free_port().to_string())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Dev {
        child,
        admin: format!("http://{admin}"),
        storage: format!("https://127.0.0.1:{storage_port}"),
        smtp_port,
        pop3_port,
        imap_port,
        submission_port,
        _dir: dir,
        data,
    }
}

pub async fn status(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

pub async fn wait_ready(dev: &Dev) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, _)) = status(&format!("{}/readyz", dev.admin)).await {
            return;
        }
        assert!(Instant::now() < deadline, "mailctl dev never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `mailctl ARGS` against `dev`, with `stdin` as standard input.
pub fn mailctl(dev: &Dev, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(["--endpoint", &dev.storage])
        .arg("--pki-dir")
        .arg(dev.data.join("pki"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
