"""Spec §12 / issue #14 groundwork: every metric the template's alarms (and, once #14 adds it,
dashboard) use is one the code emits, in the namespace and with the dimension the function
publishes. The template is rendered with parameters substituted (cfn.render)."""

import copy
import json

import pytest

import cfn
from metric_refs import code_metrics, metric_references, problems


@pytest.mark.parametrize(
    "params",
    [{}, {"MetricsNamespace": "Team/LLM-Proxy", "AlarmEmail": "ops@example.com"}],
    ids=["defaults", "custom namespace"],
)
def test_every_alarm_metric_is_one_the_code_emits(params):
    rendered = cfn.render(params)
    refs = metric_references(rendered)
    alarms = {r.source.split(":")[0] for r in refs}
    assert "UpstreamFailuresAlarm" in alarms, refs
    assert problems(refs, rendered) == []
    names, _ = code_metrics()
    assert "UpstreamFailures" in names


def test_the_check_catches_a_metric_the_code_does_not_emit():
    rendered = cfn.render()
    bad = copy.deepcopy(rendered)
    alarm = bad["Resources"]["UpstreamFailuresAlarm"]["Properties"]
    alarm["MetricName"] = "UpstreamFailure"  # a typo: the alarm would watch nothing, forever
    assert any("'UpstreamFailure' is not emitted" in p for p in problems(metric_references(bad), bad))
    bad = copy.deepcopy(rendered)
    bad["Resources"]["UpstreamFailuresAlarm"]["Properties"]["Namespace"] = "OpenAIProxyTypo"
    assert any("namespace" in p for p in problems(metric_references(bad), bad))
    bad = copy.deepcopy(rendered)
    bad["Resources"]["UpstreamFailuresAlarm"]["Properties"]["Dimensions"] = [{"Name": "Function", "Value": {"Ref": "ProxyFunction"}}]
    assert any("dimensions" in p for p in problems(metric_references(bad), bad))


def test_metric_math_alarms_and_dashboard_bodies_are_read_too():
    """The forms #14 will add: a metric-math alarm and a dashboard with `.` / `...` rows."""
    rendered = cfn.render()
    extra = copy.deepcopy(rendered)
    fn = {"Ref": "ProxyFunction"}
    extra["Resources"]["RateAlarm"] = {
        "Type": "AWS::CloudWatch::Alarm",
        "Properties": {"Metrics": [
            {"Id": "failures", "MetricStat": {"Metric": {"Namespace": "OpenAIProxy", "MetricName": "UpstreamFailures",
                                                          "Dimensions": [{"Name": "FunctionName", "Value": fn}]}}},
            {"Id": "requests", "MetricStat": {"Metric": {"Namespace": "OpenAIProxy", "MetricName": "Requests",
                                                          "Dimensions": [{"Name": "FunctionName", "Value": fn}]}}},
            {"Id": "rate", "Expression": "100 * failures / requests"},
        ]},
    }
    body = {"widgets": [
        {"type": "metric", "properties": {"metrics": [
            ["OpenAIProxy", "Requests", "FunctionName", "${ProxyFunction}"],
            [".", "Retries", ".", "."],
            [{"expression": "m1 / m2", "id": "e1"}],
            ["AWS/Lambda", "Duration", "FunctionName", "${ProxyFunction}", {"stat": "p99"}],
            ["...", "Throttles", "FunctionName", "${ProxyFunction}", {"stat": "Sum"}],
        ]}},
    ]}
    extra["Resources"]["Dashboard"] = {"Type": "AWS::CloudWatch::Dashboard",
                                       "Properties": {"DashboardBody": json.dumps(body)}}
    refs = metric_references(extra)
    seen = {(r.namespace, r.name) for r in refs}
    assert {("OpenAIProxy", "Requests"), ("OpenAIProxy", "Retries"), ("OpenAIProxy", "UpstreamFailures"),
            ("AWS/Lambda", "Duration"), ("AWS/Lambda", "Throttles")} <= seen
    assert problems(refs, extra) == []
    # A dashboard row naming a metric nobody emits is caught, "..." rows included.
    body["widgets"][0]["properties"]["metrics"].append(["OpenAIProxy", "Nope", "FunctionName", "${ProxyFunction}"])
    body["widgets"][0]["properties"]["metrics"].append(["...", "AlsoNope", "FunctionName", "${ProxyFunction}"])
    extra["Resources"]["Dashboard"]["Properties"]["DashboardBody"] = json.dumps(body)
    found = problems(metric_references(extra), extra)
    assert any("'Nope'" in p for p in found) and any("'AlsoNope'" in p for p in found), found
