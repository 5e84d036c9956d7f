"""The watchdog's own processes are never TabbyAPI orphans (found by the chaos suite: run as a
service, the watchdog's `ldd` of TabbyAPI's venv matched the cmdline patterns and was reported
as an orphan every cycle). Processes in the watchdog's own .service cgroup are its own."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.harness.systemd_ns import SystemdNamespace

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.systemd]

# Runs as "the watchdog", inside a service: starts a child that runs a program from TabbyAPI's
# install tree (as a helper of the watchdog's may), then scans. Prints the child and the orphans.
PREFIX = "/opt/tabbyapi-test-"
SCAN = (
    f"PREFIX = {PREFIX!r}\n"
    + """
import json, subprocess, sys, time
from hydra_watchdog.observation import GpuReport, ProcessRole, UnitStatus
from hydra_watchdog.adapters.procs import ProcScanner
# Only the suffix comes in argv: systemd-run's own command line must not match the pattern.
marker, stranger = PREFIX + sys.argv[1], int(sys.argv[2])
child = subprocess.Popen([sys.executable, marker + "/sleep.py"])
scanner = ProcScanner(5000, [marker])
# TabbyAPI's unit runs the very program the child runs (ExecStart=): an orphan's program
unit = UnitStatus(
    name="tabbyapi.service", available=True, load_state="loaded",
    exec_path=sys.executable, exec_argv=(sys.executable, marker + "/sleep.py"),
)
deadline = time.monotonic() + 30
try:
    while not scanner._matches(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the child has exec'd
    _, procs = scanner.scan(unit, GpuReport(), full=False)
    print(json.dumps({
        "child_matches": scanner._matches(child.pid),
        "orphans": [p.pid for p in procs if p.role is ProcessRole.ORPHAN],
    }))
finally:
    child.kill()
    child.wait()
"""
)


def test_own_service_processes_are_not_orphans(systemd_ns: SystemdNamespace) -> None:
    ns = systemd_ns
    suffix = uuid.uuid4().hex[:8]
    marker = PREFIX + suffix
    ns.write_file(f"{marker}/sleep.py", "import time\ntime.sleep(60)\n")
    stranger_proc = ns.spawn([sys.executable, f"{marker}/sleep.py"])
    try:
        found: list[int] = []

        def stranger_started() -> bool:
            out = ns.run(["ps", "-ww", "-eo", "pid=,args="]).stdout
            found[:] = [int(line.split()[0]) for line in out.splitlines() if marker in line]
            return bool(found)

        ns.wait_for(stranger_started, timeout=30, what="the stranger process")
        repo = str(REPO)
        done = ns.run(
            [
                "systemd-run", "--wait", "--pipe", "--quiet", f"--working-directory={repo}",
                "--unit", f"hw-own-children-{suffix}.service",
                sys.executable, "-c", SCAN, suffix, str(found[0]),
            ],
            timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["child_matches"]  # the service's child names the pattern...
        assert result["orphans"] == found  # ...but only the stranger outside it is an orphan
    finally:
        SystemdNamespace.kill_spawned(stranger_proc)
