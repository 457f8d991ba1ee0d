//! Helpers shared by mailmesh's integration tests. No dependency on other mailmesh
//! crates, so any of them can use it as a dev-dependency.

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
