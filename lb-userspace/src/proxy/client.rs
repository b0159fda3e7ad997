//! A lean HTTP/1.1 client for upstream exchanges.
//!
//! hyper's client runs each connection as its own task and hands requests, responses and body
//! chunks across channels, which costs several task wake-ups per proxied request. Here the
//! exchange runs inline in the downstream request's task: the head (and body) are written,
//! the response head is parsed with httparse, and the response body is decoded straight from
//! the socket by [`UpstreamBody`] as hyper's server polls it. A connection whose response was
//! read to its end goes back to its endpoint's pool.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::body::{BodyTimedOut, BodyTooLarge, BoxError, ReqBody};
use super::head;
use super::timer::{LazySleep, Progress, ReadIdle, until_stalled};
use super::upstream::Endpoint;
use super::upstream_tls::{TlsOrigination, UpstreamIo};

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_RESPONSE_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection was closed before any response byte arrived and no request body had been
    /// consumed: safe to send again on another connection.
    #[error("upstream connection closed before responding")]
    Stale,
    /// The downstream request body exceeded the route's limit.
    #[error(transparent)]
    BodyTooLarge(#[from] BodyTooLarge),
    /// The downstream request body failed (client went away).
    #[error("request body: {0}")]
    RequestBody(BoxError),
    /// Socket error.
    #[error("upstream i/o: {0}")]
    Io(#[from] io::Error),
    /// The upstream's response is not valid HTTP/1.1.
    #[error("malformed upstream response: {0}")]
    Protocol(&'static str),
    /// No response head within the upstream response timeout.
    #[error("upstream response timed out")]
    TimedOut,
    /// The client sent no more of its request body within the request body timeout.
    #[error(transparent)]
    ClientTimedOut(#[from] BodyTimedOut),
    /// The response body stopped: nothing more of it within the response timeout.
    #[error("upstream response body stalled for longer than the response timeout")]
    BodyStalled,
}

/// Per-exchange settings.
#[derive(Debug)]
pub struct Exchange<'a> {
    /// How long the endpoint may keep the exchange waiting: to take each piece of the
    /// request, then, once the request is out, for the response head. (Waiting for the
    /// client's body does not count.)
    pub timeout: std::time::Duration,
    /// A map to read the response headers into (taken; an empty one allocates nothing).
    pub headers: &'a mut HeaderMap,
    /// Instead of the map: the response's header lines as received, hop-by-hop ones left
    /// out, appended here (for a server that writes them downstream as they are).
    pub raw: Option<&'a mut Vec<u8>>,
}

/// Writes `head`, then `body` if any, vectored so that a small request leaves in one
/// system call.
async fn write_head_and(io: &mut UpstreamIo, head: &[u8], body: Option<&[u8]>) -> io::Result<()> {
    let Some(body) = body else {
        return io.write_all(head).await;
    };
    let mut sent = 0;
    while sent < head.len() {
        let bufs = [io::IoSlice::new(&head[sent..]), io::IoSlice::new(body)];
        let n = io.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    io.write_all(&body[sent - head.len()..]).await
}

/// The request body's side of an exchange.
struct Upload<'a> {
    body: &'a mut ReqBody,
    /// Announced as chunked in the head.
    chunked: bool,
    /// Set once any of the body was read (the request can no longer be sent again).
    touched: &'a mut bool,
    progress: &'a Progress,
}

/// An upstream HTTP/1.1 connection.
#[derive(Debug)]
pub struct UpstreamConn {
    io: UpstreamIo,
    /// Bytes read but not consumed yet.
    rbuf: BytesMut,
    /// Reused buffer for the header positions of response heads.
    spans: Vec<Span>,
    names: NameCache,
    /// The response timer, kept with the connection (a later deadline costs nothing; a
    /// timer per exchange would be registered in and removed from the timer wheel each time).
    timer: Option<LazySleep>,
}

/// (name start, name end, value start, value end) of a header in a response head.
type Span = (u32, u32, u32, u32);

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { value: u64, digits: bool },
    Ext { value: u64 },
    SizeLf { value: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status.
    pub status: StatusCode,
    /// Headers as received, hop-by-hop ones left out (empty when they went to
    /// [`Exchange::raw`]).
    pub headers: HeaderMap,
    /// The upstream sent a `Date` header.
    pub has_date: bool,
    framing: Framing,
    keep_alive: bool,
}

impl UpstreamConn {
    /// Connects (with `TCP_NODELAY`, and TLS if `tls`). Boxed: a connection moves from the
    /// pool to the exchange, the response body and back for every request, a pointer moves
    /// faster.
    pub async fn connect(
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
        tls: Option<&TlsOrigination>,
    ) -> io::Result<Box<Self>> {
        let io = UpstreamIo::connect(addr, timeout, tls).await?;
        Ok(Box::new(Self {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            spans: Vec::new(),
            names: NameCache::default(),
            timer: None,
        }))
    }

    /// Whether an idle pooled connection still looks usable: no EOF and no unsolicited bytes.
    /// One non-blocking read; used before sending requests that cannot be re-sent.
    pub fn looks_alive(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match &mut self.io {
            UpstreamIo::Plain(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // Through the session: records that carry no data (TLS 1.3 session tickets) are
            // consumed and do not count, a close_notify reads as EOF.
            UpstreamIo::Tls(s) => {
                let mut buf = tokio::io::ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(&mut **s).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }

    /// Sends a request (`head` encoded by [`super::head::encode_request`], announcing a
    /// chunked body if `chunked`) and reads the response head, within `x.timeout`.
    pub async fn exchange(
        &mut self,
        head: &[u8],
        method: &Method,
        chunked: bool,
        body: &mut ReqBody,
        body_touched: &mut bool,
        x: Exchange<'_>,
    ) -> Result<ResponseHead, ExchangeError> {
        let start = tokio::time::Instant::now();
        let timeout = x.timeout;
        let deadline = start + timeout;
        let mut timer = match self.timer.take() {
            Some(mut t) => {
                t.set(deadline);
                t
            }
            None => LazySleep::new(deadline),
        };
        let progress = Progress::new(start);
        let upload = Upload {
            body,
            chunked,
            touched: body_touched,
            progress: &progress,
        };
        let inner = self.exchange_inner(head, method, upload, x);
        let result = until_stalled(inner, &mut timer, timeout, || progress.waiting())
            .await
            .unwrap_or(Err(ExchangeError::TimedOut));
        self.timer = Some(timer);
        result
    }

    async fn exchange_inner(
        &mut self,
        head: &[u8],
        method: &Method,
        upload: Upload<'_>,
        x: Exchange<'_>,
    ) -> Result<ResponseHead, ExchangeError> {
        let Exchange {
            headers, mut raw, ..
        } = x;
        let Upload {
            body,
            chunked,
            touched: body_touched,
            progress,
        } = upload;
        // A body read whole goes out with the head: one write, one segment on the wire.
        let buffered = body.take_buffered();
        if buffered.is_some() {
            *body_touched = true;
        }
        if let Err(e) = write_head_and(&mut self.io, head, buffered.as_deref()).await {
            return Err(if is_reset(&e) {
                ExchangeError::Stale
            } else {
                e.into()
            });
        }
        if !body.is_end_stream() {
            *body_touched = true;
            self.send_body(body, chunked, progress).await?;
        }
        if let UpstreamIo::Tls(s) = &mut self.io {
            // A TLS session may hold records back when the socket is full; a plain socket
            // buffers nothing.
            s.flush().await?;
        }
        // The request is out: the response timeout runs from here.
        progress.advanced();
        loop {
            let head = self
                .read_head(
                    method,
                    *body_touched,
                    std::mem::take(headers),
                    raw.as_deref_mut(),
                )
                .await?;
            // Interim responses (100 Continue, 103 Early Hints) are not forwarded.
            if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                continue;
            }
            return Ok(head);
        }
    }

    /// Sends the request body, telling `progress` when it waits on the client and when a
    /// piece has gone out.
    async fn send_body(
        &mut self,
        body: &mut ReqBody,
        chunked: bool,
        progress: &Progress,
    ) -> Result<(), ExchangeError> {
        loop {
            // Waiting for the client is the request body timeout's business (408), not the
            // endpoint's; writing what came is the endpoint's.
            progress.on_client();
            let frame = body.frame().await;
            progress.advanced();
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| {
                let e = match e.downcast::<BodyTooLarge>() {
                    Ok(b) => return ExchangeError::BodyTooLarge(*b),
                    Err(e) => e,
                };
                match e.downcast::<BodyTimedOut>() {
                    Ok(t) => ExchangeError::ClientTimedOut(*t),
                    Err(e) => ExchangeError::RequestBody(e),
                }
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not forwarded
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let size = format!("{:x}\r\n", data.len());
                self.io.write_all(size.as_bytes()).await?;
                self.io.write_all(&data).await?;
                self.io.write_all(b"\r\n").await?;
            } else {
                self.io.write_all(&data).await?;
            }
            // Each piece goes out as it comes (a no-op on a plain socket): a slow upload must
            // not leave bytes held in a TLS session while the next piece is awaited.
            self.io.flush().await?;
        }
        if chunked {
            self.io.write_all(b"0\r\n\r\n").await?;
        }
        Ok(())
    }

    async fn read_head(
        &mut self,
        method: &Method,
        body_touched: bool,
        headers: HeaderMap,
        mut raw_sink: Option<&mut Vec<u8>>,
    ) -> Result<ResponseHead, ExchangeError> {
        let mut received_any = !self.rbuf.is_empty();
        loop {
            if !self.rbuf.is_empty() {
                if let Some((len, raw)) = RawHead::parse(&self.rbuf, &mut self.spans)? {
                    // Header values become slices of this buffer: no copy, no allocation.
                    // The allocation is reclaimed by `reserve` once the response head has
                    // been written downstream and these slices are gone.
                    let bytes = self.rbuf.split_to(len).freeze();
                    return build_head(
                        &raw,
                        &self.spans,
                        &bytes,
                        method,
                        headers,
                        &mut self.names,
                        raw_sink.as_deref_mut(),
                    );
                }
                if self.rbuf.len() > MAX_RESPONSE_HEAD {
                    return Err(ExchangeError::Protocol("head too large"));
                }
            }
            self.rbuf.reserve(READ_CHUNK);
            let n = match self.io.read_buf(&mut self.rbuf).await {
                Ok(n) => n,
                Err(e) if is_reset(&e) && !received_any && !body_touched => {
                    return Err(ExchangeError::Stale);
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(if received_any || body_touched {
                    ExchangeError::Io(io::ErrorKind::UnexpectedEof.into())
                } else {
                    ExchangeError::Stale
                });
            }
            received_any = true;
        }
    }

    /// The socket and any bytes already read past the response head (for upgrades).
    pub fn into_parts(self) -> (UpstreamIo, BytesMut) {
        (self.io, self.rbuf)
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// A parsed response head's status line; the header positions go to a reused `Vec<Span>`.
struct RawHead {
    code: u16,
    http11: bool,
}

impl RawHead {
    /// `Some((head length, status line))` once the head is complete; `spans` then holds
    /// the positions of the headers (offsets into `buf`).
    fn parse(buf: &[u8], spans: &mut Vec<Span>) -> Result<Option<(usize, Self)>, ExchangeError> {
        // Uninitialised slots: initialising 128 of them per response costs more than parsing
        // a typical head.
        let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
            MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ExchangeError::Protocol("unparsable head")),
        };
        let base = buf.as_ptr() as usize;
        let off = |p: *const u8| u32::try_from(p as usize - base).unwrap_or(u32::MAX);
        spans.clear();
        spans.extend(resp.headers.iter().map(|h| {
            let n = off(h.name.as_ptr());
            let v = off(h.value.as_ptr());
            (n, n + h.name.len() as u32, v, v + h.value.len() as u32)
        }));
        Ok(Some((
            len,
            Self {
                code: resp.code.ok_or(ExchangeError::Protocol("no status"))?,
                http11: resp.version == Some(1),
            },
        )))
    }
}

/// How a response header is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameKind {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop other than the above (not forwarded).
    HopByHop,
    Date,
    Other,
}

#[derive(Debug)]
struct KnownName {
    raw: Box<[u8]>,
    name: HeaderName,
    kind: NameKind,
}

/// Header names of an upstream's responses by position. An upstream sends the same names
/// in the same order response after response; comparing the raw bytes with the last ones
/// is much cheaper than parsing and classifying a name.
#[derive(Debug, Default)]
struct NameCache(Vec<Option<KnownName>>);

/// Positions remembered (later headers are parsed every time).
const NAME_CACHE_SLOTS: usize = 32;

impl NameCache {
    fn name(&mut self, i: usize, raw: &[u8]) -> Result<(&HeaderName, NameKind), ExchangeError> {
        // Positions past the remembered ones share the last slot.
        let slot = i.min(NAME_CACHE_SLOTS);
        let hit = self
            .0
            .get(slot)
            .is_some_and(|k| k.as_ref().is_some_and(|k| *k.raw == *raw));
        if !hit {
            let name =
                HeaderName::from_bytes(raw).map_err(|_| ExchangeError::Protocol("header name"))?;
            let kind = if name == header::CONTENT_LENGTH {
                NameKind::ContentLength
            } else if name == header::TRANSFER_ENCODING {
                NameKind::TransferEncoding
            } else if name == header::CONNECTION {
                NameKind::Connection
            } else if head::is_hop_by_hop_response(&name) {
                NameKind::HopByHop
            } else if name == header::DATE {
                NameKind::Date
            } else {
                NameKind::Other
            };
            if self.0.len() <= slot {
                self.0.resize_with(slot + 1, || None);
            }
            self.0[slot] = Some(KnownName {
                raw: raw.into(),
                name,
                kind,
            });
        }
        match self.0.get(slot) {
            Some(Some(known)) => Ok((&known.name, known.kind)),
            _ => Err(ExchangeError::Protocol("header name")),
        }
    }
}

/// A Content-Length value: ASCII digits only (no sign, no list), without overflow.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

fn put_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn build_head(
    raw: &RawHead,
    spans: &[Span],
    bytes: &Bytes,
    method: &Method,
    mut headers: HeaderMap,
    names: &mut NameCache,
    mut raw_out: Option<&mut Vec<u8>>,
) -> Result<ResponseHead, ExchangeError> {
    let status =
        StatusCode::from_u16(raw.code).map_err(|_| ExchangeError::Protocol("bad status"))?;
    let http11 = raw.http11;
    // A 101's headers go to the client as they are (Connection and Upgrade included); other
    // responses lose their hop-by-hop headers here rather than by removals from the map.
    let keep_hop = status == StatusCode::SWITCHING_PROTOCOLS;
    if raw_out.is_none() {
        headers.clear();
        headers.reserve(spans.len());
    }
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut te = false;
    let mut close = !http11;
    let mut nominates = false;
    let mut has_date = false;
    let raw_start = raw_out.as_ref().map_or(0, |r| r.len());
    for (i, &(ns, ne, vs, ve)) in spans.iter().enumerate() {
        let raw_value = &bytes[vs as usize..ve as usize];
        let raw_name = &bytes[ns as usize..ne as usize];
        let (name, kind) = names.name(i, raw_name)?;
        if kind == NameKind::ContentLength {
            let n = parse_decimal(raw_value.trim_ascii())
                .ok_or(ExchangeError::Protocol("content-length"))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(ExchangeError::Protocol("conflicting content-length"));
            }
            content_length = Some(n);
        } else if kind == NameKind::TransferEncoding {
            te = true;
            chunked = raw_value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if kind == NameKind::Connection {
            let v = raw_value;
            if v.split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                close = true;
            } else if !http11
                && v.split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive"))
            {
                close = false;
            }
            nominates |= head::nominated(v).next().is_some();
        } else if kind == NameKind::Date {
            has_date = true;
        }
        if !keep_hop
            && matches!(
                kind,
                NameKind::TransferEncoding | NameKind::Connection | NameKind::HopByHop
            )
        {
            continue;
        }
        match raw_out.as_deref_mut() {
            Some(out) => put_line(out, raw_name, raw_value),
            None => {
                let value = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..ve as usize))
                    .map_err(|_| ExchangeError::Protocol("header value"))?;
                headers.append(name.clone(), value);
            }
        }
    }
    if nominates && !keep_hop {
        // Rare: the upstream named headers of its own as hop-by-hop.
        let mut dropped: Vec<&[u8]> = Vec::new();
        for &(ns, ne, vs, ve) in spans {
            if bytes[ns as usize..ne as usize].eq_ignore_ascii_case(b"connection") {
                dropped.extend(head::nominated(&bytes[vs as usize..ve as usize]));
            }
        }
        match raw_out.as_deref_mut() {
            Some(out) => {
                out.truncate(raw_start);
                for &(ns, ne, vs, ve) in spans {
                    let n = &bytes[ns as usize..ne as usize];
                    if !head::is_hop_by_hop_response_raw(n)
                        && !dropped.iter().any(|d| d.eq_ignore_ascii_case(n))
                    {
                        put_line(out, n, &bytes[vs as usize..ve as usize]);
                    }
                }
            }
            None => {
                for name in dropped {
                    if let Ok(name) = HeaderName::from_bytes(name) {
                        headers.remove(name);
                    }
                }
            }
        }
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if te {
        if chunked {
            // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); never pass both on.
            headers.remove(header::CONTENT_LENGTH);
            Framing::Chunked(Chunk::Size {
                value: 0,
                digits: false,
            })
        } else {
            close = true;
            Framing::UntilClose
        }
    } else if let Some(n) = content_length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        close = true;
        Framing::UntilClose
    };
    if let Some(out) = raw_out
        && matches!(framing, Framing::Chunked(_))
    {
        // The body goes downstream with a framing of its own: the upstream's length is moot.
        drop_lines(out, raw_start, b"content-length");
    }
    Ok(ResponseHead {
        status,
        headers,
        has_date,
        framing,
        keep_alive: !close,
    })
}

/// Removes the `name` lines from the header lines in `out[start..]`.
fn drop_lines(out: &mut Vec<u8>, start: usize, name: &[u8]) {
    let mut kept = Vec::with_capacity(out.len() - start);
    for line in out[start..].split_inclusive(|b| *b == b'\n') {
        let n = line.split(|b| *b == b':').next().unwrap_or_default();
        if !n.eq_ignore_ascii_case(name) {
            kept.extend_from_slice(line);
        }
    }
    out.truncate(start);
    out.extend_from_slice(&kept);
}

/// An upstream response body, decoded from the connection as it is polled. Once complete (and
/// the connection reusable) the connection returns to `endpoint`'s pool.
#[derive(Debug)]
pub struct UpstreamBody {
    conn: Option<Box<UpstreamConn>>,
    framing: Framing,
    /// The length is not known up front (chunked or close-delimited upstream).
    unknown_length: bool,
    keep_alive: bool,
    endpoint: Arc<Endpoint>,
    done: bool,
    /// Bounds each wait for more of the body (on the connection's response timer).
    idle: ReadIdle,
}

impl UpstreamBody {
    /// The body of `head`, read from `conn`; a wait for more of it longer than
    /// `read_timeout` fails it with [`ExchangeError::BodyStalled`].
    pub fn new(
        conn: Box<UpstreamConn>,
        head: &ResponseHead,
        endpoint: Arc<Endpoint>,
        read_timeout: std::time::Duration,
    ) -> Self {
        let mut b = Self {
            conn: Some(conn),
            framing: head.framing,
            unknown_length: matches!(head.framing, Framing::Chunked(_) | Framing::UntilClose),
            keep_alive: head.keep_alive,
            endpoint,
            done: false,
            idle: ReadIdle::new(read_timeout),
        };
        if matches!(b.framing, Framing::Empty) {
            b.finish();
        }
        b
    }

    /// The body's length is not known up front (the head carries no Content-Length).
    pub fn unknown_length(&self) -> bool {
        self.unknown_length
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.rbuf.is_empty()
        {
            self.endpoint.checkin(conn);
        }
    }

    /// Reads more bytes into the connection buffer; `Ok(0)` is EOF.
    fn poll_fill(conn: &mut UpstreamConn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        conn.rbuf.reserve(READ_CHUNK);
        match &mut conn.io {
            UpstreamIo::Plain(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                match s.try_read_buf(&mut conn.rbuf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            UpstreamIo::Tls(s) => {
                tokio_util::io::poll_read_buf(Pin::new(&mut **s), cx, &mut conn.rbuf)
            }
        }
    }

    /// Advances the chunked decoder over buffered bytes.
    fn decode_chunked(conn: &mut UpstreamConn, st: &mut Chunk) -> Result<Decoded, ExchangeError> {
        let buf = &mut conn.rbuf;
        while !buf.is_empty() {
            if let Chunk::Data(n) = *st {
                let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = n - take as u64;
                *st = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                return Ok(Decoded::Data(data));
            }
            let b = buf[0];
            buf.advance(1);
            *st = match *st {
                Chunk::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                        let v = value
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(d))
                            .ok_or(ExchangeError::Protocol("chunk size"))?;
                        Chunk::Size {
                            value: v,
                            digits: true,
                        }
                    }
                    b';' | b' ' | b'\t' if digits => Chunk::Ext { value },
                    b'\r' if digits => Chunk::SizeLf { value },
                    _ => return Err(ExchangeError::Protocol("chunk size")),
                },
                Chunk::Ext { value } => match b {
                    b'\r' => Chunk::SizeLf { value },
                    _ => Chunk::Ext { value },
                },
                Chunk::SizeLf { value } => match (b, value) {
                    (b'\n', 0) => Chunk::TrailerStart,
                    (b'\n', v) => Chunk::Data(v),
                    _ => return Err(ExchangeError::Protocol("chunk size line")),
                },
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size {
                    value: 0,
                    digits: false,
                },
                Chunk::TrailerStart => match b {
                    b'\r' => Chunk::TrailerLf,
                    _ => Chunk::Trailer,
                },
                Chunk::Trailer => match b {
                    b'\n' => Chunk::TrailerStart,
                    _ => Chunk::Trailer,
                },
                Chunk::TrailerLf if b == b'\n' => return Ok(Decoded::End),
                _ => return Err(ExchangeError::Protocol("chunk framing")),
            };
        }
        Ok(Decoded::NeedMore)
    }
}

enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

enum Step {
    /// Data, and whether it completes the body.
    Data(Bytes, bool),
    End,
    Fill,
    Fail(ExchangeError),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Produce from buffered bytes if possible (disjoint borrows of conn and framing).
            let step = match &mut this.framing {
                Framing::Empty => Step::End,
                Framing::Length(n) if !conn.rbuf.is_empty() => {
                    let take = usize::try_from(*n)
                        .unwrap_or(usize::MAX)
                        .min(conn.rbuf.len());
                    let data = conn.rbuf.split_to(take).freeze();
                    *n -= take as u64;
                    Step::Data(data, *n == 0)
                }
                Framing::Length(_) => Step::Fill,
                Framing::Chunked(st) => match Self::decode_chunked(conn, st) {
                    Ok(Decoded::Data(d)) => Step::Data(d, false),
                    Ok(Decoded::End) => Step::End,
                    Ok(Decoded::NeedMore) => Step::Fill,
                    Err(e) => Step::Fail(e),
                },
                Framing::UntilClose if !conn.rbuf.is_empty() => {
                    Step::Data(conn.rbuf.split().freeze(), false)
                }
                Framing::UntilClose => Step::Fill,
            };
            match step {
                Step::Data(d, last) => {
                    if last {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::Fail(e) => {
                    this.conn = None;
                    this.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Step::Fill => match Self::poll_fill(conn, cx) {
                    Poll::Pending => {
                        ready!(this.idle.poll_expired(&mut conn.timer, cx));
                        // The connection is mid-response: it cannot be reused.
                        this.conn = None;
                        this.done = true;
                        return Poll::Ready(Some(Err(Box::new(ExchangeError::BodyStalled))));
                    }
                    Poll::Ready(Ok(0)) if matches!(this.framing, Framing::UntilClose) => {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Ok(0)) => {
                        this.conn = None;
                        this.done = true;
                        let e = ExchangeError::Io(io::ErrorKind::UnexpectedEof.into());
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    Poll::Ready(Ok(_)) => this.idle.progressed(),
                    Poll::Ready(Err(e)) => {
                        this.conn = None;
                        this.done = true;
                        return Poll::Ready(Some(Err(Box::new(ExchangeError::Io(e)))));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], method: &Method) -> Result<ResponseHead, ExchangeError> {
        let mut spans = Vec::new();
        let (len, status) = RawHead::parse(raw, &mut spans)?.expect("complete head");
        build_head(
            &status,
            &spans,
            &Bytes::copy_from_slice(&raw[..len]),
            method,
            HeaderMap::new(),
            &mut NameCache::default(),
            None,
        )
    }

    fn head(raw: &[u8], method: &Method) -> ResponseHead {
        parse(raw, method).expect("valid head")
    }

    #[test]
    fn framing_follows_rfc9112() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::GET,
        );
        assert!(matches!(h.framing, Framing::Length(5)) && h.keep_alive);
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        );
        assert!(matches!(h.framing, Framing::Empty));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
            &Method::GET,
        );
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", &Method::GET);
        assert!(matches!(h.framing, Framing::UntilClose) && !h.keep_alive);
        let h = head(
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            &Method::GET,
        );
        assert!(matches!(h.framing, Framing::Empty) && !h.keep_alive);
        let h = head(
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            &Method::GET,
        );
        assert!(!h.keep_alive);
    }

    #[test]
    fn hop_by_hop_response_headers_are_dropped_except_from_a_101() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Up-Private\r\nX-Up-Private: 1\r\n\
              Keep-Alive: timeout=5\r\nUpgrade: h2c\r\nX-Kept: 1\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        let mut names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert!(h.keep_alive);
        let h = head(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(
            h.headers.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert!(h.headers.contains_key("connection"));
    }

    #[test]
    fn remembered_names_follow_what_each_response_sends() {
        let mut names = NameCache::default();
        let mut parse_with = |raw: &[u8]| {
            let mut spans = Vec::new();
            let (len, status) = RawHead::parse(raw, &mut spans).unwrap().unwrap();
            build_head(
                &status,
                &spans,
                &Bytes::copy_from_slice(&raw[..len]),
                &Method::GET,
                HeaderMap::new(),
                &mut names,
                None,
            )
            .unwrap()
        };
        let first = b"HTTP/1.1 200 OK\r\nServer: a\r\nContent-Length: 1\r\nX-One: 1\r\n\r\n";
        for _ in 0..2 {
            let h = parse_with(first);
            assert_eq!(h.headers.get("server").unwrap(), "a");
            assert_eq!(h.headers.get("x-one").unwrap(), "1");
            assert!(matches!(h.framing, Framing::Length(1)));
        }
        // Other names at the same positions (and a hop-by-hop one where a kept one was).
        let h = parse_with(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nX-Two: 2\r\n\r\n",
        );
        assert_eq!(h.headers.len(), 1, "{:?}", h.headers);
        assert_eq!(h.headers.get("x-two").unwrap(), "2");
        assert!(matches!(h.framing, Framing::Chunked(_)) && !h.keep_alive);
        let h = parse_with(first);
        assert_eq!(h.headers.len(), 3, "{:?}", h.headers);
        assert!(h.keep_alive);
    }

    #[test]
    fn content_lengths_are_plain_digits() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 5",
            b"5,5",
            b"0x10",
            b"18446744073709551616",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(parse(raw, &Method::GET).is_err());
        let h = head(
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nServer: up\r\n\r\nbody",
            &Method::GET,
        );
        assert_eq!(h.headers.get("x-a").map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert_eq!(
            h.headers.get("server").map(|v| v.as_bytes()),
            Some(&b"up"[..])
        );
    }
}
