"""The CloudWatch endpoint for `METRICS_BACKEND=cloudwatch`: tools/cw_cbor_front.py (the
rpc-v2-cbor front) with moto in its process. The function reaches it through `AWS_ENDPOINT_URL`.
"""

import json
import subprocess
import sys
import urllib.request

from local_stack import stop_process  # tools/, put on sys.path by bench.py


class CloudWatch:
    def __init__(self, root, logs):
        front = root / "tools" / "cw_cbor_front.py"
        self.proc = subprocess.Popen([sys.executable, str(front), "--moto", "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=open(logs / "cw_cbor_front.log", "w"),
                                     stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        try:
            self.port = json.loads(line)["port"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise RuntimeError(f"tools/cw_cbor_front.py did not announce its port: {line!r}") from None
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "METRICS_NAMESPACE": "OpenAIProxyBench"}

    def calls(self):
        with urllib.request.urlopen(self.url + "/_front/requests", timeout=10) as r:
            return json.loads(r.read())

    def datapoints(self):
        """PutMetricData calls the front answered with 200."""
        return sum(1 for c in self.calls()
                   if "PutMetricData" in json.dumps(c) and c.get("status") in (200, None))

    def stop(self):
        stop_process(self.proc)


def start_cloudwatch(root, logs):
    if not (root / "tools" / "cw_cbor_front.py").exists():
        return None
    return CloudWatch(root, logs)
