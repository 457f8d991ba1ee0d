//! Helpers shared by mailmesh's integration tests. No dependency on other mailmesh
//! crates, so any of them can use it as a dev-dependency.

pub mod dns;
pub mod mx;
pub mod tls;

/// The value of one of the `MMTEST_*` variables that `scripts/backends.sh env` sets
/// for the real backends. A missing one fails the test with the way to fix it: tests
/// against real backends are never skipped silently.
pub fn backend_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the real backends with `scripts/backends.sh start` \
             and `eval \"$(scripts/backends.sh env)\"`"
        )
    })
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The body of the `key: |` block of the ConfigMap in `k8s/mailmesh.yaml` (the chart
/// rendered with its CI values): the configuration file a service gets in a cluster.
pub fn rendered_config(key: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../k8s/mailmesh.yaml");
    let rendered = std::fs::read_to_string(path).expect("k8s/mailmesh.yaml");
    let header = format!("  {key}: |");
    let start = rendered
        .lines()
        .position(|l| l == header)
        .unwrap_or_else(|| panic!("{key} not in k8s/mailmesh.yaml"));
    rendered
        .lines()
        .skip(start + 1)
        .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the rendered chart sets environment variable `name` on some container.
pub fn rendered_sets_env(name: &str) -> bool {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../k8s/mailmesh.yaml");
    std::fs::read_to_string(path)
        .expect("k8s/mailmesh.yaml")
        .contains(&format!("name: {name}\n"))
}

/// Whether dkimpy (Debian's python3-dkim: a verifier written by others) accepts the
/// DKIM signature of `message`, with `record` as the TXT record at `dns_name`.
pub fn dkimpy_verifies(message: &[u8], dns_name: &str, record: &str) -> bool {
    use std::io::Write;
    let program = format!(
        "import sys, dkim\n\
         msg = sys.stdin.buffer.read()\n\
         def dns(name, timeout=5):\n    return {record:?}.encode() if name.decode().rstrip('.') == {dns_name:?} else None\n\
         print(dkim.verify(msg, dnsfunc=dns))\n"
    );
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("Debian's python3 (scripts/backends.sh installs python3-dkim)");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(message)
        .expect("python reads the message");
    let out = child.wait_with_output().expect("python runs");
    assert!(
        out.status.success(),
        "dkimpy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim() == "True"
}
