//! `mailctl` administration against a running `mailctl dev`.

mod common;

use common::{Dev, mailctl, start, wait_ready};

fn ok(dev: &Dev, args: &[&str], stdin: &str) -> String {
    let out = mailctl(dev, args, stdin);
    assert!(
        out.status.success(),
        "mailctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(dev: &Dev, args: &[&str], stdin: &str) -> String {
    let out = mailctl(dev, args, stdin);
    assert!(!out.status.success(), "mailctl {args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    stderr
}

fn json(dev: &Dev, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(dev, &all, "")).unwrap()
}

#[tokio::test]
async fn tenant_domain_and_user_with_their_mailboxes() {
    let dev = start(&[]);
    wait_ready(&dev).await;

    ok(&dev, &["tenant", "add", "acme", "--max-users", "2"], "");
    ok(&dev, &["domain", "add", "acme", "Acme.Test"], "");
    let out = ok(
        &dev,
        &[
            "user",
            "add",
            "alice@acme.test",
            "--password-stdin",
            "--quota",
            "1000000",
        ],
        "correct horse\n",
    );
    assert_eq!(out, "user alice@acme.test added\n");

    let mailboxes = json(&dev, &["mailbox", "list", "ALICE@acme.test"]);
    let names: Vec<&str> = mailboxes
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"]
    );
    assert_eq!(mailboxes[1]["special_use"], "\\Sent");

    let tenants = json(&dev, &["tenant", "list"]);
    assert_eq!(tenants[0]["tenant"], "acme");
    assert_eq!(tenants[0]["domains"][0], "acme.test");
    assert_eq!(tenants[0]["users"], 1);
    assert_eq!(tenants[0]["limits"]["max_users"], 2);
    assert_eq!(tenants[0]["hide_client"], false);
    ok(&dev, &["tenant", "hide-client", "acme", "on"], "");
    assert_eq!(json(&dev, &["tenant", "list"])[0]["hide_client"], true);

    let users = json(&dev, &["user", "list", "acme"]);
    assert_eq!(users[0]["address"], "alice@acme.test");
    assert_eq!(users[0]["quota_bytes"], 1_000_000);
    assert_eq!(users[0]["enabled"], true);

    let quota = json(&dev, &["quota", "show", "alice@acme.test"]);
    assert_eq!(quota["used_bytes"], 0);
    assert_eq!(quota["limit_bytes"], 1_000_000);
    // Without a size the quota goes, and the answer says so (it said "set").
    assert_eq!(
        ok(&dev, &["user", "quota", "alice@acme.test"], ""),
        "quota of alice@acme.test removed\n"
    );
    let quota = json(&dev, &["quota", "show", "alice@acme.test"]);
    assert_eq!(quota["limit_bytes"], serde_json::Value::Null);
    assert_eq!(
        ok(&dev, &["user", "quota", "alice@acme.test", "1000000"], ""),
        "quota of alice@acme.test set to 1000000 bytes\n"
    );
    // JSON answers end their line.
    assert!(ok(&dev, &["--json", "quota", "show", "alice@acme.test"], "").ends_with("}\n"));

    ok(
        &dev,
        &[
            "alias",
            "add",
            "team@acme.test",
            "alice@acme.test",
            "ext@remote.test",
        ],
        "",
    );
    let aliases = json(&dev, &["alias", "list", "acme"]);
    assert_eq!(aliases[0]["targets"][1], "ext@remote.test");

    ok(&dev, &["user", "disable", "alice@acme.test"], "");
    assert_eq!(json(&dev, &["user", "list", "acme"])[0]["enabled"], false);
    ok(
        &dev,
        &["user", "passwd", "alice@acme.test", "--password-stdin"],
        "battery staple\n",
    );
}

#[tokio::test]
async fn refusals_are_clear_and_isolate_tenants() {
    let dev = start(&[]);
    wait_ready(&dev).await;
    ok(&dev, &["tenant", "add", "acme"], "");
    ok(&dev, &["tenant", "add", "globex"], "");
    ok(&dev, &["domain", "add", "acme", "acme.test"], "");

    let err = refused(&dev, &["domain", "add", "globex", "acme.test"], "");
    assert!(err.contains("belongs to another tenant"), "{err}");
    assert!(
        !err.contains("acme\n") && !err.contains("tenant acme"),
        "names the owner: {err}"
    );

    let err = refused(&dev, &["tenant", "add", "Bad_Tenant"], "");
    assert!(err.contains("invalid argument: tenant"), "{err}");
    let err = refused(
        &dev,
        &["user", "add", "nobody@nowhere.test", "--password-stdin"],
        "pw\n",
    );
    assert!(err.contains("not found"), "{err}");
    let err = refused(
        &dev,
        &["user", "add", "bob@acme.test", "--password-stdin"],
        "",
    );
    assert!(err.contains("no password"), "{err}");
    let err = refused(&dev, &["tenant", "remove", "acme"], "");
    assert!(err.contains("still owns domains"), "{err}");
    // globex sees none of acme's users.
    assert_eq!(
        json(&dev, &["user", "list", "globex"]),
        serde_json::json!([])
    );
    ok(&dev, &["domain", "remove", "acme", "acme.test"], "");
    ok(&dev, &["tenant", "remove", "acme"], "");
}

#[test]
fn an_unreachable_endpoint_is_reported() {
    let pki = mailmesh_kit::internal::testing::pki();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args([
            "--endpoint",
            &format!("https://127.0.0.1:{}", common::free_port()),
            "tenant",
            "list",
        ])
        .arg("--pki-dir")
        .arg(&pki)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is `mailctl dev` running?"), "{stderr}");
    assert_eq!(
        stderr.matches("Connection refused").count(),
        1,
        "each cause once: {stderr}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(["--endpoint", "127.0.0.1:7001", "tenant", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a URL such as https://"), "{stderr}");
}

/// mailctl proves it is the admin (ADR 0006): without the admin identity it says
/// where to get one; with a certificate of another CA, or of another role, the dev
/// platform's storage does not serve it.
/// The default password policy (12 characters, no common or trivial password)
/// holds on `user add` and `user passwd`, and says what is wrong.
#[tokio::test]
async fn a_weak_password_is_refused_with_the_reason() {
    let dev = start(&[
        ("MAILMESH_STORAGE__PASSWORD_POLICY__MIN_LENGTH", "12"),
        ("MAILMESH_STORAGE__PASSWORD_POLICY__REFUSE_COMMON", "true"),
    ]);
    wait_ready(&dev).await;
    ok(&dev, &["tenant", "add", "acme"], "");
    ok(&dev, &["domain", "add", "acme", "acme.test"], "");
    let add = ["user", "add", "alice@acme.test", "--password-stdin"];
    let said = refused(&dev, &add, "hunter2\n");
    assert!(
        said.contains("at least 12 characters (this one has 7)"),
        "{said}"
    );
    let said = refused(&dev, &add, "password1234\n");
    assert!(said.contains("most common"), "{said}");
    let said = refused(&dev, &add, "alice@acme.test\n");
    assert!(said.contains("the address itself"), "{said}");
    ok(&dev, &add, "correct-horse-battery\n");
    let passwd = ["user", "passwd", "alice@acme.test", "--password-stdin"];
    let said = refused(&dev, &passwd, "aaaaaaaaaaaaaaaa\n");
    assert!(said.contains("one character repeated"), "{said}");
    ok(&dev, &passwd, "another-long-passphrase\n");
}

#[tokio::test]
async fn only_the_admin_identity_administers() {
    let dev = common::start(&[]);
    common::wait_ready(&dev).await;
    let run = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mailctl"))
            .args(["--endpoint", &dev.storage])
            .args(extra)
            .args(["tenant", "list"])
            .output()
            .unwrap()
    };
    let empty = tempfile::tempdir().unwrap();
    let out = run(&["--pki-dir".as_ref(), empty.path().as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("loading the admin identity") && stderr.contains("--pki-dir"),
        "{stderr}"
    );
    // Another CA's admin certificate.
    let stranger = mailmesh_kit::internal::testing::pki();
    let out = run(&["--pki-dir".as_ref(), stranger.as_os_str()]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The dev platform's own gateway certificate, posing as the admin.
    let pki = dev.data.join("pki");
    let out = run(&[
        "--cert".as_ref(),
        pki.join("gateway.crt").as_os_str(),
        "--key".as_ref(),
        pki.join("gateway.key").as_os_str(),
        "--ca".as_ref(),
        pki.join("ca.crt").as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("gateway.mailmesh.internal"), "{stderr}");
    // And the admin's own works.
    let out = run(&["--pki-dir".as_ref(), pki.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
