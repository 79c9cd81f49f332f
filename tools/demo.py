"""`make demo`: the function under `cargo lambda watch` on the sample events in events/, against
the bundled OpenAI simulator (or the real OpenAI when OPENAI_API_KEY is set). Prints each
response and its log lines, then stops everything it started."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_stack import (FUNCTION, PROXY_TOKEN, REPO, LocalStack, free_port, http_json,  # noqa: E402
                         stop_process, wait_for_port)

REAL = bool(os.environ.get("OPENAI_API_KEY"))

# (title, event file, simulator script, default step once the script is used up)
SCENARIOS = [
    ("Health check (no auth, no upstream call)", "apigw-v2-health.json", "ok", "ok"),
    ("Chat completion, OpenAI healthy", "apigw-v2-chat-completion.json", "ok", "ok"),
    ("Embeddings", "apigw-v2-embeddings.json", "ok", "ok"),
    ("A burst of upstream 500s, ridden out", "apigw-v2-chat-completion.json", "500,500,ok", "ok"),
    ("A 429 with retry-after-ms: 300, waited out", "apigw-v2-chat-completion.json", "429:ra-ms=300,ok", "ok"),
    ("An outage (503 every time): the clear 502", "apigw-v2-chat-completion.json", "503", "503"),
    ("stream: true, buffered", "apigw-v2-chat-stream.json", "ok", "ok"),
    ("Bad input: malformed JSON", "apigw-v2-malformed-json.json", "ok", "ok"),
    ("Bad input: missing client token", "apigw-v2-missing-token.json", "ok", "ok"),
    ("Bad input: model not allowed", "apigw-v2-disallowed-model.json", "ok", "ok"),
    ("Bad input: unknown route", "apigw-v2-unknown-route.json", "ok", "ok"),
]
FAULTS = {"500,500,ok", "429:ra-ms=300,ok", "503"}
LOG_KEYS = ["level", "message", "upstream", "attempt", "status", "error_kind", "latency_ms", "decision", "reason",
            "next_delay_ms", "remaining_ms", "code", "outcome", "attempts", "elapsed_ms", "budget_ms",
            "upstream_request_ids", "cold_start", "streamed", "first_byte_ms", "stream_bytes", "stream_outcome",
            "_aws"]


def show_body(resp: dict) -> str:
    body = resp.get("body") or ""
    ctype = (resp.get("headers") or {}).get("content-type", "")
    if "json" in ctype:
        try:
            body = json.dumps(json.loads(body), indent=2)
        except ValueError:
            pass
    lines = body.splitlines()
    if len(lines) > 24:
        lines = lines[:24] + [f"... ({len(lines) - 24} more lines)"]
    return textwrap.indent("\n".join(lines), "    ")


def show_log(line: dict) -> str:
    parts = [f"{k}={json.dumps(line[k])}" for k in LOG_KEYS if k in line and k != "_aws"]
    if "_aws" in line:
        metrics = [m["Name"] for d in line["_aws"].get("CloudWatchMetrics", []) for m in d.get("Metrics", [])]
        parts = ["EMF metrics:"] + [f"{m}={json.dumps(line.get(m))}" for m in metrics]
    return "    " + " ".join(parts)


def main() -> int:
    where = "the real OpenAI" if REAL else "the bundled OpenAI simulator"
    print(f"== openai-lambda-proxy demo: cargo lambda watch (release build) against {where}\n")
    with tempfile.TemporaryDirectory(prefix="proxy-demo-") as tmp, LocalStack(Path(tmp), real_openai=REAL) as stack:
        for title, event, script, default in SCENARIOS:
            if REAL and script in FAULTS:
                continue
            stack.script(script, default)
            print(f"--- {title}")
            print(f"    cargo lambda invoke {FUNCTION} --data-file events/{event}"
                  + ("" if REAL else f"    (simulator script: {script})"))
            resp = stack.invoke(REPO / "events" / event)
            headers = resp.get("headers") or {}
            show_response(stack, resp)
        stream_demo(Path(tmp))
        if not REAL:
            fallback_demo(Path(tmp))
    print("== demo finished; simulators and cargo lambda watch stopped")
    return 0


SHOWN_HEADERS = ("content-type", "x-upstream-attempts", "x-request-id", "x-should-retry", "retry-after",
                 "x-lambda-request-id", "x-proxy-upstream", "x-proxy-fallbacks", "x-proxy-model")


def show_response(stack: LocalStack, resp: dict) -> None:
    headers = resp.get("headers") or {}
    shown = {k: v for k, v in headers.items() if k in SHOWN_HEADERS}
    print(f"    -> {resp.get('statusCode')}  {json.dumps(shown)}")
    print(show_body(resp))
    show_logs(stack, headers.get("x-lambda-request-id"))


def show_logs(stack: LocalStack, lambda_request_id: str | None) -> None:
    if lambda_request_id:
        print("    log lines:")
        for line in stack.logs_for(lambda_request_id):
            print(show_log(line))
    print()


def stream_demo(tmp: Path) -> None:
    """Spec §10: INVOKE_MODE=RESPONSE_STREAM through `cargo lambda watch`'s function URL: each
    token printed with the time it arrived, while the simulator sends them 250 ms apart."""
    print("== real streaming (INVOKE_MODE=RESPONSE_STREAM, the function URL of cargo lambda watch)\n")
    with LocalStack(tmp / "stream", env={"INVOKE_MODE": "RESPONSE_STREAM"}, real_openai=REAL) as stack:
        for title, script in [("stream: true, tokens as the upstream sends them (250 ms apart)", "stream:gap=250"),
                              ("The upstream breaks off after 4 events: one SSE error event ends the stream",
                               "stream:gap=150:cut=4")]:
            if REAL and "cut" in script:
                continue
            stack.script(script)
            print(f"--- {title}")
            print(f"    POST {stack.url('/v1/chat/completions')}  {{\"stream\": true, ...}}"
                  + ("" if REAL else f"    (simulator script: {script})"))
            show_stream(stack)


def show_stream(stack: LocalStack) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "Say hello in five words."}]})
    conn = http.client.HTTPConnection("127.0.0.1", stack.watch_port, timeout=60)
    start = time.monotonic()
    conn.request("POST", f"/lambda-url/{FUNCTION}/v1/chat/completions", body=body,
                 headers={"authorization": f"Bearer {PROXY_TOKEN}", "content-type": "application/json"})
    resp = conn.getresponse()
    print(f"    -> {resp.status}  content-type: {resp.getheader('content-type')}  "
          f"x-upstream-attempts: {resp.getheader('x-upstream-attempts')}")
    for raw in resp:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        at = f"    +{time.monotonic() - start:.3f} s  "
        if data == "[DONE]":
            print(at + "[DONE]")
            continue
        event = json.loads(data)
        if "error" in event:
            e = event["error"]
            print(at + f"error event: code={e['code']} message={e['message'][:90]!r}...")
        elif event.get("choices") and event["choices"][0]["delta"].get("content") is not None:
            token = event["choices"][0]["delta"]["content"]
            print(at + (f"token {token!r}" if token else "first chunk (role: assistant)"))
    conn.close()
    show_logs(stack, resp.getheader("x-lambda-request-id"))


def fallback_demo(tmp: Path) -> None:
    """Spec §11: two simulators as two upstreams; an outage of the primary is rescued by the
    backup, the primary's circuit breaker opens, and when both are down the answer is clear."""
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    sims, ports = [], {}
    try:
        for name in ("primary", "backup"):
            ports[name] = free_port()
            sims.append(subprocess.Popen([str(target / "release" / "openai-simulator"), "--port", str(ports[name])],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            wait_for_port(ports[name], 20, sims[-1])
        upstreams = [{"name": n, "base_url": f"http://127.0.0.1:{p}/v1", "api_key": f"sk-sim-{n}"}
                     for n, p in ports.items()]
        # Single quotes: cargo lambda's --env-file (dotenv) takes them literally; bare JSON is a parse error.
        env = {"UPSTREAMS": f"'{json.dumps(upstreams)}'", "BREAKER_FAILURES": "2", "BREAKER_COOLDOWN_MS": "30000"}

        def script(name: str, text: str) -> None:
            base = f"http://127.0.0.1:{ports[name]}"
            http_json("PUT", base + "/_sim/default", text.encode())
            http_json("PUT", base + "/_sim/script", text.encode())

        print("== fallback upstreams (UPSTREAMS: primary, backup; BREAKER_FAILURES=2)\n")
        with LocalStack(tmp / "fallback", env=env) as stack:
            event = REPO / "events" / "apigw-v2-chat-completion.json"
            for title, primary, backup in [
                ("Outage of the primary (503 every time): the backup serves", "503", "ok"),
                ("The primary's breaker is open: straight to the backup, no wasted attempt", "503", "ok"),
                ("Both down: the clear 502, attempts counted per upstream", "503", "503"),
                ("Every breaker open: 503 upstream_circuit_open at once, retry-after", "503", "503"),
            ]:
                script("primary", primary)
                script("backup", backup)
                print(f"--- {title}")
                print(f"    cargo lambda invoke {FUNCTION} --data-file events/{event.name}"
                      f"    (primary: {primary}, backup: {backup})")
                show_response(stack, stack.invoke(event))
    finally:
        for proc in sims:
            stop_process(proc, timeout=5, group=True)


if __name__ == "__main__":
    sys.exit(main())
