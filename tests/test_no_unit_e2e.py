# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""The daemon where no unit can be asked (no systemd, TabbyAPI started by hand): what belongs to
TabbyAPI's process is keyed to that process (pid and start ticks), so a new process is noticed.

The daemon is the real `run_daemon` with the real adapters; its unit adapter is the real
SystemctlUnit pointed at a root without systemd, so it answers "systemd unavailable" as on any
machine without it. The TabbyAPI simulator is started and restarted by the test, by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hydra_watchdog.events import EventKind
from hydra_watchdog.sim.tabby_server import write_control
from hydra_watchdog.states import Phase
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import ADMIN_KEY, port_open, wait_for
from tests.test_daemon import WAIT, Daemons, Node, daemons  # noqa: F401

pytestmark = pytest.mark.slow

_RUNNER = """
import dataclasses, json, sys
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.daemon import build_adapters, run_daemon

spec = json.loads(sys.argv[1])

def factory(cfg):
    real = build_adapters(cfg)
    real.units.close()
    return dataclasses.replace(real, units=SystemctlUnit(cfg.tabbyapi.unit, root=spec["root"]))

sys.exit(run_daemon(spec["config"], adapter_factory=factory))
"""

# TabbyAPI's words when its ExLlamaV2 backend is not installed: no retry of the same process can
# change them (a permanent load error, notes/tabbyapi.md).
NOT_INSTALLED = "Backend 'exllamav2' selected, but required dependencies are not installed."


def _start_daemon(node: Node, daemons: Daemons) -> subprocess.Popen[bytes]:
    no_systemd = node.root / "no-systemd"  # a root without /run/systemd/system
    no_systemd.mkdir(exist_ok=True)
    spec = {"config": str(node.config), "root": str(no_systemd)}
    daemons.roots.append(node.root)
    with (node.root / "daemon.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUNNER, json.dumps(spec)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=node.nvml.env(ld_path=False),
            cwd=Path(__file__).resolve().parents[1],
        )
    daemons.procs.append(proc)
    return proc


def _tabby_by_hand(node: Node, *, broken: bool) -> subprocess.Popen[bytes]:
    """TabbyAPI started by hand on the node's port; `broken`: this process cannot load (its
    backend is not installed), the next one can."""
    with (node.root / "unit.log").open("ab") as out:
        proc = subprocess.Popen(
            node.sim_argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    write_control(
        node.control, **({"load_error": NOT_INSTALLED, "only_pid": proc.pid} if broken else {})
    )
    wait_for(lambda: port_open(node.port), WAIT, "TabbyAPI to listen")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _failed_loads(node: Node) -> int:
    return sum(1 for e in node.events() if e.kind is EventKind.LOAD_FAILED)


def test_tabbyapi_restarted_by_hand_gets_its_model_also_across_a_watchdog_restart(
    tmp_path: Path, nvml_sim: NvmlSim, daemons: Daemons
) -> None:
    node = Node(tmp_path, nvml_sim)
    node.write_config(tabbyapi={"user": str(os.getuid())})
    first = _tabby_by_hand(node, broken=True)
    watchdog = _start_daemon(node, daemons)
    wait_for(lambda: _failed_loads(node) == 1, WAIT, "the first process's permanent failure")
    assert "not installed" in node.loads()[0]["result"]

    # Restarted by hand while the watchdog runs: the new process gets the model.
    _stop(first)
    second = _tabby_by_hand(node, broken=True)
    wait_for(lambda: _failed_loads(node) == 2, WAIT, "the second process's own try")

    # ... and across a watchdog restart: stopped while the verdict stands, TabbyAPI restarted
    # by hand meanwhile, started again with the verdict in its state file.
    _stop(watchdog)
    _stop(second)
    third = _tabby_by_hand(node, broken=False)
    _start_daemon(node, daemons)
    wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the third process's model")
    assert [r["model"] for r in node.loads()] == ["m1", "m1", "m1"]
    loaded = httpx.get(
        f"http://127.0.0.1:{node.port}/v1/model",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert loaded.json()["id"] == "m1"
    _stop(third)
