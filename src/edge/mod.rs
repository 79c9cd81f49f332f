//! The HTTP face of the function: event in, gateway-shaped response out. Every event gets an
//! answer in the §5 shape; the handler never returns an error to the runtime (API Gateway would
//! turn it into a bare 502) and never panics.

pub mod request;
pub mod response;
pub mod routes;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::auth;
use crate::budget::{Budget, DeadlineSettings, GatewayKind};
use crate::config::{self, ConfigError, KeySource, Settings};
use crate::retry::{
    AttemptOutcome, AttemptRecord, Decision, Engine, FailureKind, FastRandJitter, GiveUpReason,
    RetryPolicy, RetryRun, RunOutcome, SystemClock, TokioSleeper, UpstreamReply, epoch_ms,
};
use crate::secrets::Secrets;
use crate::telemetry::logs;
use crate::telemetry::metrics::{InvocationMetrics, MetricsSink};
use crate::upstream::{ForwardRequest, UpstreamClient};
use request::{BodyError, GatewayEvent};
use response::{ErrorCode, LAMBDA_RESPONSE_LIMIT, ProxyResponse, UpstreamSummary, seconds};
use routes::{Route, RouteKind};

const STATUS_PAGE: &str = "https://status.openai.com";

/// What the runtime tells us about one invocation.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub request_id: String,
    /// `Lambda-Runtime-Deadline-Ms` (epoch ms; `cargo lambda watch` sends a constant 600000).
    pub deadline_ms: u64,
}

/// The function: settings, clients and caches built once at cold start.
pub struct Proxy {
    /// Misconfigured: every proxied request answers 500 `config_error`.
    state: Result<Ready, ConfigError>,
    secrets: Secrets,
    metrics: Box<dyn MetricsSink>,
    cold_start: AtomicBool,
    warned_lambda_deadline: AtomicBool,
    warned_gateway_start: AtomicBool,
}

/// What a well-configured function has.
struct Ready {
    settings: Settings,
    upstream: UpstreamClient,
}

/// How an invocation ended, for the `outcome` log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Upstream answered 2xx.
    Success,
    /// A final non-2xx upstream answer, passed through.
    UpstreamError,
    /// The function answered 502/504/429 for a broken upstream.
    UpstreamFailure,
    /// The caller's request was refused (route, method, auth, body, model).
    Rejected,
    ConfigError,
    Health,
    /// The handler panicked (a bug): answered 500 `internal_error`.
    InternalError,
}

impl Outcome {
    fn as_str(self) -> &'static str {
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

/// When an invocation started, and whether its `request finished` line and metrics record
/// were written (a panic after either must not write it twice).
struct Ending {
    started: u64,
    cold_start: bool,
    logged: AtomicBool,
    recorded: AtomicBool,
}

/// What the `request finished` line and the metrics need.
struct Summary {
    route: &'static str,
    model: Option<String>,
    code: Option<ErrorCode>,
    outcome: Outcome,
    attempts: Vec<AttemptRecord>,
}

impl Proxy {
    pub fn new(
        settings: Result<Settings, ConfigError>,
        secrets: Secrets,
        metrics: Box<dyn MetricsSink>,
    ) -> Proxy {
        let state = settings.and_then(|settings| {
            UpstreamClient::new(
                &settings.openai_base_url,
                settings.connect_timeout_ms,
                LAMBDA_RESPONSE_LIMIT,
            )
            .map(|upstream| Ready { settings, upstream })
            .map_err(|_| ConfigError {
                setting: "OPENAI_BASE_URL",
                problem: "could not be used to build the HTTP client".into(),
            })
        });
        if let Err(e) = &state {
            tracing::error!(setting = e.setting, problem = %e.problem, "configuration error: every proxied request will answer 500 config_error");
        }
        let secrets = match &state {
            Ok(r) => secrets.with_ttl_ms(r.settings.secrets_ttl_ms),
            Err(_) => secrets,
        };
        Proxy {
            state,
            secrets,
            metrics,
            cold_start: AtomicBool::new(true),
            warned_lambda_deadline: AtomicBool::new(false),
            warned_gateway_start: AtomicBool::new(false),
        }
    }

    /// Answers one event. Runs the work on its own task so that even a panic becomes a §5
    /// 500 answer instead of a bare Lambda error, and still ends in one `request finished`
    /// line and one metrics record.
    pub async fn handle_event(self: &Arc<Self>, event: Value, invocation: Invocation) -> Value {
        logs::begin_invocation(&invocation.request_id);
        let span = tracing::info_span!("invocation", lambda_request_id = %invocation.request_id);
        let ending = Arc::new(Ending {
            started: epoch_ms(),
            cold_start: self.cold_start.swap(false, Ordering::Relaxed),
            logged: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
        });
        let parsed = GatewayEvent::parse(&event).map(|e| (e.kind, e.start_ms, e.path.clone()));
        let (proxy, inv, end) = (self.clone(), invocation.clone(), ending.clone());
        let task = tokio::spawn(
            async move { proxy.handle(&event, &inv, &end).await }.instrument(span.clone()),
        );
        let e = match task.await {
            Ok(v) => return v,
            Err(e) => e,
        };
        let _g = span.enter();
        tracing::error!(
            panic = e.is_panic(),
            "handler failed; answering 500 internal_error"
        );
        let id = invocation.request_id.as_str();
        let resp = ProxyResponse::error(
            ErrorCode::InternalError,
            "The proxy failed while handling this request. This is a bug in the proxy, not in your request.",
            None,
            id,
        );
        let resp = finish_headers(resp, id);
        let route = parsed.as_ref().and_then(|(_, _, path)| routes::find(path));
        let summary = Summary {
            route: route.map_or("unknown", |r| r.path),
            model: None,
            code: Some(ErrorCode::InternalError),
            outcome: Outcome::InternalError,
            attempts: Vec::new(),
        };
        let gateway = parsed.as_ref().map(|(kind, start, _)| (*kind, *start));
        let budget = self.budget(&invocation, gateway, ending.started);
        self.finish(id, &summary, &resp, &budget, &ending);
        render(parsed.map(|(kind, _, _)| kind), resp)
    }

    /// Answers one event (no panic guard; see [`Proxy::handle_event`]).
    async fn handle(&self, event: &Value, invocation: &Invocation, ending: &Ending) -> Value {
        let id = invocation.request_id.as_str();
        let parsed = GatewayEvent::parse(event);
        let gateway = parsed.as_ref().map(|e| (e.kind, e.start_ms));
        let budget = self.budget(invocation, gateway, ending.started);
        self.warn_about_emulators(&budget, invocation);

        let mut summary = Summary {
            route: "unknown",
            model: None,
            code: None,
            outcome: Outcome::Rejected,
            attempts: Vec::new(),
        };
        let resp = match &parsed {
            Some(ev) => self.serve(ev, id, &budget, &mut summary).await,
            None => {
                summary.code = Some(ErrorCode::InvalidRequest);
                ProxyResponse::error(
                    ErrorCode::InvalidRequest,
                    "The event is not an API Gateway (REST or HTTP API) or Lambda function URL request.",
                    None,
                    id,
                )
            }
        };
        let resp = finish_headers(resp, id);
        self.finish(id, &summary, &resp, &budget, ending);
        render(parsed.map(|e| e.kind), resp)
    }

    /// The invocation's budget. Misconfigured: nothing goes upstream, but the default deadline
    /// still makes sense.
    fn budget(
        &self,
        invocation: &Invocation,
        gateway: Option<(GatewayKind, Option<u64>)>,
        started: u64,
    ) -> Budget {
        let deadline = self
            .state
            .as_ref()
            .map_or_else(|_| DeadlineSettings::default(), |r| r.settings.deadline());
        Budget::compute(invocation.deadline_ms, gateway, started, &deadline)
    }

    /// The `request finished` line and the metrics record, each written once per invocation
    /// (after a panic, only what the handler did not write yet).
    fn finish(
        &self,
        id: &str,
        summary: &Summary,
        resp: &ProxyResponse,
        budget: &Budget,
        ending: &Ending,
    ) {
        let cold_start = ending.cold_start;
        if !ending.logged.swap(true, Ordering::SeqCst) {
            let elapsed_ms = epoch_ms().saturating_sub(ending.started);
            log_finished(summary, resp, elapsed_ms, budget, cold_start);
        }
        if summary.outcome != Outcome::Health && !ending.recorded.swap(true, Ordering::SeqCst) {
            let failed = summary.code.is_some_and(ErrorCode::is_upstream_failure);
            self.metrics.record(
                id,
                InvocationMetrics::from_attempts(&summary.attempts, failed, cold_start),
            );
        }
    }

    fn warn_about_emulators(&self, budget: &Budget, invocation: &Invocation) {
        if budget.lambda_deadline_replaced
            && !self.warned_lambda_deadline.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                lambda_deadline_ms = invocation.deadline_ms,
                budget_ms = budget.budget_ms,
                "Lambda deadline is not a plausible epoch time (local emulator?); using FALLBACK_TIMEOUT_MS"
            );
        }
        if budget.gateway_start_ignored && !self.warned_gateway_start.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                budget_ms = budget.budget_ms,
                "gateway start time in the event is stale or in the future (sample event?); ignoring it"
            );
        }
    }

    async fn serve(
        &self,
        ev: &GatewayEvent,
        id: &str,
        budget: &Budget,
        summary: &mut Summary,
    ) -> ProxyResponse {
        let reject = |summary: &mut Summary, code: ErrorCode, message: String| {
            summary.code = Some(code);
            ProxyResponse::error(code, message, None, id)
        };
        let Some(route) = routes::find(&ev.path) else {
            let message = format!(
                "Unknown route {} {}. This proxy serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/moderations, GET /v1/models and GET /health.",
                ev.method,
                printable(&ev.path)
            );
            return reject(summary, ErrorCode::NotFound, message);
        };
        summary.route = route.path;
        if ev.method != route.method {
            let message = format!(
                "Method {} is not allowed on {}; use {}.",
                printable(&ev.method),
                route.path,
                route.method
            );
            let mut resp = reject(summary, ErrorCode::MethodNotAllowed, message);
            resp.set_header("allow", route.method);
            return resp;
        }
        let model_required = match route.kind {
            RouteKind::Health => {
                summary.outcome = Outcome::Health;
                return ProxyResponse::json(200, &json!({"status": "ok"}));
            }
            RouteKind::Forward { model_required } => model_required,
        };
        let ready = match &self.state {
            Ok(r) => r,
            Err(e) => return config_error(summary, id, e.setting, &e.problem),
        };
        let settings = &ready.settings;
        if ev
            .header("host")
            .is_some_and(|host| config::is_own_host(&settings.openai_base_url, host))
        {
            let problem = "points at this proxy itself (the host this request arrived on), so every request would call the function again; set it to the upstream's URL";
            return config_error(summary, id, "OPENAI_BASE_URL", problem);
        }
        let within = budget.time_left(epoch_ms());

        match self.secrets.proxy_tokens(&settings.auth, within).await {
            Err(e) => return config_error(summary, id, e.setting, &e.problem),
            Ok(None) => {}
            Ok(Some(tokens)) => match auth::bearer_token(ev.header("authorization")) {
                None => {
                    let message = "Missing client token: send `Authorization: Bearer <proxy token>` (the proxy's token, not an OpenAI key).";
                    return reject(summary, ErrorCode::Unauthorized, message.into());
                }
                Some(token) if !auth::token_matches(token, &tokens) => {
                    return reject(
                        summary,
                        ErrorCode::Unauthorized,
                        "Invalid client token.".into(),
                    );
                }
                Some(_) => {}
            },
        }

        let body = match ev.body_bytes(settings.max_body_bytes) {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                let message = format!(
                    "Request body is larger than MAX_BODY_BYTES ({} bytes).",
                    settings.max_body_bytes
                );
                return reject(summary, ErrorCode::PayloadTooLarge, message);
            }
            Err(BodyError::BadBase64) => {
                return reject(
                    summary,
                    ErrorCode::InvalidRequest,
                    "Request body is marked base64 but is not valid base64.".into(),
                );
            }
        };
        if route.method == "POST" {
            let value: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    let message = format!("Request body is not valid JSON ({}).", json_error(&e));
                    return reject(summary, ErrorCode::InvalidJson, message);
                }
            };
            let Some(object) = value.as_object() else {
                return reject(
                    summary,
                    ErrorCode::InvalidRequest,
                    "Request body must be a JSON object.".into(),
                );
            };
            match object.get("model") {
                Some(Value::String(m)) => summary.model = Some(m.clone()),
                None if !model_required => {}
                None => {
                    return reject(
                        summary,
                        ErrorCode::InvalidRequest,
                        "Missing required parameter: `model`.".into(),
                    );
                }
                Some(_) => {
                    return reject(
                        summary,
                        ErrorCode::InvalidRequest,
                        "Parameter `model` must be a string.".into(),
                    );
                }
            }
            if let (Some(allow), Some(model)) = (&settings.allowed_models, &summary.model)
                && !allow.allows(model)
            {
                let message = format!(
                    "Model `{}` is not allowed by this proxy (ALLOWED_MODELS).",
                    printable(model)
                );
                return reject(summary, ErrorCode::ModelNotAllowed, message);
            }
        }

        // A value reqwest cannot put in a header would fail every attempt before it is sent.
        for (name, shown) in [
            ("content-type", "Content-Type"),
            ("idempotency-key", "Idempotency-Key"),
        ] {
            if ev.header(name).is_some_and(|v| !forwardable(v)) {
                let message = format!("Header `{shown}` holds control characters.");
                return reject(summary, ErrorCode::InvalidRequest, message);
            }
        }

        let key = match self
            .secrets
            .openai_key(&settings.openai_key, false, within)
            .await
        {
            Ok(k) => k,
            Err(e) => return config_error(summary, id, e.setting, &e.problem),
        };
        let forward = ForwardRequest {
            method: route.http_method(),
            path: route.path,
            body: if route.method == "POST" {
                Bytes::from(body)
            } else {
                Bytes::new()
            },
            content_type: ev.header("content-type").map(str::to_owned),
            idempotency_key: ev.header("idempotency-key").map(str::to_owned),
            client_request_id: id.to_owned(),
            organization: settings.openai_organization.clone(),
            project: settings.openai_project.clone(),
        };
        let run = self
            .call_upstream(
                ready,
                route,
                &forward,
                key,
                budget,
                summary.model.as_deref(),
            )
            .await;
        respond(run, id, budget, summary)
    }

    /// Runs the retry engine; after an upstream 401 with a key from Secrets Manager, fetches the
    /// key again once (rotation) and retries with what is left of the attempts and the budget.
    async fn call_upstream(
        &self,
        ready: &Ready,
        route: &Route,
        forward: &ForwardRequest,
        key: Arc<str>,
        budget: &Budget,
        model: Option<&str>,
    ) -> RetryRun {
        let (settings, client) = (&ready.settings, &ready.upstream);
        let engine = Engine {
            policy: RetryPolicy {
                max_attempts: settings.retry_max_attempts,
                base_delay_ms: settings.retry_base_delay_ms,
                max_delay_ms: settings.retry_max_delay_ms,
            },
            min_attempt_ms: settings.min_attempt_ms,
            attempt_timeout_ms: settings.attempt_timeout_ms,
        };
        let attempt_with = |key: Arc<str>| {
            move |plan: crate::retry::AttemptPlan| {
                let key = key.clone();
                async move { client.send(forward, &key, plan.timeout_ms).await }
            }
        };
        let mut run = engine
            .run(
                budget.deadline_ms,
                &SystemClock,
                &TokioSleeper,
                &mut FastRandJitter,
                attempt_with(key.clone()),
                |r| log_attempt(route, model, r, 0),
            )
            .await;
        let rejected_key = matches!(&run.outcome, RunOutcome::Answer(r) if r.status == 401);
        if !(rejected_key && matches!(settings.openai_key, KeySource::SecretArn(_))) {
            return run;
        }
        let within = budget.time_left(epoch_ms());
        let Ok(fresh) = self
            .secrets
            .openai_key(&settings.openai_key, true, within)
            .await
        else {
            return run;
        };
        if fresh == key {
            // Not rotated: the same key would be rejected again.
            tracing::warn!(
                "upstream rejected the OpenAI key (401); the secret still holds the same key"
            );
            return run;
        }
        // The retry with the new key spends from the same RETRY_MAX_ATTEMPTS (and deadline).
        let offset = run.attempts.len() as u32;
        let Some(left) = settings
            .retry_max_attempts
            .checked_sub(offset)
            .filter(|n| *n > 0)
        else {
            tracing::warn!(
                "upstream rejected the OpenAI key (401); fetched a new one from Secrets Manager for the next request (no attempt left for this one)"
            );
            return run;
        };
        tracing::warn!(
            "upstream rejected the OpenAI key (401); fetched it again from Secrets Manager and retrying once"
        );
        let engine = Engine {
            policy: RetryPolicy {
                max_attempts: left,
                ..engine.policy
            },
            ..engine
        };
        let second = engine
            .run(
                budget.deadline_ms,
                &SystemClock,
                &TokioSleeper,
                &mut FastRandJitter,
                attempt_with(fresh),
                |r| log_attempt(route, model, r, offset),
            )
            .await;
        if matches!(second.outcome, RunOutcome::NoTimeToStart { .. }) {
            return run;
        }
        run.attempts
            .extend(second.attempts.into_iter().map(|mut a| {
                a.attempt += offset;
                a
            }));
        run.outcome = second.outcome;
        run.elapsed_ms = epoch_ms().saturating_sub(budget.started_ms);
        run
    }
}

fn config_error(summary: &mut Summary, id: &str, setting: &str, problem: &str) -> ProxyResponse {
    summary.code = Some(ErrorCode::ConfigError);
    summary.outcome = Outcome::ConfigError;
    let message = format!(
        "The proxy is misconfigured: {setting} {problem}. The operator must fix the function's configuration."
    );
    ProxyResponse::error(ErrorCode::ConfigError, message, None, id)
}

/// Turns the engine's result into the caller's answer (spec §5).
fn respond(run: RetryRun, id: &str, budget: &Budget, summary: &mut Summary) -> ProxyResponse {
    let upstream = UpstreamSummary {
        status: run.attempts.iter().rev().find_map(|a| a.status),
        attempts: run.attempts.len() as u32,
        elapsed_ms: run.elapsed_ms,
        request_ids: run
            .attempts
            .iter()
            .filter_map(|a| a.upstream_request_id.clone())
            .collect(),
        last_error: None,
    };
    let last_request_id = upstream.request_ids.last().cloned();
    let ids = if upstream.request_ids.is_empty() {
        "none".to_owned()
    } else {
        upstream.request_ids.join(", ")
    };
    summary.attempts = run.attempts;
    let (mut resp, last_reply) = match run.outcome {
        RunOutcome::Answer(reply) if matches!(reply.status, 401 | 403) => {
            let code = ErrorCode::UpstreamAuthFailed;
            summary.outcome = Outcome::UpstreamFailure;
            summary.code = Some(code);
            let upstream = UpstreamSummary {
                last_error: Some(AttemptOutcome::Reply(reply.clone()).describe()),
                ..upstream
            };
            let message = format!(
                "OpenAI rejected the proxy's own API key ({}). This is not a problem with your request or your token: the operator must fix the function's OpenAI key. Upstream request ids: {ids}.",
                upstream.last_error.as_deref().unwrap_or_default()
            );
            (
                ProxyResponse::error(code, message, Some(&upstream), id),
                Some(reply),
            )
        }
        RunOutcome::Answer(reply) => {
            summary.outcome = if (200..300).contains(&reply.status) {
                Outcome::Success
            } else {
                Outcome::UpstreamError
            };
            let mut resp = ProxyResponse {
                status: reply.status,
                headers: Vec::new(),
                body: reply.body.clone(),
            };
            if let Some(ct) = reply.header("content-type") {
                resp.set_header("content-type", ct);
            }
            if let Some(ms) = reply.header("retry-after-ms") {
                resp.set_header("retry-after-ms", ms);
            }
            if reply.oversized || !resp.fits_lambda_limit() {
                resp = too_large(&reply, upstream, &ids, id, summary);
            }
            (resp, Some(reply))
        }
        RunOutcome::GaveUp {
            reason,
            last,
            retry_after_ms,
        } => {
            summary.outcome = Outcome::UpstreamFailure;
            let upstream = UpstreamSummary {
                last_error: Some(last.describe()),
                ..upstream
            };
            let (code, message) = gave_up(
                reason,
                &last,
                retry_after_ms,
                &upstream,
                &ids,
                budget.budget_ms,
            );
            summary.code = Some(code);
            let mut resp = ProxyResponse::error(code, message, Some(&upstream), id);
            if let Some(ms) = retry_after_ms {
                resp.set_header("retry-after", ms.div_ceil(1000).to_string());
            }
            let reply = match last {
                AttemptOutcome::Reply(r) => Some(r),
                AttemptOutcome::Failed { .. } => None,
            };
            (resp, reply)
        }
        RunOutcome::NoTimeToStart { remaining_ms } => {
            let code = ErrorCode::UpstreamTimeout;
            summary.outcome = Outcome::UpstreamFailure;
            summary.code = Some(code);
            let upstream = UpstreamSummary {
                last_error: Some("no time left to call the upstream".into()),
                ..upstream
            };
            // x-should-retry: false like every error: a deadline this close usually means the
            // function's timeout leaves no room for MIN_ATTEMPT_MS, which a retry cannot fix.
            let message = format!(
                "The proxy had only {remaining_ms} ms of its time budget left when the request arrived (the gateway's or Lambda's deadline is near), too little to call OpenAI, so OpenAI was not called. If this persists, the operator should check the function's timeout against MIN_ATTEMPT_MS and DEADLINE_MARGIN_MS."
            );
            (
                ProxyResponse::error(code, message, Some(&upstream), id),
                None,
            )
        }
    };
    if !summary.attempts.is_empty() {
        resp.set_header("x-upstream-attempts", summary.attempts.len().to_string());
    }
    if let Some(rid) = last_request_id {
        resp.set_header("x-request-id", rid);
    }
    if let Some(reply) = last_reply {
        pass_through_headers(&reply, &mut resp);
    }
    resp
}

/// 502 `upstream_response_too_large`: the upstream's final answer cannot be returned through
/// Lambda. Retrying cannot help, so it is not retried (like every error, `x-should-retry: false`).
fn too_large(
    reply: &UpstreamReply,
    upstream: UpstreamSummary,
    ids: &str,
    id: &str,
    summary: &mut Summary,
) -> ProxyResponse {
    let code = ErrorCode::UpstreamResponseTooLarge;
    summary.outcome = Outcome::UpstreamFailure;
    summary.code = Some(code);
    let status = AttemptOutcome::Reply(reply.clone()).describe();
    let upstream = UpstreamSummary {
        last_error: Some(format!("{status}: answer too large")),
        ..upstream
    };
    let message = format!(
        "OpenAI's answer ({status}) is larger than the {} MB a Lambda function can return, so the proxy read no further and cannot pass it on. Ask for less in one request (fewer inputs per embeddings request, encoding_format \"base64\" for embeddings, a lower max_tokens). Upstream request ids: {ids}.",
        LAMBDA_RESPONSE_LIMIT / 1_000_000
    );
    ProxyResponse::error(code, message, Some(&upstream), id)
}

/// The §5 code and message after the engine gave up: 504 only when the deadline cut an attempt
/// that was still waiting; otherwise 429 after a 429, else 502. The message says why it stopped.
fn gave_up(
    reason: GiveUpReason,
    last: &AttemptOutcome,
    retry_after_ms: Option<u64>,
    upstream: &UpstreamSummary,
    ids: &str,
    budget_ms: u64,
) -> (ErrorCode, String) {
    let attempts = format!(
        "{} attempt{} over {}",
        upstream.attempts,
        if upstream.attempts == 1 { "" } else { "s" },
        seconds(upstream.elapsed_ms)
    );
    let budget = seconds(budget_ms);
    let last_error = upstream.last_error.as_deref().unwrap_or_default();
    let why = match reason {
        GiveUpReason::AttemptsExhausted => {
            "the proxy made every attempt it is allowed (RETRY_MAX_ATTEMPTS)".to_owned()
        }
        GiveUpReason::BudgetExhausted => {
            format!("too little of the proxy's {budget} time budget was left for another attempt")
        }
        GiveUpReason::RetryAfterPastDeadline => format!(
            "OpenAI asked to wait {}, past the end of the proxy's {budget} time budget",
            seconds(retry_after_ms.unwrap_or_default())
        ),
        GiveUpReason::DeadlineReached => format!("the proxy's {budget} time budget ran out"),
    };
    match (reason, last) {
        (GiveUpReason::DeadlineReached, _) => (
            ErrorCode::UpstreamTimeout,
            format!(
                "OpenAI did not answer in time: {attempts}; the last attempt was still waiting when the proxy's {budget} time budget ran out. Upstream request ids: {ids}. Check {STATUS_PAGE}."
            ),
        ),
        (_, AttemptOutcome::Reply(r)) if r.status == 429 => (
            ErrorCode::UpstreamRateLimited,
            format!(
                "OpenAI kept rate-limiting this request: {attempts} ended with {last_error}; {why}. Upstream request ids: {ids}."
            ),
        ),
        _ => (
            ErrorCode::UpstreamUnavailable,
            format!(
                "OpenAI is unavailable: {attempts} failed (last: {last_error}); {why}. Upstream request ids: {ids}. Check {STATUS_PAGE}."
            ),
        ),
    }
}

/// Upstream `x-ratelimit-*`, `openai-processing-ms` and `retry-after` go to the caller.
fn pass_through_headers(reply: &UpstreamReply, resp: &mut ProxyResponse) {
    for (name, value) in &reply.headers {
        let keep = name.starts_with("x-ratelimit-")
            || name == "openai-processing-ms"
            || (name == "retry-after" && resp.header("retry-after").is_none());
        if keep {
            resp.set_header(name, value.clone());
        }
    }
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

/// Shapes the response for the gateway that sent the event (HTTP API v2 / function URL format
/// for anything not REST v1).
fn render(kind: Option<GatewayKind>, resp: ProxyResponse) -> Value {
    let (body, is_base64) = match std::str::from_utf8(&resp.body) {
        Ok(s) => (s.to_owned(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&resp.body),
            true,
        ),
    };
    let headers: serde_json::Map<String, Value> = resp
        .headers
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    match kind {
        Some(GatewayKind::RestV1) => json!({
            "statusCode": resp.status, "headers": headers, "body": body, "isBase64Encoded": is_base64,
        }),
        _ => json!({
            "statusCode": resp.status, "headers": headers, "body": body, "isBase64Encoded": is_base64,
            "cookies": [],
        }),
    }
}

/// Whether a client header value can be forwarded (what `http::HeaderValue` accepts).
fn forwardable(value: &str) -> bool {
    value.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t')
}

/// Client text echoed in messages is cut short and stripped of control characters.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(100).collect();
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

fn log_attempt(route: &Route, model: Option<&str>, r: &AttemptRecord, offset: u32) {
    let (status, error_kind) = (r.status, r.error_kind.map(FailureKind::as_str));
    macro_rules! attempt_event {
        ($level:ident) => {
            tracing::$level!(
                route = route.path,
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
    budget: &Budget,
    cold_start: bool,
) {
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
                budget_ms = budget.budget_ms,
                json.upstream_request_ids = %json!(ids),
                cold_start,
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

/// Position and category only: the parser's own message could quote the body.
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of input",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "invalid data",
        serde_json::error::Category::Io => "read error",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}
