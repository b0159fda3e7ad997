//! The PROXY protocol (HAProxy's; v1 text and v2 binary, parsed by the `ppp` crate) at the
//! start of downstream connections, for a proxy behind a TCP load balancer that would
//! otherwise hide every client's address (`listen.proxy_protocol`).
//!
//! The header is peeked, not read, until it is whole, and then exactly its bytes are taken
//! from the socket: what follows (a TLS ClientHello, the HTTP/2 preface, a request) stays
//! in the socket for the code that serves the connection.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult as _, v1, v2};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The longest header accepted. A v1 header is at most 107 bytes; a v2 header may carry
/// TLVs, which load balancers keep to a few dozen bytes (AWS's VPC endpoint ID, Azure's link
/// ID), so 1 KiB leaves room without letting a peer make the proxy wait for 64 KiB.
pub const MAX_HEADER: usize = 1024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The peer closed before a whole header arrived.
    #[error("closed before a whole PROXY header")]
    Closed,
    /// The connection does not start with a valid header.
    #[error("invalid or missing PROXY header: {0}")]
    Invalid(String),
    /// More than [`MAX_HEADER`] bytes and still not whole.
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Reading the socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// What a whole header says: its length, and the client's address when it names one.
fn parse(bytes: &[u8]) -> Option<Result<(usize, Option<SocketAddr>), HeaderError>> {
    let header = HeaderResult::parse(bytes);
    if header.is_incomplete() {
        return None;
    }
    Some(match header {
        HeaderResult::V1(Ok(h)) => Ok((
            h.header.len(),
            match h.addresses {
                v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                v1::Addresses::Unknown => None,
            },
        )),
        HeaderResult::V2(Ok(h)) => Ok((
            h.len(),
            // LOCAL: the load balancer's own connection (its health checks).
            match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some((a.source_address, a.source_port).into())
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some((a.source_address, a.source_port).into())
                }
                _ => None,
            },
        )),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
    })
}

/// Takes the PROXY header off the start of `stream` and returns the client address it
/// names (`None` when it names none: v1 `UNKNOWN`, v2 `LOCAL` or a non-IP family; the
/// connection's own peer stands then). The caller bounds the wait (a peer that sends half a
/// header and stops is cut by the request-header timeout).
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        match parse(&buf[..n]) {
            Some(Ok((len, client))) => {
                stream.read_exact(&mut buf[..len]).await?;
                return Ok(client);
            }
            Some(Err(e)) => return Err(e),
            None if n == MAX_HEADER => return Err(HeaderError::TooLong),
            // Load balancers send the header in one segment; a split one is rare, and
            // `peek` would return the same bytes at once, so wait a little between looks.
            None => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 header: PROXY command over TCP, IPv6 or IPv4 by the addresses, with `tlv` bytes.
    fn v2_header(src: SocketAddr, dst: SocketAddr, tlv: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x21); // version 2, PROXY
        let (fam, addrs): (u8, Vec<u8>) = match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                (0x11, [s.ip().octets(), d.ip().octets()].concat())
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                (0x21, [s.ip().octets(), d.ip().octets()].concat())
            }
            _ => unreachable!("one family"),
        };
        h.push(fam);
        let len = addrs.len() + 4 + tlv.len();
        h.extend_from_slice(&(len as u16).to_be_bytes());
        h.extend_from_slice(&addrs);
        h.extend_from_slice(&src.port().to_be_bytes());
        h.extend_from_slice(&dst.port().to_be_bytes());
        h.extend_from_slice(tlv);
        h
    }

    #[test]
    fn whole_headers_give_their_length_and_client() {
        let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\nGET / HTTP/1.1\r\n";
        let (len, client) = parse(v1).expect("whole").expect("valid");
        assert_eq!(&v1[len..], b"GET / HTTP/1.1\r\n");
        assert_eq!(client, Some("203.0.113.7:40000".parse().expect("addr")));
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n";
        let (len, client) = parse(v1).expect("whole").expect("valid");
        assert_eq!(len, v1.len());
        assert_eq!(client, Some("[2001:db8::7]:40000".parse().expect("addr")));
        let (len, client) = parse(b"PROXY UNKNOWN\r\nx").expect("whole").expect("valid");
        assert_eq!((len, client), (15, None));

        let src: SocketAddr = "[2001:db8::9]:5000".parse().expect("addr");
        let dst: SocketAddr = "[2001:db8::1]:443".parse().expect("addr");
        let mut v2 = v2_header(src, dst, &[0x04, 0x00, 0x02, 0xab, 0xcd]); // a NOOP TLV
        let header_len = v2.len();
        v2.extend_from_slice(b"\x16\x03\x01"); // a ClientHello follows
        let (len, client) = parse(&v2).expect("whole").expect("valid");
        assert_eq!((len, client), (header_len, Some(src)));
        let src4: SocketAddr = "198.51.100.4:1234".parse().expect("addr");
        let v2 = v2_header(src4, "192.0.2.1:80".parse().expect("addr"), &[]);
        assert_eq!(
            parse(&v2).expect("whole").expect("valid"),
            (v2.len(), Some(src4))
        );
        // LOCAL (the load balancer's own health check): no client address.
        let mut local = v2.clone();
        local[12] = 0x20;
        assert_eq!(
            parse(&local).expect("whole").expect("valid"),
            (v2.len(), None)
        );
    }

    #[test]
    fn partial_headers_wait_and_others_are_refused() {
        assert!(parse(b"PROXY TCP4 203.0.113.7 19").is_none());
        let v2 = v2_header(
            "198.51.100.4:1234".parse().expect("addr"),
            "192.0.2.1:80".parse().expect("addr"),
            &[],
        );
        assert!(parse(&v2[..20]).is_none());
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(
                matches!(parse(bad), Some(Err(HeaderError::Invalid(_)))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
