"""§8 metrics, `METRICS_BACKEND=emf` and `none`: the real function binary on the Runtime API
emulator. EMF lines are validated against the EMF specification (JSON schema + member
references) and compared with what the `cloudwatch` backend publishes for the same scenario.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_support import (  # noqa: E402
    ALL_METRICS,
    COUNT_METRICS,
    EMF_SCHEMA,
    FUNCTION_NAME,
    Function,
    attempt_latencies,
    check_emf_references,
    moto_metrics,
    unique_namespace,
)

SCENARIOS = {
    "ride-out": ("500,500,ok", 200),
    "outage": ("503,503,503,503,503,503", 502),
}


def emf_lines(fn: Function) -> list[dict]:
    return [line for line in fn.logs() if "_aws" in line]


def run(sim, front, backend: str, script: str, status: int, ns: str):
    fn = Function(sim, ns, backend=backend, endpoint_url=front.url)
    try:
        sim.script(script)
        inv = fn.invoke()
        assert inv.response["statusCode"] == status
        fn.emulator.wait_complete(inv)
        if backend == "cloudwatch":
            assert len(front.wait_requests(ns, 1)) == 1
        return fn, inv
    finally:
        fn.stop()


def test_schema_rejects_what_the_emf_specification_rejects():
    good = {"_aws": {"Timestamp": 1, "CloudWatchMetrics": [
        {"Namespace": "N", "Dimensions": [["FunctionName"]], "Metrics": [{"Name": "Requests", "Unit": "Count"}]}]},
        "FunctionName": "f", "Requests": 1}
    jsonschema.validate(good, EMF_SCHEMA)
    check_emf_references(good)
    for bad in (
        {"Requests": 1},
        {"_aws": {"Timestamp": "now", "CloudWatchMetrics": good["_aws"]["CloudWatchMetrics"]}},
        {"_aws": {"Timestamp": 1, "CloudWatchMetrics": [{"Namespace": "N", "Metrics": []}]}},
        {"_aws": {"Timestamp": 1, "CloudWatchMetrics": [
            {"Namespace": "N", "Dimensions": [], "Metrics": [{"Name": "R", "Unit": "Requests"}]}]}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, EMF_SCHEMA)
    with pytest.raises(AssertionError):
        check_emf_references({**good, "Requests": "1"})
    with pytest.raises(AssertionError):
        check_emf_references({k: v for k, v in good.items() if k != "FunctionName"})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_emf_line_is_valid_and_carries_the_putmetricdata_values(sim, front, scenario):
    script, status = SCENARIOS[scenario]
    ns = unique_namespace(f"emf-{scenario}")
    fn, inv = run(sim, front, "emf", script, status, ns)
    [doc] = emf_lines(fn)
    jsonschema.validate(doc, EMF_SCHEMA)
    check_emf_references(doc)
    [directive] = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == ns
    assert directive["Dimensions"] == [["FunctionName"]]
    assert doc["FunctionName"] == FUNCTION_NAME
    assert [m["Name"] for m in directive["Metrics"]] == ALL_METRICS
    assert all(m["Unit"] == ("Milliseconds" if m["Name"] == "UpstreamLatency" else "Count")
               for m in directive["Metrics"])
    assert abs(doc["_aws"]["Timestamp"] - inv.response_at_ms) < 5000
    assert doc["UpstreamLatency"] == attempt_latencies(fn.logs(), inv.request_id)
    assert front.requests(ns) == [], "emf makes no API call"

    # The same scenario through PutMetricData: the same names, units and values.
    cw_ns = unique_namespace(f"cw-{scenario}")
    cw_fn, cw_inv = run(sim, front, "cloudwatch", script, status, cw_ns)
    published = moto_metrics(front, cw_ns)
    assert sorted(published) == sorted(ALL_METRICS)
    for name in COUNT_METRICS:
        assert published[name]["SampleCount"] == 1
        assert published[name]["Sum"] == doc[name], name
    cw_latencies = attempt_latencies(cw_fn.logs(), cw_inv.request_id)
    assert published["UpstreamLatency"]["SampleCount"] == len(doc["UpstreamLatency"]) == len(cw_latencies)
    assert published["UpstreamLatency"]["Sum"] == pytest.approx(sum(cw_latencies))
    expected = {"ride-out": {"Upstream5xx": 2, "Retries": 2, "UpstreamFailures": 0},
                "outage": {"Upstream5xx": 5, "Retries": 4, "UpstreamFailures": 1}}[scenario]
    for name, value in {**expected, "Requests": 1, "Upstream429": 0, "UpstreamTimeouts": 0,
                        "UpstreamConnectionErrors": 0, "ColdStart": 1}.items():
        assert doc[name] == value, name


def test_none_backend_emits_nothing(sim, front):
    ns = unique_namespace("none")
    fn, _ = run(sim, front, "none", "500,ok", 200, ns)
    assert emf_lines(fn) == []
    assert front.requests(ns) == []
    assert not fn.emulator.extensions, "no flush extension without the cloudwatch backend"
