"""SystemctlUnit against real systemd (PID 1 of a namespace), and against a host without it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.adapters.systemd import SystemctlUnit, kill_group, parse_show
from hydra_watchdog.observation import UnitStatus
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]

SLEEPER = """\
[Service]
Type=simple
ExecStart=/bin/sh -c 'echo "hw-sleeper up $$"; exec sleep 600'
"""


def adapter(
    ns: SystemdNamespace, unit: str, *, timeout: float = 10.0, command_timeout: float = 60.0
) -> SystemctlUnit:
    return SystemctlUnit(
        unit,
        argv_prefix=ns.nsenter,
        root=ns.root,
        timeout=timeout,
        command_timeout=command_timeout,
    )


@pytest.fixture
def unit_name(systemd_ns: SystemdNamespace) -> Iterator[str]:
    name = f"hw-{uuid.uuid4().hex[:8]}.service"
    yield name
    systemd_ns.reset_unit(name, remove=True)


def wait_status(
    unit: SystemctlUnit, ns: SystemdNamespace, check: Callable[[UnitStatus], object], what: str
) -> UnitStatus:
    last = unit.status()

    def reached() -> bool:
        nonlocal last
        last = unit.status()
        return bool(check(last))

    ns.wait_for(reached, what=lambda: f"{what} (last: {last})")
    return last


# -- parsing ------------------------------------------------------------------------------------


def test_parse_show_reads_by_name_in_any_order() -> None:
    text = (
        "NRestarts=4\nMainPID=0\nActiveEnterTimestampMonotonic=2500000\nLoadState=loaded\n"
        "Result=exit-code\nActiveState=failed\nSubState=failed\nExecMainStatus=3\n"
        "ControlGroup=\nInvocationID=abc\n"
    )
    st = parse_show("t.service", text)
    assert (st.load_state, st.active_state, st.result) == ("loaded", "failed", "exit-code")
    assert st.n_restarts == 4
    assert st.exec_main_status == 3
    assert st.main_pid is None
    assert st.active_enter_mono == 2.5
    assert st.exists


def test_parse_show_garbage_gives_empty_fields_not_an_exception() -> None:
    st = parse_show("t.service", "NRestarts=[not set]\nno equals sign\n=\n")
    assert st.n_restarts is None
    assert st.load_state == ""
    assert "no LoadState" in st.detail


# -- without systemd ------------------------------------------------------------------------------


def test_host_without_systemd_is_unavailable_and_refuses() -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this host runs systemd as PID 1")
    unit = SystemctlUnit("hydra-watchdog-test-absent.service")
    st = unit.status()
    assert not st.available
    assert not st.exists
    assert "/run/systemd/system" in st.detail
    for verb in UnitVerb:
        out = unit.command(verb)
        assert not out.ok
        assert out.refused
        assert "not the init system" in out.detail


def test_systemctl_that_cannot_connect_is_unavailable_and_refused(tmp_path: Path) -> None:
    # A root that claims systemd, while the real systemctl finds no systemd to talk to.
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this host runs systemd as PID 1")
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    unit = SystemctlUnit("hydra-watchdog-test-absent.service", root=str(tmp_path))
    st = unit.status()
    assert not st.available
    assert "systemctl show failed" in st.detail
    out = unit.command(UnitVerb.RESET_FAILED)
    assert (out.ok, out.refused) == (False, True)


def test_missing_systemctl_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    unit = SystemctlUnit("x.service", argv_prefix=["/nonexistent/bin/nsenter"], root=str(tmp_path))
    st = unit.status()
    assert not st.available
    assert "not found" in st.detail
    out = unit.command(UnitVerb.START)
    assert not out.ok
    assert "not found" in out.detail
    assert unit.journal(5)[0].startswith("[journal unavailable")


# A command that waits on a child it put in a session of its own (out of its process group),
# and ignores SIGTERM: only a kill of its descendants ends it, and the child, promptly.
_WAITS_ON_A_CHILD = """
import signal, subprocess
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(
    ["sleep", "600"], start_new_session=True, stdout=subprocess.DEVNULL
)
print(child.pid, flush=True)
child.wait()
"""


def test_a_timed_out_commands_descendants_are_killed_first() -> None:
    """kill_group kills what the command started (psutil's children(recursive=True)), not only
    its process group: the child below left its group, and still dies, so the command, waiting on
    it, exits and is reaped."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAITS_ON_A_CHILD],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    child = psutil.Process(int(proc.stdout.readline()))
    try:
        kill_group(proc)
        assert proc.returncode == 0  # it returned from child.wait(): not killed itself
        child.wait(timeout=10)  # raises TimeoutExpired while it still runs
        assert not child.is_running()
    finally:
        if child.is_running():
            child.kill()
        proc.kill()
        proc.wait()


# -- against real systemd -----------------------------------------------------------------------


@pytest.mark.systemd
def test_unknown_unit_is_not_found(systemd_ns: SystemdNamespace) -> None:
    st = adapter(systemd_ns, "hydra-no-such-unit.service").status()
    assert st.available
    assert st.load_state == "not-found"
    assert not st.exists
    assert "not found" in st.detail


@pytest.mark.systemd
def test_start_restart_stop(systemd_ns: SystemdNamespace, unit_name: str) -> None:
    systemd_ns.install_unit(unit_name, SLEEPER)
    unit = adapter(systemd_ns, unit_name)
    before = unit.status()
    assert before.exists and before.active_state == "inactive" and before.main_pid is None

    assert unit.command(UnitVerb.START).ok
    up = wait_status(unit, systemd_ns, lambda s: s.active_state == "active", "active")
    assert up.sub_state == "running"
    assert up.main_pid is not None and up.main_pid > 1
    assert up.control_group.endswith(f"/system.slice/{unit_name}")
    assert up.invocation_id
    # The cgroup systemd reports is the one the main process is in.
    cgroup = systemd_ns.run(["cat", f"/proc/{up.main_pid}/cgroup"]).stdout
    assert f":{up.control_group}\n" in cgroup

    assert unit.command(UnitVerb.RESTART).ok
    again = wait_status(
        unit,
        systemd_ns,
        lambda s: s.active_state == "active" and s.invocation_id not in ("", up.invocation_id),
        "a new invocation",
    )
    assert again.main_pid != up.main_pid
    assert again.n_restarts == 0  # a manual restart is not counted by NRestarts

    assert unit.command(UnitVerb.STOP).ok  # stop waits for the job: inactive right after
    down = unit.status()
    assert down.active_state == "inactive"
    assert down.main_pid is None
    assert down.result == "success"


@pytest.mark.systemd
def test_active_enter_timestamp_is_on_the_monotonic_clock(
    systemd_ns: SystemdNamespace, unit_name: str
) -> None:
    def mono_inside() -> float:
        return float(systemd_ns.python("import time; print(time.monotonic())").stdout)

    systemd_ns.install_unit(unit_name, SLEEPER)
    unit = adapter(systemd_ns, unit_name)
    t0 = mono_inside()
    assert unit.command(UnitVerb.START).ok
    st = wait_status(unit, systemd_ns, lambda s: s.active_state == "active", "active")
    t1 = mono_inside()
    assert st.active_enter_mono is not None
    assert t0 <= st.active_enter_mono <= t1


@pytest.mark.systemd
def test_failed_exit_code_and_reset_failed(systemd_ns: SystemdNamespace, unit_name: str) -> None:
    systemd_ns.install_unit(unit_name, "[Service]\nExecStart=/bin/sh -c 'exit 7'\n")
    unit = adapter(systemd_ns, unit_name)
    assert unit.command(UnitVerb.START).ok
    st = wait_status(unit, systemd_ns, lambda s: s.active_state == "failed", "failed")
    assert st.result == "exit-code"
    assert st.exec_main_status == 7

    assert unit.command(UnitVerb.RESET_FAILED).ok
    cleared = unit.status()
    assert cleared.active_state == "inactive"
    assert cleared.result == "success"


@pytest.mark.systemd
def test_restart_on_failure_counts_n_restarts(systemd_ns: SystemdNamespace, unit_name: str) -> None:
    systemd_ns.install_unit(
        unit_name,
        "[Unit]\nStartLimitIntervalSec=0\n"
        "[Service]\nExecStart=/bin/sh -c 'exit 3'\nRestart=on-failure\nRestartSec=1\n",
    )
    unit = adapter(systemd_ns, unit_name)
    assert unit.command(UnitVerb.START).ok
    # Result holds the failed run's outcome while systemd waits to restart (a new run resets it).
    st = wait_status(
        unit,
        systemd_ns,
        lambda s: (s.n_restarts or 0) >= 2 and s.sub_state == "auto-restart",
        "two restarts",
    )
    assert st.n_restarts is not None and st.n_restarts >= 2
    assert st.result == "exit-code"
    assert st.exec_main_status == 3
    assert st.active_state == "activating"
    assert unit.command(UnitVerb.STOP).ok
    # A stopped, unreferenced unit may already be unloaded: resetting it is not an error.
    out = unit.command(UnitVerb.RESET_FAILED)
    assert out.ok, out.detail


@pytest.mark.systemd
def test_journal_returns_the_units_last_lines(systemd_ns: SystemdNamespace, unit_name: str) -> None:
    token = uuid.uuid4().hex
    systemd_ns.install_unit(
        unit_name,
        f"[Service]\nType=oneshot\nExecStart=/bin/sh -c 'for i in 1 2 3 4 5; do echo {token}-$i; "
        "done'\n",
    )
    unit = adapter(systemd_ns, unit_name)
    assert unit.command(UnitVerb.START).ok
    lines: tuple[str, ...] = ()

    def logged() -> bool:
        nonlocal lines
        lines = unit.journal(3)
        return any(f"{token}-5" in line for line in lines)

    systemd_ns.wait_for(logged, what="the unit's output in the journal")
    assert len(lines) == 3
    assert not any(f"{token}-1" in line for line in lines)  # only the last 3
    assert unit.journal(0) == ()


@pytest.mark.systemd
def test_journal_leaves_out_pid1s_notes_on_the_unit_files(
    systemd_ns: SystemdNamespace, unit_name: str
) -> None:
    """systemd 252 logs "Unknown key" for RestartSteps= (systemd >= 254) at every load of the
    unit: such notes on its files are not how it ran, and must not push out its last lines."""
    token = uuid.uuid4().hex
    # PID 1's own messages go to the journal (the harness boots it logging to the console).
    assert systemd_ns.systemctl("log-target", "journal").returncode == 0
    systemd_ns.install_unit(
        unit_name,
        f"[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo {token}'\nNoSuchKey{token[:6]}=1\n",
    )
    unit = adapter(systemd_ns, unit_name)
    assert unit.command(UnitVerb.START).ok
    systemd_ns.wait_for(lambda: any(token in line for line in unit.journal(5)), what="output")
    raw = systemd_ns.journalctl("-q", "_PID=1", f"UNIT={unit_name}").stdout
    assert f"NoSuchKey{token[:6]}" in raw, raw  # PID 1 did log it
    assert not any(f"NoSuchKey{token[:6]}" in line for line in unit.journal(50))


@pytest.mark.systemd
def test_pid1s_notes_cannot_crowd_the_units_last_lines_out(
    systemd_ns: SystemdNamespace, unit_name: str
) -> None:
    """The chaos restart loop's flake: once the unit is stopped, every read of its state loads
    it again, and PID 1 notes each unknown key at each load. More notes than the excerpt has
    lines must still leave the unit's own last line, which says why it exited, in it."""
    token = uuid.uuid4().hex
    assert systemd_ns.systemctl("log-target", "journal").returncode == 0
    systemd_ns.install_unit(
        unit_name,
        f"[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo ERROR: {token} >&2; exit 1'\n"
        f"NoSuchKey{token[:6]}=1\n",
    )
    unit = adapter(systemd_ns, unit_name)
    assert unit.command(UnitVerb.START).ok
    wait_status(unit, systemd_ns, lambda st: st.result == "exit-code", "the unit failed")
    systemd_ns.wait_for(lambda: any(token in line for line in unit.journal(5)), what="output")
    assert systemd_ns.systemctl("reset-failed", unit_name).returncode == 0  # unloadable now
    note = f"NoSuchKey{token[:6]}"

    def notes() -> int:  # each `systemctl show` of the unloaded unit loads it: one note more
        systemd_ns.systemctl("show", "-p", "LoadState", unit_name)
        raw = systemd_ns.journalctl("-q", "-n", "20", "_PID=1", f"UNIT={unit_name}").stdout
        return raw.count(note)

    systemd_ns.wait_for(lambda: notes() >= 20, what="20 of PID 1's notes after the unit's exit")
    # PID 1's last lines are all notes: one window for both would hold nothing else.
    pid1 = systemd_ns.journalctl("-q", "-n", "10", "_PID=1", f"UNIT={unit_name}").stdout
    assert pid1.count(note) == 10, pid1
    lines = unit.journal(10)
    assert any(f"ERROR: {token}" in line for line in lines), lines
    assert not any(note in line for line in lines), lines


@pytest.mark.systemd
def test_command_is_bounded_by_its_timeout(systemd_ns: SystemdNamespace, unit_name: str) -> None:
    systemd_ns.install_unit(
        unit_name,
        "[Service]\nExecStart=/bin/sleep 600\nExecStop=/bin/sleep 30\nTimeoutStopSec=60\n",
    )
    unit = adapter(systemd_ns, unit_name, command_timeout=1.0)
    assert unit.command(UnitVerb.START).ok
    wait_status(unit, systemd_ns, lambda s: s.active_state == "active", "active")
    out = unit.command(UnitVerb.STOP)
    assert not out.ok
    assert not out.refused
    assert "did not return within 1 s" in out.detail
    assert unit.status().active_state == "deactivating"  # the job goes on in systemd
    # The timed-out systemctl was killed, not left waiting inside the namespace.
    procs = systemd_ns.run(["ps", "-eo", "stat,args"]).stdout
    assert f"systemctl stop {unit_name}" not in procs, procs
    systemd_ns.run(["systemctl", "kill", "--signal=SIGKILL", unit_name])
