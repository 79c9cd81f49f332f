"""A Lambda execution environment's Runtime API (2018-06-01) and Extensions API (2020-01-01),
shared by the benchmarks (bench/bench.py drives `RuntimeEmulator` from its asyncio loop) and the
end-to-end tests (tests/e2e/metrics_support.py uses the blocking `ThreadedEmulator`).

As in Lambda: an event goes to the runtime's waiting `GET …/invocation/next`; an INVOKE goes to
every extension that registered for it; the environment is free again (the next invocation may
start, Lambda may freeze it) once every such extension has called `GET …/event/next` again.
Implemented: `…/invocation/next`, `POST …/{id}/response|error` (Content-Length or chunked),
a streamed `…/response` (`Lambda-Runtime-Function-Response-Mode: streaming`: read chunk by chunk
as it arrives, the HTTP integration prelude and its 8 NULs split off, error trailers kept),
`POST …/init/error`, `POST /2020-01-01/extension/register`, `GET …/extension/event/next`
(INVOKE / SHUTDOWN), extension `init/error` / `exit/error`, Telemetry / Logs API subscriptions.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

ACCOUNT = "123456789012"
TRACE = "Root=1-00000000-000000000000000000000000"


def now_ns():
    return time.perf_counter_ns()


def epoch_ms():
    return int(time.time() * 1000)


def now_ms() -> float:
    """Wall-clock ms, comparable with other processes' `time.time()` (the CloudWatch front's)."""
    return time.time() * 1000


# ------------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 message reading (both directions)


async def read_head(reader):
    """The start line and the (lower-cased) headers of one HTTP/1.1 message."""
    line = await reader.readline()
    if not line:
        raise EOFError
    start = line.decode("latin-1").rstrip("\r\n")
    headers = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return start, headers


async def iter_body(reader, headers, trailers=None):
    """A message body as it arrives: Content-Length (one piece) or each chunk of a chunked body.
    The trailer fields of a chunked body go into `trailers` (a dict, lower-cased names)."""
    if "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (t := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = t.decode("latin-1").partition(":")
                    if trailers is not None:
                        trailers[k.strip().lower()] = v.strip()
                break
            yield await reader.readexactly(size)
            await reader.readexactly(2)


async def read_message(reader):
    start, headers = await read_head(reader)
    body = b"".join([part async for part in iter_body(reader, headers)])
    return start, headers, body


def http_response(status, reason, body=b"", headers=()):
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# ------------------------------------------------------------------------------------------------
# The emulator (asyncio)


class Invocation:
    """One event: its timings (perf-counter ns for the bench, wall-clock ms for the tests) and,
    once answered, `result` = ("response" | "error", body) (also the `done` future's value)."""

    def __init__(self, event: bytes, deadline_ms: int):
        self.request_id = str(uuid.uuid4())
        self.event = event
        self.deadline_ms = deadline_ms
        self.t_queued = now_ns()
        self.sent_at_ms = now_ms()
        self.t_delivered = None  # event written to the runtime's pending /next
        self.t_answered = None  # /response (or /error) fully read
        self.response_at_ms = None
        self.result = None
        self.done = asyncio.get_running_loop().create_future()  # ("response"|"error", bytes)
        self.extensions_out = set()  # ids of the extensions it was sent to, not back on /next yet
        self.extension_got_at_ms = None  # the first extension took the INVOKE
        self.extension_done_at_ms = None  # the last one called /next again
        self.complete = asyncio.Event()  # answered and every extension back
        # A streamed response: the prelude (HTTP integration), the body's chunks as they came
        # (perf-counter ns, bytes; the bytes only if the emulator keeps them), error trailers.
        self.streamed = False
        self.prelude = None
        self.t_head = None  # the head of the streamed `…/response` request read
        self.t_prelude = None  # the prelude complete
        self.t_first_byte = None  # the first body byte after the prelude's 8 NULs
        self.first_byte = asyncio.Event()
        self.chunks = []
        self.body_bytes = 0
        self.trailers = {}

    def round_trip_ns(self):
        return self.t_answered - self.t_delivered

    def first_byte_ns(self):
        """Event delivered to the runtime → first body byte of a streamed response."""
        return self.t_first_byte - self.t_delivered

    @property
    def response(self):
        """The function's answer, decoded (None if it reported an error or has not answered).
        A streamed HTTP-integration answer reads as a buffered one: its prelude and the body."""
        if self.result and self.result[0] == "response":
            if self.streamed and self.prelude is not None:
                body = self.result[1].decode("utf-8", "replace")
                return {**self.prelude, "body": body, "isBase64Encoded": False}
            return json.loads(self.result[1])
        return None

    @property
    def error(self):
        if self.result and self.result[0] == "error":
            return json.loads(self.result[1] or b"{}")
        return None

    def _answered(self, kind, body, t):
        self.t_answered = t
        self.response_at_ms = now_ms()
        self.result = (kind, body)
        self.done.set_result(self.result)
        self._check_complete()

    def _extension_back(self, ext_id):
        self.extensions_out.discard(ext_id)
        if not self.extensions_out:
            self.extension_done_at_ms = now_ms()
            self._check_complete()

    def _check_complete(self):
        if self.result is not None and not self.extensions_out:
            self.complete.set()


class Extension:
    def __init__(self, name, events):
        self.id = str(uuid.uuid4())
        self.name = name
        self.events = events
        self.queue = asyncio.Queue()  # (event dict, Invocation | None), or None to hang up
        self.idle = asyncio.Event()  # an /event/next call is outstanding
        self.busy = None  # the Invocation whose INVOKE it took last


class RuntimeEmulator:
    """One execution environment's Runtime API and Extensions API, on 127.0.0.1:`port`.
    `miss_first_invoke=True` reproduces `cargo lambda watch`, whose first INVOKE never reaches
    the extensions."""

    def __init__(self, function_name="openai-lambda-proxy-bench", miss_first_invoke=False, keep_stream=True):
        self.function_name = function_name
        # Keep a streamed body's bytes (tests), or only count them (a 50 MB benchmark stream).
        self.keep_stream = keep_stream
        self.arn = f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:{function_name}"
        self.miss_first_invoke = miss_first_invoke
        self.count = 0
        self.pending = asyncio.Queue()
        self.inflight = {}
        self.extensions = {}
        self.registered = asyncio.Event()
        self.first_next_ns = None
        self.first_next = asyncio.Event()
        self.init_errors = []
        self.tasks = set()  # the writers of open connections
        self.closing = False
        self.server = None
        self.port = None

    async def start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self):
        """Wake every parked long poll with None and drop every connection; no task is cancelled."""
        self.closing = True
        if self.server:
            self.server.close()
        for _ in range(len(self.tasks) + 1):
            self.pending.put_nowait(None)
        for e in self.extensions.values():
            e.queue.put_nowait(None)
        for w in list(self.tasks):
            w.transport.abort()
        for _ in range(50):
            if not self.tasks:
                break
            await asyncio.sleep(0.01)

    async def _conn(self, reader, writer):
        self.tasks.add(writer)
        try:
            while not self.closing:
                start, headers = await read_head(reader)
                method, path = start.split(" ")[:2]
                if headers.get("lambda-runtime-function-response-mode", "").lower() == "streaming":
                    await self._streamed_response(path, headers, reader, writer)
                    continue
                body = b"".join([part async for part in iter_body(reader, headers)])
                t = now_ns()
                await self._route(method, path, headers, body, writer, t)
        except (EOFError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.tasks.discard(writer)
            writer.close()

    async def _route(self, method, path, headers, body, writer, t):
        p = path.split("?")[0]
        if method == "GET" and p == "/2018-06-01/runtime/invocation/next":
            await self._runtime_next(writer, t)
            return
        if method == "GET" and p == "/2020-01-01/extension/event/next":
            await self._extension_next(headers, writer)
            return
        if method == "POST" and p.startswith("/2018-06-01/runtime/invocation/"):
            parts = p.split("/")  # ['', '2018-06-01', 'runtime', 'invocation', id, kind]
            inv = self.inflight.pop(parts[4], None)
            if inv is not None and not inv.done.done():
                inv._answered(parts[5], body, t)
            msg = http_response(202, "Accepted", b'{"status":"OK"}', [("Content-Type", "application/json")])
        elif method == "POST" and p == "/2020-01-01/extension/register":
            msg = self._register(headers, body)
        elif method == "POST" and p in ("/2018-06-01/runtime/init/error", "/2020-01-01/extension/init/error"):
            self.init_errors.append(body.decode(errors="replace"))
            msg = http_response(202, "Accepted", b'{"status":"OK"}')
        elif method == "POST" and p.startswith("/2020-01-01/extension/"):  # exit/error
            msg = http_response(202, "Accepted", b'{"status":"OK"}')
        elif method == "PUT" and p in ("/2022-07-01/telemetry", "/2020-08-15/logs"):
            msg = http_response(200, "OK", b"OK")
        else:
            msg = http_response(404, "Not Found", b'{"errorMessage":"not found"}')
        writer.write(msg)
        await writer.drain()

    async def _streamed_response(self, path, headers, reader, writer):
        """`POST …/{id}/response` in streaming mode, read chunk by chunk as the function sends it.
        An HTTP integration response starts with a JSON prelude and 8 NUL bytes; the body after
        them is what the caller sees. Answered 202 once the body has ended, as Lambda does."""
        inv = self.inflight.pop(path.split("?")[0].split("/")[4], None)
        if inv is None or inv.done.done():
            async for _ in iter_body(reader, headers):  # an unknown or answered id: dropped
                pass
        else:
            inv.streamed = True
            inv.t_head = now_ns()
            integration = "http-integration-response" in headers.get("content-type", "")
            await self._read_stream(inv, iter_body(reader, headers, inv.trailers), integration)
        writer.write(http_response(202, "Accepted", b'{"status":"OK"}', [("Content-Type", "application/json")]))
        await writer.drain()

    async def _read_stream(self, inv, parts, integration):
        head = b""
        async for part in parts:
            t = now_ns()
            if integration and inv.prelude is None:
                head += part
                if (at := head.find(b"\0" * 8)) < 0:
                    continue
                inv.prelude = json.loads(head[:at])
                inv.t_prelude = t
                part = head[at + 8:]
            if not part:
                continue
            if inv.t_first_byte is None:
                inv.t_first_byte = t
                inv.first_byte.set()
            inv.body_bytes += len(part)
            inv.chunks.append((t, part if self.keep_stream else b""))
        inv._answered("response", b"".join(c for _, c in inv.chunks), now_ns())

    async def _runtime_next(self, writer, t):
        if self.first_next_ns is None:
            self.first_next_ns = t
            self.first_next.set()
        inv = await self.pending.get()
        if inv is None:
            raise EOFError
        self.inflight[inv.request_id] = inv
        msg = http_response(200, "OK", inv.event, [
            ("Content-Type", "application/json"),
            ("Lambda-Runtime-Aws-Request-Id", inv.request_id),
            ("Lambda-Runtime-Deadline-Ms", str(inv.deadline_ms)),
            ("Lambda-Runtime-Invoked-Function-Arn", self.arn),
            ("Lambda-Runtime-Trace-Id", f"{TRACE};Parent=0000000000000000;Sampled=0"),
        ])
        inv.t_delivered = now_ns()
        writer.write(msg)
        await writer.drain()

    def _register(self, headers, body):
        try:
            events = json.loads(body or b"{}").get("events", [])
        except ValueError:
            events = []
        ext = Extension(headers.get("lambda-extension-name", "?"), events)
        self.extensions[ext.id] = ext
        self.registered.set()
        out = json.dumps({"functionName": self.function_name, "functionVersion": "$LATEST",
                          "handler": "bootstrap", "accountId": ACCOUNT}).encode()
        return http_response(200, "OK", out, [("Content-Type", "application/json"),
                                              ("Lambda-Extension-Identifier", ext.id)])

    async def _extension_next(self, headers, writer):
        ext = self.extensions.get(headers.get("lambda-extension-identifier", ""))
        if ext is None:
            writer.write(http_response(403, "Forbidden", b'{"errorMessage":"unknown extension","errorType":"Extension.Unknown"}'))
            await writer.drain()
            return
        ext.idle.set()
        if ext.busy is not None:
            ext.busy._extension_back(ext.id)
            ext.busy = None
        item = await ext.queue.get()
        if item is None:
            raise EOFError
        ev, inv = item
        ext.idle.clear()
        if inv is not None:
            ext.busy = inv
            if inv.extension_got_at_ms is None:
                inv.extension_got_at_ms = now_ms()
        writer.write(http_response(200, "OK", json.dumps(ev).encode(), [
            ("Content-Type", "application/json"),
            ("Lambda-Extension-Event-Identifier", str(uuid.uuid4()))]))
        await writer.drain()

    def _subscribed(self, kind):
        return [e for e in self.extensions.values() if kind in e.events]

    async def extensions_idle(self, timeout=5.0):
        """Like Lambda: the environment is free once every INVOKE extension called event/next."""
        exts = self._subscribed("INVOKE")
        if exts:
            await asyncio.wait_for(asyncio.gather(*(e.idle.wait() for e in exts)), timeout)

    async def invoke(self, event: bytes, deadline_ms: int) -> Invocation:
        await self.extensions_idle()
        inv = Invocation(event, deadline_ms)
        self.count += 1
        if not (self.miss_first_invoke and self.count == 1):
            for e in self._subscribed("INVOKE"):
                e.idle.clear()
                inv.extensions_out.add(e.id)
                e.queue.put_nowait(({"eventType": "INVOKE", "deadlineMs": deadline_ms,
                                     "requestId": inv.request_id, "invokedFunctionArn": self.arn,
                                     "tracing": {"type": "X-Amzn-Trace-Id", "value": TRACE}}, inv))
        self.pending.put_nowait(inv)
        return inv

    def shutdown_extensions(self):
        for e in self._subscribed("SHUTDOWN"):
            e.queue.put_nowait(({"eventType": "SHUTDOWN", "shutdownReason": "spindown",
                                 "deadlineMs": epoch_ms() + 2000}, None))


# ------------------------------------------------------------------------------------------------
# The same, for blocking callers (pytest)


class ThreadedEmulator:
    """`RuntimeEmulator` on its own event loop thread, with blocking calls. Like Lambda, the next
    event is handed out only once the previous invocation is complete: its response posted and
    every extension that got its INVOKE back on `/next`."""

    def __init__(self, function_name: str, miss_first_invoke: bool = False):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.invocations: list[Invocation] = []

        async def start():
            emu = RuntimeEmulator(function_name, miss_first_invoke)
            await emu.start()
            return emu

        self.emu = self._run(start())
        self.address = f"127.0.0.1:{self.emu.port}"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _within(self, awaitable, timeout: float, message: str):
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise TimeoutError(message) from None

    @property
    def extensions(self) -> list[dict]:
        return [{"name": e.name, "events": e.events} for e in list(self.emu.extensions.values())]

    @property
    def init_errors(self) -> list[str]:
        return list(self.emu.init_errors)

    def wait_registered(self, timeout: float = 15) -> None:
        self._run(self._within(self.emu.registered.wait(), timeout, "no extension registered"))

    def wait_complete(self, inv: Invocation, timeout: float = 15) -> None:
        """Until Lambda could freeze: response posted and the extension back on `/next`."""
        self._run(self._within(inv.complete.wait(), timeout,
                               f"invocation {inv.request_id} never completed"))

    def invoke(self, event: dict, timeout: float = 30) -> Invocation:
        """Sends one event (after the previous invocation completed) and waits for its response."""
        async def go():
            for prev in self.invocations:
                await self._within(prev.complete.wait(), timeout,
                                   f"previous invocation {prev.request_id} never completed")
            inv = await self.emu.invoke(json.dumps(event).encode(), epoch_ms() + 30_000)
            self.invocations.append(inv)
            await self._within(asyncio.shield(inv.done), timeout, f"no response for {inv.request_id}")
            return inv

        return self._run(go())

    def stop(self):
        self._run(self.emu.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
