//! What the retry engine asks about the upstreams of one request (spec §11): which ones admit
//! attempts, what to tell their breakers, how long a success is expected to take.
//!
//! [`Router`] answers from the environment's [`Breakers`] and [`LatencyBook`]; [`OneUpstream`]
//! is the plain v1 case (one upstream, no breaker, no estimates).

use super::breaker::{Admission, Breakers, Report};
use super::fallback::Target;
use super::latency::{LatencyBook, LatencyKey};

/// The engine's view of the upstreams. Every method is quick and never waits.
pub trait Routing {
    /// Length of the model chain (the requested model and its `MODEL_FALLBACKS`), at least 1.
    fn models(&self) -> usize;
    /// `FALLBACK_AFTER_FAILURES`.
    fn fallback_after(&self) -> u32;
    /// Which upstreams would admit an attempt at `now_ms`.
    fn available(&self, now_ms: u64) -> Vec<bool>;
    /// Claims the right to send an attempt to `upstream` (the probe, when half-opening).
    fn admit(&self, upstream: usize, now_ms: u64) -> Admission;
    /// What an admitted attempt showed.
    fn report(&self, upstream: usize, now_ms: u64, probe: bool, report: Report);
    /// Milliseconds until the first refused upstream could be tried again.
    fn wait_until_first_reopens(&self, now_ms: u64) -> u64;
    /// How long a successful attempt at `target` is expected to take, when hopeless attempts are
    /// skipped and enough was learnt.
    fn expected_ms(&self, target: Target) -> Option<u64>;
    /// A successful attempt at `target` took `latency_ms`.
    fn learn(&self, target: Target, latency_ms: u64);
}

/// One upstream, one model, no breaker, no estimates: exactly the v1 retry loop.
#[derive(Clone, Copy, Debug, Default)]
pub struct OneUpstream;

impl Routing for OneUpstream {
    fn models(&self) -> usize {
        1
    }
    fn fallback_after(&self) -> u32 {
        u32::MAX
    }
    fn available(&self, _now_ms: u64) -> Vec<bool> {
        vec![true]
    }
    fn admit(&self, _upstream: usize, _now_ms: u64) -> Admission {
        Admission::Allowed
    }
    fn report(&self, _upstream: usize, _now_ms: u64, _probe: bool, _report: Report) {}
    fn wait_until_first_reopens(&self, _now_ms: u64) -> u64 {
        0
    }
    fn expected_ms(&self, _target: Target) -> Option<u64> {
        None
    }
    fn learn(&self, _target: Target, _latency_ms: u64) {}
}

/// One request's routing over the environment's shared state.
pub struct Router<'a> {
    pub breakers: &'a Breakers,
    pub latency: &'a LatencyBook,
    /// Upstream names, in order.
    pub names: Vec<String>,
    /// The requested model and its fallbacks (`[""]` for a route without a model).
    pub models: Vec<String>,
    pub route: &'static str,
    pub stream: bool,
    pub fallback_after: u32,
    pub skip_hopeless: bool,
}

impl Router<'_> {
    fn key(&self, target: Target) -> Option<LatencyKey> {
        Some(LatencyKey {
            upstream: self.names.get(target.upstream)?.clone(),
            route: self.route,
            model: self.models.get(target.model)?.clone(),
            stream: self.stream,
        })
    }
}

impl Routing for Router<'_> {
    fn models(&self) -> usize {
        self.models.len().max(1)
    }
    fn fallback_after(&self) -> u32 {
        self.fallback_after
    }
    fn available(&self, now_ms: u64) -> Vec<bool> {
        self.breakers.available(now_ms, &self.names)
    }
    fn admit(&self, upstream: usize, now_ms: u64) -> Admission {
        match self.names.get(upstream) {
            Some(name) => self.breakers.admit(name, now_ms),
            None => Admission::Allowed,
        }
    }
    fn report(&self, upstream: usize, now_ms: u64, probe: bool, report: Report) {
        if let Some(name) = self.names.get(upstream) {
            self.breakers.record(name, now_ms, probe, report);
        }
    }
    fn wait_until_first_reopens(&self, now_ms: u64) -> u64 {
        self.breakers.wait_until_first_reopens(now_ms, &self.names)
    }
    fn expected_ms(&self, target: Target) -> Option<u64> {
        if !self.skip_hopeless {
            return None;
        }
        self.latency.expected_ms(&self.key(target)?)
    }
    fn learn(&self, target: Target, latency_ms: u64) {
        if let Some(key) = self.key(target) {
            self.latency.record(&key, latency_ms);
        }
    }
}
