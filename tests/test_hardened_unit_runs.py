"""The hardened unit, run by real systemd (in a namespace), still lets the watchdog do its job:
ctypes callbacks under MemoryDenyWriteExecute (NVML goes through ctypes), its imports, the state
and status directories, sd_notify, restarting another unit through PID 1, reading a unit over
PID 1's private D-Bus socket, naming its threads (prctl), and SIGTERM to another user's process.

The probe replaces ExecStart and keeps every other directive of systemd/hydra-watchdog.service.
Not checked here: LoadCredential delivery (systemd 252 in this namespace hands every unit an empty
credentials directory, even for SetCredential=), and device access (no NVIDIA devices)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.systemd_ns import SystemdNamespace, hidden_by_hardening

pytest_plugins = ["tests.harness.systemd_fixtures"]
pytestmark = [pytest.mark.systemd]

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import ctypes, json, os, signal, socket, subprocess, sys
result = {}
# MemoryDenyWriteExecute=true: a libffi closure must still work.
result["ctypes_callback"] = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)()
import httpx, jeepney, logging_journald, prometheus_client, psutil, pynvml, structlog
result["imports"] = True
with open(os.path.join(os.environ["STATE_DIRECTORY"], "probe"), "w") as f:
    f.write("x")
status = os.path.join(os.environ["RUNTIME_DIRECTORY"], "status.json")
with open(status, "w") as f:
    f.write("{}")
result["status_mode"] = oct(os.stat(status).st_mode & 0o777)
result["runtime_dir_mode"] = oct(os.stat(os.environ["RUNTIME_DIRECTORY"]).st_mode & 0o777)
result["state_dir_mode"] = oct(os.stat(os.environ["STATE_DIRECTORY"]).st_mode & 0o777)
restart = subprocess.run(
    ["systemctl", "restart", "hw-probe-victim.service"], capture_output=True, text=True
)
result["restart"] = [restart.returncode, restart.stderr.strip()]
# The per-cycle unit read goes over PID 1's private socket (unit_bus.py), not systemctl.
sys.path.insert(0, sys.argv[2])
from hydra_watchdog.adapters.systemd import SystemctlUnit
bus_read = SystemctlUnit("hw-probe-victim.service").status()
result["bus_read"] = [bus_read.read_via, bus_read.active_state]
# Lanes name their threads with prctl(PR_SET_NAME), which the syscall filter must allow.
import threading
from hydra_watchdog.adapters.bounded import Lane
lane = Lane("probe-health")
named = lane.submit("tid", threading.get_native_id)
named.wait(10)
with open(f"/proc/self/task/{named.value}/comm") as f:
    result["lane_comm"] = f.read().strip()
lane.close()
pid = int(sys.argv[1])
result["other_cmdline_visible"] = os.path.exists(f"/proc/{pid}/cmdline")
try:
    os.kill(pid, signal.SIGTERM)
    result["kill"] = "ok"
except OSError as exc:
    result["kill"] = repr(exc)
print(json.dumps(result), flush=True)
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.connect(os.environ["NOTIFY_SOCKET"])
notify.send(b"READY=1")
signal.pause()
"""


@pytest.fixture
def probe_units(systemd_ns: SystemdNamespace) -> Iterator[SystemdNamespace]:
    names = ("hydra-watchdog.service", "hw-probe-victim.service", "hw-probe-other.service")
    yield systemd_ns
    for name in names:
        systemd_ns.reset_unit(name, remove=True)
    systemd_ns.run(["rm", "-rf", "/etc/systemd/system/hydra-watchdog.service.d", "/etc/hw-probe"])
    systemd_ns.daemon_reload()


def test_hardened_unit_lets_the_watchdog_work(probe_units: SystemdNamespace) -> None:
    ns = probe_units
    ns.install_unit("hw-probe-victim.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    ns.install_unit(
        "hw-probe-other.service", "[Service]\nUser=nobody\nExecStart=/bin/sleep infinity\n"
    )
    assert (
        ns.systemctl("start", "hw-probe-victim.service", "hw-probe-other.service").returncode == 0
    )
    other_pid = ns.show("hw-probe-other.service", "MainPID")["MainPID"]
    victim_before = ns.show("hw-probe-victim.service", "InvocationID")["InvocationID"]

    ns.write_file("/etc/hw-probe/probe.py", PROBE)
    ns.write_file("/etc/hydra-watchdog/admin_key", "test-key\n", 0o600)
    unit = (REPO / "systemd" / "hydra-watchdog.service").read_text(encoding="utf-8")
    unit = unit.replace(
        "ExecStart=/opt/hydra-watchdog/bin/hydra-watchdog run --config "
        "/etc/hydra-watchdog/config.toml",
        f"ExecStart={sys.executable} /etc/hw-probe/probe.py {other_pid} {REPO}",
    )
    assert "/etc/hw-probe/probe.py" in unit
    # The interpreter may live under /root (pyenv) and the checkout (with its venv) under /tmp or
    # /home, which ProtectHome=true and PrivateTmp=true hide; a drop-in shows only those two
    # trees, read-only. Nothing else of the hardening changes.
    shown = hidden_by_hardening(REPO, Path(sys.base_prefix))
    ns.write_file(
        "/etc/systemd/system/hydra-watchdog.service.d/interpreter.conf",
        "[Service]\n" + "\n".join(shown) + "\n",
    )
    ns.install_unit("hydra-watchdog.service", unit)

    started = ns.systemctl("start", "hydra-watchdog.service", timeout=120)
    log = ns.journalctl("-u", "hydra-watchdog.service", "-o", "cat").stdout
    assert started.returncode == 0, log
    assert ns.show("hydra-watchdog.service", "ActiveState")["ActiveState"] == "active"  # READY=1
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, log
    result = json.loads(lines[-1])
    assert result["ctypes_callback"] == 7
    assert result["imports"] is True
    assert result["status_mode"] == "0o644"
    assert result["runtime_dir_mode"] == "0o755"
    assert result["state_dir_mode"] == "0o700"
    assert result["restart"] == [0, ""]
    assert result["bus_read"] == ["D-Bus", "active"]
    assert result["lane_comm"] == "probe-health"  # what top -H and ps -L show
    assert result["other_cmdline_visible"] is True
    assert result["kill"] == "ok"
    ns.wait_for_state("hw-probe-other.service", ["inactive", "failed"])
    victim_after = ns.show("hw-probe-victim.service", "InvocationID")["InvocationID"]
    assert victim_after != victim_before  # really restarted by PID 1
