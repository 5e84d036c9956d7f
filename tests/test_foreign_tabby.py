"""TabbyAPI run by another user than the watchdog expects (issue 23 item 9): its port holder is
foreign (never signalled), and the finding says why (its uid differs from tabbyapi.user, or from
the unit's User=) and how to set it, not only "free the port by hand"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import replace

from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.observation import GpuReport, ProcessRole, UnitStatus
from hydra_watchdog.states import Rule
from tests.harness.adversary import NOBODY, SYSTEM_PYTHON, as_nobody, public_dir
from tests.policy_kit import PORT, Run, config, obs, ports, proc, refused, unit

LISTEN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("ready", flush=True)
time.sleep(600)
"""
NO_SYSTEMD = UnitStatus(name="tabbyapi.service", available=False, detail="no systemd here")


def _foreign_finding(run: Run) -> str:
    return next(f.message for f in run.state.findings if f.rule is Rule.FOREIGN_HOLDER)


def test_tabbyapi_run_by_another_user_is_named_with_the_setting_to_change() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with public_dir() as tree:
        install = tree / "tabbyapi"
        install.mkdir()
        (install / "main.py").write_text(LISTEN)
        theirs = subprocess.Popen(
            as_nobody([SYSTEM_PYTHON, str(install / "main.py"), str(port)]),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert theirs.stdout is not None and theirs.stdout.readline().strip() == "ready"
            report, found = ProcScanner(port, [str(install)], user="root").scan(
                NO_SYSTEMD, GpuReport(), full=True
            )
        finally:
            os.killpg(theirs.pid, signal.SIGKILL)
            theirs.wait(10)
    holder = next(p for p in found if p.pid == theirs.pid)
    assert (holder.role, holder.uid, holder.wrong_user) == (ProcessRole.FOREIGN, NOBODY, True)

    run = Run(cfg=config(tabbyapi={"url": f"http://127.0.0.1:{port}"}))
    run.step(obs(0, health=refused(), unit=NO_SYSTEMD, port=report, processes=found))
    said = _foreign_finding(run)
    assert f"TabbyAPI's program run by uid {NOBODY}, not tabbyapi.user (root)" in said
    assert f'set tabbyapi.user = "{NOBODY}"' in said
    assert "never signalled" in said


def test_under_a_unit_the_units_user_is_named() -> None:
    stranger = replace(proc(300, ProcessRole.FOREIGN, listens=(PORT,)), uid=1000, wrong_user=True)
    run = Run()
    tabby = replace(unit("inactive", "dead"), user="tabbyapi")
    run.step(obs(0, health=refused(), unit=tabby, port=ports((PORT, 300)), processes=(stranger,)))
    said = _foreign_finding(run)
    assert "run by uid 1000, not tabbyapi.service's User= (tabbyapi)" in said
    assert "stop it and start tabbyapi.service" in said
    # a program that is not TabbyAPI's keeps the plain advice
    other = replace(stranger, wrong_user=False)
    run = Run()
    run.step(obs(0, health=refused(), unit=tabby, port=ports((PORT, 300)), processes=(other,)))
    assert "free the port by hand" in _foreign_finding(run)
