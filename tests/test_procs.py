"""ProcScanner against real processes: listeners, a real unit's cgroup, orphans, look-alikes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hydra_watchdog.adapters.identity import cgroup_paths, in_cgroup, program, read_identity
from hydra_watchdog.adapters.procs import ProcScanner, parse_listeners
from hydra_watchdog.observation import (
    GpuProcess,
    GpuReport,
    GpuSnapshot,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]

# Listens on argv[1] (0: none); with "child", also starts a worker that holds no port.
SERVER = """\
import socket, subprocess, sys, time
port = int(sys.argv[1])
if port:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
if sys.argv[2:] == ["child"]:
    subprocess.Popen(["sleep", "600"])
print("ready", flush=True)
time.sleep(600)
"""

NO_UNIT = UnitStatus(name="none.service", available=False)


def free_port_pair() -> int:
    """A port P with P and P+1 both free right now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no free port pair")


class Procs:
    """Processes a test starts; all killed and reaped at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen[str]] = []

    def server(self, install: str, port: int) -> subprocess.Popen[str]:
        """python <folder>/<install>/server.py PORT, ready when it returns."""
        script = self.folder / install / "server.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(SERVER)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True
        )
        self.started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.kill()
            proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def by_pid(processes: tuple[ProcessInfo, ...]) -> dict[int, ProcessInfo]:
    return {p.pid: p for p in processes}


# -- pure parsers ---------------------------------------------------------------------------


def test_parse_listeners_keeps_only_listen_on_watched_ports() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n"
        "   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 111 1\n"
        "   1: 0100007F:1389 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 222 1\n"
        "   2: 0100007F:1388 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  0 0 333 1\n"
        "   3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 444 1\n"
        "   garbage line\n"
    )
    assert parse_listeners(text, (5000, 5001)) == {111: 5000, 222: 5001}


def test_cgroup_paths_v2_and_hybrid() -> None:
    hybrid = "9:name=systemd:/system.slice/t.service\n4:memory:/x\n0::/system.slice/t.service\n"
    assert cgroup_paths(hybrid) == ("/system.slice/t.service", "/system.slice/t.service")
    assert in_cgroup("/system.slice/t.service/sub", "/system.slice/t.service")
    assert not in_cgroup("/system.slice/t.service2", "/system.slice/t.service")
    assert not in_cgroup("/", "")
    assert not in_cgroup("/system.slice", "/")


# -- real processes on the host -----------------------------------------------------------


def test_listener_matching_the_patterns_is_an_orphan(procs: Procs) -> None:
    port = free_port_pair()
    install = f"opt-{uuid.uuid4().hex[:8]}"
    server = procs.server(install, port)
    pattern = f"{procs.folder}/{install}/"
    report, found = ProcScanner(port, [pattern]).scan(NO_UNIT, GpuReport(), full=False)

    assert report.owners(port) == (server.pid,)
    assert report.owners(port + 1) == ()
    assert not report.full_scan  # the owner was among the pattern matches: no host-wide search
    info = by_pid(found)[server.pid]
    assert info.role is ProcessRole.ORPHAN
    assert info.listens_on == (port,)
    # Identity for the actuators: the same values psutil reads later.
    ps = psutil.Process(server.pid)
    assert info.start_time == ps.create_time()
    assert list(info.cmdline) == ps.cmdline()


def test_look_alike_on_port_plus_one_is_foreign_and_found_host_wide(procs: Procs) -> None:
    port = free_port_pair()
    install = f"opt-{uuid.uuid4().hex[:8]}"
    lookalike = procs.server(f"{install}.bak", port + 1)  # matches no pattern
    pattern = f"{procs.folder}/{install}/"
    scanner = ProcScanner(port, [pattern])
    report, found = scanner.scan(NO_UNIT, GpuReport(), full=False)

    assert report.owners(port + 1) == (lookalike.pid,)
    assert report.full_scan  # the owner was no candidate: searched host-wide
    info = by_pid(found)[lookalike.pid]
    assert info.role is ProcessRole.FOREIGN
    assert info.listens_on == (port + 1,)


def test_main_pid_and_gpu_holders(procs: Procs) -> None:
    port = free_port_pair()
    main = procs.server("main", 0)
    holder = procs.server("holder", 0)
    # A process that has exited and was reaped, and one that exited but is not reaped yet.
    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen(["true"], text=True)
    procs.started.append(zombie)
    psutil.Process(zombie.pid)  # still exists as a zombie until reaped
    deadline = time.monotonic() + 30
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    gpus = GpuReport(
        devices=(
            GpuSnapshot(
                index=0,
                uuid="GPU-0",
                name="sim",
                processes=(
                    GpuProcess(holder.pid, 1000),
                    GpuProcess(dead.pid, 5),
                    GpuProcess(zombie.pid, 7),
                ),
            ),
            GpuSnapshot(index=1, uuid="GPU-1", name="sim", processes=(GpuProcess(holder.pid, 24),)),
        )
    )
    unit = UnitStatus(name="t.service", available=True, load_state="loaded", main_pid=main.pid)
    report, found = ProcScanner(port, ["/nonexistent-pattern/"]).scan(unit, gpus, full=True)

    pids = by_pid(found)
    assert pids[main.pid].role is ProcessRole.MAIN
    assert pids[holder.pid].role is ProcessRole.FOREIGN
    assert pids[holder.pid].gpu_bytes == 1024  # summed over both GPUs
    assert dead.pid not in pids
    assert zombie.pid not in pids
    assert report.listeners == ()
    assert report.full_scan


def test_processes_dying_mid_scan_are_skipped(procs: Procs) -> None:
    """A shell keeps starting short-lived processes that match the pattern, so scans keep
    meeting PIDs that vanish between listing /proc and reading them."""
    marker = str(procs.folder / f"hydra-churn-{uuid.uuid4().hex[:8]}")
    Path(marker).mkdir()
    Path(marker, "work.sh").write_text("sleep 0.01\n")
    churn = subprocess.Popen(
        ["sh", "-c", f"while :; do sh {marker}/work.sh; done"],
        text=True,
    )
    procs.started.append(churn)
    scanner = ProcScanner(free_port_pair(), [marker])
    seen = scans = 0
    # At least 40 scans, and on until one met a short-lived process: a scan that reads only the
    # command lines of new processes takes a millisecond, so 40 of them can all be over before
    # a loaded machine has run the shell's first iteration.
    deadline = time.monotonic() + 20
    while scans < 40 or (not seen and time.monotonic() < deadline):
        _, found = scanner.scan(NO_UNIT, GpuReport(), full=True)
        scans += 1
        for info in found:
            assert marker in info.command, info
            assert info.role is ProcessRole.ORPHAN, info
            assert info.start_time > 0, info
        seen += len(found)
    churn.kill()
    churn.wait()
    assert seen > 0  # the scans did meet the short-lived processes


def test_the_watchdog_itself_is_never_an_orphan(procs: Procs) -> None:
    # This test process runs a program of the install tree as its child does: only the child
    # is an orphan.
    child = procs.server("child", 0)
    me = read_identity(os.getpid())
    mine = program(me) if me is not None else None
    if mine is None:
        pytest.skip("run as `python -m pytest`: this process runs no program file")
    tree = [os.path.dirname(mine), str(procs.folder / "child")]
    scanner = ProcScanner(free_port_pair(), tree)
    found = by_pid(scanner.scan(NO_UNIT, GpuReport(), full=False)[1])
    assert found[child.pid].role is ProcessRole.ORPHAN
    assert os.getpid() not in found


def test_unreadable_proc_root_gives_an_empty_scan(tmp_path: Path) -> None:
    report, found = ProcScanner(5000, ["x"], proc_root=str(tmp_path / "none")).scan(
        NO_UNIT,
        GpuReport(devices=(GpuSnapshot(0, "u", "n", processes=(GpuProcess(1, 1),)),)),
        full=True,
    )
    assert report.listeners == () and found == ()


# -- a real unit's cgroup, under real systemd ---------------------------------------------

SCAN_INSIDE = """
import dataclasses, json, sys
from hydra_watchdog.observation import GpuReport
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.systemd import SystemctlUnit
# Arguments come on stdin: in argv the pattern would make this very process match it.
unit, pattern, cgroup_root = json.load(sys.stdin)
status = SystemctlUnit(unit).status()
report, found = ProcScanner(5000, [pattern], cgroup_root=cgroup_root).scan(
    status, GpuReport(), full=False
)
print(json.dumps({
    "main": status.main_pid,
    "cgroup": status.control_group,
    "full_scan": report.full_scan,
    "listeners": [[x.port, x.pid] for x in report.listeners],
    "procs": [[p.pid, p.role.value, list(p.listens_on), p.command] for p in found],
}))
"""


@pytest.mark.systemd
def test_unit_main_worker_and_orphan_under_real_systemd(systemd_ns: SystemdNamespace) -> None:
    ns = systemd_ns
    tag = uuid.uuid4().hex[:8]
    install = f"/opt/hw-tabby-{tag}"
    unit = f"hw-tabby-{tag}.service"
    ns.write_file(f"{install}/server.py", SERVER)
    ns.write_file("/tmp/hw-scan.py", SCAN_INSIDE)
    ns.install_unit(unit, f"[Service]\nExecStart={sys.executable} {install}/server.py 5000 child\n")
    orphan = ns.spawn([sys.executable, f"{install}/server.py", "5001"])
    try:
        assert ns.systemctl("start", unit).returncode == 0

        def scan(cgroup_root: str) -> dict[str, Any]:
            out = ns.run(
                [sys.executable, "/tmp/hw-scan.py"],
                input=json.dumps([unit, f"{install}/", cgroup_root]),
                cwd=str(Path(__file__).resolve().parents[1]),
            )
            assert out.returncode == 0, out.stderr
            parsed: dict[str, Any] = json.loads(out.stdout)
            return parsed

        result: dict[str, Any] = {}

        def settled() -> bool:
            nonlocal result
            result = scan("/sys/fs/cgroup")
            ports = sorted(port for port, _ in result["listeners"])
            roles = sorted(role for _, role, _, _ in result["procs"])
            return ports == [5000, 5001] and roles == ["main", "orphan", "unit"]

        ns.wait_for(settled, what=lambda: f"main, worker and orphan seen ({result})")
        main = result["main"]
        procs = {role: (pid, ports, cmd) for pid, role, ports, cmd in result["procs"]}
        assert procs["main"][0] == main
        assert procs["main"][1] == [5000]
        assert procs["unit"][2] == "sleep 600"  # the worker: in the cgroup, holds no port
        assert procs["orphan"][1] == [5001]
        assert f"{install}/server.py 5001" in procs["orphan"][2]
        assert result["full_scan"] is False  # every owner was a candidate

        # Without a readable cgroup tree, membership comes from /proc/PID/cgroup: same answer.
        fallback = scan("/nonexistent-cgroup-root")
        assert sorted(fallback["procs"]) == sorted(result["procs"])
    finally:
        SystemdNamespace.kill_spawned(orphan)
        ns.reset_unit(unit, remove=True)
