"""The function running locally the way users run it: the OpenAI simulator plus the release
binary under `cargo lambda watch`. Shared by `make demo` (tools/demo.py) and the end-to-end
tests (tests/e2e/). Everything started here is stopped by `stop()`.

Also the small helpers the other local tools share (free_port, stop_process, QuietServer,
http_json): the metrics tests, tools/cw_cbor_front.py and bench/ import them from here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FUNCTION = "openai-lambda-proxy"
PROXY_TOKEN = "demo-token"
SIM_KEY = "sk-sim-not-a-real-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 5, group: bool = False) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s. `group=True` signals its
    whole process group (for a process started with `start_new_session=True`)."""
    if proc is None or proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout)


class QuietServer(ThreadingHTTPServer):
    """Clients that vanish (a killed function, an SDK timing out) are not errors here."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def http_json(method: str, url: str, body=None, timeout: float = 10):
    """A control-API call (simulator, CloudWatch front): `body` is bytes as is, else sent as
    JSON; a JSON answer is decoded, anything else returned as bytes."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw


def cargo_lambda() -> str:
    """cargo-lambda from PATH, else from the project's .venv (`make venv`)."""
    return shutil.which("cargo-lambda") or str(REPO / ".venv" / "bin" / "cargo-lambda")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip()
    return env


class LocalStack:
    """Simulator + `cargo lambda watch --release` on free ports, logs captured to files."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, real_openai: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.real_openai = real_openai
        self.extra_env = env or {}
        self.sim: subprocess.Popen | None = None
        self.watch: subprocess.Popen | None = None
        self.sim_port = 0
        self.watch_port = 0
        self.watch_log = self.workdir / "function.log"
        self.sim_log = self.workdir / "simulator.log"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LocalStack":
        env = read_env_file(REPO / "local.env")
        if self.real_openai:
            # The real OpenAI: the user's key, the default base URL.
            env.pop("OPENAI_BASE_URL", None)
            env["OPENAI_API_KEY"] = os.environ["OPENAI_API_KEY"]
        else:
            self.sim_port = free_port()
            target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
            sim_bin = target / "release" / "openai-simulator"
            self.sim = subprocess.Popen(
                [str(sim_bin), "--port", str(self.sim_port)],
                stdout=subprocess.DEVNULL,
                stderr=open(self.sim_log, "w"),
                start_new_session=True,
            )
            wait_for_port(self.sim_port, 20, self.sim)
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{self.sim_port}/v1"
        env.update(self.extra_env)
        env_file = self.workdir / "function.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))

        self.watch_port = free_port()
        self.watch = subprocess.Popen(
            [cargo_lambda(), "lambda", "watch", "--release", "--ignore-changes", "--quiet",
             "--invoke-address", "127.0.0.1", "--invoke-port", str(self.watch_port),
             "--env-file", str(env_file)],
            cwd=REPO,
            stdout=open(self.watch_log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.watch_port, 120, self.watch)
        return self

    def stop(self) -> None:
        for proc in (self.watch, self.sim):
            stop_process(proc, timeout=10, group=True)
        self.watch = self.sim = None

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the simulator's control API ------------------------------------------------------
    def _sim(self, method: str, path: str, body: str | None = None):
        return http_json(method, f"http://127.0.0.1:{self.sim_port}{path}",
                         body.encode() if body is not None else None)

    def script(self, text: str, default: str = "ok") -> None:
        """Queue simulator steps (e.g. `500,500,ok`); `default` applies once the queue is empty."""
        if self.sim is None:
            return
        self._sim("PUT", "/_sim/default", default)
        self._sim("PUT", "/_sim/script", text)
        self._sim("DELETE", "/_sim/requests")

    def upstream_requests(self) -> list[dict]:
        return self._sim("GET", "/_sim/requests") if self.sim is not None else []

    # -- calling the function -------------------------------------------------------------
    def invoke(self, event: str | Path | dict, timeout: float = 600) -> dict:
        """`cargo lambda invoke --data-file`; returns the function's API Gateway response object."""
        if isinstance(event, dict):
            path = self.workdir / "event.json"
            path.write_text(json.dumps(event))
        else:
            path = Path(event)
            if not path.is_absolute():
                path = REPO / path
        out = subprocess.run(
            [cargo_lambda(), "lambda", "invoke", FUNCTION, "--data-file", str(path),
             "--invoke-address", "127.0.0.1", "--invoke-port", str(self.watch_port), "--color", "never"],
            cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"cargo lambda invoke failed ({out.returncode}): {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    def url(self, path: str) -> str:
        """The function URL emulation of `cargo lambda watch` for an API path like `/v1/models`."""
        return f"http://127.0.0.1:{self.watch_port}/lambda-url/{FUNCTION}{path}"

    def http(self, method: str, path: str, body: dict | None = None, token: str | None = PROXY_TOKEN,
             timeout: float = 600) -> tuple[int, dict, bytes]:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url(path), method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    # -- logs -----------------------------------------------------------------------------
    def log_lines(self) -> list[dict]:
        """Every JSON line the function wrote (watch's own lines are skipped)."""
        lines = []
        for raw in self.watch_log.read_text(errors="replace").splitlines():
            raw = raw.strip()
            start = raw.find("{")
            if start < 0:
                continue
            try:
                value = json.loads(raw[start:])
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                lines.append(value)
        return lines

    def logs_for(self, lambda_request_id: str, wait: float = 5.0) -> list[dict]:
        """The log lines of one invocation, waiting briefly for its `request finished` line."""
        end = time.monotonic() + wait
        while True:
            lines = [l for l in self.log_lines() if l.get("lambda_request_id") == lambda_request_id]
            if any(l.get("message") == "request finished" for l in lines) or time.monotonic() > end:
                return lines
            time.sleep(0.1)
