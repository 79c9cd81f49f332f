"""INVOKE_MODE=RESPONSE_STREAM as Lambda's Runtime API sees it (tools/lambda_emulator.py, shared
with bench/): the release binary posts its answer with `Lambda-Runtime-Function-Response-Mode:
streaming`, chunked — the HTTP integration prelude, 8 NULs, then the body event by event as the
upstream sends it — and ends a broken stream with its SSE error event, never with Lambda's
error trailers (which a function URL would turn into its own text at the end of the stream)."""

from __future__ import annotations

import json
import statistics

import pytest

from metrics_support import REPO, TOKEN, Function, now_ms, unique_namespace

TEXT = "Hello from the OpenAI simulator."


def stream_event() -> dict:
    event = json.loads((REPO / "events" / "function-url-chat-completion.json").read_text())
    body = {**json.loads(event["body"]), "stream": True}
    event["body"] = json.dumps(body)
    event["headers"]["content-length"] = str(len(event["body"]))
    event["headers"]["authorization"] = f"Bearer {TOKEN}"
    event["requestContext"]["timeEpoch"] = int(now_ms())
    return event


def events_of(body: str) -> list[str]:
    return [e for e in body.split("\n\n") if e.strip()]


@pytest.fixture(scope="module")
def fn(sim):
    f = Function(sim, unique_namespace("stream"), backend="none",
                 extra_env={"INVOKE_MODE": "RESPONSE_STREAM", "STREAM_IDLE_TIMEOUT_MS": "1500",
                            "BREAKER_FAILURES": "0"})
    yield f
    f.stop()


def test_the_answer_is_posted_event_by_event_behind_the_prelude(sim, fn):
    sim.script("stream:gap=200")
    inv = fn.invoke(stream_event())
    assert inv.streamed and inv.trailers == {}
    assert inv.prelude["statusCode"] == 200
    assert inv.prelude["headers"]["content-type"].startswith("text/event-stream")
    assert inv.prelude["headers"]["x-lambda-request-id"] == inv.request_id
    events = events_of(inv.response["body"])
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[len("data: "):])["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])
    assert text == TEXT
    # One chunk per event, posted as the upstream sent it (200 ms apart), not at the end.
    ms = [(t - inv.t_delivered) / 1e6 for t, _ in inv.chunks]
    assert len(inv.chunks) == len(events), ms
    assert ms[-1] - ms[0] > 1000, ms
    assert (inv.t_answered - inv.t_first_byte) / 1e6 > 1000


@pytest.mark.parametrize("script,code", [("stream:gap=20:cut=3", "upstream_stream_interrupted"),
                                         ("stream:gap=20:stall=3", "upstream_timeout")])
def test_a_broken_stream_ends_with_one_error_event_not_a_function_error(sim, fn, script, code):
    sim.script(script)
    inv = fn.invoke(stream_event())
    assert inv.prelude["statusCode"] == 200
    assert inv.trailers == {}, "no Lambda-Runtime-Function-Error-* trailer"
    events = events_of(inv.response["body"])
    assert len(events) == 4, events
    errors = [json.loads(e[len("data: "):]) for e in events if e.startswith('data: {"error"')]
    assert len(errors) == 1 and errors[0]["error"]["code"] == code, events


def test_an_answer_before_the_commit_is_the_usual_one_in_the_prelude(sim, fn):
    sim.script("503,503,503,503,503")
    inv = fn.invoke(stream_event())
    assert inv.prelude["statusCode"] == 502
    assert inv.prelude["headers"]["content-type"] == "application/json"
    assert json.loads(inv.response["body"])["error"]["code"] == "upstream_unavailable"


def test_the_body_follows_the_request_head_without_a_nagle_delay(sim, fn):
    # The request head, the prelude, the 8 NULs and each event are separate small writes on the
    # Runtime API connection. Without TCP_NODELAY (vendor/README.md) the prelude waits for the
    # head's delayed ACK: ~40 ms, nearly every time (measured: 41-48 ms; with it: < 1 ms).
    sim.script(",".join(["stream"] * 12))
    gaps = []
    for _ in range(12):
        inv = fn.invoke(stream_event())
        assert inv.prelude["statusCode"] == 200
        gaps.append((inv.t_first_byte - inv.t_head) / 1e6)
    assert statistics.median(gaps[2:]) < 20, gaps
