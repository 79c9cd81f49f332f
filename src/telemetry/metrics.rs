//! Per-invocation metrics (spec §8): the record the edge fills and the sinks that publish it.

use crate::retry::{AttemptRecord, FailureKind};

/// The §8 counts of one invocation (zeros included) and each attempt's latency.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InvocationMetrics {
    pub requests: u64,
    pub upstream_5xx: u64,
    pub upstream_429: u64,
    pub upstream_timeouts: u64,
    pub upstream_connection_errors: u64,
    pub retries: u64,
    pub upstream_failures: u64,
    /// `UpstreamLatency`, one value per attempt, in ms.
    pub upstream_latency_ms: Vec<f64>,
    pub cold_start: bool,
}

impl InvocationMetrics {
    /// Counts one invocation from its attempts. `function_failed` is true when the function
    /// itself answered 502/504/429 for a broken upstream.
    pub fn from_attempts(
        attempts: &[AttemptRecord],
        function_failed: bool,
        cold_start: bool,
    ) -> Self {
        let mut m = InvocationMetrics {
            requests: 1,
            upstream_failures: function_failed as u64,
            cold_start,
            ..Default::default()
        };
        for a in attempts {
            match (a.status, a.error_kind) {
                (Some(500..=599), _) => m.upstream_5xx += 1,
                (Some(429), _) => m.upstream_429 += 1,
                (_, Some(FailureKind::Timeout)) => m.upstream_timeouts += 1,
                (_, Some(_)) => m.upstream_connection_errors += 1,
                _ => {}
            }
            m.upstream_latency_ms.push(a.latency_ms as f64);
        }
        m.retries = attempts.len().saturating_sub(1) as u64;
        m
    }
}

/// Where an invocation's metrics go. Implementations must never block or fail the response.
pub trait MetricsSink: Send + Sync {
    fn record(&self, lambda_request_id: &str, metrics: InvocationMetrics);
}

/// `METRICS_BACKEND=none`.
#[derive(Debug, Default)]
pub struct NoMetrics;

impl MetricsSink for NoMetrics {
    fn record(&self, _: &str, _: InvocationMetrics) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Decision;

    fn attempt(status: Option<u16>, kind: Option<FailureKind>, latency_ms: u64) -> AttemptRecord {
        AttemptRecord {
            attempt: 1,
            status,
            error_kind: kind,
            latency_ms,
            upstream_request_id: None,
            decision: Decision::Retry,
            reason: String::new(),
            next_delay_ms: None,
            remaining_ms: 0,
        }
    }

    #[test]
    fn counts_each_attempt_by_class() {
        let attempts = [
            attempt(Some(500), None, 10),
            attempt(Some(429), None, 20),
            attempt(None, Some(FailureKind::Timeout), 30),
            attempt(None, Some(FailureKind::Connect), 40),
            attempt(Some(200), None, 50),
        ];
        let m = InvocationMetrics::from_attempts(&attempts, false, true);
        assert_eq!(
            (
                m.requests,
                m.upstream_5xx,
                m.upstream_429,
                m.upstream_timeouts,
                m.upstream_connection_errors,
                m.retries
            ),
            (1, 1, 1, 1, 1, 4)
        );
        assert_eq!(m.upstream_latency_ms, [10.0, 20.0, 30.0, 40.0, 50.0]);
        assert!(m.cold_start && m.upstream_failures == 0);
        let none = InvocationMetrics::from_attempts(&[], true, false);
        assert_eq!((none.retries, none.upstream_failures), (0, 1));
    }
}
