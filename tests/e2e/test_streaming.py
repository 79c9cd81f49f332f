"""INVOKE_MODE=RESPONSE_STREAM end to end: the release binary under `cargo lambda watch`, whose
function-URL emulation streams the body as the runtime sends it, called by the official OpenAI
SDK, while the simulator sends its SSE events with real gaps, split across TCP writes (spec §10)."""

from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest

from local_stack import FUNCTION, PROXY_TOKEN

MESSAGES = [{"role": "user", "content": "Say hi"}]


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url("/v1"), api_key=PROXY_TOKEN, max_retries=0, timeout=60)


def finished_line(stack, lambda_request_id: str) -> dict:
    lines = stack.logs_for(lambda_request_id, wait=10)
    done = [l for l in lines if l.get("message") == "request finished"]
    assert len(done) == 1, lines
    return done[0]


def test_the_sdk_iterates_tokens_as_openai_sends_them(streaming):
    streaming.script("stream:gap=400")
    start = time.monotonic()
    stream = client(streaming).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)
    lambda_request_id = stream.headers["x-lambda-request-id"]
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["x-upstream-attempts"] == "1"
    arrivals, text = [], ""
    for chunk in stream.parse():
        arrivals.append(time.monotonic() - start)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == "Hello from the OpenAI simulator."
    # 7 chunks, 400 ms apart upstream: they arrive spread out, not all at the end.
    assert len(arrivals) == 7
    assert arrivals[-1] - arrivals[0] > 1.5, arrivals
    line = finished_line(streaming, lambda_request_id)
    assert line["streamed"] is True and line["stream_outcome"] == "complete"
    assert line["first_byte_ms"] < line["elapsed_ms"] - 1500


def test_bytes_reach_the_caller_while_the_upstream_has_not_finished(streaming):
    # The upstream sends three events and then nothing, without ever ending its body.
    streaming.script("stream:gap=100:stall=3")
    start = time.monotonic()
    arrivals = []
    with pytest.raises(openai.APIError) as raised:
        for _ in client(streaming).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True):
            arrivals.append(time.monotonic() - start)
    ended = time.monotonic() - start
    assert len(arrivals) == 3
    # The three events came while the upstream was still open; the error only after the idle gap.
    assert ended - arrivals[-1] >= streaming.idle_ms / 1000 * 0.9, (arrivals, ended)
    assert raised.value.code == "upstream_timeout"
    assert raised.value.type == "server_error"
    assert len(streaming.upstream_requests()) == 1, "no retry after the commit"


def test_a_cut_stream_raises_the_sdks_api_error_once(streaming):
    streaming.script("stream:gap=50:cut=4")
    chunks = 0
    with pytest.raises(openai.APIError) as raised:
        for _ in client(streaming).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True):
            chunks += 1
    assert chunks == 4
    assert raised.value.code == "upstream_stream_interrupted"
    assert "does not retry" in raised.value.message


def test_a_responses_stream_ends_with_the_sdks_error_event(streaming):
    streaming.script("stream:gap=50:cut=3")
    events = list(client(streaming).responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert [e.type for e in events[:3]] == [
        "response.created", "response.output_text.delta", "response.output_text.delta"]
    last = events[-1]
    assert len(events) == 4 and last.type == "error"
    assert last.code == "upstream_stream_interrupted"
    assert last.sequence_number == 3


def test_retries_before_the_first_byte_and_plain_answers_in_the_same_mode(streaming):
    streaming.script("500,503,stream:gap=20")
    raw = client(streaming).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert raw.headers["x-upstream-attempts"] == "3"
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)

    streaming.script("ok")
    done = client(streaming).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert done.choices[0].message.content == "Hello from the OpenAI simulator."

    streaming.script("503", default="503")
    with pytest.raises(openai.APIStatusError) as raised:
        client(streaming).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert raised.value.status_code == 502
    assert raised.value.code == "upstream_unavailable"
    assert raised.value.response.headers["x-should-retry"] == "false"
    streaming.script("ok")


def test_emf_metrics_carry_time_to_first_byte_and_interruptions(streaming):
    streaming.script("stream:gap=20:cut=2")
    raw = client(streaming).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)
    lambda_request_id = raw.headers["x-lambda-request-id"]
    with pytest.raises(openai.APIError):
        list(raw.parse())
    finished_line(streaming, lambda_request_id)
    emf = [l for l in streaming.logs_for(lambda_request_id) if "_aws" in l]
    assert len(emf) == 1, emf
    assert emf[0]["StreamsInterrupted"] == 1
    assert isinstance(emf[0]["TimeToFirstByte"], int)


def test_a_caller_that_goes_away_is_noticed(streaming):
    # A long, slow stream; the caller reads the first event and hangs up.
    streaming.script("stream:gap=200:bytes=64k")
    host, port = "127.0.0.1", streaming.watch_port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    conn.request("POST", f"/lambda-url/{FUNCTION}/v1/chat/completions", body=body,
                 headers={"authorization": f"Bearer {PROXY_TOKEN}", "content-type": "application/json"})
    resp = conn.getresponse()
    lambda_request_id = resp.getheader("x-lambda-request-id")
    assert resp.read1(4096).startswith(b"data: ")
    resp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    line = finished_line(streaming, lambda_request_id)
    # 64 KiB in ~1 KiB events 200 ms apart would take ~13 s to the end.
    early = [l for l in streaming.logs_for(lambda_request_id) if l.get("message") == "stream ended early"]
    assert line["stream_outcome"] == "cut", line
    assert early and early[0]["caller_gone"] is True
    assert line["elapsed_ms"] < 10_000
