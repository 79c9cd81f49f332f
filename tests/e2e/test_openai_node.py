"""The official OpenAI Node SDK (openai-node, npm `openai` v7, pinned in tests/e2e/node/) against
the release binary under `cargo lambda watch`, through its function-URL emulation: a chat
completion, and an outage that ends in the SDK's `InternalServerError` (502) with no retry of
its own on top of the function's (the simulator sees exactly RETRY_MAX_ATTEMPTS attempts).

`make test-e2e` installs the package with `npm ci` (tests/e2e/node/package-lock.json)."""

from __future__ import annotations

import pytest

# The function's RETRY_MAX_ATTEMPTS under the e2e stack (the default: conftest.py sets none).
RETRY_MAX_ATTEMPTS = 5


@pytest.fixture(scope="module")
def node_client(stack, node_sdk):
    return lambda: node_sdk("client.mjs", stack.url("/v1"))


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
