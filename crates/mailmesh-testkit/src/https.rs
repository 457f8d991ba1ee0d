//! A tiny HTTPS server for tests (an MTA-STS policy host): one answer per path,
//! HTTP/1.1 with `Connection: close`, on a free loopback port.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a request for a path gets: status line (e.g. `200 OK`), content type, body.
pub type Answer = (String, String, Vec<u8>);

pub struct HttpsServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
}

impl HttpsServer {
    /// Serves `answer` for every path until the process ends.
    pub fn start(tls: Arc<rustls::ServerConfig>, answer: Answer) -> Self {
        let port = crate::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (answer.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (a, r, tls) = (a.clone(), r.clone(), tls.clone());
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(tls) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    let mut head = Vec::new();
                    let mut reader = BufReader::new(&mut tls);
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => head.push(line),
                        }
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let (status, content_type, body) = a.lock().unwrap().clone();
                    let mut out = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    out.extend_from_slice(&body);
                    let _ = tls.write_all(&out);
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        Self {
            addr,
            answer,
            requests,
        }
    }

    /// Answers differently from now on.
    pub fn set_answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
