//! The end of an invocation on the side of telemetry: the `upstream attempt` and `request
//! finished` lines (spec §6, §10, §11) and the metrics record (§8), each written once.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

use super::Proxy;
use super::answer::{Outcome, Summary};
use super::response::{ErrorCode, ProxyResponse};
use super::upstreams::Routed;
use crate::deadline::Deadline;
use crate::retry::{AttemptRecord, Clock, Decision, FailureKind};
use crate::stream::StreamOutcome;
use crate::telemetry::metrics::InvocationMetrics;

/// When an invocation started, and whether its `request finished` line and metrics record
/// were written (a panic after either must not write it twice).
#[derive(Debug)]
pub(super) struct Ending {
    pub started: u64,
    pub cold_start: bool,
    logged: AtomicBool,
    recorded: AtomicBool,
}

impl Ending {
    pub fn new(started: u64, cold_start: bool) -> Ending {
        Ending {
            started,
            cold_start,
            logged: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
        }
    }
}

/// How a stream went, for `request finished` (spec §10).
pub(super) struct StreamLog {
    pub first_byte_ms: Option<u64>,
    pub bytes: u64,
    pub outcome: StreamOutcome,
}

impl Proxy {
    /// The `request finished` line and the metrics record, each written once per invocation
    /// (after a panic, only what the handler did not write yet).
    pub(super) fn finish(
        &self,
        id: &str,
        summary: &Summary,
        resp: &ProxyResponse,
        deadline: &Deadline,
        ending: &Ending,
        stream: Option<&StreamLog>,
    ) {
        let cold_start = ending.cold_start;
        if !ending.logged.swap(true, Ordering::SeqCst) {
            let elapsed_ms = self.time.now_ms().saturating_sub(ending.started);
            log_finished(summary, resp, elapsed_ms, deadline, cold_start, stream);
        }
        if summary.outcome != Outcome::Health && !ending.recorded.swap(true, Ordering::SeqCst) {
            let failed = summary.code.is_some_and(ErrorCode::is_upstream_failure);
            let metrics = InvocationMetrics {
                fallbacks: summary.switches.into(),
                circuit_open: summary.circuit_open.into(),
                attempts_skipped: summary.skipped.into(),
                time_to_first_byte_ms: stream.and_then(|s| s.first_byte_ms).map(|ms| ms as f64),
                streams_interrupted: stream.map_or(0, |s| u64::from(s.outcome.is_interrupted())),
                ..InvocationMetrics::from_attempts(&summary.attempts, failed, cold_start)
            };
            self.metrics.record(id, metrics);
        }
    }
}

/// The `upstream attempt` line (§6, §11): `upstream` is the name, `model` the one asked for.
pub(super) fn log_attempt(req: &Routed<'_>, names: &[String], r: &AttemptRecord, offset: u32) {
    let (status, error_kind) = (r.status, r.error_kind.map(FailureKind::as_str));
    let model = req.model(r.target.model);
    let upstream = names.get(r.target.upstream).map_or("", String::as_str);
    macro_rules! attempt_event {
        ($level:ident) => {
            tracing::$level!(
                route = req.route.path,
                upstream,
                json.model = %json!(model),
                attempt = r.attempt + offset,
                json.status = %json!(status),
                json.error_kind = %json!(error_kind),
                latency_ms = r.latency_ms,
                json.upstream_request_id = %json!(r.upstream_request_id),
                decision = r.decision.as_str(),
                reason = %r.reason,
                json.next_delay_ms = %json!(r.next_delay_ms),
                remaining_ms = r.remaining_ms,
                json.expected_ms = %json!(r.expected_ms),
                "upstream attempt"
            )
        };
    }
    match r.decision {
        Decision::Done => attempt_event!(info),
        Decision::Retry | Decision::GiveUp => attempt_event!(warn),
    }
}

fn log_finished(
    s: &Summary,
    resp: &ProxyResponse,
    elapsed_ms: u64,
    deadline: &Deadline,
    cold_start: bool,
    stream: Option<&StreamLog>,
) {
    let first_byte_ms = stream.and_then(|st| st.first_byte_ms);
    let stream_bytes = stream.map(|st| st.bytes);
    let stream_outcome = stream.map(|st| st.outcome.as_str());
    let ids: Vec<&str> = s
        .attempts
        .iter()
        .filter_map(|a| a.upstream_request_id.as_deref())
        .collect();
    macro_rules! finished_event {
        ($level:ident) => {
            tracing::$level!(
                route = s.route,
                json.model = %json!(s.model),
                status = resp.status,
                json.code = %json!(s.code.map(ErrorCode::as_str)),
                outcome = s.outcome.as_str(),
                attempts = s.attempts.len(),
                elapsed_ms,
                budget_ms = deadline.budget_ms,
                json.upstream_request_ids = %json!(ids),
                json.upstream = %json!(resp.header("x-proxy-upstream")),
                fallbacks = s.switches,
                cold_start,
                streamed = stream.is_some(),
                json.first_byte_ms = %json!(first_byte_ms),
                json.stream_bytes = %json!(stream_bytes),
                json.stream_outcome = %json!(stream_outcome),
                "request finished"
            )
        };
    }
    match s.outcome {
        Outcome::UpstreamFailure => finished_event!(warn),
        Outcome::ConfigError | Outcome::InternalError => finished_event!(error),
        _ => finished_event!(info),
    }
}
