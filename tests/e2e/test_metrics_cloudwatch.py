"""§8 metrics, `METRICS_BACKEND=cloudwatch`: the real function binary (its real aws-sdk-cloudwatch
client and flush extension) on a Runtime/Extensions API emulator, publishing to moto through
tools/cw_cbor_front.py; boto3 reads moto back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from local_stack import free_port  # tools/, put on sys.path by conftest.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_support import (  # noqa: E402
    ALL_METRICS,
    FUNCTION_NAME,
    CloudWatchFront,
    Function,
    moto_metrics,
    unique_namespace,
)

PUT_TIMEOUT_MS = 3000  # src/telemetry/cloudwatch.rs PUT_TIMEOUT
TIMINGS: dict[str, float] = {}


@pytest.fixture
def function(request, sim, front):
    started = []

    def start(namespace: str, **kw) -> Function:
        kw.setdefault("endpoint_url", front.url)
        fn = Function(sim, namespace, **kw)
        started.append(fn)
        return fn

    yield start
    for fn in started:
        fn.stop()
    front.configure()


def is_metrics_warning(line: dict) -> bool:
    return line.get("level") == "WARN" and "PutMetricData" in str(line.get("message"))


def metrics_warnings(fn: Function) -> list[dict]:
    """All of them: stops the function so that every line it wrote has been read."""
    return [line for line in fn.all_logs() if is_metrics_warning(line)]


def check_published(front: CloudWatchFront, ns: str, expected: dict[str, float],
                    latencies: list[float], invocations: int) -> dict:
    got = moto_metrics(front, ns)
    assert sorted(got) == sorted(ALL_METRICS)
    for name, m in got.items():
        assert all(d == [{"Name": "FunctionName", "Value": FUNCTION_NAME}] for d in m["dimensions"]), name
        assert m["units"] == (["Milliseconds"] if name == "UpstreamLatency" else ["Count"]), name
    for name, value in expected.items():
        # One sample per invocation, zeros included.
        assert got[name]["SampleCount"] == invocations, name
        assert got[name]["Sum"] == value, name
    lat = got["UpstreamLatency"]
    assert lat["SampleCount"] == len(latencies)
    assert lat["Sum"] == pytest.approx(sum(latencies))
    assert lat["Maximum"] == max(latencies) and lat["Minimum"] == min(latencies)
    return got


def check_after_response_before_freeze(front: CloudWatchFront, ns: str, invs) -> list[dict]:
    reqs = front.wait_requests(ns, len(invs))
    assert len(reqs) == len(invs), "one PutMetricData call per invocation"
    for req, inv in zip(reqs, invs):
        assert req["operation"] == "PutMetricData" and req["status"] == 200
        assert req["content_type"] == "application/cbor" and req["smithy_protocol"] == "rpc-v2-cbor"
        assert req["authorization"] == "AWS4-HMAC-SHA256"
        assert req["received_at_ms"] >= inv.response_at_ms, "published before the response was posted"
        assert req["answered_at_ms"] <= inv.extension_done_at_ms, "extension let Lambda freeze first"
    return reqs


def test_ride_out_publishes_every_metric_once_after_the_response(function, sim, front):
    ns = unique_namespace("rideout")
    fn = function(ns)
    sim.script("500,500,ok")
    inv = fn.invoke()
    assert inv.response["statusCode"] == 200
    assert inv.response["headers"]["x-upstream-attempts"] == "3"
    fn.emulator.wait_complete(inv)
    check_after_response_before_freeze(front, ns, [inv])
    latencies = fn.latencies(inv, 3)
    assert len(latencies) == 3
    check_published(front, ns, {
        "Requests": 1, "Upstream5xx": 2, "Upstream429": 0, "UpstreamTimeouts": 0,
        "UpstreamConnectionErrors": 0, "Retries": 2, "UpstreamFailures": 0, "ColdStart": 1,
    }, latencies, invocations=1)

    # A warm invocation: ColdStart and the other zeros are published as 0 samples.
    sim.script("ok")
    inv2 = fn.invoke()
    fn.emulator.wait_complete(inv2)
    check_after_response_before_freeze(front, ns, [inv, inv2])
    latencies += fn.latencies(inv2, 1)
    check_published(front, ns, {
        "Requests": 2, "Upstream5xx": 2, "Retries": 2, "UpstreamFailures": 0, "ColdStart": 1,
    }, latencies, invocations=2)
    assert metrics_warnings(fn) == []


def test_outage_ending_in_502_counts_every_attempt_and_the_failure(function, sim, front):
    ns = unique_namespace("outage")
    fn = function(ns)
    sim.script("503,503,503,503,503,503")
    inv = fn.invoke()
    assert inv.response["statusCode"] == 502
    assert json.loads(inv.response["body"])["error"]["code"] == "upstream_unavailable"
    fn.emulator.wait_complete(inv)
    check_after_response_before_freeze(front, ns, [inv])
    latencies = fn.latencies(inv, 5)
    assert len(latencies) == 5  # RETRY_MAX_ATTEMPTS default
    check_published(front, ns, {
        "Requests": 1, "Upstream5xx": 5, "Upstream429": 0, "UpstreamTimeouts": 0,
        "UpstreamConnectionErrors": 0, "Retries": 4, "UpstreamFailures": 1, "ColdStart": 1,
    }, latencies, invocations=1)

    # /health records nothing, and its invocation still completes (the extension does not hang).
    health = json.loads((Path(__file__).resolve().parents[2] / "events" / "apigw-v2-health.json").read_text())
    inv2 = fn.invoke(health)
    assert inv2.response["statusCode"] == 200
    fn.emulator.wait_complete(inv2, timeout=5)
    assert len(front.requests(ns)) == 1


def test_slow_cloudwatch_does_not_delay_the_response(function, sim, front):
    ns = unique_namespace("slow")
    fn = function(ns)
    front.configure(delay_ms=2000)
    sim.script("ok")
    inv = fn.invoke()
    assert inv.response["statusCode"] == 200
    response_ms = inv.response_at_ms - inv.sent_at_ms
    fn.emulator.wait_complete(inv)
    [req] = check_after_response_before_freeze(front, ns, [inv])
    cw_ms = req["answered_at_ms"] - req["received_at_ms"]
    TIMINGS.update(slow_response_ms=response_ms, slow_cloudwatch_ms=cw_ms,
                   slow_freeze_after_response_ms=inv.extension_done_at_ms - inv.response_at_ms)
    print(f"\nslow CloudWatch: response after {response_ms:.0f} ms; CloudWatch answered after "
          f"{cw_ms:.0f} ms; extension done {inv.extension_done_at_ms - inv.response_at_ms:.0f} ms "
          f"after the response")
    assert cw_ms >= 2000
    assert response_ms < 1000, "the response waited for CloudWatch"
    assert inv.extension_done_at_ms - inv.response_at_ms >= 2000
    assert moto_metrics(front, ns)["Requests"]["Sum"] == 1
    assert metrics_warnings(fn) == []


@pytest.mark.parametrize("failure", ["refused", "500", "timeout"])
def test_failing_cloudwatch_changes_nothing_and_is_logged_once(function, sim, front, failure):
    ns = unique_namespace(f"fail-{failure}")
    if failure == "refused":
        fn = function(ns, endpoint_url=f"http://127.0.0.1:{free_port()}")  # nothing listens
    else:
        fn = function(ns)
        front.configure(**({"fail": "500"} if failure == "500" else {"delay_ms": PUT_TIMEOUT_MS + 2000}))
    answers = []
    for _ in range(2):
        sim.script("500,ok")
        inv = fn.invoke()
        answers.append(inv)
        assert inv.response["statusCode"] == 200
        assert inv.response["headers"]["x-upstream-attempts"] == "2"
        assert json.loads(inv.response["body"])["object"] == "chat.completion"
        assert inv.response_at_ms - inv.sent_at_ms < 1000, "the response waited for CloudWatch"
        fn.emulator.wait_complete(inv)
        # Bounded: the extension gives up at the timeout.
        assert inv.extension_done_at_ms - inv.response_at_ms < PUT_TIMEOUT_MS + 1000
    fn.p.wait_json(is_metrics_warning, len(answers))
    warnings = metrics_warnings(fn)
    assert [w["lambda_request_id"] for w in warnings] == [a.request_id for a in answers], \
        "exactly one WARN per failed invocation"
    for w in warnings:
        assert w["error"], w
        assert w["namespace"] == ns
    if failure == "timeout":
        # The SDK's operation timeout or the flush's own bound, whichever fires first.
        assert all("timeout" in w["error"].lower() or "no answer within" in w["error"]
                   for w in warnings), warnings
        TIMINGS["timeout_extension_ms"] = answers[0].extension_done_at_ms - answers[0].response_at_ms
    if failure != "refused":
        assert front.requests(ns) or failure == "timeout"
    print(f"\n{failure}: {warnings[0]['error']}")
    logs = fn.all_logs()
    assert [line for line in logs if line.get("level") == "ERROR"] == []
    # The SDK's own logging adds nothing at WARN: the one line above is the whole story.
    assert [line for line in logs if line.get("level") == "WARN"
            and str(line.get("target", "")).startswith(("aws", "hyper", "lambda"))] == []


def test_missed_invoke_under_watch_is_published_exactly_once(function, sim, front):
    """`cargo lambda watch` never delivers the first INVOKE to the extension."""
    ns = unique_namespace("watch")
    fn = function(ns, miss_first_invoke=True)
    sim.script("ok")
    first = fn.invoke()
    # Never claimed: published from the background after the grace period.
    [req] = front.wait_requests(ns, 1)
    assert req["received_at_ms"] >= first.response_at_ms + 1000
    second = fn.invoke()
    fn.emulator.wait_complete(second)
    third = fn.invoke()
    fn.emulator.wait_complete(third)
    # Anything sent twice would show up within the grace period.
    reqs = front.wait_requests(ns, 4, timeout=2)
    assert len(reqs) == 3
    got = moto_metrics(front, ns)
    assert got["Requests"]["Sum"] == 3 and got["Requests"]["SampleCount"] == 3
    assert got["ColdStart"]["Sum"] == 1


def test_missed_invoke_is_drained_by_the_next_flush(function, sim, front):
    ns = unique_namespace("drain")
    fn = function(ns, miss_first_invoke=True)
    sim.script("ok")
    fn.invoke()
    second = fn.invoke()  # well within the grace period: this flush takes both records
    fn.emulator.wait_complete(second)
    assert len(front.wait_requests(ns, 2)) == 2
    assert len(front.wait_requests(ns, 3, timeout=2)) == 2
    got = moto_metrics(front, ns)
    assert got["Requests"]["Sum"] == 2 and got["ColdStart"]["Sum"] == 1
