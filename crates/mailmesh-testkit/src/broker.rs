//! A Kafka-compatible broker of a test's own (tansu, in memory, on a free loopback
//! port), for faults the shared broker must not suffer: freezes and restarts.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct OwnBroker {
    child: Child,
    port: u16,
}

impl OwnBroker {
    /// Starts tansu (from `PATH`, where `scripts/backends.sh env` puts it) and waits
    /// until it listens.
    pub fn start() -> Self {
        let port = crate::free_port();
        Self {
            child: spawn(port),
            port,
        }
    }

    /// `host:port` for the clients' `brokers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker where it stands (SIGSTOP): connections stay open, nothing
    /// is answered.
    pub fn freeze(&self) {
        signal(&self.child, "-STOP");
    }

    pub fn thaw(&self) {
        signal(&self.child, "-CONT");
    }

    /// SIGKILLs the broker and starts a new one on the same port (in memory: it
    /// comes back without topics).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port);
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        signal(&self.child, "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, which: &str) {
    let status = Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {which} {}", child.id());
}

fn spawn(port: u16) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new("tansu")
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("tansu: {e} (run `scripts/backends.sh start` and `eval \"$(scripts/backends.sh env)\"`, which put it on PATH)")
        });
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}
