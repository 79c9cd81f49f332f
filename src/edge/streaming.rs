//! `INVOKE_MODE=RESPONSE_STREAM` (spec §10): every invocation answered in Lambda's streaming HTTP
//! integration format — a JSON prelude (`statusCode`, `headers`, `cookies`), 8 NUL bytes (both
//! written by `lambda_runtime`), then the body.
//!
//! A committed `"stream": true` answer is forwarded event by event by a task that outlives the
//! handler: the runtime sends the prelude as soon as the handler returns, then every chunk this
//! task hands over. Everything else (non-stream requests, errors before the commit) is its usual
//! §5 answer as prelude + one body chunk.
//!
//! What Lambda lets us notice of a caller that went away: nothing directly. The body goes to the
//! Runtime API over one HTTP request; when Lambda (or `cargo lambda watch`) stops accepting it,
//! `lambda_runtime` drops the body and the next send here fails. The forwarding task then stops
//! and drops the upstream connection, so OpenAI stops generating for nobody.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use lambda_runtime::StreamResponse;
use lambda_runtime::streaming::{Body, Sender, channel};
use lambda_runtime::tower::Service;
use serde_json::Value;
use tracing::Instrument;

use super::finish::{Ending, StreamLog};
use super::guard::Started;
use super::render::{prelude, whole};
use super::time::Time;
use super::upstreams::Committed;
use super::{Answered, Invocation, Proxy};
use crate::retry::{Clock, TokioSleeper};
use crate::stream::{ApiFlavor, CallerGone, EventSink, StreamLimits, StreamSource, forward};
use crate::upstream::LiveStream;

impl Proxy {
    /// The streaming handler service (the runtime calls it through
    /// [`PanicGuardLayer`](super::guard::PanicGuardLayer)).
    pub fn streaming(
        self: &Arc<Self>,
    ) -> impl Service<
        Started,
        Response = StreamResponse<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        self.handler(Proxy::handle_streaming)
    }

    /// Answers one event in the streaming format, through the panic guard as the runtime does.
    pub async fn handle_streaming_event(
        self: &Arc<Self>,
        event: Value,
        invocation: Invocation,
    ) -> StreamResponse<Body> {
        self.guarded_call(self.streaming(), event, invocation).await
    }

    /// Answers one event (behind the panic guard): a committed stream is forwarded from a task
    /// of its own, anything else is answered whole.
    async fn handle_streaming(self: Arc<Self>, started: Started) -> StreamResponse<Body> {
        let Started {
            event,
            invocation,
            ending,
            span,
        } = started;
        let mut done = self.answer_event(event, &invocation, &ending, true).await;
        match done.live.take() {
            Some(live) => self.start_stream(done, live, ending, span),
            None => {
                let (id, summary, deadline) = (&done.request_id, &done.summary, &done.deadline);
                self.finish(id, summary, &done.resp, deadline, &ending, None);
                whole(done.resp)
            }
        }
    }

    /// Hands the prelude back and forwards the stream from a task of its own; `request finished`
    /// is logged when the stream has ended.
    fn start_stream(
        self: &Arc<Self>,
        done: Answered,
        live: Committed,
        ending: Arc<Ending>,
        span: tracing::Span,
    ) -> StreamResponse<Body> {
        let (tx, body) = channel();
        let metadata_prelude = prelude(&done.resp);
        let sink = LambdaSink {
            tx,
            time: self.time.clone(),
            first_at: None,
        };
        let task = self.clone().forward_stream(done, live, sink, ending);
        tokio::spawn(task.instrument(span));
        StreamResponse {
            metadata_prelude,
            stream: body,
        }
    }

    /// Forwards the committed stream event by event, then logs and records how it went.
    async fn forward_stream(
        self: Arc<Self>,
        done: Answered,
        live: Committed,
        mut sink: LambdaSink,
        ending: Arc<Ending>,
    ) {
        let idle_ms = self
            .state
            .as_ref()
            .map_or(crate::stream::DEFAULT_IDLE_TIMEOUT_MS, |r| {
                r.settings.stream_idle_timeout_ms
            });
        let limits = StreamLimits::new(idle_ms, done.deadline.deadline_ms);
        let flavor = if done.summary.route == "/responses" {
            ApiFlavor::Responses
        } else {
            ApiFlavor::Chat
        };
        let Committed {
            live: LiveStream { prefix, mut reader },
            upstream,
        } = live;
        let source = StreamSource { flavor, upstream };
        // The proxy's clock for the deadline; tokio's timer for the idle gap (real I/O).
        let (clock, sleeper) = (&self.time, &TokioSleeper);
        let report = forward(
            prefix,
            &mut reader,
            &mut sink,
            &source,
            limits,
            clock,
            sleeper,
        )
        .await;
        // Close the upstream connection, log and record, then end the body: once the body has
        // ended Lambda may freeze the environment, and the metrics extension pairs the record
        // with this invocation when the response is complete.
        drop(reader);
        if let Some(detail) = &report.detail {
            tracing::warn!(
                stream_outcome = report.outcome.as_str(),
                caller_gone = report.caller_gone,
                detail = %detail,
                events = report.events,
                "stream ended early"
            );
        }
        let log = StreamLog {
            first_byte_ms: sink.first_at.map(|t| t.saturating_sub(ending.started)),
            bytes: report.bytes,
            outcome: report.outcome,
        };
        let (id, summary, deadline) = (&done.request_id, &done.summary, &done.deadline);
        self.finish(id, summary, &done.resp, deadline, &ending, Some(&log));
        drop(sink);
    }
}

/// The caller's side: `lambda_runtime`'s body channel (it holds one chunk: backpressure).
struct LambdaSink {
    tx: Sender,
    time: Time,
    /// Epoch ms of the first chunk handed to Lambda.
    first_at: Option<u64>,
}

impl EventSink for LambdaSink {
    async fn send(&mut self, bytes: Bytes) -> Result<(), CallerGone> {
        self.tx.send_data(bytes).await.map_err(|_| CallerGone)?;
        self.first_at.get_or_insert_with(|| self.time.now_ms());
        Ok(())
    }
}
