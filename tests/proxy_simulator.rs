//! The real handler in process against the OpenAI simulator on 127.0.0.1, with real time and
//! short deadlines: the retry and deadline behaviour a caller sees, and the logs it leaves.
//!
//! Wall-clock bounds are wide on purpose: `make test` runs on loaded 2-core machines where a
//! ready task can wait hundreds of milliseconds for a thread. So each timing assertion checks
//! what a caller relies on, with room for that:
//! - "answered before the deadline" is checked against the deadline plus `DEADLINE_MARGIN_MS`
//!   (what spec §4 promises); the harness's margin is [`MARGIN_MS`], which absorbs the scheduling
//!   delays, as the margin does on a real Lambda;
//! - "answered at once" is checked against a bound far below the wait a wrong decision would
//!   cost (a 40 s `Retry-After`, the remaining budget), and the exact decision (delay chosen,
//!   reason) is read from the `upstream attempt` log line, which does not depend on load.
//!
//! The retry engine's timing itself is tested to the millisecond in virtual time
//! (`src/retry/engine.rs`).

mod support;

use std::sync::Arc;
use std::time::Instant;

use openai_lambda_proxy::Proxy;
use openai_simulator::{Simulator, parse_script};
use serde_json::{Value, json};
use support::events::{
    Answer, answer_within, bearer, now_ms, proxy_for, request_id, simulator, v1, v2,
};
use support::logs::{self, LogCheck};

const SERVER_KEY: &str = "sk-sim-server-key-0123456789";
const CLIENT_TOKEN: &str = "client-token-abcdef";
const PROMPT: &str = "Tell me the secret plan for Tuesday";

/// What must never appear in any log line of this binary (checked by [`support::logs`] when a
/// [`Harness`] is dropped at the end of a passing test, on top of the explicit checks below).
const NEVER_LOGGED: [&str; 4] = [
    SERVER_KEY,
    CLIENT_TOKEN,
    PROMPT,
    "Hello from the OpenAI simulator",
];

struct Harness {
    sim: Simulator,
    proxy: Arc<Proxy>,
    logs: LogCheck,
}

/// The harness's `DEADLINE_MARGIN_MS`: the deadline is [`GATEWAY_MS`] − this after the event's
/// gateway start, and every answer must be back by [`GATEWAY_MS`] (spec §4).
const MARGIN_MS: u64 = 1_000;
/// The harness's `GATEWAY_TIMEOUT_MS`.
const GATEWAY_MS: u64 = 4_000;
/// The harness's deadline, counted from the event's gateway start.
const DEADLINE_MS: u64 = GATEWAY_MS - MARGIN_MS;

/// Fast retries so real-time tests stay short; the deadline comes from GATEWAY_TIMEOUT_MS.
async fn harness(script: &str, extra: &[(&str, &str)]) -> Harness {
    let logs = logs::check(&NEVER_LOGGED);
    let sim = simulator().await;
    sim.set_script(parse_script(script).unwrap());
    let defaults = [
        ("OPENAI_API_KEY", SERVER_KEY),
        ("PROXY_API_KEYS", CLIENT_TOKEN),
        ("RETRY_BASE_DELAY_MS", "100"),
        ("RETRY_MAX_DELAY_MS", "400"),
        ("MIN_ATTEMPT_MS", "200"),
        ("DEADLINE_MARGIN_MS", "1000"),
        ("GATEWAY_TIMEOUT_MS", "4000"),
        ("METRICS_BACKEND", "none"),
    ];
    // `extra` comes last, so it overrides the defaults (and may override OPENAI_BASE_URL).
    let proxy = proxy_for(&sim, &[&defaults[..], extra].concat(), None);
    Harness { sim, proxy, logs }
}

fn chat_body(extra: Value) -> Value {
    let mut body =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// An HTTP API v2 `POST /v1/chat/completions` event with [`chat_body`]`(extra)` and the client
/// token, a cookie, `x-forwarded-for` and an idempotency key, that the gateway received `age_ms`
/// ago.
fn chat_event(extra: Value, age_ms: u64) -> Value {
    let auth = bearer(CLIENT_TOKEN);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("cookie", "session=abc"),
        ("x-forwarded-for", "203.0.113.9"),
        ("idempotency-key", "idem-42"),
    ];
    let body = chat_body(extra).to_string();
    let mut event = v2("POST", "/v1/chat/completions", &headers, Some(&body));
    event["requestContext"]["timeEpoch"] = json!(now_ms() - age_ms);
    event
}

/// Invokes the handler with a real Lambda deadline `lambda_ms` from now.
async fn invoke(h: &Harness, event: Value, lambda_ms: u64) -> Answer {
    answer_within(&h.proxy, event, "lambda-req", lambda_ms).await
}

async fn chat(h: &Harness, extra: Value) -> Answer {
    invoke(h, chat_event(extra, 0), 60_000).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_500s_is_ridden_out() {
    let h = harness("500,500,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["object"], "chat.completion");
    assert_eq!(a.header("x-upstream-attempts"), Some("3"));
    let requests = h.sim.requests();
    assert_eq!(requests.len(), 3);
    // x-request-id is the last upstream one; rate-limit headers are passed on.
    assert!(a.header("x-request-id").unwrap().starts_with("req_"));
    assert_eq!(a.header("x-ratelimit-limit-requests"), Some("10000"));
    assert!(a.header("openai-processing-ms").is_some());
    assert_eq!(a.header("x-lambda-request-id"), Some(a.request_id.as_str()));
    assert_eq!(a.header("x-should-retry"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_503_ends_in_a_clear_502_before_the_deadline() {
    let h = harness("503", &[("RETRY_MAX_ATTEMPTS", "20")]).await;
    h.sim.set_default(parse_script("503").unwrap().remove(0));
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 502, "{}", a.body);
    // Back before the gateway would time out: deadline + margin after the event's start.
    assert!(
        a.since_gateway_ms < DEADLINE_MS + MARGIN_MS,
        "answered {} ms after the gateway start",
        a.since_gateway_ms
    );
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_unavailable");
    assert_eq!(e["type"], "server_error");
    assert_eq!(e["upstream"]["status"], 503);
    let attempts = e["upstream"]["attempts"].as_u64().unwrap();
    assert!(attempts >= 3, "{attempts}");
    assert_eq!(attempts as usize, h.sim.requests().len());
    assert_eq!(
        e["upstream"]["request_ids"].as_array().unwrap().len() as u64,
        attempts
    );
    assert_eq!(e["upstream"]["last_error"], "503 Service Unavailable");
    assert_eq!(e["lambda_request_id"], a.request_id.as_str());
    let msg = e["message"].as_str().unwrap();
    for needle in [
        "503 Service Unavailable",
        &format!("{attempts} attempts"),
        "status.openai.com",
        "req_",
    ] {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert_eq!(
        a.header("x-upstream-attempts"),
        Some(attempts.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hang_ends_in_504_before_the_deadline() {
    let h = harness("hang", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 504, "{}", a.body);
    // The one attempt waited until the deadline (timers never fire early; 100 ms for clock
    // rounding), and the answer was back before deadline + margin.
    assert!(
        (DEADLINE_MS - 100..DEADLINE_MS + MARGIN_MS).contains(&a.since_gateway_ms),
        "answered {} ms after the gateway start",
        a.since_gateway_ms
    );
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_timeout");
    assert_eq!(e["upstream"]["attempts"], 1);
    assert_eq!(e["upstream"]["status"], Value::Null);
    assert_eq!(a.header("x-should-retry"), Some("false"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lambda_deadline_bounds_the_run_too() {
    // No gateway limit (function URL), a real Lambda deadline 2.5 s away: the run ends at
    // 2.5 s − margin, and the answer is back before Lambda's own deadline.
    let h = harness("hang", &[("GATEWAY_TIMEOUT_MS", "")]).await;
    let mut event = chat_event(json!({}), 0);
    event["requestContext"]["domainName"] = json!("abc.lambda-url.us-east-1.on.aws");
    let a = invoke(&h, event, 2_500).await;
    assert_eq!(a.status, 504);
    assert!(
        (2_500 - MARGIN_MS - 100..2_500).contains(&a.elapsed_ms),
        "answered after {} ms",
        a.elapsed_ms
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_retry_after_ms_is_waited_out() {
    let h = harness("429:ra-ms=600,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = h.sim.requests();
    assert_eq!(r.len(), 2);
    // Honoured as asked, not jittered (and not the 100 ms backoff): the delay the engine chose,
    // from its log line, and the wall-clock gap the simulator saw (at least that long; the upper
    // bound only says it did not wait for something else, such as the deadline).
    let first = h
        .logs
        .capture()
        .lines_with(&a.request_id, "upstream attempt")
        .remove(0);
    assert_eq!(first["next_delay_ms"], 600, "{first}");
    let waited = r[1].received_at_ms - r[0].received_at_ms;
    assert!((600..DEADLINE_MS).contains(&waited), "waited {waited} ms");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_asking_to_wait_past_the_deadline_is_answered_at_once() {
    let h = harness("429:ra=40", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 429, "{}", a.body);
    // At once: no sleep towards the 40 s, nor until the 3 s deadline (one attempt, below).
    assert!(a.elapsed_ms < 1_500, "answered after {} ms", a.elapsed_ms);
    let attempt = h
        .logs
        .capture()
        .lines_with(&a.request_id, "upstream attempt")
        .remove(0);
    assert_eq!(
        (&attempt["decision"], &attempt["next_delay_ms"]),
        (&json!("give_up"), &Value::Null),
        "{attempt}"
    );
    assert_eq!(a.json()["error"]["code"], "upstream_rate_limited");
    assert_eq!(a.header("retry-after"), Some("40"));
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert_eq!(h.sim.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_quota_passes_through_without_retry() {
    let h = harness("429:quota,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["code"], "insufficient_quota");
    assert_eq!(h.sim.requests().len(), 1);
    assert_eq!(a.header("x-should-retry"), Some("false"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_400_passes_through_after_one_attempt() {
    let h = harness("400,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    assert!(
        a.json()["error"].get("upstream").is_none(),
        "the upstream's own body, unchanged"
    );
    assert_eq!(h.sim.requests().len(), 1);
    assert_eq!(a.header("x-upstream-attempts"), Some("1"));
    assert_eq!(a.header("x-should-retry"), Some("false"));
}

#[tokio::test(flavor = "multi_thread")]
async fn x_should_retry_from_the_upstream_is_obeyed() {
    let h = harness("503:retry=false,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 503);
    assert_eq!(h.sim.requests().len(), 1);
    let h = harness("400:retry=true,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 200);
    assert_eq!(h.sim.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_connections_and_cut_bodies_are_retried() {
    let h = harness("reset,cut,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-upstream-attempts"), Some("3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_a_502_naming_connect_errors() {
    // A port nobody listens on.
    let url = format!("http://127.0.0.1:{}/v1", support::moto::free_port());
    let h = harness("ok", &[("OPENAI_BASE_URL", &url)]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 502);
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_unavailable");
    assert!(
        e["upstream"]["last_error"]
            .as_str()
            .unwrap()
            .starts_with("connect_error"),
        "{e}"
    );
    assert_eq!(e["upstream"]["attempts"], 5);
}

/// A 127.0.0.1 address that completes no TCP handshake: a listener with a backlog of 0 that
/// never accepts, its queue filled by connections opened here (Linux then drops further SYNs).
/// Keep the returned listener and connections alive for as long as the address is used.
async fn silent_upstream() -> (String, tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(std::time::Duration::from_millis(300), connect).await {
            Ok(stream) => fillers.push(stream.unwrap()),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    (format!("http://{addr}/v1"), listener, fillers)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_that_never_completes_is_a_retried_connect_error() {
    let (url, _listener, _fillers) = silent_upstream().await;
    let settings = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("CONNECT_TIMEOUT_MS", "300"),
        ("RETRY_MAX_ATTEMPTS", "3"),
    ];
    let h = harness("ok", &settings).await;
    let a = chat(&h, json!({})).await;
    // Not a 504 after one connect timeout: three connect errors, well within the budget.
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.elapsed_ms < DEADLINE_MS,
        "answered after {} ms",
        a.elapsed_ms
    );
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_unavailable");
    assert_eq!(e["upstream"]["attempts"], 3);
    assert_eq!(a.header("x-upstream-attempts"), Some("3"));
    let last = e["upstream"]["last_error"].as_str().unwrap();
    assert!(last.starts_with("connect_error"), "{last}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("3 attempts") && msg.contains("RETRY_MAX_ATTEMPTS"),
        "{msg}"
    );
    assert_eq!(a.header("x-should-retry"), Some("false"));
    let lines = h.logs.capture().lines_for(&a.request_id);
    let kinds: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "upstream attempt")
        .map(|l| &l["error_kind"])
        .collect();
    assert_eq!(kinds, [&json!("connect_error"); 3]);

    // With attempts to spare, it keeps trying until too little budget is left for another one.
    // MIN_ATTEMPT_MS above CONNECT_TIMEOUT_MS: every attempt ends in its connect timeout.
    let settings = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("CONNECT_TIMEOUT_MS", "300"),
        ("MIN_ATTEMPT_MS", "400"),
        ("RETRY_MAX_ATTEMPTS", "20"),
    ];
    let h = harness("ok", &settings).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.since_gateway_ms < DEADLINE_MS + MARGIN_MS,
        "answered {} ms after the gateway start",
        a.since_gateway_ms
    );
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_unavailable");
    let attempts = e["upstream"]["attempts"].as_u64().unwrap();
    assert!((4..20).contains(&attempts), "{attempts} attempts");
    assert_eq!(
        a.header("x-upstream-attempts"),
        Some(attempts.to_string().as_str())
    );
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("too little of the proxy's"), "{msg}");
}

/// An HTTP API v2 `POST /v1/embeddings` event with the client token.
fn embeddings_event() -> Value {
    let auth = bearer(CLIENT_TOKEN);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let body = json!({"model": "text-embedding-3-small", "input": ["a", "b"]}).to_string();
    let mut event = v2("POST", "/v1/embeddings", &headers, Some(&body));
    event["requestContext"]["timeEpoch"] = json!(now_ms());
    event
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_too_large_for_lambda_is_a_clear_502_and_the_next_request_works() {
    let h = harness("big=7500000,big=5000000", &[]).await;
    let a = invoke(&h, embeddings_event(), 60_000).await;
    assert_eq!(a.status, 502, "{}", &a.body[..a.body.len().min(500)]);
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_response_too_large");
    assert_eq!(e["type"], "server_error");
    assert_eq!(e["upstream"]["status"], 200);
    assert_eq!(e["upstream"]["attempts"], 1);
    assert!(e["message"].as_str().unwrap().contains("6 MB"), "{e}");
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert_eq!(h.sim.requests().len(), 1, "not retried");
    let f = h
        .logs
        .capture()
        .lines_with(&a.request_id, "request finished")
        .remove(0);
    assert_eq!(f["code"], "upstream_response_too_large");
    assert_eq!(f["outcome"], "upstream_failure");
    // The environment stays healthy, and an answer that fits (5 MB) is passed on whole.
    let b = invoke(&h, embeddings_event(), 60_000).await;
    assert_eq!(b.status, 200);
    assert!(b.body.len() >= 5_000_000);
    assert_eq!(b.json()["object"], "list");
}

/// A 127.0.0.1 upstream that answers 200 with a body that never ends (no length, read until
/// close); returns its base URL and the count of body bytes it managed to send.
async fn endless_upstream() -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 65_536];
                let _ = sock.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                let chunk = vec![b' '; 65_536];
                let mut out = sock.write_all(head.as_bytes()).await;
                while out.is_ok() {
                    out = sock.write_all(&chunk).await;
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (url, sent)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_answer_is_read_no_further_than_the_limit() {
    use std::sync::atomic::Ordering;
    let (url, sent) = endless_upstream().await;
    let h = harness("ok", &[("OPENAI_BASE_URL", url.as_str())]).await;
    let a = invoke(&h, embeddings_event(), 60_000).await;
    // Before the deadline: it stopped reading, it did not wait for the end.
    assert_eq!(a.status, 502, "{}", &a.body[..a.body.len().min(500)]);
    assert!(
        a.elapsed_ms < DEADLINE_MS,
        "answered after {} ms",
        a.elapsed_ms
    );
    assert_eq!(a.json()["error"]["code"], "upstream_response_too_large");
    // The connection was dropped: the upstream could send only what the socket buffers hold.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let total = sent.load(Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(sent.load(Ordering::Relaxed), total, "still being sent");
    assert!(total < 64 << 20, "{total} bytes sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_auth_failures_are_the_servers_fault() {
    let h = harness("401", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"]["code"], "upstream_auth_failed");
    assert_eq!(h.sim.requests().len(), 1);
    assert!(!a.body.contains(SERVER_KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_true_returns_the_buffered_sse_body() {
    let h = harness("ok", &[]).await;
    let a = chat(&h, json!({"stream": true})).await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(a.body.contains("chat.completion.chunk"));
    assert!(a.body.trim_end().ends_with("data: [DONE]"));
    // A stream that breaks mid-way is retried; the caller sees only the complete one.
    let h = harness("stream-cut,ok", &[]).await;
    let a = chat(&h, json!({"stream": true})).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-upstream-attempts"), Some("2"));
    assert!(a.body.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rest_event_27_seconds_old_answers_at_once() {
    // Default retry settings: 29 s REST timeout − 27 s age − 500 ms margin = 1.5 s left, so after
    // one failure no backoff (≥ 500 ms) + MIN_ATTEMPT_MS (1000 ms) fits.
    let h = harness(
        "503",
        &[
            ("RETRY_BASE_DELAY_MS", ""),
            ("RETRY_MAX_DELAY_MS", ""),
            ("MIN_ATTEMPT_MS", ""),
            ("DEADLINE_MARGIN_MS", ""),
            ("GATEWAY_TIMEOUT_MS", ""),
        ],
    )
    .await;
    h.sim.set_default(parse_script("503").unwrap().remove(0));
    let body = chat_body(json!({})).to_string();
    let auth = bearer(CLIENT_TOKEN);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let mut event = v1("POST", "/v1/chat/completions", &headers, Some(&body));
    event["requestContext"]["requestTimeEpoch"] = json!(now_ms() - 27_000);
    let a = invoke(&h, event, 60_000).await;
    assert_eq!(a.status, 502, "{}", a.body);
    // At once: the engine gave up without a backoff sleep (its log line says so exactly), and
    // the answer was back within the 1.5 s left.
    assert!(a.elapsed_ms < 1_500, "answered after {} ms", a.elapsed_ms);
    let attempt = h
        .logs
        .capture()
        .lines_with(&a.request_id, "upstream attempt")
        .remove(0);
    assert_eq!(
        (&attempt["decision"], &attempt["next_delay_ms"]),
        (&json!("give_up"), &Value::Null),
        "{attempt}"
    );
    assert_eq!(a.json()["error"]["upstream"]["attempts"], 1);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("time budget was left for another attempt")
    );
    let finished = h
        .logs
        .capture()
        .lines_with(&a.request_id, "request finished")
        .remove(0);
    // 29 s − 27 s − 500 ms; the lower bound leaves 500 ms for the handler to start reading the
    // clock after the event was built.
    assert!(
        (1_000..=1_500).contains(&finished["budget_ms"].as_u64().unwrap()),
        "{finished}"
    );
    // And when there is not even time for one attempt, the upstream is not called.
    let h2 = harness("ok", &[("GATEWAY_TIMEOUT_MS", "")]).await;
    let late = chat_event(json!({}), 29_900);
    let a = invoke(&h2, late, 60_000).await;
    assert_eq!(a.status, 504);
    assert_eq!(a.json()["error"]["upstream"]["attempts"], 0);
    assert!(h2.sim.requests().is_empty());
    // The message agrees with `x-should-retry: false`: it does not invite a retry.
    assert_eq!(a.header("x-should-retry"), Some("false"));
    let msg = a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(msg.contains("openai was not called"), "{msg}");
    assert!(!msg.contains("retry the request"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_allowed_headers_go_upstream() {
    let h = harness(
        "ok",
        &[
            ("OPENAI_ORGANIZATION", "org-123"),
            ("OPENAI_PROJECT", "proj_9"),
        ],
    )
    .await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 200);
    let r = &h.sim.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some(bearer(SERVER_KEY).as_str()));
    assert_eq!(r.header("x-client-request-id"), Some(a.request_id.as_str()));
    assert_eq!(r.header("openai-organization"), Some("org-123"));
    assert_eq!(r.header("openai-project"), Some("proj_9"));
    assert_eq!(r.header("idempotency-key"), Some("idem-42"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cookie"), None);
    assert_eq!(r.header("x-forwarded-for"), None);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        chat_body(json!({})),
        "body unchanged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_have_one_line_per_attempt_and_one_summary_without_secrets() {
    let h = harness("500,503,ok", &[]).await;
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 200);
    let lines = h.logs.capture().lines_for(&a.request_id);
    let attempts: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "upstream attempt")
        .collect();
    let finished: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "request finished")
        .collect();
    assert_eq!(attempts.len(), 3);
    assert_eq!(finished.len(), 1, "exactly one summary per invocation");
    for (i, l) in attempts.iter().enumerate() {
        for key in [
            "timestamp",
            "level",
            "route",
            "model",
            "attempt",
            "status",
            "latency_ms",
            "upstream_request_id",
            "decision",
            "reason",
            "next_delay_ms",
            "remaining_ms",
        ] {
            assert!(l.get(key).is_some(), "attempt line lacks {key}: {l}");
        }
        assert_eq!(l["attempt"], i as u64 + 1);
        assert_eq!(l["route"], "/chat/completions");
        assert_eq!(l["model"], "gpt-4o-mini");
    }
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[0]["decision"], "retry");
    assert!(attempts[0]["next_delay_ms"].as_u64().unwrap() >= 50);
    assert_eq!(attempts[2]["decision"], "done");
    assert_eq!(attempts[2]["next_delay_ms"], Value::Null);
    let f = finished[0];
    for key in [
        "timestamp",
        "level",
        "route",
        "model",
        "status",
        "code",
        "outcome",
        "attempts",
        "elapsed_ms",
        "budget_ms",
        "upstream_request_ids",
        "cold_start",
    ] {
        assert!(f.get(key).is_some(), "summary lacks {key}: {f}");
    }
    assert_eq!(
        (
            f["status"].as_u64(),
            f["outcome"].as_str(),
            f["attempts"].as_u64()
        ),
        (Some(200), Some("success"), Some(3))
    );
    assert_eq!(f["code"], Value::Null);
    assert_eq!(f["upstream_request_ids"].as_array().unwrap().len(), 3);
    assert_eq!(f["cold_start"], true);
    assert!(
        f.get("fields").is_none() && f.get("span").is_none(),
        "flat lines"
    );

    let text: String = lines.iter().map(|l| l.to_string()).collect();
    for secret in NEVER_LOGGED {
        assert!(!text.contains(secret), "logs leak {secret:?}");
    }
    // A second invocation of the same process is warm.
    let b = chat(&h, json!({})).await;
    let f2 = h
        .logs
        .capture()
        .lines_with(&b.request_id, "request finished")
        .remove(0);
    assert_eq!(f2["cold_start"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_summary_carries_the_code_and_outcome() {
    let h = harness("503", &[]).await;
    h.sim.set_default(parse_script("503").unwrap().remove(0));
    let a = chat(&h, json!({})).await;
    assert_eq!(a.status, 502);
    let lines = h.logs.capture().lines_for(&a.request_id);
    let last_attempt = lines
        .iter()
        .rfind(|l| l["message"] == "upstream attempt")
        .unwrap();
    assert_eq!(last_attempt["decision"], "give_up");
    let f = lines
        .iter()
        .find(|l| l["message"] == "request finished")
        .unwrap();
    assert_eq!(
        (
            f["code"].as_str(),
            f["outcome"].as_str(),
            f["level"].as_str()
        ),
        (
            Some("upstream_unavailable"),
            Some("upstream_failure"),
            Some("WARN")
        )
    );
}

/// Virtual time for a whole request: the proxy's clock moves only when it sleeps, and its
/// sleeps end at once (each one recorded).
#[derive(Clone)]
struct VirtualTime {
    clock: Arc<support::events::VirtualClock>,
    slept: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl openai_lambda_proxy::retry::Clock for VirtualTime {
    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

impl openai_lambda_proxy::retry::Sleeper for VirtualTime {
    fn sleep(&self, ms: u64) -> impl std::future::Future<Output = ()> + Send {
        self.clock.advance(ms);
        self.slept.lock().unwrap().push(ms);
        std::future::ready(())
    }
}

/// The top of every jitter range (never used on a `Retry-After` wait, which is not jittered).
struct TopJitter;

impl openai_lambda_proxy::retry::Jitter for TopJitter {
    fn between(&mut self, _lo: u64, hi: u64) -> u64 {
        hi
    }
}

/// A whole request through `Proxy` on an injected clock: a 429 asking to wait 20 s, then a 200
/// (and, with one attempt fewer, a 500 after the wait). The proxy waits exactly the 20 s the
/// upstream asked for, in virtual time, within the invocation's virtual deadline, and answers
/// at once in real time; the elapsed time it reports is the virtual one.
#[tokio::test]
async fn a_whole_request_runs_in_virtual_time() {
    use openai_lambda_proxy::Invocation;
    use openai_lambda_proxy::edge::time::Time;
    use openai_lambda_proxy::retry::Clock;
    use support::events::{VirtualClock, function_url, header, status};

    let sim = simulator().await;
    for (script, max_attempts, expected) in
        [("429:ra=20,ok", "5", 200), ("429:ra=20,500", "2", 502)]
    {
        sim.set_script(parse_script(script).unwrap());
        let time = VirtualTime {
            clock: VirtualClock::new(),
            slept: Arc::default(),
        };
        let pairs = [
            ("OPENAI_API_KEY", SERVER_KEY),
            ("PROXY_API_KEYS", CLIENT_TOKEN),
            ("RETRY_MAX_ATTEMPTS", max_attempts),
            ("METRICS_BACKEND", "none"),
        ];
        let proxy = proxy_for(&sim, &pairs, None);
        let proxy = Arc::into_inner(proxy).expect("one owner");
        let proxy = Arc::new(proxy.with_time(Time::new(time.clone(), time.clone(), TopJitter)));
        let started = time.now_ms();
        let invocation = Invocation {
            request_id: request_id("virtual"),
            deadline_ms: started + 60_000,
        };
        let auth = bearer(CLIENT_TOKEN);
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let body = chat_body(json!({})).to_string();
        // A function URL: no gateway timeout, so the budget is the Lambda deadline's 60 s.
        let event = function_url("POST", "/v1/chat/completions", &headers, Some(&body));
        let real = Instant::now();
        let resp = proxy.handle_event(event, invocation).await;
        assert!(
            real.elapsed().as_millis() < 10_000,
            "{script}: slept for real ({:?})",
            real.elapsed()
        );
        assert_eq!(status(&resp), expected, "{script}: {resp}");
        assert_eq!(*time.slept.lock().unwrap(), [20_000], "{script}");
        assert_eq!(header(&resp, "x-upstream-attempts"), Some("2"), "{script}");
        assert!(time.now_ms() - started >= 20_000, "{script}");
        if expected == 502 {
            let error: Value = serde_json::from_slice(&support::events::body(&resp)).unwrap();
            let elapsed = error["error"]["upstream"]["elapsed_ms"].as_u64().unwrap();
            assert!(
                (20_000..30_000).contains(&elapsed),
                "{script}: elapsed {elapsed}"
            );
        }
    }
}
