"""The demo's stand-in unit manager, against real processes and real signals."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.sim.unit import SimUnit


def wait_for(cond: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A program whose behaviour the test flips through a file: exit code or run forever."""
    path = tmp_path / "prog.py"
    path.write_text(
        "import sys, time, pathlib\n"
        "print('started', flush=True)\n"
        "mode = pathlib.Path(sys.argv[1]).read_text().strip()\n"
        "if mode != 'run': sys.exit(int(mode))\n"
        "time.sleep(600)\n"
    )
    return path


@pytest.fixture
def unit(tmp_path: Path, script: Path) -> Iterator[SimUnit]:
    (tmp_path / "mode").write_text("run")
    u = SimUnit(
        "sim.service",
        [sys.executable, str(script), str(tmp_path / "mode")],
        log_path=tmp_path / "unit.log",
        restart_sec=0.2,
    )
    yield u
    u.stop_all()


def test_start_stop_report_like_systemd(unit: SimUnit) -> None:
    before = time.monotonic()
    assert unit.command(UnitVerb.START).ok
    st = unit.status()
    assert (st.active_state, st.sub_state, st.n_restarts) == ("active", "running", 0)
    assert st.main_pid is not None and psutil.pid_exists(st.main_pid)
    assert st.active_enter_mono is not None and st.active_enter_mono >= before
    pid = st.main_pid
    wait_for(lambda: "started" in " ".join(unit.journal(5)))  # its output reaches the journal
    assert unit.command(UnitVerb.STOP).ok
    assert unit.status().active_state == "inactive"
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")


def test_crash_auto_restarts_and_counts(unit: SimUnit, tmp_path: Path) -> None:
    unit.command(UnitVerb.START)
    (tmp_path / "mode").write_text("3")
    first = unit.status().main_pid
    assert first is not None
    psutil.Process(first).kill()  # a crash: SIGKILL
    wait_for(lambda: (unit.status().n_restarts or 0) >= 1)
    st = unit.status()
    # the restarted process exits 3 at once and is restarted again: Result records the cause
    wait_for(lambda: unit.status().result == "exit-code")
    assert unit.status().exec_main_status == 3
    assert st.invocation_id
    (tmp_path / "mode").write_text("run")
    wait_for(lambda: unit.status().active_state == "active" and unit.status().main_pid is not None)
    n = unit.status().n_restarts
    assert n is not None and n >= 2
    assert unit.command(UnitVerb.RESTART).ok
    assert unit.status().n_restarts == 0  # a manual restart flushes the counter, as in systemd


def test_reset_failed_and_clean_exit(unit: SimUnit, tmp_path: Path) -> None:
    (tmp_path / "mode").write_text("0")
    unit.command(UnitVerb.START)
    wait_for(lambda: unit.status().active_state == "inactive")
    assert unit.status().result == "success"
    assert unit.command(UnitVerb.RESET_FAILED).ok


def test_closed_unit_refuses(unit: SimUnit) -> None:
    unit.stop_all()
    outcome = unit.command(UnitVerb.START)
    assert not outcome.ok and outcome.refused
