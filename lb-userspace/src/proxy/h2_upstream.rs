//! HTTP/2 to upstream endpoints (a Service's `protocol = "h2"`, what gRPC servers speak).
//!
//! Requests are multiplexed on one connection per endpoint and worker, opened on first use
//! (h2c prior knowledge, or TLS with ALPN `h2`) and replaced when it closes; requests that
//! find it being opened wait for that connect instead of starting their own (a burst at a
//! cold or restarted endpoint would otherwise open a connection per request). Its driver runs
//! as a task of the worker that opened it, with HTTP/2 PINGs every
//! [`KEEPALIVE_INTERVAL`] so a peer that vanished is noticed while the connection is idle.
//!
//! The request sent upstream is the HTTP/1.1 head the forwarding path has already encoded
//! (forwarding headers added, hop-by-hop ones removed), read back into HTTP/2 form: one
//! place decides what an upstream gets, whatever its protocol.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::Shared;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::{BodyTooLarge, BoxError, ReqBody};
use super::upstream::Endpoint;
use super::upstream_tls::{TlsOrigination, UpstreamIo};

/// PING interval on upstream HTTP/2 connections, busy or idle.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half of an upstream HTTP/2 connection (cheap to clone).
pub(crate) type H2Sender = http2::SendRequest<WatchedBody>;

/// Opens an HTTP/2 connection over `io` and spawns its driver on the current runtime.
pub(crate) async fn handshake<B>(io: UpstreamIo) -> io::Result<http2::SendRequest<B>>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}

/// A connect in progress, awaited by every request that found no connection.
type Connecting = Shared<Pin<Box<dyn Future<Output = Result<H2Sender, Arc<io::Error>>> + Send>>>;

/// One worker's HTTP/2 connection to an endpoint.
#[derive(Default)]
pub(crate) struct H2Slot {
    /// The open connection.
    pub(crate) sender: Option<H2Sender>,
    /// The connect under way, if any.
    connecting: Option<Connecting>,
}

impl std::fmt::Debug for H2Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Slot")
            .field("open", &self.sender.is_some())
            .field("connecting", &self.connecting.is_some())
            .finish()
    }
}

/// This worker's connection to `ep`, opened (within `timeout`, TLS included) if there is
/// none or it has closed; requests arriving meanwhile share that connect and its outcome.
pub(crate) async fn sender_for(
    ep: &Endpoint,
    tls: Option<&Arc<TlsOrigination>>,
    timeout: Duration,
) -> io::Result<H2Sender> {
    let connecting = {
        let mut slot = ep.h2_slot();
        if let Some(s) = slot.sender.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        match &slot.connecting {
            Some(c) => c.clone(),
            None => {
                let (addr, tls) = (ep.addr, tls.cloned());
                let connect = async move {
                    let io = UpstreamIo::connect(addr, timeout, tls.as_deref()).await?;
                    tokio::time::timeout(timeout, handshake(io))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out")
                        })?
                };
                let connect: Pin<Box<dyn Future<Output = _> + Send>> =
                    Box::pin(connect.map(|r: io::Result<H2Sender>| r.map_err(Arc::new)));
                let c = connect.shared();
                slot.connecting = Some(c.clone());
                c
            }
        }
    };
    let outcome = connecting.clone().await;
    let mut slot = ep.h2_slot();
    // The first request back installs the outcome; a newer connect is left alone.
    if slot
        .connecting
        .as_ref()
        .is_some_and(|c| c.ptr_eq(&connecting))
    {
        slot.connecting = None;
        if let Ok(s) = &outcome {
            slot.sender = Some(s.clone());
        }
    }
    outcome.map_err(|e| io::Error::new(e.kind(), e.to_string()))
}

/// Why the request body failed, as [`WatchedBody`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// It grew past the route's limit (413).
    TooLarge,
    /// The client's stream failed (400).
    Client,
}

/// The request body on its way to an HTTP/2 upstream. hyper reports a failed request body
/// to the exchange only as a reset stream, so the reason is noted here for the answer.
pub(crate) struct WatchedBody {
    body: ReqBody,
    fault: Arc<AtomicU8>,
}

const NO_FAULT: u8 = 0;
const TOO_LARGE: u8 = 1;
const CLIENT: u8 = 2;

impl WatchedBody {
    /// Wraps `body`; the returned handle tells what went wrong with it, if anything.
    pub(crate) fn new(body: ReqBody) -> (Self, FaultHandle) {
        let fault = Arc::new(AtomicU8::new(NO_FAULT));
        (
            Self {
                body,
                fault: fault.clone(),
            },
            FaultHandle(fault),
        )
    }
}

/// Reads the fault a [`WatchedBody`] recorded.
pub(crate) struct FaultHandle(Arc<AtomicU8>);

impl FaultHandle {
    pub(crate) fn get(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Acquire) {
            TOO_LARGE => Some(BodyFault::TooLarge),
            CLIENT => Some(BodyFault::Client),
            _ => None,
        }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &r {
            let fault = if e.is::<BodyTooLarge>() {
                TOO_LARGE
            } else {
                CLIENT
            };
            this.fault.store(fault, Ordering::Release);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Headers of an HTTP/1.1 head that have no place in HTTP/2 (RFC 9113 §8.2.2); `host`
/// becomes `:authority`.
fn dropped_in_h2(name: &[u8]) -> bool {
    [
        &b"host"[..],
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// The HTTP/2 request for an encoded HTTP/1.1 request head (`head`, as
/// `head::encode_request` wrote it): the target with `https`'s scheme and the Host header as
/// authority, the other headers as they are but those HTTP/2 forbids, and `te: trailers`
/// when the client asked for trailers (gRPC servers require it). None when the head does
/// not parse or its Host is no authority (the client's Host was malformed: 400).
pub(crate) fn request_from_head(
    head: &[u8],
    method: &Method,
    https: bool,
    te_trailers: bool,
) -> Option<Request<()>> {
    let lines = head.iter().filter(|b| **b == b'\n').count();
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let mut parsed = httparse::Request::new(&mut fields);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let host = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))?;
    let uri = Uri::builder()
        .scheme(if https { Scheme::HTTPS } else { Scheme::HTTP })
        .authority(Authority::try_from(host.value).ok()?)
        .path_and_query(PathAndQuery::try_from(parsed.path?).ok()?)
        .build()
        .ok()?;
    let mut req = Request::new(());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    let headers = req.headers_mut();
    for h in parsed.headers.iter() {
        if dropped_in_h2(h.name.as_bytes()) {
            continue;
        }
        headers.append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Some(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_head_becomes_an_http2_request() {
        let head = b"POST /pkg.Svc/Call?x=1 HTTP/1.1\r\nhost: api.example:8443\r\n\
            content-type: application/grpc\r\ntransfer-encoding: chunked\r\n\
            connection: keep-alive\r\nx-forwarded-for: 192.0.2.7\r\nx-multi: a\r\nx-multi: b\r\n\r\n";
        let req = request_from_head(head, &Method::POST, true, true).expect("parses");
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "https://api.example:8443/pkg.Svc/Call?x=1");
        let h = req.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(
            h.get_all("x-multi").iter().count(),
            2,
            "repeated fields stay"
        );
        assert_eq!(h["te"], "trailers");
        for gone in ["host", "connection", "transfer-encoding"] {
            assert!(!h.contains_key(gone), "{gone} has no place in HTTP/2");
        }
    }

    #[test]
    fn te_is_sent_only_for_trailers_and_bad_heads_are_refused() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\nte: trailers\r\n\r\n";
        let req = request_from_head(head, &Method::GET, false, false).expect("parses");
        assert_eq!(req.uri(), "http://a/");
        assert!(!req.headers().contains_key("te"));
        assert!(request_from_head(b"GET / HTTP/1.1\r\n\r\n", &Method::GET, false, false).is_none());
        assert!(
            request_from_head(
                b"GET / HTTP/1.1\r\nhost: a b\r\n\r\n",
                &Method::GET,
                false,
                false
            )
            .is_none(),
            "a host that is no authority"
        );
        assert!(
            request_from_head(b"GET / HTTP/1.1\r\nhost: a\r\n", &Method::GET, false, false)
                .is_none()
        );
    }
}
