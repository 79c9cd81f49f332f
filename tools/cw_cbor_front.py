#!/usr/bin/env python3
"""A CloudWatch front that speaks the SDK's smithy rpc-v2-cbor and stores into moto.

aws-sdk-cloudwatch (>= 1.100) sends `POST /service/GraniteServiceVersion20100801/operation/<Op>`
with `Content-Type: application/cbor` and `smithy-protocol: rpc-v2-cbor` (gzip `Content-Encoding`
when the body is large). moto 5.2 only routes the query protocol. This front decodes the CBOR
request with cbor2, replays it into moto through boto3 (which validates the parameters against
the service model), and answers in rpc-v2-cbor: the operation's output as a CBOR map (an empty
map `\\xa0` for PutMetricData), or an error as a CBOR map with `__type` and `message`.

    python tools/cw_cbor_front.py [--port 0] [--moto | --moto-url URL] [--delay-ms N]
                                  [--fail none|500|reset|refuse]

With `--moto`, moto runs in this process (ThreadedMotoServer) so one process serves both. When
ready, prints one JSON line on stdout: `{"port": <front port>, "moto_url": "http://..."}`.

Failure modes: `500` answers every call with 500 InternalServiceFault, `reset` closes the
connection without answering, `refuse` closes the listening socket after taking its port (the
SDK sees "connection refused"). `--delay-ms` waits before handling each call (a slow endpoint).
The mode and delay can be changed at run time: `PUT /_front/config` with JSON
`{"delay_ms": 2000, "fail": "none"}`. `GET /_front/requests` lists the calls received (epoch-ms
receive/answer times, operation, protocol headers, namespace, status); `DELETE` clears it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import boto3
import botocore.exceptions
import cbor2
from botocore import xform_name
from local_stack import QuietServer  # tools/local_stack.py, beside this script


OPERATION_PREFIX = "/service/GraniteServiceVersion20100801/operation/"
ERROR_NAMESPACE = "com.amazonaws.cloudwatch#"


class State:
    def __init__(self, moto_url: str, region: str, delay_ms: int, fail: str):
        self.lock = threading.Lock()
        self.delay_ms = delay_ms
        self.fail = fail
        self.requests: list[dict] = []
        self.client = boto3.client(
            "cloudwatch",
            endpoint_url=moto_url,
            region_name=region,
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        )

    def config(self) -> tuple[int, str]:
        with self.lock:
            return self.delay_ms, self.fail


def cbor_response(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    # rpc-v2-cbor: timestamps are epoch seconds under tag 1.
    data = cbor2.dumps(body, datetime_as_timestamp=True, timezone=None)
    handler.answered_at_ms = time.time() * 1000  # before the first byte leaves
    handler.send_response(status)
    handler.send_header("Content-Type", "application/cbor")
    handler.send_header("smithy-protocol", "rpc-v2-cbor")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def cbor_error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> int:
    cbor_response(handler, status, {"__type": ERROR_NAMESPACE + code, "message": message})
    return status


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: tests read /_front/requests instead
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _json(self, status: int, value) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/_front/requests":
                with state.lock:
                    return self._json(200, state.requests)
            if self.path == "/_front/health":
                return self._json(200, {"ok": True})
            return self._json(404, {"error": "not found"})

        def do_DELETE(self):
            self._body()
            if self.path == "/_front/requests":
                with state.lock:
                    state.requests.clear()
                return self._json(200, {"ok": True})
            return self._json(404, {"error": "not found"})

        def do_PUT(self):
            body = self._body()
            if self.path != "/_front/config":
                return self._json(404, {"error": "not found"})
            cfg = json.loads(body or b"{}")
            with state.lock:
                state.delay_ms = int(cfg.get("delay_ms", state.delay_ms))
                state.fail = str(cfg.get("fail", state.fail))
                return self._json(200, {"delay_ms": state.delay_ms, "fail": state.fail})

        def do_POST(self):
            received = time.time() * 1000
            raw = self._body()
            record = {
                "received_at_ms": received,
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "smithy_protocol": self.headers.get("smithy-protocol"),
                "content_encoding": self.headers.get("Content-Encoding"),
                "authorization": (self.headers.get("Authorization") or "").split(" ")[0],
            }
            self.answered_at_ms = None
            delay_ms, fail = state.config()
            if delay_ms:
                time.sleep(delay_ms / 1000)
            try:
                record["status"] = self._serve(raw, record, fail)
            finally:
                record["answered_at_ms"] = self.answered_at_ms or time.time() * 1000
                with state.lock:
                    state.requests.append(record)

        def _serve(self, raw: bytes, record: dict, fail: str) -> int:
            if fail == "reset":
                # RST without a byte of answer.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return 0
            if not self.path.startswith(OPERATION_PREFIX):
                return cbor_error(self, 404, "UnknownOperationException", f"no route {self.path}")
            if record["smithy_protocol"] != "rpc-v2-cbor":
                return cbor_error(self, 400, "ValidationError", "missing smithy-protocol: rpc-v2-cbor")
            operation = self.path[len(OPERATION_PREFIX):]
            record["operation"] = operation
            try:
                if (record["content_encoding"] or "").lower() == "gzip":
                    raw = gzip.decompress(raw)
                params = cbor2.loads(raw) if raw else {}
            except Exception as e:  # noqa: BLE001 - any decoding problem is the caller's
                return cbor_error(self, 400, "SerializationException", f"bad CBOR body: {e}")
            if not isinstance(params, dict):
                return cbor_error(self, 400, "SerializationException", "body is not a CBOR map")
            record["namespace"] = params.get("Namespace")
            record["metric_names"] = [d.get("MetricName") for d in params.get("MetricData", [])]
            if fail == "500":
                return cbor_error(self, 500, "InternalServiceFault", "injected failure (cw_cbor_front --fail 500)")
            method = getattr(state.client, xform_name(operation), None)
            if method is None:
                return cbor_error(self, 400, "UnknownOperationException", f"unknown operation {operation}")
            try:
                out = method(**params)
            except botocore.exceptions.ParamValidationError as e:
                return cbor_error(self, 400, "InvalidParameterValue", str(e))
            except botocore.exceptions.ClientError as e:
                err = e.response.get("Error", {})
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400)
                return cbor_error(self, status, err.get("Code", "ClientError"), err.get("Message", ""))
            out.pop("ResponseMetadata", None)
            cbor_response(self, 200, out)
            return 200

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--moto", action="store_true", help="run moto in this process")
    ap.add_argument("--moto-url", help="an already running moto server")
    ap.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--fail", choices=["none", "500", "reset", "refuse"], default="none")
    args = ap.parse_args()

    moto = None
    if args.moto_url:
        moto_url = args.moto_url.rstrip("/")
    elif args.moto:
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        moto_url = f"http://{host}:{port}"
    else:
        ap.error("give --moto or --moto-url")

    state = State(moto_url, args.region, args.delay_ms, args.fail)
    server = QuietServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    port = server.server_address[1]
    if args.fail == "refuse":
        server.server_close()  # the port stays ours to name, but nothing listens on it
    print(json.dumps({"port": port, "moto_url": moto_url}), flush=True)
    try:
        if args.fail == "refuse":
            threading.Event().wait()
        else:
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if moto is not None:
            moto.stop()


if __name__ == "__main__":
    sys.exit(main())
