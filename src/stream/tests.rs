//! The framing, commit and forwarding rules, in virtual time (tokio's paused clock).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::time::Instant;

use super::*;
use crate::retry::TokioSleeper;

const T0: u64 = 1_764_000_000_000;

/// Epoch milliseconds on tokio's (paused) clock.
struct VirtualClock(Instant);

impl VirtualClock {
    fn new() -> VirtualClock {
        VirtualClock(Instant::now())
    }
    fn at(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        T0 + self.at()
    }
}

/// One scripted step of an upstream body.
#[derive(Clone)]
enum Step {
    /// After `ms`, these bytes.
    Chunk(u64, &'static str),
    /// After `ms`, the body breaks.
    Cut(u64),
    /// After `ms`, a clean end.
    End(u64),
    /// Never anything again.
    Hang,
}

struct Scripted {
    steps: std::collections::VecDeque<Step>,
    taken: Arc<AtomicUsize>,
}

fn scripted(steps: &[Step]) -> (EventReader<Scripted>, Arc<AtomicUsize>) {
    let taken = Arc::new(AtomicUsize::new(0));
    let source = Scripted {
        steps: steps.to_vec().into(),
        taken: taken.clone(),
    };
    (EventReader::new(source), taken)
}

impl ChunkSource for Scripted {
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send {
        self.taken.fetch_add(1, Ordering::SeqCst);
        let step = self.steps.pop_front().unwrap_or(Step::End(0));
        async move {
            let wait = |ms| tokio::time::sleep(std::time::Duration::from_millis(ms));
            match step {
                Step::Chunk(ms, s) => {
                    wait(ms).await;
                    Ok(Some(Bytes::from_static(s.as_bytes())))
                }
                Step::Cut(ms) => {
                    wait(ms).await;
                    Err("connection reset".into())
                }
                Step::End(ms) => {
                    wait(ms).await;
                    Ok(None)
                }
                Step::Hang => std::future::pending().await,
            }
        }
    }
}

/// Collects what the caller receives, with the virtual time of arrival.
struct Recorder {
    clock: Arc<VirtualClock>,
    got: Vec<(u64, String)>,
    /// Refuse every send from this many sends on (the caller went away).
    gone_after: Option<usize>,
}

impl Recorder {
    fn new(clock: &Arc<VirtualClock>) -> Recorder {
        Recorder {
            clock: clock.clone(),
            got: Vec::new(),
            gone_after: None,
        }
    }
    fn body(&self) -> String {
        self.got.iter().map(|(_, s)| s.as_str()).collect()
    }
}

impl EventSink for Recorder {
    fn send(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), CallerGone>> + Send {
        let result = if self.gone_after.is_some_and(|n| self.got.len() >= n) {
            Err(CallerGone)
        } else {
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            self.got.push((self.clock.at(), text));
            Ok(())
        };
        std::future::ready(result)
    }
}

fn frame_all(input: &[u8], split_every: usize) -> (Vec<Bytes>, Option<Bytes>) {
    let mut framer = EventFramer::new();
    let mut events = Vec::new();
    for chunk in input.chunks(split_every.max(1)) {
        events.extend(framer.push(chunk));
    }
    (events, framer.finish())
}

#[test]
fn events_end_at_a_blank_line_whatever_the_line_endings_and_splits() {
    let input: &[u8] =
        b"data: a\n\nevent: x\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\r\n: ping\n\ndata: tail";
    let expected: Vec<&[u8]> = vec![
        b"data: a\n\n",
        b"event: x\r\ndata: b\r\n\r\n",
        b"data: c\r\r",
        b"data: d\n\r\n",
        b": ping\n\n",
    ];
    for split in 1..=input.len() {
        let (events, rest) = frame_all(input, split);
        assert_eq!(events, expected, "split every {split} bytes");
        assert_eq!(rest.as_deref(), Some(&b"data: tail"[..]));
    }
}

#[test]
fn a_trailing_carriage_return_waits_for_the_next_byte() {
    let mut framer = EventFramer::new();
    assert!(framer.push(b"data: a\r\n\r").is_empty());
    assert_eq!(
        framer.push(b"\n"),
        vec![Bytes::from_static(b"data: a\r\n\r\n")]
    );
    assert!(framer.push(b"data: b\r\r").is_empty());
    assert_eq!(
        framer.push(b"data: c"),
        vec![Bytes::from_static(b"data: b\r\r")]
    );
    assert_eq!(framer.pending(), 7);
}

#[test]
fn comments_and_blank_lines_are_not_dispatchable_events() {
    assert!(is_dispatchable(b"data: {}\n\n"));
    assert!(is_dispatchable(b": c\nevent: done\n\n"));
    assert!(!is_dispatchable(b": keep-alive\n\n"));
    assert!(!is_dispatchable(b"\n"));
    assert!(!is_dispatchable(b"\r\n"));
}

#[test]
fn sequence_numbers_are_read_from_the_event_not_its_text() {
    let ev = br#"event: response.output_text.delta
data: {"type":"response.output_text.delta","delta":"say \"sequence_number\":99","sequence_number":7}

"#;
    assert_eq!(sequence_number(ev), Some(7));
    assert_eq!(
        sequence_number(b"data: {\"sequence_number\": 12}\n\n"),
        Some(12)
    );
    assert_eq!(sequence_number(b"data: {}\n\n"), None);
}

fn data_json(event: &str) -> Value {
    let data: String = event
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    serde_json::from_str(&data).unwrap()
}

#[test]
fn error_events_have_the_shapes_the_sdks_raise() {
    let chat = error_event(ApiFlavor::Chat, StreamErrorCode::Interrupted, "broke", None);
    let chat = std::str::from_utf8(&chat).unwrap();
    assert!(
        chat.starts_with("data: ") && chat.ends_with("\n\n"),
        "{chat}"
    );
    assert_eq!(
        data_json(chat),
        serde_json::json!({"error": {"message": "broke", "type": "server_error",
                                     "code": "upstream_stream_interrupted", "param": null}})
    );

    let resp = error_event(
        ApiFlavor::Responses,
        StreamErrorCode::Timeout,
        "slow",
        Some(4),
    );
    let resp = std::str::from_utf8(&resp).unwrap();
    assert!(resp.starts_with("event: error\ndata: ") && resp.ends_with("\n\n"));
    assert_eq!(
        data_json(resp),
        serde_json::json!({"type": "error", "code": "upstream_timeout", "message": "slow",
                           "param": null, "sequence_number": 5})
    );
    let first = error_event(ApiFlavor::Responses, StreamErrorCode::Timeout, "x", None);
    assert_eq!(
        data_json(std::str::from_utf8(&first).unwrap())["sequence_number"],
        0
    );
}

#[tokio::test(start_paused = true)]
async fn commit_waits_for_the_first_whole_event_not_the_first_bytes() {
    let clock = VirtualClock::new();
    let (mut reader, _) = scripted(&[
        Step::Chunk(100, ": keep-alive\n\n"),
        Step::Chunk(200, "data: {\"a\""),
        Step::Chunk(300, ":1}\n\ndata: {\"b\":2}\n\n"),
        Step::Hang,
    ]);
    let prefix = await_first_event(&mut reader, &clock, &TokioSleeper, 5_000, 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        clock.at(),
        600,
        "committed when the first event was complete"
    );
    assert_eq!(
        prefix,
        vec![
            Bytes::from_static(b": keep-alive\n\n"),
            Bytes::from_static(b"data: {\"a\":1}\n\n")
        ]
    );
    // The second event stays in the reader for the forwarding phase.
    let next = reader
        .next_event(&clock, &TokioSleeper, 1_000, T0 + 10_000)
        .await;
    assert_eq!(
        next,
        Pulled::Event(Bytes::from_static(b"data: {\"b\":2}\n\n"))
    );
}

#[tokio::test(start_paused = true)]
async fn before_the_commit_failures_are_ordinary_retryable_attempt_failures() {
    let clock = VirtualClock::new();
    let (mut hang, _) = scripted(&[Step::Chunk(10, "data: {\"partial"), Step::Hang]);
    let err = await_first_event(&mut hang, &clock, &TokioSleeper, 2_000, 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.0, FailureKind::Timeout);
    assert_eq!(clock.at(), 2_000, "bounded by the attempt's timeout");

    let (mut cut, _) = scripted(&[Step::Chunk(10, ": hi\n\n"), Step::Cut(10)]);
    let err = await_first_event(&mut cut, &clock, &TokioSleeper, 2_000, 1 << 20).await;
    assert_eq!(err.unwrap_err().0, FailureKind::IncompleteBody);

    let (mut empty, _) = scripted(&[Step::End(10)]);
    let err = await_first_event(&mut empty, &clock, &TokioSleeper, 2_000, 1 << 20).await;
    assert_eq!(err.unwrap_err().0, FailureKind::IncompleteBody);
}

const EV1: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
const EV2: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";

async fn run(
    steps: &[Step],
    flavor: ApiFlavor,
    limits: impl Fn(u64) -> StreamLimits,
) -> (StreamReport, Recorder, usize) {
    let source = StreamSource {
        flavor,
        upstream: Naming::openai(),
    };
    run_from(steps, &source, limits).await
}

/// [`run`] for a stream from `source`.
async fn run_from(
    steps: &[Step],
    source: &StreamSource,
    limits: impl Fn(u64) -> StreamLimits,
) -> (StreamReport, Recorder, usize) {
    let clock = Arc::new(VirtualClock::new());
    let (mut reader, taken) = scripted(steps);
    let prefix = await_first_event(&mut reader, clock.as_ref(), &TokioSleeper, 60_000, 1 << 20)
        .await
        .unwrap();
    let mut sink = Recorder::new(&clock);
    let limits = limits(clock.now_ms());
    let sleeper = &TokioSleeper;
    let report = forward(
        prefix,
        &mut reader,
        &mut sink,
        source,
        limits,
        clock.as_ref(),
        sleeper,
    )
    .await;
    let taken = taken.load(Ordering::SeqCst);
    (report, sink, taken)
}

fn generous(now: u64) -> StreamLimits {
    StreamLimits::new(30_000, now + 600_000)
}

#[tokio::test(start_paused = true)]
async fn each_event_reaches_the_caller_when_its_last_byte_arrives() {
    let (report, sink, _) = run(
        &[
            Step::Chunk(100, EV1),
            Step::Chunk(1_000, &EV2[..10]),
            Step::Chunk(500, &EV2[10..]),
            Step::Chunk(2_000, DONE),
            Step::End(0),
        ],
        ApiFlavor::Chat,
        generous,
    )
    .await;
    let times: Vec<u64> = sink.got.iter().map(|(t, _)| *t).collect();
    // Committed at 100 ms; then each event at the moment it was complete upstream.
    assert_eq!(times, vec![100, 1_600, 3_600]);
    assert_eq!(sink.body(), format!("{EV1}{EV2}{DONE}"));
    assert_eq!(report.outcome, StreamOutcome::Complete);
    assert_eq!(report.bytes as usize, EV1.len() + EV2.len() + DONE.len());
    assert_eq!(report.events, 3);
}

fn error_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| e.contains("\"error\""))
        .map(|e| data_json(&format!("{e}\n\n")))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_cut_after_the_commit_ends_with_exactly_one_error_event_and_no_retry() {
    let (report, sink, taken) = run(
        &[Step::Chunk(10, EV1), Step::Chunk(10, EV2), Step::Cut(10)],
        ApiFlavor::Chat,
        generous,
    )
    .await;
    assert_eq!(report.outcome, StreamOutcome::Cut);
    assert_eq!(taken, 3, "nothing read after the cut");
    let body = sink.body();
    assert!(body.starts_with(&format!("{EV1}{EV2}")));
    let errors = error_events(&body);
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["error"]["code"], "upstream_stream_interrupted");
    assert_eq!(errors[0]["error"]["type"], "server_error");
    assert!(body.ends_with("\n\n") && !body.contains("[DONE]"));
    assert_eq!(report.bytes as usize, body.len());
}

/// The error event names the upstream as §5 messages do: "OpenAI" with the default upstream
/// (v1's wording), the upstream's name and kind with a configured list.
#[tokio::test(start_paused = true)]
async fn the_error_event_names_the_upstream_that_sent_the_stream() {
    let list = crate::upstreams::parse_upstreams(
        "UPSTREAMS",
        r#"[{"name":"primary","base_url":"https://p.example/v1","api_key":"k1"},
            {"name":"backup","base_url":"https://b.example/v1","api_key":"k2"}]"#,
    )
    .unwrap();
    let backup = crate::upstreams::naming::naming(&list, &[1]);
    let cut = [Step::Chunk(10, EV1), Step::Chunk(10, EV2), Step::Cut(10)];
    let idle = [Step::Chunk(10, EV1), Step::Hang];
    let cases = [
        (
            Naming::openai(),
            &cut[..],
            "OpenAI's stream broke off after 2 events.",
        ),
        (
            Naming::openai(),
            &idle[..],
            "OpenAI stopped sending after 1 event:",
        ),
        (
            backup.clone(),
            &cut[..],
            "The stream from the upstream `backup` (openai) broke off after 2 events.",
        ),
        (
            backup,
            &idle[..],
            "The upstream `backup` (openai) stopped sending after 1 event:",
        ),
    ];
    for (upstream, steps, expected) in cases {
        let source = StreamSource {
            flavor: ApiFlavor::Chat,
            upstream,
        };
        let (_, sink, _) = run_from(steps, &source, generous).await;
        let errors = error_events(&sink.body());
        let message = errors[0]["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.starts_with(expected), "{message}");
        assert!(!message.contains("example"), "a URL in {message}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_gap_over_the_limit_ends_the_stream_at_the_limit() {
    let (report, sink, _) = run(
        &[Step::Chunk(10, EV1), Step::Chunk(29_000, EV2), Step::Hang],
        ApiFlavor::Chat,
        generous,
    )
    .await;
    assert_eq!(report.outcome, StreamOutcome::IdleTimeout);
    let (at, last) = sink.got.last().unwrap();
    // EV2 came at 29,010 ms; nothing after, so the idle limit fires 30 s later.
    assert_eq!(*at, 29_010 + 30_000);
    assert_eq!(error_events(last)[0]["error"]["code"], "upstream_timeout");
    assert_eq!(error_events(&sink.body()).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_live_stream_even_while_events_keep_coming() {
    let steps: Vec<Step> = std::iter::once(Step::Chunk(0, EV1))
        .chain(std::iter::repeat_n(Step::Chunk(1_000, EV2), 100))
        .collect();
    let (report, sink, _) = run(&steps, ApiFlavor::Chat, |now| {
        StreamLimits::new(30_000, now + 10_500)
    })
    .await;
    assert_eq!(report.outcome, StreamOutcome::Deadline);
    let (at, last) = sink.got.last().unwrap();
    assert_eq!(*at, 10_500);
    assert_eq!(error_events(last)[0]["error"]["code"], "upstream_timeout");
    assert_eq!(report.events, 11);
}

#[tokio::test(start_paused = true)]
async fn a_responses_stream_ends_with_an_error_event_numbered_after_the_last() {
    const CREATED: &str =
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0}\n\n";
    const DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\",\"sequence_number\":1}\n\n";
    let (report, sink, _) = run(
        &[Step::Chunk(5, CREATED), Step::Chunk(5, DELTA), Step::Cut(5)],
        ApiFlavor::Responses,
        generous,
    )
    .await;
    assert_eq!(report.outcome, StreamOutcome::Cut);
    let (_, last) = sink.got.last().unwrap();
    assert!(last.starts_with("event: error\n"), "{last}");
    let data = data_json(last);
    assert_eq!(data["type"], "error");
    assert_eq!(data["code"], "upstream_stream_interrupted");
    assert_eq!(data["sequence_number"], 2);
}

#[tokio::test(start_paused = true)]
async fn when_the_caller_goes_away_upstream_is_no_longer_read() {
    let clock = Arc::new(VirtualClock::new());
    let steps: Vec<Step> = std::iter::repeat_n(Step::Chunk(100, EV1), 50).collect();
    let (mut reader, taken) = scripted(&steps);
    let prefix = await_first_event(&mut reader, clock.as_ref(), &TokioSleeper, 1_000, 1 << 20)
        .await
        .unwrap();
    let mut sink = Recorder::new(&clock);
    sink.gone_after = Some(3);
    let limits = generous(clock.now_ms());
    let report = forward(
        prefix,
        &mut reader,
        &mut sink,
        &StreamSource {
            flavor: ApiFlavor::Chat,
            upstream: Naming::openai(),
        },
        limits,
        clock.as_ref(),
        &TokioSleeper,
    )
    .await;
    assert!(report.caller_gone);
    assert_eq!(report.outcome, StreamOutcome::Cut);
    assert_eq!(sink.got.len(), 3);
    assert_eq!(
        taken.load(Ordering::SeqCst),
        4,
        "stopped at the first refused send"
    );
    assert_eq!(clock.at(), 400);
}

#[tokio::test(start_paused = true)]
async fn a_stream_over_the_limit_stops_reading_and_says_so() {
    let steps: Vec<Step> = std::iter::repeat_n(Step::Chunk(1, EV1), 100).collect();
    let cap = EV1.len() * 10 + 5;
    let (report, sink, taken) = run(&steps, ApiFlavor::Chat, |now| StreamLimits {
        max_bytes: cap,
        ..generous(now)
    })
    .await;
    assert_eq!(report.outcome, StreamOutcome::Cut);
    assert_eq!(report.events, 10);
    assert_eq!(taken, 11);
    let errors = error_events(&sink.body());
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["error"]["code"], "upstream_response_too_large");
}
