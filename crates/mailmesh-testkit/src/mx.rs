//! A small receiving SMTP server for outbound tests: the "remote MX" on a loopback
//! port. It offers PIPELINING, 8BITMIME, SIZE, DSN and (with a certificate)
//! STARTTLS, answers each RCPT as the test's script says, and keeps what arrived.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The reply to `RCPT TO:<address>` on the `n`th time (from 1) this address is seen.
pub type Script = dyn Fn(&str, usize) -> String + Send + Sync;

/// One message as the MX received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub recipients: Vec<String>,
    /// The MAIL FROM line's parameters.
    pub parameters: String,
    /// The content with dot-stuffing undone, CRLF line ends.
    pub data: Vec<u8>,
    pub tls: bool,
    /// Messages sent on this connection before this one.
    pub earlier_on_connection: usize,
}

pub struct TestMx {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    dsn: Arc<AtomicBool>,
}

impl TestMx {
    /// Starts on a free loopback port. `tls`: offer STARTTLS with this configuration.
    pub fn start(tls: Option<Arc<rustls::ServerConfig>>, script: Arc<Script>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let dsn = Arc::new(AtomicBool::new(true));
        let (r, s, st, d) = (received.clone(), seen.clone(), stop.clone(), dsn.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (r, s, tls, script) = (r.clone(), s.clone(), tls.clone(), script.clone());
                let offers_dsn = d.load(Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve(stream, tls, offers_dsn, &*script, &r, &s);
                });
            }
        });
        Self {
            addr,
            received,
            seen,
            stop,
            dsn,
        }
    }

    /// Whether connections from now on are offered DSN (RFC 3461; on by default).
    pub fn offer_dsn(&self, offered: bool) {
        self.dsn.store(offered, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Every RCPT address seen, in order, accepted or not.
    pub fn attempts(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` messages arrived (panics after `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the test MX got {} of {n} messages; RCPTs seen: {:?}",
                got.len(),
                self.attempts()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestMx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

fn serve(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    offers_dsn: bool,
    script: &Script,
    received: &Mutex<Vec<Received>>,
    seen: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut io: BufReader<Box<dyn Io>> = BufReader::new(Box::new(stream.try_clone()?));
    let mut secure = false;
    let mut count = 0;
    io.get_mut()
        .write_all(b"220 mx.remote.test ESMTP test\r\n")?;
    let mut from: Option<(String, String)> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let mut line = String::new();
        if io.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end().to_owned();
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let starttls = if tls.is_some() && !secure {
                "250-STARTTLS\r\n"
            } else {
                ""
            };
            let dsn = if offers_dsn { "250-DSN\r\n" } else { "" };
            format!(
                "250-mx.remote.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n{starttls}{dsn}250 SIZE 10000000\r\n"
            )
        } else if upper.starts_with("HELO") {
            "250 mx.remote.test\r\n".into()
        } else if upper == "STARTTLS" && tls.is_some() && !secure {
            io.get_mut().write_all(b"220 go ahead\r\n")?;
            io.get_mut().flush()?;
            let config = tls.clone().expect("checked");
            let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
            let tcp = stream.try_clone()?;
            io = BufReader::new(Box::new(rustls::StreamOwned::new(conn, tcp)));
            secure = true;
            continue;
        } else if upper.starts_with("MAIL FROM:") {
            let rest = &line[10..];
            let (addr, params) = match rest.find('>') {
                Some(end) => (rest[..end].trim_start_matches('<'), rest[end + 1..].trim()),
                None => (rest, ""),
            };
            from = Some((addr.to_owned(), params.to_owned()));
            rcpts.clear();
            "250 2.1.0 ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            let rest = &line[8..];
            let addr = rest
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_owned();
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push(addr.clone());
                seen.iter().filter(|a| **a == addr).count()
            };
            let reply = script(&addr, n);
            if reply.starts_with('2') {
                rcpts.push(addr);
            }
            format!("{reply}\r\n")
        } else if upper == "DATA" {
            if from.is_none() || rcpts.is_empty() {
                "554 5.5.1 no valid recipients\r\n".into()
            } else {
                io.get_mut().write_all(b"354 go on\r\n")?;
                io.get_mut().flush()?;
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if io.read_until(b'\n', &mut l)? == 0 {
                        return Ok(());
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    let l = if l.starts_with(b"..") {
                        &l[1..]
                    } else {
                        &l[..]
                    };
                    data.extend_from_slice(l);
                }
                let (mail_from, parameters) = from.take().unwrap_or_default();
                received.lock().unwrap().push(Received {
                    mail_from,
                    recipients: std::mem::take(&mut rcpts),
                    parameters,
                    data,
                    tls: secure,
                    earlier_on_connection: count,
                });
                count += 1;
                "250 2.0.0 queued\r\n".into()
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            "250 2.0.0 ok\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 ok\r\n".into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 bye\r\n")?;
            io.get_mut().flush()?;
            return Ok(());
        } else {
            "500 5.5.1 unknown command\r\n".into()
        };
        io.get_mut().write_all(reply.as_bytes())?;
        io.get_mut().flush()?;
    }
}
