//! Timers that cost nothing per request: [`LazySleep`], and hyper's timer for HTTP/1
//! connections built on it with sleeps recycled per worker thread.
//!
//! A tokio `Sleep` per request (hyper-util's `TokioTimer` for the request-head timeout,
//! `tokio::time::timeout` for the upstream response) means, every request, a timer entry
//! registered in the runtime's wheel and removed again, and for hyper a boxed sleep. A
//! [`LazySleep`] keeps one registered sleep and only records a later deadline; if the
//! registered one comes first, it re-arms then. hyper's header-read sleeps are moreover
//! recycled: a dropped one goes to a per-thread free list, still registered, and the next
//! request head takes it (an entry that fires while in the list wakes its last task once,
//! spuriously, which hyper tolerates).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

/// A sleep whose deadline moves later for free.
#[derive(Debug)]
pub(crate) struct LazySleep {
    inner: Pin<Box<tokio::time::Sleep>>,
    /// The real deadline; the registered one is never later.
    deadline: TokioInstant,
}

impl LazySleep {
    pub(crate) fn new(deadline: TokioInstant) -> Self {
        Self {
            inner: Box::pin(tokio::time::sleep_until(deadline)),
            deadline,
        }
    }

    /// Sets the deadline. Only an earlier one than registered touches the timer wheel.
    pub(crate) fn set(&mut self, deadline: TokioInstant) {
        if deadline < self.inner.deadline() {
            self.inner.as_mut().reset(deadline);
        }
        self.deadline = deadline;
    }

    /// Ready once the deadline has passed.
    pub(crate) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.inner.as_mut().poll(cx));
            if TokioInstant::now() >= self.deadline {
                return Poll::Ready(());
            }
            // The registered deadline was an older, earlier one: re-arm for the real one.
            self.inner.as_mut().reset(self.deadline);
        }
    }
}

/// Bounds each wait for the next piece of a streamed body (an upstream's response body, as
/// nginx's `proxy_read_timeout` does; a client's request body, as `client_body_timeout`
/// does): the clock runs only while the body is waited for, from the first `Pending` after
/// the last piece, so a reader on the other side that is slow (and so stops the proxy from
/// polling) never counts against the sender. The sleep lives in a slot the caller keeps (for
/// an HTTP/1 upstream connection, its response timer), so that a body that never waits
/// registers no timer at all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadIdle {
    timeout: Duration,
    waiting: bool,
}

impl ReadIdle {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            waiting: false,
        }
    }

    /// The body gave a frame: the next wait starts afresh.
    pub(crate) fn progressed(&mut self) {
        self.waiting = false;
    }

    /// Called when the body is `Pending`: ready once it has been waiting longer than the
    /// timeout (the first call of a wait arms the sleep in `slot`). A timeout too long to
    /// represent never expires.
    pub(crate) fn poll_expired(
        &mut self,
        slot: &mut Option<LazySleep>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let sleep = match slot {
            // Mid-wait: the deadline is set; no clock read per poll.
            Some(s) if self.waiting => s,
            _ => {
                let Some(deadline) = TokioInstant::now().checked_add(self.timeout) else {
                    return Poll::Pending;
                };
                self.waiting = true;
                match slot {
                    Some(s) => {
                        s.set(deadline);
                        s
                    }
                    None => slot.insert(LazySleep::new(deadline)),
                }
            }
        };
        sleep.poll_elapsed(cx)
    }
}

/// Where an exchange with an endpoint stands, for its response timer (see [`until_stalled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// On the endpoint, since this instant (the request's last progress).
    OnEndpointSince(TokioInstant),
    /// On the client, for more of its request body: not the endpoint's time.
    OnClient,
}

/// When an exchange last moved on, written where its bytes flow and read by the timer that
/// bounds its stalls ([`until_stalled`]). For a request's upload: as nginx bounds each write
/// to the endpoint (`proxy_send_timeout`) and the client's pauses separately
/// (`client_body_timeout`), a long upload that keeps moving is not cut by the response
/// timeout. For a tunnel: bytes either way keep it open.
#[derive(Debug)]
pub(crate) struct Progress {
    start: TokioInstant,
    /// Nanoseconds after `start` of the last progress, or [`ON_CLIENT`].
    last: std::sync::atomic::AtomicU64,
}

const ON_CLIENT: u64 = u64::MAX;

impl Progress {
    /// Progress as of `start`.
    pub(crate) fn new(start: TokioInstant) -> Self {
        Self {
            start,
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The body moved on (a piece arrived from the client, or went out to the endpoint).
    pub(crate) fn advanced(&self) {
        let nanos = TokioInstant::now()
            .saturating_duration_since(self.start)
            .as_nanos();
        let nanos = u64::try_from(nanos)
            .unwrap_or(ON_CLIENT - 1)
            .min(ON_CLIENT - 1);
        self.last.store(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    /// The sender waits for the client's next piece.
    pub(crate) fn on_client(&self) {
        self.last
            .store(ON_CLIENT, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn waiting(&self) -> Waiting {
        match self.last.load(std::sync::atomic::Ordering::Relaxed) {
            ON_CLIENT => Waiting::OnClient,
            n => Waiting::OnEndpointSince(self.start + Duration::from_nanos(n)),
        }
    }
}

/// Runs `exchange` until it ends, or until the endpoint has kept it waiting for longer than
/// `timeout` (None): the clock runs from the last progress `waiting` reports and is held
/// while it reports the client is waited on. `timer` (set to the first deadline by the
/// caller) is only re-armed when it fires, so progress costs no timer-wheel work.
pub(crate) async fn until_stalled<F: Future>(
    exchange: F,
    timer: &mut LazySleep,
    timeout: Duration,
    waiting: impl Fn() -> Waiting,
) -> Option<F::Output> {
    let mut exchange = std::pin::pin!(exchange);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        loop {
            ready!(timer.poll_elapsed(cx));
            let now = TokioInstant::now();
            let from = match waiting() {
                Waiting::OnEndpointSince(since) => since,
                Waiting::OnClient => now,
            };
            let Some(deadline) = from.checked_add(timeout) else {
                return Poll::Pending; // too far off to ever come
            };
            if deadline <= now {
                return Poll::Ready(None);
            }
            timer.set(deadline);
        }
    })
    .await
}

/// Sleeps kept per thread (one per connection waiting for a request head is the most that
/// can be useful at once).
const MAX_SPARE: usize = 4096;

thread_local! {
    static SPARE: RefCell<Vec<LazySleep>> = const { RefCell::new(Vec::new()) };
}

/// Drops the current thread's spare sleeps (a worker does so once its runtime is gone).
pub(crate) fn clear_spares() {
    let spares = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    drop(spares);
}

/// A `hyper::rt::Timer` of recycled [`LazySleep`]s; for the workers' current-thread runtimes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RecyclingTimer;

impl hyper::rt::Timer for RecyclingTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = TokioInstant::from_std(deadline);
        let inner = match SPARE.with(|s| s.borrow_mut().pop()) {
            Some(mut sleep) => {
                sleep.set(deadline);
                sleep
            }
            None => LazySleep::new(deadline),
        };
        Box::pin(RecycledSleep { inner: Some(inner) })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<RecycledSleep>() {
            Some(mut s) => {
                if let Some(inner) = s.inner.as_mut() {
                    inner.set(TokioInstant::from_std(new_deadline));
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

struct RecycledSleep {
    inner: Option<LazySleep>,
}

impl Future for RecycledSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.inner.as_mut() {
            Some(inner) => inner.poll_elapsed(cx),
            None => Poll::Ready(()),
        }
    }
}

impl hyper::rt::Sleep for RecycledSleep {}

impl Drop for RecycledSleep {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            // `try_with`: during thread teardown the list may be gone; the sleep then just
            // drops (deregistering itself).
            let _ = SPARE.try_with(|s| {
                if let Ok(mut s) = s.try_borrow_mut()
                    && s.len() < MAX_SPARE
                {
                    s.push(inner);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    #[tokio::test(flavor = "current_thread")]
    async fn recycled_sleeps_fire_at_their_new_deadline() {
        let t = RecyclingTimer;
        let mut first = t.sleep(Duration::from_millis(20));
        // Registered in the wheel (a first poll), then given back.
        assert!(futures_poll_once(&mut first).await.is_pending());
        drop(first);
        assert_eq!(SPARE.with(|s| s.borrow().len()), 1);
        // Reuses the spare with a later deadline (the registration is only extended).
        let start = Instant::now();
        let second = t.sleep(Duration::from_millis(100));
        assert_eq!(SPARE.with(|s| s.borrow().len()), 0);
        second.await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // An earlier deadline than the registered one is honoured too.
        let mut third = t.sleep(Duration::from_secs(10));
        assert!(futures_poll_once(&mut third).await.is_pending());
        let start = Instant::now();
        t.reset(&mut third, start + Duration::from_millis(30));
        third.await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        clear_spares();
        assert_eq!(SPARE.with(|s| s.borrow().len()), 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn read_idle_counts_only_the_current_wait() {
        let timeout = Duration::from_millis(100);
        let mut idle = ReadIdle::new(timeout);
        let mut slot = None;
        let poll = |idle: &mut ReadIdle, slot: &mut Option<LazySleep>| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            idle.poll_expired(slot, &mut cx)
        };
        // A body that never waits arms nothing.
        idle.progressed();
        assert!(slot.is_none());
        // A wait of 60 ms, a frame, then another wait: 60 + 70 ms in all is past the
        // timeout, but neither wait is.
        assert!(poll(&mut idle, &mut slot).is_pending());
        tokio::time::advance(Duration::from_millis(60)).await;
        idle.progressed();
        // A slow client: nothing polls the body for 500 ms after that frame.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(poll(&mut idle, &mut slot).is_pending());
        tokio::time::advance(Duration::from_millis(70)).await;
        assert!(poll(&mut idle, &mut slot).is_pending());
        // The same wait going past the timeout ends it.
        tokio::time::advance(Duration::from_millis(31)).await;
        assert!(poll(&mut idle, &mut slot).is_ready());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_endpoints_time_stops_while_the_client_is_waited_for() {
        let timeout = Duration::from_millis(100);
        let start = TokioInstant::now();
        let progress = Progress::new(start);
        let mut timer = LazySleep::new(start + timeout);
        let stalled = until_stalled(std::future::pending::<()>(), &mut timer, timeout, || {
            progress.waiting()
        });
        let mut stalled = std::pin::pin!(stalled);
        let mut poll = |at: u64| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let r = stalled.as_mut().poll(&mut cx);
            (at, r.is_ready())
        };
        assert_eq!(poll(0), (0, false));
        // 90 ms on the endpoint, then the client is waited for, for a second.
        tokio::time::advance(Duration::from_millis(90)).await;
        progress.on_client();
        for step in 1..=10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!(poll(step), (step, false));
        }
        // A piece arrives: the endpoint has 100 ms from now.
        progress.advanced();
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(poll(11), (11, false));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(poll(12), (12, true));
    }

    async fn futures_poll_once(f: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }
}
