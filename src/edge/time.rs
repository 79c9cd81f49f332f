//! The proxy's one clock, injected: what "now" is (epoch ms, the frame of Lambda's deadline),
//! how it waits between attempts, and the randomness of that wait. [`Time::system`] in
//! production; a test gives [`Proxy::with_time`](super::Proxy::with_time) a virtual one and runs
//! a whole request without waiting. Timers that race real I/O (an attempt's timeout, a
//! stream's idle gap) stay on tokio's clock: they bound real sockets.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use crate::retry::{Clock, FastRandJitter, Jitter, Sleeper, SystemClock, TokioSleeper};

/// The clock, the sleep and the jitter of one proxy (cheap to clone: shared).
#[derive(Clone)]
pub struct Time {
    clock: Arc<dyn Clock + Send + Sync>,
    sleeper: Arc<dyn BoxedSleeper>,
    jitter: Arc<Mutex<dyn Jitter + Send>>,
}

impl Time {
    /// Wall-clock epoch ms, tokio's sleep, `fastrand`.
    pub fn system() -> Time {
        Time::new(SystemClock, TokioSleeper, FastRandJitter)
    }

    pub fn new(
        clock: impl Clock + Send + Sync + 'static,
        sleeper: impl Sleeper + Send + Sync + 'static,
        jitter: impl Jitter + Send + 'static,
    ) -> Time {
        Time {
            clock: Arc::new(clock),
            sleeper: Arc::new(sleeper),
            jitter: Arc::new(Mutex::new(jitter)),
        }
    }

    /// The clock alone, for the secrets cache.
    pub fn clock(&self) -> Arc<dyn Clock + Send + Sync> {
        self.clock.clone()
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Time")
            .field("now_ms", &self.clock.now_ms())
            .finish_non_exhaustive()
    }
}

impl Clock for Time {
    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

impl Sleeper for Time {
    fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send {
        self.sleeper.sleep_boxed(ms)
    }
}

impl Jitter for &Time {
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        let mut jitter = self.jitter.lock().unwrap_or_else(PoisonError::into_inner);
        jitter.between(lo, hi)
    }
}

/// [`Sleeper`] behind a pointer (its future is boxed: one allocation per backoff sleep).
trait BoxedSleeper: Send + Sync {
    fn sleep_boxed(&self, ms: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl<S: Sleeper + Send + Sync> BoxedSleeper for S {
    fn sleep_boxed(&self, ms: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.sleep(ms))
    }
}
