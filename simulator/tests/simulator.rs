//! End-to-end tests of the simulator over raw TCP (no HTTP client library).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use openai_simulator::{ErrorStep, RecordedRequest, Simulator, Step, parse_script};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Number of body bytes announced by content-length.
    content_length: usize,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn complete(&self) -> bool {
        self.body.len() == self.content_length
    }
}

struct Client {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            sock: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, method: &str, path: &str, body: &str, extra: &[(&str, &str)]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.sock.write_all(req.as_bytes()).await.unwrap();
    }

    /// Read one response. Errors if the connection ends (or fails) before a complete head; an
    /// early EOF inside the body yields a response with `complete() == false`.
    async fn read(&mut self) -> std::io::Result<Resp> {
        loop {
            let mut hdrs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hdrs);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                let status = r.code.unwrap();
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                self.buf.drain(..n);
                let content_length: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map(|(_, v)| v.parse().unwrap())
                    .expect("every response has content-length");
                while self.buf.len() < content_length {
                    let mut tmp = [0u8; 8192];
                    match self.sock.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => self.buf.extend_from_slice(&tmp[..k]),
                    }
                }
                let take = content_length.min(self.buf.len());
                let body = self.buf.drain(..take).collect();
                return Ok(Resp {
                    status,
                    headers,
                    body,
                    content_length,
                });
            }
            let mut tmp = [0u8; 8192];
            let k = self.sock.read(&mut tmp).await?;
            if k == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "EOF before response head",
                ));
            }
            self.buf.extend_from_slice(&tmp[..k]);
        }
    }

    async fn call(&mut self, method: &str, path: &str, body: &str) -> Resp {
        self.send(method, path, body, &[]).await;
        self.read().await.unwrap()
    }
}

async fn call(sim: &Simulator, method: &str, path: &str, body: &str) -> Resp {
    let mut c = Client::connect(sim.addr()).await;
    c.send(method, path, body, &[("connection", "close")]).await;
    c.read().await.unwrap()
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#;

fn assert_openai_headers(r: &Resp) {
    let id = r.header("x-request-id").expect("x-request-id");
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
    assert!(id[4..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        r.header("openai-processing-ms")
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    assert_eq!(r.header("openai-version"), Some("2020-10-01"));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("10000"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("9999"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_for_every_route() {
    let sim = Simulator::start(0).await.unwrap();
    assert_eq!(
        sim.base_url(),
        format!("http://127.0.0.1:{}/v1", sim.addr().port())
    );

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 200);
    assert_openai_headers(&r);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the OpenAI simulator."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    let r = call(
        &sim,
        "POST",
        "/v1/completions",
        r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say hi"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "gpt-3.5-turbo-instruct");
    assert!(v["choices"][0]["text"].is_string());

    let r = call(
        &sim,
        "POST",
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"hello"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert!(v["usage"]["prompt_tokens"].is_u64());

    let r = call(
        &sim,
        "POST",
        "/v1/responses",
        r#"{"model":"gpt-4.1","input":"hi"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gpt-4.1");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");

    let r = call(&sim, "POST", "/v1/moderations", r#"{"input":"hi"}"#).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("modr-"));
    assert_eq!(v["results"][0]["flagged"], false);

    let r = call(&sim, "GET", "/v1/models", "").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert!(v["data"].as_array().unwrap().len() >= 3);
    assert_eq!(v["data"][0]["object"], "model");

    sim.shutdown();
}

/// Azure OpenAI's v1 API shape: the same routes below `/openai`; other prefixes stay unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_v1_paths_are_served_too() {
    let sim = Simulator::start(0).await.unwrap();
    let r = call(&sim, "POST", "/openai/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(call(&sim, "GET", "/openai/v1/models", "").await.status, 200);
    assert_eq!(
        call(&sim, "POST", "/openai/chat/completions", CHAT)
            .await
            .status,
        404
    );
    assert_eq!(
        call(&sim, "POST", "/azure/v1/chat/completions", CHAT)
            .await
            .status,
        404
    );
    assert_eq!(sim.requests()[0].path, "/openai/v1/chat/completions");
    sim.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_and_bad_json() {
    let sim = Simulator::start(0).await.unwrap();
    let r = call(&sim, "POST", "/v1/nope", "{}").await;
    assert_eq!(r.status, 404);
    assert_openai_headers(&r);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["message"], "Invalid URL (POST /v1/nope)");

    let r = call(&sim, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["param"].is_null());
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not parse the JSON body")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_and_headers() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(
        parse_script(
            "500,503:ra=2,429:ra-ms=1500:retry=false,429:quota,401,404,400,502:ra-date=30+retry=true,403",
        )
        .unwrap(),
    );

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 500);
    assert_openai_headers(&r);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("retry-after").is_none());
    let v = r.json();
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v["error"]["param"].is_null());
    assert!(v["error"]["code"].is_null());
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("The server had an error processing your request. Sorry about that!"));
    assert!(msg.contains(r.header("x-request-id").unwrap()), "{msg}");
    // Field order as OpenAI sends it.
    let t = r.text();
    let pos = |k: &str| t.find(&format!("\"{k}\"")).unwrap();
    assert!(
        pos("message") < pos("type") && pos("type") < pos("param") && pos("param") < pos("code")
    );

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.json()["error"]["type"], "server_error");

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after-ms"), Some("1500"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let v = r.json();
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 429);
    let v = r.json();
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert!(v["error"]["message"].as_str().unwrap().starts_with(
        "You exceeded your current quota, please check your plan and billing details"
    ));

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 401);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "invalid_api_key");

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 404);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-4o-mini")
    );

    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    let r = call(&sim, "POST", "/v1/embeddings", r#"{"input":"x"}"#).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-should-retry"), Some("true"));
    let when = httpdate::parse_http_date(r.header("retry-after").unwrap()).unwrap();
    let ahead = when.duration_since(SystemTime::now()).unwrap().as_secs();
    assert!(
        (27..=31).contains(&ahead),
        "retry-after date {ahead}s ahead"
    );

    let r = call(&sim, "GET", "/v1/models", "").await;
    assert_eq!(r.status, 403);

    // Queue exhausted: default (ok) applies.
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 200);
    // Request ids are unique.
    let ids: std::collections::HashSet<String> = futures_ids(&sim, 5).await;
    assert_eq!(ids.len(), 5);
}

async fn futures_ids(sim: &Simulator, n: usize) -> std::collections::HashSet<String> {
    let mut c = Client::connect(sim.addr()).await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..n {
        let r = c.call("GET", "/v1/models", "").await;
        ids.insert(r.header("x-request-id").unwrap().to_string());
    }
    ids
}

/// Asserts that connections to `addr` are refused once the listener task has closed it. The
/// task runs on the runtime, so on a loaded machine that can take a while: poll for up to 10 s
/// (instead of checking once after a fixed 50 ms).
async fn assert_refused_soon(addr: SocketAddr) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < give_up,
            "{addr} still accepts connections after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_step_and_delay() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(vec![
        Step::Delay { ms: 300 },
        "500:delay=200".parse().unwrap(),
    ]);
    let t = Instant::now();
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(
        r.header("openai-processing-ms")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 300
    );

    let t = Instant::now();
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status, 500);
    assert!(t.elapsed() >= Duration::from_millis(200));

    sim.set_default(Step::status(503));
    for _ in 0..2 {
        let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
        assert_eq!(r.status, 503);
    }
    sim.set_default(Step::Ok);
    assert_eq!(call(&sim, "GET", "/v1/models", "").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_never_answers_until_shutdown() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(vec![Step::Hang]);
    let mut c = Client::connect(sim.addr()).await;
    c.send("POST", "/v1/chat/completions", CHAT, &[]).await;
    let res = tokio::time::timeout(Duration::from_millis(500), c.read()).await;
    assert!(res.is_err(), "hang must not answer: {res:?}");
    // The request was still recorded.
    assert_eq!(sim.requests().len(), 1);
    // Shutdown closes the hanging connection.
    sim.clone().shutdown();
    let res = tokio::time::timeout(Duration::from_secs(5), c.read())
        .await
        .expect("shutdown should close the socket");
    assert!(res.is_err());
    // And the listener is gone.
    assert_refused_soon(sim.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_headers() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(parse_script("reset").unwrap());
    let mut c = Client::connect(sim.addr()).await;
    c.send("POST", "/v1/chat/completions", CHAT, &[]).await;
    let err = c
        .read()
        .await
        .expect_err("reset must not produce a response");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "{err:?}"
    );
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "expect RST"
    );
    // Next request (new connection) is fine.
    assert_eq!(
        call(&sim, "POST", "/v1/chat/completions", CHAT)
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_sends_less_than_content_length() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(vec![Step::Cut, Step::Cut]);
    let mut c = Client::connect(sim.addr()).await;
    c.send("POST", "/v1/chat/completions", CHAT, &[]).await;
    let r = c.read().await.unwrap();
    assert_eq!(r.status, 200);
    assert_openai_headers(&r);
    assert!(!r.complete());
    assert!(!r.body.is_empty() && r.body.len() < r.content_length);
    // Connection is closed after the cut.
    let mut tmp = [0u8; 16];
    assert_eq!(c.sock.read(&mut tmp).await.unwrap_or(0), 0);

    // Cut on a streaming request truncates the stream too.
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT_STREAM).await;
    assert!(!r.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_and_stream_cut() {
    let sim = Simulator::start(0).await.unwrap();
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT_STREAM).await;
    assert_eq!(r.status, 200);
    assert!(r.complete());
    assert_openai_headers(&r);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() >= 4);
    let mut content = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(s);
        }
    }
    assert_eq!(content, "Hello from the OpenAI simulator.");

    // include_usage adds a usage chunk.
    let r = call(
        &sim,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    )
    .await;
    assert!(r.text().contains("\"usage\""));

    // Legacy completions stream also ends with [DONE]; responses stream uses typed events.
    let r = call(
        &sim,
        "POST",
        "/v1/completions",
        r#"{"model":"m","prompt":"x","stream":true}"#,
    )
    .await;
    assert!(r.text().ends_with("data: [DONE]\n\n"));
    let r = call(
        &sim,
        "POST",
        "/v1/responses",
        r#"{"model":"m","input":"x","stream":true}"#,
    )
    .await;
    let t = r.text();
    assert!(t.starts_with("event: response.created\n"), "{t}");
    assert!(t.contains("event: response.completed\n"));

    sim.set_script(vec![Step::StreamCut]);
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT_STREAM).await;
    assert_eq!(r.status, 200);
    assert!(!r.complete());
    let text = r.text();
    assert!(text.starts_with("data: {"));
    assert!(text.ends_with("\n\n"), "cut at an event boundary");
    assert!(!text.contains("[DONE]"));

    // stream-cut on a non-streaming request behaves like cut.
    sim.set_script(vec![Step::StreamCut]);
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert!(!r.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_answers_are_realistic_and_at_least_the_size_asked() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(parse_script("big=300000,big=5000").unwrap());
    let r = call(
        &sim,
        "POST",
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.complete());
    assert!(r.body.len() >= 300_000, "{} bytes", r.body.len());
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    let data = v["data"].as_array().unwrap();
    assert!(data.len() > 1);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 1536);
    // Any other route: the usual answer, padded.
    let r = call(&sim, "POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r.body.len(), 5000);
    assert_eq!(r.json()["object"], "chat.completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_connection_close() {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(parse_script("500,ok").unwrap());
    let mut c = Client::connect(sim.addr()).await;
    let r1 = c.call("POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r1.status, 500);
    assert_eq!(r1.header("connection"), Some("keep-alive"));
    let r2 = c.call("POST", "/v1/chat/completions", CHAT).await;
    assert_eq!(r2.status, 200);
    assert_ne!(r1.header("x-request-id"), r2.header("x-request-id"));

    // Pipelined requests are answered in order.
    c.send("GET", "/v1/models", "", &[]).await;
    c.send("GET", "/_sim/health", "", &[]).await;
    assert_eq!(c.read().await.unwrap().json()["object"], "list");
    assert_eq!(c.read().await.unwrap().json()["status"], "ok");

    c.send("GET", "/v1/models", "", &[("connection", "close")])
        .await;
    let r3 = c.read().await.unwrap();
    assert_eq!(r3.status, 200);
    assert_eq!(r3.header("connection"), Some("close"));
    let mut tmp = [0u8; 16];
    assert_eq!(c.sock.read(&mut tmp).await.unwrap(), 0, "server closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_requests_with_headers_and_body() {
    let sim = Simulator::start(0).await.unwrap();
    let before = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut c = Client::connect(sim.addr()).await;
    c.send(
        "POST",
        "/v1/chat/completions?x=1",
        CHAT,
        &[("Authorization", "Bearer sk-test"), ("X-Custom", "abc")],
    )
    .await;
    c.read().await.unwrap();
    c.call("GET", "/_sim/health", "").await; // control requests are not recorded

    let reqs = sim.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions?x=1");
    assert_eq!(r.header("authorization"), Some("Bearer sk-test"));
    assert!(
        r.headers
            .contains(&("x-custom".to_string(), "abc".to_string()))
    );
    assert_eq!(r.body, CHAT.as_bytes());
    assert_eq!(r.json().unwrap()["model"], "gpt-4o-mini");
    assert!(r.received_at_ms >= before);

    // Chunked request bodies are decoded.
    let chunked = format!(
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"inp\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        r#"ut":"hi"}"#.len(),
        r#"ut":"hi"}"#
    );
    c.sock.write_all(chunked.as_bytes()).await.unwrap();
    assert_eq!(c.read().await.unwrap().status, 200);
    assert_eq!(sim.requests()[1].body, br#"{"input":"hi"}"#);

    // JSON form: body as a string.
    let json = serde_json::to_value(&sim.requests()[0]).unwrap();
    assert_eq!(json["body"], CHAT);
    let back: RecordedRequest = serde_json::from_value(json).unwrap();
    assert_eq!(back, sim.requests()[0]);

    sim.clear_requests();
    assert!(sim.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_routes() {
    let sim = Simulator::start(0).await.unwrap();
    let mut c = Client::connect(sim.addr()).await;

    let r = c.call("GET", "/_sim/health", "").await;
    assert_eq!(r.status, 200);

    let r = c.call("PUT", "/_sim/script", "500, 429:ra=1 ,ok").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sim.script(),
        vec![
            Step::status(500),
            Step::Error(ErrorStep {
                status: 429,
                retry_after_secs: Some(1),
                ..Default::default()
            }),
            Step::Ok
        ]
    );
    let r = c
        .call(
            "POST",
            "/_sim/script",
            r#"[{"kind":"error","status":503,"retry_after_ms":20},"cut",{"kind":"hang"}]"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.script().len(), 3);
    let r = c.call("GET", "/_sim/script", "").await;
    assert_eq!(r.json()["script"][0], "503:ra-ms=20");

    let r = c.call("PUT", "/_sim/script", "bogus").await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bogus")
    );
    assert_eq!(sim.script().len(), 3, "bad script leaves the queue alone");

    let r = c.call("PUT", "/_sim/script", "").await;
    assert_eq!(r.status, 200);
    assert!(sim.script().is_empty());

    let r = c
        .call("PUT", "/_sim/default", r#"{"kind":"error","status":500}"#)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(c.call("GET", "/v1/models", "").await.status, 500);
    let r = c.call("PUT", "/_sim/default", "ok,ok").await;
    assert_eq!(r.status, 400);
    let r = c.call("POST", "/_sim/default", "OK").await;
    assert_eq!(r.status, 200);
    assert_eq!(c.call("GET", "/v1/models", "").await.status, 200);

    let r = c.call("GET", "/_sim/requests", "").await;
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["method"], "GET");
    assert_eq!(v[0]["path"], "/v1/models");
    assert!(v[0]["received_at_ms"].is_u64());

    let r = c.call("DELETE", "/_sim/requests", "").await;
    assert_eq!(r.status, 200);
    assert!(sim.requests().is_empty());

    let r = c.call("GET", "/_sim/nope", "").await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn works_on_current_thread_runtime_and_drop_stops_server() {
    let sim = Simulator::start(0).await.unwrap();
    let addr = sim.addr();
    assert_eq!(call(&sim, "GET", "/v1/models", "").await.status, 200);
    drop(sim);
    assert_refused_soon(addr).await;
}

#[cfg(unix)]
#[test]
fn binary_announces_and_exits_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_openai-simulator"))
        .args(["--port", "0", "--script", "503,ok", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("openai-simulator listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/v1"));
    let port: u16 = url["http://127.0.0.1:".len()..url.len() - 3]
        .parse()
        .unwrap();

    let statuses: Vec<u16> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::io::Write::write_all(
                &mut s,
                b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).unwrap();
            out[9..12].parse().unwrap()
        })
        .collect();
    assert_eq!(statuses, vec![503, 200]);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "simulator did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
