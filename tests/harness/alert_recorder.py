"""The alert loop's witness, run inside the systemd namespace (its loopback is private):

* a webhook receiver for Alertmanager on a free loopback port, which it writes to `port` in
  its output dir before it serves: each notification is one line of `notifications.jsonl`
  (received wall time, the body Alertmanager sent);
* a poller of Prometheus's /api/v1/alerts every POLL seconds: each change of the set of active
  alerts (name, state pending/firing, labels, annotations) is one line of `alerts.jsonl`.

`python -m tests.harness.alert_recorder OUT_DIR PROMETHEUS_URL`; stopped with SIGTERM/SIGKILL.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

POLL = 0.2  # seconds; Prometheus evaluates every second


def _append(path: Path, doc: dict[str, Any], lock: threading.Lock) -> None:
    line = json.dumps(doc, sort_keys=True) + "\n"
    with lock, path.open("a", encoding="utf-8") as out:
        out.write(line)


def serve_webhook(out: Path, lock: threading.Lock) -> ThreadingHTTPServer:
    notifications = out / "notifications.jsonl"

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(size) or b"{}")
            _append(notifications, {"t": time.time(), "body": body}, lock)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    (out / "port").write_text(str(server.server_address[1]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def active_alerts(prometheus: str) -> list[dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"{prometheus}/api/v1/alerts", timeout=2) as resp:
            doc = json.load(resp)
    except (OSError, ValueError):
        return None  # not up yet, or restarting: no word
    alerts = [
        {
            "name": a["labels"].get("alertname", ""),
            "state": a["state"],
            "labels": a["labels"],
            "annotations": a.get("annotations", {}),
        }
        for a in doc.get("data", {}).get("alerts", [])
    ]
    return sorted(alerts, key=lambda a: (a["name"], json.dumps(a["labels"], sort_keys=True)))


def main(argv: list[str]) -> int:
    out, prometheus = Path(argv[0]), argv[1]
    out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    serve_webhook(out, lock)
    log = out / "alerts.jsonl"
    last: list[dict[str, Any]] | None = None
    while True:
        now = active_alerts(prometheus)
        if now is not None and now != last:
            _append(log, {"t": time.time(), "alerts": now}, lock)
            last = now
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
