//! # openai-simulator
//!
//! A fault-injecting fake of the OpenAI HTTP API for tests, the demo and benchmarks. HTTP/1.1 is
//! implemented by hand on a raw TCP listener so that transport faults (reset before headers,
//! truncated bodies, hangs) are real socket behaviour, not emulations.
//!
//! ## Routes
//!
//! API routes (base `http://127.0.0.1:PORT/v1`): `POST /v1/chat/completions` (JSON, or SSE when
//! the body has `"stream": true`), `POST /v1/completions` (likewise), `POST /v1/embeddings`,
//! `POST /v1/responses` (SSE with `"stream": true`), `POST /v1/moderations`, `GET /v1/models`,
//! `GET /v1/models/{id}`; the same below `/openai` (Azure OpenAI's v1 API shape,
//! `/openai/v1/chat/completions`). Any other path answers 404 `Invalid URL (METHOD /path)`, and a POST
//! route whose body is not a JSON object answers 400, both in OpenAI's error shape.
//!
//! Control routes (never scripted, never recorded): `PUT|POST /_sim/script` (body: a script,
//! replaces the queue), `GET /_sim/script` (queue and default), `PUT|POST /_sim/default` (body:
//! one step), `GET /_sim/requests` (JSON array of recorded requests), `DELETE /_sim/requests`,
//! `GET /_sim/health`.
//!
//! ## The fault script
//!
//! Every request that is not a control request is recorded and consumes one *step* from the
//! script queue; when the queue is empty the *default step* (initially `ok`) applies. The step
//! decides the answer; with `ok` the route decides (200, or 404/400 for bad paths/bodies).
//!
//! Compact text form: steps separated by `,` (also `;` or newlines), case-insensitive,
//! whitespace ignored. Each step is a head optionally followed by modifiers, each introduced by
//! `:` or `+`:
//!
//! ```text
//! script   = step *( "," step )
//! step     = head *( (":" / "+") modifier )
//! head     = "ok" / "200"            ; 200 with a realistic body for the route
//!          / "delay=" ms              ; same as ok:delay=ms
//!          / status                   ; 400..=599: OpenAI-shaped error body
//!          / "hang"                   ; read the request, never answer
//!          / "reset"                  ; read the request, close with RST before any byte
//!          / "cut"                    ; 200 head with the full Content-Length, half the body, FIN
//!          / "stream-cut"             ; SSE head + the first events only, FIN (= cut if not streaming)
//!          / "big=" size              ; 200 like ok, grown to at least <size> bytes (k/m suffixes; see below)
//!          / "stream" *( ":" smod )   ; a live SSE stream (= ok if not streaming), see below
//! modifier = "delay=" ms              ; ok/status: wait before answering
//!          / "ra=" secs               ; status: retry-after: <secs>
//!          / "ra-ms=" ms              ; status: retry-after-ms: <ms>
//!          / "ra-date=" secs          ; status: retry-after: <IMF-fixdate now+secs>
//!          / "retry=" ("true"/"false"); status: x-should-retry header
//!          / "quota"                  ; 429 only: insufficient_quota instead of rate_limit_exceeded
//! ```
//!
//! A `stream` step answers a streaming request like OpenAI does: `transfer-encoding: chunked`,
//! no content-length, each event sent as soon as it is "generated", split across two TCP writes.
//! Its modifiers (`smod`): `delay=<ms>` before the head; `gap=<ms>` between events (half of it
//! between the two writes of an event); `stall=<n>` sends n events, then nothing more while
//! keeping the connection open; `cut=<n>` sends n events, then closes without the last chunk;
//! `bytes=<n>` (`k`/`m` suffixes) makes the reply text at least that long, in ~1 KiB deltas (a
//! long stream for benchmarks). E.g. `stream:gap=200`, `stream:gap=100:cut=3`, `stream:stall=2`,
//! `stream:bytes=50m`.
//!
//! Aliases: `retry-after=`, `retry-after-ms=`, `retry-after-date=`, `should-retry=`,
//! `stream_cut`. `ra` and `ra-date` together send two `retry-after` headers. Unknown heads or
//! modifiers, statuses outside 400..=599, `quota` on anything but 429 and modifiers on
//! `hang`/`reset`/`cut`/`stream-cut`/`big` are rejected with a message.
//!
//! `big=<bytes>` answers 200 like `ok`, with a body of at least `bytes` bytes (and its
//! `content-length`): on `/v1/embeddings` (not streamed) a list of as many 1536-dimension float
//! embeddings as it takes, as a request with many inputs would get; on any other route the usual
//! answer followed by trailing newlines (still valid JSON or SSE).
//!
//! Examples: `500,500,ok` · `429:ra=2,ok` · `503:ra-ms=250:retry=true,ok` · `429:quota` ·
//! `delay=1500` · `500:delay=200+ra=1` · `reset,cut,stream-cut,hang` · `big=7500000`.
//!
//! Error bodies follow OpenAI: `{"error":{"message":…,"type":…,"param":null,"code":…}}`, with
//! type `server_error` for 5xx (500's message names the request id), `invalid_request_error` for
//! 400, 401 (`code: invalid_api_key`) and 404 (`code: model_not_found`), `requests` /
//! `rate_limit_exceeded` for 429, `insufficient_quota` for `429:quota`, `request_forbidden` for 403.
//!
//! Every API answer carries `x-request-id: req_<32 hex>` (unique), `openai-processing-ms`,
//! `openai-version: 2020-10-01`, `x-ratelimit-limit-requests: 10000`,
//! `x-ratelimit-remaining-requests: 9999`, `content-type` (`application/json` or
//! `text/event-stream`) and a `content-length` (streams are generated in full, so even SSE
//! answers are length-delimited), except the chunked live streams of `stream` steps.
//! Keep-alive is supported; `Connection: close` is honoured.
//!
//! ## JSON form of a step
//!
//! Internally tagged by `kind` (snake_case); optional fields may be omitted:
//!
//! ```json
//! {"kind":"ok"}
//! {"kind":"delay","ms":1500}
//! {"kind":"error","status":429,"retry_after_secs":2,"retry_after_ms":2000,
//!  "retry_after_date_secs":2,"should_retry":true,"quota":false,"delay_ms":0}
//! {"kind":"hang"}  {"kind":"reset"}  {"kind":"cut"}  {"kind":"stream_cut"}
//! {"kind":"big","bytes":7500000}
//! {"kind":"stream","delay_ms":0,"gap_ms":200,"stall_after":2,"cut_after":3,"bytes":52428800}
//! ```
//!
//! The control routes accept compact text, a JSON string holding compact text, one step object,
//! or a JSON array mixing step objects and compact-text strings.
//!
//! ## Recorded requests
//!
//! [`RecordedRequest`] serializes `body` as a (lossy) UTF-8 string; header names are lower-cased.

mod http;
mod routes;
mod step;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use step::{ErrorStep, Step, StreamStep, parse_script};

use http::{ReadError, Request};
use routes::{Ctx, RouteAnswer};

/// One API request as the simulator received it.
///
/// JSON form: `body` is a UTF-8 string (invalid bytes replaced by U+FFFD); `headers` is an array
/// of `[name, value]` pairs with lower-cased names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    /// Request target as sent, including any query string.
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    #[serde(serialize_with = "ser_body", deserialize_with = "de_body")]
    pub body: Vec<u8>,
    /// Unix epoch milliseconds when the request was fully read.
    pub received_at_ms: u64,
}

impl RecordedRequest {
    /// First value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

fn ser_body<S: Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(body))
}

fn de_body<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    Ok(String::deserialize(d)?.into_bytes())
}

struct Shared {
    script: Mutex<VecDeque<Step>>,
    default: Mutex<Step>,
    requests: Mutex<Vec<RecordedRequest>>,
    log: AtomicBool,
    counter: AtomicU64,
    seed: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Shared {
    /// 32 hex digits, unique per call (splitmix64 is a bijection of the counter).
    fn unique_hex(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:016x}{:016x}",
            splitmix(self.seed ^ n),
            splitmix(self.seed.rotate_left(17) ^ n)
        )
    }

    fn next_step(&self) -> Step {
        lock(&self.script)
            .pop_front()
            .unwrap_or_else(|| lock(&self.default).clone())
    }
}

struct ShutdownGuard(watch::Sender<bool>);

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// A running simulator. Cheap to clone; the server stops when [`Simulator::shutdown`] is called
/// on any clone or when the last clone is dropped.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    guard: Arc<ShutdownGuard>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Simulator {
    /// Bind 127.0.0.1:port (0 = ephemeral) and serve in a background tokio task.
    pub async fn start(port: u16) -> std::io::Result<Simulator> {
        Simulator::start_on(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)).await
    }

    /// Like [`Simulator::start`] but on any address (e.g. `0.0.0.0:8089` in a container).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((addr.port() as u64) << 48);
        let shared = Arc::new(Shared {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Step::Ok),
            requests: Mutex::new(Vec::new()),
            log: AtomicBool::new(false),
            counter: AtomicU64::new(0),
            seed: splitmix(seed),
        });
        let (tx, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), rx));
        Ok(Simulator {
            shared,
            guard: Arc::new(ShutdownGuard(tx)),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1` (an unspecified bind address is reported as 127.0.0.1).
    pub fn base_url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.addr.ip()
        };
        format!("http://{}/v1", SocketAddr::new(ip, self.addr.port()))
    }

    /// Replace the queue of scripted steps. Each API request pops one step; when the queue is
    /// empty the default step applies.
    pub fn set_script(&self, steps: Vec<Step>) {
        *lock(&self.shared.script) = steps.into();
    }

    /// Append steps to the queue.
    pub fn push_steps(&self, steps: impl IntoIterator<Item = Step>) {
        lock(&self.shared.script).extend(steps);
    }

    /// Steps still queued.
    pub fn script(&self) -> Vec<Step> {
        lock(&self.shared.script).iter().cloned().collect()
    }

    /// The step used when the queue is empty (initially [`Step::Ok`]).
    pub fn set_default(&self, step: Step) {
        *lock(&self.shared.default) = step;
    }

    /// Every API request received (control requests excluded), in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Log one line per request to stderr (method, path, step, status). Off by default.
    pub fn set_log(&self, on: bool) {
        self.shared.log.store(on, Ordering::Relaxed);
    }

    /// Stop the listener and close every open connection (hanging ones included).
    pub fn shutdown(self) {
        self.guard.0.send_replace(true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut rx: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = rx.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((sock, _peer)) = accepted else {
            // Transient accept errors (e.g. EMFILE): back off briefly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let mut rx = rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = rx.wait_for(|stop| *stop) => {}
                _ = serve_conn(shared, sock) => {}
            }
        });
    }
}

enum After {
    KeepGoing,
    Close,
}

async fn serve_conn(shared: Arc<Shared>, mut sock: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let req = match http::read_request(&mut sock, &mut buf).await {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Io) => return,
            Err(ReadError::Bad(msg)) => {
                let _ = write_plain(&mut sock, 400, &msg).await;
                return;
            }
            Err(ReadError::TooLarge(status)) => {
                let _ = write_plain(&mut sock, status, "request too large").await;
                return;
            }
        };
        let keep_alive = req.keep_alive();
        let after = if req.path() == "/_sim" || req.path().starts_with("/_sim/") {
            control(&shared, &req, &mut sock, keep_alive).await
        } else {
            api(&shared, req, &mut sock, keep_alive).await
        };
        match after {
            Ok(After::KeepGoing) if keep_alive => continue,
            _ => return,
        }
    }
}

async fn write_plain(sock: &mut TcpStream, status: u16, msg: &str) -> std::io::Result<()> {
    let body = serde_json::to_string(&routes::error_value(
        msg,
        "invalid_request_error",
        None,
        None,
    ))
    .unwrap_or_default();
    let headers = vec![("content-type".to_string(), "application/json".to_string())];
    let mut out = http::head(status, &headers, body.len(), true);
    out.extend_from_slice(body.as_bytes());
    sock.write_all(&out).await?;
    sock.flush().await
}

async fn write_response(
    sock: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> std::io::Result<After> {
    let mut out = http::head(status, headers, body.len(), close);
    out.extend_from_slice(body);
    sock.write_all(&out).await?;
    sock.flush().await?;
    Ok(if close {
        After::Close
    } else {
        After::KeepGoing
    })
}

fn to_json(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

async fn control(
    shared: &Shared,
    req: &Request,
    sock: &mut TcpStream,
    keep_alive: bool,
) -> std::io::Result<After> {
    let json_ct = vec![("content-type".to_string(), "application/json".to_string())];
    let text = String::from_utf8_lossy(&req.body);
    let bad = |msg: String| {
        (
            400u16,
            to_json(&routes::error_value(
                &msg,
                "invalid_request_error",
                None,
                None,
            )),
        )
    };
    let (status, body): (u16, Vec<u8>) = match (req.method.as_str(), req.path()) {
        (_, "/_sim/health") => (200, to_json(&serde_json::json!({"status": "ok"}))),
        ("PUT" | "POST", "/_sim/script") => match step::parse_steps_body(&text) {
            Ok(steps) => {
                let out = serde_json::json!({"script": steps.iter().map(|s| s.to_string()).collect::<Vec<_>>()});
                *lock(&shared.script) = steps.into();
                (200, to_json(&out))
            }
            Err(e) => bad(e),
        },
        ("GET", "/_sim/script") => (
            200,
            to_json(&serde_json::json!({
                "script": lock(&shared.script).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "default": lock(&shared.default).to_string(),
            })),
        ),
        ("PUT" | "POST", "/_sim/default") => match step::parse_steps_body(&text) {
            Ok(mut steps) if steps.len() == 1 => {
                let step = steps.remove(0);
                let out = serde_json::json!({"default": step.to_string()});
                *lock(&shared.default) = step;
                (200, to_json(&out))
            }
            Ok(steps) => bad(format!("expected exactly one step, got {}", steps.len())),
            Err(e) => bad(e),
        },
        ("GET", "/_sim/requests") => (200, to_json(&*lock(&shared.requests))),
        ("DELETE", "/_sim/requests") => {
            lock(&shared.requests).clear();
            (200, to_json(&serde_json::json!({"cleared": true})))
        }
        (m, p) => (
            404,
            to_json(&routes::error_value(
                &format!("Invalid URL ({m} {p})"),
                "invalid_request_error",
                None,
                None,
            )),
        ),
    };
    write_response(sock, status, &json_ct, &body, !keep_alive).await
}

async fn api(
    shared: &Shared,
    req: Request,
    sock: &mut TcpStream,
    keep_alive: bool,
) -> std::io::Result<After> {
    let started = Instant::now();
    let received_at_ms = now_ms();
    let step = shared.next_step();
    let record = RecordedRequest {
        method: req.method.clone(),
        path: req.target.clone(),
        headers: req.headers.clone(),
        body: req.body.clone(),
        received_at_ms,
    };
    lock(&shared.requests).push(record);

    let request_id = format!("req_{}", shared.unique_hex());
    let hex = shared.unique_hex();
    let ctx = Ctx {
        hex: &hex,
        now_secs: received_at_ms / 1000,
        reply_bytes: match &step {
            Step::Stream(st) => st.bytes,
            _ => 0,
        },
    };
    let log = |status: &str| {
        if shared.log.load(Ordering::Relaxed) {
            eprintln!(
                "openai-simulator: {} {} step={} status={} {}",
                req.method, req.target, step, status, request_id
            );
        }
    };

    let delay_ms = match &step {
        Step::Delay { ms } => *ms,
        Step::Error(e) => e.delay_ms,
        Step::Stream(st) => st.delay_ms,
        _ => 0,
    };

    match &step {
        Step::Hang => {
            log("none(hang)");
            // Keep the socket open until the client goes away (or shutdown drops this task).
            let mut scratch = [0u8; 4096];
            while let Ok(n) = sock.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
            return Ok(After::Close);
        }
        Step::Reset => {
            log("none(reset)");
            sock.set_zero_linger()?;
            return Ok(After::Close);
        }
        _ => {}
    }

    let answer: RouteAnswer = match &step {
        Step::Error(e) => routes::error_answer(e, &routes::model_of(&req.body), &request_id),
        Step::Big { bytes } => {
            let ok = routes::route(&req.method, req.path(), &req.body, &ctx);
            routes::grow(ok, req.path(), *bytes as usize)
        }
        _ => routes::route(&req.method, req.path(), &req.body, &ctx),
    };
    let cutting = matches!(step, Step::Cut | Step::StreamCut);
    log(&if cutting {
        format!("{}(truncated)", answer.status)
    } else {
        answer.status.to_string()
    });

    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }

    let mut headers: Vec<(String, String)> = vec![
        ("content-type".into(), answer.content_type.into()),
        ("x-request-id".into(), request_id.clone()),
        (
            "openai-processing-ms".into(),
            (started.elapsed().as_millis() as u64 + 3).to_string(),
        ),
        ("openai-version".into(), "2020-10-01".into()),
        ("openai-organization".into(), "org-simulator".into()),
        ("x-ratelimit-limit-requests".into(), "10000".into()),
        ("x-ratelimit-remaining-requests".into(), "9999".into()),
        ("x-ratelimit-limit-tokens".into(), "10000000".into()),
        ("x-ratelimit-remaining-tokens".into(), "9999990".into()),
        ("x-ratelimit-reset-requests".into(), "6ms".into()),
        ("x-ratelimit-reset-tokens".into(), "0s".into()),
    ];
    if answer.stream {
        headers.push(("cache-control".into(), "no-cache".into()));
    }
    if let Step::Error(e) = &step {
        if let Some(s) = e.retry_after_secs {
            headers.push(("retry-after".into(), s.to_string()));
        }
        if let Some(ms) = e.retry_after_ms {
            headers.push(("retry-after-ms".into(), ms.to_string()));
        }
        if let Some(s) = e.retry_after_date_secs {
            let when = SystemTime::now() + Duration::from_secs(s);
            headers.push(("retry-after".into(), httpdate::fmt_http_date(when)));
        }
        if let Some(r) = e.should_retry {
            headers.push(("x-should-retry".into(), r.to_string()));
        }
    }

    if cutting {
        // Announce the full length, send only part of it, then close gracefully (FIN).
        // stream-cut on a stream: the first half of the SSE events (never the terminator).
        let n = answer.event_ends.len();
        let sent = if matches!(step, Step::StreamCut) && answer.stream && n > 1 {
            answer.event_ends[(n / 2).max(1) - 1]
        } else {
            answer.body.len() / 2
        };
        let mut out = http::head(answer.status, &headers, answer.body.len(), true);
        out.extend_from_slice(&answer.body[..sent]);
        sock.write_all(&out).await?;
        sock.flush().await?;
        sock.shutdown().await?;
        // Drain until the client closes so the kernel does not turn our close into an RST
        // (which could make the client drop the partial data it already received).
        let mut scratch = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n) = sock.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        return Ok(After::Close);
    }

    if let Step::Stream(st) = &step
        && answer.stream
    {
        return write_live_stream(sock, &answer, &headers, st, !keep_alive).await;
    }
    write_response(sock, answer.status, &headers, &answer.body, !keep_alive).await
}

/// A live SSE answer: chunked, each event in two writes, gaps between them; optionally stalled
/// or cut after some events.
async fn write_live_stream(
    sock: &mut TcpStream,
    answer: &RouteAnswer,
    headers: &[(String, String)],
    st: &StreamStep,
    close: bool,
) -> std::io::Result<After> {
    sock.write_all(&http::head_with(answer.status, headers, None, close))
        .await?;
    sock.flush().await?;
    let half_gap = Duration::from_millis(st.gap_ms / 2);
    let mut start = 0;
    for (n, &end) in answer.event_ends.iter().enumerate() {
        let n = n as u64;
        if st.cut_after == Some(n) {
            // No last chunk: the body is incomplete. Drain so the close is a FIN, not an RST.
            sock.shutdown().await?;
            drain(sock, Duration::from_secs(5)).await;
            return Ok(After::Close);
        }
        if st.stall_after == Some(n) {
            drain(sock, Duration::MAX).await;
            return Ok(After::Close);
        }
        let event = &answer.body[start..end];
        let (a, b) = event.split_at(event.len() / 2);
        for (i, part) in [a, b].into_iter().enumerate() {
            sock.write_all(&http::chunk(part)).await?;
            sock.flush().await?;
            let last_write = i == 1 && end == answer.body.len();
            if !half_gap.is_zero() && !last_write {
                tokio::time::sleep(half_gap).await;
            }
        }
        start = end;
    }
    sock.write_all(&http::chunk(b"")).await?;
    sock.flush().await?;
    Ok(if close {
        After::Close
    } else {
        After::KeepGoing
    })
}

/// Reads and discards until the client closes (or `limit` passes).
async fn drain(sock: &mut TcpStream, limit: Duration) {
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        while let Ok(n) = sock.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
