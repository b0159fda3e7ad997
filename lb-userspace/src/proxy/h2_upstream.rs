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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::Shared;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
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

/// Request body bytes kept for a replay. A request the endpoint did not process (a
/// REFUSED_STREAM reset, or a GOAWAY below its stream) is sent again only if no more than
/// this had been read from the client when it was refused: gRPC unary calls fit, long
/// client streams do not. The bytes are shared with the client's buffers, not copied, and
/// are let go when the response head arrives.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// Why the request body failed, as [`WatchedBody`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// It grew past the route's limit (413).
    TooLarge,
    /// The client's stream failed (400).
    Client,
}

/// A frame read from the client, kept for a replay.
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(d) => Frame::data(d.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }

    fn data_len(&self) -> u64 {
        match self {
            Kept::Data(d) => d.len() as u64,
            Kept::Trailers(_) => 0,
        }
    }
}

/// The state one request's attempts share.
struct Attempts {
    /// The client's body.
    source: ReqBody,
    /// Set when `source` failed.
    fault: Option<BodyFault>,
    /// Every frame read from `source` so far, while a replay is possible.
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// False once more than [`REPLAY_LIMIT`] was read, `source` failed, or the request was
    /// answered.
    replayable: bool,
    /// `source` returned its end.
    ended: bool,
    /// The attempt that may read; an older one (hyper may still poll the body of a refused
    /// stream for a moment) gets an error instead of taking frames or the waker.
    attempt: u32,
}

/// The request body on its way to an HTTP/2 upstream, as one attempt sends it: the frames
/// an earlier attempt already read (see [`REPLAY_LIMIT`]), then the rest of the client's
/// body. hyper reports a failed request body to the exchange only as a reset stream, so the
/// reason is noted here for the answer.
pub(crate) struct WatchedBody {
    shared: Arc<Mutex<Attempts>>,
    attempt: u32,
    /// Index in `kept` of the next frame this attempt sends.
    next: usize,
}

fn lock(shared: &Mutex<Attempts>) -> MutexGuard<'_, Attempts> {
    // No code path panics while holding it; if one did, the state is still consistent.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WatchedBody {
    /// Wraps `body`; the returned handle tells what went wrong with it and replays it.
    pub(crate) fn new(body: ReqBody) -> (Self, BodyHandle) {
        let shared = Arc::new(Mutex::new(Attempts {
            source: body,
            fault: None,
            kept: Vec::new(),
            kept_bytes: 0,
            replayable: true,
            ended: false,
            attempt: 0,
        }));
        (
            Self {
                shared: shared.clone(),
                attempt: 0,
                next: 0,
            },
            BodyHandle(shared),
        )
    }
}

/// The exchange's side of a [`WatchedBody`].
pub(crate) struct BodyHandle(Arc<Mutex<Attempts>>);

impl BodyHandle {
    /// What went wrong with the client's body, if anything.
    pub(crate) fn fault(&self) -> Option<BodyFault> {
        lock(&self.0).fault
    }

    /// The body for another attempt, from its first byte, if everything read so far was kept.
    /// Earlier attempts stop reading.
    pub(crate) fn replay(&self) -> Option<WatchedBody> {
        let mut s = lock(&self.0);
        if !s.replayable {
            return None;
        }
        s.attempt += 1;
        Some(WatchedBody {
            shared: self.0.clone(),
            attempt: s.attempt,
            next: 0,
        })
    }

    /// The request was answered: nothing more is kept (a streaming body goes on).
    pub(crate) fn answered(&self) {
        let mut s = lock(&self.0);
        s.replayable = false;
        s.kept = Vec::new();
        s.kept_bytes = 0;
    }
}

/// An older attempt's body was polled after a replay started.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a replay")]
struct Superseded;

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = lock(&this.shared);
        if s.attempt != this.attempt {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if let Some(kept) = s.kept.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(kept.frame())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let r = ready!(Pin::new(&mut s.source).poll_frame(cx));
        match &r {
            None => s.ended = true,
            Some(Ok(frame)) if s.replayable => {
                let kept = if let Some(d) = frame.data_ref() {
                    Some(Kept::Data(d.clone()))
                } else {
                    frame.trailers_ref().map(|t| Kept::Trailers(t.clone()))
                };
                if let Some(kept) = kept {
                    s.kept_bytes += kept.data_len() as usize;
                    s.kept.push(kept);
                    this.next += 1;
                }
                if s.kept_bytes > REPLAY_LIMIT {
                    s.replayable = false;
                    s.kept = Vec::new();
                    this.next = 0;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                s.fault = Some(if e.is::<BodyTooLarge>() {
                    BodyFault::TooLarge
                } else {
                    BodyFault::Client
                });
                s.replayable = false;
            }
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.attempt == self.attempt
            && self.next >= s.kept.len()
            && (s.ended || s.source.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        let kept: u64 = s.kept.iter().skip(self.next).map(Kept::data_len).sum();
        let rest = if s.ended {
            SizeHint::with_exact(0)
        } else {
            s.source.size_hint()
        };
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint.set_lower(rest.lower() + kept);
        hint
    }
}

/// The deadline a gRPC client gave its call: the `grpc-timeout` header ("gRPC over HTTP2":
/// 1 to 8 digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`). None when absent or malformed.
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How an endpoint declined a request without processing it (RFC 9113 §8.7), so that it
/// may go again whatever its method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotProcessed {
    /// The stream was reset with REFUSED_STREAM; the connection stays usable.
    Refused,
    /// A GOAWAY's last stream was below the request's; the connection is going away.
    GoingAway,
}

/// Whether `e` (from sending a request) says the endpoint did not process it.
pub(crate) fn not_processed(e: &hyper::Error) -> Option<NotProcessed> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            // h2 gives a stream above a GOAWAY's last stream the GOAWAY itself as its error;
            // streams the endpoint kept get an I/O error if the connection then closes.
            return if h2.is_go_away() && h2.is_remote() {
                Some(NotProcessed::GoingAway)
            } else if h2.is_reset()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
            {
                Some(NotProcessed::Refused)
            } else {
                None
            };
        }
        cause = c.source();
    }
    None
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
    #[test]
    fn grpc_timeout_reads_every_unit_and_rejects_malformed_values() {
        let read = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).expect("value"));
            grpc_timeout(&h)
        };
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("3M"), Some(Duration::from_secs(180)));
        assert_eq!(read("99999999S"), Some(Duration::from_secs(99_999_999)));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("7u"), Some(Duration::from_micros(7)));
        assert_eq!(read("5n"), Some(Duration::from_nanos(5)));
        for bad in [
            "",
            "S",
            "123456789S",
            "10",
            "10s",
            "-1S",
            "1.5S",
            " 1S",
            "1 S",
        ] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

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
