//! The HTTP face of the function: event in, gateway-shaped response out. Every event gets an
//! answer in the §5 shape; the handler never returns an error to the runtime (API Gateway would
//! turn it into a bare 502) and never panics.

pub mod render;
pub mod request;
pub mod response;
pub mod routes;
pub mod streaming;
mod upstreams;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::auth;
use crate::config::{self, ConfigError, DEFAULT_UPSTREAM, KeySource, Settings};
use crate::deadline::{Deadline, DeadlineSettings, GatewayKind};
use crate::retry::{
    AttemptOutcome, AttemptRecord, Decision, FailureKind, GiveUpReason, RetryRun, RunOutcome,
    UpstreamReply, epoch_ms,
};
use crate::secrets::Secrets;
use crate::stream::StreamOutcome;
use crate::telemetry::logs;
use crate::telemetry::metrics::{InvocationMetrics, MetricsSink};
use crate::upstream::{ForwardRequest, LiveStream, UnsendablePart, UpstreamClient};
use crate::upstreams::breaker::Breakers;
use crate::upstreams::latency::LatencyBook;
use crate::upstreams::{MAX_UPSTREAMS, UpstreamSpec, UpstreamsSource};
use render::render;
use request::{BodyError, EventBody, Front, GatewayEvent};
use response::{ErrorCode, LAMBDA_RESPONSE_LIMIT, ProxyResponse, UpstreamSummary, seconds};
use routes::RouteKind;

const STATUS_PAGE: &str = "https://status.openai.com";
/// The routes, for messages.
const SERVED: &str = "POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/moderations, GET /v1/models and GET /health";

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
    /// Kept across warm invocations (and shared by concurrent ones), by position in the list.
    breakers: Breakers,
    latency: LatencyBook,
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
    /// A bug (the handler panicked, or a request it could not build): 500 `internal_error`.
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
    /// §11: switches, an open breaker met, hopeless attempts skipped.
    switches: u32,
    circuit_open: bool,
    skipped: u32,
    /// The answer may be streamed for real (`RESPONSE_STREAM`, a `"stream": true` request on a
    /// streaming route).
    may_stream: bool,
    /// The committed upstream stream, still to be forwarded.
    live: Option<LiveStream>,
}

/// An event answered, before rendering (the response and what the log line needs).
struct Answered {
    front: Option<Front>,
    resp: ProxyResponse,
    summary: Summary,
    budget: Deadline,
    request_id: String,
}

/// How a stream went, for `request finished` (spec §10).
struct StreamLog {
    first_byte_ms: Option<u64>,
    bytes: u64,
    outcome: StreamOutcome,
}

impl Proxy {
    pub fn new(
        settings: Result<Settings, ConfigError>,
        secrets: Secrets,
        metrics: Box<dyn MetricsSink>,
    ) -> Proxy {
        let state = settings.and_then(|settings| {
            UpstreamClient::new(settings.connect_timeout_ms, LAMBDA_RESPONSE_LIMIT)
                .map(|upstream| Ready {
                    breakers: Breakers::new(settings.breaker, MAX_UPSTREAMS),
                    latency: LatencyBook::new(),
                    settings,
                    upstream,
                })
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
        let (span, ending) = self.begin(&invocation);
        // Parsed once; the body moves from the event to the upstream request without a copy.
        let event = GatewayEvent::from_value(event);
        let parsed = event
            .as_ref()
            .map(|e| (e.front(), e.start_ms, e.path.clone()));
        let (proxy, inv, end) = (self.clone(), invocation.clone(), ending.clone());
        let task = tokio::spawn(
            async move { proxy.handle(event, &inv, &end).await }.instrument(span.clone()),
        );
        let e = match task.await {
            Ok(v) => return v,
            Err(e) => e,
        };
        let (front, resp) = self.internal_error(e, parsed, &invocation, &ending, &span);
        render(front, resp)
    }

    /// The invocation's span and ending record (its start, and whether it was logged yet).
    fn begin(&self, invocation: &Invocation) -> (tracing::Span, Arc<Ending>) {
        logs::begin_invocation(&invocation.request_id);
        let span = tracing::info_span!("invocation", lambda_request_id = %invocation.request_id);
        let ending = Arc::new(Ending {
            started: epoch_ms(),
            cold_start: self.cold_start.swap(false, Ordering::Relaxed),
            logged: AtomicBool::new(false),
            recorded: AtomicBool::new(false),
        });
        (span, ending)
    }

    /// After the handler's task failed (a panic): the §5 500 answer, with its one `request
    /// finished` line and metrics record if the handler had not written them yet.
    fn internal_error(
        &self,
        e: tokio::task::JoinError,
        parsed: Option<(Front, Option<u64>, String)>,
        invocation: &Invocation,
        ending: &Ending,
        span: &tracing::Span,
    ) -> (Option<Front>, ProxyResponse) {
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
            switches: 0,
            circuit_open: false,
            skipped: 0,
            may_stream: false,
            live: None,
        };
        let gateway = parsed
            .as_ref()
            .map(|(front, start, _)| (front.kind, *start));
        let budget = self.budget(invocation, gateway, ending.started);
        self.finish(id, &summary, &resp, &budget, ending, None);
        (parsed.map(|(front, _, _)| front), resp)
    }

    /// Answers one event (no panic guard; see [`Proxy::handle_event`]).
    async fn handle(
        &self,
        event: Option<GatewayEvent>,
        invocation: &Invocation,
        ending: &Ending,
    ) -> Value {
        let done = self.answer(event, invocation, ending, false).await;
        let (id, summary, budget) = (&done.request_id, &done.summary, &done.budget);
        self.finish(id, summary, &done.resp, budget, ending, None);
        render(done.front, done.resp)
    }

    /// The answer to one event; `may_stream`: a `"stream": true` request may be committed to a
    /// real stream (then `summary.live` holds it and `resp` carries the prelude's status and
    /// headers).
    async fn answer(
        &self,
        parsed: Option<GatewayEvent>,
        invocation: &Invocation,
        ending: &Ending,
        may_stream: bool,
    ) -> Answered {
        let id = invocation.request_id.as_str();
        let gateway = parsed.as_ref().map(|e| (e.kind, e.start_ms));
        let budget = self.budget(invocation, gateway, ending.started);
        self.warn_about_emulators(&budget, invocation);

        let mut summary = Summary {
            route: "unknown",
            model: None,
            code: None,
            outcome: Outcome::Rejected,
            attempts: Vec::new(),
            switches: 0,
            circuit_open: false,
            skipped: 0,
            may_stream,
            live: None,
        };
        let front = parsed.as_ref().map(GatewayEvent::front);
        let resp = match parsed {
            Some(mut ev) => {
                let body = ev.take_body();
                self.serve(&ev, body, id, &budget, &mut summary).await
            }
            None => {
                summary.code = Some(ErrorCode::InvalidRequest);
                ProxyResponse::error(
                    ErrorCode::InvalidRequest,
                    "The event is not an HTTP request from API Gateway (REST or HTTP API), a Lambda function URL or an Application Load Balancer.",
                    None,
                    id,
                )
            }
        };
        Answered {
            front,
            resp: finish_headers(resp, id),
            summary,
            budget,
            request_id: id.to_owned(),
        }
    }

    /// The invocation's budget. Misconfigured: nothing goes upstream, but the default deadline
    /// still makes sense.
    fn budget(
        &self,
        invocation: &Invocation,
        gateway: Option<(GatewayKind, Option<u64>)>,
        started: u64,
    ) -> Deadline {
        let deadline = self
            .state
            .as_ref()
            .map_or_else(|_| DeadlineSettings::default(), |r| r.settings.deadline());
        Deadline::compute(invocation.deadline_ms, gateway, started, &deadline)
    }

    /// The `request finished` line and the metrics record, each written once per invocation
    /// (after a panic, only what the handler did not write yet).
    fn finish(
        &self,
        id: &str,
        summary: &Summary,
        resp: &ProxyResponse,
        budget: &Deadline,
        ending: &Ending,
        stream: Option<&StreamLog>,
    ) {
        let cold_start = ending.cold_start;
        if !ending.logged.swap(true, Ordering::SeqCst) {
            let elapsed_ms = epoch_ms().saturating_sub(ending.started);
            log_finished(summary, resp, elapsed_ms, budget, cold_start, stream);
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

    fn warn_about_emulators(&self, budget: &Deadline, invocation: &Invocation) {
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
        body: EventBody,
        id: &str,
        budget: &Deadline,
        summary: &mut Summary,
    ) -> ProxyResponse {
        let reject = |summary: &mut Summary, code: ErrorCode, message: String| {
            summary.code = Some(code);
            ProxyResponse::error(code, message, None, id)
        };
        if ev.kind == GatewayKind::WebSocket {
            let message = format!(
                "WebSocket API routes are not served by this proxy (route {}). It answers HTTP requests from API Gateway, a Lambda function URL or an Application Load Balancer: {SERVED}.",
                printable(&ev.path)
            );
            return reject(summary, ErrorCode::NotFound, message);
        }
        let Some(route) = routes::find(&ev.path) else {
            let message = format!(
                "Unknown route {} {}. This proxy serves {SERVED}.",
                printable(&ev.method),
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

        let body = match body.decode(settings.max_body_bytes) {
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
        let mut stream = false;
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
            stream = object.get("stream") == Some(&Value::Bool(true));
            summary.may_stream &= stream && route.streams();
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

        let list = match self.upstream_list(settings, within).await {
            Ok(list) => list,
            Err(e) => return config_error(summary, id, e.setting, &e.problem),
        };
        if let Some(host) = ev.header("host")
            && let Some(own) = list.iter().find(|u| config::is_own_host(&u.base_url, host))
        {
            let setting = match &settings.upstreams {
                UpstreamsSource::List(l) if l.len() == 1 && l[0].name == DEFAULT_UPSTREAM => {
                    "OPENAI_BASE_URL"
                }
                UpstreamsSource::List(_) => "UPSTREAMS",
                UpstreamsSource::SecretArn(_) => "UPSTREAMS_SECRET_ARN",
            };
            let problem = format!(
                "points at this proxy itself (upstream `{}` is the host this request arrived on), so every request would call the function again; set it to the upstream's URL",
                own.name
            );
            return config_error(summary, id, setting, &problem);
        }
        let keys = match self.upstream_keys(settings, &list, None, within).await {
            Ok(keys) => keys,
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
        };
        let routed = upstreams::Routed {
            route,
            forward: &forward,
            list: &list,
            models: summary
                .model
                .as_deref()
                .map(|m| settings.model_fallbacks.chain(m)),
            stream,
            live: summary.may_stream.then(|| std::sync::Mutex::new(None)),
        };
        let run = self
            .call_upstream(ready, &routed, keys.clone(), budget)
            .await;
        if matches!(&run.outcome, RunOutcome::Answer(r) if (200..300).contains(&r.status)) {
            summary.live = routed.take_live();
        }
        if let RunOutcome::Unsendable { detail } = &run.outcome {
            tracing::error!(detail, "the request to the upstream could not be built");
            let culprit = run.attempts.last().and_then(|a| {
                let i = a.target.upstream;
                let (spec, key) = (list.get(i)?, keys.get(i)?);
                Some((spec, UpstreamClient::unsendable_part(&forward, spec, key)?))
            });
            if let Some((spec, part)) = culprit {
                let setting = unsendable_setting(settings, spec, part);
                let problem = "holds a value that cannot be sent in an HTTP request";
                return config_error(summary, id, &setting, problem);
            }
        }
        respond(run, &routed, id, budget, summary)
    }
}

/// The setting that holds the part of a request that could not be built (nothing was sent or
/// retried): the §7 setting for the default upstream, else the upstream's field in `UPSTREAMS`.
fn unsendable_setting(settings: &Settings, spec: &UpstreamSpec, part: UnsendablePart) -> String {
    let field = match (part, &spec.key) {
        (UnsendablePart::BaseUrl, _) => "base_url",
        (UnsendablePart::Key, KeySource::SecretArn(_)) => "api_key_secret_arn",
        (UnsendablePart::Key, KeySource::Env(_)) => "api_key",
        (UnsendablePart::Organization, _) => "organization",
        (UnsendablePart::Project, _) => "project",
    };
    match &settings.upstreams {
        UpstreamsSource::List(l) if l.len() == 1 && l[0].name == DEFAULT_UPSTREAM => {
            match (part, &spec.key) {
                (UnsendablePart::BaseUrl, _) => "OPENAI_BASE_URL",
                (UnsendablePart::Key, KeySource::SecretArn(_)) => "OPENAI_API_KEY_SECRET_ARN",
                (UnsendablePart::Key, KeySource::Env(_)) => "OPENAI_API_KEY",
                (UnsendablePart::Organization, _) => "OPENAI_ORGANIZATION",
                (UnsendablePart::Project, _) => "OPENAI_PROJECT",
            }
            .to_owned()
        }
        UpstreamsSource::List(_) => format!("UPSTREAMS (upstream `{}`, `{field}`)", spec.name),
        UpstreamsSource::SecretArn(_) => {
            format!("UPSTREAMS_SECRET_ARN (upstream `{}`, `{field}`)", spec.name)
        }
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
fn respond(
    run: RetryRun,
    req: &upstreams::Routed<'_>,
    id: &str,
    budget: &Deadline,
    summary: &mut Summary,
) -> ProxyResponse {
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
        by_upstream: upstreams::by_upstream(&run.attempts, &req.names()),
    };
    let last_request_id = upstream.request_ids.last().cloned();
    let ids = if upstream.request_ids.is_empty() {
        "none".to_owned()
    } else {
        upstream.request_ids.join(", ")
    };
    (summary.switches, summary.circuit_open, summary.skipped) =
        (run.switches, run.circuit_open, run.skipped);
    let route_headers = upstreams::route_headers(&run, req);
    let expected_ms = run.attempts.last().and_then(|a| a.expected_ms);
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
        RunOutcome::Answer(mut reply) => {
            summary.outcome = if (200..300).contains(&reply.status) {
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
                resp = too_large(&reply, upstream, &ids, id, summary);
            }
            (resp, Some(reply))
        }
        RunOutcome::CircuitOpen { retry_after_ms } => {
            (circuit_open(summary, upstream, retry_after_ms, id), None)
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
                expected_ms,
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
        RunOutcome::Unsendable { .. } => {
            // Nothing reached the upstream: no attempt to count or report.
            summary.attempts.clear();
            summary.code = Some(ErrorCode::InternalError);
            summary.outcome = Outcome::InternalError;
            let resp = ProxyResponse::error(
                ErrorCode::InternalError,
                "The proxy could not build the request to OpenAI. This is a bug in the proxy, not in your request.",
                None,
                id,
            );
            (resp, None)
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
    for (name, value) in route_headers {
        resp.set_header(name, value);
    }
    resp
}

/// 503 `upstream_circuit_open`: every upstream's breaker is open (§11).
fn circuit_open(
    summary: &mut Summary,
    upstream: UpstreamSummary,
    retry_after_ms: u64,
    id: &str,
) -> ProxyResponse {
    let code = ErrorCode::UpstreamCircuitOpen;
    summary.outcome = Outcome::UpstreamFailure;
    summary.code = Some(code);
    summary.circuit_open = true;
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
    expected_ms: Option<u64>,
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
        GiveUpReason::ExpectedLatencyExceedsBudget => format!(
            "the next attempt was not started because successful attempts there recently took up to {}, more than the time left in the proxy's {budget} time budget (expected_latency_exceeds_budget)",
            seconds(expected_ms.unwrap_or_default())
        ),
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

/// The `upstream attempt` line (§6, §11): `upstream` is the name, `model` the one asked for.
fn log_attempt(req: &upstreams::Routed<'_>, names: &[String], r: &AttemptRecord, offset: u32) {
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
    budget: &Deadline,
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
                budget_ms = budget.budget_ms,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_moves_a_utf8_body_into_the_payload_and_base64s_the_rest() {
        let text = r#"{"object":"list","data":[]}"#.repeat(1000).into_bytes();
        let at = text.as_ptr();
        let resp = ProxyResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(text),
        };
        let http_api = Front {
            kind: GatewayKind::HttpApiV2,
            multi_value_headers: false,
        };
        let v = render(Some(http_api), resp);
        assert_eq!(
            v["body"].as_str().unwrap().as_ptr(),
            at,
            "no copy of the body"
        );
        assert_eq!(
            (&v["statusCode"], &v["isBase64Encoded"], &v["cookies"]),
            (&json!(200), &json!(false), &json!([]))
        );
        assert_eq!(v["headers"]["content-type"], "application/json");
        let binary = ProxyResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from_static(&[0xff, 0x00, 0x01]),
        };
        let rest = Front {
            kind: GatewayKind::RestV1,
            multi_value_headers: false,
        };
        let v = render(Some(rest), binary);
        assert_eq!(
            (&v["body"], &v["isBase64Encoded"]),
            (&json!("/wAB"), &json!(true))
        );
        assert!(
            v.get("cookies").is_none(),
            "REST answers have no cookies field"
        );
    }
}
