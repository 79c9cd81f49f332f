//! Hostile input, property-based: arbitrary bytes as bodies, arbitrary header names and values,
//! arbitrary JSON as the Lambda event (valid and broken API Gateway shapes), huge and deeply
//! nested bodies. The handler must never panic, never hang (each case is bounded by a timeout)
//! and always answer with a gateway response object whose body is a §5 error or an upstream
//! answer passed through. The upstream (the simulator) is healthy throughout, so a 502/504
//! would mean the proxy broke a request on its own.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use openai_lambda_proxy::Proxy;
use openai_simulator::Simulator;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use support::events::{
    assert_error, assert_response_object, base64_body, bearer, body, chat_body,
    chat_event_with_body, function_url, invoke, proxy_for, simulator, status, v1, v2,
};
use support::logs;

const SERVER_KEY: &str = "sk-hostile-server-key-000001";
const TOKEN: &str = "tok-hostile-client-00000001";
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

struct World {
    rt: tokio::runtime::Runtime,
    _sim: Simulator,
    proxy: Arc<Proxy>,
}

/// One runtime, simulator and proxy for every case of this binary.
fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sim = rt.block_on(simulator());
        let proxy = make_proxy(&sim, &[]);
        World {
            rt,
            _sim: sim,
            proxy,
        }
    })
}

fn make_proxy(sim: &Simulator, extra: &[(&str, &str)]) -> Arc<Proxy> {
    let defaults = [
        ("OPENAI_API_KEY", SERVER_KEY),
        ("PROXY_API_KEYS", TOKEN),
        // Short backoff: if the proxy ever retried a request it broke itself, the case stays fast
        // and the 502 shows up in the checks below.
        ("RETRY_BASE_DELAY_MS", "10"),
        ("RETRY_MAX_DELAY_MS", "20"),
        ("METRICS_BACKEND", "none"),
    ];
    proxy_for(sim, &[&defaults[..], extra].concat(), None)
}

/// Runs one event on the shared runtime, bounded by [`CASE_TIMEOUT`].
fn run_with(proxy: &Arc<Proxy>, event: Value) -> Value {
    let w = world();
    w.rt.block_on(async {
        tokio::time::timeout(CASE_TIMEOUT, invoke(proxy, event))
            .await
            .expect("the handler did not answer within the case timeout")
            .0
    })
}

/// A simulator and proxy of its own, for a test that counts upstream requests.
fn own_upstream(extra: &[(&str, &str)]) -> (Simulator, Arc<Proxy>) {
    let sim = world().rt.block_on(simulator());
    let proxy = make_proxy(&sim, extra);
    (sim, proxy)
}

fn run(event: Value) -> Value {
    run_with(&world().proxy, event)
}

/// The invariant: a well-formed response object; an error is a §5 error from the function (never
/// `internal_error`, which means a panic) or an OpenAI-shaped error passed through from the
/// upstream; the healthy upstream is never reported as failing.
fn check(resp: &Value) -> Result<(), TestCaseError> {
    assert_response_object(resp);
    let status = status(resp);
    prop_assert!(
        status != 502 && status != 504,
        "proxy-made upstream failure: {resp}"
    );
    if status >= 400 {
        let v: Value = serde_json::from_slice(&body(resp))
            .map_err(|e| TestCaseError::fail(format!("error body is not JSON ({e}): {resp}")))?;
        let err = &v["error"];
        prop_assert!(err["message"].is_string(), "no error.message: {v}");
        prop_assert!(err["type"].is_string(), "no error.type: {v}");
        if err.get("lambda_request_id").is_some() {
            let code = err["code"].as_str().unwrap_or("");
            prop_assert!(!code.is_empty(), "no error.code: {v}");
            prop_assert_ne!(code, "internal_error", "the handler failed: {}", v);
            prop_assert!(err.get("param").is_some(), "no error.param: {v}");
        }
    }
    Ok(())
}

fn auth() -> String {
    bearer(TOKEN)
}

const PATHS: [&str; 10] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/models",
    "/health",
    "/prod/v1/chat/completions",
    "/v1/images/generations",
    "",
];

fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(&PATHS[..]).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn any_method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("POST".to_owned()),
        2 => Just("GET".to_owned()),
        1 => "[A-Za-z]{0,8}",
        1 => any::<String>(),
    ]
}

/// Arbitrary JSON, depth-limited (the Lambda runtime's parser refuses deeper events anyway).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::from),
        proptest::sample::select(&PATHS[..]).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(("[a-zA-Z_]{0,12}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A body event of any gateway shape; bytes that are not UTF-8 go base64-encoded.
fn body_event(shape: u8, method: &str, path: &str, headers: &[(&str, &str)], raw: &[u8]) -> Value {
    let (text, b64) = match (std::str::from_utf8(raw), shape.is_multiple_of(2)) {
        (Ok(s), false) => (s.to_owned(), false),
        _ => (base64::engine::general_purpose::STANDARD.encode(raw), true),
    };
    let mut e = match shape % 3 {
        0 => v2(method, path, headers, Some(&text)),
        1 => v1(method, path, headers, Some(&text)),
        _ => function_url(method, path, headers, Some(&text)),
    };
    e["isBase64Encoded"] = json!(b64);
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bodies(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<String>().prop_map(String::into_bytes),
            any_json().prop_map(|v| v.to_string().into_bytes()),
            (any_json(), "[a-z0-9.-]{0,20}").prop_map(|(v, m)| {
                json!({"model": m, "messages": [], "extra": v}).to_string().into_bytes()
            }),
        ],
        shape in any::<u8>(),
        method in any_method(),
        path in any_path(),
        with_token in proptest::bool::weighted(0.9),
    ) {
        let _logs = logs::check(&[SERVER_KEY, TOKEN]);
        let token = auth();
        let headers: Vec<(&str, &str)> = if with_token {
            vec![("authorization", &token), ("content-type", "application/json")]
        } else {
            vec![]
        };
        let resp = run(body_event(shape, &method, &path, &headers, &raw));
        check(&resp)?;
    }

    #[test]
    fn arbitrary_headers(
        headers in proptest::collection::vec(
            (
                prop_oneof![
                    3 => proptest::sample::select(&[
                        "authorization", "Authorization", "content-type", "Content-Type",
                        "idempotency-key", "Idempotency-Key", "openai-organization",
                        "cookie", "x-api-key", "x-forwarded-for", "host", "content-length",
                    ][..]).prop_map(str::to_owned),
                    2 => any::<String>(),
                ],
                prop_oneof![any::<String>(), "[ -~]{0,40}", "[\\x00-\\x1f\\x7f a-z\\u{80}-\\u{10ffff}]{0,12}", Just(auth())],
            ),
            0..8,
        ),
        shape in 0u8..3,
        multi in any::<bool>(),
    ) {
        let _logs = logs::check(&[SERVER_KEY, TOKEN]);
        let token = auth();
        let mut h = vec![("authorization", token.as_str())];
        h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut event = body_event(shape * 2 + 1, "POST", "/v1/chat/completions", &h, chat_body("gpt-4o-mini").as_bytes());
        if multi && shape == 1 {
            // REST v1: multi-value headers with arbitrary values too.
            let mv: Map<String, Value> = headers.iter().map(|(k, v)| (k.clone(), json!([v, v]))).collect();
            event["multiValueHeaders"] = Value::Object(mv);
        }
        let resp = run(event);
        check(&resp)?;
    }

    #[test]
    fn arbitrary_json_events(event in any_json()) {
        let _logs = logs::check(&[SERVER_KEY, TOKEN]);
        let resp = run(event);
        check(&resp)?;
    }

    #[test]
    fn broken_gateway_shapes(
        shape in 0u8..3,
        edits in proptest::collection::vec(
            (
                proptest::sample::select(&[
                    "version", "rawPath", "requestContext", "requestContext.http",
                    "requestContext.http.method", "requestContext.http.path",
                    "requestContext.timeEpoch", "requestContext.requestTimeEpoch",
                    "requestContext.domainName", "headers", "multiValueHeaders", "body",
                    "isBase64Encoded", "httpMethod", "path", "headers.authorization",
                    "headers.content-type", "headers.idempotency-key", "cookies",
                ][..]),
                proptest::option::weighted(0.8, any_json()),
            ),
            1..4,
        ),
    ) {
        let _logs = logs::check(&[SERVER_KEY, TOKEN]);
        let token = auth();
        let headers = [("authorization", token.as_str())];
        let body = chat_body("gpt-4o-mini");
        let mut event = match shape {
            0 => v2("POST", "/v1/chat/completions", &headers, Some(&body)),
            1 => v1("POST", "/v1/chat/completions", &headers, Some(&body)),
            _ => function_url("POST", "/v1/chat/completions", &headers, Some(&body)),
        };
        for (path, value) in edits {
            edit(&mut event, path, value);
        }
        let resp = run(event);
        check(&resp)?;
    }
}

/// Sets (or with `None` removes) the field at a dotted path, creating objects on the way.
fn edit(event: &mut Value, path: &str, value: Option<Value>) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap();
    let mut at = event;
    for p in parts {
        if !at.is_object() {
            return;
        }
        at = at
            .as_object_mut()
            .unwrap()
            .entry(p)
            .or_insert_with(|| json!({}));
    }
    if let Some(obj) = at.as_object_mut() {
        match value {
            Some(v) => obj.insert(last.to_owned(), v),
            None => obj.remove(last),
        };
    }
}

fn chat_event(body: &str, b64: bool) -> Value {
    let e = chat_event_with_body(Some(&auth()), body);
    if b64 { base64_body(e) } else { e }
}

/// ~5 MB of valid chat JSON.
fn huge_chat_body() -> String {
    let filler = "lorem ipsum ".repeat(5 * 1024 * 1024 / 12);
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": filler}]}).to_string()
}

#[test]
fn huge_bodies_are_refused_by_default_and_pass_when_allowed() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN]);
    let huge = huge_chat_body();
    assert!(huge.len() > 5_000_000);
    let garbage: String = "{\"model\": \"m\", ".repeat(5 * 1024 * 1024 / 15);
    for b64 in [false, true] {
        let resp = run(chat_event(&huge, b64));
        assert_error(&resp, 413, "payload_too_large");
        let resp = run(chat_event(&garbage, b64));
        assert_error(&resp, 413, "payload_too_large");
    }

    let (sim, roomy) = own_upstream(&[("MAX_BODY_BYTES", "6000000")]);
    let resp = run_with(&roomy, chat_event(&huge, false));
    assert_eq!(status(&resp), 200, "{}", &resp.to_string()[..300]);
    let resp = run_with(&roomy, chat_event(&huge, true));
    assert_eq!(status(&resp), 200);
    let resp = run_with(&roomy, chat_event(&garbage, false));
    assert_error(&resp, 400, "invalid_json");
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs.iter().all(|r| r.body == huge.as_bytes()));
}

#[test]
fn deeply_nested_bodies_are_invalid_json_not_a_stack_overflow() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN]);
    let depth = 100_000;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let inside = format!("{{\"model\":\"gpt-4o-mini\",\"x\":{arrays}}}");
    let unclosed = "[{\"a\":".repeat(depth);
    for body in [&arrays, &objects, &inside, &unclosed] {
        for b64 in [false, true] {
            let resp = run(chat_event(body, b64));
            assert_error(&resp, 400, "invalid_json");
        }
    }
    // Moderately nested JSON that is valid goes through untouched.
    let ok = format!(
        "{{\"model\":\"gpt-4o-mini\",\"x\":{}{}}}",
        "[".repeat(100),
        "]".repeat(100)
    );
    assert_eq!(status(&run(chat_event(&ok, false))), 200);
}

#[test]
fn client_headers_that_cannot_be_forwarded_are_refused_at_once() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN]);
    let (sim, p) = own_upstream(&[]);
    let token = auth();
    for (name, value) in [
        ("idempotency-key", "idem\r\nx-injected: 1"),
        ("idempotency-key", "idem\u{0}"),
        ("Content-Type", "application/json\n"),
        ("content-type", "text/\u{7f}plain"),
    ] {
        let started = std::time::Instant::now();
        let resp = run_with(
            &p,
            v2(
                "POST",
                "/v1/chat/completions",
                &[("authorization", &token), (name, value)],
                Some(&chat_body("gpt-4o-mini")),
            ),
        );
        let msg = assert_error(&resp, 400, "invalid_request");
        assert!(
            msg.to_ascii_lowercase()
                .contains(&name.to_ascii_lowercase()),
            "{msg}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(sim.requests().is_empty(), "nothing goes upstream");
    }
    // Non-ASCII but header-safe values are forwarded as they are.
    let resp = run_with(
        &p,
        v2(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", &token),
                ("idempotency-key", "clé-ünïcode\tok"),
            ],
            Some(&chat_body("gpt-4o-mini")),
        ),
    );
    assert_eq!(status(&resp), 200, "{resp}");
}
