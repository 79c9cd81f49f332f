//! `METRICS_BACKEND=emf` (spec §8): each invocation's metrics as one CloudWatch Embedded Metric
//! Format line on stdout. CloudWatch Logs extracts the metrics from the function's log group, so
//! the function makes no API call at all.
//!
//! ```json
//! {"_aws":{"Timestamp":1764072000000,"CloudWatchMetrics":[{"Namespace":"OpenAIProxy",
//!   "Dimensions":[["FunctionName"]],"Metrics":[{"Name":"Requests","Unit":"Count"},…]}]},
//!  "FunctionName":"openai-lambda-proxy","Requests":1,…,"UpstreamLatency":[812,95],
//!  "lambda_request_id":"…"}
//! ```
//!
//! Counts are numbers; `UpstreamLatency` is an array with one value per attempt (EMF allows up to
//! 100 values; attempts are capped at 20).

use std::io::Write;

use serde_json::{Map, Value, json};

use super::metrics::{DIMENSION, InvocationMetrics, MetricsSink};

/// Where EMF lines go: stdout in the function, a buffer in tests.
type LineWriter = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Writes one EMF line per invocation through `out` (stdout in the function).
pub struct EmfSink {
    namespace: String,
    function_name: String,
    out: LineWriter,
}

impl EmfSink {
    /// An EMF sink writing to stdout, one `write_all` per line so lines never interleave with
    /// the JSON log lines.
    pub fn stdout(namespace: String, function_name: String) -> EmfSink {
        EmfSink::with_writer(namespace, function_name, |line| {
            let _ = std::io::stdout().lock().write_all(line);
        })
    }

    pub fn with_writer(
        namespace: String,
        function_name: String,
        out: impl Fn(&[u8]) + Send + Sync + 'static,
    ) -> EmfSink {
        EmfSink {
            namespace,
            function_name,
            out: Box::new(out),
        }
    }

    /// The EMF document of one invocation.
    pub fn document(
        &self,
        lambda_request_id: &str,
        metrics: &InvocationMetrics,
        timestamp_ms: u64,
    ) -> Value {
        let data = metrics.data();
        let definitions: Vec<Value> = data
            .iter()
            .map(|d| json!({"Name": d.name, "Unit": d.unit.as_str()}))
            .collect();
        let mut root = Map::new();
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [[DIMENSION]],
                    "Metrics": definitions,
                }],
            }),
        );
        root.insert(DIMENSION.into(), Value::from(self.function_name.as_str()));
        for d in data {
            let value = match d.values.as_slice() {
                [one] if d.name != "UpstreamLatency" => number(*one),
                many => Value::Array(many.iter().copied().map(number).collect()),
            };
            root.insert(d.name.into(), value);
        }
        // Not a dimension: a plain property, searchable in Logs Insights next to the JSON logs.
        root.insert("lambda_request_id".into(), Value::from(lambda_request_id));
        Value::Object(root)
    }
}

/// Whole numbers stay integers in the JSON (counts, ms latencies).
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && (0.0..9.0e15).contains(&v) {
        Value::from(v as u64)
    } else {
        Value::from(v)
    }
}

impl MetricsSink for EmfSink {
    fn record(&self, lambda_request_id: &str, metrics: InvocationMetrics) {
        let doc = self.document(lambda_request_id, &metrics, now_ms());
        let mut line = serde_json::to_vec(&doc).unwrap_or_default();
        line.push(b'\n');
        (self.out)(&line);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::METRIC_NAMES;
    use std::sync::{Arc, Mutex};

    fn sample() -> InvocationMetrics {
        InvocationMetrics {
            requests: 1,
            upstream_5xx: 2,
            retries: 2,
            upstream_latency_ms: vec![15.0, 9.0, 40.0],
            time_to_first_byte_ms: Some(120.0),
            cold_start: true,
            ..Default::default()
        }
    }

    #[test]
    fn one_line_per_invocation_with_values_at_the_top_level() {
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink_lines = lines.clone();
        let sink = EmfSink::with_writer("NS".into(), "fn-1".into(), move |l| {
            sink_lines.lock().unwrap().extend_from_slice(l)
        });
        sink.record("req-1", sample());
        sink.record("req-2", InvocationMetrics::from_attempts(&[], false, false));
        let out = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        let docs: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);

        let d = &docs[0];
        let directive = &d["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "NS");
        assert_eq!(directive["Dimensions"], json!([["FunctionName"]]));
        assert!(d["_aws"]["Timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        let names: Vec<&str> = directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names, METRIC_NAMES);
        for m in directive["Metrics"].as_array().unwrap() {
            let unit = if m["Name"] == "UpstreamLatency" || m["Name"] == "TimeToFirstByte" {
                "Milliseconds"
            } else {
                "Count"
            };
            assert_eq!(m["Unit"], unit);
        }
        assert_eq!(d["FunctionName"], "fn-1");
        assert_eq!(d["Requests"], 1);
        assert_eq!(d["Upstream5xx"], 2);
        assert_eq!(d["Upstream429"], 0);
        assert_eq!(d["Retries"], 2);
        assert_eq!(d["ColdStart"], 1);
        assert_eq!(d["UpstreamLatency"], json!([15, 9, 40]));
        assert_eq!(d["TimeToFirstByte"], 120);
        assert_eq!(d["StreamsInterrupted"], 0);
        assert_eq!(d["lambda_request_id"], "req-1");

        // No attempt, no latency sample: the metric is neither declared nor valued.
        let d = &docs[1];
        assert!(d.get("UpstreamLatency").is_none());
        assert_eq!(
            d["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
                .len(),
            METRIC_NAMES.len() - 2
        );
        assert_eq!(d["UpstreamFailures"], 0);
    }
}
