//! Log capture for tests: the project's own JSON layer ([`JsonLines`]) installed as the global
//! subscriber of the test binary, writing into a buffer, plus a scan that fails when any
//! registered secret (API key, client token, secret value) appears in any captured line.
//!
//! Usage in a test: `let logs = support::logs::check(&["sk-…", "token-…"]);` at the start; when
//! `logs` is dropped at the end of a passing test, every line captured so far (from every test of
//! the binary, since the subscriber is global) is scanned for every secret registered so far.
//! [`scan`] is the reusable core: it takes any log text (e.g. a file captured by an end-to-end
//! run) and the secrets to look for.
//!
//! The level is DEBUG for every crate (the SDK, hyper, reqwest included) unless
//! `PROXY_TEST_LOG_LEVEL` says otherwise, so an operator turning on `AWS_LAMBDA_LOG_LEVEL=DEBUG`
//! is covered too.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use openai_lambda_proxy::telemetry::logs::JsonLines;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// One place where a secret showed up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leak {
    /// 1-based line number in the scanned text.
    pub line_no: usize,
    /// Which secret (by its index in the list given to [`scan`]); the value itself is not kept
    /// so a failing test does not print it either.
    pub secret_index: usize,
    /// The line with every secret masked.
    pub masked_line: String,
}

/// Scans log text for secrets. Each secret is looked for verbatim and as it would appear
/// JSON-escaped inside a string; secrets shorter than 8 characters are refused (they would
/// match by accident; tests must use distinctive values).
pub fn scan(text: &str, secrets: &[&str]) -> Vec<Leak> {
    for s in secrets {
        assert!(
            s.len() >= 8,
            "secret scan: use distinctive secrets of 8+ characters"
        );
    }
    let needles: Vec<(usize, String)> = secrets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            let escaped = serde_json::to_string(s).unwrap();
            let escaped = escaped[1..escaped.len() - 1].to_owned();
            [(i, s.to_string()), (i, escaped)]
        })
        .collect();
    let mut leaks = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for (i, needle) in &needles {
            if line.contains(needle.as_str()) {
                leaks.push(Leak {
                    line_no: n + 1,
                    secret_index: *i,
                    masked_line: mask(line, secrets),
                });
            }
        }
    }
    leaks.dedup_by(|a, b| a.line_no == b.line_no && a.secret_index == b.secret_index);
    leaks
}

fn mask(line: &str, secrets: &[&str]) -> String {
    let mut out = line.to_owned();
    for s in secrets {
        out = out.replace(s, "<SECRET>");
    }
    out.chars().take(2000).collect()
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A log event with this message makes the code that logs it panic, once: a real panic in
/// the middle of the proxy's own code path, with no test hook in the proxy. Tests that use it
/// should not run concurrently with others logging the same message in the same binary.
static PANIC_ON: Mutex<Option<&'static str>> = Mutex::new(None);

pub fn panic_once_on(message: &'static str) {
    capture();
    *PANIC_ON.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
}

struct PanicOnce;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicOnce {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        let mut armed = PANIC_ON.lock().unwrap_or_else(|e| e.into_inner());
        if armed.is_some_and(|wanted| wanted == m.0) {
            *armed = None;
            drop(armed);
            panic!("test-forced panic on the log event `{}`", m.0);
        }
    }
}

/// The captured log of this test binary and the secrets registered so far.
pub struct Capture {
    buf: Buf,
    secrets: Mutex<Vec<String>>,
    /// How far the buffer has been found clean, and against how many secrets.
    clean_upto: Mutex<(usize, usize)>,
}

static CAPTURE: OnceLock<Capture> = OnceLock::new();

/// Installs the capturing subscriber once per test binary and returns it.
pub fn capture() -> &'static Capture {
    CAPTURE.get_or_init(|| {
        let buf = Buf::default();
        let sink = buf.clone();
        let level = std::env::var("PROXY_TEST_LOG_LEVEL").unwrap_or_else(|_| "debug".into());
        tracing_subscriber::registry()
            .with(EnvFilter::new(level))
            .with(JsonLines::new(move || sink.clone()))
            .with(PanicOnce)
            .try_init()
            .expect("another global tracing subscriber is already installed");
        Capture {
            buf,
            secrets: Mutex::new(Vec::new()),
            clean_upto: Mutex::new((0, 0)),
        }
    })
}

impl Capture {
    /// Registers values that must never appear in any log line.
    pub fn forbid(&self, secrets: &[&str]) {
        let mut s = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        for x in secrets {
            if !s.iter().any(|known| known == x) {
                s.push(x.to_string());
            }
        }
    }

    /// How many bytes were captured so far (a mark to read from later).
    pub fn len(&self) -> usize {
        self.buf.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Lines captured since `mark` (from [`Capture::len`]), parsed.
    pub fn lines_since(&self, mark: usize) -> Vec<serde_json::Value> {
        let bytes = self.buf.0.lock().unwrap_or_else(|e| e.into_inner())[mark..].to_vec();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| serde_json::from_str(l).expect("every log line is JSON"))
            .collect()
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Captured lines, parsed, of one invocation. Panics if any captured line is not JSON.
    pub fn lines_for(&self, lambda_request_id: &str) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every log line is JSON"))
            .filter(|v| v["lambda_request_id"] == lambda_request_id)
            .collect()
    }

    /// Captured lines, parsed, of one invocation with this `message`.
    pub fn lines_with(&self, lambda_request_id: &str, message: &str) -> Vec<serde_json::Value> {
        let mut lines = self.lines_for(lambda_request_id);
        lines.retain(|l| l["message"] == message);
        lines
    }

    /// Panics if a registered secret appears in any captured line, or a line is not a JSON
    /// object with `timestamp` and `level`. (`message` is not required here: at DEBUG the AWS
    /// SDK emits events with fields only, which the project's layer writes without one.)
    pub fn assert_clean(&self) {
        let secrets = self
            .secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        // Only what was not yet found clean against these secrets (lines are written whole, so
        // the buffer's end is always a line boundary).
        let mut clean = self.clean_upto.lock().unwrap_or_else(|e| e.into_inner());
        let start = if clean.1 == secrets.len() { clean.0 } else { 0 };
        let bytes = self.buf.0.lock().unwrap_or_else(|e| e.into_inner())[start..].to_vec();
        let text = String::from_utf8_lossy(&bytes);
        let leaks = scan(&text, &refs);
        assert!(
            leaks.is_empty(),
            "secrets appear in {} log line(s), e.g. line {}: {}",
            leaks.len(),
            leaks[0].line_no,
            leaks[0].masked_line
        );
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {}", mask(line, &refs)));
            for field in ["timestamp", "level"] {
                assert!(
                    v.get(field).is_some(),
                    "log line without {field}: {}",
                    mask(line, &refs)
                );
            }
        }
        *clean = (start + bytes.len(), secrets.len());
    }
}

/// Registers `secrets` and returns a guard that scans the captured log when dropped at the end
/// of a passing test.
pub fn check(secrets: &[&str]) -> LogCheck {
    let c = capture();
    c.forbid(secrets);
    LogCheck(c)
}

pub struct LogCheck(&'static Capture);

impl LogCheck {
    pub fn capture(&self) -> &'static Capture {
        self.0
    }
}

impl Drop for LogCheck {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.0.assert_clean();
        }
    }
}

#[test]
fn scan_finds_plain_and_escaped_secrets_and_masks_them() {
    let text = "{\"a\":\"ok\"}\n{\"m\":\"key sk-abcdefgh1\"}\n{\"m\":\"q\\\"uote12\"}\n";
    let leaks = scan(text, &["sk-abcdefgh1", "q\"uote12", "never-there"]);
    assert_eq!(leaks.len(), 2);
    assert_eq!((leaks[0].line_no, leaks[0].secret_index), (2, 0));
    assert!(!leaks[0].masked_line.contains("sk-abcdefgh1"));
    assert_eq!((leaks[1].line_no, leaks[1].secret_index), (3, 1));
}
