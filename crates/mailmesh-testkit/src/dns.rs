//! A real authoritative DNS server for tests: Debian's `dnsmasq` on a loopback port,
//! answering only the records a test gives it and NXDOMAIN for every other name (it
//! never asks anyone else). `scripts/backends.sh` installs it.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `dnsmasq`; stopped when dropped.
pub struct DnsServer {
    child: Child,
    conf: std::path::PathBuf,
    pub addr: SocketAddr,
}

impl DnsServer {
    /// Starts a server with `records`, lines of dnsmasq configuration such as
    /// `txt-record=example.test,"v=spf1 -all"`, `host-record=mx.example.test,192.0.2.1`,
    /// `ptr-record=1.2.0.192.in-addr.arpa,mx.example.test` or `mx-host=example.test,mx.example.test,10`.
    pub fn start(records: &[String]) -> Self {
        let port = crate::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf =
            std::env::temp_dir().join(format!("mmtest-dnsmasq-{}-{port}.conf", std::process::id()));
        let mut file = std::fs::File::create(&conf).expect("writing the dnsmasq configuration");
        writeln!(
            file,
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n\
             local=/#/\nlog-facility=-"
        )
        .unwrap();
        for record in records {
            writeln!(file, "{record}").unwrap();
        }
        drop(file);
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!("dnsmasq is not installed: run `scripts/backends.sh start` (installs dnsmasq-base)")
            });
        let child = Command::new(binary)
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "dnsmasq did not start on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, conf, addr }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}
