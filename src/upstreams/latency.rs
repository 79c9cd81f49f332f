//! How long successful attempts take, learnt per warm environment (spec §11, hopeless attempts).
//!
//! Per (upstream, route, model, stream): the latencies of the last [`WINDOW`] successful
//! attempts. The estimate is their 90th percentile (nearest rank), once there are at least
//! [`MIN_SAMPLES`]; with few samples that is close to the slowest, which keeps the skip rule
//! conservative: an attempt is only skipped when even a typical slow success would not fit.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// No estimate from fewer samples.
pub const MIN_SAMPLES: usize = 5;
/// Only the most recent samples count: an upstream's speed changes over the day.
pub const WINDOW: usize = 20;
/// The percentile used as the expected latency.
pub const PERCENTILE: f64 = 0.9;
/// Keys kept at most (models come from callers); the least recently updated one is dropped.
pub const MAX_KEYS: usize = 256;

/// What a latency estimate is kept for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LatencyKey {
    pub upstream: String,
    pub route: &'static str,
    pub model: String,
    pub stream: bool,
}

#[derive(Debug, Default)]
struct Samples {
    recent: VecDeque<u64>,
    /// Update counter value when last written, for eviction.
    touched: u64,
}

/// The estimates of one environment, shared by concurrent invocations.
#[derive(Debug, Default)]
pub struct LatencyBook {
    inner: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    by_key: HashMap<LatencyKey, Samples>,
    updates: u64,
}

impl LatencyBook {
    pub fn new() -> LatencyBook {
        LatencyBook::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Adds the latency of one successful attempt.
    pub fn record(&self, key: &LatencyKey, latency_ms: u64) {
        self.with(|book| {
            book.updates += 1;
            if !book.by_key.contains_key(key) && book.by_key.len() >= MAX_KEYS {
                let oldest = book
                    .by_key
                    .iter()
                    .min_by_key(|(_, s)| s.touched)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    book.by_key.remove(&k);
                }
            }
            let touched = book.updates;
            let samples = book.by_key.entry(key.clone()).or_default();
            if samples.recent.len() == WINDOW {
                samples.recent.pop_front();
            }
            samples.recent.push_back(latency_ms);
            samples.touched = touched;
        });
    }

    /// The expected latency of a successful attempt, once enough samples were seen.
    pub fn expected_ms(&self, key: &LatencyKey) -> Option<u64> {
        self.with(|book| book.by_key.get(key).and_then(|s| percentile(&s.recent)))
    }
}

/// Nearest-rank [`PERCENTILE`] of at least [`MIN_SAMPLES`] values.
fn percentile(samples: &VecDeque<u64>) -> Option<u64> {
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    let mut sorted: Vec<u64> = samples.iter().copied().collect();
    sorted.sort_unstable();
    let rank = (PERCENTILE * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(upstream: &str, model: &str, stream: bool) -> LatencyKey {
        LatencyKey {
            upstream: upstream.into(),
            route: "/v1/chat/completions",
            model: model.into(),
            stream,
        }
    }

    #[test]
    fn no_estimate_before_five_samples() {
        let book = LatencyBook::new();
        let k = key("a", "gpt-4o", false);
        for ms in [100, 200, 300, 400] {
            book.record(&k, ms);
            assert_eq!(book.expected_ms(&k), None);
        }
        book.record(&k, 500);
        // p90 of five samples by nearest rank is the slowest.
        assert_eq!(book.expected_ms(&k), Some(500));
    }

    #[test]
    fn ninetieth_percentile_of_the_recent_window() {
        let book = LatencyBook::new();
        let k = key("a", "gpt-4o", false);
        for ms in 1..=20 {
            book.record(&k, ms * 100);
        }
        assert_eq!(book.expected_ms(&k), Some(1_800));
        // Twenty fast samples push the old slow ones out of the window.
        for _ in 0..20 {
            book.record(&k, 50);
        }
        assert_eq!(book.expected_ms(&k), Some(50));
        // One outlier in twenty does not move p90.
        book.record(&k, 60_000);
        assert_eq!(book.expected_ms(&k), Some(50));
    }

    #[test]
    fn keys_are_separate_per_upstream_model_route_and_stream() {
        let book = LatencyBook::new();
        for _ in 0..5 {
            book.record(&key("a", "gpt-4o", false), 1_000);
        }
        assert_eq!(book.expected_ms(&key("a", "gpt-4o", false)), Some(1_000));
        assert_eq!(book.expected_ms(&key("b", "gpt-4o", false)), None);
        assert_eq!(book.expected_ms(&key("a", "gpt-4o-mini", false)), None);
        assert_eq!(book.expected_ms(&key("a", "gpt-4o", true)), None);
        let other_route = LatencyKey {
            route: "/v1/embeddings",
            ..key("a", "gpt-4o", false)
        };
        assert_eq!(book.expected_ms(&other_route), None);
    }

    #[test]
    fn memory_is_bounded_by_dropping_the_stalest_key() {
        let book = LatencyBook::new();
        for _ in 0..5 {
            book.record(&key("a", "keep", false), 10);
        }
        for i in 0..MAX_KEYS + 10 {
            book.record(&key("a", &format!("m{i}"), false), 10);
            if i % 10 == 0 {
                book.record(&key("a", "keep", false), 10);
            }
        }
        assert_eq!(book.with(|b| b.by_key.len()), MAX_KEYS);
        assert_eq!(book.expected_ms(&key("a", "keep", false)), Some(10));
        assert_eq!(book.expected_ms(&key("a", "m0", false)), None);
    }
}
