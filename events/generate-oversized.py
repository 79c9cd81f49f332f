#!/usr/bin/env python3
"""Writes events/apigw-v2-oversized-body.json: the event of apigw-v2-chat-completion.json
with a chat body of TARGET_BYTES (over the default MAX_BODY_BYTES of 1 MiB = 1,048,576),
so the function must answer 413 payload_too_large without calling the upstream.

Deterministic: running it again produces the same file. Usage:
    python3 events/generate-oversized.py
"""
import json
import pathlib

TARGET_BYTES = 1_100_000
HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "apigw-v2-chat-completion.json"
OUT = HERE / "apigw-v2-oversized-body.json"


def main() -> None:
    event = json.loads(SOURCE.read_text())
    chat = json.loads(event["body"])
    filler = "All work and no play makes Jack a dull boy. "
    chat["messages"][-1]["content"] = "Summarise this: "
    base = len(json.dumps(chat, separators=(",", ":")).encode())
    pad = TARGET_BYTES - base
    chat["messages"][-1]["content"] += (filler * (pad // len(filler) + 1))[:pad]
    body = json.dumps(chat, separators=(",", ":"))
    assert len(body.encode()) == TARGET_BYTES, len(body.encode())

    event["body"] = body
    event["headers"]["content-length"] = str(len(body.encode()))
    event["requestContext"]["requestId"] = "Ck9YgjPbIAMEfeQ="
    OUT.write_text(json.dumps(event, indent=2) + "\n")
    print(f"wrote {OUT.name}: body of {len(body.encode())} bytes")


if __name__ == "__main__":
    main()
