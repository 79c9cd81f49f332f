//! Spec §11 against two simulators on 127.0.0.1, with real time and short deadlines: fallback to
//! a backup upstream, the switching rules, the Azure request shape, the circuit breaker across
//! requests and the skipped hopeless retry. The rules themselves are tested to the millisecond in
//! virtual time (src/retry/engine.rs, src/upstreams/); here is what a caller and the upstreams see.

mod support;

use std::sync::Arc;

use openai_lambda_proxy::Proxy;
use openai_simulator::{Simulator, parse_script};
use serde_json::{Value, json};
use support::events::{Answer, answer_within, bearer, proxy, simulator, v2};
use support::logs::{self, LogCheck};

const PRIMARY_KEY: &str = "sk-primary-key-0123456789";
const BACKUP_KEY: &str = "sk-backup-key-9876543210";
const CLIENT_TOKEN: &str = "client-token-upstreams";
const PROMPT: &str = "Summarise the quarterly numbers";

struct Two {
    primary: Simulator,
    backup: Simulator,
    logs: LogCheck,
}

async fn two(primary_script: &str, backup_script: &str) -> Two {
    let logs = logs::check(&[PRIMARY_KEY, BACKUP_KEY, CLIENT_TOKEN, PROMPT]);
    let (primary, backup) = (simulator().await, simulator().await);
    primary.set_script(parse_script(primary_script).unwrap());
    backup.set_script(parse_script(backup_script).unwrap());
    Two {
        primary,
        backup,
        logs,
    }
}

/// `UPSTREAMS` for a primary (OpenAI kind) and a backup with its own settings.
fn upstreams(primary: &str, backup: Value) -> String {
    let primary = json!({"name": "primary", "base_url": primary, "api_key": PRIMARY_KEY});
    json!([primary, backup]).to_string()
}

fn openai_backup(sim: &Simulator) -> Value {
    json!({"name": "backup", "base_url": sim.base_url(), "kind": "openai", "api_key": BACKUP_KEY})
}

/// Fast retries so real-time tests stay short; the deadline comes from GATEWAY_TIMEOUT_MS.
fn proxy_with(list: &str, extra: &[(&str, &str)]) -> Arc<Proxy> {
    let defaults = [
        ("UPSTREAMS", list),
        ("PROXY_API_KEYS", CLIENT_TOKEN),
        ("RETRY_BASE_DELAY_MS", "100"),
        ("RETRY_MAX_DELAY_MS", "400"),
        ("MIN_ATTEMPT_MS", "200"),
        ("DEADLINE_MARGIN_MS", "200"),
        ("GATEWAY_TIMEOUT_MS", "3000"),
        ("METRICS_BACKEND", "none"),
    ];
    proxy(&[&defaults[..], extra].concat(), None)
}

async fn chat_model(p: &Arc<Proxy>, model: &str) -> Answer {
    let auth = bearer(CLIENT_TOKEN);
    let body = json!({"model": model, "temperature": 0.2,
        "messages": [{"role": "user", "content": PROMPT}]})
    .to_string();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let event = v2("POST", "/v1/chat/completions", &headers, Some(&body));
    answer_within(p, event, "upstreams", 60_000).await
}

async fn chat(p: &Arc<Proxy>) -> Answer {
    chat_model(p, "gpt-4o-mini").await
}

/// The `upstream` field of each `upstream attempt` line of one invocation.
fn attempt_upstreams(t: &Two, a: &Answer) -> Vec<String> {
    t.logs
        .capture()
        .lines_with(&a.request_id, "upstream attempt")
        .iter()
        .map(|l| l["upstream"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_down_the_backup_serves() {
    let t = two("500,500,500,500,500", "ok").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[],
    );
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["object"], "chat.completion");
    assert_eq!(a.header("x-proxy-upstream"), Some("backup"));
    assert_eq!(a.header("x-proxy-fallbacks"), Some("1"));
    assert_eq!(a.header("x-upstream-attempts"), Some("3"));
    assert_eq!(a.header("x-proxy-model"), None, "no model fallback");
    // FALLBACK_AFTER_FAILURES=2: two attempts on the primary, then the backup.
    assert_eq!(attempt_upstreams(&t, &a), ["primary", "primary", "backup"]);
    let (p_reqs, b_reqs) = (t.primary.requests(), t.backup.requests());
    assert_eq!((p_reqs.len(), b_reqs.len()), (2, 1));
    // Each upstream gets its own key; the body goes unchanged.
    let primary_auth = format!("Bearer {PRIMARY_KEY}");
    assert!(
        p_reqs
            .iter()
            .all(|r| r.header("authorization") == Some(primary_auth.as_str()))
    );
    assert_eq!(
        b_reqs[0].header("authorization"),
        Some(format!("Bearer {BACKUP_KEY}").as_str())
    );
    assert_eq!(b_reqs[0].json().unwrap()["model"], "gpt-4o-mini");
    // One backoff (100 ms ceiling) on the primary; the switch itself does not sleep.
    assert!(a.elapsed_ms < 2_000, "took {} ms", a.elapsed_ms);
    // No URL or key in any header.
    for (name, value) in &a.headers {
        let v = value.as_str().unwrap_or_default();
        assert!(
            !v.contains("127.0.0.1") && !v.contains("sk-"),
            "{name}: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_down_the_error_counts_attempts_per_upstream() {
    let t = two("503,503,503,503,503", "503,503,503,503,503").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[],
    );
    let a = chat(&p).await;
    assert_eq!(a.status, 502, "{}", a.body);
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_unavailable");
    // Five attempts in all (RETRY_MAX_ATTEMPTS counts every upstream): 2 + 2, then the primary again.
    assert_eq!(e["upstream"]["attempts"], 5);
    assert_eq!(
        e["upstream"]["by_upstream"],
        json!({"primary": 3, "backup": 2})
    );
    assert_eq!(a.header("x-proxy-upstream"), Some("primary"), "last tried");
    assert_eq!(a.header("x-proxy-fallbacks"), Some("2"));
    assert!(!a.body.contains("127.0.0.1"), "{}", a.body);
    // The message names the upstreams that failed; neither is OpenAI itself (no status page).
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "The upstreams `primary` (openai) and `backup` (openai) are unavailable: 5 attempts"
        ),
        "{msg}"
    );
    assert!(!msg.contains("status.openai.com"), "{msg}");
}

/// §5 messages with a configured list name the upstream(s) at fault by name and kind: the
/// Azure backup that rejected its key, the two that kept rate-limiting.
#[tokio::test(flavor = "multi_thread")]
async fn messages_name_the_upstreams_that_failed() {
    let t = two("503,503", "401").await;
    let backup = json!({
        "name": "azure-eu", "kind": "azure",
        "base_url": format!("http://{}/openai/v1", t.backup.addr()),
        "api_key": BACKUP_KEY,
    });
    let p = proxy_with(&upstreams(&t.primary.base_url(), backup), &[]);
    let a = chat(&p).await;
    assert_eq!(a.status, 502, "{}", a.body);
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_auth_failed");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.starts_with("The upstream `azure-eu` (azure) rejected the proxy's own API key (401"),
        "{msg}"
    );
    assert!(
        msg.contains("the key configured for that upstream"),
        "{msg}"
    );
    assert!(
        !msg.contains("OpenAI") && !msg.contains("127.0.0.1"),
        "{msg}"
    );

    let t = two("429,429,429", "429,429,429").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[("RETRY_MAX_ATTEMPTS", "3")],
    );
    let a = chat(&p).await;
    assert_eq!(a.status, 429, "{}", a.body);
    let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.starts_with(
            "The upstreams `primary` (openai) and `backup` (openai) kept rate-limiting this request: 3 attempts"
        ),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_switches_at_once_without_waiting_for_retry_after() {
    let t = two("429:ra=5", "ok").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[],
    );
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-proxy-upstream"), Some("backup"));
    assert_eq!(a.header("x-upstream-attempts"), Some("2"));
    assert_eq!(attempt_upstreams(&t, &a), ["primary", "backup"]);
    assert!(a.elapsed_ms < 1_500, "waited {} ms", a.elapsed_ms);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_error_switches_at_once() {
    let t = two("ok", "ok").await;
    // A port nothing listens on: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let p = proxy_with(&upstreams(&closed, openai_backup(&t.backup)), &[]);
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-proxy-upstream"), Some("backup"));
    assert_eq!(a.header("x-upstream-attempts"), Some("2"));
    let kinds: Vec<Value> = t
        .logs
        .capture()
        .lines_with(&a.request_id, "upstream attempt")
        .iter()
        .map(|l| l["error_kind"].clone())
        .collect();
    assert_eq!(kinds, [json!("connect_error"), Value::Null]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_400_never_falls_back() {
    let t = two("400", "ok").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[],
    );
    let a = chat(&p).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    assert_eq!(a.header("x-proxy-upstream"), Some("primary"));
    assert_eq!(a.header("x-proxy-fallbacks"), Some("0"));
    assert!(t.backup.requests().is_empty(), "a final answer fell back");
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_gets_an_api_key_header_and_the_deployment_name() {
    let t = two("503,503", "ok").await;
    let backup = json!({
        "name": "azure-eu", "kind": "azure",
        "base_url": format!("http://{}/openai/v1", t.backup.addr()),
        "api_key": BACKUP_KEY,
        "models": {"gpt-4o-mini": "my-gpt4o-mini-deployment"},
    });
    let p = proxy_with(&upstreams(&t.primary.base_url(), backup), &[]);
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-proxy-upstream"), Some("azure-eu"));
    let reqs = t.backup.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/openai/v1/chat/completions");
    assert_eq!(r.header("api-key"), Some(BACKUP_KEY));
    assert_eq!(
        r.header("authorization"),
        None,
        "Azure gets no bearer token"
    );
    let body = r.json().unwrap();
    assert_eq!(body["model"], "my-gpt4o-mini-deployment");
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["messages"][0]["content"], PROMPT);
    // The primary got the model as requested.
    assert_eq!(
        t.primary.requests()[0].json().unwrap()["model"],
        "gpt-4o-mini"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn model_fallback_once_every_upstream_failed_for_the_model() {
    let t = two("503,503,ok", "503,503").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[("MODEL_FALLBACKS", r#"{"gpt-4o": ["gpt-4o-mini"]}"#)],
    );
    let a = chat_model(&p, "gpt-4o").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-proxy-model"), Some("gpt-4o-mini"));
    assert_eq!(a.header("x-proxy-upstream"), Some("primary"));
    assert_eq!(a.header("x-proxy-fallbacks"), Some("2"));
    let models: Vec<Value> = t
        .primary
        .requests()
        .iter()
        .map(|r| r.json().unwrap()["model"].clone())
        .collect();
    assert_eq!(models, ["gpt-4o", "gpt-4o", "gpt-4o-mini"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_opens_refuses_probes_and_recovers() {
    let t = two("500,500", "ok").await;
    // One upstream: UPSTREAMS with a single entry.
    let list =
        json!([{"name": "primary", "base_url": t.primary.base_url(), "api_key": PRIMARY_KEY}])
            .to_string();
    let p = proxy_with(
        &list,
        &[
            ("BREAKER_FAILURES", "2"),
            ("BREAKER_COOLDOWN_MS", "1000"),
            ("RETRY_MAX_ATTEMPTS", "2"),
        ],
    );
    // Two retryable failures in a row: the breaker opens.
    let a = chat(&p).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(
        a.json()["error"]["upstream"]["by_upstream"],
        json!({"primary": 2})
    );
    let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.starts_with("The upstream `primary` (openai) is unavailable: 2 attempts"),
        "{msg}"
    );
    // Open: refused at once, nothing sent, retry-after until it half-opens.
    let a = chat(&p).await;
    assert_eq!(a.status, 503, "{}", a.body);
    let e = &a.json()["error"];
    assert_eq!(e["code"], "upstream_circuit_open");
    assert_eq!(e["type"], "server_error");
    assert_eq!(a.header("retry-after"), Some("1"));
    assert!(a.elapsed_ms < 500, "took {} ms", a.elapsed_ms);
    assert_eq!(t.primary.requests().len(), 2);
    // After the cooldown one request probes; it succeeds and closes the breaker.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(t.primary.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_primary_is_skipped_straight_to_the_backup() {
    let t = two("500,500", "ok,ok").await;
    let p = proxy_with(
        &upstreams(&t.primary.base_url(), openai_backup(&t.backup)),
        &[("BREAKER_FAILURES", "2")],
    );
    let a = chat(&p).await;
    assert_eq!(a.header("x-proxy-upstream"), Some("backup"), "{}", a.body);
    let a = chat(&p).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-proxy-upstream"), Some("backup"));
    assert_eq!(a.header("x-upstream-attempts"), Some("1"));
    assert_eq!(t.primary.requests().len(), 2, "the open primary was called");
}

/// Teaches the proxy that successes take about 1 s, then fails the first attempt late: with
/// ~0.7 s left, a retry is not started (and the caller hears why at once); the control with
/// `SKIP_HOPELESS_ATTEMPTS=false` sends it, and it runs into the deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_hopeless_retry_is_skipped_and_its_control_is_not() {
    for skip in [true, false] {
        let t = two(
            "delay=1000,delay=1000,delay=1000,delay=1000,delay=1000",
            "ok",
        )
        .await;
        let list =
            json!([{"name": "primary", "base_url": t.primary.base_url(), "api_key": PRIMARY_KEY}])
                .to_string();
        let setting = if skip { "true" } else { "false" };
        let p = proxy_with(&list, &[("SKIP_HOPELESS_ATTEMPTS", setting)]);
        for _ in 0..5 {
            assert_eq!(chat(&p).await.status, 200);
        }
        t.primary
            .set_script(parse_script("500:delay=2000,delay=1000").unwrap());
        let a = chat(&p).await;
        let sent = t.primary.requests().len();
        let lines = t
            .logs
            .capture()
            .lines_with(&a.request_id, "upstream attempt");
        if skip {
            assert_eq!(a.status, 502, "{}", a.body);
            assert_eq!(sent, 6, "the hopeless retry was sent");
            let e = &a.json()["error"];
            assert_eq!(e["code"], "upstream_unavailable");
            let msg = e["message"].as_str().unwrap();
            assert!(msg.contains("not started"), "{msg}");
            assert!(
                msg.starts_with("The upstream `primary` (openai) is unavailable"),
                "{msg}"
            );
            assert_eq!(lines.len(), 1);
            assert_eq!(lines[0]["reason"], "expected_latency_exceeds_budget");
            let expected = lines[0]["expected_ms"].as_u64().unwrap();
            assert!((1_000..2_000).contains(&expected), "{expected}");
            assert!(a.elapsed_ms < 2_600, "answered after {} ms", a.elapsed_ms);
        } else {
            assert_eq!(sent, 7, "the control sends the retry");
            assert_eq!(lines.len(), 2);
            assert_eq!(a.status, 504, "{}", a.body);
            let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(
                msg.starts_with("The upstream `primary` (openai) did not answer in time"),
                "{msg}"
            );
        }
    }
}
