//! Every real-world event shape AWS sends (the corpus in `tests/events/`: `sam local
//! generate-event` output and the fixtures of AWS's Rust runtime) through the real handler:
//! - **as it is**, it gets the answer `tests/events/expected.json` documents (a §5 error such as
//!   an unknown route, or the health check), in the response shape of its front door;
//! - **rewritten into an authorised chat completion** (path, method, bearer token, JSON body;
//!   everything else, such as cookies, authorizer contexts, stage prefixes, base64 flags and
//!   multi-value headers, kept), it is proxied to the simulator and comes back 200 in that
//!   shape.
//!
//! Front doors that cannot carry an HTTP request (WebSocket API events, authorizer inputs) are
//! checked as they are only.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use openai_lambda_proxy::Proxy;
use openai_simulator::Simulator;
use serde_json::{Map, Value, json};
use support::events::{bearer, invoke, invoke_within, proxy_for, request_id, simulator};
use support::logs;

const SERVER_KEY: &str = "sk-corpus-server-key-0123456789";
const CLIENT_TOKEN: &str = "corpus-client-token-abcdef";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/events")
}

/// `expected.json`: file (relative to `tests/events/`) → `{front, status, code}` and maybe
/// `message_contains`.
fn manifest() -> Map<String, Value> {
    let text = std::fs::read_to_string(corpus_dir().join("expected.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_object()
        .unwrap()
        .clone()
}

fn chat_request() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

/// The front doors, as `expected.json` names them, and the keys of their response object.
fn response_keys(front: &str) -> &'static [&'static str] {
    match front {
        // HTTP API payload 2.0 and function URLs; also what an unrecognised event gets.
        "http_api" | "function_url" | "none" => &[
            "body",
            "cookies",
            "headers",
            "isBase64Encoded",
            "statusCode",
        ],
        "rest" | "websocket" => &["body", "headers", "isBase64Encoded", "statusCode"],
        "alb" => &[
            "body",
            "headers",
            "isBase64Encoded",
            "statusCode",
            "statusDescription",
        ],
        "alb_multi" => &[
            "body",
            "isBase64Encoded",
            "multiValueHeaders",
            "statusCode",
            "statusDescription",
        ],
        other => panic!("unknown front {other:?} in expected.json"),
    }
}

/// The reason phrases of the statuses the corpus gets (RFC 9110).
fn reason_phrase(status: u64) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        502 => "Bad Gateway",
        other => panic!("add the reason phrase of {other}"),
    }
}

/// A response checked against its front door's shape, with its headers and body read out.
struct Answer {
    status: u64,
    headers: Map<String, Value>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn read_answer(front: &str, resp: &Value) -> Result<Answer, String> {
    let obj = resp.as_object().ok_or("not an object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != response_keys(front) {
        return Err(format!("keys {keys:?}, want {:?}", response_keys(front)));
    }
    let status = resp["statusCode"].as_u64().ok_or("statusCode")?;
    if front.starts_with("alb") {
        let want = format!("{status} {}", reason_phrase(status));
        if resp["statusDescription"] != json!(want) {
            return Err(format!("statusDescription {}", resp["statusDescription"]));
        }
    }
    let headers: Map<String, Value> = if front == "alb_multi" {
        let multi = resp["multiValueHeaders"].as_object().ok_or("mvh")?;
        let mut out = Map::new();
        for (k, v) in multi {
            match v.as_array().map(Vec::as_slice) {
                Some([one]) if one.is_string() => out.insert(k.clone(), one.clone()),
                _ => return Err(format!("multiValueHeaders[{k}] = {v}")),
            };
        }
        out
    } else {
        let h = resp["headers"].as_object().ok_or("headers")?;
        if !h.values().all(Value::is_string) {
            return Err("a header value is not a string".into());
        }
        h.clone()
    };
    let raw = resp["body"].as_str().ok_or("body")?;
    let body = match resp["isBase64Encoded"].as_bool().ok_or("isBase64Encoded")? {
        true => base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(|e| e.to_string())?,
        false => raw.as_bytes().to_vec(),
    };
    if obj.contains_key("cookies") && resp["cookies"] != json!([]) {
        return Err(format!("cookies {}", resp["cookies"]));
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// The event as it is: the documented status and code, in the right shape, no upstream call.
fn check_as_is(answer: &Answer, want: &Value) -> Result<(), String> {
    let (status, code) = (want["status"].as_u64().unwrap(), &want["code"]);
    if answer.status != status {
        return Err(format!(
            "status {}, want {status}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    if answer.header("x-lambda-request-id").is_none() {
        return Err("no x-lambda-request-id".into());
    }
    let body = answer.json();
    if code.is_null() {
        return match body == json!({"status": "ok"}) {
            true => Ok(()),
            false => Err(format!("body {body}")),
        };
    }
    let err = &body["error"];
    let shaped = err["message"].is_string()
        && err["type"].is_string()
        && err.get("param").is_some()
        && err["lambda_request_id"].is_string();
    if !shaped || &err["code"] != code {
        return Err(format!("error body {body}"));
    }
    if let Some(needle) = want["message_contains"].as_str()
        && !err["message"].as_str().unwrap_or("").contains(needle)
    {
        return Err(format!("message lacks {needle:?}: {body}"));
    }
    if answer.header("x-should-retry") != Some("false") {
        return Err("no x-should-retry: false".into());
    }
    Ok(())
}

/// Removes every header called `name` (any case) and sets it, in each header map the event
/// has (`headers`, `multiValueHeaders`), or in a new `headers` map if it has neither.
fn set_header(event: &mut Value, name: &str, value: &str) {
    let mut found = false;
    for (field, v) in [
        ("headers", json!(value)),
        ("multiValueHeaders", json!([value])),
    ] {
        if let Some(map) = event.get_mut(field).and_then(Value::as_object_mut) {
            map.retain(|k, _| !k.eq_ignore_ascii_case(name));
            map.insert(name.to_owned(), v);
            found = true;
        }
    }
    if !found {
        event["headers"] = json!({ name: value });
    }
}

/// The event turned into an authorised `POST /v1/chat/completions` with a JSON body, keeping
/// its stage prefix (`/Prod/…`) and its base64 flag.
fn rewrite(event: &Value, front: &str) -> Value {
    let mut e = event.clone();
    let ctx = &event["requestContext"];
    let body = chat_request().to_string();
    if front == "http_api" || front == "function_url" {
        let stage = ctx["stage"].as_str().unwrap_or("$default");
        let old = e["rawPath"].as_str().unwrap_or("");
        let prefix = match old.starts_with(&format!("/{stage}/")) {
            true => format!("/{stage}"),
            false => String::new(),
        };
        let path = format!("{prefix}/v1/chat/completions");
        e["rawPath"] = json!(path);
        e["requestContext"]["http"]["method"] = json!("POST");
        e["requestContext"]["http"]["path"] = json!(path);
    } else {
        e["path"] = json!("/v1/chat/completions");
        e["httpMethod"] = json!("POST");
        if ctx.get("httpMethod").is_some() {
            e["requestContext"]["httpMethod"] = json!("POST");
        }
    }
    set_header(&mut e, "Authorization", &bearer(CLIENT_TOKEN));
    set_header(&mut e, "Content-Type", "application/json");
    e["body"] = if event["isBase64Encoded"] == json!(true) {
        json!(base64::engine::general_purpose::STANDARD.encode(&body))
    } else {
        json!(body)
    };
    e
}

/// The rewritten event: 200 in the front door's shape, the simulator's completion, and exactly
/// one upstream request carrying the body and the server's key.
fn check_proxied(answer: &Answer, sim: &Simulator) -> Result<(), String> {
    let requests = sim.requests();
    if answer.status != 200 || answer.json()["object"] != "chat.completion" {
        return Err(format!(
            "status {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    if answer.header("x-upstream-attempts") != Some("1") || requests.len() != 1 {
        return Err(format!("{} upstream requests", requests.len()));
    }
    let r = &requests[0];
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    if r.path != "/v1/chat/completions" || body != chat_request() {
        return Err(format!("upstream got {} {body}", r.path));
    }
    if r.header("authorization") != Some(bearer(SERVER_KEY).as_str()) {
        return Err("upstream did not get the server's key".into());
    }
    Ok(())
}

async fn run_one(proxy: &Arc<Proxy>, sim: &Simulator, file: &str, want: &Value) -> Vec<String> {
    let text = std::fs::read_to_string(corpus_dir().join(file)).unwrap();
    let event: Value = serde_json::from_str(&text).unwrap();
    let front = want["front"].as_str().unwrap();
    let mut failures = Vec::new();

    sim.clear_requests();
    let (resp, _) = invoke(proxy, event.clone()).await;
    match read_answer(front, &resp).and_then(|a| check_as_is(&a, want)) {
        Ok(()) if sim.requests().is_empty() => {}
        Ok(()) => failures.push(format!("{file} as it is: called the upstream")),
        Err(e) => failures.push(format!("{file} as it is: {e}")),
    }
    if matches!(front, "websocket" | "none") {
        return failures;
    }
    sim.clear_requests();
    let (resp, _) = invoke(proxy, rewrite(&event, front)).await;
    if let Err(e) = read_answer(front, &resp).and_then(|a| check_proxied(&a, sim)) {
        failures.push(format!("{file} rewritten: {e}"));
    }
    failures
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_in_the_corpus_gets_the_right_answer_in_the_right_shape() {
    let _logs = logs::check(&[SERVER_KEY, CLIENT_TOKEN]);
    let sim = simulator().await;
    let proxy = proxy_for(
        &sim,
        &[
            ("OPENAI_API_KEY", SERVER_KEY),
            ("PROXY_API_KEYS", CLIENT_TOKEN),
            ("METRICS_BACKEND", "none"),
        ],
        None,
    );
    let manifest = manifest();
    let mut failures = Vec::new();
    for (file, want) in &manifest {
        failures.extend(run_one(&proxy, &sim, file, want).await);
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_corpus_file_is_in_the_manifest_and_every_front_door_is_covered() {
    let manifest = manifest();
    let mut files = Vec::new();
    for dir in [
        "sam",
        "aws-lambda-rust-runtime/lambda-events",
        "aws-lambda-rust-runtime/lambda-http",
    ] {
        for entry in std::fs::read_dir(corpus_dir().join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            files.push(format!("{dir}/{name}"));
        }
    }
    files.sort();
    let mut listed: Vec<String> = manifest.keys().cloned().collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "tests/events/expected.json must list every corpus file"
    );
    for front in [
        "http_api",
        "function_url",
        "rest",
        "alb",
        "alb_multi",
        "websocket",
        "none",
    ] {
        assert!(
            manifest.values().any(|w| w["front"] == front),
            "no {front} event in the corpus"
        );
    }
}

/// ALB: no gateway timeout of its own (spec §2, §4): the budget is the Lambda deadline minus the
/// margin, unless `GATEWAY_TIMEOUT_MS` is set.
#[tokio::test(flavor = "multi_thread")]
async fn an_alb_event_has_no_gateway_timeout_unless_one_is_set() {
    let logs = logs::check(&[SERVER_KEY, CLIENT_TOKEN]);
    let sim = simulator().await;
    let text = std::fs::read_to_string(corpus_dir().join("sam/alb-request.json")).unwrap();
    let event = rewrite(&serde_json::from_str(&text).unwrap(), "alb");
    for (gateway_timeout, budget) in [("", 50_000..=59_500), ("10000", 5_000..=9_500)] {
        let proxy = proxy_for(
            &sim,
            &[
                ("OPENAI_API_KEY", SERVER_KEY),
                ("PROXY_API_KEYS", CLIENT_TOKEN),
                ("METRICS_BACKEND", "none"),
                ("GATEWAY_TIMEOUT_MS", gateway_timeout),
            ],
            None,
        );
        let id = request_id("alb");
        let resp = invoke_within(&proxy, event.clone(), &id, 60_000).await;
        assert_eq!(resp["statusCode"], 200, "{resp}");
        let finished = logs.capture().lines_with(&id, "request finished").remove(0);
        let got = finished["budget_ms"].as_u64().unwrap();
        assert!(
            budget.contains(&got),
            "GATEWAY_TIMEOUT_MS={gateway_timeout:?}: {finished}"
        );
    }
}
