//! `scripts/backends.sh start` never uses a program it did not start: when a port it
//! would use is taken by something else (someone's Redis on a shared host), it stops
//! with a message naming the variable that moves it, instead of pointing the tests
//! at that program.

use std::process::Command;

#[test]
fn a_port_taken_by_another_program_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let state = std::env::temp_dir().join(format!(
        "mailmesh-backends-test-{}-{port}",
        std::process::id()
    ));
    // The test crate's directory when the test runs, not when it was compiled: a
    // build cache shared by checkouts at other paths reuses the compiled test.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let script = std::path::Path::new(&dir).join("../../scripts/backends.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("start")
        .env("MAILMESH_REDIS_PORT", &port)
        .env("MAILMESH_BACKENDS_DIR", &state)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started beside a stranger: {said}");
    assert!(
        said.contains(&format!("127.0.0.1:{port} is in use, but not by the redis"))
            && said.contains("MAILMESH_REDIS_PORT=<port>"),
        "{said}"
    );
    // Nothing of ours was started in its place.
    let started = state.join("redis.pid").exists();
    let _ = std::fs::remove_dir_all(&state);
    assert!(!started);
}
