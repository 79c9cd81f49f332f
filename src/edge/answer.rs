//! The answer (spec §5): how an invocation ended → the caller's [`ProxyResponse`] and the
//! [`Summary`] its `request finished` line and metrics record are made of. Pure: no I/O, no
//! clock. Every message the function writes about a run is here.

use super::admit::Rejection;
use super::response::{ErrorCode, LAMBDA_RESPONSE_LIMIT, ProxyResponse, UpstreamSummary, seconds};
use super::upstreams::{self, Routed};
use crate::retry::{
    AttemptOutcome, AttemptRecord, GiveUpReason, RetryRun, RunOutcome, UpstreamReply,
};
use crate::upstreams::UpstreamSpec;
use crate::upstreams::naming::{Naming, is_default, naming};

const STATUS_PAGE: &str = "https://status.openai.com";

/// How an invocation ended, for the `outcome` log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Upstream answered 2xx.
    Success,
    /// A final non-2xx upstream answer, passed through.
    UpstreamError,
    /// The function answered 502/504/429/503 for a broken upstream.
    UpstreamFailure,
    /// The caller's request was refused (route, method, auth, body, model).
    Rejected,
    ConfigError,
    Health,
    /// A bug (the handler panicked, or a request it could not build): 500 `internal_error`.
    InternalError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamFailure => "upstream_failure",
            Outcome::Rejected => "rejected",
            Outcome::ConfigError => "config_error",
            Outcome::Health => "health",
            Outcome::InternalError => "internal_error",
        }
    }
}

/// What the `request finished` line and the metrics need.
#[derive(Debug)]
pub(super) struct Summary {
    pub route: &'static str,
    pub model: Option<String>,
    pub code: Option<ErrorCode>,
    pub outcome: Outcome,
    pub attempts: Vec<AttemptRecord>,
    /// §11: switches, an open breaker met, hopeless attempts skipped.
    pub switches: u32,
    pub circuit_open: bool,
    pub skipped: u32,
}

impl Summary {
    /// An invocation that called no upstream.
    fn without_run(route: &'static str, code: Option<ErrorCode>, outcome: Outcome) -> Summary {
        Summary {
            route,
            model: None,
            code,
            outcome,
            attempts: Vec::new(),
            switches: 0,
            circuit_open: false,
            skipped: 0,
        }
    }
}

/// The caller's response (with the headers every response has) and its summary.
#[derive(Debug)]
pub(super) struct Answer {
    pub resp: ProxyResponse,
    pub summary: Summary,
}

impl Answer {
    fn new(resp: ProxyResponse, summary: Summary, id: &str) -> Answer {
        Answer {
            resp: finish_headers(resp, id),
            summary,
        }
    }
}

/// `GET /health`: `200 {"status":"ok"}`.
pub(super) fn health(route: &'static str, id: &str) -> Answer {
    let resp = ProxyResponse::json(200, &serde_json::json!({"status": "ok"}));
    Answer::new(resp, Summary::without_run(route, None, Outcome::Health), id)
}

/// A request refused before its upstream run (400, 401, 403, 404, 405, 413, 500 config).
pub(super) fn rejected(r: Rejection, id: &str) -> Answer {
    let outcome = match r.code {
        ErrorCode::ConfigError => Outcome::ConfigError,
        _ => Outcome::Rejected,
    };
    let mut resp = ProxyResponse::error(r.code, r.message, None, id);
    if let Some(allow) = r.allow {
        resp.set_header("allow", allow);
    }
    let summary = Summary {
        model: r.model,
        ..Summary::without_run(r.route, Some(r.code), outcome)
    };
    Answer::new(resp, summary, id)
}

/// An event that is no HTTP request of a front door this function knows.
pub(super) fn not_an_http_request(id: &str) -> Answer {
    let message = "The event is not an HTTP request from API Gateway (REST or HTTP API), a Lambda function URL or an Application Load Balancer.";
    own_error(
        ErrorCode::InvalidRequest,
        message,
        "unknown",
        Outcome::Rejected,
        id,
    )
}

/// The handler failed (a panic): 500 `internal_error`, on `route` if one matched.
pub(super) fn internal_error(route: &'static str, id: &str) -> Answer {
    let message = "The proxy failed while handling this request. This is a bug in the proxy, not in your request.";
    own_error(
        ErrorCode::InternalError,
        message,
        route,
        Outcome::InternalError,
        id,
    )
}

/// An error of the function's own, without an upstream run.
fn own_error(
    code: ErrorCode,
    message: &str,
    route: &'static str,
    outcome: Outcome,
    id: &str,
) -> Answer {
    let resp = ProxyResponse::error(code, message, None, id);
    Answer::new(resp, Summary::without_run(route, Some(code), outcome), id)
}

/// One way a run ended: the response so far, its code and outcome, and the upstream answer
/// whose headers pass through.
struct Ended {
    resp: ProxyResponse,
    code: Option<ErrorCode>,
    outcome: Outcome,
    reply: Option<UpstreamReply>,
}

impl Ended {
    /// The function answers for a broken upstream.
    fn failure(code: ErrorCode, resp: ProxyResponse, reply: Option<UpstreamReply>) -> Ended {
        Ended {
            resp,
            code: Some(code),
            outcome: Outcome::UpstreamFailure,
            reply,
        }
    }
}

/// The retry engine's run over the upstreams → the caller's answer (spec §5, §11).
pub(super) fn ran(
    run: RetryRun,
    req: &Routed<'_>,
    model: Option<String>,
    id: &str,
    budget_ms: u64,
) -> Answer {
    let upstream = upstream_summary(&run, &req.names());
    let last_request_id = upstream.request_ids.last().cloned();
    let route_headers = upstreams::route_headers(&run, req);
    let expected_ms = run.attempts.last().and_then(|a| a.expected_ms);
    let blame = Blame::of(&run.attempts, req.list);
    let RetryRun {
        outcome,
        mut attempts,
        switches,
        circuit_open,
        skipped,
        ..
    } = run;
    if matches!(outcome, RunOutcome::Unsendable { .. }) {
        // Nothing reached the upstream: no attempt to count or report.
        attempts.clear();
    }
    let ended = ended(outcome, upstream, (expected_ms, budget_ms), &blame, id);
    let mut resp = ended.resp;
    if !attempts.is_empty() {
        resp.set_header("x-upstream-attempts", attempts.len().to_string());
    }
    if let Some(rid) = last_request_id {
        resp.set_header("x-request-id", rid);
    }
    if let Some(reply) = &ended.reply {
        resp = pass_through_headers(reply, resp);
    }
    for (name, value) in route_headers {
        resp.set_header(name, value);
    }
    let summary = Summary {
        route: req.route.path,
        model,
        code: ended.code,
        outcome: ended.outcome,
        attempts,
        switches,
        circuit_open: circuit_open || ended.code == Some(ErrorCode::UpstreamCircuitOpen),
        skipped,
    };
    Answer::new(resp, summary, id)
}

/// Who the messages name (spec §5 with §11's list): every upstream the run tried, and the one
/// tried last (that answered, or whose answer or failure ended the run). Named only when a
/// message needs it (not on the success path).
struct Blame<'a> {
    list: &'a [UpstreamSpec],
    /// Positions in `list` of the run's attempts, in order.
    tried: Vec<usize>,
}

impl Blame<'_> {
    fn of<'a>(attempts: &[AttemptRecord], list: &'a [UpstreamSpec]) -> Blame<'a> {
        let tried = attempts.iter().map(|a| a.target.upstream).collect();
        Blame { list, tried }
    }

    fn tried(&self) -> Naming {
        naming(self.list, &self.tried)
    }

    fn last(&self) -> Naming {
        naming(self.list, &self.tried[self.tried.len().saturating_sub(1)..])
    }

    /// The default single upstream: messages keep v1's wording.
    fn default(&self) -> bool {
        is_default(self.list)
    }
}

/// " Check https://status.openai.com." when OpenAI itself is among `who`.
fn status_page(who: &Naming) -> String {
    match who.status_page {
        true => format!(" Check {STATUS_PAGE}."),
        false => String::new(),
    }
}

/// How the run ended, before the headers every run's answer has. `(expected_ms, budget_ms)`:
/// the last attempt's expected latency and the time budget, for messages.
fn ended(
    outcome: RunOutcome,
    upstream: UpstreamSummary,
    (expected_ms, budget_ms): (Option<u64>, u64),
    blame: &Blame<'_>,
    id: &str,
) -> Ended {
    match outcome {
        RunOutcome::Answer(reply) if matches!(reply.status, 401 | 403) => {
            auth_failed(reply, upstream, blame, id)
        }
        RunOutcome::Answer(reply) => passed_on(reply, upstream, blame, id),
        RunOutcome::CircuitOpen { retry_after_ms } => {
            all_breakers_open(upstream, retry_after_ms, id)
        }
        RunOutcome::GaveUp {
            reason,
            last,
            retry_after_ms,
        } => {
            let why = GaveUp {
                reason,
                retry_after_ms,
                expected_ms,
                budget_ms,
            };
            gave_up(why, last, upstream, blame, id)
        }
        RunOutcome::Unsendable { .. } => unsendable(blame, id),
        RunOutcome::NoTimeToStart { remaining_ms } => no_time(remaining_ms, upstream, blame, id),
    }
}

/// The `error.upstream` object of a run (no `last_error` yet).
fn upstream_summary(run: &RetryRun, names: &[String]) -> UpstreamSummary {
    UpstreamSummary {
        status: run.attempts.iter().rev().find_map(|a| a.status),
        attempts: run.attempts.len() as u32,
        elapsed_ms: run.elapsed_ms,
        request_ids: run
            .attempts
            .iter()
            .filter_map(|a| a.upstream_request_id.clone())
            .collect(),
        last_error: None,
        by_upstream: upstreams::by_upstream(&run.attempts, names),
    }
}

/// The upstream request ids for a message.
fn ids(upstream: &UpstreamSummary) -> String {
    if upstream.request_ids.is_empty() {
        "none".to_owned()
    } else {
        upstream.request_ids.join(", ")
    }
}

/// 502 `upstream_auth_failed`: the upstream refused the server's own key (401/403).
fn auth_failed(
    reply: UpstreamReply,
    upstream: UpstreamSummary,
    blame: &Blame<'_>,
    id: &str,
) -> Ended {
    let code = ErrorCode::UpstreamAuthFailed;
    let upstream = UpstreamSummary {
        last_error: Some(AttemptOutcome::Reply(reply.clone()).describe()),
        ..upstream
    };
    let key = match blame.default() {
        true => "the function's OpenAI key",
        false => "the key configured for that upstream",
    };
    let message = format!(
        "{} rejected the proxy's own API key ({}). This is not a problem with your request or your token: the operator must fix {key}. Upstream request ids: {}.",
        blame.last().subject(),
        upstream.last_error.as_deref().unwrap_or_default(),
        ids(&upstream)
    );
    let resp = ProxyResponse::error(code, message, Some(&upstream), id);
    Ended::failure(code, resp, Some(reply))
}

/// A final upstream answer, passed on as it is (status, body, content type); an answer too
/// large for Lambda becomes a 502 instead.
fn passed_on(
    mut reply: UpstreamReply,
    upstream: UpstreamSummary,
    blame: &Blame<'_>,
    id: &str,
) -> Ended {
    let outcome = if (200..300).contains(&reply.status) {
        Outcome::Success
    } else {
        Outcome::UpstreamError
    };
    // Moved, not shared: the response then owns the only reference (see `render`).
    let mut resp = ProxyResponse {
        status: reply.status,
        headers: Vec::new(),
        body: std::mem::take(&mut reply.body),
    };
    if let Some(ct) = reply.header("content-type") {
        resp.set_header("content-type", ct);
    }
    if let Some(ms) = reply.header("retry-after-ms") {
        resp.set_header("retry-after-ms", ms);
    }
    if reply.oversized || !resp.fits_lambda_limit() {
        let code = ErrorCode::UpstreamResponseTooLarge;
        return Ended::failure(code, too_large(&reply, upstream, blame, id), Some(reply));
    }
    Ended {
        resp,
        code: None,
        outcome,
        reply: Some(reply),
    }
}

/// 503 `upstream_circuit_open`: every upstream's breaker is open (§11).
fn all_breakers_open(upstream: UpstreamSummary, retry_after_ms: u64, id: &str) -> Ended {
    let code = ErrorCode::UpstreamCircuitOpen;
    let secs = retry_after_ms.div_ceil(1000).max(1);
    let tried = match upstream.attempts {
        0 => "so no upstream was called".to_owned(),
        n => format!(
            "after {n} attempt{} (last: {})",
            if n == 1 { "" } else { "s" },
            upstream.last_error.as_deref().unwrap_or("none")
        ),
    };
    let message = format!(
        "Every upstream is failing: their circuit breakers are open (BREAKER_FAILURES retryable failures in a row), {tried}. The first one will be tried again in {secs} s; retry after that."
    );
    let mut resp = ProxyResponse::error(code, message, Some(&upstream), id);
    resp.set_header("retry-after", secs.to_string());
    Ended::failure(code, resp, None)
}

/// 502 `upstream_response_too_large`: the upstream's final answer cannot be returned through
/// Lambda. Retrying cannot help, so it is not retried (like every error, `x-should-retry: false`).
fn too_large(
    reply: &UpstreamReply,
    upstream: UpstreamSummary,
    blame: &Blame<'_>,
    id: &str,
) -> ProxyResponse {
    let code = ErrorCode::UpstreamResponseTooLarge;
    let status = AttemptOutcome::Reply(reply.clone()).describe();
    let upstream = UpstreamSummary {
        last_error: Some(format!("{status}: answer too large")),
        ..upstream
    };
    let mb = LAMBDA_RESPONSE_LIMIT / 1_000_000;
    let answer = match blame.default() {
        true => format!("OpenAI's answer ({status}) is larger than the {mb} MB"),
        false => format!(
            "{} answered {status} with more than the {mb} MB",
            blame.last().subject()
        ),
    };
    let message = format!(
        "{answer} a Lambda function can return, so the proxy read no further and cannot pass it on. Ask for less in one request (fewer inputs per embeddings request, encoding_format \"base64\" for embeddings, a lower max_tokens). Upstream request ids: {}.",
        ids(&upstream)
    );
    ProxyResponse::error(code, message, Some(&upstream), id)
}

/// 500 `internal_error`: the request to the upstream could not be built and no setting is at
/// fault (the caller checked, see `admit::unsendable`).
fn unsendable(blame: &Blame<'_>, id: &str) -> Ended {
    let code = ErrorCode::InternalError;
    let message = format!(
        "The proxy could not build the request to {}. This is a bug in the proxy, not in your request.",
        blame.last().phrase
    );
    let resp = ProxyResponse::error(code, message, None, id);
    Ended {
        resp,
        code: Some(code),
        outcome: Outcome::InternalError,
        reply: None,
    }
}

/// 504 `upstream_timeout` before any attempt: too little of the budget was left to start one.
fn no_time(remaining_ms: u64, upstream: UpstreamSummary, blame: &Blame<'_>, id: &str) -> Ended {
    let code = ErrorCode::UpstreamTimeout;
    let upstream = UpstreamSummary {
        last_error: Some("no time left to call the upstream".into()),
        ..upstream
    };
    // x-should-retry: false like every error: a deadline this close usually means the
    // function's timeout leaves no room for MIN_ATTEMPT_MS, which a retry cannot fix.
    let not_called = match blame.default() {
        true => "too little to call OpenAI, so OpenAI was not called",
        false => "too little to call an upstream, so none was called",
    };
    let message = format!(
        "The proxy had only {remaining_ms} ms of its time budget left when the request arrived (the gateway's or Lambda's deadline is near), {not_called}. If this persists, the operator should check the function's timeout against MIN_ATTEMPT_MS and DEADLINE_MARGIN_MS."
    );
    Ended::failure(
        code,
        ProxyResponse::error(code, message, Some(&upstream), id),
        None,
    )
}

/// Why the engine gave up, for the message.
struct GaveUp {
    reason: GiveUpReason,
    retry_after_ms: Option<u64>,
    expected_ms: Option<u64>,
    budget_ms: u64,
}

/// 504 when the deadline cut an attempt that was still waiting; otherwise 429 after a 429,
/// else 502. The message says why it stopped; `retry-after` when the upstream asked for one.
fn gave_up(
    why: GaveUp,
    last: AttemptOutcome,
    upstream: UpstreamSummary,
    blame: &Blame<'_>,
    id: &str,
) -> Ended {
    let upstream = UpstreamSummary {
        last_error: Some(last.describe()),
        ..upstream
    };
    let (code, message) = gave_up_message(&why, &last, &upstream, blame);
    let mut resp = ProxyResponse::error(code, message, Some(&upstream), id);
    if let Some(ms) = why.retry_after_ms {
        resp.set_header("retry-after", ms.div_ceil(1000).to_string());
    }
    let reply = match last {
        AttemptOutcome::Reply(r) => Some(r),
        AttemptOutcome::Failed { .. } => None,
    };
    Ended::failure(code, resp, reply)
}

/// The §5 code and message after the engine gave up.
fn gave_up_message(
    why: &GaveUp,
    last: &AttemptOutcome,
    upstream: &UpstreamSummary,
    blame: &Blame<'_>,
) -> (ErrorCode, String) {
    let attempts = format!(
        "{} attempt{} over {}",
        upstream.attempts,
        if upstream.attempts == 1 { "" } else { "s" },
        seconds(upstream.elapsed_ms)
    );
    let (budget, ids) = (seconds(why.budget_ms), ids(upstream));
    let last_error = upstream.last_error.as_deref().unwrap_or_default();
    let reason = stop_reason(why, &budget, &blame.last());
    let tried = blame.tried();
    let (who, check) = (tried.subject(), status_page(&tried));
    match (why.reason, last) {
        (GiveUpReason::DeadlineReached, _) => (
            ErrorCode::UpstreamTimeout,
            format!(
                "{who} did not answer in time: {attempts}; the last attempt was still waiting when the proxy's {budget} time budget ran out. Upstream request ids: {ids}.{check}"
            ),
        ),
        (_, AttemptOutcome::Reply(r)) if r.status == 429 => (
            ErrorCode::UpstreamRateLimited,
            format!(
                "{who} kept rate-limiting this request: {attempts} ended with {last_error}; {reason}. Upstream request ids: {ids}."
            ),
        ),
        _ => (
            ErrorCode::UpstreamUnavailable,
            format!(
                "{who} {} unavailable: {attempts} failed (last: {last_error}); {reason}. Upstream request ids: {ids}.{check}",
                tried.verb("is", "are")
            ),
        ),
    }
}

/// Why no further attempt was made, for the message (`budget`: the time budget, formatted;
/// `last`: the upstream tried last).
fn stop_reason(why: &GaveUp, budget: &str, last: &Naming) -> String {
    match why.reason {
        GiveUpReason::AttemptsExhausted => {
            "the proxy made every attempt it is allowed (RETRY_MAX_ATTEMPTS)".to_owned()
        }
        GiveUpReason::BudgetExhausted => {
            format!("too little of the proxy's {budget} time budget was left for another attempt")
        }
        GiveUpReason::RetryAfterPastDeadline => format!(
            "{} asked to wait {}, past the end of the proxy's {budget} time budget",
            last.phrase,
            seconds(why.retry_after_ms.unwrap_or_default())
        ),
        GiveUpReason::DeadlineReached => format!("the proxy's {budget} time budget ran out"),
        GiveUpReason::ExpectedLatencyExceedsBudget => format!(
            "the next attempt was not started because successful attempts there recently took up to {}, more than the time left in the proxy's {budget} time budget (expected_latency_exceeds_budget)",
            seconds(why.expected_ms.unwrap_or_default())
        ),
    }
}

/// Upstream `x-ratelimit-*`, `openai-processing-ms` and `retry-after` go to the caller.
fn pass_through_headers(reply: &UpstreamReply, mut resp: ProxyResponse) -> ProxyResponse {
    for (name, value) in &reply.headers {
        let keep = name.starts_with("x-ratelimit-")
            || name == "openai-processing-ms"
            || (name == "retry-after" && resp.header("retry-after").is_none());
        if keep {
            resp.set_header(name, value.clone());
        }
    }
    resp
}

/// Headers on every response: `x-lambda-request-id`, and `x-should-retry: false` on errors
/// (the proxy already retried, or retrying cannot help), so SDKs do not multiply retries.
fn finish_headers(mut resp: ProxyResponse, id: &str) -> ProxyResponse {
    resp.set_header("x-lambda-request-id", id);
    if resp.status >= 400 {
        resp.set_header("x-should-retry", "false");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Decision;
    use crate::upstream::ForwardRequest;
    use crate::upstreams::fallback::Target;
    use crate::upstreams::{UpstreamKind, UpstreamSpec};
    use bytes::Bytes;

    fn spec(name: &str) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            base_url: "https://api.openai.com/v1".into(),
            kind: UpstreamKind::OpenAi,
            key: crate::config::KeySource::Env("sk-test".into()),
            organization: None,
            project: None,
            models: Default::default(),
        }
    }

    fn record(attempt: u32, status: u16, request_id: &str) -> AttemptRecord {
        AttemptRecord {
            attempt,
            target: Target {
                upstream: 0,
                model: 0,
            },
            status: Some(status),
            error_kind: None,
            latency_ms: 5,
            upstream_request_id: Some(request_id.into()),
            decision: Decision::Retry,
            reason: String::new(),
            next_delay_ms: None,
            remaining_ms: 10_000,
            expected_ms: None,
        }
    }

    fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> UpstreamReply {
        UpstreamReply::for_test(status, headers, body)
    }

    /// `ran` for a chat completion routed to one upstream named `primary`.
    fn answer_run(run: RetryRun) -> Answer {
        let forward = ForwardRequest {
            method: http::Method::POST,
            path: "/chat/completions",
            body: Bytes::new(),
            content_type: None,
            idempotency_key: None,
            client_request_id: "req-1".into(),
        };
        let list = [spec("primary")];
        let routed = Routed {
            route: crate::edge::routes::find("/v1/chat/completions").unwrap(),
            forward: &forward,
            list: &list,
            models: Some(vec!["gpt-4o".into()]),
            stream: false,
            live: None,
        };
        ran(run, &routed, Some("gpt-4o".into()), "req-1", 25_000)
    }

    fn run(outcome: RunOutcome, attempts: Vec<AttemptRecord>) -> RetryRun {
        RetryRun {
            outcome,
            attempts,
            elapsed_ms: 1_200,
            switches: 0,
            circuit_open: false,
            skipped: 0,
        }
    }

    #[test]
    fn a_final_upstream_answer_passes_through_with_its_headers() {
        let ok = reply(
            200,
            &[
                ("content-type", "application/json"),
                ("x-ratelimit-remaining-requests", "99"),
                ("x-request-id", "req_b"),
            ],
            r#"{"id":"chatcmpl-1"}"#,
        );
        let a = answer_run(run(
            RunOutcome::Answer(ok),
            vec![record(1, 500, "req_a"), record(2, 200, "req_b")],
        ));
        assert_eq!(
            (a.resp.status, &a.resp.body[..]),
            (200, &br#"{"id":"chatcmpl-1"}"#[..])
        );
        for (name, value) in [
            ("content-type", "application/json"),
            ("x-ratelimit-remaining-requests", "99"),
            ("x-upstream-attempts", "2"),
            ("x-request-id", "req_b"),
            ("x-proxy-upstream", "primary"),
            ("x-lambda-request-id", "req-1"),
        ] {
            assert_eq!(a.resp.header(name), Some(value), "{name}");
        }
        assert_eq!(a.resp.header("x-should-retry"), None);
        assert_eq!(
            (a.summary.outcome, a.summary.code),
            (Outcome::Success, None)
        );
        assert_eq!(a.summary.attempts.len(), 2);
        assert_eq!(a.summary.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn a_run_given_up_on_429s_is_a_429_passing_retry_after_on() {
        let limited = reply(429, &[("retry-after", "40")], "{}");
        let gave_up = RunOutcome::GaveUp {
            reason: GiveUpReason::RetryAfterPastDeadline,
            last: AttemptOutcome::Reply(limited),
            retry_after_ms: Some(40_000),
        };
        let a = answer_run(run(
            gave_up,
            vec![record(1, 429, "req_a"), record(2, 429, "req_b")],
        ));
        assert_eq!(a.resp.status, 429);
        assert_eq!(a.resp.header("retry-after"), Some("40"));
        assert_eq!(a.resp.header("x-should-retry"), Some("false"));
        assert_eq!(a.resp.header("x-upstream-attempts"), Some("2"));
        let body: serde_json::Value = serde_json::from_slice(&a.resp.body).unwrap();
        assert_eq!(body["error"]["code"], "upstream_rate_limited");
        assert_eq!(
            body["error"]["upstream"]["request_ids"],
            serde_json::json!(["req_a", "req_b"])
        );
        assert_eq!(
            body["error"]["upstream"]["last_error"],
            "429 Too Many Requests"
        );
        assert_eq!(a.summary.outcome, Outcome::UpstreamFailure);
        assert_eq!(a.summary.code, Some(ErrorCode::UpstreamRateLimited));
    }

    #[test]
    fn every_breaker_open_is_a_503_with_whole_seconds_to_wait() {
        let a = answer_run(run(
            RunOutcome::CircuitOpen {
                retry_after_ms: 2_500,
            },
            Vec::new(),
        ));
        assert_eq!(a.resp.status, 503);
        assert_eq!(a.resp.header("retry-after"), Some("3"));
        assert_eq!(a.resp.header("x-upstream-attempts"), None);
        assert!(a.summary.circuit_open);
        assert_eq!(a.summary.code, Some(ErrorCode::UpstreamCircuitOpen));
    }

    #[test]
    fn refusals_carry_their_code_outcome_and_headers() {
        let a = rejected(
            Rejection {
                code: ErrorCode::MethodNotAllowed,
                message: "use POST".into(),
                allow: Some("POST"),
                route: "/chat/completions",
                model: None,
            },
            "req-2",
        );
        assert_eq!(a.resp.status, 405);
        assert_eq!(a.resp.header("allow"), Some("POST"));
        assert_eq!(a.resp.header("x-should-retry"), Some("false"));
        assert_eq!(a.resp.header("x-lambda-request-id"), Some("req-2"));
        assert_eq!(a.summary.outcome, Outcome::Rejected);
        let config = rejected(Rejection::config("OPENAI_API_KEY", "is not set"), "req-3");
        assert_eq!(config.resp.status, 500);
        assert_eq!(config.summary.outcome, Outcome::ConfigError);
        let health = health("/health", "req-4");
        assert_eq!(
            (health.resp.status, health.summary.outcome),
            (200, Outcome::Health)
        );
        assert_eq!(health.resp.header("x-should-retry"), None);
    }
}
