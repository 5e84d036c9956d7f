"""sd_notify against real AF_UNIX datagram sockets, bound by the test as systemd would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.report.sdnotify import Notifier
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"hydra-watchdog-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    yield "@" + name, sock
    sock.close()


def test_path_socket_receives_each_message(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("backoff: step 2,\nnext start in 60 s")
    assert sock.recv(4096) == b"STATUS=backoff: step 2, next start in 60 s"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_status_is_utf8_whatever_the_model_is_called(
    path_socket: tuple[str, socket.socket],
) -> None:
    """systemd reads STATUS as UTF-8; the `sdnotify` package encodes Latin-1 and drops a line
    outside it without a word (the reason the module is ours: its docstring)."""
    address, sock = path_socket
    assert Notifier({"NOTIFY_SOCKET": address}).status("healthy: Qwen2.5-72B ✓ café")
    assert sock.recv(4096).decode("utf-8") == "STATUS=healthy: Qwen2.5-72B ✓ café"


def test_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.notify("READY=1", "STATUS=healthy")
    assert sock.recv(4096) == b"READY=1\nSTATUS=healthy"


def test_reads_the_process_environment(path_socket: tuple[str, socket.socket]) -> None:
    """A real child process started the way systemd starts a service: only the environment."""
    address, sock = path_socket
    code = "from hydra_watchdog.report.sdnotify import Notifier; Notifier().ready()"
    env = {**os.environ, "NOTIFY_SOCKET": address}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert sock.recv(4096) == b"READY=1"


def test_silent_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_vanished_socket_is_not_an_exception(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, _ = path_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}
    assert Notifier(env).watchdog_interval() == 1.5
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 1.5


def test_watchdog_pid_of_another_process_means_no_pings(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, _ = path_socket
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert os.getpid() != 1
    assert Notifier(env).watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_or_bad_watchdog_usec(path_socket: tuple[str, socket.socket], usec: str) -> None:
    address, _ = path_socket
    assert Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": usec}).watchdog_interval() is None


# --- real systemd (booted in a namespace) -------------------------------------------------------

_SERVICE = """[Unit]
Description=sd_notify test service

[Service]
Type=notify
NotifyAccess=main
WatchdogSec=4
WorkingDirectory={repo}
ExecStart={python} /run/sdnotify_service.py
"""

# Reports its ping interval through STATUS, pings from its loop, then goes quiet when told to
# (a file appears): systemd's watchdog must then kill it.
_SCRIPT = """
import os, time
from hydra_watchdog.report.sdnotify import Notifier

n = Notifier()
n.status(f"interval {n.watchdog_interval()}")
n.ready()
while not os.path.exists("/run/hang"):
    n.watchdog()
    time.sleep(0.5)
time.sleep(3600)
"""


@pytest.mark.systemd
def test_real_systemd_readiness_status_and_watchdog(systemd_ns: SystemdNamespace) -> None:
    unit = "hydra-sdnotify-test.service"
    repo = str(Path(__file__).resolve().parent.parent)
    systemd_ns.write_file("/run/sdnotify_service.py", _SCRIPT)
    systemd_ns.install_unit(unit, _SERVICE.format(repo=repo, python=sys.executable))
    try:
        systemd_ns.run(["rm", "-f", "/run/hang"])
        # Type=notify: `start` returns only after READY=1 (and fails if the process dies first).
        started = systemd_ns.systemctl("start", unit, timeout=120)
        assert started.returncode == 0, started.stderr
        shown = systemd_ns.show(unit, "ActiveState", "StatusText", "WatchdogUSec")
        assert shown["ActiveState"] == "active"
        assert shown["StatusText"] == "interval 2.0"  # WatchdogSec=4: ping every 2 s
        systemd_ns.write_file("/run/hang", "")
        systemd_ns.wait_for(
            lambda: systemd_ns.show(unit, "Result")["Result"] == "watchdog",
            timeout=120,
            what="systemd's watchdog killing the silent service",
        )
    finally:
        systemd_ns.reset_unit(unit, remove=True)
