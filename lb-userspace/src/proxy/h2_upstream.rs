//! HTTP/2 to upstream endpoints (a Service's `protocol = "h2"`, what gRPC servers speak).
//!
//! Requests are multiplexed on one connection per endpoint and worker, opened on first use
//! (h2c prior knowledge, or TLS with ALPN `h2`) and replaced when it closes; requests that
//! find it being opened wait for that connect instead of starting their own (a burst at a
//! cold or restarted endpoint would otherwise open a connection per request). A connection is
//! used once the endpoint's SETTINGS are in force; when each has as many requests in flight
//! as the endpoint allows streams, another is opened (see [`stream_for`]). Its driver runs
//! as a task of the worker that opened it, with HTTP/2 PINGs every
//! [`KEEPALIVE_INTERVAL`] so a peer that vanished is noticed while the connection is idle.
//!
//! The request sent upstream is the HTTP/1.1 head the forwarding path has already encoded
//! (forwarding headers added, hop-by-hop ones removed), read back into HTTP/2 form: one
//! place decides what an upstream gets, whatever its protocol.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::Shared;
use futures_util::task::AtomicWaker;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::{BodyTimedOut, BodyTooLarge, BoxError, ReqBody};
use super::timer::{Progress, Waiting};
use super::upstream::Endpoint;
use super::upstream_tls::{TlsOrigination, UpstreamIo};

/// PING interval on upstream HTTP/2 connections, busy or idle.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half of an upstream HTTP/2 connection (cheap to clone).
pub(crate) type H2Sender = http2::SendRequest<WatchedBody>;

/// Connections one worker opens to one endpoint at most: when every one has as many
/// requests in flight as the endpoint allows streams, another is opened, up to this many;
/// beyond, requests wait for a stream on the least busy one.
pub(crate) const MAX_CONNECTIONS_PER_ENDPOINT: usize = 16;

/// What a connection's driver tells the requests that use it.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// The endpoint's SETTINGS_MAX_CONCURRENT_STREAMS as applied (`usize::MAX` when its
    /// SETTINGS set none; hyper assumes 100 until they arrive, which is why a connection is
    /// used only once they have).
    max_streams: AtomicUsize,
    /// Requests of this worker holding a stream (see [`H2Stream`]).
    open_streams: AtomicUsize,
    /// The endpoint refused a stream (REFUSED_STREAM): it counts streams a little behind us
    /// (a stream ends at its end after it ends at ours), so the connection takes no new one
    /// until one of ours ends.
    refused: AtomicBool,
    /// The endpoint's first frame (its SETTINGS) has been read in full.
    first_frame_read: AtomicBool,
    /// Its settings are in force: h2 applies a SETTINGS frame as it queues the ACK, before
    /// it writes anything after reading it.
    first_frame_applied: AtomicBool,
    /// The connection's driver (hyper's client task, which can read the applied limit),
    /// woken when the settings are applied.
    driver: AtomicWaker,
    /// `max_streams` holds the endpoint's own limit.
    settled: AtomicBool,
    /// The driver returned: the connection is closed.
    ended: AtomicBool,
    /// Notified when `settled` or `ended` is set.
    changed: tokio::sync::Notify,
}

impl ConnState {
    fn has_room(&self) -> bool {
        let open = self.open_streams.load(Ordering::Relaxed);
        open < self.max_streams.load(Ordering::Relaxed)
            && (open == 0 || !self.refused.load(Ordering::Relaxed))
    }

    /// Waits until the endpoint's SETTINGS are in force (false: the connection ended first).
    async fn settle(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.ended.load(Ordering::Acquire) {
                return false;
            }
            if self.settled.load(Ordering::Acquire) {
                return true;
            }
            notified.await;
        }
    }
}

/// A stream of an upstream connection, held by a request until its response ends.
#[derive(Debug)]
pub(crate) struct H2Stream {
    conn: Arc<ConnState>,
    was_refused: bool,
}

impl H2Stream {
    /// The endpoint refused this stream: see [`ConnState::refused`].
    pub(crate) fn refused(&mut self) {
        self.conn.refused.store(true, Ordering::Relaxed);
        self.was_refused = true;
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        self.conn.open_streams.fetch_sub(1, Ordering::Relaxed);
        // Another stream's end frees a slot at the endpoint too.
        if !self.was_refused && self.conn.refused.load(Ordering::Relaxed) {
            self.conn.refused.store(false, Ordering::Relaxed);
        }
    }
}

/// Reads the endpoint's bytes through, noting when its first frame (the SETTINGS of its
/// connection preface, RFC 9113 §3.4) has been read in full: the connection's stream limit
/// is known only after that.
struct FirstFrameWatch {
    io: UpstreamIo,
    state: Arc<ConnState>,
    first_frame: FirstFrame,
}

/// Follows the bytes of a connection until its first HTTP/2 frame has gone by.
#[derive(Default)]
struct FirstFrame {
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

impl FirstFrame {
    /// Takes the next bytes read; true once the first frame has been read in full.
    fn read(&mut self, mut bytes: &[u8]) -> bool {
        if self.header_len < 9 {
            let n = bytes.len().min(9 - self.header_len);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len < 9 {
                return false;
            }
            let h = self.header;
            self.payload_left =
                usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        }
        self.payload_left -= bytes.len().min(self.payload_left);
        self.payload_left == 0
    }
}

impl FirstFrameWatch {
    /// A write after the first frame was read comes after its settings were applied.
    fn note_write(&self) {
        let s = &self.state;
        // Loads first: this runs for every write of the connection's life.
        if s.first_frame_read.load(Ordering::Relaxed)
            && !s.first_frame_applied.load(Ordering::Relaxed)
            && !s.first_frame_applied.swap(true, Ordering::Release)
        {
            s.driver.wake();
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        if !bytes.is_empty()
            && !self.state.first_frame_read.load(Ordering::Relaxed)
            && self.first_frame.read(bytes)
        {
            self.state.first_frame_read.store(true, Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for FirstFrameWatch {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let this = self.get_mut();
        this.observe(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for FirstFrameWatch {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.note_write();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.note_write();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Opens an HTTP/2 connection over `io`, spawns its driver on the current runtime and
/// returns once the endpoint's SETTINGS are in force (so its stream limit is known).
pub(crate) async fn handshake<B>(
    io: UpstreamIo,
) -> io::Result<(http2::SendRequest<B>, Arc<ConnState>)>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let state = Arc::new(ConnState::default());
    let io = FirstFrameWatch {
        io,
        state: state.clone(),
        first_frame: FirstFrame::default(),
    };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    let driven = state.clone();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let outcome = std::future::poll_fn(|cx| {
            driven.driver.register(cx.waker());
            let r = conn.as_mut().poll(cx);
            // hyper's client task is polled for every request it sends, so a later change of
            // the limit is seen soon enough.
            if driven.first_frame_applied.load(Ordering::Acquire) {
                driven
                    .max_streams
                    .store(conn.current_max_send_streams(), Ordering::Relaxed);
                if !driven.settled.load(Ordering::Relaxed)
                    && !driven.settled.swap(true, Ordering::Release)
                {
                    driven.changed.notify_waiters();
                }
            }
            r
        })
        .await;
        driven.ended.store(true, Ordering::Release);
        driven.changed.notify_waiters();
        if let Err(e) = outcome {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    if !state.settle().await {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "HTTP/2 connection closed before the endpoint's SETTINGS",
        ));
    }
    Ok((sender, state))
}

/// A connect in progress, awaited by every request that found no connection with room.
type Connecting = Shared<Pin<Box<dyn Future<Output = Result<H2Conn, Arc<io::Error>>> + Send>>>;

/// One upstream HTTP/2 connection of a worker.
#[derive(Clone)]
pub(crate) struct H2Conn {
    sender: H2Sender,
    state: Arc<ConnState>,
}

impl H2Conn {
    fn take_stream(&self) -> (H2Sender, H2Stream) {
        self.state.open_streams.fetch_add(1, Ordering::Relaxed);
        let stream = H2Stream {
            conn: self.state.clone(),
            was_refused: false,
        };
        (self.sender.clone(), stream)
    }
}

/// One worker's HTTP/2 connections to an endpoint.
#[derive(Default)]
pub(crate) struct H2Slot {
    /// The open connections, oldest first.
    conns: Vec<H2Conn>,
    /// The connect under way, if any.
    connecting: Option<Connecting>,
}

impl H2Slot {
    /// Forgets the connection `stream` belongs to (it failed or is going away).
    pub(crate) fn forget(&mut self, stream: &H2Stream) {
        self.conns.retain(|c| !Arc::ptr_eq(&c.state, &stream.conn));
    }
}

impl std::fmt::Debug for H2Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Slot")
            .field("open", &self.conns.len())
            .field("connecting", &self.connecting.is_some())
            .finish()
    }
}

/// A stream to `ep` on one of this worker's connections: the oldest with a stream free,
/// else a new one (within `timeout`, TLS included) unless [`MAX_CONNECTIONS_PER_ENDPOINT`]
/// are open, in which case the least busy. Requests that find a connect under way share it
/// and its outcome, then choose again (a burst fills each new connection in turn; a request
/// that waited for as many connects as the cap takes the last whatever its room).
pub(crate) async fn stream_for(
    ep: &Endpoint,
    tls: Option<&Arc<TlsOrigination>>,
    timeout: Duration,
) -> io::Result<(H2Sender, H2Stream)> {
    let mut connects_waited = 0;
    loop {
        let connecting = {
            let mut slot = ep.h2_slot();
            slot.conns.retain(|c| !c.sender.is_closed());
            if let Some(c) = slot.conns.iter().find(|c| c.state.has_room()) {
                return Ok(c.take_stream());
            }
            if slot.conns.len() >= MAX_CONNECTIONS_PER_ENDPOINT {
                let least_busy = slot
                    .conns
                    .iter()
                    .min_by_key(|c| c.state.open_streams.load(Ordering::Relaxed));
                if let Some(c) = least_busy {
                    return Ok(c.take_stream());
                }
            }
            match &slot.connecting {
                Some(c) => c.clone(),
                None => {
                    let (addr, tls) = (ep.addr, tls.cloned());
                    let connect = async move {
                        let io = UpstreamIo::connect(addr, timeout, tls.as_deref()).await?;
                        let (sender, state) = tokio::time::timeout(timeout, handshake(io))
                            .await
                            .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out")
                        })??;
                        Ok(H2Conn { sender, state })
                    };
                    let connect: Pin<Box<dyn Future<Output = _> + Send>> =
                        Box::pin(connect.map(|r: io::Result<H2Conn>| r.map_err(Arc::new)));
                    let c = connect.shared();
                    slot.connecting = Some(c.clone());
                    c
                }
            }
        };
        let outcome = connecting.clone().await;
        connects_waited += 1;
        let mut slot = ep.h2_slot();
        // The first request back installs the outcome; a newer connect is left alone.
        if slot
            .connecting
            .as_ref()
            .is_some_and(|c| c.ptr_eq(&connecting))
        {
            slot.connecting = None;
            if let Ok(c) = &outcome {
                slot.conns.push(c.clone());
            }
        }
        match outcome {
            Err(e) => return Err(io::Error::new(e.kind(), e.to_string())),
            Ok(c) if connects_waited >= MAX_CONNECTIONS_PER_ENDPOINT => {
                return Ok(c.take_stream());
            }
            Ok(_) => {}
        }
    }
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
    /// The client paused its body for longer than the request body timeout (408).
    TimedOut,
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
    /// For the response timer: hyper polls the body when the stream can take more, so a
    /// pending client body is the client's time, not the endpoint's.
    progress: Progress,
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
            progress: Progress::new(tokio::time::Instant::now()),
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

    /// Where the upload stands, for the response timer.
    pub(crate) fn waiting(&self) -> Waiting {
        lock(&self.0).progress.waiting()
    }

    /// An attempt starts: the endpoint's time counts from now.
    pub(crate) fn attempt_started(&self) {
        lock(&self.0).progress.advanced();
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
            let frame = kept.frame();
            s.progress.advanced();
            return Poll::Ready(Some(Ok(frame)));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let Poll::Ready(r) = Pin::new(&mut s.source).poll_frame(cx) else {
            s.progress.on_client();
            return Poll::Pending;
        };
        s.progress.advanced();
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
                } else if e.is::<BodyTimedOut>() {
                    BodyFault::TimedOut
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
    fn a_refused_stream_closes_its_connection_to_new_ones_until_another_ends() {
        let state = Arc::new(ConnState::default());
        state.max_streams.store(4, Ordering::Relaxed);
        let take = || {
            state.open_streams.fetch_add(1, Ordering::Relaxed);
            H2Stream {
                conn: state.clone(),
                was_refused: false,
            }
        };
        let (first, second, mut third) = (take(), take(), take());
        assert!(state.has_room(), "3 of 4 streams");
        third.refused();
        assert!(!state.has_room(), "the endpoint counts more than we do");
        drop(third);
        assert!(
            !state.has_room(),
            "the refused stream's own end frees nothing"
        );
        drop(second);
        assert!(
            state.has_room(),
            "another stream ended: a slot is free at the endpoint"
        );
        let mut again = take();
        again.refused();
        drop(first);
        drop(again);
        assert!(state.has_room(), "no stream left: the next may try");
        assert_eq!(state.open_streams.load(Ordering::Relaxed), 0);
        let full: Vec<H2Stream> = (0..4).map(|_| take()).collect();
        assert!(!state.has_room(), "at the endpoint's limit");
        drop(full);
    }

    #[test]
    fn the_first_frame_is_followed_across_reads_of_any_size() {
        // SETTINGS with one setting (6 bytes), then the next frame's bytes.
        let mut bytes = vec![0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 4];
        bytes.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
        let frame_len = 15;
        for split in 1..=bytes.len() {
            let mut f = FirstFrame::default();
            let mut done_at = None;
            for (i, chunk) in bytes.chunks(split).enumerate() {
                if f.read(chunk) {
                    done_at = Some((i + 1) * split);
                    break;
                }
            }
            let done_at = done_at.expect("the frame completes");
            assert!(
                done_at >= frame_len && done_at < frame_len + split,
                "reads of {split}: complete after {done_at} bytes"
            );
        }
        // An empty SETTINGS frame is complete with its header.
        assert!(FirstFrame::default().read(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        assert!(!FirstFrame::default().read(&[0, 0, 0, 4]));
    }

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
