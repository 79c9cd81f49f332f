//! Live SSE streams (`stream:` steps) over raw TCP: chunked, events split across writes, real
//! gaps, stalls and cuts.

use std::time::{Duration, Instant};

use openai_simulator::{Simulator, parse_script};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#;

/// What the client saw: the head, and each decoded body piece with its arrival time.
struct Live {
    head: String,
    /// (ms since the request, decoded body bytes so far) after each socket read.
    reads: Vec<(u128, usize)>,
    body: Vec<u8>,
    /// The last (zero) chunk arrived.
    finished: bool,
    /// The connection was closed by the server.
    closed: bool,
}

impl Live {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn events(&self) -> Vec<String> {
        self.text()
            .split_inclusive("\n\n")
            .filter(|e| e.ends_with("\n\n"))
            .map(str::to_owned)
            .collect()
    }
}

/// Decodes as much of a chunked body as `raw` holds; returns (body, finished).
fn dechunk(raw: &[u8]) -> (Vec<u8>, bool) {
    let (mut body, mut pos) = (Vec::new(), 0);
    while let Ok(httparse::Status::Complete((n, size))) = httparse::parse_chunk_size(&raw[pos..]) {
        let size = size as usize;
        if size == 0 {
            return (body, true);
        }
        let take = size.min(raw.len() - pos - n);
        body.extend_from_slice(&raw[pos + n..pos + n + take]);
        if take < size || raw.len() < pos + n + size + 2 {
            break;
        }
        pos += n + size + 2;
    }
    (body, false)
}

/// Sends `body` to `path` and reads until the body ends, the server closes, or `quiet` passes
/// without a byte.
async fn stream(sim: &Simulator, path: &str, body: &str, quiet: Duration) -> Live {
    let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    sock.write_all(req.as_bytes()).await.unwrap();
    let (mut raw, mut head_len, mut reads) = (Vec::new(), None, Vec::new());
    let mut closed = false;
    loop {
        let mut tmp = [0u8; 65536];
        match tokio::time::timeout(quiet, sock.read(&mut tmp)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(k)) => raw.extend_from_slice(&tmp[..k]),
        }
        if head_len.is_none() {
            head_len = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if let Some(h) = head_len {
            let (body, finished) = dechunk(&raw[h..]);
            reads.push((start.elapsed().as_millis(), body.len()));
            if finished {
                break;
            }
        }
    }
    let h = head_len.expect("a response head");
    let (body, finished) = dechunk(&raw[h..]);
    Live {
        head: String::from_utf8_lossy(&raw[..h]).to_ascii_lowercase(),
        reads,
        body,
        finished,
        closed,
    }
}

async fn sim_with(script: &str) -> Simulator {
    let sim = Simulator::start(0).await.unwrap();
    sim.set_script(parse_script(script).unwrap());
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_arrives_event_by_event_with_events_split_across_writes() {
    let sim = sim_with("stream:gap=200").await;
    let live = stream(
        &sim,
        "/v1/chat/completions",
        CHAT_STREAM,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        live.head.contains("transfer-encoding: chunked"),
        "{}",
        live.head
    );
    assert!(!live.head.contains("content-length"));
    assert!(live.head.contains("content-type: text/event-stream"));
    assert!(live.finished);
    let events = live.events();
    assert_eq!(events.last().unwrap(), "data: [DONE]\n\n");
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e.trim().strip_prefix("data: ").unwrap()).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "Hello from the OpenAI simulator.");
    // Real gaps: the body took about (events - 1) × 200 ms (wide bounds: the machine is loaded).
    let spread = live.reads.last().unwrap().0 - live.reads.first().unwrap().0;
    let expected = (events.len() as u128 - 1) * 200;
    assert!(
        spread >= expected * 8 / 10,
        "{spread} ms for {} events",
        events.len()
    );
    // Chunked like OpenAI's: some reads end in the middle of an event.
    let mid_event = live
        .reads
        .iter()
        .filter(|(_, n)| !live.body[..*n].ends_with(b"\n\n"))
        .count();
    assert!(mid_event >= 3, "reads: {:?}", live.reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_ends_without_the_last_chunk_after_n_events() {
    let sim = sim_with("stream:gap=20:cut=3").await;
    let live = stream(
        &sim,
        "/v1/chat/completions",
        CHAT_STREAM,
        Duration::from_secs(5),
    )
    .await;
    assert!(live.closed && !live.finished);
    assert_eq!(live.events().len(), 3);
    assert!(live.text().ends_with("\n\n") && !live.text().contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_keeps_the_connection_open_and_sends_nothing_more() {
    let sim = sim_with("stream:stall=2").await;
    let live = stream(
        &sim,
        "/v1/chat/completions",
        CHAT_STREAM,
        Duration::from_millis(700),
    )
    .await;
    assert!(!live.closed && !live.finished);
    assert_eq!(live.events().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responses_stream_is_live_too() {
    let sim = sim_with("stream:gap=20:delay=100").await;
    let body = r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#;
    let live = stream(&sim, "/v1/responses", body, Duration::from_secs(5)).await;
    assert!(live.finished);
    assert!(live.reads[0].0 >= 90, "delay before the head");
    let events = live.events();
    assert!(events[0].starts_with("event: response.created\n"));
    assert!(
        events
            .last()
            .unwrap()
            .starts_with("event: response.completed\n")
    );
    let seq: Vec<u64> = events
        .iter()
        .map(|e| {
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            serde_json::from_str::<Value>(data).unwrap()["sequence_number"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_carries_at_least_the_requested_bytes() {
    let sim = sim_with("stream:bytes=1m").await;
    let live = stream(
        &sim,
        "/v1/chat/completions",
        CHAT_STREAM,
        Duration::from_secs(10),
    )
    .await;
    assert!(live.finished);
    let events = live.events();
    assert!(live.body.len() > 1024 * 1024);
    assert!(events.len() > 1000, "~1 KiB per event");
    assert_eq!(events.last().unwrap(), "data: [DONE]\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_step_on_a_plain_request_answers_normally() {
    let sim = sim_with("stream:gap=500").await;
    let live = {
        let mut sock = TcpStream::connect(sim.addr()).await.unwrap();
        let body = r#"{"model":"m","messages":[]}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(live.contains("content-length: "), "{live}");
    assert!(live.contains("\"object\": \"chat.completion\""));
}
