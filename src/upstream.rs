//! The upstream client: one attempt = one HTTP exchange with OpenAI, classified into an
//! [`AttemptOutcome`]. Built once at cold start; connections are pooled across invocations.

use std::error::Error as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::HeaderValue;
use reqwest::{Method, redirect};
use tokio::time::Instant;

use crate::retry::{AttemptOutcome, FailureKind, SystemClock, TokioSleeper, UpstreamReply};
use crate::stream::{ChunkSource, EventReader, await_first_event};
use crate::upstreams::UpstreamSpec;

/// Response headers worth keeping from the upstream (the rest are dropped).
const KEPT_HEADERS: [&str; 6] = [
    "content-type",
    "x-request-id",
    "openai-processing-ms",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
];

#[derive(Clone, Debug)]
pub struct UpstreamClient {
    http: reqwest::Client,
    /// No answer body is read past this many bytes (Lambda's response limit).
    max_body_bytes: usize,
}

/// The configured part of a request that could not be built ([`UpstreamClient::unsendable_part`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsendablePart {
    BaseUrl,
    Key,
    Organization,
    Project,
}

/// One request to forward (spec §2: only these headers go upstream).
#[derive(Clone, Debug)]
pub struct ForwardRequest {
    pub method: Method,
    /// Path below the base URL, e.g. `/chat/completions`.
    pub path: &'static str,
    pub body: Bytes,
    pub content_type: Option<String>,
    pub idempotency_key: Option<String>,
    pub client_request_id: String,
}

/// One attempt of a request to one upstream: its key (`Authorization: Bearer` for OpenAI,
/// `api-key` for Azure), the body with the model that upstream expects, and the time the
/// attempt may take (the retry engine's `AttemptPlan::timeout_ms`).
#[derive(Clone, Debug)]
pub struct Attempt<'a> {
    pub req: &'a ForwardRequest,
    pub upstream: &'a UpstreamSpec,
    pub api_key: &'a str,
    pub body: Bytes,
    pub timeout_ms: u64,
}

impl UpstreamClient {
    /// `max_body_bytes`: an answer body longer than this is not read (see [`UpstreamReply::oversized`]).
    pub fn new(
        connect_timeout_ms: u64,
        max_body_bytes: usize,
    ) -> Result<UpstreamClient, reqwest::Error> {
        let http = crate::transport::client_builder()
            .connect_timeout(Duration::from_millis(connect_timeout_ms))
            // Never follow redirects: the server's key must not travel to another host.
            .redirect(redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true)
            .user_agent(concat!("openai-lambda-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(UpstreamClient {
            http,
            max_body_bytes,
        })
    }

    /// Which part of a request to `upstream` that could not be built is at fault, if any
    /// (else it is a bug): the base URL, the key, the organization or the project.
    pub fn unsendable_part(
        req: &ForwardRequest,
        upstream: &UpstreamSpec,
        api_key: &str,
    ) -> Option<UnsendablePart> {
        let header_ok = |v: &str| HeaderValue::from_str(v).is_ok();
        let (_, auth) = upstream.kind.auth_header(api_key);
        if reqwest::Url::parse(&format!("{}{}", upstream.base_url, req.path)).is_err() {
            Some(UnsendablePart::BaseUrl)
        } else if !header_ok(&auth) {
            Some(UnsendablePart::Key)
        } else if !upstream.organization.as_deref().is_none_or(header_ok) {
            Some(UnsendablePart::Organization)
        } else if !upstream.project.as_deref().is_none_or(header_ok) {
            Some(UnsendablePart::Project)
        } else {
            None
        }
    }

    /// The request of one attempt, without a timeout, and the instant by which the attempt
    /// must be over (each caller bounds its own part of the exchange by it).
    fn request(&self, a: Attempt<'_>) -> (reqwest::RequestBuilder, Instant) {
        let until = Instant::now() + Duration::from_millis(a.timeout_ms);
        let (req, upstream) = (a.req, a.upstream);
        let (auth_name, auth_value) = upstream.kind.auth_header(a.api_key);
        let mut builder = self
            .http
            .request(
                req.method.clone(),
                format!("{}{}", upstream.base_url, req.path),
            )
            .header(auth_name, auth_value)
            .header("x-client-request-id", &req.client_request_id);
        if req.method == Method::POST {
            builder = builder
                .header(
                    "content-type",
                    req.content_type.as_deref().unwrap_or("application/json"),
                )
                .body(a.body);
        }
        for (name, value) in [
            ("openai-organization", &upstream.organization),
            ("openai-project", &upstream.project),
            ("idempotency-key", &req.idempotency_key),
        ] {
            if let Some(v) = value {
                builder = builder.header(name, v);
            }
        }
        (builder, until)
    }

    /// Sends one attempt and reads the whole answer. Never takes longer than its `timeout_ms`
    /// (connect, headers and body).
    pub async fn send(&self, attempt: Attempt<'_>) -> AttemptOutcome {
        let timeout_ms = attempt.timeout_ms;
        let (builder, until) = self.request(attempt);
        let builder = builder.timeout(Duration::from_millis(timeout_ms));
        // The outer timeout bounds the whole exchange, including reading the body.
        match tokio::time::timeout_at(until, exchange(builder, self.max_body_bytes)).await {
            Ok(outcome) => outcome,
            Err(_) => timed_out(timeout_ms),
        }
    }

    /// Sends one attempt of a `"stream": true` request (spec §10). A 2xx `text/event-stream`
    /// answer is committed once its first SSE event is complete, within `timeout_ms`: the
    /// outcome is then a 2xx reply with an empty body, and the stream comes back to be forwarded.
    /// Anything else (an error status, a stream that breaks or stalls before its first event)
    /// is an ordinary attempt outcome, read as [`UpstreamClient::send`] reads it.
    pub async fn send_stream(&self, attempt: Attempt<'_>) -> (AttemptOutcome, Option<LiveStream>) {
        let timeout_ms = attempt.timeout_ms;
        // No reqwest timeout: it would also cut the body after the commit.
        let (builder, until) = self.request(attempt);
        let response = match tokio::time::timeout_at(until, builder.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return (failed(e, false), None),
            Err(_) => return (timed_out(timeout_ms), None),
        };
        let status = response.status().as_u16();
        let is_sse = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        if !(200..300).contains(&status) || !is_sse {
            let whole = reply(response, self.max_body_bytes);
            return match tokio::time::timeout_at(until, whole).await {
                Ok(outcome) => (outcome, None),
                Err(_) => (timed_out(timeout_ms), None),
            };
        }
        let headers = kept_headers(&response);
        let mut reader = EventReader::new(UpstreamBody(response));
        let left = until.saturating_duration_since(Instant::now()).as_millis() as u64;
        let limit = crate::stream::STREAMED_RESPONSE_LIMIT;
        match await_first_event(&mut reader, &SystemClock, &TokioSleeper, left, limit).await {
            Ok(prefix) => {
                let reply = UpstreamReply {
                    status,
                    headers,
                    body: Bytes::new(),
                    oversized: false,
                };
                let live = LiveStream { prefix, reader };
                (AttemptOutcome::Reply(reply), Some(live))
            }
            Err((kind, detail)) => (AttemptOutcome::Failed { kind, detail }, None),
        }
    }
}

/// A committed upstream stream: the blocks up to its first event, and the reader for the rest.
pub struct LiveStream {
    pub prefix: Vec<Bytes>,
    pub reader: EventReader<UpstreamBody>,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream")
            .field("prefix_events", &self.prefix.len())
            .finish()
    }
}

/// A streaming upstream body; dropping it closes the connection (nobody pays for unread tokens).
pub struct UpstreamBody(reqwest::Response);

impl ChunkSource for UpstreamBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.0.chunk().await.map_err(describe)
    }
}

fn timed_out(timeout_ms: u64) -> AttemptOutcome {
    AttemptOutcome::Failed {
        kind: FailureKind::Timeout,
        detail: format!("no complete answer within {timeout_ms} ms"),
    }
}

async fn exchange(builder: reqwest::RequestBuilder, max_body_bytes: usize) -> AttemptOutcome {
    match builder.send().await {
        Ok(response) => reply(response, max_body_bytes).await,
        Err(e) => failed(e, false),
    }
}

fn kept_headers(response: &reqwest::Response) -> Vec<(String, String)> {
    response
        .headers()
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.starts_with("x-ratelimit-") || KEPT_HEADERS.contains(&n)
        })
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Reads a whole answer (no further than `max_body_bytes`).
async fn reply(response: reqwest::Response, max_body_bytes: usize) -> AttemptOutcome {
    let status = response.status().as_u16();
    let headers = kept_headers(&response);
    // Buffered: a stream that breaks mid-way is a failed attempt the caller never saw.
    match read_capped(response, max_body_bytes).await {
        Ok(body) => AttemptOutcome::Reply(UpstreamReply {
            status,
            headers,
            oversized: body.is_none(),
            body: body.unwrap_or_default(),
        }),
        Err(e) => failed(e, true),
    }
}

/// The whole body, or `None` as soon as it is known to exceed `max` bytes: then nothing more is
/// read and the connection is dropped, so memory stays bounded whatever the upstream sends.
async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Option<Bytes>, reqwest::Error> {
    let announced = response.content_length().unwrap_or(0);
    if announced > max as u64 {
        return Ok(None);
    }
    let mut body = BytesMut::with_capacity(announced as usize);
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

fn failed(e: reqwest::Error, reading_body: bool) -> AttemptOutcome {
    // A connect timeout (CONNECT_TIMEOUT_MS) is a connect error, not the attempt's timeout:
    // reqwest flags it as both, and it leaves the rest of the budget for further attempts.
    // A request that cannot be built fails the same way every time: final, never sent.
    let kind = if e.is_builder() {
        FailureKind::Unsendable
    } else if e.is_connect() {
        FailureKind::Connect
    } else if e.is_timeout() {
        FailureKind::Timeout
    } else if reading_body || e.is_body() || e.is_decode() {
        FailureKind::IncompleteBody
    } else {
        FailureKind::Connection
    };
    AttemptOutcome::Failed {
        kind,
        detail: describe(e),
    }
}

/// The error's causes in one line; without causes, the error itself minus the URL (noise).
fn describe(e: reqwest::Error) -> String {
    let mut causes: Vec<String> = std::iter::successors(e.source(), |s| (*s).source())
        .map(ToString::to_string)
        .collect();
    causes.dedup();
    if causes.is_empty() {
        e.without_url().to_string()
    } else {
        causes.join(": ")
    }
}
