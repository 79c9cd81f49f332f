//! `INVOKE_MODE=RESPONSE_STREAM` through the handler against the simulator's live SSE streams
//! (chunked, events split across writes, real gaps): the commit rule, forwarding as events
//! arrive, the one SSE error event, and the usual §5 answers in the streaming format (spec §10).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use lambda_runtime::StreamResponse;
use lambda_runtime::streaming::Body;
use openai_lambda_proxy::{Invocation, Proxy};
use openai_simulator::{Simulator, parse_script};
use serde_json::{Value, json};
use support::events::{
    bearer, chat_event_with_body, function_url, now_ms, proxy_for, request_id, v1,
};
use support::logs;

const TOKEN: &str = "stream-token";

/// What the caller of a streaming function receives.
struct Received {
    prelude: Value,
    /// Each body chunk with its arrival time (ms since the invocation started).
    chunks: Vec<(u128, Bytes)>,
    id: String,
}

impl Received {
    fn status(&self) -> u64 {
        self.prelude["statusCode"].as_u64().unwrap()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.prelude["headers"][name].as_str()
    }
    fn body(&self) -> String {
        let bytes: Vec<u8> = self.chunks.iter().flat_map(|(_, c)| c.to_vec()).collect();
        String::from_utf8(bytes).unwrap()
    }
    fn events(&self) -> Vec<String> {
        self.body()
            .split_inclusive("\n\n")
            .map(str::to_owned)
            .collect()
    }
    fn error_events(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter(|e| e.starts_with("event: error") || e.starts_with("data: {\"error\""))
            .map(|e| data(e))
            .collect()
    }
}

fn data(event: &str) -> Value {
    let d: String = event
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    serde_json::from_str(&d).unwrap_or_else(|e| panic!("{e}: {event}"))
}

fn streaming_proxy(sim: &Simulator, extra: &[(&str, &str)]) -> Arc<Proxy> {
    let mut pairs = vec![
        ("OPENAI_API_KEY", "sk-stream-test"),
        ("PROXY_API_KEYS", TOKEN),
        ("INVOKE_MODE", "RESPONSE_STREAM"),
        ("METRICS_BACKEND", "none"),
        ("RETRY_BASE_DELAY_MS", "10"),
        ("RETRY_MAX_DELAY_MS", "20"),
    ];
    pairs.extend_from_slice(extra);
    proxy_for(sim, &pairs, None)
}

async fn collect(resp: StreamResponse<Body>, start: Instant, id: String) -> Received {
    let prelude = serde_json::to_value(&resp.metadata_prelude).unwrap();
    let mut body = resp.stream;
    let mut chunks = Vec::new();
    let read_all = async {
        while let Some(chunk) = body.next().await {
            chunks.push((start.elapsed().as_millis(), chunk.expect("no body error")));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the stream ends");
    Received {
        prelude,
        chunks,
        id,
    }
}

async fn invoke(proxy: &Arc<Proxy>, event: Value) -> Received {
    let id = request_id("stream");
    let invocation = Invocation {
        request_id: id.clone(),
        deadline_ms: now_ms() + 30_000,
    };
    let start = Instant::now();
    let resp = proxy.handle_streaming_event(event, invocation).await;
    collect(resp, start, id).await
}

fn stream_event(path: &str, body: &str) -> Value {
    let auth = bearer(TOKEN);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    function_url("POST", path, &headers, Some(body))
}

const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn content(r: &Received) -> String {
    r.events()
        .iter()
        .filter(|e| !e.contains("[DONE]") && !e.contains("\"error\""))
        .filter_map(|e| {
            data(e)["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The `request finished` line of an invocation (logged when its stream has ended).
async fn finished_line(id: &str) -> Value {
    for _ in 0..100 {
        if let Some(l) = logs::capture().lines_with(id, "request finished").pop() {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no `request finished` for {id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_caller_while_the_upstream_is_still_sending() {
    logs::capture();
    let sim = support::events::simulator().await;
    sim.set_script(parse_script("stream:gap=300").unwrap());
    let proxy = streaming_proxy(&sim, &[]);
    let r = invoke(&proxy, stream_event("/v1/chat/completions", CHAT_STREAM)).await;

    assert_eq!(r.status(), 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(r.header("x-upstream-attempts"), Some("1"));
    assert!(r.header("x-request-id").unwrap().starts_with("req_"));
    assert_eq!(r.header("x-lambda-request-id"), Some(r.id.as_str()));
    assert!(r.header("x-ratelimit-limit-requests").is_some());
    assert_eq!(content(&r), "Hello from the OpenAI simulator.");
    assert_eq!(r.events().last().unwrap(), "data: [DONE]\n\n");
    assert!(r.error_events().is_empty());
    // 8 events 300 ms apart upstream: the first reaches the caller long before the last is sent.
    let (first, last) = (r.chunks[0].0, r.chunks.last().unwrap().0);
    assert!(
        r.chunks.len() >= 8,
        "forwarded event by event: {}",
        r.chunks.len()
    );
    assert!(
        last >= first + 1_500,
        "first at {first} ms, last at {last} ms"
    );

    let line = finished_line(&r.id).await;
    assert_eq!(line["streamed"], true);
    assert_eq!(line["stream_outcome"], "complete");
    assert_eq!(line["stream_bytes"], r.body().len());
    let ttfb = line["first_byte_ms"].as_u64().unwrap();
    assert!(ttfb < last as u64, "first byte {ttfb} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_ends_with_one_error_event_after_the_idle_timeout() {
    logs::capture();
    let sim = support::events::simulator().await;
    sim.set_script(parse_script("stream:gap=20:stall=3").unwrap());
    let proxy = streaming_proxy(&sim, &[("STREAM_IDLE_TIMEOUT_MS", "700")]);
    let r = invoke(&proxy, stream_event("/v1/chat/completions", CHAT_STREAM)).await;

    // The upstream never finishes, yet the caller got its first three events.
    assert_eq!(r.status(), 200);
    let events = r.events();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(
        events[..3]
            .iter()
            .all(|e| data(e)["object"] == "chat.completion.chunk")
    );
    let errors = r.error_events();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["error"]["code"], "upstream_timeout");
    assert_eq!(errors[0]["error"]["type"], "server_error");
    assert!(errors[0]["error"]["param"].is_null());
    let gap = r.chunks[3].0 - r.chunks[2].0;
    assert!(
        (650..5_000).contains(&gap),
        "error event {gap} ms after the last event"
    );

    let line = finished_line(&r.id).await;
    assert_eq!(line["stream_outcome"], "idle_timeout");
    assert_eq!(line["status"], 200);
    assert_eq!(sim.requests().len(), 1, "no retry after the commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_happen_before_the_first_byte_and_never_after() {
    logs::capture();
    let sim = support::events::simulator().await;
    // 500, then a stream cut before its first event, then one that commits and is cut.
    sim.set_script(parse_script("500, stream:cut=0, stream:gap=20:cut=3, ok").unwrap());
    let proxy = streaming_proxy(&sim, &[]);
    let r = invoke(&proxy, stream_event("/v1/chat/completions", CHAT_STREAM)).await;

    assert_eq!(r.status(), 200);
    assert_eq!(r.header("x-upstream-attempts"), Some("3"));
    assert_eq!(
        sim.requests().len(),
        3,
        "the committed stream was not retried"
    );
    let events = r.events();
    assert_eq!(events.len(), 4);
    let errors = r.error_events();
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0]["error"]["code"], "upstream_stream_interrupted");
    assert!(!r.body().contains("[DONE]"));
    let line = finished_line(&r.id).await;
    assert_eq!(line["stream_outcome"], "cut");
    assert_eq!(line["attempts"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_responses_stream_ends_with_a_responses_error_event() {
    let sim = support::events::simulator().await;
    sim.set_script(parse_script("stream:gap=10:cut=3").unwrap());
    let proxy = streaming_proxy(&sim, &[]);
    let body = r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#;
    let r = invoke(&proxy, stream_event("/v1/responses", body)).await;

    let events = r.events();
    assert_eq!(events.len(), 4, "{events:?}");
    let last = events.last().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{last}");
    let e = data(last);
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "upstream_stream_interrupted");
    assert!(e["param"].is_null() && e["message"].is_string());
    assert_eq!(e["sequence_number"], 3, "after the last forwarded (2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_else_gets_its_usual_answer_as_prelude_and_body() {
    let sim = support::events::simulator().await;
    let proxy = streaming_proxy(&sim, &[("RETRY_MAX_ATTEMPTS", "2")]);

    // Not a stream: the JSON answer, whole.
    let plain = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let r = invoke(&proxy, stream_event("/v1/chat/completions", plain)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&r.body()).unwrap();
    assert_eq!(v["object"], "chat.completion");

    // An outage before the commit: the §5 error, status in the prelude.
    sim.set_script(parse_script("500,500").unwrap());
    let r = invoke(&proxy, stream_event("/v1/chat/completions", CHAT_STREAM)).await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let v: Value = serde_json::from_str(&r.body()).unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    assert_eq!(v["error"]["upstream"]["attempts"], 2);

    // A caller error, and the health check.
    let r = invoke(&proxy, chat_event_with_body(None, CHAT_STREAM)).await;
    assert_eq!(r.status(), 401);
    let health = function_url("GET", "/health", &[], None);
    let r = invoke(&proxy, health).await;
    assert_eq!(
        (r.status(), r.body()),
        (200, json!({"status": "ok"}).to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_api_streaming_event_is_streamed_in_the_same_format() {
    let sim = support::events::simulator().await;
    sim.set_script(parse_script("stream:gap=100").unwrap());
    let proxy = streaming_proxy(&sim, &[("GATEWAY_TIMEOUT_MS", "300000")]);
    let auth = bearer(TOKEN);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let event = v1("POST", "/v1/chat/completions", &headers, Some(CHAT_STREAM));
    let r = invoke(&proxy, event).await;
    assert_eq!(r.status(), 200);
    assert!(r.prelude["headers"].is_object());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(content(&r), "Hello from the OpenAI simulator.");
    assert!(r.chunks.len() >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_still_reads_a_live_stream_whole() {
    let sim = support::events::simulator().await;
    sim.set_script(parse_script("stream:gap=20").unwrap());
    let proxy = streaming_proxy(&sim, &[("INVOKE_MODE", "BUFFERED")]);
    let (resp, _) =
        support::events::invoke(&proxy, stream_event("/v1/chat/completions", CHAT_STREAM)).await;
    assert_eq!(resp["statusCode"], 200);
    let body = support::events::body(&resp);
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}
