//! A timeout for backend reads and writes that costs next to nothing when the backend keeps
//! up.
//!
//! One timer per client connection, reused for every wait: it is armed (one clock read) only
//! when a read or write has to wait, and re-arming moves its deadline later, which tokio does
//! with one atomic operation, without touching its timer wheel. `pingora_timeout` reads the
//! clock on every call, and registers and drops a timer per wait (a lock, a map lookup, a
//! notify waiter): ~1 % of the proxy's CPU per request on the benchmark. The timers
//! themselves (this one, and a connection's idle timer) are lent from the worker thread's
//! spares (`Timer`), so a new connection or HTTP/2 stream does not insert a new one.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The wait took longer than the timeout.
#[derive(Debug, PartialEq, Eq)]
pub struct TimedOut;

#[derive(Default)]
pub struct IoDeadline {
    timer: Option<Timer>,
}

impl IoDeadline {
    /// Runs `fut`, giving up once it has waited `timeout` in all.
    pub async fn run<F: Future>(
        &mut self,
        timeout: Duration,
        fut: F,
    ) -> Result<F::Output, TimedOut> {
        let mut fut = std::pin::pin!(fut);
        let mut armed = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            if !armed {
                armed = true;
                let deadline = deadline_after(timeout);
                match self.timer.as_mut() {
                    Some(timer) => timer.reset(deadline),
                    None => self.timer = Some(Timer::new(Spares::Io, deadline)),
                }
            }
            let expired = self
                .timer
                .as_mut()
                .is_some_and(|timer| Pin::new(timer).poll(cx).is_ready());
            if expired {
                Poll::Ready(Err(TimedOut))
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Which spare timers a [`Timer`] comes from: those of backend and client I/O waits, and
/// those of idle connections, each set to about the same timeout, so that a timer lent
/// again is mostly moved later, not earlier.
#[derive(Debug, Clone, Copy)]
pub enum Spares {
    Io = 0,
    Idle = 1,
}

/// Spare timers kept per kind and worker thread.
const SPARES_KEPT: usize = 1024;

/// A worker thread's spare timers. They stay in the runtime's timer wheel while spare, so
/// lending one again and moving its deadline later is one atomic operation; a new timer is
/// inserted into the wheel under its lock and, when it is due before the runtime's next
/// wake-up, wakes the runtime through its eventfd (a system call per new connection and per
/// HTTP/2 stream, seen in `perf`).
struct SpareTimers([Vec<Pin<Box<Sleep>>>; 2]);

impl Drop for SpareTimers {
    fn drop(&mut self) {
        // The thread is ending: its runtime (and timer wheel) may be gone already. Leaked,
        // not dropped: a timer's drop would unlink it from that wheel.
        for spares in &mut self.0 {
            for timer in spares.drain(..) {
                std::mem::forget(timer);
            }
        }
    }
}

thread_local! {
    static SPARE_TIMERS: RefCell<SpareTimers> =
        const { RefCell::new(SpareTimers([Vec::new(), Vec::new()])) };
}

/// A timer lent from the worker thread's spares for as long as it lives (a connection, an
/// HTTP/2 stream), then given back. A spare timer keeps the waker of the task that polled it
/// last, and so that finished task's allocation, until it is lent again: bounded by the
/// spares kept (a few MiB per worker at most). Not cleared by polling it once more with a
/// no-op waker: a timer dropped while the runtime shuts down would panic on that poll.
pub struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    kind: Spares,
}

impl Timer {
    pub fn new(kind: Spares, deadline: Instant) -> Self {
        let spare = SPARE_TIMERS
            .try_with(|spares| spares.borrow_mut().0[kind as usize].pop())
            .ok()
            .flatten();
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Self {
            sleep: Some(sleep),
            kind,
        }
    }

    pub fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        let _ = SPARE_TIMERS.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            let list = &mut spares.0[self.kind as usize];
            if list.len() < SPARES_KEPT {
                list.push(sleep);
            }
        });
    }
}

/// Now plus `timeout`, or a century ahead when that overflows (a huge configured timeout
/// means "never", not a panic).
pub fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn times_out_each_slow_wait_and_passes_quick_ones() {
        let mut deadline = IoDeadline::default();
        let t = Duration::from_millis(100);
        assert_eq!(deadline.run(t, async { 7 }).await, Ok(7));

        let started = std::time::Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(deadline.run(t, slow).await, Err(TimedOut));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
            "timed out after {waited:?}"
        );

        // The timer is re-armed from the start of each wait, not left at the first deadline.
        for _ in 0..3 {
            let quick = tokio::time::sleep(Duration::from_millis(60));
            assert_eq!(deadline.run(t, quick).await, Ok(()));
        }
        let started = std::time::Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(deadline.run(t, slow).await, Err(TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    /// A timer given back is lent again, already in the wheel, and fires at its new
    /// deadline, earlier or later than its last one.
    #[tokio::test]
    async fn spare_timers_are_lent_again_and_keep_time() {
        let soon = |ms| Instant::now() + Duration::from_millis(ms);
        let first = Timer::new(Spares::Io, soon(5_000));
        let at = first.sleep.as_ref().map(|s| &**s as *const Sleep);
        drop(first);
        for ms in [30, 80] {
            let started = std::time::Instant::now();
            let timer = Timer::new(Spares::Io, soon(ms));
            assert_eq!(timer.sleep.as_ref().map(|s| &**s as *const Sleep), at);
            timer.await;
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_millis(ms) && waited < Duration::from_millis(ms + 2_000),
                "{ms} ms timer fired after {waited:?}"
            );
        }
        // The other kind has its own spares.
        let idle = Timer::new(Spares::Idle, soon(10));
        assert_ne!(idle.sleep.as_ref().map(|s| &**s as *const Sleep), at);
    }

    #[tokio::test]
    async fn a_huge_timeout_means_never_not_a_panic() {
        let mut deadline = IoDeadline::default();
        assert!(deadline_after(Duration::MAX) > Instant::now());
        let quick = tokio::time::sleep(Duration::from_millis(10));
        assert_eq!(deadline.run(Duration::MAX, quick).await, Ok(()));
    }
}
