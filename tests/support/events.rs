//! The OpenAI simulator, gateway events, proxies built from settings pairs, and checks of the
//! §5 answer shape.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use openai_lambda_proxy::config::Settings;
use openai_lambda_proxy::retry::Clock;
use openai_lambda_proxy::secrets::Secrets;
use openai_lambda_proxy::telemetry::metrics::NoMetrics;
use openai_lambda_proxy::{Invocation, Proxy};
use openai_simulator::Simulator;
use serde_json::{Map, Value, json};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A fresh OpenAI simulator on an ephemeral port of 127.0.0.1.
pub async fn simulator() -> Simulator {
    Simulator::start(0).await.expect("start the simulator")
}

/// A proxy from `KEY=value` pairs (nothing from the process environment; when a key repeats, the
/// later pair wins), with an optional Secrets Manager client.
pub fn proxy(pairs: &[(&str, &str)], sm: Option<aws_sdk_secretsmanager::Client>) -> Arc<Proxy> {
    proxy_with(pairs, Secrets::new(sm))
}

/// [`proxy`] with these secrets (e.g. ones on a [`VirtualClock`]).
pub fn proxy_with(pairs: &[(&str, &str)], secrets: Secrets) -> Arc<Proxy> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Arc::new(Proxy::new(
        Settings::from_lookup(|k| map.get(k).cloned()),
        secrets,
        Box::new(NoMetrics),
    ))
}

/// A clock the test moves by hand (epoch ms), for the decisions that take one.
#[derive(Debug)]
pub struct VirtualClock(AtomicU64);

impl VirtualClock {
    /// Starts at the real time, so epoch-based checks still see a plausible one.
    pub fn new() -> Arc<VirtualClock> {
        Arc::new(VirtualClock(AtomicU64::new(now_ms())))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A proxy whose upstream is `sim`, from `pairs` after `OPENAI_BASE_URL` (so they may override
/// it), with an optional Secrets Manager client.
pub fn proxy_for(
    sim: &Simulator,
    pairs: &[(&str, &str)],
    sm: Option<aws_sdk_secretsmanager::Client>,
) -> Arc<Proxy> {
    proxy_for_with(sim, pairs, Secrets::new(sm))
}

/// [`proxy_for`] with these secrets.
pub fn proxy_for_with(sim: &Simulator, pairs: &[(&str, &str)], secrets: Secrets) -> Arc<Proxy> {
    let base = sim.base_url();
    proxy_with(
        &[&[("OPENAI_BASE_URL", base.as_str())][..], pairs].concat(),
        secrets,
    )
}

/// A unique Lambda request id with a prefix naming the test.
pub fn request_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs one event through the handler with a real-looking Lambda deadline `budget_ms` ahead.
pub async fn invoke_within(proxy: &Arc<Proxy>, event: Value, id: &str, budget_ms: u64) -> Value {
    let invocation = Invocation {
        request_id: id.to_owned(),
        deadline_ms: now_ms() + budget_ms,
    };
    proxy.handle_event(event, invocation).await
}

/// A buffered answer as a caller sees it, with how long it took.
pub struct Answer {
    pub status: u16,
    pub headers: Map<String, Value>,
    pub body: String,
    /// From the call of the handler to its answer.
    pub elapsed_ms: u64,
    /// From the event's gateway start time (`timeEpoch` / `requestTimeEpoch`), the clock the
    /// deadline counts from, to the answer.
    pub since_gateway_ms: u64,
    pub request_id: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
}

/// Runs one event (request id `<prefix>-N`) with a Lambda deadline `lambda_ms` from now.
pub async fn answer_within(
    proxy: &Arc<Proxy>,
    event: Value,
    prefix: &str,
    lambda_ms: u64,
) -> Answer {
    let request_id = request_id(prefix);
    let context = &event["requestContext"];
    let gateway_start = context["timeEpoch"]
        .as_u64()
        .or(context["requestTimeEpoch"].as_u64())
        .unwrap_or_else(now_ms);
    let started = std::time::Instant::now();
    let out = invoke_within(proxy, event, &request_id, lambda_ms).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    Answer {
        status: status(&out) as u16,
        headers: out["headers"].as_object().cloned().unwrap_or_default(),
        body: out["body"].as_str().unwrap_or_default().to_owned(),
        elapsed_ms,
        since_gateway_ms: now_ms().saturating_sub(gateway_start),
        request_id,
    }
}

/// Runs one event with a 20 s Lambda deadline; returns the response and the request id used.
pub async fn invoke(proxy: &Arc<Proxy>, event: Value) -> (Value, String) {
    let id = request_id("req");
    let resp = invoke_within(proxy, event, &id, 20_000).await;
    (resp, id)
}

fn header_map(headers: &[(&str, &str)]) -> Map<String, Value> {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect()
}

/// An API Gateway HTTP API (payload 2.0) event.
pub fn v2(method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Value {
    json!({
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
        "headers": header_map(headers),
        "requestContext": {
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.24"},
            "requestId": "gw-req", "stage": "$default", "timeEpoch": now_ms(),
        },
        "body": body, "isBase64Encoded": false,
    })
}

/// An API Gateway REST API (payload 1.0) event.
pub fn v1(method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Value {
    let multi: Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!([v])))
        .collect();
    json!({
        "resource": path, "path": path, "httpMethod": method,
        "headers": header_map(headers), "multiValueHeaders": multi,
        "requestContext": {"stage": "prod", "requestId": "gw-req", "requestTimeEpoch": now_ms(), "path": format!("/prod{path}")},
        "body": body, "isBase64Encoded": false,
    })
}

/// A Lambda function URL event.
pub fn function_url(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Value {
    let mut e = v2(method, path, headers, body);
    e["requestContext"]["domainName"] = json!("xyz.lambda-url.us-east-1.on.aws");
    e
}

/// The event with its body base64-encoded (as gateways send binary bodies).
pub fn base64_body(mut event: Value) -> Value {
    if let Some(body) = event["body"].as_str() {
        event["body"] = json!(base64::engine::general_purpose::STANDARD.encode(body));
        event["isBase64Encoded"] = json!(true);
    }
    event
}

/// A chat completion request for `model`.
pub fn chat_body(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]}).to_string()
}

/// The value of an `Authorization` header carrying `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A v2 `POST /v1/chat/completions` event with a JSON content type, this `body` and, if given,
/// this `authorization` header value.
pub fn chat_event_with_body(authorization: Option<&str>, body: &str) -> Value {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(authorization.map(|a| ("authorization", a)));
    v2("POST", "/v1/chat/completions", &headers, Some(body))
}

/// [`chat_event_with_body`] with a chat request for `gpt-4o-mini`.
pub fn chat_event(authorization: Option<&str>) -> Value {
    chat_event_with_body(authorization, &chat_body("gpt-4o-mini"))
}

pub fn status(resp: &Value) -> u64 {
    resp["statusCode"].as_u64().expect("statusCode")
}

pub fn header<'a>(resp: &'a Value, name: &str) -> Option<&'a str> {
    resp["headers"]
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))?
        .1
        .as_str()
}

/// The decoded body of a response.
pub fn body(resp: &Value) -> Vec<u8> {
    let raw = resp["body"].as_str().expect("body is a string");
    if resp["isBase64Encoded"] == json!(true) {
        base64::engine::general_purpose::STANDARD
            .decode(raw)
            .expect("base64 body")
    } else {
        raw.as_bytes().to_vec()
    }
}

/// Checks the gateway response object: integer status, string headers, string body, boolean
/// `isBase64Encoded`, `x-lambda-request-id`.
pub fn assert_response_object(resp: &Value) {
    let status = resp["statusCode"]
        .as_u64()
        .unwrap_or_else(|| panic!("no statusCode: {resp}"));
    assert!((100..=599).contains(&status), "status {status}");
    let headers = resp["headers"]
        .as_object()
        .unwrap_or_else(|| panic!("no headers: {resp}"));
    assert!(
        headers.values().all(Value::is_string),
        "non-string header: {resp}"
    );
    assert!(resp["body"].is_string(), "body not a string");
    assert!(
        resp["isBase64Encoded"].is_boolean(),
        "isBase64Encoded not a bool"
    );
    assert!(
        header(resp, "x-lambda-request-id").is_some(),
        "no x-lambda-request-id"
    );
}

/// The §5 error of a response: (status, code, message). Panics unless the body has OpenAI's
/// error shape (`error.message`, `error.type`, `error.param`, `error.code`) and
/// `error.lambda_request_id`.
pub fn error_of(resp: &Value) -> (u64, String, String) {
    assert_response_object(resp);
    let v: Value = serde_json::from_slice(&body(resp))
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {resp}"));
    let err = &v["error"];
    let message = err["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {v}"));
    assert!(err["type"].is_string(), "no error.type: {v}");
    assert!(err.get("param").is_some(), "no error.param: {v}");
    let code = err["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code: {v}"));
    assert!(
        err["lambda_request_id"].is_string(),
        "no error.lambda_request_id: {v}"
    );
    (status(resp), code.to_owned(), message.to_owned())
}

/// Asserts a §5 error with this status and code; returns the message.
pub fn assert_error(resp: &Value, status: u64, code: &str) -> String {
    let (s, c, m) = error_of(resp);
    assert_eq!((s, c.as_str()), (status, code), "unexpected answer: {m}");
    m
}

/// [`assert_error`], and the message must contain `needle` (e.g. the setting to fix); returns
/// the message.
pub fn assert_error_naming(resp: &Value, status: u64, code: &str, needle: &str) -> String {
    let m = assert_error(resp, status, code);
    assert!(m.contains(needle), "{m}");
    m
}
