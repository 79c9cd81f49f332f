//! The retry engine: the pure policy (`policy`: what is retryable, how long to wait), the pure
//! decision after each attempt (`decide`) and the deadline-bounded loop around it (`engine`).
//!
//! None knows about HTTP clients or Lambda: an attempt is a closure that returns an
//! [`AttemptOutcome`], and the clock, the sleep and the randomness are injected.

pub mod decide;
pub mod engine;
pub mod policy;

use bytes::Bytes;

pub use decide::{Decided, Ended, Next, Stop, decide};
pub use engine::{
    AttemptPlan, AttemptRecord, Clock, Decision, GiveUpReason, RetryEngine, RetryRun, RunOutcome,
    Sleeper,
};
pub use policy::{Jitter, RetryPolicy, Verdict};

/// A transport-level failure of one attempt (no complete HTTP answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Could not connect (refused, DNS, TLS handshake, connect timeout).
    Connect,
    /// The connection broke before a complete response head arrived (reset, closed).
    Connection,
    /// The attempt's timeout passed while waiting on the upstream.
    Timeout,
    /// Headers arrived but the body broke off (including a stream cut mid-way).
    IncompleteBody,
    /// The request could not even be built (a value that cannot go in a URL or a header): a bug
    /// or a configuration error, never sent and never retried.
    Unsendable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect_error",
            FailureKind::Connection => "connection_error",
            FailureKind::Timeout => "timeout",
            FailureKind::IncompleteBody => "incomplete_body",
            FailureKind::Unsendable => "request_not_built",
        }
    }
}

/// A complete upstream answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// Empty when `oversized`.
    pub body: Bytes,
    /// The body was longer than the proxy may return (Lambda's response limit) and was not
    /// read. The status still decides retrying; a final oversized answer cannot be passed on.
    pub oversized: bool,
}

impl UpstreamReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The upstream's `x-request-id`.
    pub fn request_id(&self) -> Option<&str> {
        self.header("x-request-id")
    }

    /// `error.code` of an OpenAI error body, if the body is one.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("error")?.get("code")?.as_str().map(str::to_owned)
    }

    /// A complete (not oversized) reply, for the crate's unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(status: u16, headers: &[(&str, &str)], body: &str) -> Self {
        UpstreamReply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            oversized: false,
        }
    }
}

/// What one attempt produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Reply(UpstreamReply),
    Failed { kind: FailureKind, detail: String },
}

impl AttemptOutcome {
    /// Short description for error messages and logs, e.g. `503 Service Unavailable`.
    pub fn describe(&self) -> String {
        match self {
            AttemptOutcome::Reply(r) => {
                let reason = http::StatusCode::from_u16(r.status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                format!("{} {reason}", r.status).trim_end().to_owned()
            }
            AttemptOutcome::Failed { kind, detail } if detail.is_empty() => {
                kind.as_str().to_owned()
            }
            AttemptOutcome::Failed { kind, detail } => format!("{}: {detail}", kind.as_str()),
        }
    }
}

/// Production jitter.
#[derive(Clone, Copy, Debug, Default)]
pub struct FastRandJitter;

impl Jitter for FastRandJitter {
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if lo >= hi { lo } else { fastrand::u64(lo..=hi) }
    }
}

/// Production clock: wall-clock epoch milliseconds (Lambda deadlines are epoch times).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        epoch_ms()
    }
}

pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Production sleep.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(std::time::Duration::from_millis(ms))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{RetryEngine, RetryPolicy};

    /// The spec's defaults: 5 attempts, 1 s base, 8 s cap, `MIN_ATTEMPT_MS` 1 s, no
    /// `ATTEMPT_TIMEOUT_MS`.
    pub(crate) fn engine() -> RetryEngine {
        RetryEngine {
            policy: RetryPolicy {
                max_attempts: 5,
                base_delay_ms: 1000,
                max_delay_ms: 8000,
            },
            min_attempt_ms: 1000,
            attempt_timeout_ms: None,
        }
    }
}
