# ruff: noqa: F811  (fixtures imported from tests/harness and tests/test_daemon are arguments)
"""Issue 10: an unprivileged user floods the metrics exporter of the real daemon.

The daemon runs as in test_daemon.py (a subprocess with the real adapters and the stand-in unit)
with its file limit lowered to what a few hundred descriptors would exhaust. `nobody` opens 300
connections to the exporter and holds them, each with a request head that never ends. The daemon
must keep answering scrapes, hold a bounded number of descriptors and threads, and keep seeing
TabbyAPI as healthy: no false TabbyAPIDown, no restart.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import pytest

from hydra_watchdog.events import EventKind
from hydra_watchdog.report.exporter import MAX_CONNECTIONS
from hydra_watchdog.states import Phase
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import free_port, wait_for
from tests.test_daemon import WAIT, Daemons, Node, _metrics, daemons, node  # noqa: F401

pytestmark = pytest.mark.slow

SETPRIV = shutil.which("setpriv")
FLOOD = 300
NOFILE = 160  # the daemon's file limit for this test: well below what the flood would take
SLACK_FDS = 16  # probe connections, subprocess pipes, the state file being written
SLACK_TASKS = 16  # probe threads of a cycle in flight, a stuck probe, the stand-in unit

# The adversary: an unprivileged process that opens FLOOD connections and holds them idle (a head
# that never ends), says how many it got, then waits for stdin to close. (A server that stops
# accepting once out of descriptors leaves connects hanging: hence the adversary's own budget.)
_ADVERSARY = """
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held, failed = [], 0
give_up = time.monotonic() + 60  # an exporter that stopped accepting must not hang the test
for _ in range(count):
    if time.monotonic() > give_up:
        failed += 1
        continue
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n")
        held.append(sock)
    except OSError:
        failed += 1
print(len(held), failed, flush=True)
sys.stdin.read()
"""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _heartbeat(node: Node) -> float:
    beat = node.heartbeat()
    return 0.0 if beat is None else beat


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_an_idle_flood_by_nobody_neither_starves_the_daemon_nor_fakes_an_outage(
    node: Node, daemons: Daemons
) -> None:
    assert SETPRIV is not None
    metrics_port = free_port()
    node.write_config(metrics={"listen": f"127.0.0.1:{metrics_port}"})
    proc = daemons.start(node)
    wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the node to become healthy")
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    assert "hydra_watchdog_state" in _metrics(metrics_port)
    fds_before, tasks_before = _fds(proc.pid), _tasks(proc.pid)
    assert fds_before + MAX_CONNECTIONS + SLACK_FDS < NOFILE < FLOOD  # the flood would exhaust it
    actions_before = sum(k is EventKind.ACTION for k in node.kinds())

    adversary = subprocess.Popen(
        [
            SETPRIV,
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            _ADVERSARY,
            str(metrics_port),
            str(FLOOD),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    try:
        assert adversary.stdout is not None
        held, failed = (int(x) for x in adversary.stdout.readline().split())
        assert (held, failed) == (FLOOD, 0)
        # While nobody holds its 300 connections: scrapes are answered...
        for _ in range(3):
            assert "hydra_watchdog_state" in _metrics(metrics_port)
        # ...the daemon holds at most the exporter's cap more descriptors, no thread per
        # connection...
        fds, tasks = _fds(proc.pid), _tasks(proc.pid)
        assert fds <= fds_before + MAX_CONNECTIONS + SLACK_FDS, (fds_before, fds)
        assert tasks <= tasks_before + SLACK_TASKS, (tasks_before, tasks)
        # ...and every cycle meanwhile still sees TabbyAPI healthy.
        start = _heartbeat(node)
        phases: list[Phase | None] = []

        def five_more_cycles() -> bool:  # the interval is 200 ms
            phases.append(node.phase())
            return _heartbeat(node) >= start + 1.0

        wait_for(five_more_cycles, WAIT, "five more cycles during the flood")
        assert set(phases) == {Phase.HEALTHY}, phases
        assert _fds(proc.pid) <= fds_before + MAX_CONNECTIONS + SLACK_FDS
        assert adversary.poll() is None  # the flood was still held all along
    finally:
        if adversary.stdin is not None:
            adversary.stdin.close()
        adversary.wait(30)
    assert proc.poll() is None
    assert sum(k is EventKind.ACTION for k in node.kinds()) == actions_before
    text = (node.runtime_dir / "status.json").read_text()
    assert "local_error" not in text and "refused" not in text
