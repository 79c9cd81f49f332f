"""The release binary under `cargo lambda watch`, driven by `cargo lambda invoke --data-file`
with every sample event, by plain HTTP through watch's function-URL emulation, and by the
official OpenAI SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED = json.loads((REPO / "events" / "expected.json").read_text())


def body_json(resp: dict) -> dict:
    return json.loads(resp["body"])


@pytest.mark.parametrize("event", sorted(EXPECTED))
def test_every_sample_event_gets_its_documented_answer(stack, event):
    want = EXPECTED[event]
    stack.script("ok")
    resp = stack.invoke(f"events/{event}")
    assert resp["statusCode"] == want["status"], resp["body"][:500]
    if "status_description" in want:  # an ALB target-group answer
        assert resp["statusDescription"] == want["status_description"]
    headers = resp["headers"]
    assert headers["content-type"].startswith(want["content_type"])
    assert headers["x-lambda-request-id"]
    if want["code"] is None:
        assert "x-should-retry" not in headers
    else:
        err = body_json(resp)["error"]
        assert err["code"] == want["code"]
        assert err["message"] and err["type"]
        assert headers["x-should-retry"] == "false"
        if want["status"] == 405:
            assert headers["allow"] == "POST"
    calls_upstream = want["status"] == 200 and event != "apigw-v2-health.json"
    assert len(stack.upstream_requests()) == (1 if calls_upstream else 0)


def test_invoke_rides_out_a_burst_of_500s(stack):
    stack.script("500,500,ok")
    resp = stack.invoke("events/apigw-v2-chat-completion.json")
    assert resp["statusCode"] == 200
    assert resp["headers"]["x-upstream-attempts"] == "3"
    assert body_json(resp)["object"] == "chat.completion"
    lines = stack.logs_for(resp["headers"]["x-lambda-request-id"])
    attempts = [l for l in lines if l["message"] == "upstream attempt"]
    finished = [l for l in lines if l["message"] == "request finished"]
    assert [a["decision"] for a in attempts] == ["retry", "retry", "done"]
    assert len(finished) == 1 and finished[0]["outcome"] == "success"


def test_invoke_outage_ends_in_the_clear_502(stack):
    stack.script("503", default="503")
    resp = stack.invoke("events/apigw-v2-chat-completion.json")
    assert resp["statusCode"] == 502
    err = body_json(resp)["error"]
    assert err["code"] == "upstream_unavailable"
    assert err["upstream"]["attempts"] == 5 == len(stack.upstream_requests())
    assert "status.openai.com" in err["message"]
    assert resp["headers"]["x-should-retry"] == "false"


def test_function_url_success_ride_out_and_outage(stack):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    stack.script("ok")
    status, headers, data = stack.http("POST", "/v1/chat/completions", body)
    assert status == 200 and json.loads(data)["object"] == "chat.completion"
    assert headers["x-upstream-attempts"] == "1"

    stack.script("502,504,ok")
    status, headers, _ = stack.http("POST", "/v1/chat/completions", body)
    assert status == 200 and headers["x-upstream-attempts"] == "3"

    stack.script("500", default="500")
    status, headers, data = stack.http("POST", "/v1/chat/completions", body)
    assert status == 502
    assert json.loads(data)["error"]["code"] == "upstream_unavailable"

    stack.script("ok")
    status, _, data = stack.http("GET", "/v1/models", token=None)
    assert status == 401 and json.loads(data)["error"]["code"] == "unauthorized"
    status, _, data = stack.http("GET", "/health", token=None)
    assert (status, json.loads(data)) == (200, {"status": "ok"})


def test_openai_sdk_gets_the_502_as_an_api_error_and_does_not_retry_it(stack):
    import openai

    client = openai.OpenAI(base_url=stack.url("/v1"), api_key="demo-token", max_retries=3, timeout=120)
    stack.script("500,ok")
    done = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content

    stack.script("503", default="503")
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    err = caught.value
    assert err.status_code == 502
    assert err.code == "upstream_unavailable"
    assert "OpenAI is unavailable" in err.message and "status.openai.com" in err.message
    # The function made its 5 attempts; the SDK did not multiply them (x-should-retry: false).
    assert len(stack.upstream_requests()) == 5
    assert err.response.headers["x-should-retry"] == "false"


def test_openai_sdk_stream_true_iterates_the_buffered_stream(stack):
    import openai

    client = openai.OpenAI(base_url=stack.url("/v1"), api_key="demo-token", max_retries=0, timeout=120)
    stack.script("500,ok")
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert stream.response.headers["x-upstream-attempts"] == "2"
    chunks = list(stream)
    assert len(chunks) >= 3 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the OpenAI simulator."
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The 500 was ridden out before the stream; upstream saw the request with `stream: true`.
    requests = stack.upstream_requests()
    assert len(requests) == 2
    assert all(json.loads(r["body"])["stream"] is True for r in requests)


def test_logs_under_watch_never_carry_keys_tokens_or_text(stack):
    lines = stack.log_lines()
    assert any(l.get("message") == "request finished" for l in lines)
    text = stack.watch_log.read_text(errors="replace")
    for secret in ("sk-sim-not-a-real-key", "demo-token", "Bearer ", "Hello from the OpenAI simulator"):
        assert secret not in text, f"function output leaks {secret!r}"
