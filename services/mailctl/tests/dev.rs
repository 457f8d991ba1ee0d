//! `mailctl dev` as a user runs it: the real binary, its admin port, its signals.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{start, status, wait_ready};

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn serves_probes_and_metrics_on_embedded_backends() {
    let dev = start(&[]);
    wait_ready(&dev).await;
    assert_eq!(
        status(&format!("{}/livez", dev.admin)).await.unwrap().0,
        200
    );
    let (code, metrics) = status(&format!("{}/metrics", dev.admin)).await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("mailmesh_build_info{service=\"mailctl-dev\""),
        "{metrics}"
    );
    // The embedded backends and a self-signed certificate live in the data dir.
    for path in [
        "queue/topics/mail.queue/0.log",
        "tls/tls.crt",
        "tls/tls.key",
        "objects",
    ] {
        assert!(dev.data.join(path).exists(), "{path} missing");
    }
}

#[tokio::test]
async fn sigterm_fails_readiness_first_then_exits_within_the_drain_timeout() {
    let grace = Duration::from_secs(2);
    let drain = Duration::from_secs(5);
    let mut dev = start(&[
        ("MAILMESH_SHUTDOWN__READINESS_GRACE", "2s"),
        ("MAILMESH_SHUTDOWN__DRAIN_TIMEOUT", "5s"),
    ]);
    wait_ready(&dev).await;

    let signalled = Instant::now();
    sigterm(&dev.child);
    // Within the grace period the process is still up, answering "not ready".
    let mut saw_draining = false;
    while signalled.elapsed() < grace {
        match status(&format!("{}/readyz", dev.admin)).await {
            Some((503, body)) if body == "draining\n" => {
                saw_draining = true;
                break;
            }
            Some((200, _)) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("unexpected readiness answer while draining: {other:?}"),
        }
    }
    assert!(
        saw_draining,
        "readiness never failed during the grace period"
    );
    assert_eq!(
        status(&format!("{}/livez", dev.admin)).await.map(|s| s.0),
        Some(200),
        "still alive while draining"
    );

    let deadline = signalled + grace + drain + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = dev.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the drain timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        status(&format!("{}/livez", dev.admin)).await.is_none(),
        "admin port closed"
    );
}

#[test]
fn a_bad_config_value_is_refused_naming_the_key() {
    let output = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(["dev", "--data-dir", "/nonexistent-never-created"])
        .env("MAILMESH_PORTS__IMAP", "not-a-port")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ports.imap"), "{stderr}");
    assert!(stderr.contains("MAILMESH_PORTS__IMAP"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(["dev", "--data-dir", "/nonexistent-never-created"])
        .env("MAILMESH_PORTS__IMAP", "2525")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("configuration key `ports.imap`: port 2525 is already used by ports.smtp"),
        "{stderr}"
    );
    assert!(!std::path::Path::new("/nonexistent-never-created").exists());
}
