"""End-to-end fixtures: the release binary under `cargo lambda watch` with the simulator
(test_watch.py), and the simulator and CloudWatch front of the metrics tests (test_metrics_*.py)."""

from __future__ import annotations

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
