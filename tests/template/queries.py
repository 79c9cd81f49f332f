"""The Logs Insights queries the template ships (saved `AWS::Logs::QueryDefinition`s and the
dashboard's log widgets), and the log fields each one reads. Shared by the template tests and by
tests/e2e/test_operations_logs.py, which checks those fields against what the real function logs.
Needs only cfn-lint's YAML loader (no SAM transform)."""

from __future__ import annotations

import json
import re

import cfn

# Lambda's own JSON platform records (SystemLogLevel INFO): `type` and `record.*` are theirs.
PLATFORM_FIELDS = re.compile(r"^(type|record(\..+)?)$")
QUERY_WORDS = {
    "fields", "filter", "stats", "sort", "limit", "by", "as", "and", "or", "not", "desc", "asc",
    "count", "pct", "avg", "max", "min", "sum", "bin", "ispresent", "display", "like", "in",
    "SOURCE", "count_distinct", "earliest", "latest", "dedup",
}


def query_fields(query: str) -> set[str]:
    """The log fields a query reads: not its aliases, literals, functions or @-fields."""
    query = re.sub(r"SOURCE\s+'[^']*'", " ", query)
    query = re.sub(r"\"[^\"]*\"|'[^']*'|/[^/]*/", " ", query)
    aliases = set(re.findall(r"\bas\s+([A-Za-z_][A-Za-z0-9_]*)", query))
    names = set(re.findall(r"(?<![A-Za-z0-9_.@])([A-Za-z_][A-Za-z0-9_.]*)", query))
    return {n for n in names if n not in QUERY_WORDS and n not in aliases and not PLATFORM_FIELDS.match(n)}


def dashboard_body(template: dict) -> dict:
    """The dashboard's JSON with `${...}` substituted (resources by name, parameters by default)."""
    [dash] = [r for r in template["Resources"].values() if r["Type"] == "AWS::CloudWatch::Dashboard"]
    text = dash["Properties"]["DashboardBody"]["Fn::Sub"]
    values = {name: str(p.get("Default", "")) for name, p in template["Parameters"].items()}
    values.update({k: str(v) for k, v in cfn.PSEUDO.items()})

    def one(m: re.Match) -> str:
        name = m.group(1)
        assert name in values or name in template["Resources"], f"unknown substitution ${{{name}}}"
        return values.get(name, f"<{name}>")

    return json.loads(re.sub(r"\$\{([A-Za-z0-9:.]+)\}", one, text))


def all_queries(template: dict) -> dict[str, str]:
    queries = {name: r["Properties"]["QueryString"] for name, r in template["Resources"].items()
               if r["Type"] == "AWS::Logs::QueryDefinition"}
    for i, widget in enumerate(dashboard_body(template)["widgets"]):
        if widget["type"] == "log":
            queries[f"dashboard log widget {i}"] = widget["properties"]["query"]
    return queries


def dumps(node) -> str:
    return json.dumps(node, sort_keys=True)
