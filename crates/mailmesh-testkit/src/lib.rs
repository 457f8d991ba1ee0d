//! Helpers shared by mailmesh's integration tests. No dependency on other mailmesh
//! crates, so any of them can use it as a dev-dependency.

pub mod broker;
pub mod dns;
pub mod https;
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

/// A loopback TCP port for a server a test starts, free now and handed to no other
/// test on this machine for the next ten minutes.
///
/// Not `bind(0)`: the kernel takes those from the ephemeral range, which outgoing
/// connections (every test's clients) use as source ports too, and a port released
/// by one test process can be handed to the next at once — a server then fails to
/// bind, or a client reaches another test's server. Ports here come from below the
/// ephemeral range, and a claim file per port in the system temporary directory keeps
/// concurrently running test processes (nextest runs each test in its own) apart.
pub fn free_port() -> u16 {
    use std::time::{Duration, SystemTime};
    const FIRST: u16 = 20_000;
    const COUNT: u32 = 12_000; // up to 31999, below Linux's default 32768..60999
    const CLAIM_LIFETIME: Duration = Duration::from_secs(600);
    let claims = std::env::temp_dir().join("mailmesh-test-ports");
    std::fs::create_dir_all(&claims).expect("a directory for port claims");
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for step in 0..COUNT {
        let port = FIRST + ((seed.wrapping_add(step.wrapping_mul(7_919))) % COUNT) as u16;
        let claim = claims.join(port.to_string());
        let stale = std::fs::metadata(&claim)
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().unwrap_or_default() > CLAIM_LIFETIME);
        if stale {
            let _ = std::fs::remove_file(&claim);
        }
        let claimed = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
            .is_ok();
        if claimed && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port in {FIRST}..{}",
        u32::from(FIRST) + COUNT
    );
}

/// `k8s/mailmesh.yaml`, found from the test crate's directory when the test runs
/// (cargo and nextest set `CARGO_MANIFEST_DIR` then; every test crate sits two levels
/// down). Not the directory this crate was compiled in: a build cache shared by
/// checkouts at other paths reuses the compiled crate.
fn rendered_chart() -> String {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let path = std::path::Path::new(&dir).join("../../k8s/mailmesh.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The body of the `key: |` block of the ConfigMap in `k8s/mailmesh.yaml` (the chart
/// rendered with its CI values): the configuration file a service gets in a cluster.
pub fn rendered_config(key: &str) -> String {
    let rendered = rendered_chart();
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
    rendered_chart().contains(&format!("name: {name}\n"))
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
