"""Spec §12: every field the template's saved Logs Insights queries (and the dashboard's log
widget) read is one the real function logs. The release binary runs on the Runtime API emulator
through a success, a burst of 500s, an outage, an insufficient_quota 429 and a refused token;
the keys of its JSON log lines are collected and the queries' fields must be among them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "template"))
import cfn  # noqa: E402
from metrics_support import Function, chat_event, unique_namespace  # noqa: E402
from queries import all_queries, query_fields  # noqa: E402


@pytest.fixture(scope="module")
def logged_keys(sim) -> set[str]:
    fn = Function(sim, unique_namespace("ops"), backend="emf")
    try:
        for script in ("ok", "500,500,ok", "503,503,503,503,503,503", "429:quota"):
            sim.script(script)
            fn.emulator.wait_complete(fn.invoke())
        refused = chat_event()
        refused["headers"]["authorization"] = "Bearer wrong"
        fn.emulator.wait_complete(fn.invoke(refused))
        lines = fn.all_logs()
    finally:
        fn.stop()
    assert sum(line.get("message") == "request finished" for line in lines) == 5
    return {k for line in lines if "_aws" not in line for k in line}


def test_every_query_reads_only_fields_the_function_logs(logged_keys):
    queries = all_queries(cfn.load_template())
    assert len(queries) >= 6
    read = {name: query_fields(query) for name, query in queries.items()}
    # Only the cold-start query reads nothing of ours (Lambda's own REPORT records).
    assert sum(not fields for fields in read.values()) <= 1, read
    for name, fields in read.items():
        missing = fields - logged_keys
        assert not missing, f"{name} reads fields the function never logs: {sorted(missing)}"
