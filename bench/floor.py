"""The floor under a Python healthy cycle: one GET /health a second, by ever thinner clients.

Each variant runs as a unit of its own in the overhead bench's polling window (bench/overhead.py),
beside hydra-watchdog and monit, so its cgroup's CPU per cycle is measured the same way:

- asleep: the interpreter waking once a second and doing nothing (the floor of any Python loop);
- raw: the request written by hand on a kept socket, the answer cut by its Content-Length, the
  body parsed as JSON (no HTTP parser at all: what no client facing a squatter should be);
- h11: the same exchange through h11, the parser httpcore uses;
- httpcore: httpcore's connection pool, the layer `exchange` sends to;
- exchange: hydra-watchdog's own /health probe (TabbyClient.health over http_deadline.exchange,
  on a connection its gate vetted as the unit's TabbyAPI: the unit's status read once), what a
  cycle's /health costs in the daemon, less the thread hand-off.

    python bench/floor.py VARIANT PORT
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

VARIANTS = ("asleep", "raw", "h11", "httpcore", "exchange")
INTERVAL = 1.0


def _raw(port: int) -> Callable[[], bool]:
    request = (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\n\r\n" % port
    )
    kept: list[socket.socket] = []

    def probe() -> bool:
        if not kept:
            kept.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        sock = kept[0]
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += sock.recv(65536)
        return bool(json.loads(body)["status"] == "healthy")

    return probe


def _h11(port: int) -> Callable[[], bool]:
    import h11

    kept: list[tuple[socket.socket, h11.Connection]] = []
    headers = [("Host", f"127.0.0.1:{port}"), ("Accept-Encoding", "identity")]

    def probe() -> bool:
        if not kept:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            kept.append((sock, h11.Connection(h11.CLIENT)))
        sock, conn = kept[0]
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        sock.sendall(conn.send(h11.Request(method="GET", target="/health", headers=headers)) or b"")
        sock.sendall(conn.send(h11.EndOfMessage()) or b"")
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bool(json.loads(body)["status"] == "healthy")

    return probe


def _httpcore(port: int) -> Callable[[], bool]:
    import httpcore

    pool = httpcore.ConnectionPool()
    url = f"http://127.0.0.1:{port}/health"

    def probe() -> bool:
        answer = pool.request("GET", url, headers=[("Accept-Encoding", "identity")])
        return bool(json.loads(answer.content)["status"] == "healthy")

    return probe


TABBY_UNIT = "tabbyapi.service"  # bench/node.py's


def _exchange(port: int) -> Callable[[], bool]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hydra_watchdog.adapters.identity import ListenerGate
    from hydra_watchdog.adapters.systemd import SystemctlUnit
    from hydra_watchdog.adapters.tabby import TabbyClient

    # /health is believed only from the verified TabbyAPI: the gate judges its listener by the
    # unit's cgroup (read once: TabbyAPI is up for the whole window) when a connection is made.
    gate = ListenerGate("127.0.0.1", port, install_dirs=(), user="root")
    gate.set_unit(SystemctlUnit(TABBY_UNIT).status())
    client = TabbyClient(
        f"http://127.0.0.1:{port}", admin_key=None, health_timeout=2.0, gate=gate.check
    )
    return lambda: client.health().healthy


def main(argv: list[str]) -> int:
    variant, port = argv[0], int(argv[1])
    makers: dict[str, Callable[[int], Callable[[], bool]]] = {
        "raw": _raw,
        "h11": _h11,
        "httpcore": _httpcore,
        "exchange": _exchange,
    }
    probe = makers[variant](port) if variant != "asleep" else (lambda: True)
    while True:
        if not probe():
            print(f"{variant}: /health did not say healthy", file=sys.stderr, flush=True)
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
