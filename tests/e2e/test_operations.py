"""§12 operations in the template: the dashboard, the alarms and the saved Logs Insights queries
only use metrics and log fields that the real function emits.

The template is read with cfn-lint's CloudFormation-aware YAML loader and the dashboard body is
rendered with its `Fn::Sub` parameters substituted. What the function emits is not taken from a
list in the code: the release binary runs on the Runtime API emulator with `METRICS_BACKEND=emf`
through several scenarios (success, a burst of 500s, an outage, a 429, a refused token), and
the metric names of its EMF lines and the keys of its JSON log lines are collected.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from cfnlint.decode import decode_str

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_support import Function, chat_event, unique_namespace  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "OpsNamespace"
FUNCTION = "ops-stack-ProxyFunction-AbC123"
LOG_GROUP = "/aws/lambda/ops-stack-proxy"
# AWS/Lambda metrics the dashboard may use (Lambda publishes them for every function).
LAMBDA_METRICS = {"Invocations", "Errors", "Throttles", "Duration", "ConcurrentExecutions"}
# Lambda's own JSON platform records (SystemLogLevel INFO): `type` and `record.*` are theirs.
PLATFORM_FIELDS = re.compile(r"^(type|record(\..+)?)$")
QUERY_WORDS = {
    "fields", "filter", "stats", "sort", "limit", "by", "as", "and", "or", "not", "desc", "asc",
    "count", "pct", "avg", "max", "min", "sum", "bin", "ispresent", "display", "like", "in",
    "SOURCE", "count_distinct", "earliest", "latest", "dedup",
}


def template() -> dict:
    tpl, matches = decode_str((REPO / "template.yaml").read_text())
    assert not matches, matches
    return tpl


def resources(tpl: dict, kind: str) -> dict[str, dict]:
    return {k: v for k, v in tpl["Resources"].items() if v["Type"] == kind}


def substitute(text: str, values: dict[str, str]) -> str:
    """`Fn::Sub` of a template string; every `${Name}` must be known."""
    def one(m: re.Match) -> str:
        assert m.group(1) in values, f"unknown substitution ${{{m.group(1)}}}"
        return values[m.group(1)]
    return re.sub(r"\$\{([A-Za-z0-9:.]+)\}", one, text)


def sub_values(tpl: dict) -> dict[str, str]:
    values = {name: str(p.get("Default", "")) for name, p in tpl["Parameters"].items()}
    values.update({"MetricsNamespace": NAMESPACE, "ProxyFunction": FUNCTION, "ProxyLogGroup": LOG_GROUP,
                   "AWS::Region": "eu-west-1", "AWS::StackName": "ops-stack", "AWS::URLSuffix": "amazonaws.com"})
    return values


def dashboard(tpl: dict) -> dict:
    [(_, dash)] = resources(tpl, "AWS::CloudWatch::Dashboard").items()
    body = dash["Properties"]["DashboardBody"]["Fn::Sub"]
    return json.loads(substitute(body, sub_values(tpl)))


def dashboard_metrics(dash: dict) -> list[tuple[str, str, list[str]]]:
    """(namespace, metric, dimension names) of every metric row; `...` repeats the row above."""
    out = []
    for widget in dash["widgets"]:
        previous: list = []
        for row in widget["properties"].get("metrics", []):
            plain = [x for x in row if not isinstance(x, dict)]
            if plain and plain[0] == "...":
                plain = previous
            if not plain:
                continue  # a pure expression row
            previous = plain
            namespace, metric, *dims = plain
            out.append((namespace, metric, dims[0::2]))
    return out


def query_fields(query: str) -> set[str]:
    """The log fields a Logs Insights query reads (not its aliases, literals or functions)."""
    query = re.sub(r"SOURCE\s+'[^']*'", " ", query)
    query = re.sub(r"\"[^\"]*\"|'[^']*'|/[^/]*/", " ", query)
    aliases = set(re.findall(r"\bas\s+([A-Za-z_][A-Za-z0-9_]*)", query))
    names = set(re.findall(r"(?<![A-Za-z0-9_.@])([A-Za-z_][A-Za-z0-9_.]*)", query))
    return {n for n in names if n not in QUERY_WORDS and n not in aliases and not PLATFORM_FIELDS.match(n)}


def all_queries(tpl: dict) -> dict[str, str]:
    queries = {name: r["Properties"]["QueryString"]
               for name, r in resources(tpl, "AWS::Logs::QueryDefinition").items()}
    for i, widget in enumerate(dashboard(tpl)["widgets"]):
        if widget["type"] == "log":
            queries[f"dashboard widget {i}"] = widget["properties"]["query"]
    return queries


@pytest.fixture(scope="module")
def emitted(sim):
    """Metric names (EMF) and log keys the real function writes across typical scenarios."""
    fn = Function(sim, unique_namespace("ops"), backend="emf")
    try:
        for script in ("ok", "500,500,ok", "503,503,503,503,503,503", "429:quota"):
            sim.script(script)
            inv = fn.invoke()
            fn.emulator.wait_complete(inv)
        refused = chat_event()
        refused["headers"]["authorization"] = "Bearer wrong"
        fn.emulator.wait_complete(fn.invoke(refused))
        lines = fn.all_logs()
    finally:
        fn.stop()
    metrics = {m["Name"] for line in lines if "_aws" in line
               for d in line["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
    keys = {k for line in lines if "_aws" not in line for k in line}
    assert {"Requests", "UpstreamFailures"} <= metrics and "request finished" in {
        line.get("message") for line in lines}
    return metrics, keys


def test_query_field_extraction_is_not_vacuous():
    q = 'fields @timestamp, a, b - 1 as c | filter message = "x y" and ispresent(d) | stats pct(e, 99) as p by f'
    assert query_fields(q) == {"a", "b", "message", "d", "e", "f"}
    with pytest.raises(AssertionError):
        substitute("${Nope}", {})


def test_dashboard_body_renders_to_json_with_the_widgets_an_operator_needs():
    tpl = template()
    dash = dashboard(tpl)
    rendered = json.dumps(dash)
    assert "${" not in rendered
    used = {(ns, m) for ns, m, _ in dashboard_metrics(dash)}
    for metric in ("Requests", "UpstreamFailures", "Upstream5xx", "Upstream429", "UpstreamTimeouts",
                   "UpstreamLatency"):
        assert (NAMESPACE, metric) in used, metric
    for metric in ("Errors", "Duration", "Throttles", "ConcurrentExecutions"):
        assert ("AWS/Lambda", metric) in used, metric
    stats = {s.get("stat") for w in dash["widgets"] for row in w["properties"].get("metrics", [])
             for s in row if isinstance(s, dict)}
    assert {"p50", "p99"} <= stats
    logs = [w for w in dash["widgets"] if w["type"] == "log"]
    assert logs and "upstream_request_ids" in logs[0]["properties"]["query"]
    assert f"SOURCE '{LOG_GROUP}'" in logs[0]["properties"]["query"]


def test_dashboard_and_alarm_metrics_are_ones_the_function_emits(emitted):
    metrics, _ = emitted
    tpl = template()
    for namespace, metric, dims in dashboard_metrics(dashboard(tpl)):
        assert dims == ["FunctionName"], (metric, dims)
        if namespace == "AWS/Lambda":
            assert metric in LAMBDA_METRICS, metric
        else:
            assert namespace == NAMESPACE and metric in metrics, (namespace, metric)
    alarms = resources(tpl, "AWS::CloudWatch::Alarm")
    assert len(alarms) >= 2
    for name, alarm in alarms.items():
        props = alarm["Properties"]
        assert props["Namespace"] == {"Ref": "MetricsNamespace"}, name
        assert props["MetricName"] in metrics, name
        assert [d["Name"] for d in props["Dimensions"]] == ["FunctionName"], name
        assert props["Dimensions"][0]["Value"] == {"Ref": "ProxyFunction"}, name
        assert "AWS::StackName" in json.dumps(props["AlarmName"]), f"{name} is not named after the stack"


def test_saved_queries_only_read_fields_the_function_logs(emitted):
    _, keys = emitted
    queries = all_queries(template())
    assert len(queries) >= 6
    for name, query in queries.items():
        missing = query_fields(query) - keys
        assert not missing, f"{name} reads fields the function never logs: {sorted(missing)}"


def test_saved_queries_cover_what_operators_ask():
    tpl = template()
    named = {r["Properties"]["Name"]["Fn::Sub"]: r for r in resources(tpl, "AWS::Logs::QueryDefinition").values()}
    assert all(n.startswith("${AWS::StackName}/") for n in named)
    text = " ".join(r["Properties"]["QueryString"] for r in named.values())
    for must in ("by code", "pct(elapsed_ms, 99)", "sort elapsed_ms desc", "initDurationMs", "retries"):
        assert must in text, must
    for r in named.values():
        assert r["Properties"]["LogGroupNames"] == [{"Ref": "ProxyLogGroup"}]


def test_emf_needs_a_log_level_that_keeps_its_lines():
    rules = template()["Rules"]
    [rule] = [r for r in rules.values() if r.get("RuleCondition") == {"Fn::Equals": [{"Ref": "MetricsBackend"}, "emf"]}]
    [assertion] = rule["Assertions"]
    allowed = assertion["Assert"]["Fn::Contains"][0]
    assert sorted(allowed) == ["DEBUG", "INFO", "TRACE"]
    assert assertion["Assert"]["Fn::Contains"][1] == {"Ref": "ApplicationLogLevel"}
