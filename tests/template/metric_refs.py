"""Every CloudWatch metric the template refers to (alarms now; dashboards for issue #14), and the
check that each is one the code emits (spec §8, §12).

`metric_references(rendered)` takes a template rendered by `cfn.render` and yields one
`MetricRef` per metric an `AWS::CloudWatch::Alarm` (single-metric or metric-math `Metrics`) or an
`AWS::CloudWatch::Dashboard` widget (its `DashboardBody` JSON, `"."` / `"..."` shorthands
expanded) uses. `problems(refs, rendered)` lists what does not match the code: a metric name
missing from `METRIC_NAMES` in src/telemetry/metrics.rs (whose own Rust test proves it is exactly
what every backend emits), a dimension other than `DIMENSION`, a dimension value that is not the
stack's function, or a namespace other than the one the function is given (`METRICS_NAMESPACE`).
Lambda's own `AWS/Lambda` metrics are checked against the names Lambda publishes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import cfn

# Lambda's own function metrics (AWS/Lambda, dimension FunctionName), for dashboards and alarms.
LAMBDA_METRICS = {
    "Invocations", "Errors", "Throttles", "Duration", "ConcurrentExecutions", "DeadLetterErrors",
    "PostRuntimeExtensionsDuration", "ProvisionedConcurrentExecutions", "ClaimedAccountConcurrency",
    "AsyncEventAge", "AsyncEventsReceived", "AsyncEventsDropped", "RecursiveInvocationsDropped",
    "UnreservedConcurrentExecutions", "IteratorAge",
}
FUNCTION = "ProxyFunction"


@dataclass(frozen=True)
class MetricRef:
    source: str  # e.g. "UpstreamFailuresAlarm" or "Dashboard:widget 3"
    namespace: object
    name: object
    dimensions: dict = field(default_factory=dict)

    def __hash__(self):
        return hash((self.source, json.dumps([self.namespace, self.name, self.dimensions], sort_keys=True)))


def code_metrics() -> tuple[list[str], str]:
    """`METRIC_NAMES` and `DIMENSION` as src/telemetry/metrics.rs defines them."""
    src = cfn.rust_source("src/telemetry/metrics.rs")
    names = re.search(r"pub const METRIC_NAMES: \[&str; (\d+)\] = \[(.*?)\];", src, re.S)
    dim = re.search(r'pub const DIMENSION: &str = "([^"]+)";', src)
    assert names and dim, "METRIC_NAMES / DIMENSION not found in src/telemetry/metrics.rs"
    listed = re.findall(r'"([^"]+)"', names.group(2))
    assert len(listed) == int(names.group(1)), listed
    return listed, dim.group(1)


def _dims(pairs) -> dict:
    return {d["Name"]: d["Value"] for d in pairs or []}


def _alarm_refs(name: str, props: dict):
    if "MetricName" in props:
        yield MetricRef(name, props.get("Namespace"), props["MetricName"], _dims(props.get("Dimensions")))
    for m in props.get("Metrics", []):
        metric = m.get("MetricStat", {}).get("Metric")
        if metric:
            yield MetricRef(f"{name}:{m.get('Id')}", metric.get("Namespace"), metric["MetricName"],
                            _dims(metric.get("Dimensions")))


def _widget_metric_rows(rows):
    """Dashboard metric arrays: [namespace, name, dim, value, ..., {options}] with `"."`
    (same as the row above at this position) and `"..."` (rest as the row above)."""
    previous: list = []
    for row in rows:
        items = [x for x in row if not isinstance(x, dict)]
        if not items:  # an expression row ({"expression": ...}) has no metric of its own
            continue
        if "..." in items:  # the row above, with the items before / after "..." replaced
            i = items.index("...")
            head, tail = items[:i], items[i + 1 :]
            items = head + previous[len(head) : len(previous) - len(tail)] + tail
        items = [previous[i] if x == "." and i < len(previous) else x for i, x in enumerate(items)]
        previous = items
        yield items


def _dashboard_refs(name: str, props: dict):
    body = props.get("DashboardBody")
    assert isinstance(body, str), f"{name}: DashboardBody did not render to a string: {body!r}"
    doc = json.loads(body)
    for n, widget in enumerate(doc.get("widgets", [])):
        rows = widget.get("properties", {}).get("metrics", [])
        for items in _widget_metric_rows(rows):
            namespace, metric, rest = items[0], items[1], items[2:]
            yield MetricRef(f"{name}:widget {n}", namespace, metric, dict(zip(rest[::2], rest[1::2])))


def metric_references(rendered: dict) -> list[MetricRef]:
    refs = []
    for name, res in rendered["Resources"].items():
        if res["Type"] == "AWS::CloudWatch::Alarm":
            refs.extend(_alarm_refs(name, res["Properties"]))
        elif res["Type"] == "AWS::CloudWatch::Dashboard":
            refs.extend(_dashboard_refs(name, res["Properties"]))
    return refs


def _is_the_function(value) -> bool:
    return value in ({"Ref": FUNCTION}, "${%s}" % FUNCTION)


def problems(refs: list[MetricRef], rendered: dict) -> list[str]:
    names, dimension = code_metrics()
    env = rendered["Resources"][FUNCTION]["Properties"]["Environment"]["Variables"]
    namespace = env["METRICS_NAMESPACE"]
    out = []
    for r in refs:
        if r.namespace == "AWS/Lambda":
            if r.name not in LAMBDA_METRICS:
                out.append(f"{r.source}: AWS/Lambda has no metric {r.name!r}")
            if set(r.dimensions) - {"FunctionName", "Resource", "ExecutedVersion"}:
                out.append(f"{r.source}: unexpected AWS/Lambda dimensions {r.dimensions}")
            if "FunctionName" in r.dimensions and not _is_the_function(r.dimensions["FunctionName"]):
                out.append(f"{r.source}: FunctionName is {r.dimensions['FunctionName']!r}, not this stack's function")
            continue
        if r.namespace != namespace:
            out.append(f"{r.source}: namespace {r.namespace!r} is not the function's METRICS_NAMESPACE {namespace!r}")
        if r.name not in names:
            out.append(f"{r.source}: metric {r.name!r} is not emitted by the code (METRIC_NAMES: {names})")
        if set(r.dimensions) != {dimension}:
            out.append(f"{r.source}: dimensions {sorted(r.dimensions)} are not the code's [{dimension!r}]")
        elif not _is_the_function(r.dimensions[dimension]):
            out.append(f"{r.source}: {dimension} is {r.dimensions[dimension]!r}, not this stack's function")
    return out
