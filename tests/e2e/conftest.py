"""End-to-end fixtures: the release binary under `cargo lambda watch` with the simulator
(test_watch.py; in RESPONSE_STREAM mode for the streaming tests), and the simulator and CloudWatch front of the metrics tests (test_metrics_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from local_stack import LocalStack  # noqa: E402
from metrics_support import CloudWatchFront, Simulator  # noqa: E402


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    # Fast retries keep the outage case short; the deadline logic is covered with real
    # deadlines by tests/proxy_simulator.rs (watch hands out a constant 600000 deadline).
    # The circuit breaker is off: one warm process serves every test, and each outage case
    # (5 failed attempts) would otherwise open it for the tests after it (the breaker has its
    # own tests).
    s = LocalStack(tmp_path_factory.mktemp("watch"), env={"METRICS_BACKEND": "none",
                                                           "RETRY_BASE_DELAY_MS": "100",
                                                           "RETRY_MAX_DELAY_MS": "400",
                                                           "BREAKER_FAILURES": "0"})
    s.start()
    try:
        # The first invocation starts the function process; give it a generous timeout.
        s.script("ok")
        s.invoke("events/apigw-v2-health.json")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def streaming(tmp_path_factory):
    """The stack with INVOKE_MODE=RESPONSE_STREAM (test_streaming.py, test_openai_node_streaming.py):
    `cargo lambda watch` streams the function-URL body as the runtime sends it. `idle_ms` is
    its STREAM_IDLE_TIMEOUT_MS."""
    idle_ms = 2000
    s = LocalStack(tmp_path_factory.mktemp("watch-stream"),
                   env={"INVOKE_MODE": "RESPONSE_STREAM", "METRICS_BACKEND": "emf", "BREAKER_FAILURES": "0",
                        "STREAM_IDLE_TIMEOUT_MS": str(idle_ms),
                        "RETRY_BASE_DELAY_MS": "100", "RETRY_MAX_DELAY_MS": "400"})
    s.idle_ms = idle_ms
    s.start()
    try:
        s.script("ok")
        # The first invocation starts the function process; give it a generous timeout.
        status, _, _ = s.http("GET", "/health", token=None)
        assert status == 200
        yield s
    finally:
        s.stop()


NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="session")
def node_sdk():
    """Runs a script of tests/e2e/node/ with openai-node v7 (`make test-e2e` installs it with
    `npm ci`): `run(script, base_url, *args)` returns the JSON object of its last stdout line."""
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists():
        pytest.fail("openai-node is not installed: run `make test-e2e` (it runs `npm ci` in tests/e2e/node)")
    version = json.loads(installed.read_text())["version"]
    assert version.split(".")[0] == "7", f"openai-node {version}, expected v7"

    def run(script: str, base_url: str, *args: str) -> dict:
        env = {**os.environ, "PROXY_BASE_URL": base_url, "PROXY_TOKEN": "demo-token", "NODE_NO_WARNINGS": "1"}
        out = subprocess.run(["node", str(NODE_DIR / script), *args], env=env, cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="module")
def sim():
    s = Simulator()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def front():
    f = CloudWatchFront()
    yield f
    f.stop()
