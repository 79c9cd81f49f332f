"""openai-node (v7, tests/e2e/node/stream.mjs) iterating real streams through the release binary
under `cargo lambda watch` with INVOKE_MODE=RESPONSE_STREAM (conftest.py's `streaming` stack),
while the simulator sends its SSE events with real gaps, each split across two TCP writes
(spec §10): tokens reach the SDK in order as the upstream sends them, and a stream that breaks
after the commit makes the SDK raise `APIError` from the one SSE error event the function sends.
Chat Completions and the Responses API."""

from __future__ import annotations

import json

import pytest

TEXT = "Hello from the OpenAI simulator."
BODIES = {
    "chat": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], "stream": True},
    "responses": {"model": "gpt-4o-mini", "input": "Say hi", "stream": True},
}
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


@pytest.fixture(scope="module")
def node_stream(streaming, node_sdk):
    return lambda api: node_sdk("stream.mjs", streaming.url("/v1"), api)


def text_of(api: str, events: list[dict]) -> str:
    key = "content" if api == "chat" else "delta"
    return "".join(e[key] or "" for e in events if api == "chat" or e["type"] == "response.output_text.delta")


def finished_line(stack, lambda_request_id: str) -> dict:
    done = [l for l in stack.logs_for(lambda_request_id, wait=10) if l.get("message") == "request finished"]
    assert len(done) == 1, done
    return done[0]


def raw_events(stack, api: str) -> list[str]:
    """The SSE events of one request as the caller receives them, read whole."""
    status, headers, body = stack.http("POST", PATHS[api], BODIES[api], timeout=60)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    return [e for e in body.decode().split("\n\n") if e.strip()]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_node_iterates_tokens_in_order_as_the_upstream_sends_them(streaming, node_stream, api):
    streaming.script("stream:gap=400")
    result = node_stream(api)
    assert result["ok"], result
    events = result["events"]
    assert text_of(api, events) == TEXT, events
    if api == "responses":
        assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # Events 400 ms apart upstream reach the SDK spread out, one by one, not all at the end.
    times = [e["t"] for e in events]
    assert len(events) >= 7
    assert times[-1] - times[0] > 1500, times
    assert sum(b - a > 100 for a, b in zip(times, times[1:])) >= len(times) // 2, times
    line = finished_line(streaming, result["lambdaRequestId"])
    assert line["streamed"] is True and line["stream_outcome"] == "complete"
    assert line["first_byte_ms"] < line["elapsed_ms"] - 1500


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_node_gets_tokens_before_the_upstream_finished_then_raises_on_idle(streaming, node_stream, api):
    # Three events, then the upstream goes silent without ever ending its body.
    streaming.script("stream:gap=100:stall=3")
    result = node_stream(api)
    assert not result["ok"], result
    assert result["isApiError"] and result["name"] == "APIError", result
    assert result["code"] == "upstream_timeout"
    assert len(result["events"]) == 3, result
    # The three came while the upstream was still open; the error only after the idle gap.
    assert result["ended"] - result["events"][-1]["t"] >= streaming.idle_ms * 0.9, result
    assert len(streaming.upstream_requests()) == 1, "no retry after the commit"
    assert finished_line(streaming, result["lambdaRequestId"])["stream_outcome"] == "idle_timeout"


def test_a_cut_chat_stream_makes_openai_node_raise_from_exactly_one_error_event(streaming, node_stream):
    streaming.script("stream:gap=50:cut=4")
    result = node_stream("chat")
    assert not result["ok"], result
    assert result["isApiError"] and result["code"] == "upstream_stream_interrupted", result
    assert result["type"] == "server_error"
    assert "does not retry" in result["message"]
    assert [e["object"] for e in result["events"]] == ["chat.completion.chunk"] * 4
    assert TEXT.startswith(text_of("chat", result["events"]))
    assert finished_line(streaming, result["lambdaRequestId"])["stream_outcome"] == "cut"

    # What the SDK parsed: four chunks, then one error event, and nothing after it.
    streaming.script("stream:gap=50:cut=4")
    events = raw_events(streaming, "chat")
    errors = [e for e in events if e.startswith('data: {"error"')]
    assert len(events) == 5 and errors == events[-1:], events
    assert not any("[DONE]" in e for e in events)


def test_a_cut_responses_stream_makes_openai_node_raise_from_exactly_one_error_event(streaming, node_stream):
    streaming.script("stream:gap=50:cut=3")
    result = node_stream("responses")
    assert not result["ok"], result
    assert result["isApiError"] and result["code"] == "upstream_stream_interrupted", result
    assert [e["type"] for e in result["events"]] == [
        "response.created", "response.output_text.delta", "response.output_text.delta"]
    assert finished_line(streaming, result["lambdaRequestId"])["stream_outcome"] == "cut"

    streaming.script("stream:gap=50:cut=3")
    events = raw_events(streaming, "responses")
    errors = [e for e in events if e.startswith("event: error\n")]
    assert len(events) == 4 and errors == events[-1:], events
    data = json.loads(errors[0].split("data: ", 1)[1])
    assert data["type"] == "error" and data["sequence_number"] == 3
