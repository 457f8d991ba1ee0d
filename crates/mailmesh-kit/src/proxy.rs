//! PROXY protocol v1 and v2 (HAProxy) from trusted load balancers: the header that
//! precedes a mail conversation carries the real client address, which then goes
//! into Received headers, rate and login limits, policy and logs. Connections from
//! anywhere else are never trusted to say who they are.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::HeaderResult;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest v2 address block accepted (TLVs included).
const MAX_HEADER: usize = 1024;
/// A v1 header's longest form, CRLF included.
const V1_MAX: usize = 107;
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

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
        // A dual-stack listener sees an IPv4 balancer as ::ffff:a.b.c.d.
        let peer = peer.to_canonical();
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

/// Reads the PROXY header, byte-exactly (nothing after it is consumed, so a TLS
/// handshake or the client's first command follows untouched); returns the client it
/// names (the peer itself for `LOCAL`/`UNKNOWN`, as health checks send).
pub async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr, ProxyError> {
    let read = async {
        // v1 starts "PROXY " and ends at CRLF (at most 107 bytes); v2 starts with
        // a 12-byte signature and says its own length in bytes 15-16.
        let mut buf = vec![0u8; 5];
        reader.read_exact(&mut buf).await?;
        if buf == b"PROXY" {
            while !buf.ends_with(b"\r\n") {
                if buf.len() >= V1_MAX {
                    return Err(ProxyError::Invalid);
                }
                buf.push(reader.read_u8().await?);
            }
        } else if buf == V2_SIGNATURE[..5] {
            buf.resize(16, 0);
            reader.read_exact(&mut buf[5..]).await?;
            let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            if len > MAX_HEADER {
                return Err(ProxyError::Invalid);
            }
            buf.resize(16 + len, 0);
            reader.read_exact(&mut buf[16..]).await?;
        } else {
            return Err(ProxyError::Invalid);
        }
        match HeaderResult::parse(&buf) {
            HeaderResult::V1(Ok(h)) => Ok(v1_client(&h.addresses, peer)),
            // LOCAL (the balancer's own health checks): its addresses mean nothing.
            HeaderResult::V2(Ok(h)) if h.command == ppp::v2::Command::Local => Ok(peer),
            HeaderResult::V2(Ok(h)) => Ok(v2_client(&h.addresses, peer)),
            _ => Err(ProxyError::Invalid),
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Err(ProxyError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ProxyError::Invalid)
        }
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout),
    }
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
        let client = read_header(&mut v1, peer(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, "203.0.113.5:4567".parse().unwrap());
        assert_eq!(v1, b"EHLO x\r\n", "nothing after the header is consumed");

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
        let mut with_tls = header.clone();
        with_tls.extend_from_slice(b"\x16\x03\x01");
        let mut v2: &[u8] = &with_tls;
        let client = read_header(&mut v2, peer(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, "[2001:db8::7]:4000".parse().unwrap());
        assert_eq!(v2, b"\x16\x03\x01", "a TLS handshake after it is untouched");

        let mut local: &[u8] = b"PROXY UNKNOWN\r\n";
        let client = read_header(&mut local, peer(), Duration::from_secs(1))
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
        assert!(config.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!config.trusts("192.0.2.1".parse().unwrap()));
    }
}
