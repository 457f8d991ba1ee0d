//! Mail through `mailctl dev` as a user sends it: Python's smtplib (a client written
//! by others) talks to the SMTP port over STARTTLS, and the message lands in the
//! user's INBOX.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Dev, mailctl, start, wait_ready};

fn ok(dev: &Dev, args: &[&str], stdin: &str) -> String {
    let out = mailctl(dev, args, stdin);
    assert!(
        out.status.success(),
        "mailctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a Python smtplib script against the dev SMTP port; returns its output.
fn smtplib(dev: &Dev, script: &str) -> String {
    let program = format!(
        "import smtplib\ns = smtplib.SMTP('127.0.0.1', {port}, timeout=30)\n{script}\n",
        port = dev.smtp_port
    );
    let out = Command::new("python3")
        .args(["-c", &program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python smtplib failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn inbox_count(dev: &Dev, address: &str) -> u64 {
    let list: serde_json::Value =
        serde_json::from_str(&ok(dev, &["--json", "mailbox", "list", address], "")).unwrap();
    list[0]["messages"].as_u64().unwrap()
}

#[tokio::test]
async fn smtplib_sends_and_the_message_lands_in_the_inbox() {
    let dev = start(&[]);
    wait_ready(&dev).await;
    ok(&dev, &["tenant", "add", "acme"], "");
    ok(&dev, &["domain", "add", "acme", "acme.test"], "");
    ok(
        &dev,
        &["user", "add", "alice@acme.test", "--password-stdin"],
        "pw\n",
    );
    ok(
        &dev,
        &["user", "add", "bob@acme.test", "--password-stdin"],
        "pw\n",
    );

    let script = r#"
import ssl
s.ehlo('client.example.org')
s.starttls(context=ssl._create_unverified_context())
s.ehlo('client.example.org')
print('pipelining' in s.esmtp_features, 'smtputf8' in s.esmtp_features)
refused = s.sendmail('sender@example.org', ['alice@acme.test', 'bob@acme.test'],
    b'Subject: hello\r\nFrom: sender@example.org\r\n\r\nHi from smtplib\r\n')
print('refused', refused)
try:
    s.sendmail('sender@example.org', ['nobody@elsewhere.example'], b'Subject: x\r\n\r\nx\r\n')
except smtplib.SMTPRecipientsRefused as e:
    print('relay', e.recipients['nobody@elsewhere.example'][0])
s.quit()
"#;
    let out = smtplib(&dev, script);
    assert_eq!(out, "True True\nrefused {}\nrelay 550\n");

    // A message to two local users lands once in each.
    let deadline = Instant::now() + Duration::from_secs(30);
    while inbox_count(&dev, "alice@acme.test") < 1 || inbox_count(&dev, "bob@acme.test") < 1 {
        assert!(
            Instant::now() < deadline,
            "the message never reached both INBOXes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(inbox_count(&dev, "alice@acme.test"), 1);
    assert_eq!(inbox_count(&dev, "bob@acme.test"), 1);
}
