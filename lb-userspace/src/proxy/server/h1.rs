//! The HTTP/1.1 fast path.
//!
//! hyper's HTTP/1 server turns every request head into a `HeaderMap` (a hash insertion per
//! header), wants one for the response too, and runs a general dispatcher with queues and
//! per-request timers around the service; for a proxy whose work per request is otherwise
//! small that is about a third of its user-space instructions. The common request — HTTP/1.1,
//! origin-form target, no body or a small one with a `Content-Length` (read whole first, as
//! nginx buffers request bodies), no `Expect`, no upgrade — is served here instead: its head is
//! parsed with httparse into positions in the read buffer, routed and re-encoded for the
//! upstream from those, the upstream's response header lines are copied through as received
//! (hop-by-hop ones left out), and a small response goes out in one write.
//!
//! Anything else — another version, a body over [`FAST_BODY_MAX`] or sent chunked
//! (`Transfer-Encoding`), a repeated `Content-Length`, `Expect`, an upgrade, an
//! absolute-form target, a head hyper would refuse (malformed, too large) — hands the
//! connection over to hyper (behind the request-smuggling guard) for the rest of its life,
//! with the bytes read so far replayed first, so every unusual case keeps hyper's handling.
//! A head is only handed over once complete (or known bad), so the header timeout a
//! client had is not renewed by the hand-over.
//!
//! Behaviour matches the hyper path: the header-read timer (`min(request_header_ms, idle_ms)`)
//! runs while a head is awaited and closes the connection when it fires; a client closing
//! while its request is in flight abandons the request; `Connection: close` (asked by the
//! client, or while draining) closes after the response; a `Date` header is added when the
//! answer has none; lengths unknown up front are sent chunked.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use super::super::body::BodyLength;
use super::super::head::Span;
use super::super::timer::{LazySleep, ReadIdle};
use super::*;

/// Most request headers (hyper's default; a request with more goes to hyper: 431).
const MAX_HEADERS: usize = 100;
/// The largest request body served here, read whole before the request goes upstream;
/// larger ones are streamed by hyper. API requests (JSON, form posts) fit.
pub(crate) const FAST_BODY_MAX: u64 = 64 * 1024;
/// Room reserved in the read buffer before each read.
const READ_RESERVE: usize = 4096;
/// Response data up to this size is copied behind the head (one write); larger frames are
/// written from their own buffers.
const COALESCE: usize = 16 * 1024;

/// What waiting for a request head gave.
enum Read {
    /// A complete head of `len` bytes the fast path serves.
    Head(Parsed),
    /// Give the connection to hyper.
    HandOff,
    /// Closed by the client, timed out, or failed.
    Closed,
}

/// A parsed request head (positions are offsets into its bytes).
struct Parsed {
    len: usize,
    method: Method,
    path: (u32, u32),
    host: Option<usize>,
    /// The request's `Content-Length` (at most [`FAST_BODY_MAX`]).
    content_length: Option<u64>,
    close: bool,
}

/// Why a request body could not be read whole.
enum BodyRead {
    /// The client paused for longer than the request body timeout (408).
    TimedOut,
    /// It closed the connection, or reading failed.
    Closed,
}

/// A `Content-Length` value: ASCII digits only (hyper decides anything else: 400).
fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// How a served request left the connection.
enum After {
    KeepAlive,
    Close,
    HandOff,
}

struct Conn<I> {
    io: I,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// Header positions of the current request head.
    spans: Vec<Span>,
    /// The encoded upstream request head.
    up_head: Vec<u8>,
    /// The upstream response's header lines.
    lines: Vec<u8>,
    timer: Option<LazySleep>,
}

/// Serves an HTTP/1 connection: here while requests are ordinary, then by hyper.
pub(super) async fn serve<I>(shared: Arc<Shared>, ctx: Arc<ConnCtx>, io: I, s: &Settings)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut c = Conn {
        io,
        rbuf: BytesMut::with_capacity(READ_RESERVE),
        wbuf: Vec::with_capacity(1024),
        spans: Vec::new(),
        up_head: Vec::new(),
        lines: Vec::new(),
        timer: None,
    };
    let wait = s.header.min(s.idle);
    loop {
        let parsed = match c.read_head(wait, s.max_header_bytes).await {
            Read::Head(p) => p,
            Read::HandOff => break,
            Read::Closed => return,
        };
        match c.serve_one(&shared, &ctx, parsed).await {
            After::KeepAlive => {}
            After::Close => {
                let _ = c.io.shutdown().await;
                return;
            }
            After::HandOff => break,
        }
    }
    let prefix = c.rbuf.split().freeze();
    let io = Rewind {
        prefix,
        inner: c.io,
    };
    serve_h1(shared, ctx, TokioIo::new(GuardedIo::new(io)), s).await;
}

impl<I> Conn<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn read_head(&mut self, wait: Duration, max_head: usize) -> Read {
        let deadline = tokio::time::Instant::now() + wait;
        let mut armed = false;
        loop {
            if !self.rbuf.is_empty() {
                match self.parse(max_head) {
                    Some(read) => return read,
                    None if self.rbuf.len() > max_head => return Read::HandOff,
                    None => {}
                }
            }
            if !armed {
                match self.timer.as_mut() {
                    Some(t) => t.set(deadline),
                    None => self.timer = Some(LazySleep::new(deadline)),
                }
                armed = true;
            }
            self.rbuf.reserve(READ_RESERVE);
            let Some(timer) = self.timer.as_mut() else {
                return Read::Closed;
            };
            let read = self.io.read_buf(&mut self.rbuf);
            let mut read = std::pin::pin!(read);
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                match timer.poll_elapsed(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match got {
                Some(Ok(n)) if n > 0 => {}
                // EOF, error, or the header timer (hyper closes without an answer too).
                _ => return Read::Closed,
            }
        }
    }

    /// Reads a request body of `len` bytes whole (what is buffered after the head first),
    /// each wait for more bounded by `wait` (the request body timeout).
    async fn read_body(&mut self, len: usize, wait: Duration) -> Result<Bytes, BodyRead> {
        let Self {
            io, rbuf, timer, ..
        } = self;
        let mut idle = ReadIdle::new(wait);
        while rbuf.len() < len {
            rbuf.reserve(len - rbuf.len());
            let mut read = std::pin::pin!(io.read_buf(rbuf));
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                match idle.poll_expired(timer, cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match got {
                Some(Ok(n)) if n > 0 => idle.progressed(),
                Some(_) => return Err(BodyRead::Closed),
                None => return Err(BodyRead::TimedOut),
            }
        }
        Ok(rbuf.split_to(len).freeze())
    }

    /// Parses the buffered head: `None` while it is incomplete.
    fn parse(&mut self, max_head: usize) -> Option<Read> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let buf = &self.rbuf[..];
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            // Malformed, or too many headers: hyper gives the answer (400, 431).
            Err(_) => return Some(Read::HandOff),
        };
        if len > max_head || req.version != Some(1) {
            return Some(Read::HandOff);
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Some(Read::HandOff);
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Some(Read::HandOff);
        };
        if method == Method::CONNECT || !path.starts_with('/') {
            return Some(Read::HandOff);
        }
        let base = buf.as_ptr() as usize;
        let off = |p: *const u8| u32::try_from(p as usize - base).unwrap_or(u32::MAX);
        self.spans.clear();
        let mut host = None;
        let mut length = None;
        let mut close = false;
        for (i, h) in req.headers.iter().enumerate() {
            let name = h.name.as_bytes();
            let value = h.value;
            let is = |lit: &[u8]| name.eq_ignore_ascii_case(lit);
            match name.len() {
                4 if is(b"host") => {
                    host.get_or_insert(i);
                }
                14 if is(b"content-length") => {
                    // A repeated one (even if equal), a malformed one or a large body: hyper's.
                    match content_length(value) {
                        Some(n) if length.is_none() && n <= FAST_BODY_MAX => length = Some(n),
                        _ => return Some(Read::HandOff),
                    }
                }
                // Streamed bodies, interim responses and protocol switches are hyper's.
                6 if is(b"expect") => return Some(Read::HandOff),
                7 if is(b"upgrade") => return Some(Read::HandOff),
                17 if is(b"transfer-encoding") => return Some(Read::HandOff),
                10 if is(b"connection") => {
                    for t in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                        if t.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if t.eq_ignore_ascii_case(b"upgrade") {
                            return Some(Read::HandOff);
                        }
                    }
                }
                _ => {}
            }
            let n = off(h.name.as_ptr());
            let v = off(value.as_ptr());
            self.spans
                .push((n, n + name.len() as u32, v, v + value.len() as u32));
        }
        let p = off(path.as_ptr());
        Some(Read::Head(Parsed {
            len,
            method,
            path: (p, p + path.len() as u32),
            host,
            content_length: length,
            close,
        }))
    }

    async fn serve_one(&mut self, shared: &Shared, ctx: &ConnCtx, p: Parsed) -> After {
        let head = self.rbuf.split_to(p.len).freeze();
        let target = head.slice(p.path.0 as usize..p.path.1 as usize);
        let Ok(pq) = http::uri::PathAndQuery::from_maybe_shared(target) else {
            // hyper refuses such a target (400): put the head back and let it.
            let mut all = BytesMut::with_capacity(head.len() + self.rbuf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(&self.rbuf);
            self.rbuf = all;
            return After::HandOff;
        };
        let start = Instant::now();
        let state = shared.state.load_full();
        let host = p.host.and_then(|i| {
            let (_, _, vs, ve) = self.spans[i];
            let v = &head[vs as usize..ve as usize];
            // As `HeaderValue::to_str`: visible ASCII (and tabs) only.
            v.iter()
                .all(|b| (32..127).contains(b) || *b == b'\t')
                .then(|| std::str::from_utf8(v).ok())
                .flatten()
        });
        let headers = Headers::Raw {
            head: &head,
            spans: &self.spans,
        };
        let origin = ctx.origin(&headers);
        let request_id = state.settings.request_id.then(|| RequestId::of(&headers));
        let log_fields = state.settings.access_log.then(|| {
            Box::new(LogFields {
                method: p.method.clone(),
                host: host.unwrap_or("-").to_owned(),
                path: pq.as_str().to_owned(),
                real_ip: origin.client,
                request_id: request_id.as_ref().map(|id| id.as_str().into()),
            })
        });
        self.up_head.clear();
        let body_len = usize::try_from(p.content_length.unwrap_or(0)).unwrap_or(usize::MAX);
        // A body left unread (an answer given without forwarding) means the connection
        // cannot carry another request.
        let mut body_unread = body_len > 0;
        let routed = route_view(
            &state,
            ctx,
            &View {
                method: &p.method,
                http11: true,
                path: pq.path(),
                target: pq.as_str(),
                host,
                headers,
                origin,
                request_id: request_id.as_ref(),
                declared_len: p.content_length,
                has_body: body_len > 0,
            },
            &mut self.up_head,
        );
        // Nothing of the request head is needed any more: hand its buffer back.
        drop(pq);
        drop(head);
        self.lines.clear();
        let mut upstream_date = false;
        let out = match routed {
            Err(out) => {
                // A body that already arrived is skipped, keeping the connection usable.
                if body_unread && self.rbuf.len() >= body_len {
                    self.rbuf.advance(body_len);
                    body_unread = false;
                }
                *out
            }
            Ok(routed) => 'forward: {
                let body = if body_len == 0 {
                    ReqBody::empty()
                } else {
                    match self.read_body(body_len, state.settings.request_body).await {
                        Ok(b) => {
                            body_unread = false;
                            ReqBody::buffered(b)
                        }
                        Err(BodyRead::TimedOut) => {
                            break 'forward Outcome::local(
                                StatusCode::REQUEST_TIMEOUT,
                                Some(routed.route),
                            );
                        }
                        Err(BodyRead::Closed) => return After::Close,
                    }
                };
                let mut f = Forward {
                    route: routed.route,
                    method: p.method.clone(),
                    head: std::mem::take(&mut self.up_head),
                    chunked: false,
                    body,
                    affinity: routed.affinity,
                    headers: HeaderMap::new(),
                    raw_lines: Some(std::mem::take(&mut self.lines)),
                    upstream_date: false,
                    te_trailers: routed.te_trailers,
                    upgrade: None,
                };
                let out =
                    watch_client(&mut self.io, &mut self.rbuf, exchange(&state, &mut f)).await;
                self.up_head = std::mem::take(&mut f.head);
                self.lines = f.raw_lines.take().unwrap_or_default();
                upstream_date = f.upstream_date;
                match out {
                    Some(out) => out,
                    // The client went away: the request is abandoned (as hyper does).
                    None => return After::Close,
                }
            }
        };
        let resp = finish(
            shared,
            ctx,
            start,
            &state,
            Client {
                http1: false,
                grpc: false,
            },
            log_fields,
            None,
            out,
        );
        let close = p.close || body_unread || shared.draining.load(Ordering::Relaxed);
        match self
            .respond(resp, p.method == Method::HEAD, upstream_date, close)
            .await
        {
            Ok(()) if !close => After::KeepAlive,
            _ => After::Close,
        }
    }

    /// Writes a response: head, then the body (chunked when its length is unknown).
    async fn respond(
        &mut self,
        resp: Response<RespBody>,
        head_only: bool,
        upstream_date: bool,
        close: bool,
    ) -> std::io::Result<()> {
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        // These statuses never have a body, and must not say a length for one (RFC 9110
        // §8.6: no Content-Length in a 1xx or 204; in a 304 it would be the length of the
        // representation, which is not known here).
        let bodiless_status = status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let no_body = head_only || bodiless_status;
        let length = body.length();
        let chunked = length == BodyLength::Unknown && !no_body;
        let w = &mut self.wbuf;
        w.clear();
        w.extend_from_slice(b"HTTP/1.1 ");
        w.extend_from_slice(status.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        w.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            put_line(w, name.as_str().as_bytes(), value.as_bytes());
        }
        w.extend_from_slice(&self.lines);
        match length {
            BodyLength::Known(n)
                if !bodiless_status && !parts.headers.contains_key(header::CONTENT_LENGTH) =>
            {
                w.extend_from_slice(b"content-length: ");
                let mut digits = itoa_buf(n);
                w.extend_from_slice(digits.as_bytes_mut());
                w.extend_from_slice(b"\r\n");
            }
            _ => {}
        }
        if chunked {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !upstream_date && !parts.headers.contains_key(header::DATE) {
            w.extend_from_slice(b"date: ");
            http_date(w);
            w.extend_from_slice(b"\r\n");
        }
        if close {
            w.extend_from_slice(b"connection: close\r\n");
        }
        w.extend_from_slice(b"\r\n");
        if no_body {
            // The body (if any) is not sent; dropping it ends the upstream exchange.
            drop(body);
            self.io.write_all(&self.wbuf).await?;
            return self.io.flush().await;
        }
        // Whatever the body has ready goes out with the head, in one write.
        let mut ended = false;
        loop {
            let frame = std::future::poll_fn(|cx| {
                Poll::Ready(match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(f) => Some(f),
                    Poll::Pending => None,
                })
            })
            .await;
            match frame {
                Some(Some(Ok(f))) => {
                    if let Some(large) = self.put_frame(f, chunked) {
                        self.put_large(large, chunked).await?;
                    }
                }
                Some(Some(Err(_))) => return Err(broken_body()),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if ended && chunked {
            self.wbuf.extend_from_slice(b"0\r\n\r\n");
        }
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        if !ended {
            self.io.flush().await?;
            loop {
                let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                match frame {
                    Some(Ok(f)) => {
                        if let Some(large) = self.put_frame(f, chunked) {
                            self.put_large(large, chunked).await?;
                        }
                    }
                    Some(Err(_)) => return Err(broken_body()),
                    None => break,
                }
                self.io.write_all(&self.wbuf).await?;
                self.wbuf.clear();
            }
            if chunked {
                self.io.write_all(b"0\r\n\r\n").await?;
            }
        }
        self.io.flush().await
    }

    /// Appends a data frame to the write buffer; a large one is handed back, to be written
    /// from its own buffer by [`Conn::put_large`].
    fn put_frame(&mut self, frame: Frame<Bytes>, chunked: bool) -> Option<Bytes> {
        let data = frame.into_data().ok()?; // trailers are not forwarded
        if data.is_empty() {
            return None;
        }
        if chunked {
            put_hex(&mut self.wbuf, data.len());
            self.wbuf.extend_from_slice(b"\r\n");
        }
        if data.len() > COALESCE {
            return Some(data);
        }
        self.wbuf.extend_from_slice(&data);
        if chunked {
            self.wbuf.extend_from_slice(b"\r\n");
        }
        None
    }

    async fn put_large(&mut self, data: Bytes, chunked: bool) -> std::io::Result<()> {
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.io.write_all(&data).await?;
        if chunked {
            self.wbuf.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

fn broken_body() -> std::io::Error {
    std::io::Error::other("upstream response body failed")
}

fn put_line(w: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    w.extend_from_slice(name);
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}

fn put_hex(w: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
}

/// Decimal digits of `n`.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    d
}

/// Runs the exchange while watching the client: `None` if it closed (or failed) meanwhile.
/// Bytes it sends early (a pipelined request) are kept; then it is not watched any more,
/// as hyper does.
async fn watch_client<I: AsyncRead + Unpin>(
    io: &mut I,
    rbuf: &mut BytesMut,
    exchange: impl Future<Output = Outcome>,
) -> Option<Outcome> {
    let mut exchange = std::pin::pin!(exchange);
    let mut watching = rbuf.is_empty();
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = exchange.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if watching {
            let mut spare = [MaybeUninit::<u8>::uninit(); 512];
            let mut rb = ReadBuf::uninit(&mut spare);
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(None),
                Poll::Ready(Ok(())) => {
                    rbuf.extend_from_slice(rb.filled());
                    watching = false;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) of now, formatted once per second and
/// thread.
fn http_date(w: &mut Vec<u8>) {
    thread_local! {
        static CACHE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (cached, mut text) = CACHE.get();
    if cached != secs {
        text = imf_fixdate(secs);
        CACHE.set((secs, text));
    }
    w.extend_from_slice(&text);
}

fn imf_fixdate(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 29];
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    out[3..5].copy_from_slice(b", ");
    let two = |v: i64| [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8];
    out[5..7].copy_from_slice(&two(day));
    out[7] = b' ';
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    out[11] = b' ';
    out[12..14].copy_from_slice(&two(year / 100));
    out[14..16].copy_from_slice(&two(year % 100));
    out[16] = b' ';
    out[17..19].copy_from_slice(&two(hh as i64));
    out[19] = b':';
    out[20..22].copy_from_slice(&two(mm as i64));
    out[22] = b':';
    out[23..25].copy_from_slice(&two(ss as i64));
    out[25..29].copy_from_slice(b" GMT");
    out
}

/// A stream whose first reads return `prefix` (bytes read before hyper took over).
struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::{Backend, HttpPath, Ingress, IngressRule, ProxyConfig, Service};
    use tokio::net::TcpListener;

    /// Bounds every network wait of these tests.
    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        match tokio::time::timeout(Duration::from_secs(10), f).await {
            Ok(v) => v,
            Err(_) => panic!("{what}: timed out"),
        }
    }

    /// An upstream speaking raw HTTP/1.1: `/len` (Content-Length, a header the response
    /// nominates as hop-by-hop), `/chunked`, `/big` (100,000 bytes), `/slow` (answers after
    /// 300 ms); a request body is read by its Content-Length and its size answered.
    async fn upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..100 {
                        let Some(end) = read_until_head_end(&mut s, &mut buf).await else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        while buf.len() < end + len {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + len);
                        let resp: Vec<u8> = match path.as_str() {
                            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                                5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                                .to_vec(),
                            "/big" => {
                                let mut r =
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                                r.extend((0..100_000u32).map(|i| b'a' + (i % 26) as u8));
                                r
                            }
                            "/slow" => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_vec()
                            }
                            _ => format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: private\r\n\
                                 Connection: keep-alive, X-Up\r\nX-Body: {len}\r\n\r\nhello"
                            )
                            .into_bytes(),
                        };
                        if s.write_all(&resp).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    async fn read_until_head_end(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
        for _ in 0..1000 {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(i + 4);
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        None
    }

    fn proxy(up: SocketAddr) -> crate::proxy::ProxyHandle {
        let mut cfg = ProxyConfig::default();
        cfg.listen.http = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.listen.metrics = None;
        cfg.listen.workers = 1;
        cfg.services = vec![Service {
            name: "up".into(),
            port: 80,
            endpoints: vec![up],
            ..Default::default()
        }];
        cfg.ingresses = vec![Ingress {
            name: "i".into(),
            rules: vec![IngressRule {
                host: None,
                paths: vec![HttpPath {
                    backend: Backend {
                        service: "up".into(),
                        port: 80,
                    },
                    ..Default::default()
                }],
            }],
            ..Default::default()
        }];
        crate::proxy::start(cfg).expect("proxy")
    }

    /// Sends `req` and reads until the proxy closes the connection.
    async fn exchange_all(addr: SocketAddr, req: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(req).await.expect("write");
        let mut out = Vec::new();
        within("read to end", c.read_to_end(&mut out))
            .await
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_are_answered_in_order_with_clean_heads() {
        let (up, _u) = upstream().await;
        let p = proxy(up);
        let addr = p.http_addr.expect("http");
        let out = exchange_all(
            addr,
            b"GET /len HTTP/1.1\r\nHost: a.test\r\n\r\n\
              GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n\
              HEAD /len HTTP/1.1\r\nHost: a.test\r\n\r\n\
              GET /len HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        let parts: Vec<&str> = out.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
        assert_eq!(parts.len(), 4, "{out}");
        for (i, p) in parts.iter().enumerate() {
            let lower = p.to_lowercase();
            assert!(
                lower.contains("\r\ndate: ") || lower.starts_with("date: "),
                "{i}: {p}"
            );
            assert!(
                !lower.contains("x-up:"),
                "nominated hop-by-hop header leaked: {p}"
            );
            assert!(!lower.contains("keep-alive"), "{p}");
        }
        assert!(parts[0].ends_with("\r\n\r\nhello"), "{}", parts[0]);
        assert!(
            parts[1]
                .to_lowercase()
                .contains("transfer-encoding: chunked\r\n"),
            "{}",
            parts[1]
        );
        assert!(
            parts[1].ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "{}",
            parts[1]
        );
        // HEAD: the upstream's length, no body.
        assert!(parts[2].contains("Content-Length: 5\r\n"), "{}", parts[2]);
        assert!(parts[2].ends_with("\r\n\r\n"), "{}", parts[2]);
        assert!(parts[3].contains("connection: close\r\n"), "{}", parts[3]);
        assert!(parts[3].ends_with("hello"), "{}", parts[3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_bodies_and_hand_over_to_hyper_keep_the_connection_working() {
        let (up, _u) = upstream().await;
        let p = proxy(up);
        let addr = p.http_addr.expect("http");
        // A large response body; a small request body (read whole here); a request body over
        // FAST_BODY_MAX (served by hyper from then on); then a request in the fast path's
        // form again, now answered by hyper.
        let mut requests = b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n\
              POST /len HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc"
            .to_vec();
        let large = FAST_BODY_MAX as usize + 1;
        requests.extend_from_slice(
            format!("POST /len HTTP/1.1\r\nHost: a.test\r\nContent-Length: {large}\r\n\r\n")
                .as_bytes(),
        );
        requests.extend(std::iter::repeat_n(b'z', large));
        requests
            .extend_from_slice(b"GET /len HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        let out = exchange_all(addr, &requests).await;
        let big: String = (0..100_000u32)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let (first, rest) = out.split_at(out.find(&big).expect("big body") + big.len());
        assert!(
            first.starts_with("HTTP/1.1 200 OK\r\n"),
            "{}",
            &first[..100]
        );
        assert!(first.contains("Content-Length: 100000\r\n"));
        assert_eq!(rest.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{rest}");
        // The fast path copies the upstream's header lines as received; hyper writes names
        // in lower case.
        assert!(
            rest.contains("X-Body: 3\r\n"),
            "the small body reached the upstream through the fast path: {rest}"
        );
        assert!(
            rest.contains(&format!("x-body: {large}\r\n")),
            "the large body reached the upstream through hyper: {rest}"
        );
        assert!(rest.ends_with("hello"), "{rest}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_leaving_mid_request_does_not_disturb_others() {
        let (up, _u) = upstream().await;
        let p = proxy(up);
        let addr = p.http_addr.expect("http");
        let mut gone = TcpStream::connect(addr).await.expect("connect");
        gone.write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .expect("write");
        drop(gone);
        let out = exchange_all(
            addr,
            b"GET /slow HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("slow"),
            "{out}"
        );
        // Local answers come from the fast path too: a request without Host gets 400 and
        // the connection stays usable.
        let out = exchange_all(
            addr,
            b"GET /len HTTP/1.1\r\n\r\nGET /len HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("content-length: 16\r\n"), "{out}");
        assert!(out.ends_with("hello"), "{out}");
        // The same with a body that arrived with the head: it is skipped, not taken for
        // the next request.
        let out = exchange_all(
            addr,
            b"POST /len HTTP/1.1\r\nContent-Length: 15\r\n\r\nGET /x HTTP/1.1\
              GET /len HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 2, "{out}");
        assert!(out.ends_with("hello"), "{out}");
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            &imf_fixdate(4_107_542_399),
            b"Sun, 28 Feb 2100 23:59:59 GMT"
        );
    }

    #[test]
    fn numbers_are_written_in_hex_and_decimal() {
        let mut w = Vec::new();
        for n in [0usize, 9, 10, 255, 16 * 1024, usize::MAX] {
            w.clear();
            put_hex(&mut w, n);
            assert_eq!(w, format!("{n:x}").into_bytes());
        }
        for n in [0u64, 7, 10, 1_234_567, u64::MAX] {
            assert_eq!(itoa_buf(n).as_bytes_mut(), n.to_string().as_bytes());
        }
    }
}
