//! The log of an invocation (spec §6) whatever the caller sends and whatever goes wrong: every
//! line carries `lambda_request_id`, client-supplied values are cut short, and a panic still
//! ends in exactly one `request finished` line and one metrics record. Captured at DEBUG for
//! every crate (AWS SDK, hyper, reqwest), with the project's own JSON layer.
//!
//! The tests of this binary run one at a time (a mark in the shared capture per invocation).

mod support;

use std::sync::{Arc, Mutex};

use openai_lambda_proxy::secrets::Secrets;
use openai_lambda_proxy::telemetry::metrics::{InvocationMetrics, MetricsSink};
use openai_lambda_proxy::{Invocation, Proxy};
use openai_simulator::{Simulator, parse_script};
use serde_json::Value;
use support::events::{
    assert_error, bearer, chat_body, chat_event, chat_event_with_body, now_ms, request_id,
    simulator, status,
};
use support::logs;

const KEY: &str = "sk-invocation-logs-key-00001";
const TOKEN: &str = "tok-invocation-logs-000001";

/// One test at a time: the capture and the panic trigger are shared by the binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Recorded(Mutex<Vec<(String, InvocationMetrics)>>);

impl MetricsSink for Recorded {
    fn record(&self, id: &str, metrics: InvocationMetrics) {
        self.0.lock().unwrap().push((id.to_owned(), metrics));
    }
}

impl Recorded {
    fn for_id(&self, id: &str) -> Vec<InvocationMetrics> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(i, _)| i == id)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

fn proxy(base_url: &str, metrics: Arc<Recorded>) -> Arc<Proxy> {
    let settings = openai_lambda_proxy::config::Settings::from_lookup(|k| match k {
        "OPENAI_BASE_URL" => Some(base_url.to_owned()),
        "OPENAI_API_KEY" => Some(KEY.to_owned()),
        "PROXY_API_KEYS" => Some(TOKEN.to_owned()),
        "RETRY_BASE_DELAY_MS" => Some("10".to_owned()),
        "RETRY_MAX_DELAY_MS" => Some("20".to_owned()),
        _ => None,
    });
    Arc::new(Proxy::new(settings, Secrets::new(None), Box::new(metrics)))
}

async fn invoke(p: &Arc<Proxy>, event: Value) -> (Value, String) {
    let id = request_id("logs");
    let inv = Invocation {
        request_id: id.clone(),
        deadline_ms: now_ms() + 20_000,
    };
    (p.handle_event(event, inv).await, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_an_invocation_carries_its_lambda_request_id() {
    let _serial = SERIAL.lock().await;
    let logs = logs::check(&[KEY, TOKEN]);
    let capture = logs.capture();
    let sim = simulator().await;
    let p = proxy(&sim.base_url(), Arc::default());
    for script in ["ok", "500,ok", "reset,ok", "401"] {
        sim.set_script(parse_script(script).unwrap());
        let mark = capture.len();
        let (resp, id) = invoke(&p, chat_event(Some(&bearer(TOKEN)))).await;
        assert!(status(&resp) > 0);
        let lines = capture.lines_since(mark);
        assert!(lines.len() >= 2, "{script}: {lines:?}");
        for line in &lines {
            assert!(
                line["lambda_request_id"].is_string(),
                "{script}: a line without lambda_request_id: {line}"
            );
            for field in ["timestamp", "level", "message"] {
                assert!(line.get(field).is_some(), "{script}: no {field}: {line}");
            }
        }
        let finished: Vec<&Value> = lines
            .iter()
            .filter(|l| l["message"] == "request finished")
            .collect();
        assert_eq!(finished.len(), 1, "{script}");
        assert_eq!(finished[0]["lambda_request_id"], id.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_model_name_yields_short_log_lines() {
    let _serial = SERIAL.lock().await;
    let logs = logs::check(&[KEY, TOKEN]);
    let capture = logs.capture();
    let sim = simulator().await;
    let p = proxy(&sim.base_url(), Arc::default());
    let model = format!("gpt-{}", "é".repeat(500_000));
    let body = chat_body(&model);
    assert!(body.len() < 1_048_576 && model.len() > 1_000_000);
    let mark = capture.len();
    let (resp, id) = invoke(&p, chat_event_with_body(Some(&bearer(TOKEN)), &body)).await;
    assert_eq!(status(&resp), 200, "the simulator answers any model");
    let text = {
        let lines = capture.lines_since(mark);
        lines.iter().map(Value::to_string).collect::<Vec<_>>()
    };
    for line in &text {
        assert!(line.len() < 4_096, "a {}-byte log line", line.len());
    }
    let lines = capture.lines_with(&id, "request finished");
    assert_eq!(lines.len(), 1);
    let logged = lines[0]["model"].as_str().expect("model is logged");
    let kept: String = model.chars().take(200).collect();
    assert!(logged.starts_with(&kept), "{logged}");
    assert!(logged.len() < 600 && logged.contains("cut"), "{logged}");
    let attempt = capture.lines_with(&id, "upstream attempt");
    assert_eq!(attempt[0]["model"], lines[0]["model"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_still_ends_in_one_request_finished_line_and_one_metrics_record() {
    let _serial = SERIAL.lock().await;
    let logs = logs::check(&[KEY, TOKEN]);
    let capture = logs.capture();
    let metrics = Arc::new(Recorded::default());
    let (_sim, p) = proxy_that_panics_once(metrics.clone()).await;
    let (resp, id) = invoke(&p, chat_event(Some(&bearer(TOKEN)))).await;
    assert_error(&resp, 500, "internal_error");
    assert_one_line_and_one_record(capture, &metrics, &id);

    // The same proxy keeps answering afterwards.
    let (resp, id) = invoke(&p, chat_event(Some(&bearer(TOKEN)))).await;
    assert_eq!(status(&resp), 200);
    assert_eq!(capture.lines_with(&id, "request finished").len(), 1);
    assert_eq!(metrics.for_id(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_streaming_invocation_still_answers_500_with_one_line_and_one_record() {
    use futures_util::StreamExt;

    let _serial = SERIAL.lock().await;
    let logs = logs::check(&[KEY, TOKEN]);
    let capture = logs.capture();
    let metrics = Arc::new(Recorded::default());
    let (_sim, p) = proxy_that_panics_once(metrics.clone()).await;
    let id = request_id("logs-stream");
    let inv = Invocation {
        request_id: id.clone(),
        deadline_ms: now_ms() + 20_000,
    };
    let resp = p
        .handle_streaming_event(chat_event(Some(&bearer(TOKEN))), inv)
        .await;
    // The usual §5 answer in the streaming format: prelude, then the JSON body.
    let prelude = serde_json::to_value(&resp.metadata_prelude).unwrap();
    assert_eq!(prelude["statusCode"], 500, "{prelude}");
    assert_eq!(prelude["headers"]["content-type"], "application/json");
    assert_eq!(prelude["headers"]["x-lambda-request-id"], id.as_str());
    let mut body = Vec::new();
    let mut stream = resp.stream;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("no body error"));
    }
    let error: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(error["error"]["code"], "internal_error", "{error}");
    assert_one_line_and_one_record(capture, &metrics, &id);
}

/// A proxy whose next `upstream attempt` log line panics: a real panic in the middle of the
/// proxy's own path, with no test hook in the proxy.
async fn proxy_that_panics_once(metrics: Arc<Recorded>) -> (Simulator, Arc<Proxy>) {
    let sim = simulator().await;
    let p = proxy(&sim.base_url(), metrics);
    logs::panic_once_on("upstream attempt");
    (sim, p)
}

/// The panicked invocation `id` ended in exactly one `request finished` line (500
/// `internal_error`, at ERROR) and one metrics record.
fn assert_one_line_and_one_record(capture: &logs::Capture, metrics: &Recorded, id: &str) {
    let finished = capture.lines_with(id, "request finished");
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["status"], 500);
    assert_eq!(finished[0]["code"], "internal_error");
    assert_eq!(finished[0]["route"], "/chat/completions");
    assert_eq!(finished[0]["level"], "ERROR");
    let recorded = metrics.for_id(id);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].requests, 1);
}
