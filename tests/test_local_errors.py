# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""The watchdog's own resource failures, produced for real in a child process (a lowered
RLIMIT_NOFILE or RLIMIT_AS, then exhausted), against the real TabbyAPI simulator: they read as
LOCAL_ERROR, never as TabbyAPI refusing, and the policy does nothing on them (issue 10)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpcore
import httpx

from hydra_watchdog import control
from hydra_watchdog.observation import local_failure
from tests.harness.tabby import TabbySims, tabby_sim  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

_NO_FDS = """
import errno, json, os, resource, sys, time
from hydra_watchdog import control
from hydra_watchdog.adapters.tabby import TabbyClient
from tests.harness.tabby import trusted_listener

url, state_dir = sys.argv[1], sys.argv[2]
TabbyClient(url, admin_key=None, health_timeout=5, gate=trusted_listener).health()  # imports
client = TabbyClient(url, admin_key=None, health_timeout=5, gate=trusted_listener)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
held = []
while True:
    try:
        held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
        break
starved = client.health()
pause = control.read_pause(state_dir, time.time(), time.monotonic())
for fd in held:
    os.close(fd)
fed = client.health()
print(json.dumps({
    "held": len(held),
    "starved": [starved.result.outcome, starved.result.detail],
    "pause": None if pause is None else [pause.reason, pause.until],
    "fed": [fed.result.outcome, fed.healthy],
}))
"""

_NO_THREADS = """
import json, resource, sys, threading, time
from hydra_watchdog.config import parse_config
from hydra_watchdog.observe import Observer
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.adapters.gpu import NvmlGpu
from hydra_watchdog.adapters.host import HostProbe
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.adapters.tabby import TabbyClient

url, models, no_systemd, install = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
cfg = parse_config({
    "tabbyapi": {"url": url, "health_timeout": "3s", "venv": "", "failures_before_down": 1,
                 "cmdline_patterns": [install]},
    "model": {"name": "m1", "models_dir": models},
    "gpu": {"nvml_library": "/nonexistent/libnvidia-ml.so.1"},
})
def observer():
    return Observer(
        cfg,
        tabby=TabbyClient.from_config(cfg),
        gpu=NvmlGpu.from_config(cfg),
        units=SystemctlUnit(cfg.tabbyapi.unit, root=no_systemd),
        scanner=ProcScanner.from_config(cfg),
        host=HostProbe.from_config(cfg),
    )
first = observer().observe()
# The probe threads are long-lived and start on a lane's first call: a fresh observer (as after
# a reload) has none yet, and must start them under the limit.
fresh = observer()
# Every new thread now asks for a 256 MiB stack, which the address-space limit refuses: the
# kernel's answer to pthread_create is the same as with no pids or memory left.
threading.stack_size(256 << 20)
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (128 << 20), resource.RLIM_INFINITY))
try:
    threading.Thread(target=lambda: None).start()
    refused = ""
except RuntimeError as exc:
    refused = str(exc)
starved = fresh.observe()
state, actions = decide(PolicyState(), starved, time.monotonic(), cfg)
print(json.dumps({
    "first": first.health.result.outcome,
    "refused": refused,
    "health": [starved.health.result.outcome, starved.health.result.detail],
    "unit": starved.unit.detail,
    "phase": state.phase,
    "verdict": state.phase.verdict.name,
    "actions": len(actions),
    "findings": [[f.rule, f.message] for f in state.findings],
}))
"""


def _child(script: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_out_of_descriptors_is_a_local_error_not_refused(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    sim = tabby_sim.start()
    control.pause(tmp_path, "driver upgrade", None)
    out = _child(_NO_FDS, sim.url, str(tmp_path))
    assert out["held"] > 0
    outcome, detail = out["starved"]
    assert outcome == "local_error", out
    assert "out of file descriptors (EMFILE)" in detail
    # TabbyAPI was up all along: with descriptors back, the same client reaches it.
    assert out["fed"] == ["ok", True]
    # pause.json exists but could not be opened: still paused, and saying why.
    reason, until = out["pause"]
    assert until is None
    assert "cannot be read" in reason and "Too many open files" in reason


def test_a_probe_thread_that_cannot_start_is_a_local_error_and_nothing_is_done(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    sim = tabby_sim.start()
    no_systemd = tmp_path / "root"
    no_systemd.mkdir()
    out = _child(_NO_THREADS, sim.url, str(sim.models_dir), str(no_systemd), str(sim.install_dir))
    assert out["first"] == "ok"
    assert "can't start new thread" in out["refused"]  # the limit really stops threads
    outcome, detail = out["health"]
    assert outcome == "local_error", out  # observe() returned instead of raising
    assert "cannot start the health probe's thread" in detail
    assert "cannot start the unit probe's thread" in out["unit"]
    assert out["phase"] == "unknown" and out["verdict"] == "UNKNOWN"
    assert out["actions"] == 0
    impaired = [message for rule, message in out["findings"] if rule == "watchdog_impaired"]
    assert impaired and impaired[0].startswith("watchdog impaired: ")


def test_local_failure_looks_through_httpx_wrapping() -> None:
    def wrapped(error: int) -> httpx.ConnectError:
        try:
            try:
                raise OSError(error, "boom")
            except OSError as exc:
                raise httpcore.ConnectError(str(exc)) from exc
        except httpcore.ConnectError as exc:
            try:
                raise httpx.ConnectError(str(exc)) from exc
            except httpx.ConnectError as outer:
                return outer

    assert "EMFILE" in local_failure(wrapped(errno.EMFILE))
    assert "ENFILE" in local_failure(wrapped(errno.ENFILE))
    assert "ENOMEM" in local_failure(wrapped(errno.ENOMEM))
    assert "ENOBUFS" in local_failure(wrapped(errno.ENOBUFS))
    assert local_failure(wrapped(errno.ECONNREFUSED)) == ""  # TabbyAPI's side: evidence
    assert local_failure(MemoryError()) != ""
    assert local_failure(RuntimeError("can't start new thread")) == ""  # caught where it starts
