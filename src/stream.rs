//! Real streaming (spec §10): SSE event framing, the commit rule, event-by-event forwarding and
//! the one SSE error event that ends a broken stream.
//!
//! Nothing here knows about reqwest or Lambda: the upstream body is a [`ChunkSource`], the
//! caller's side an [`EventSink`], and time comes from an injected [`Clock`] and [`Sleeper`], so
//! every rule is tested in virtual time.
//!
//! - **Before the commit** ([`await_first_event`]): the upstream answered 2xx with
//!   `text/event-stream`; we read until its first SSE event is complete, within the attempt's
//!   timeout (the §4 budget). A cut or timeout here is an ordinary failed attempt (retryable:
//!   the caller has seen nothing).
//! - **After the commit** ([`forward`]): each event is sent as soon as its blank line arrives
//!   (at most one event is held), nothing is retried, and a cut, an idle gap over
//!   `STREAM_IDLE_TIMEOUT_MS` or the deadline ends the stream with exactly one SSE error event.

use std::future::Future;

use bytes::{Bytes, BytesMut};
use serde_json::json;

use crate::retry::{Clock, FailureKind, Sleeper};
use crate::upstreams::naming::{Naming, capitalized};

/// Lambda's limit for a streamed response (200 MiB). The forwarded body stays below it with room
/// for the prelude and the closing error event.
pub const STREAMED_RESPONSE_LIMIT: usize = 200 * 1024 * 1024;
/// Kept free below [`STREAMED_RESPONSE_LIMIT`] for the prelude and the error event.
const LIMIT_HEADROOM: usize = 64 * 1024;
/// `STREAM_IDLE_TIMEOUT_MS` default.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30_000;

/// Splits a byte stream into raw SSE events, each ending with its blank line.
///
/// An event ends at an empty line; lines end with `\n`, `\r\n` or `\r`. The event's bytes are
/// kept exactly as received (comments, field order, line endings), so forwarding is lossless. A
/// `\r` that is the last byte received so far is not judged until the next byte (it may be the
/// first half of `\r\n`).
#[derive(Debug, Default)]
pub struct EventFramer {
    buf: BytesMut,
    /// Next byte to examine.
    pos: usize,
    /// Whether `pos` is at the start of a line.
    line_start: bool,
}

impl EventFramer {
    pub fn new() -> EventFramer {
        EventFramer {
            buf: BytesMut::new(),
            pos: 0,
            line_start: true,
        }
    }

    /// Adds received bytes; returns the events they complete, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while self.pos < self.buf.len() {
            let b = self.buf[self.pos];
            if b != b'\n' && b != b'\r' {
                self.line_start = false;
                self.pos += 1;
                continue;
            }
            let term = match (b, self.buf.get(self.pos + 1)) {
                (b'\r', None) => break, // maybe `\r\n`: wait for the next byte
                (b'\r', Some(b'\n')) => 2,
                _ => 1,
            };
            let end = self.pos + term;
            if self.line_start {
                events.push(self.buf.split_to(end).freeze());
                self.pos = 0;
            } else {
                self.pos = end;
                self.line_start = true;
            }
        }
        events
    }

    /// Bytes received that do not yet form a complete event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// At the end of the body: what is left (an unterminated last event), if anything.
    pub fn finish(self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.freeze())
    }
}

/// Whether a framed block is an event a client dispatches: it has a field line that is not a
/// comment (`:`…). Blank lines and keep-alive comments do not commit a stream.
pub fn is_dispatchable(event: &[u8]) -> bool {
    event
        .split(|b| *b == b'\n' || *b == b'\r')
        .any(|line| !line.is_empty() && line[0] != b':')
}

/// The upstream body, one network chunk at a time.
pub trait ChunkSource: Send {
    /// The next chunk; `Ok(None)` at a clean end; `Err(detail)` when the body broke off.
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

/// The caller's side of the stream.
pub trait EventSink: Send {
    /// Sends bytes to the caller; `Err` once the caller (or Lambda's side) has gone away.
    fn send(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), CallerGone>> + Send;
}

/// The caller's side closed: nobody reads the stream any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerGone;

impl EventSink for tokio::sync::mpsc::Sender<Bytes> {
    fn send(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), CallerGone>> + Send {
        let tx = self.clone();
        async move { tx.send(bytes).await.map_err(|_| CallerGone) }
    }
}

/// Which SSE error event the SDKs expect on this route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFlavor {
    /// `/v1/chat/completions`, `/v1/completions`: `data: {"error": {...}}`.
    Chat,
    /// `/v1/responses`: `event: error` with `{"type": "error", ..., "sequence_number"}`.
    Responses,
}

/// What a committed stream is, for its one error event: the SSE shape its SDKs expect, and the
/// upstream sending it as §5 messages name it ("OpenAI" for the default single upstream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSource {
    pub flavor: ApiFlavor,
    pub upstream: Naming,
}

/// How a committed stream ended (`stream_outcome`, spec §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamOutcome {
    Complete,
    /// The upstream broke off, the body outgrew Lambda's limit, or the caller went away.
    Cut,
    IdleTimeout,
    Deadline,
}

impl StreamOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamOutcome::Complete => "complete",
            StreamOutcome::Cut => "cut",
            StreamOutcome::IdleTimeout => "idle_timeout",
            StreamOutcome::Deadline => "deadline",
        }
    }

    /// Counted in `StreamsInterrupted`.
    pub fn is_interrupted(self) -> bool {
        self != StreamOutcome::Complete
    }
}

/// The code of the closing error event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamErrorCode {
    Interrupted,
    Timeout,
    TooLarge,
}

impl StreamErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamErrorCode::Interrupted => "upstream_stream_interrupted",
            StreamErrorCode::Timeout => "upstream_timeout",
            StreamErrorCode::TooLarge => "upstream_response_too_large",
        }
    }
}

/// The one SSE error event that ends a broken stream, in the shape the SDKs raise.
/// `last_sequence`: the highest `sequence_number` forwarded (Responses API).
pub fn error_event(
    flavor: ApiFlavor,
    code: StreamErrorCode,
    message: &str,
    last_sequence: Option<u64>,
) -> Bytes {
    let text = match flavor {
        ApiFlavor::Chat => {
            let body = json!({"error": {
                "message": message, "type": "server_error", "code": code.as_str(), "param": null,
            }});
            format!("data: {body}\n\n")
        }
        ApiFlavor::Responses => {
            let body = json!({
                "type": "error", "code": code.as_str(), "message": message, "param": null,
                "sequence_number": last_sequence.map_or(0, |n| n + 1),
            });
            format!("event: error\ndata: {body}\n\n")
        }
    };
    Bytes::from(text)
}

/// The top-level `"sequence_number":N` of a Responses API event. A match cannot come from inside
/// a JSON string (a quote there is escaped), so a byte scan is exact enough.
pub fn sequence_number(event: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sequence_number\":";
    let at = event.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits: Vec<u8> = event[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Reads whole events from a [`ChunkSource`].
pub struct EventReader<S> {
    source: S,
    framer: EventFramer,
    ready: std::collections::VecDeque<Bytes>,
    ended: bool,
}

/// What [`EventReader::next_event`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pulled {
    Event(Bytes),
    /// Clean end of the body.
    End,
    /// The body broke off (`detail` for logs).
    Cut(String),
    /// Nothing arrived for the idle timeout.
    Idle,
    /// The deadline came first.
    Deadline,
}

impl<S: ChunkSource> EventReader<S> {
    pub fn new(source: S) -> EventReader<S> {
        EventReader {
            source,
            framer: EventFramer::new(),
            ready: Default::default(),
            ended: false,
        }
    }

    /// The next complete event. Waits at most `idle_ms` for each chunk and never past
    /// `deadline_ms` (epoch ms); an unterminated last event is returned as an event at the end.
    pub async fn next_event(
        &mut self,
        clock: &impl Clock,
        sleeper: &impl Sleeper,
        idle_ms: u64,
        deadline_ms: u64,
    ) -> Pulled {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Pulled::Event(ev);
            }
            if self.ended {
                return Pulled::End;
            }
            let left = deadline_ms.saturating_sub(clock.now_ms());
            if left == 0 {
                return Pulled::Deadline;
            }
            let wait = idle_ms.min(left);
            let chunk = tokio::select! {
                biased;
                c = self.source.next_chunk() => c,
                () = sleeper.sleep(wait) => {
                    return if wait < idle_ms { Pulled::Deadline } else { Pulled::Idle };
                }
            };
            match chunk {
                Ok(Some(bytes)) => self.ready.extend(self.framer.push(&bytes)),
                Ok(None) => {
                    self.ended = true;
                    let rest = std::mem::take(&mut self.framer).finish();
                    self.ready.extend(rest);
                }
                Err(detail) => return Pulled::Cut(detail),
            }
        }
    }

    /// Bytes received but not yet returned as events (held in the framer).
    pub fn pending(&self) -> usize {
        self.framer.pending()
    }
}

/// Before the commit: the blocks up to and including the first dispatchable event, read within
/// `timeout_ms`. A failure is a normal failed attempt (the caller has seen nothing).
pub async fn await_first_event<S: ChunkSource>(
    reader: &mut EventReader<S>,
    clock: &impl Clock,
    sleeper: &impl Sleeper,
    timeout_ms: u64,
    max_bytes: usize,
) -> Result<Vec<Bytes>, (FailureKind, String)> {
    let until = clock.now_ms().saturating_add(timeout_ms);
    let mut prefix = Vec::new();
    let mut size = 0;
    loop {
        match reader.next_event(clock, sleeper, u64::MAX, until).await {
            Pulled::Event(ev) => {
                size += ev.len();
                let done = is_dispatchable(&ev);
                prefix.push(ev);
                if done {
                    return Ok(prefix);
                }
            }
            Pulled::End => {
                let detail = "the stream ended before its first event".to_owned();
                return Err((FailureKind::IncompleteBody, detail));
            }
            Pulled::Cut(detail) => return Err((FailureKind::IncompleteBody, detail)),
            Pulled::Idle | Pulled::Deadline => {
                let detail = format!("no SSE event within {timeout_ms} ms");
                return Err((FailureKind::Timeout, detail));
            }
        }
        if size + reader.pending() > max_bytes {
            let detail = "the first SSE event outgrew the response limit".to_owned();
            return Err((FailureKind::IncompleteBody, detail));
        }
    }
}

/// Limits of a committed stream.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// `STREAM_IDLE_TIMEOUT_MS`.
    pub idle_timeout_ms: u64,
    /// Epoch ms after which nothing more is forwarded.
    pub deadline_ms: u64,
    /// Body bytes the caller may receive in all (Lambda's 200 MiB minus headroom by default).
    pub max_bytes: usize,
}

impl StreamLimits {
    pub fn new(idle_timeout_ms: u64, deadline_ms: u64) -> StreamLimits {
        StreamLimits {
            idle_timeout_ms,
            deadline_ms,
            max_bytes: STREAMED_RESPONSE_LIMIT - LIMIT_HEADROOM,
        }
    }
}

/// How the forwarding went (for `request finished` and the metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamReport {
    pub outcome: StreamOutcome,
    /// Body bytes handed to the caller, the error event included.
    pub bytes: u64,
    pub events: u64,
    /// The caller went away; upstream reading stopped there.
    pub caller_gone: bool,
    /// What broke, for the log (never content).
    pub detail: Option<String>,
}

/// After the commit: sends `prefix` and then every event as it arrives; ends with one error
/// event if the stream breaks, idles or meets the deadline. Never retries.
pub async fn forward<S: ChunkSource>(
    prefix: Vec<Bytes>,
    reader: &mut EventReader<S>,
    sink: &mut impl EventSink,
    source: &StreamSource,
    limits: StreamLimits,
    clock: &impl Clock,
    sleeper: &impl Sleeper,
) -> StreamReport {
    let mut report = StreamReport {
        outcome: StreamOutcome::Complete,
        bytes: 0,
        events: 0,
        caller_gone: false,
        detail: None,
    };
    let mut last_sequence = None;
    let mut queued = prefix.into_iter();
    loop {
        let pulled = match queued.next() {
            Some(ev) => Pulled::Event(ev),
            None => {
                let (idle, until) = (limits.idle_timeout_ms, limits.deadline_ms);
                reader.next_event(clock, sleeper, idle, until).await
            }
        };
        let broken = match pulled {
            Pulled::Event(ev) if report.bytes as usize + ev.len() > limits.max_bytes => {
                Broken::TooLarge
            }
            Pulled::Event(ev) => {
                if source.flavor == ApiFlavor::Responses {
                    last_sequence = sequence_number(&ev).or(last_sequence);
                }
                report.bytes += ev.len() as u64;
                report.events += u64::from(is_dispatchable(&ev));
                if sink.send(ev).await.is_err() {
                    report.outcome = StreamOutcome::Cut;
                    report.caller_gone = true;
                    report.detail = Some("the caller went away".into());
                    return report;
                }
                continue;
            }
            Pulled::End => return report,
            Pulled::Cut(detail) => Broken::Cut(detail),
            Pulled::Idle => Broken::Idle,
            Pulled::Deadline => Broken::Deadline,
        };
        return close_broken(broken, report, sink, source, last_sequence).await;
    }
}

/// Why a committed stream ends early.
enum Broken {
    Cut(String),
    TooLarge,
    Idle,
    Deadline,
}

/// Ends a broken stream with its one error event.
async fn close_broken(
    broken: Broken,
    mut report: StreamReport,
    sink: &mut impl EventSink,
    source: &StreamSource,
    last_sequence: Option<u64>,
) -> StreamReport {
    let sent = format!(
        "after {} event{}",
        report.events,
        if report.events == 1 { "" } else { "s" }
    );
    let (outcome, code, message, detail) = match broken {
        Broken::Idle => (
            StreamOutcome::IdleTimeout,
            StreamErrorCode::Timeout,
            format!(
                "{} stopped sending {sent}: no data for longer than the proxy's stream idle timeout. The answer is incomplete; the proxy does not retry a stream it has started.",
                source.upstream.subject()
            ),
            "idle timeout".to_owned(),
        ),
        Broken::Deadline => (
            StreamOutcome::Deadline,
            StreamErrorCode::Timeout,
            format!(
                "The stream reached the proxy's deadline {sent} (the Lambda or gateway time limit is near). The answer is incomplete."
            ),
            "deadline".to_owned(),
        ),
        Broken::TooLarge => (
            StreamOutcome::Cut,
            StreamErrorCode::TooLarge,
            format!(
                "The stream outgrew Lambda's 200 MB streamed response limit {sent}; the proxy stopped reading. The answer is incomplete."
            ),
            "over Lambda's streamed response limit".to_owned(),
        ),
        Broken::Cut(detail) => (
            StreamOutcome::Cut,
            StreamErrorCode::Interrupted,
            format!(
                "{} broke off {sent}. The answer is incomplete; the proxy does not retry a stream it has started (that would repeat content).",
                capitalized(&source.upstream.possessive("stream"))
            ),
            detail,
        ),
    };
    let event = error_event(source.flavor, code, &message, last_sequence);
    report.outcome = outcome;
    report.detail = Some(detail);
    let len = event.len() as u64;
    match sink.send(event).await {
        Ok(()) => report.bytes += len,
        Err(CallerGone) => report.caller_gone = true,
    }
    report
}

#[cfg(test)]
mod tests;
