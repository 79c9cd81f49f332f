"""`make demo`: the function under `cargo lambda watch` on the sample events in events/, against
the bundled OpenAI simulator (or the real OpenAI when OPENAI_API_KEY is set). Prints each
response and its log lines, then stops everything it started."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_stack import FUNCTION, REPO, LocalStack  # noqa: E402

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
LOG_KEYS = ["level", "message", "attempt", "status", "error_kind", "latency_ms", "decision", "reason",
            "next_delay_ms", "remaining_ms", "code", "outcome", "attempts", "elapsed_ms", "budget_ms",
            "upstream_request_ids", "cold_start", "_aws"]


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
            shown = {k: v for k, v in headers.items()
                     if k in ("content-type", "x-upstream-attempts", "x-request-id", "x-should-retry", "retry-after",
                              "x-lambda-request-id")}
            print(f"    -> {resp.get('statusCode')}  {json.dumps(shown)}")
            print(show_body(resp))
            rid = headers.get("x-lambda-request-id")
            if rid:
                print("    log lines:")
                for line in stack.logs_for(rid):
                    print(show_log(line))
            print()
    print("== demo finished; simulator and cargo lambda watch stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
