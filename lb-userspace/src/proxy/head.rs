//! The upstream request head, encoded in one pass straight from the downstream request.
//!
//! Instead of editing the request's `HeaderMap` (removing hop-by-hop headers, inserting
//! `X-Forwarded-*` and `Forwarded`: a hash lookup or insertion per name, and growing the map)
//! and then serialising it, the head is written once: hop-by-hop headers and the ones the
//! proxy replaces are skipped as they are met, and the proxy's own headers are appended.

use std::net::IpAddr;
use std::ops::Range;

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-ID`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How a request header is treated on its way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Hop-by-hop (RFC 9110 §7.6.1, plus the legacy ones proxies still see): dropped.
    Hop,
    /// `Connection` (hop-by-hop too; its options and nominated names are read).
    Connection,
    /// `Upgrade`: kept only for upgrade requests.
    Upgrade,
    Host,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    Forwarded,
    XRealIp,
    XRequestId,
    Other,
}

fn classify(n: &HeaderName) -> Class {
    // Standard names compare as enum values (cheap); the rest by their (lower-case) text.
    if *n == header::CONNECTION {
        Class::Connection
    } else if *n == header::TE
        || *n == header::TRAILER
        || *n == header::TRANSFER_ENCODING
        || *n == header::PROXY_AUTHENTICATE
        || *n == header::PROXY_AUTHORIZATION
    {
        Class::Hop
    } else if *n == header::UPGRADE {
        Class::Upgrade
    } else if *n == header::HOST {
        Class::Host
    } else if *n == header::FORWARDED {
        Class::Forwarded
    } else {
        match n.as_str() {
            "keep-alive" | "proxy-connection" => Class::Hop,
            "x-forwarded-for" => Class::XForwardedFor,
            "x-forwarded-proto" => Class::XForwardedProto,
            "x-forwarded-host" => Class::XForwardedHost,
            "x-real-ip" => Class::XRealIp,
            "x-request-id" => Class::XRequestId,
            _ => Class::Other,
        }
    }
}

/// [`classify`] for a name as received (any case).
fn classify_raw(n: &[u8]) -> Class {
    let is = |lit: &[u8]| n.eq_ignore_ascii_case(lit);
    // By length first: most names are none of these and fail on the length.
    match n.len() {
        2 if is(b"te") => Class::Hop,
        4 if is(b"host") => Class::Host,
        7 if is(b"upgrade") => Class::Upgrade,
        7 if is(b"trailer") => Class::Hop,
        9 if is(b"forwarded") => Class::Forwarded,
        9 if is(b"x-real-ip") => Class::XRealIp,
        10 if is(b"connection") => Class::Connection,
        10 if is(b"keep-alive") => Class::Hop,
        12 if is(b"x-request-id") => Class::XRequestId,
        15 if is(b"x-forwarded-for") => Class::XForwardedFor,
        16 if is(b"proxy-connection") => Class::Hop,
        16 if is(b"x-forwarded-host") => Class::XForwardedHost,
        17 if is(b"transfer-encoding") => Class::Hop,
        17 if is(b"x-forwarded-proto") => Class::XForwardedProto,
        18 if is(b"proxy-authenticate") => Class::Hop,
        19 if is(b"proxy-authorization") => Class::Hop,
        _ => Class::Other,
    }
}

/// Whether a response header is hop-by-hop (`Upgrade` included: responses other than 101
/// never pass it on).
pub(crate) fn is_hop_by_hop_response(n: &HeaderName) -> bool {
    matches!(classify(n), Class::Hop | Class::Connection | Class::Upgrade)
}

/// [`is_hop_by_hop_response`] for a name as received (any case).
pub(crate) fn is_hop_by_hop_response_raw(n: &[u8]) -> bool {
    matches!(
        classify_raw(n),
        Class::Hop | Class::Connection | Class::Upgrade
    )
}

/// (name start, name end, value start, value end) of a header line in a head's bytes.
pub(crate) type Span = (u32, u32, u32, u32);

/// A request's headers: hyper's map, or the fast path's header positions in the raw head.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Headers<'a> {
    Map(&'a HeaderMap),
    Raw { head: &'a [u8], spans: &'a [Span] },
}

impl<'a> Headers<'a> {
    /// Calls `f(name, value, class)` for each header in order.
    fn each(&self, mut f: impl FnMut(&'a [u8], &'a [u8], Class)) {
        match *self {
            Headers::Map(m) => {
                for (n, v) in m {
                    f(n.as_str().as_bytes(), v.as_bytes(), classify(n));
                }
            }
            Headers::Raw { head, spans } => {
                for &(ns, ne, vs, ve) in spans {
                    let n = &head[ns as usize..ne as usize];
                    f(n, &head[vs as usize..ve as usize], classify_raw(n));
                }
            }
        }
    }

    /// The values of the headers of `class`, in order.
    fn each_of(&self, class: Class, mut f: impl FnMut(&'a [u8])) {
        self.each(|_, v, c| {
            if c == class {
                f(v);
            }
        });
    }

    /// The first value of `name`.
    pub(crate) fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        match *self {
            Headers::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            Headers::Raw { head, spans } => spans.iter().find_map(|&(ns, ne, vs, ve)| {
                head[ns as usize..ne as usize]
                    .eq_ignore_ascii_case(name.as_str().as_bytes())
                    .then(|| &head[vs as usize..ve as usize])
            }),
        }
    }
}

/// The names a `Connection` header value nominates as hop-by-hop (`close`, `keep-alive` and
/// `upgrade` are options, not names), in the order given.
pub(crate) fn nominated(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && !t.eq_ignore_ascii_case(b"upgrade")
        })
}

/// Per-connection text of the client address, built once when the connection is accepted.
#[derive(Debug)]
pub(crate) struct ClientText {
    /// The address as written in `X-Forwarded-For`.
    ip: Box<str>,
    /// `for=…` of the `Forwarded` element (RFC 7239: IPv6 quoted and bracketed).
    forwarded_for: Box<str>,
}

impl ClientText {
    pub(crate) fn new(ip: IpAddr) -> Self {
        let forwarded_for = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        Self {
            ip: ip.to_string().into(),
            forwarded_for: forwarded_for.into(),
        }
    }
}

/// Where a request came from, as its upstream head tells it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    /// The connection's peer.
    pub peer: &'a ClientText,
    /// The peer is a trusted proxy (`forwarded_headers.trusted_proxies`): the request's own
    /// `X-Forwarded-*` and `Forwarded` are kept, not replaced.
    pub trusted: bool,
    /// The original client ([`original_client`]); the peer's address unless `trusted`.
    pub client: IpAddr,
}

/// The original client of a request from a trusted proxy: `X-Forwarded-For` read from the
/// right past every trusted address (nginx's `real_ip_recursive`), so that an address a
/// client wrote itself at the left is never believed. An entry that is not an address ends
/// the walk at the trusted hop after it; when every entry is trusted, the leftmost is taken.
pub(crate) fn original_client(
    peer: IpAddr,
    headers: &Headers<'_>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let mut values: Vec<&[u8]> = Vec::new();
    headers.each_of(Class::XForwardedFor, |v| values.push(v));
    let mut client = peer.to_canonical();
    for entry in values.iter().rev().flat_map(|v| v.rsplit(|b| *b == b',')) {
        let Some(ip) = forwarded_address(entry.trim_ascii()) else {
            break;
        };
        client = ip;
        if !super::config::is_in(trusted, ip) {
            break;
        }
    }
    client
}

/// An `X-Forwarded-For` entry's address: `192.0.2.1`, `2001:db8::1`, and the forms with a
/// port some proxies write (`192.0.2.1:443`, `[2001:db8::1]:443`, `[2001:db8::1]`).
fn forwarded_address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let ip = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<std::net::SocketAddr>().map(|a| a.ip()))
        .ok()
        .or_else(|| text.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

/// A request's `X-Request-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestId {
    /// The client's own, well-formed ([`RequestId::of`]).
    Client(Box<str>),
    /// 32 random hexadecimal digits (as nginx's `$request_id`).
    Generated([u8; 32]),
}

impl RequestId {
    /// The client's `X-Request-ID` when it is well-formed, else a new one. Well-formed is 1 to
    /// 128 characters of letters, digits and `-_.:+/=@` (UUIDs, hex, base64): what a client
    /// writes there reaches the access log and the application's logs, so nothing that could
    /// forge a field or a line is kept.
    pub(crate) fn of(headers: &Headers<'_>) -> Self {
        let ok = |v: &[u8]| {
            (1..=128).contains(&v.len())
                && v.iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=@".contains(b))
        };
        match headers.get(&X_REQUEST_ID) {
            // ASCII, so the conversion cannot fail.
            Some(v) if ok(v) => Self::Client(std::str::from_utf8(v).unwrap_or_default().into()),
            _ => Self::generate(),
        }
    }

    fn generate() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n: u128 = rand::random();
        let mut id = [0u8; 32];
        for (i, d) in id.iter_mut().enumerate() {
            *d = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
        }
        Self::Generated(id)
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Client(s) => s,
            // Hexadecimal digits are ASCII.
            Self::Generated(id) => std::str::from_utf8(id).unwrap_or_default(),
        }
    }
}

/// What the head is built from, besides the request's own headers.
#[derive(Debug)]
pub(crate) struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin-form target (path and query).
    pub target: &'a str,
    /// The host the request was routed on (`Host`, or the target's authority).
    pub host: &'a str,
    pub headers: Headers<'a>,
    /// The request may ask for an upgrade (HTTP/1.1). It does when it has an `Upgrade`
    /// header and `upgrade` in `Connection`; then `Upgrade` is kept and `Connection:
    /// upgrade` sent.
    pub may_upgrade: bool,
    /// The body is sent chunked (its length is unknown).
    pub chunked: bool,
    pub origin: Origin<'a>,
    /// The request came over TLS (to this proxy).
    pub https: bool,
    /// Sent as `X-Request-ID` (replacing the client's); `None`: the client's passes as is.
    pub request_id: Option<&'a RequestId>,
}

/// Where the values the proxy set are in the encoded head (for hashing on them).
#[derive(Debug, Default, Clone)]
pub(crate) struct SetValues {
    host: Range<usize>,
    x_forwarded_for: Range<usize>,
    x_forwarded_proto: Range<usize>,
    x_forwarded_host: Range<usize>,
    forwarded: Range<usize>,
    x_real_ip: Range<usize>,
}

impl SetValues {
    /// The value the upstream gets for `name` if the proxy set it.
    pub(crate) fn get<'b>(&self, head: &'b [u8], name: &HeaderName) -> Option<&'b [u8]> {
        let r = match classify(name) {
            Class::Host => &self.host,
            Class::XForwardedFor => &self.x_forwarded_for,
            Class::XForwardedProto => &self.x_forwarded_proto,
            Class::XForwardedHost => &self.x_forwarded_host,
            Class::Forwarded => &self.forwarded,
            Class::XRealIp => &self.x_real_ip,
            _ => return None,
        };
        head.get(r.clone())
    }
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `name: ` and returns where the value starts.
fn start_header(out: &mut Vec<u8>, name: &[u8]) -> usize {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.len()
}

/// Previous values of a list header, joined, then ", " before the proxy's element.
fn put_prior(out: &mut Vec<u8>, headers: &Headers<'_>, class: Class) {
    headers.each_of(class, |v| {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    });
}

/// What [`put_headers`] met on its way.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    x_forwarded_for: bool,
    forwarded: bool,
    /// A `Connection` header nominated names.
    nominates: bool,
    upgrade_header: bool,
    /// `upgrade` among the `Connection` options.
    connection_upgrade: bool,
}

/// Writes the request's own headers that go upstream, skipping the hop-by-hop ones (all of
/// them but `Upgrade` when `upgrade`), those the proxy sets itself, and the `skip` names.
fn put_headers(out: &mut Vec<u8>, r: &RequestHead<'_>, skip: &[&[u8]], upgrade: bool) -> Seen {
    let mut seen = Seen::default();
    r.headers.each(|name, value, class| match class {
        // The proxy sets its own (or keeps the client's: the same value).
        Class::XRequestId if r.request_id.is_some() => {}
        Class::Other | Class::XRequestId => {
            if skip.is_empty() || !skip.iter().any(|s| s.eq_ignore_ascii_case(name)) {
                put_header(out, name, value);
            }
        }
        Class::Upgrade => {
            seen.upgrade_header = true;
            if upgrade {
                put_header(out, name, value);
            }
        }
        Class::Connection => {
            seen.nominates |= nominated(value).next().is_some();
            seen.connection_upgrade |= value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        }
        Class::XForwardedFor => seen.x_forwarded_for = true,
        Class::Forwarded => seen.forwarded = true,

        // Host is written first, from the routed host (this header's first value when the
        // target carried no authority, which wins otherwise: RFC 9112 §3.2.2). The proxy
        // sets the other three itself (passing a trusted proxy's values on).
        Class::Hop
        | Class::Host
        | Class::XForwardedProto
        | Class::XForwardedHost
        | Class::XRealIp => {}
    });
    seen
}

/// An encoded head.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// Where the values the proxy set are.
    pub set: SetValues,
    /// The request asks for an upgrade (see [`RequestHead::may_upgrade`]).
    pub upgrade: bool,
}

/// Encodes the upstream request head into `out` (cleared first).
pub(crate) fn encode_request(out: &mut Vec<u8>, r: &RequestHead<'_>) -> Encoded {
    out.clear();
    out.extend_from_slice(r.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(r.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut set = SetValues::default();
    let host_start = start_header(out, b"host");
    out.extend_from_slice(r.host.as_bytes());
    set.host = host_start..out.len();
    out.extend_from_slice(b"\r\n");
    let own_start = out.len();
    let mut seen = put_headers(out, r, &[], false);
    // Nearly no request asks for an upgrade or nominates a header in `Connection`; one that
    // does has its headers written again, knowing what to keep and drop.
    let upgrade = r.may_upgrade && seen.upgrade_header && seen.connection_upgrade;
    let mut skip: Vec<&[u8]> = Vec::new();
    if seen.nominates || upgrade {
        if seen.nominates {
            r.headers
                .each_of(Class::Connection, |v| skip.extend(nominated(v)));
        }
        out.truncate(own_start);
        seen = put_headers(out, r, &skip, upgrade);
    }
    let (xff, fwd) = (seen.x_forwarded_for, seen.forwarded);
    let nominated_name = |n: &HeaderName| {
        skip.iter()
            .any(|s| s.eq_ignore_ascii_case(n.as_str().as_bytes()))
    };
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    // A trusted proxy's values are kept (the lists appended to); anyone else's are replaced,
    // so that no client can pass itself off as another address.
    let trusted = r.origin.trusted;
    let passed_on = |name: &HeaderName| {
        trusted
            .then(|| r.headers.get(name))
            .flatten()
            .filter(|_| !nominated_name(name))
    };
    let start = start_header(out, b"x-forwarded-for");
    if trusted && xff && !nominated_name(&X_FORWARDED_FOR) {
        put_prior(out, &r.headers, Class::XForwardedFor);
    }
    out.extend_from_slice(r.origin.peer.ip.as_bytes());
    set.x_forwarded_for = start..out.len();
    out.extend_from_slice(b"\r\n");
    let proto: &[u8] = if r.https { b"https" } else { b"http" };
    let start = start_header(out, b"x-forwarded-proto");
    out.extend_from_slice(passed_on(&X_FORWARDED_PROTO).unwrap_or(proto));
    set.x_forwarded_proto = start..out.len();
    out.extend_from_slice(b"\r\n");
    let start = start_header(out, b"x-forwarded-host");
    out.extend_from_slice(passed_on(&X_FORWARDED_HOST).unwrap_or(r.host.as_bytes()));
    set.x_forwarded_host = start..out.len();
    out.extend_from_slice(b"\r\n");
    let start = start_header(out, b"x-real-ip");
    if trusted {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{}", r.origin.client);
    } else {
        out.extend_from_slice(r.origin.peer.ip.as_bytes());
    }
    set.x_real_ip = start..out.len();
    out.extend_from_slice(b"\r\n");
    if let Some(id) = r.request_id {
        put_header(out, b"x-request-id", id.as_str().as_bytes());
    }
    let start = start_header(out, b"forwarded");
    if trusted && fwd && !nominated_name(&header::FORWARDED) {
        put_prior(out, &r.headers, Class::Forwarded);
    }
    // This hop's element: the peer, and the protocol it spoke to this proxy.
    out.extend_from_slice(r.origin.peer.forwarded_for.as_bytes());
    out.extend_from_slice(b";host=\"");
    // A quoted-string: the characters that could end or escape it are dropped.
    if r.host.bytes().any(|b| b == b'"' || b == b'\\') {
        out.extend(r.host.bytes().filter(|b| *b != b'"' && *b != b'\\'));
    } else {
        out.extend_from_slice(r.host.as_bytes());
    }
    out.extend_from_slice(b"\";proto=");
    out.extend_from_slice(proto);
    set.forwarded = start..out.len();
    out.extend_from_slice(b"\r\n");
    if r.chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Encoded { set, upgrade }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(headers: &HeaderMap, host: &str, may_upgrade: bool) -> String {
        encode_from(headers, host, may_upgrade, None)
    }

    /// The head for `headers` with this request ID set.
    fn encode_with_id(headers: &HeaderMap, id: Option<&RequestId>) -> String {
        let peer = ClientText::new("127.0.0.1".parse().unwrap());
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &RequestHead {
                method: &Method::GET,
                target: "/",
                host: "a.io",
                headers: Headers::Map(headers),
                may_upgrade: false,
                chunked: false,
                origin: Origin {
                    peer: &peer,
                    trusted: false,
                    client: "127.0.0.1".parse().unwrap(),
                },
                https: false,
                request_id: id,
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn request_ids_are_generated_or_kept_when_well_formed() {
        let id_of = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert("x-request-id", v.parse().unwrap());
            }
            RequestId::of(&Headers::Map(&h))
        };
        let (a, b) = (id_of(None), id_of(None));
        for id in [&a, &b] {
            assert!(matches!(id, RequestId::Generated(_)), "{id:?}");
            let s = id.as_str();
            assert_eq!(s.len(), 32, "{s}");
            assert!(
                s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{s}"
            );
        }
        assert_ne!(a, b, "two requests, two IDs");
        for kept in [
            "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            "trace:42/span=7+x@y_z.1",
            &"x".repeat(128),
        ] {
            assert_eq!(id_of(Some(kept)).as_str(), kept);
        }
        // What could forge a log field or reach an application's logs unescaped is replaced.
        for replaced in ["two words", "a\"b", "status=200,x", &"x".repeat(129)] {
            let id = id_of(Some(replaced));
            assert!(
                matches!(id, RequestId::Generated(_)),
                "{replaced:?} kept: {id:?}"
            );
        }
        // Raw headers (the HTTP/1.1 fast path) read the same, in any case.
        let head = b"X-Request-Id: abc-1";
        let spans = [(0, 12, 14, head.len() as u32)];
        let raw = RequestId::of(&Headers::Raw {
            head,
            spans: &spans,
        });
        assert_eq!(raw.as_str(), "abc-1");
    }

    #[test]
    fn the_request_id_header_is_sent_once() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "from client".parse().unwrap());
        let id = RequestId::of(&Headers::Map(&h));
        let s = encode_with_id(&h, Some(&id));
        assert_eq!(s.matches("x-request-id").count(), 1, "{s}");
        assert!(
            s.contains(&format!("\r\nx-request-id: {}\r\n", id.as_str())),
            "{s}"
        );
        // Off: the client's passes as it came.
        let s = encode_with_id(&h, None);
        assert!(s.contains("\r\nx-request-id: from client\r\n"), "{s}");
    }

    /// `trusted`: the peer is a trusted proxy, and the original client is this address.
    fn encode_from(
        headers: &HeaderMap,
        host: &str,
        may_upgrade: bool,
        trusted: Option<&str>,
    ) -> String {
        let peer_ip: IpAddr = "127.0.0.1".parse().unwrap();
        let peer = ClientText::new(peer_ip);
        let mut out = Vec::new();
        let encoded = encode_request(
            &mut out,
            &RequestHead {
                method: &Method::GET,
                target: "/p?q=1",
                host,
                headers: Headers::Map(headers),
                may_upgrade,
                chunked: false,
                origin: Origin {
                    peer: &peer,
                    trusted: trusted.is_some(),
                    client: trusted.map_or(peer_ip, |c| c.parse().unwrap()),
                },
                https: false,
                request_id: None,
            },
        );
        assert_eq!(encoded.set.get(&out, &header::HOST), Some(host.as_bytes()));
        let asks = headers.contains_key(header::UPGRADE)
            && headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| v.to_str().unwrap().split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        assert_eq!(encoded.upgrade, may_upgrade && asks);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hop_by_hop_and_nominated_headers_are_dropped_and_forwarding_headers_added() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "a.io:8080".parse().unwrap());
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret, Upgrade".parse().unwrap(),
        );
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.append("x-forwarded-for", "192.0.2.1".parse().unwrap());
        h.append("x-forwarded-for", "192.0.2.2".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let plain = encode(&h, "a.io:8080", false);
        assert_eq!(
            plain,
            "GET /p?q=1 HTTP/1.1\r\nhost: a.io:8080\r\nx-kept: 1\r\n\
             x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: a.io:8080\r\nx-real-ip: 127.0.0.1\r\n\
             forwarded: for=127.0.0.1;host=\"a.io:8080\";proto=http\r\n\r\n"
        );
        let up = encode(&h, "a.io:8080", true);
        assert!(up.contains("\r\nupgrade: websocket\r\n"), "{up}");
        assert!(up.contains("\r\nconnection: upgrade\r\n"), "{up}");
        assert!(
            !up.contains("x-secret") && !up.contains("keep-alive"),
            "{up}"
        );
    }

    #[test]
    fn upgrade_needs_the_header_and_the_connection_option() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        // No `Connection: upgrade`: not an upgrade, and Upgrade is hop-by-hop.
        let s = encode(&h, "a.io", true);
        assert!(!s.contains("upgrade"), "{s}");
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        let s = encode(&h, "a.io", true);
        assert!(
            s.contains("\r\nupgrade: websocket\r\nconnection: upgrade\r\n"),
            "{s}"
        );
        // HTTP/2 and HTTP/1.0 requests do not upgrade.
        let s = encode(&h, "a.io", false);
        assert!(!s.contains("upgrade"), "{s}");
    }

    #[test]
    fn a_clients_own_forwarding_headers_are_replaced_and_a_trusted_proxys_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "a.io".parse().unwrap());
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        h.append("X-Forwarded-For", "192.0.2.1, 10.0.0.2".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-host", "shop.example".parse().unwrap());
        h.insert(
            header::FORWARDED,
            "for=192.0.2.1;proto=https".parse().unwrap(),
        );
        h.insert("x-real-ip", "198.51.100.1".parse().unwrap());
        let direct = encode(&h, "a.io", false);
        assert!(
            direct.ends_with(
                "\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
                 x-forwarded-host: a.io\r\nx-real-ip: 127.0.0.1\r\n\
                 forwarded: for=127.0.0.1;host=\"a.io\";proto=http\r\n\r\n"
            ),
            "{direct}"
        );
        assert!(!direct.contains("198.51.100.1") && !direct.contains("192.0.2.1"));
        let via_proxy = encode_from(&h, "a.io", false, Some("192.0.2.1"));
        assert!(
            via_proxy.ends_with(
                "\r\nx-forwarded-for: 198.51.100.1, 192.0.2.1, 10.0.0.2, 127.0.0.1\r\n\
                 x-forwarded-proto: https\r\nx-forwarded-host: shop.example\r\n\
                 x-real-ip: 192.0.2.1\r\n\
                 forwarded: for=192.0.2.1;proto=https, for=127.0.0.1;host=\"a.io\";proto=http\r\n\r\n"
            ),
            "{via_proxy}"
        );
        // A trusted proxy's header it nominated as hop-by-hop is dropped all the same.
        h.insert(header::CONNECTION, "x-forwarded-proto".parse().unwrap());
        let nominated = encode_from(&h, "a.io", false, Some("192.0.2.1"));
        assert!(
            nominated.contains("\r\nx-forwarded-proto: http\r\n"),
            "{nominated}"
        );
    }

    #[test]
    fn the_original_client_is_the_rightmost_untrusted_address() {
        let trusted: Vec<ipnet::IpNet> = ["10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let peer: IpAddr = "10.9.9.9".parse().unwrap();
        let client = |xff: &[&str]| {
            let mut h = HeaderMap::new();
            for v in xff {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            original_client(peer, &Headers::Map(&h), &trusted).to_string()
        };
        // The leftmost entries are whatever the client wrote: never believed past an
        // untrusted hop.
        assert_eq!(
            client(&["198.51.100.9, 203.0.113.5, 10.1.1.1"]),
            "203.0.113.5"
        );
        assert_eq!(
            client(&["198.51.100.9", "203.0.113.5", "10.1.1.1, 10.2.2.2"]),
            "203.0.113.5"
        );
        assert_eq!(
            client(&["203.0.113.5:4711, [2001:db8::7]:443"]),
            "203.0.113.5"
        );
        assert_eq!(client(&["[2001:db8::7]", "::ffff:10.1.1.1"]), "2001:db8::7");
        assert_eq!(client(&["2001:db8::7"]), "2001:db8::7");
        // Garbage ends the walk at the trusted hop after it.
        assert_eq!(client(&["203.0.113.5, unknown, 10.1.1.1"]), "10.1.1.1");
        assert_eq!(client(&["203.0.113.5, "]), "10.9.9.9");
        assert_eq!(client(&[]), "10.9.9.9");
        // Raw headers (the HTTP/1.1 fast path) read the same, in any case.
        let head = b"X-Forwarded-For: 203.0.113.5, 10.1.1.1";
        let spans = [(0, 15, 17, head.len() as u32)];
        let raw = Headers::Raw {
            head,
            spans: &spans,
        };
        assert_eq!(
            original_client(peer, &raw, &trusted).to_string(),
            "203.0.113.5"
        );
    }

    #[test]
    fn target_authority_replaces_host_and_forwarded_is_appended_and_quoted() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "other.test".parse().unwrap());
        h.insert(header::FORWARDED, "for=192.0.2.9".parse().unwrap());
        let s = encode_from(&h, "abs.test", false, Some("192.0.2.9"));
        assert!(
            s.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: abs.test\r\n"),
            "{s}"
        );
        assert!(!s.contains("other.test"), "{s}");
        assert!(
            s.contains(
                "\r\nforwarded: for=192.0.2.9, for=127.0.0.1;host=\"abs.test\";proto=http\r\n"
            ),
            "{s}"
        );
        let v6 = ClientText::new("::1".parse().unwrap());
        assert_eq!(&*v6.forwarded_for, "for=\"[::1]\"");
    }
}
