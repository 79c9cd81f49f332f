"""Helpers for the metrics end-to-end tests (tests/e2e/test_metrics*.py).

The real function binary runs against tools/lambda_emulator.py (Lambda's Runtime API + Extensions
API, shared with bench/), so the test sees what Lambda sees: when the response was posted, and when
the internal extension called `/next` again (the moment Lambda may freeze the environment).
CloudWatch is tools/cw_cbor_front.py in front of an in-process moto; boto3 reads moto back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
from lambda_emulator import Invocation, ThreadedEmulator, now_ms  # tools/, put on sys.path by conftest.py
from local_stack import http_json, stop_process


REPO = Path(__file__).resolve().parents[2]
FUNCTION_NAME = "openai-lambda-proxy-test"
TOKEN = "demo-token"
REGION = "us-east-1"
COUNT_METRICS = [
    "Requests",
    "Upstream5xx",
    "Upstream429",
    "UpstreamTimeouts",
    "UpstreamConnectionErrors",
    "Retries",
    "UpstreamFailures",
    "Fallbacks",
    "CircuitOpen",
    "AttemptsSkipped",
    "StreamsInterrupted",
    "ColdStart",
]
# Every metric a buffered invocation that called the upstream publishes (`TimeToFirstByte`
# only comes with a real stream, INVOKE_MODE=RESPONSE_STREAM), in the order the code emits them.
ALL_METRICS = COUNT_METRICS[:-1] + ["UpstreamLatency", "ColdStart"]
STREAM_METRICS = ["TimeToFirstByte"]


def binary(name: str) -> Path:
    """A built binary: `$PROXY_TEST_BIN_DIR`, else `$CARGO_TARGET_DIR|target` / release."""
    explicit = os.environ.get("PROXY_TEST_BIN_DIR")
    if explicit:
        path = Path(explicit) / name
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        path = target / os.environ.get("PROXY_TEST_PROFILE", "release") / name
    if not path.exists():
        raise RuntimeError(
            f"{path} is missing: run `make build` (or `cargo build --release --bin {name}`)"
        )
    return path


def python() -> Path:
    venv = Path(os.environ.get("PROXY_TEST_VENV") or REPO / ".venv")
    py = venv / "bin" / "python"
    if not py.exists():
        raise RuntimeError(f"{py} is missing: run `make venv`")
    return py


class Process:
    """A child process whose stdout lines are collected (and awaited) by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, name: str = ""):
        self.name = name or Path(args[0]).name
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self.readers:
            t.start()

    def _read(self, stream, sink):
        for line in stream:
            with self.cond:
                sink.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 20) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.stderr[-20:]}")
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r}; stderr: {self.stderr[-20:]}")
                self.cond.wait(left)

    def wait_json(self, predicate, n: int, timeout: float = 10) -> list[dict]:
        """Until at least `n` JSON lines match (stdout is read by another thread)."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [line for line in self.json_lines() if predicate(line)]
                left = end - time.monotonic()
                if len(found) >= n or left <= 0 or self.proc.poll() is not None:
                    return found
                self.cond.wait(left)

    def json_lines(self) -> list[dict]:
        out = []
        with self.cond:
            lines = list(self.lines)
        for line in lines:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict):
                out.append(v)
        return out

    def stop(self):
        stop_process(self.proc)
        for t in self.readers:  # every line the process wrote is collected once they hit EOF
            t.join(5)


class Simulator:
    def __init__(self):
        self.p = Process([str(binary("openai-simulator")), "--port", "0", "--quiet"], name="simulator")
        try:
            m = self.p.wait_line(r"listening on (http://\S+)/v1")
        except BaseException:
            self.p.stop()
            raise
        self.url = m.group(1)

    def script(self, script: str):
        http_json("PUT", f"{self.url}/_sim/script", script.encode())

    def stop(self):
        self.p.stop()


class CloudWatchFront:
    """tools/cw_cbor_front.py with moto in process; `cw` is an independent boto3 client on moto."""

    def __init__(self, *extra: str):
        self.p = Process([str(python()), str(REPO / "tools" / "cw_cbor_front.py"), "--moto", *extra],
                         name="cw_cbor_front")
        try:
            ready = json.loads(self.p.wait_line(r"^\{.*\"port\".*\}$").string)
        except BaseException:
            self.p.stop()
            raise
        self.port = ready["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.moto_url = ready["moto_url"]
        self.cw = boto3.client("cloudwatch", endpoint_url=self.moto_url, region_name=REGION,
                               aws_access_key_id="testing", aws_secret_access_key="testing")

    def configure(self, delay_ms: int = 0, fail: str = "none"):
        http_json("PUT", f"{self.url}/_front/config", {"delay_ms": delay_ms, "fail": fail})

    def requests(self, namespace: str | None = None) -> list[dict]:
        reqs = http_json("GET", f"{self.url}/_front/requests")
        return [r for r in reqs if namespace is None or r.get("namespace") == namespace]

    def wait_requests(self, namespace: str, n: int, timeout: float = 10) -> list[dict]:
        """Polls the front's log (an HTTP server in another process: there is no event to await)."""
        end = time.monotonic() + timeout
        while True:
            reqs = [r for r in self.requests(namespace) if "answered_at_ms" in r]
            if len(reqs) >= n or time.monotonic() > end:
                return reqs
            time.sleep(0.05)

    def stop(self):
        self.p.stop()


def chat_event() -> dict:
    event = json.loads((REPO / "events" / "apigw-v2-chat-completion.json").read_text())
    event.setdefault("headers", {})["authorization"] = f"Bearer {TOKEN}"
    # A fresh gateway start time: sample events carry an old one.
    event.get("requestContext", {})["timeEpoch"] = int(now_ms())
    return event


def function_env(sim_url: str, runtime_api: str, namespace: str, backend: str,
                 endpoint_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENAI_", "METRICS_"))}
    env.update({
        "AWS_LAMBDA_RUNTIME_API": runtime_api,
        "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAME,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint_url,
        "OPENAI_BASE_URL": f"{sim_url}/v1",
        "OPENAI_API_KEY": "sk-sim-not-a-real-key",
        "PROXY_API_KEYS": TOKEN,
        "RETRY_BASE_DELAY_MS": "50",
        "RETRY_MAX_DELAY_MS": "200",
        "METRICS_BACKEND": backend,
        "METRICS_NAMESPACE": namespace,
        "RUST_LOG": "info",
    })
    return env


class Function:
    """The real function binary on a fresh emulated execution environment."""

    def __init__(self, sim: Simulator, namespace: str, backend: str = "cloudwatch",
                 endpoint_url: str = "http://127.0.0.1:9", miss_first_invoke: bool = False,
                 extra_env: dict[str, str] | None = None):
        self.emulator = ThreadedEmulator(FUNCTION_NAME, miss_first_invoke=miss_first_invoke)
        env = function_env(sim.url, self.emulator.address, namespace, backend, endpoint_url)
        env.update(extra_env or {})
        self.p = Process([str(binary("openai-lambda-proxy"))], env=env, name="function")
        if backend == "cloudwatch":
            try:
                self.emulator.wait_registered()
            except BaseException:
                self.stop()
                raise

    def invoke(self, event: dict | None = None) -> Invocation:
        return self.emulator.invoke(event or chat_event())

    def logs(self) -> list[dict]:
        return self.p.json_lines()

    def all_logs(self) -> list[dict]:
        """Stops the function first, so that every line it wrote has been read."""
        self.p.stop()
        return self.p.json_lines()

    def latencies(self, inv: "Invocation", attempts: int) -> list[float]:
        """The `latency_ms` of each `upstream attempt` log line of `inv` (awaits `attempts` of them)."""
        lines = self.p.wait_json(lambda l: l.get("message") == "upstream attempt"
                                 and l.get("lambda_request_id") == inv.request_id, attempts)
        return [float(line["latency_ms"]) for line in lines]

    def stop(self):
        self.p.stop()
        self.emulator.stop()


def attempt_latencies(logs: list[dict], request_id: str) -> list[float]:
    return [float(line["latency_ms"]) for line in logs
            if line.get("message") == "upstream attempt" and line.get("lambda_request_id") == request_id]


def moto_metrics(front: CloudWatchFront, namespace: str) -> dict[str, dict]:
    """Per metric name: dimensions, unit and SampleCount/Sum/Min/Max over the last hour (boto3)."""
    out = {}
    listed = front.cw.list_metrics(Namespace=namespace)["Metrics"]
    end = time.time() + 300
    for name in sorted({m["MetricName"] for m in listed}):
        dims = [m["Dimensions"] for m in listed if m["MetricName"] == name]
        stats = front.cw.get_metric_statistics(
            Namespace=namespace, MetricName=name,
            Dimensions=[{"Name": "FunctionName", "Value": FUNCTION_NAME}],
            StartTime=end - 3900, EndTime=end, Period=3600,
            Statistics=["SampleCount", "Sum", "Minimum", "Maximum"],
        )["Datapoints"]
        agg = {"dimensions": dims, "units": sorted({d["Unit"] for d in stats}),
               "SampleCount": sum(d["SampleCount"] for d in stats),
               "Sum": sum(d["Sum"] for d in stats),
               "Minimum": min((d["Minimum"] for d in stats), default=None),
               "Maximum": max((d["Maximum"] for d in stats), default=None)}
        out[name] = agg
    return out


# EMF, per AWS's "Specification: Embedded metric format" (root `_aws` metadata, metric
# directives, dimension sets, metric definitions). Member references (every dimension and metric
# named in a directive is a top-level member holding a string / number or number array) are
# checked by `check_emf_references`, which JSON Schema cannot express.
STANDARD_UNITS = [
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second", "Gigabits/Second",
    "Terabits/Second", "Count/Second", "None",
]
EMF_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["_aws"],
    "properties": {
        "_aws": {
            "type": "object",
            "required": ["Timestamp", "CloudWatchMetrics"],
            "properties": {
                "Timestamp": {"type": "integer", "minimum": 0},
                "CloudWatchMetrics": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["Namespace", "Dimensions", "Metrics"],
                        "properties": {
                            "Namespace": {"type": "string", "minLength": 1, "maxLength": 1024},
                            "Dimensions": {
                                "type": "array",
                                "items": {
                                    "type": "array",
                                    "maxItems": 30,
                                    "items": {"type": "string", "minLength": 1, "maxLength": 250},
                                },
                            },
                            "Metrics": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {
                                    "type": "object",
                                    "required": ["Name"],
                                    "properties": {
                                        "Name": {"type": "string", "minLength": 1, "maxLength": 1024},
                                        "Unit": {"type": "string", "enum": STANDARD_UNITS},
                                        "StorageResolution": {"type": "integer", "enum": [1, 60]},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def check_emf_references(doc: dict) -> None:
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        for dimension_set in directive["Dimensions"]:
            for name in dimension_set:
                value = doc.get(name)
                assert isinstance(value, str) and 1 <= len(value) <= 1024, f"dimension {name}: {value!r}"
        for metric in directive["Metrics"]:
            value = doc.get(metric["Name"])
            if isinstance(value, list):
                assert 1 <= len(value) <= 100, f"{metric['Name']}: {len(value)} values"
                assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            else:
                assert isinstance(value, (int, float)) and not isinstance(value, bool), \
                    f"metric {metric['Name']} has no numeric member: {value!r}"


def unique_namespace(label: str) -> str:
    return f"ProxyTest/{label}/{uuid.uuid4().hex[:8]}"

