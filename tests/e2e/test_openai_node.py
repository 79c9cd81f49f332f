"""The official OpenAI Node SDK (openai-node, npm `openai` v7, pinned in tests/e2e/node/) against
the release binary under `cargo lambda watch`, through its function-URL emulation: a chat
completion, and an outage that ends in the SDK's `InternalServerError` (502) with no retry of
its own on top of the function's (the simulator sees exactly RETRY_MAX_ATTEMPTS attempts).

`make test-e2e` installs the package with `npm ci` (tests/e2e/node/package-lock.json)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
# The function's RETRY_MAX_ATTEMPTS under the e2e stack (the default: conftest.py sets none).
RETRY_MAX_ATTEMPTS = 5


@pytest.fixture(scope="module")
def node_client(stack):
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists():
        pytest.fail("openai-node is not installed: run `make test-e2e` (it runs `npm ci` in tests/e2e/node)")
    version = json.loads(installed.read_text())["version"]
    assert version.split(".")[0] == "7", f"openai-node {version}, expected v7"

    def run() -> dict:
        env = {**os.environ, "PROXY_BASE_URL": stack.url("/v1"), "PROXY_TOKEN": "demo-token",
               "NODE_NO_WARNINGS": "1"}
        out = subprocess.run(["node", str(NODE_DIR / "client.mjs")], env=env, cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    return run


def test_openai_node_chat_completion(stack, node_client):
    stack.script("500,ok")
    result = node_client()
    assert result["ok"], result
    completion = result["completion"]
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"]
    # The function rode out the 500; the SDK saw one answer.
    assert len(stack.upstream_requests()) == 2


def test_openai_node_outage_is_an_internal_server_error_502_without_sdk_retries(stack, node_client):
    stack.script("503", default="503")
    result = node_client()
    assert not result["ok"], result
    assert result["name"] == "InternalServerError" and result["isInternalServerError"], result
    assert result["status"] == 502
    assert result["code"] == "upstream_unavailable"
    assert "OpenAI is unavailable" in result["message"] and "status.openai.com" in result["message"]
    assert result["shouldRetry"] == "false"
    # The SDK (maxRetries: 3) did not multiply the function's attempts.
    assert len(stack.upstream_requests()) == RETRY_MAX_ATTEMPTS
