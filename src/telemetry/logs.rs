//! JSON logs for CloudWatch Logs (spec §6): one flat JSON object per line with `timestamp`,
//! `level`, `message`, `lambda_request_id` and the event's fields at the top level, so Logs
//! Insights reads `outcome`, `attempts`… directly.
//!
//! Whatever a caller sends, a line stays far below CloudWatch's 256 KB event limit: values a
//! client or the upstream controls (`model`, upstream request ids) are cut to
//! [`CLIENT_FIELD_CHARS`], every other string to [`FIELD_CHARS`], on a character boundary and
//! marked as cut. And every line written while an invocation runs (or its metrics are flushed
//! after the response) carries `lambda_request_id`: from the invocation's span, from the Lambda
//! runtime's span (`requestId`), or else the invocation in progress (one at a time per
//! execution environment), for lines of tasks outside any span (SDK, extension).

use std::borrow::Cow;
use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Fields named `json.<name>` carry JSON text (lists, nulls) and are logged as `<name>: <JSON>`.
const JSON_PREFIX: &str = "json.";

/// Longest logged value of a field a client or the upstream controls.
pub const CLIENT_FIELD_CHARS: usize = 200;
/// Longest logged value of any other string field (messages, error details).
pub const FIELD_CHARS: usize = 2_000;
/// Fields whose values come from the caller or the upstream.
const CLIENT_FIELDS: [&str; 3] = ["model", "upstream_request_id", "upstream_request_ids"];

/// `s` cut to `max` characters on a character boundary, marked as cut (with its full size).
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((end, _)) => Cow::Owned(format!("{}…[cut, {} bytes]", &s[..end], s.len())),
    }
}

/// Every string inside `v` clipped to `max` characters.
fn clip_value(v: Value, max: usize) -> Value {
    match v {
        Value::String(s) => match clip(&s, max) {
            Cow::Borrowed(_) => Value::String(s),
            Cow::Owned(cut) => Value::String(cut),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(|x| clip_value(x, max)).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, x)| (k, clip_value(x, max)))
                .collect(),
        ),
        other => other,
    }
}

fn limit_for(field: &str) -> usize {
    if CLIENT_FIELDS.contains(&field) {
        CLIENT_FIELD_CHARS
    } else {
        FIELD_CHARS
    }
}

/// The invocation in progress in this execution environment.
static CURRENT_INVOCATION: Mutex<Option<Arc<str>>> = Mutex::new(None);

/// Marks `lambda_request_id` as the invocation in progress: lines written outside its span
/// (other tasks, the metrics flush after the response) carry it until the next one starts.
pub fn begin_invocation(lambda_request_id: &str) {
    *CURRENT_INVOCATION.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Arc::from(lambda_request_id));
}

fn current_invocation() -> Option<Arc<str>> {
    CURRENT_INVOCATION
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Writes each event as one flat JSON line to `W`.
pub struct JsonLines<W> {
    make_writer: W,
}

impl<W> JsonLines<W> {
    pub fn new(make_writer: W) -> Self {
        JsonLines { make_writer }
    }
}

/// Fields of a span, inherited by every event inside it (e.g. `lambda_request_id`).
struct SpanFields(Map<String, Value>);

struct Collect<'a>(&'a mut Map<String, Value>);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name().strip_prefix(JSON_PREFIX) {
            Some(name) => {
                let v = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
                self.0
                    .insert(name.to_owned(), clip_value(v, limit_for(name)))
            }
            None => {
                let v = clip(value, limit_for(field.name()));
                self.0.insert(field.name().to_owned(), Value::from(v))
            }
        };
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut Collect(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::from(timestamp()));
        line.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str()),
        );
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut Collect(&mut line));
        // Some library events carry fields only; every line still has a `message` (§6).
        line.entry("message").or_insert_with(|| Value::from(""));
        if !line.contains_key("lambda_request_id") {
            let id = match line.get("requestId") {
                Some(Value::String(runtime_id)) => Some(Value::from(runtime_id.as_str())),
                _ => current_invocation().map(|id| Value::from(&*id)),
            };
            line.extend(id.map(|id| ("lambda_request_id".to_owned(), id)));
        }
        if !event
            .metadata()
            .target()
            .starts_with(env!("CARGO_CRATE_NAME"))
        {
            line.insert("target".into(), Value::from(event.metadata().target()));
        }
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        // One write per line so concurrent writers never interleave inside a line.
        let _ = self.make_writer.make_writer().write_all(&bytes);
    }
}

fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The level filter: `AWS_LAMBDA_LOG_LEVEL`, else `RUST_LOG`, else INFO.
pub fn filter_from(lambda_level: Option<&str>, rust_log: Option<&str>) -> EnvFilter {
    let directive = match lambda_level.map(str::trim).filter(|l| !l.is_empty()) {
        // Lambda's FATAL has no tracing equivalent; ERROR is the closest.
        Some(l) if l.eq_ignore_ascii_case("fatal") => "error".to_owned(),
        Some(l) => l.to_ascii_lowercase(),
        None => rust_log
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .unwrap_or("info")
            .to_owned(),
    };
    EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the JSON logger on stdout as the global subscriber.
pub fn init() {
    let filter = filter_from(
        std::env::var("AWS_LAMBDA_LOG_LEVEL").ok().as_deref(),
        std::env::var("RUST_LOG").ok().as_deref(),
    );
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(JsonLines::new(std::io::stdout))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_flat_json_with_span_fields() {
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(move || sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("invocation", lambda_request_id = "req-1");
            let _g = span.enter();
            let ids = serde_json::json!(["a", "b"]);
            tracing::info!(attempts = 3u32, outcome = "success", json.upstream_request_ids = %ids, json.code = %serde_json::Value::Null, "request finished");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["message"], "request finished");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["lambda_request_id"], "req-1");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["upstream_request_ids"], serde_json::json!(["a", "b"]));
        assert!(v.as_object().unwrap().contains_key("code") && v["code"].is_null());
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("fields").is_none() && v.get("span").is_none());
    }

    fn lines_of(f: impl FnOnce()) -> Vec<Value> {
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(move || sink.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn client_values_are_cut_short_on_a_char_boundary_and_marked() {
        let model = "é".repeat(1_000_000);
        let lines = lines_of(|| {
            let span = tracing::info_span!("invocation", lambda_request_id = "req-cut");
            let _g = span.enter();
            let ids = serde_json::json!(["x".repeat(100_000), "req_ok"]);
            tracing::info!(json.model = %serde_json::json!(model), json.upstream_request_ids = %ids, detail = %"d".repeat(100_000), "request finished");
        });
        let line = serde_json::to_string(&lines[0]).unwrap();
        assert!(line.len() < 8_000, "{} bytes", line.len());
        let logged = lines[0]["model"].as_str().unwrap();
        assert!(logged.starts_with(&"é".repeat(200)), "{logged}");
        assert!(!logged.starts_with(&"é".repeat(201)));
        assert!(logged.ends_with("…[cut, 2000000 bytes]"), "{logged}");
        assert_eq!(lines[0]["upstream_request_ids"][1], "req_ok");
        assert!(
            lines[0]["upstream_request_ids"][0]
                .as_str()
                .unwrap()
                .contains("[cut")
        );
        assert_eq!(
            lines[0]["detail"].as_str().unwrap().chars().count(),
            2_000 + "…[cut, 100000 bytes]".chars().count()
        );
        assert_eq!(clip("short", 200), "short");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…[cut, 4 bytes]");
    }

    #[test]
    fn lines_outside_the_invocation_span_still_carry_lambda_request_id() {
        let lines = lines_of(|| {
            // The Lambda runtime's own span names it `requestId`.
            let span = tracing::info_span!("Lambda runtime invoke", requestId = "req-runtime");
            span.in_scope(|| tracing::debug!("from the runtime"));
            // A task outside any span (SDK, metrics flush) during an invocation.
            begin_invocation("req-current");
            tracing::debug!("from another task");
            let span = tracing::info_span!("invocation", lambda_request_id = "req-own");
            span.in_scope(|| tracing::info!("inside"));
        });
        let ids: Vec<&Value> = lines.iter().map(|l| &l["lambda_request_id"]).collect();
        assert_eq!(ids, ["req-runtime", "req-current", "req-own"]);
    }

    #[test]
    fn level_comes_from_lambda_then_rust_log() {
        assert_eq!(
            filter_from(Some("DEBUG"), Some("error")).to_string(),
            "debug"
        );
        assert_eq!(filter_from(Some("FATAL"), None).to_string(), "error");
        assert_eq!(filter_from(None, Some("warn")).to_string(), "warn");
        assert_eq!(filter_from(None, None).to_string(), "info");
    }
}
