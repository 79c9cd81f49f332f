//! The upstream client: one attempt = one HTTP exchange with OpenAI, classified into an
//! [`AttemptOutcome`]. Built once at cold start; connections are pooled across invocations.

use std::error::Error as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{Method, redirect};

use crate::retry::{AttemptOutcome, FailureKind, UpstreamReply};

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
    base_url: String,
    /// No answer body is read past this many bytes (Lambda's response limit).
    max_body_bytes: usize,
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
    pub organization: Option<String>,
    pub project: Option<String>,
}

impl UpstreamClient {
    /// `max_body_bytes`: an answer body longer than this is not read (see [`UpstreamReply::oversized`]).
    pub fn new(
        base_url: &str,
        connect_timeout_ms: u64,
        max_body_bytes: usize,
    ) -> Result<UpstreamClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(connect_timeout_ms))
            // Never follow redirects: the server's key must not travel to another host.
            .redirect(redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true)
            .user_agent(concat!("openai-lambda-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(UpstreamClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            max_body_bytes,
        })
    }

    /// Sends one attempt; never takes longer than `timeout_ms` (connect, headers and body).
    pub async fn send(
        &self,
        req: &ForwardRequest,
        api_key: &str,
        timeout_ms: u64,
    ) -> AttemptOutcome {
        let timeout = Duration::from_millis(timeout_ms);
        let mut builder = self
            .http
            .request(req.method.clone(), format!("{}{}", self.base_url, req.path))
            .bearer_auth(api_key)
            .header("x-client-request-id", &req.client_request_id)
            .timeout(timeout);
        if req.method == Method::POST {
            builder = builder
                .header(
                    "content-type",
                    req.content_type.as_deref().unwrap_or("application/json"),
                )
                .body(req.body.clone());
        }
        for (name, value) in [
            ("openai-organization", &req.organization),
            ("openai-project", &req.project),
            ("idempotency-key", &req.idempotency_key),
        ] {
            if let Some(v) = value {
                builder = builder.header(name, v);
            }
        }
        // The outer timeout bounds the whole exchange, including reading the body.
        match tokio::time::timeout(timeout, exchange(builder, self.max_body_bytes)).await {
            Ok(outcome) => outcome,
            Err(_) => AttemptOutcome::Failed {
                kind: FailureKind::Timeout,
                detail: format!("no complete answer within {timeout_ms} ms"),
            },
        }
    }
}

async fn exchange(builder: reqwest::RequestBuilder, max_body_bytes: usize) -> AttemptOutcome {
    let response = match builder.send().await {
        Ok(r) => r,
        Err(e) => return failed(e, false),
    };
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.starts_with("x-ratelimit-") || KEPT_HEADERS.contains(&n)
        })
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
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
    let kind = if e.is_connect() {
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
