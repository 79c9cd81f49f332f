//! The HTTP face of the function: event in, gateway-shaped response out. Every event gets an
//! answer in the §5 shape; the handler never returns an error to the runtime (API Gateway would
//! turn it into a bare 502) and never panics.
//!
//! One event flows one way: `guard.rs` (the panic guard layer: the invocation starts, the event
//! is parsed once by `request.rs`) → `serve` below, the only I/O, calling in order the pure
//! `admit.rs` step (route, auth, body, model → `Admitted` | `Rejection`), the upstream run
//! (`upstreams.rs`, over the retry engine) and the pure `answer.rs` step (how it ended →
//! response and summary) → `finish.rs` (the `request finished` line, the metrics record) →
//! `render.rs` or `streaming.rs` (the payload each front door expects).

mod admit;
mod answer;
mod finish;
pub mod guard;
pub mod render;
pub mod request;
pub mod response;
pub mod routes;
pub mod streaming;
pub mod time;
mod upstreams;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lambda_runtime::Context;
use lambda_runtime::tower::Service;
use serde_json::Value;

use crate::config::{ConfigError, Settings};
use crate::deadline::{Deadline, DeadlineSettings, GatewayKind};
use crate::retry::{Clock, RunOutcome};
use crate::secrets::Secrets;
use crate::telemetry::metrics::MetricsSink;
use crate::upstream::{ForwardRequest, UpstreamClient};
use crate::upstreams::MAX_UPSTREAMS;
use crate::upstreams::breaker::Breakers;
use crate::upstreams::latency::LatencyBook;
use admit::{Admitted, Rejection};
use answer::{Answer, Summary};
use finish::Ending;
use guard::Started;
use render::render;
use request::{EventBody, Front, GatewayEvent};
use response::{LAMBDA_RESPONSE_LIMIT, ProxyResponse};
use routes::{Route, RouteKind};
use time::Time;

/// What the runtime tells us about one invocation.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub request_id: String,
    /// `Lambda-Runtime-Deadline-Ms` (epoch ms; `cargo lambda watch` sends a constant 600000).
    pub deadline_ms: u64,
}

impl Invocation {
    /// The runtime's context for this invocation (what the panic guard reads).
    fn context(&self) -> Context {
        let mut context = Context::default();
        context.request_id.clone_from(&self.request_id);
        context.deadline = self.deadline_ms;
        context
    }
}

/// The function: settings, clients and caches built once at cold start.
pub struct Proxy {
    /// Misconfigured: every proxied request answers 500 `config_error`.
    state: Result<Ready, ConfigError>,
    secrets: Secrets,
    metrics: Box<dyn MetricsSink>,
    /// The one clock (and the sleep and jitter between attempts) of every request.
    time: Time,
    cold_start: AtomicBool,
    warned_lambda_deadline: AtomicBool,
    warned_gateway_start: AtomicBool,
}

/// What a well-configured function has.
struct Ready {
    settings: Settings,
    upstream: UpstreamClient,
    /// Kept across warm invocations (and shared by concurrent ones), by upstream name.
    breakers: Breakers,
    latency: LatencyBook,
}

/// An event answered, before rendering: the response, its summary, the deadline it ran to, and
/// the committed upstream stream still to be forwarded (`RESPONSE_STREAM` only).
struct Answered {
    front: Option<Front>,
    resp: ProxyResponse,
    summary: Summary,
    deadline: Deadline,
    request_id: String,
    live: Option<upstreams::Committed>,
}

/// One request on its way: what every step of `serve` needs.
struct Call<'a> {
    id: &'a str,
    deadline: &'a Deadline,
    /// The time left when the request arrived, for reading secrets.
    within: Duration,
    /// A `"stream": true` request may be committed to a real stream (`RESPONSE_STREAM`).
    may_stream: bool,
}

/// How admission ended.
enum Admission<'a> {
    Forward(&'a Ready, Admitted),
    Health(&'static Route),
    Refused(Rejection),
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
                .map_err(|_| {
                    ConfigError::new(
                        "OPENAI_BASE_URL",
                        "could not be used to build the HTTP client",
                    )
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
            time: Time::system(),
            cold_start: AtomicBool::new(true),
            warned_lambda_deadline: AtomicBool::new(false),
            warned_gateway_start: AtomicBool::new(false),
        }
    }

    /// The same proxy on another clock (and its sleep and jitter), the secrets cache included:
    /// a test runs whole requests in virtual time with it.
    pub fn with_time(self, time: Time) -> Proxy {
        Proxy {
            secrets: self.secrets.with_clock(time.clock()),
            time,
            ..self
        }
    }

    /// The buffered handler service (the runtime calls it through
    /// [`PanicGuardLayer`](guard::PanicGuardLayer)).
    pub fn buffered(
        self: &Arc<Self>,
    ) -> impl Service<Started, Response = Value, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static {
        self.handler(Proxy::handle)
    }

    /// Answers one event in the buffered format, through the panic guard as the runtime does.
    pub async fn handle_event(self: &Arc<Self>, event: Value, invocation: Invocation) -> Value {
        self.guarded_call(self.buffered(), event, invocation).await
    }

    /// Answers one event (behind the panic guard).
    async fn handle(self: Arc<Self>, started: Started) -> Value {
        let Started {
            event,
            invocation,
            ending,
            ..
        } = started;
        let done = self.answer_event(event, &invocation, &ending, false).await;
        let (id, summary, deadline) = (&done.request_id, &done.summary, &done.deadline);
        self.finish(id, summary, &done.resp, deadline, &ending, None);
        render(done.front, done.resp)
    }

    /// The answer to one event; `may_stream`: a `"stream": true` request may be committed to a
    /// real stream (then `live` holds it and `resp` carries the prelude's status and headers).
    async fn answer_event(
        &self,
        event: Option<GatewayEvent>,
        invocation: &Invocation,
        ending: &Ending,
        may_stream: bool,
    ) -> Answered {
        let id = invocation.request_id.as_str();
        let gateway = event.as_ref().map(|e| (e.kind, e.start_ms));
        let deadline = self.deadline(invocation, gateway, ending.started);
        self.warn_about_emulators(&deadline, invocation);
        let front = event.as_ref().map(GatewayEvent::front);
        let (done, live) = match event {
            Some(mut ev) => {
                let body = ev.take_body();
                let call = Call {
                    id,
                    deadline: &deadline,
                    within: deadline.time_left(self.time.now_ms()),
                    may_stream,
                };
                self.serve(&ev, body, &call).await
            }
            None => (answer::not_an_http_request(id), None),
        };
        Answered {
            front,
            resp: done.resp,
            summary: done.summary,
            deadline,
            request_id: id.to_owned(),
            live,
        }
    }

    /// The invocation's deadline and time budget. Misconfigured: nothing goes upstream, but
    /// the default deadline settings still make sense.
    fn deadline(
        &self,
        invocation: &Invocation,
        gateway: Option<(GatewayKind, Option<u64>)>,
        started: u64,
    ) -> Deadline {
        let settings = self
            .state
            .as_ref()
            .map_or_else(|_| DeadlineSettings::default(), |r| r.settings.deadline());
        Deadline::compute(invocation.deadline_ms, gateway, started, &settings)
    }

    fn warn_about_emulators(&self, deadline: &Deadline, invocation: &Invocation) {
        if deadline.lambda_deadline_replaced
            && !self.warned_lambda_deadline.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                lambda_deadline_ms = invocation.deadline_ms,
                budget_ms = deadline.budget_ms,
                "Lambda deadline is not a plausible epoch time (local emulator?); using FALLBACK_TIMEOUT_MS"
            );
        }
        if deadline.gateway_start_ignored
            && !self.warned_gateway_start.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                budget_ms = deadline.budget_ms,
                "gateway start time in the event is stale or in the future (sample event?); ignoring it"
            );
        }
    }

    /// One HTTP request: the I/O between the pure steps (admission, then the upstream run and
    /// its answer).
    async fn serve(
        &self,
        ev: &GatewayEvent,
        body: EventBody,
        call: &Call<'_>,
    ) -> (Answer, Option<upstreams::Committed>) {
        let (ready, admitted) = match self.admission(ev, body, call).await {
            Admission::Forward(ready, admitted) => (ready, admitted),
            Admission::Health(route) => return (answer::health(route.path, call.id), None),
            Admission::Refused(r) => return (answer::rejected(r, call.id), None),
        };
        match self.forward(ready, ev, admitted, call).await {
            Ok(done) => done,
            Err(r) => (answer::rejected(r, call.id), None),
        }
    }

    /// Route, configuration, the proxy tokens (perhaps from Secrets Manager), then the pure
    /// admission of the request.
    async fn admission(
        &self,
        ev: &GatewayEvent,
        body: EventBody,
        call: &Call<'_>,
    ) -> Admission<'_> {
        let route = match admit::route(ev) {
            Ok(route) => route,
            Err(r) => return Admission::Refused(r),
        };
        if route.kind == RouteKind::Health {
            return Admission::Health(route);
        }
        let config =
            |setting, problem: &str| Rejection::config(setting, problem).on(route.path, None);
        let ready = match &self.state {
            Ok(ready) => ready,
            Err(e) => return Admission::Refused(config(e.setting, &e.problem)),
        };
        let tokens = match self
            .secrets
            .proxy_tokens(&ready.settings.auth, call.within)
            .await
        {
            Ok(tokens) => tokens,
            Err(e) => return Admission::Refused(config(e.setting, &e.problem)),
        };
        match admit::admit(ev, body, route, &ready.settings, tokens.as_deref()) {
            Ok(admitted) => Admission::Forward(ready, admitted),
            Err(r) => Admission::Refused(r),
        }
    }

    /// The upstream list and keys (perhaps from Secrets Manager), the retry run over them, and
    /// its answer; the committed stream, if the run ended on one.
    async fn forward(
        &self,
        ready: &Ready,
        ev: &GatewayEvent,
        admitted: Admitted,
        call: &Call<'_>,
    ) -> Result<(Answer, Option<upstreams::Committed>), Rejection> {
        let settings = &ready.settings;
        let Admitted {
            route,
            model,
            stream,
            body,
        } = admitted;
        let on = |r: Rejection| r.on(route.path, model.clone());
        let config = |e: ConfigError| on(Rejection::config(e.setting, &e.problem));
        let list = self
            .upstream_list(ready, call.within)
            .await
            .map_err(config)?;
        admit::own_host(ev, &list, settings).map_err(on)?;
        let keys = self
            .upstream_keys(settings, &list, None, call.within)
            .await
            .map_err(config)?;
        let forward = ForwardRequest {
            method: route.method.clone(),
            path: route.path,
            body,
            content_type: ev.header("content-type").map(str::to_owned),
            idempotency_key: ev.header("idempotency-key").map(str::to_owned),
            client_request_id: call.id.to_owned(),
        };
        let routed = upstreams::Routed {
            route,
            forward: &forward,
            list: &list,
            models: model.as_deref().map(|m| settings.model_fallbacks.chain(m)),
            stream,
            live: (call.may_stream && stream && route.streams()).then(|| Mutex::new(None)),
        };
        let run = self
            .call_upstream(ready, &routed, keys.clone(), call.deadline)
            .await;
        if let RunOutcome::Unsendable { detail } = &run.outcome {
            tracing::error!(detail, "the request to the upstream could not be built");
        }
        if let Some(r) = admit::unsendable(&run, &forward, &list, &keys, settings) {
            return Err(on(r));
        }
        let committed =
            matches!(&run.outcome, RunOutcome::Answer(r) if (200..300).contains(&r.status));
        let live = committed.then(|| routed.take_live(&run)).flatten();
        let done = answer::ran(run, &routed, model, call.id, call.deadline.budget_ms);
        Ok((done, live))
    }
}
