//! Admission (spec §2, §5, §7): event + route + settings → [`Admitted`] or a [`Rejection`].
//! Pure: the proxy tokens and the upstream list it checks against are read by the caller
//! (`serve`), so the order of the checks, and which of them may need Secrets Manager, is visible
//! there.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::request::{BodyError, EventBody, GatewayEvent};
use super::response::ErrorCode;
use super::routes::{self, Route};
use crate::auth;
use crate::config::{self, DEFAULT_UPSTREAM, KeySource, Settings};
use crate::deadline::GatewayKind;
use crate::retry::{RetryRun, RunOutcome};
use crate::upstream::{ForwardRequest, UnsendablePart, UpstreamClient};
use crate::upstreams::{UpstreamSpec, UpstreamsSource};

/// The routes, for messages.
pub(super) const SERVED: &str = "POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/moderations, GET /v1/models and GET /health";

/// A request refused before (or instead of) its upstream run: its §5 code and message, and
/// what the `request finished` line knows of it so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// The `route` log field (`unknown` before a route matched).
    pub route: &'static str,
    pub model: Option<String>,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
            allow: None,
            route: "unknown",
            model: None,
        }
    }

    /// 500 `config_error`: the message names the setting and the problem, never a value or an
    /// AWS error text.
    pub fn config(setting: &str, problem: &str) -> Rejection {
        let message = format!(
            "The proxy is misconfigured: {setting} {problem}. The operator must fix the function's configuration."
        );
        Rejection::new(ErrorCode::ConfigError, message)
    }

    /// The same, for a request on `route` asking for `model`.
    pub fn on(self, route: &'static str, model: Option<String>) -> Rejection {
        Rejection {
            route,
            model,
            ..self
        }
    }
}

/// What admission lets through to the upstream run.
#[derive(Debug)]
pub(super) struct Admitted {
    pub route: &'static Route,
    /// The body's `model`, if it names one.
    pub model: Option<String>,
    /// The body asks for `"stream": true`.
    pub stream: bool,
    /// The decoded body; empty for a `GET`.
    pub body: Bytes,
}

/// The route of an event (spec §2): WebSocket events, unknown paths and wrong methods are
/// refused. `/health` is a route like the others; the caller answers it.
pub(super) fn route(ev: &GatewayEvent) -> Result<&'static Route, Rejection> {
    if ev.kind == GatewayKind::WebSocket {
        let message = format!(
            "WebSocket API routes are not served by this proxy (route {}). It answers HTTP requests from API Gateway, a Lambda function URL or an Application Load Balancer: {SERVED}.",
            printable(&ev.path)
        );
        return Err(Rejection::new(ErrorCode::NotFound, message));
    }
    let Some(route) = routes::find(&ev.path) else {
        let message = format!(
            "Unknown route {} {}. This proxy serves {SERVED}.",
            printable(&ev.method),
            printable(&ev.path)
        );
        return Err(Rejection::new(ErrorCode::NotFound, message));
    };
    if route.method != ev.method.as_str() {
        let message = format!(
            "Method {} is not allowed on {}; use {}.",
            printable(&ev.method),
            route.path,
            route.method
        );
        let rejection = Rejection {
            allow: Some(route.method.as_str()),
            ..Rejection::new(ErrorCode::MethodNotAllowed, message)
        };
        return Err(rejection.on(route.path, None));
    }
    Ok(route)
}

/// Auth, size, JSON, model and forwarded headers (spec §5, §7), in that order. `tokens`: the
/// proxy tokens, `None` when `AUTH_MODE=none`.
pub(super) fn admit(
    ev: &GatewayEvent,
    body: EventBody,
    route: &'static Route,
    settings: &Settings,
    tokens: Option<&[String]>,
) -> Result<Admitted, Rejection> {
    let here = |r: Rejection| r.on(route.path, None);
    authorize(ev, tokens).map_err(here)?;
    let body = decode(body, settings.max_body_bytes).map_err(here)?;
    let (model, stream) = if route.method == http::Method::POST {
        read_json(&body, route, settings)?
    } else {
        (None, false)
    };
    // A value reqwest cannot put in a header would fail every attempt before it is sent.
    for (name, shown) in [
        ("content-type", "Content-Type"),
        ("idempotency-key", "Idempotency-Key"),
    ] {
        if ev.header(name).is_some_and(|v| !forwardable(v)) {
            let message = format!("Header `{shown}` holds control characters.");
            return Err(Rejection::new(ErrorCode::InvalidRequest, message).on(route.path, model));
        }
    }
    let body = if route.method == http::Method::POST {
        Bytes::from(body)
    } else {
        Bytes::new()
    };
    Ok(Admitted {
        route,
        model,
        stream,
        body,
    })
}

/// The client's `Authorization: Bearer` token against the proxy tokens (constant time).
fn authorize(ev: &GatewayEvent, tokens: Option<&[String]>) -> Result<(), Rejection> {
    let Some(tokens) = tokens else {
        return Ok(());
    };
    match auth::bearer_token(ev.header("authorization")) {
        None => Err(Rejection::new(
            ErrorCode::Unauthorized,
            "Missing client token: send `Authorization: Bearer <proxy token>` (the proxy's token, not an OpenAI key).",
        )),
        Some(token) if !auth::token_matches(token, tokens) => Err(Rejection::new(
            ErrorCode::Unauthorized,
            "Invalid client token.",
        )),
        Some(_) => Ok(()),
    }
}

/// The body, base64-decoded if the event says so, within `MAX_BODY_BYTES`.
fn decode(body: EventBody, max_body_bytes: usize) -> Result<Vec<u8>, Rejection> {
    body.decode(max_body_bytes).map_err(|e| match e {
        BodyError::TooLarge => Rejection::new(
            ErrorCode::PayloadTooLarge,
            format!("Request body is larger than MAX_BODY_BYTES ({max_body_bytes} bytes)."),
        ),
        BodyError::BadBase64 => Rejection::new(
            ErrorCode::InvalidRequest,
            "Request body is marked base64 but is not valid base64.",
        ),
    })
}

/// A `POST` body: a JSON object, with a string `model` where the route needs one, allowed by
/// `ALLOWED_MODELS`. Gives the model and whether `"stream": true`.
fn read_json(
    body: &[u8],
    route: &'static Route,
    settings: &Settings,
) -> Result<(Option<String>, bool), Rejection> {
    let reject = |code, message: String| Err(Rejection::new(code, message).on(route.path, None));
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let message = format!("Request body is not valid JSON ({}).", json_error(&e));
            return reject(ErrorCode::InvalidJson, message);
        }
    };
    let Some(object) = value.as_object() else {
        return reject(
            ErrorCode::InvalidRequest,
            "Request body must be a JSON object.".into(),
        );
    };
    let stream = object.get("stream") == Some(&Value::Bool(true));
    let model_required = matches!(
        route.kind,
        routes::RouteKind::Forward {
            model_required: true
        }
    );
    let model = match object.get("model") {
        Some(Value::String(m)) => Some(m.clone()),
        None if !model_required => None,
        None => {
            let message = "Missing required parameter: `model`.";
            return reject(ErrorCode::InvalidRequest, message.into());
        }
        Some(_) => {
            let message = "Parameter `model` must be a string.";
            return reject(ErrorCode::InvalidRequest, message.into());
        }
    };
    if let (Some(allow), Some(m)) = (&settings.allowed_models, &model)
        && !allow.allows(m)
    {
        let message = format!(
            "Model `{}` is not allowed by this proxy (ALLOWED_MODELS).",
            printable(m)
        );
        return Err(Rejection::new(ErrorCode::ModelNotAllowed, message).on(route.path, model));
    }
    Ok((model, stream))
}

/// An upstream whose URL is the host this request arrived on would call the function again,
/// forever: a configuration error that names the setting.
pub(super) fn own_host(
    ev: &GatewayEvent,
    list: &[UpstreamSpec],
    settings: &Settings,
) -> Result<(), Rejection> {
    let Some(host) = ev.header("host") else {
        return Ok(());
    };
    let Some(own) = list.iter().find(|u| config::is_own_host(&u.base_url, host)) else {
        return Ok(());
    };
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
    Err(Rejection::config(setting, &problem))
}

/// After a run whose request could not be built (nothing was sent or retried): the
/// configuration error naming the setting at fault, if one is (else it is a bug).
pub(super) fn unsendable(
    run: &RetryRun,
    forward: &ForwardRequest,
    list: &[UpstreamSpec],
    keys: &[Arc<str>],
    settings: &Settings,
) -> Option<Rejection> {
    if !matches!(run.outcome, RunOutcome::Unsendable { .. }) {
        return None;
    }
    let i = run.attempts.last()?.target.upstream;
    let (spec, key) = (list.get(i)?, keys.get(i)?);
    let part = UpstreamClient::unsendable_part(forward, spec, key)?;
    let setting = unsendable_setting(settings, spec, part);
    let problem = "holds a value that cannot be sent in an HTTP request";
    Some(Rejection::config(&setting, problem))
}

/// The setting that holds the part of a request that could not be built: the §7 setting for
/// the default upstream, else the upstream's field in `UPSTREAMS`.
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

    fn event(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> GatewayEvent {
        GatewayEvent {
            kind: GatewayKind::HttpApiV2,
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            multi_value_headers: false,
            body: Some(body.into()),
            is_base64: false,
            start_ms: None,
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        Settings::from_lookup(|k| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap()
    }

    /// Admission of `ev` on its route against the token `tok`, with `MAX_BODY_BYTES=64` and
    /// `ALLOWED_MODELS=gpt-4o*`.
    fn admit_event(ev: &GatewayEvent) -> Result<Admitted, Rejection> {
        let s = settings(&[
            ("OPENAI_API_KEY", "sk-test"),
            ("PROXY_API_KEYS", "tok"),
            ("MAX_BODY_BYTES", "64"),
            ("ALLOWED_MODELS", "gpt-4o*"),
        ]);
        let route = route(ev).unwrap();
        let body = EventBody {
            raw: ev.body.clone(),
            is_base64: false,
        };
        admit(ev, body, route, &s, Some(&["tok".to_owned()]))
    }

    #[test]
    fn routing_refuses_websocket_events_unknown_paths_and_wrong_methods() {
        let ws = GatewayEvent {
            kind: GatewayKind::WebSocket,
            ..event("MESSAGE", "$default", &[], "")
        };
        let r = route(&ws).unwrap_err();
        assert_eq!((r.code, r.route), (ErrorCode::NotFound, "unknown"));
        let r = route(&event("POST", "/v1/images/generations", &[], "")).unwrap_err();
        assert_eq!((r.code, r.route), (ErrorCode::NotFound, "unknown"));
        let r = route(&event("GET", "/v1/chat/completions", &[], "")).unwrap_err();
        assert_eq!(r.code, ErrorCode::MethodNotAllowed);
        assert_eq!((r.allow, r.route), (Some("POST"), "/chat/completions"));
        assert!(r.message.contains("use POST"), "{}", r.message);
        // Methods compare exactly, as the gateways send them (upper case).
        let r = route(&event("post", "/v1/chat/completions", &[], "")).unwrap_err();
        assert_eq!(r.code, ErrorCode::MethodNotAllowed);
        assert_eq!(
            route(&event("GET", "/prod/v1/models", &[], ""))
                .unwrap()
                .path,
            "/models"
        );
    }

    #[test]
    fn admission_checks_the_token_then_the_size_then_the_json_and_the_model() {
        let chat = |headers: &[(&str, &str)], body: &str| {
            admit_event(&event("POST", "/v1/chat/completions", headers, body))
        };
        let auth = [("authorization", "Bearer tok")];
        let too_big = format!(r#"{{"model":"gpt-4o","x":"{}"}}"#, "a".repeat(100));
        // No token: 401 even for a body that is too large and not JSON.
        let code = |r: Result<Admitted, Rejection>| r.unwrap_err().code;
        assert_eq!(code(chat(&[], &too_big)), ErrorCode::Unauthorized);
        let wrong = [("authorization", "Bearer nope")];
        assert_eq!(code(chat(&wrong, "{")), ErrorCode::Unauthorized);
        assert_eq!(code(chat(&auth, &too_big)), ErrorCode::PayloadTooLarge);
        assert_eq!(code(chat(&auth, "{")), ErrorCode::InvalidJson);
        assert_eq!(code(chat(&auth, "[]")), ErrorCode::InvalidRequest);
        assert_eq!(code(chat(&auth, "{}")), ErrorCode::InvalidRequest);
        assert_eq!(
            code(chat(&auth, r#"{"model":1}"#)),
            ErrorCode::InvalidRequest
        );
        let refused = chat(&auth, r#"{"model":"o1"}"#).unwrap_err();
        assert_eq!(refused.code, ErrorCode::ModelNotAllowed);
        assert_eq!(
            (refused.route, refused.model.as_deref()),
            ("/chat/completions", Some("o1"))
        );
        let bad_header = [
            ("authorization", "Bearer tok"),
            ("idempotency-key", "a\u{1}b"),
        ];
        let r = chat(&bad_header, r#"{"model":"gpt-4o"}"#).unwrap_err();
        assert_eq!(
            (r.code, r.model.as_deref()),
            (ErrorCode::InvalidRequest, Some("gpt-4o"))
        );

        let ok = chat(&auth, r#"{"model":"gpt-4o-mini","stream":true}"#).unwrap();
        assert_eq!(
            (ok.route.path, ok.model.as_deref()),
            ("/chat/completions", Some("gpt-4o-mini"))
        );
        assert!(ok.stream);
        assert_eq!(ok.body, r#"{"model":"gpt-4o-mini","stream":true}"#);
        // No model needed on moderations; a GET forwards no body.
        let moderation = event("POST", "/v1/moderations", &auth, r#"{"input":"x"}"#);
        assert_eq!(admit_event(&moderation).unwrap().model, None);
        let models = admit_event(&event("GET", "/v1/models", &auth, "ignored")).unwrap();
        assert!(models.body.is_empty() && !models.stream);
    }

    #[test]
    fn config_errors_name_the_setting_never_a_value() {
        let r = Rejection::config("OPENAI_BASE_URL", "is not a URL").on("/models", None);
        assert_eq!((r.code, r.route), (ErrorCode::ConfigError, "/models"));
        assert_eq!(
            r.message,
            "The proxy is misconfigured: OPENAI_BASE_URL is not a URL. The operator must fix the function's configuration."
        );
    }
}
