//! PROXY protocol v1 and v2 (HAProxy) from trusted load balancers: the header that
//! precedes the SMTP conversation carries the real client address, which then goes
//! into Received headers, policy and logs. Connections from anywhere else are never
//! trusted to say who they are.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest header accepted (v1 is at most 107 bytes; v2 with TLVs can be longer).
const MAX_HEADER: usize = 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Networks whose connections must start with a PROXY header (the load
    /// balancers). Empty: PROXY protocol is off.
    pub trusted: Vec<IpNet>,
    /// How long a trusted peer may take to send the header.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

impl ProxyConfig {
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&peer))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no valid PROXY header from a trusted peer")]
    Invalid,
    #[error("PROXY header not received in time")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY header; returns the client it names (the peer itself for
/// `LOCAL`/`UNKNOWN`, as health checks send) and any bytes read past the header.
pub async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<(SocketAddr, Vec<u8>), ProxyError> {
    let mut buf = Vec::with_capacity(128);
    let read = async {
        let mut chunk = [0u8; 256];
        loop {
            let parsed = HeaderResult::parse(&buf);
            if !parsed.is_incomplete() {
                let (client, used) = match parsed {
                    HeaderResult::V1(Ok(h)) => (v1_client(&h.addresses, peer), h.header.len()),
                    HeaderResult::V2(Ok(h)) => (v2_client(&h.addresses, peer), h.len()),
                    _ => return Err(ProxyError::Invalid),
                };
                return Ok((client, buf[used..].to_vec()));
            }
            if buf.len() >= MAX_HEADER {
                return Err(ProxyError::Invalid);
            }
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                return Err(ProxyError::Invalid);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ProxyError::Timeout)?
}

fn v1_client(addresses: &ppp::v1::Addresses, peer: SocketAddr) -> SocketAddr {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Unknown => peer,
    }
}

fn v2_client(addresses: &ppp::v2::Addresses, peer: SocketAddr) -> SocketAddr {
    match addresses {
        ppp::v2::Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v2::Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.9:5000".parse().unwrap()
    }

    #[tokio::test]
    async fn v1_and_v2_headers_name_the_client() {
        let mut v1: &[u8] = b"PROXY TCP4 203.0.113.5 198.51.100.1 4567 25\r\nEHLO x\r\n";
        let (client, rest) = read_header(&mut v1, peer(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, "203.0.113.5:4567".parse().unwrap());
        assert_eq!(rest, b"EHLO x\r\n");

        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::7]:4000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:25".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut v2: &[u8] = &header;
        let (client, rest) = read_header(&mut v2, peer(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, "[2001:db8::7]:4000".parse().unwrap());
        assert!(rest.is_empty());

        let mut local: &[u8] = b"PROXY UNKNOWN\r\n";
        let (client, _) = read_header(&mut local, peer(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, peer());
    }

    #[tokio::test]
    async fn garbage_and_silence_are_refused() {
        let mut smtp: &[u8] = b"EHLO not-a-proxy-header\r\n";
        assert!(matches!(
            read_header(&mut smtp, peer(), Duration::from_secs(1)).await,
            Err(ProxyError::Invalid)
        ));
        let long = vec![b'P'; 5000];
        let mut long: &[u8] = &long;
        assert!(
            read_header(&mut long, peer(), Duration::from_secs(1))
                .await
                .is_err()
        );
        let (_client, server) = tokio::io::duplex(64);
        let mut server = server;
        assert!(matches!(
            read_header(&mut server, peer(), Duration::from_millis(50)).await,
            Err(ProxyError::Timeout)
        ));
    }

    #[test]
    fn trust_is_by_network() {
        let config = ProxyConfig {
            trusted: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            timeout: None,
        };
        assert!(config.trusts("10.1.2.3".parse().unwrap()));
        assert!(config.trusts("fd00::1".parse().unwrap()));
        assert!(!config.trusts("192.0.2.1".parse().unwrap()));
    }
}
