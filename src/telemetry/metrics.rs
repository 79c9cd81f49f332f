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
    /// §11: switches to another upstream or model.
    pub fallbacks: u64,
    /// §11: 1 when an open breaker made the request skip an upstream or refused it.
    pub circuit_open: u64,
    /// §11: attempts not started because they were hopeless.
    pub attempts_skipped: u64,
    /// `UpstreamLatency`, one value per attempt, in ms.
    pub upstream_latency_ms: Vec<f64>,
    /// `StreamsInterrupted` (spec §10): a committed stream ended early (cut, idle, deadline).
    pub streams_interrupted: u64,
    /// `TimeToFirstByte` (spec §10), ms: only for answers streamed for real.
    pub time_to_first_byte_ms: Option<f64>,
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

    /// The §8 metrics as every backend publishes them, in [`METRIC_NAMES`] order: one value for
    /// each count (zeros included) and one `UpstreamLatency` value per attempt. An invocation
    /// that never called the upstream has no latency sample, so `UpstreamLatency` is left out
    /// (CloudWatch has no empty sample).
    pub fn data(&self) -> Vec<Datum> {
        let count = |name, n: u64| Datum {
            name,
            unit: Unit::Count,
            values: vec![n as f64],
        };
        let mut data = vec![
            count("Requests", self.requests),
            count("Upstream5xx", self.upstream_5xx),
            count("Upstream429", self.upstream_429),
            count("UpstreamTimeouts", self.upstream_timeouts),
            count("UpstreamConnectionErrors", self.upstream_connection_errors),
            count("Retries", self.retries),
            count("UpstreamFailures", self.upstream_failures),
            count("Fallbacks", self.fallbacks),
            count("CircuitOpen", self.circuit_open),
            count("AttemptsSkipped", self.attempts_skipped),
            count("StreamsInterrupted", self.streams_interrupted),
        ];
        if !self.upstream_latency_ms.is_empty() {
            data.push(Datum {
                name: "UpstreamLatency",
                unit: Unit::Milliseconds,
                values: self.upstream_latency_ms.clone(),
            });
        }
        if let Some(ms) = self.time_to_first_byte_ms {
            data.push(Datum {
                name: "TimeToFirstByte",
                unit: Unit::Milliseconds,
                values: vec![ms],
            });
        }
        data.push(count("ColdStart", self.cold_start as u64));
        data
    }
}

/// Every metric name of §8, §10 and §11, in the order [`InvocationMetrics::data`] emits them.
pub const METRIC_NAMES: [&str; 14] = [
    "Requests",
    "Upstream5xx",
    "Upstream429",
    "UpstreamTimeouts",
    "UpstreamConnectionErrors",
    "Retries",
    "UpstreamFailures",
    "Fallbacks",
    "CircuitOpen",
    "AttemptsSkipped",
    "StreamsInterrupted",
    "UpstreamLatency",
    "TimeToFirstByte",
    "ColdStart",
];

/// The metrics only some invocations have a sample of (no empty samples in CloudWatch).
pub const SAMPLED_METRICS: [&str; 2] = ["UpstreamLatency", "TimeToFirstByte"];

/// The metrics dimension (§8).
pub const DIMENSION: &str = "FunctionName";

/// One metric of one invocation: a single value for counts, one value per attempt for latency.
#[derive(Clone, Debug, PartialEq)]
pub struct Datum {
    pub name: &'static str,
    pub unit: Unit,
    pub values: Vec<f64>,
}

/// The CloudWatch units the metrics use (same spelling in PutMetricData and EMF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// Where an invocation's metrics go. Implementations must never block or fail the response.
pub trait MetricsSink: Send + Sync {
    fn record(&self, lambda_request_id: &str, metrics: InvocationMetrics);
}

impl<T: MetricsSink + ?Sized> MetricsSink for std::sync::Arc<T> {
    fn record(&self, lambda_request_id: &str, metrics: InvocationMetrics) {
        (**self).record(lambda_request_id, metrics)
    }
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
            target: crate::upstreams::fallback::Target {
                upstream: 0,
                model: 0,
            },
            expected_ms: None,
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

    #[test]
    fn data_has_every_count_even_zero_and_latency_per_attempt() {
        let attempts = [attempt(Some(503), None, 12), attempt(Some(200), None, 34)];
        let mut m = InvocationMetrics::from_attempts(&attempts, false, false);
        m.time_to_first_byte_ms = Some(56.0);
        m.streams_interrupted = 1;
        let data = m.data();
        let names: Vec<&str> = data.iter().map(|d| d.name).collect();
        assert_eq!(names, METRIC_NAMES);
        let value = |name: &str| data.iter().find(|d| d.name == name).unwrap().values.clone();
        assert_eq!(value("Requests"), [1.0]);
        assert_eq!(value("Upstream5xx"), [1.0]);
        assert_eq!(value("Upstream429"), [0.0]);
        assert_eq!(value("Retries"), [1.0]);
        assert_eq!(value("ColdStart"), [0.0]);
        assert_eq!(value("Fallbacks"), [0.0]);
        let routed = InvocationMetrics {
            fallbacks: 2,
            circuit_open: 1,
            attempts_skipped: 1,
            ..m.clone()
        }
        .data();
        let routed_value = |name: &str| {
            routed
                .iter()
                .find(|d| d.name == name)
                .unwrap()
                .values
                .clone()
        };
        assert_eq!(routed_value("Fallbacks"), [2.0]);
        assert_eq!(routed_value("CircuitOpen"), [1.0]);
        assert_eq!(routed_value("AttemptsSkipped"), [1.0]);
        assert_eq!(value("UpstreamLatency"), [12.0, 34.0]);
        assert_eq!(value("TimeToFirstByte"), [56.0]);
        assert_eq!(value("StreamsInterrupted"), [1.0]);
        for d in &data {
            let unit = if SAMPLED_METRICS.contains(&d.name) {
                Unit::Milliseconds
            } else {
                Unit::Count
            };
            assert_eq!(d.unit, unit, "{}", d.name);
        }

        let rejected = InvocationMetrics::from_attempts(&[], false, true).data();
        assert_eq!(rejected.len(), METRIC_NAMES.len() - SAMPLED_METRICS.len());
        assert!(rejected.iter().all(|d| !SAMPLED_METRICS.contains(&d.name)));
        let zero = |name: &str| {
            rejected
                .iter()
                .find(|d| d.name == name)
                .unwrap()
                .values
                .clone()
        };
        assert_eq!(
            zero("StreamsInterrupted"),
            [0.0],
            "zero counts are published too"
        );
        assert_eq!(rejected.last().unwrap().values, [1.0]);
    }
}
