"""Spec §12 / issue #14: the dashboard, saved queries and alarms an operator opens first. The
metric names and dimensions they use are checked against the code by test_metric_refs.py; the
log fields the queries read are checked against the real function's logs by
tests/e2e/test_operations_logs.py."""

import json

import pytest

import cfn
from queries import all_queries, dashboard_body, query_fields


def metric_rows(dash: dict) -> set[tuple[str, str]]:
    rows, previous = set(), []
    for widget in dash["widgets"]:
        for row in widget["properties"].get("metrics", []):
            plain = [x for x in row if not isinstance(x, dict)]
            plain = previous if plain[:1] == ["..."] else plain
            if plain:
                previous = plain
                rows.add((plain[0], plain[1]))
    return rows


def test_query_field_extraction_is_not_vacuous():
    q = 'fields @timestamp, a, b - 1 as c | filter message = "x y" and ispresent(d) | stats pct(e, 99) as p by f'
    assert query_fields(q) == {"a", "b", "message", "d", "e", "f"}
    assert query_fields("fields record.metrics.initDurationMs | filter type = 'platform.report'") == set()


def test_dashboard_renders_to_json_with_the_widgets_an_operator_needs():
    template = cfn.load_template()
    dash = dashboard_body(template)
    assert "${" not in json.dumps(dash)
    rows = metric_rows(dash)
    ns = "OpenAIProxy"
    for metric in ("Requests", "UpstreamFailures", "Upstream5xx", "Upstream429", "UpstreamTimeouts",
                   "UpstreamLatency", "Retries", "Fallbacks", "CircuitOpen", "AttemptsSkipped",
                   "TimeToFirstByte", "StreamsInterrupted"):
        assert (ns, metric) in rows, metric
    for metric in ("Errors", "Duration", "Throttles", "ConcurrentExecutions"):
        assert ("AWS/Lambda", metric) in rows, metric
    stats = {s.get("stat") for w in dash["widgets"] for row in w["properties"].get("metrics", [])
             for s in row if isinstance(s, dict)}
    assert {"p50", "p99"} <= stats
    [log] = [w for w in dash["widgets"] if w["type"] == "log"]
    assert "upstream_request_ids" in log["properties"]["query"]
    assert log["properties"]["query"].startswith("SOURCE '<ProxyLogGroup>'")
    [dash_res] = cfn.resources_of_type(cfn.render(), "AWS::CloudWatch::Dashboard").values()
    assert dash_res["Properties"]["DashboardName"] == "openai-lambda-proxy-openai-proxy"


def test_alarms_are_named_after_the_stack_and_cover_failures_breakers_and_latency():
    alarms = cfn.resources_of_type(cfn.render(), "AWS::CloudWatch::Alarm")
    names = {a["Properties"]["AlarmName"] for a in alarms.values()}
    assert all(n.startswith("openai-lambda-proxy-") for n in names), names
    watched = {(a["Properties"]["MetricName"], a["Properties"].get("ExtendedStatistic")) for a in alarms.values()}
    assert {("UpstreamFailures", None), ("CircuitOpen", None), ("UpstreamLatency", "p99")} <= watched


def test_saved_queries_cover_what_operators_ask():
    template = cfn.load_template()
    saved = {k: r for k, r in template["Resources"].items() if r["Type"] == "AWS::Logs::QueryDefinition"}
    assert len(saved) >= 5
    for r in saved.values():
        assert r["Properties"]["Name"]["Fn::Sub"].startswith("${AWS::StackName}/")
        assert r["Properties"]["LogGroupNames"] == [{"Ref": "ProxyLogGroup"}]
    text = " ".join(r["Properties"]["QueryString"] for r in saved.values())
    for must in ("by code, upstream", "by route, model", "avg(fallbacks)", "pct(elapsed_ms, 99)", "sort elapsed_ms desc",
                 "initDurationMs", "retries_per_request"):
        assert must in text, must
    assert len(all_queries(template)) == len(saved) + 1


@pytest.mark.parametrize("level,ok", [("TRACE", True), ("DEBUG", True), ("INFO", True),
                                      ("WARN", False), ("ERROR", False), ("FATAL", False)])
def test_emf_is_refused_with_a_log_level_that_drops_its_lines(level, ok):
    rules = cfn.load_template()["Rules"]
    [rule] = [r for r in rules.values()
              if r.get("RuleCondition") == {"Fn::Equals": [{"Ref": "MetricsBackend"}, "emf"]}]
    [assertion] = rule["Assertions"]
    allowed, ref = assertion["Assert"]["Fn::Contains"]
    assert ref == {"Ref": "ApplicationLogLevel"}
    assert (level in allowed) == ok
