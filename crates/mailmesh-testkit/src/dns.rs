//! A real authoritative DNS server for tests: Debian's `dnsmasq` on a loopback port,
//! answering only the records a test gives it and NXDOMAIN for every other name (it
//! never asks anyone else). `scripts/backends.sh` installs it.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `dnsmasq`; stopped when dropped.
pub struct DnsServer {
    child: Child,
    conf: PathBuf,
    pub addr: SocketAddr,
}

impl DnsServer {
    /// Starts a server with `records`, lines of dnsmasq configuration such as
    /// `txt-record=example.test,"v=spf1 -all"`, `host-record=mx.example.test,192.0.2.1`,
    /// `ptr-record=1.2.0.192.in-addr.arpa,mx.example.test` or
    /// `mx-host=example.test,mx.example.test,10`.
    pub fn start(records: &[String]) -> Self {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "dnsmasq is not installed: run `scripts/backends.sh start` \
                     (installs dnsmasq-base)"
                )
            });
        // A free TCP port may still be taken for UDP, or by a server another test
        // starts at the same moment: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(binary, records) {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("dnsmasq did not start: {last_error}");
    }

    fn try_start(binary: &str, records: &[String]) -> Result<Self, String> {
        let port = crate::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf =
            std::env::temp_dir().join(format!("mmtest-dnsmasq-{}-{port}.conf", std::process::id()));
        let log = conf.with_extension("log");
        let mut file = std::fs::File::create(&conf).map_err(|e| e.to_string())?;
        writeln!(
            file,
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             no-poll\nlocal=/#/"
        )
        .map_err(|e| e.to_string())?;
        for record in records {
            writeln!(file, "{record}").map_err(|e| e.to_string())?;
        }
        drop(file);
        let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut child = Command::new(binary)
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {binary}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let _ = std::fs::remove_file(&log);
                return Ok(Self { child, conf, addr });
            }
            let exited = child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                let _ = std::fs::remove_file(&conf);
                return Err(format!("on {addr}: {}", said.trim()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}
