"""The unit's state over D-Bus (PID 1's private socket) against real systemd, and the fallback to
`systemctl show` when the bus is missing, silent or answers garbage."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.adapters.systemd import BUS_RETRY, PROPERTIES, SystemctlUnit
from hydra_watchdog.adapters.unit_bus import LIVE, UnitBus, as_show_value
from hydra_watchdog.observation import UnitStatus
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]

REPO = Path(__file__).resolve().parents[1]

SLEEPER = "[Service]\nExecStart=/bin/sh -c 'exec sleep 600'\n"
FAILING = (
    "[Unit]\nStartLimitIntervalSec=0\n"
    "[Service]\nExecStart=/bin/sh -c 'exit 3'\nRestart=on-failure\nRestartSec=30\n"
)


@pytest.fixture
def unit_name(systemd_ns: SystemdNamespace) -> Iterator[str]:
    name = f"hb-{uuid.uuid4().hex[:8]}.service"
    yield name
    systemd_ns.reset_unit(name, remove=True)


# PID 1 resets a connection from outside its PID namespace, so the bus is read from inside it,
# as the daemon does on a node: the snippet prints the statuses as JSON for the test to compare.
READ_BOTH = """
import dataclasses, json, sys
from hydra_watchdog.adapters.systemd import SystemctlUnit
unit = sys.argv[1]
shown = SystemctlUnit(unit, bus=False).status()
bus = SystemctlUnit(unit)
print(json.dumps([dataclasses.asdict(bus.status()), dataclasses.asdict(shown)]))
"""


def both(ns: SystemdNamespace, unit: str) -> tuple[UnitStatus, UnitStatus]:
    """The same unit read over the bus and with `systemctl show`, inside the namespace (bus
    last: a state that moved in between shows up as a difference, so callers read settled
    states only)."""
    done = ns.run([ns.interpreter, "-c", READ_BOTH, unit], cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    bus, shown = json.loads(done.stdout)
    return UnitStatus(**bus), UnitStatus(**shown)


def inside(ns: SystemdNamespace, code: str) -> Any:
    done = ns.run([ns.interpreter, "-c", code], cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_but_source(a: UnitStatus, b: UnitStatus) -> bool:
    return dataclasses.replace(a, read_via="") == dataclasses.replace(b, read_via="")


def test_show_values_are_formatted_as_systemctl_prints_them() -> None:
    assert as_show_value(bytes.fromhex("0f" * 16)) == "0f" * 16
    assert as_show_value(b"") == ""  # an unset id128
    assert as_show_value(4294967295) == "4294967295"
    assert as_show_value(True) == "yes"
    assert as_show_value("exit-code") == "exit-code"


@pytest.mark.systemd
def test_bus_and_systemctl_agree_on_every_state(
    systemd_ns: SystemdNamespace, unit_name: str
) -> None:
    absent, shown = both(systemd_ns, "hb-no-such-unit.service")
    assert absent.read_via == "D-Bus"
    assert absent.load_state == "not-found" and not absent.exists
    assert same_but_source(absent, shown), (absent, shown)

    systemd_ns.install_unit(unit_name, SLEEPER)
    inactive, shown = both(systemd_ns, unit_name)
    assert inactive.active_state == "inactive" and inactive.main_pid is None
    assert same_but_source(inactive, shown), (inactive, shown)

    unit = SystemctlUnit(unit_name, argv_prefix=systemd_ns.nsenter, root=systemd_ns.root, bus=False)
    assert unit.command(UnitVerb.START).ok
    systemd_ns.wait_for(lambda: unit.status().sub_state == "running", what="running")
    running, shown = both(systemd_ns, unit_name)
    assert running.read_via == "D-Bus"
    assert running.main_pid is not None and running.main_pid > 1
    assert running.control_group.endswith(f"/system.slice/{unit_name}")
    assert len(running.invocation_id) == 32  # an id128 in hex, as systemctl prints it
    assert running.active_enter_mono is not None
    assert same_but_source(running, shown), (running, shown)
    unit.close()


@pytest.mark.systemd
def test_bus_reads_a_failed_unit_between_restarts(
    systemd_ns: SystemdNamespace, unit_name: str
) -> None:
    systemd_ns.install_unit(unit_name, FAILING)
    unit = SystemctlUnit(unit_name, argv_prefix=systemd_ns.nsenter, root=systemd_ns.root, bus=False)
    assert unit.command(UnitVerb.START).ok
    systemd_ns.wait_for(lambda: unit.status().sub_state == "auto-restart", what="auto-restart")
    st, shown = both(systemd_ns, unit_name)  # RestartSec=30: settled for the two reads
    assert (st.result, st.exec_main_status, st.active_state) == ("exit-code", 3, "activating")
    assert st.n_restarts == 0
    assert same_but_source(st, shown), (st, shown)
    unit.command(UnitVerb.STOP)
    unit.close()


@pytest.mark.systemd
def test_bus_and_systemctl_agree_on_a_queued_job(systemd_ns: SystemdNamespace) -> None:
    """A start job waiting on a dependency: the unit is inactive with a job (what a restart looks
    like between its stop and its start); no job on a unit at rest."""
    dep, waiter = f"hb-dep-{uuid.uuid4().hex[:6]}.service", f"hb-w-{uuid.uuid4().hex[:6]}.service"
    systemd_ns.install_unit(dep, "[Service]\nType=oneshot\nExecStart=/bin/sleep 60\n")
    systemd_ns.install_unit(
        waiter, f"[Unit]\nRequires={dep}\nAfter={dep}\n[Service]\nExecStart=/bin/sleep 600\n"
    )
    try:
        assert systemd_ns.systemctl("start", "--no-block", waiter).returncode == 0
        queued, shown = both(systemd_ns, waiter)
        assert queued.read_via == "D-Bus"
        assert queued.active_state == "inactive" and queued.job_id is not None
        assert same_but_source(queued, shown), (queued, shown)
        rest, _ = both(systemd_ns, "hb-no-such-unit.service")
        assert rest.job_id is None
    finally:
        systemd_ns.reset_unit(waiter, remove=True)
        systemd_ns.reset_unit(dep, remove=True)


@pytest.mark.systemd
def test_one_connection_serves_many_reads(systemd_ns: SystemdNamespace) -> None:
    got = inside(
        systemd_ns,
        """
import json
from hydra_watchdog.adapters.systemd import PROPERTIES
from hydra_watchdog.adapters.unit_bus import UnitBus
bus = UnitBus("hb-no-such-unit.service")
reads = [bus.read(PROPERTIES) for _ in range(20)]
print(json.dumps({"same": all(r == reads[0] for r in reads), "first": reads[0],
                  "kept": bus._sock is not None and bus._sock.fileno() >= 0}))
""",
    )
    assert got["first"]["LoadState"] == "not-found"
    assert set(got["first"]) == set(PROPERTIES)
    assert got["same"] and got["kept"]


# One bus, its calls counted per read, through three changes that leave ActiveState and
# InvocationID as they were: only PID 1's signals can tell the read that anything moved.
WATCH_SIGNALS = """
import json, subprocess
from hydra_watchdog.adapters.systemd import PROPERTIES
from hydra_watchdog.adapters.unit_bus import FULL_READ_EVERY, UnitBus
SLEEPER, WAITER = {sleeper!r}, {waiter!r}
now = [0.0]
asked = []
def counted(bus):
    exchange = bus._exchange
    def spy(sock, calls, deadline):
        asked[-1].append(len(calls))
        return exchange(sock, calls, deadline)
    bus._exchange = spy
    return bus
def read(bus):
    asked.append([])
    return bus.read(PROPERTIES)
def ctl(*args):
    subprocess.run(["systemctl", *args], check=True, capture_output=True)
out = {{}}
sleeper, waiter = counted(UnitBus(SLEEPER, clock=lambda: now[0])), counted(UnitBus(WAITER))
ctl("start", SLEEPER)
first = read(sleeper)
out["steady"] = [read(sleeper) == first for _ in range(3)]
# a daemon-reload that changes User= of the running unit (no state change, no new invocation)
path = f"/etc/systemd/system/{{SLEEPER}}"
with open(path) as f:
    text = f.read()
with open(path, "w") as f:
    f.write(text.replace("[Service]\\n", "[Service]\\nUser=nobody\\n"))
ctl("daemon-reload")
out["user"] = (first["User"], read(sleeper)["User"])
out["after_reload"] = read(sleeper) == read(sleeper)
now[0] += FULL_READ_EVERY
read(sleeper)
# a job queued on an inactive unit (waits on its dependency): only JobNew says so
before = read(waiter)
read(waiter)
ctl("start", "--no-block", WAITER)
queued = read(waiter)
out["job"] = (before["Job"], queued["Job"], before["ActiveState"], queued["ActiveState"])
out["asked"] = asked
print(json.dumps(out))
"""


@pytest.mark.systemd
def test_reads_ask_for_everything_only_when_something_moved(
    systemd_ns: SystemdNamespace, unit_name: str
) -> None:
    """Between changes a read asks PID 1 for ActiveState and InvocationID only, and answers with
    its last full read; a signal about the unit (a daemon-reload, a job), or FULL_READ_EVERY
    gone by, makes the next read a full one, which sees the change."""
    dep, waiter = f"hb-dep-{uuid.uuid4().hex[:6]}.service", f"hb-w-{uuid.uuid4().hex[:6]}.service"
    systemd_ns.install_unit(unit_name, SLEEPER)
    systemd_ns.install_unit(dep, "[Service]\nType=oneshot\nExecStart=/bin/sleep 60\n")
    # Enabled, as TabbyAPI's unit is: an inactive unit nothing refers to is unloaded after each
    # call and loaded again by the next (UnitRemoved, UnitNew), and every read is a full one.
    systemd_ns.install_unit(
        waiter,
        f"[Unit]\nRequires={dep}\nAfter={dep}\n[Service]\nExecStart=/bin/sleep 600\n"
        "[Install]\nWantedBy=multi-user.target\n",
    )
    assert systemd_ns.systemctl("enable", waiter).returncode == 0
    try:
        got = inside(systemd_ns, WATCH_SIGNALS.format(sleeper=unit_name, waiter=waiter))
    finally:
        systemd_ns.systemctl("disable", waiter)
        systemd_ns.reset_unit(waiter, remove=True)
        systemd_ns.reset_unit(dep, remove=True)
    full, live = len(PROPERTIES), len(LIVE)
    asked = got["asked"]
    # the sleeper: a full read, then three that ask for the live pair only
    assert asked[0][-1] == full and asked[1:4] == [[live]] * 3, asked
    assert all(got["steady"])
    # a daemon-reload: its Reloading signal makes the next read a full one, with the new User=
    assert got["user"] == ["", "nobody"]
    assert asked[4] == [live, full], asked
    assert got["after_reload"]
    # FULL_READ_EVERY gone by: a full read without a signal
    assert asked[7] == [full], asked
    # the waiter: the job is seen on the very next read, the state being the same
    assert got["job"][0] == "" and got["job"][1] != ""
    assert got["job"][2] == got["job"][3] == "inactive"
    assert asked[9] == [live] and asked[10] == [live, full], asked


class FakeBus:
    """A unix socket where PID 1's private socket would be. `mode`: "silent" (accepts, never
    answers), "rejected" (refuses the authentication), "garbage" (accepts the authentication,
    then answers the call with bytes that are not D-Bus). Counts the connections it accepts."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.accepted = 0
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self.held.append(conn)  # held open until close()
            if self.mode == "silent":
                continue
            conn.settimeout(2.0)
            with contextlib.suppress(OSError):
                while b"\r\n" not in conn.recv(4096):  # the NUL byte and the AUTH line
                    pass
                if self.mode == "rejected":
                    conn.sendall(b"REJECTED EXTERNAL\r\n")
                    continue
                conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
                conn.recv(4096)  # BEGIN and the first call
                conn.sendall(b"\xff" * 4096)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.server.close()


@pytest.mark.systemd
@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("silent", "cannot connect"),
        ("garbage", "unreadable answer"),
        ("rejected", "authentication failed"),
    ],
)
def test_a_failing_bus_falls_back_to_systemctl_and_is_retried_later(
    systemd_ns: SystemdNamespace,
    unit_name: str,
    tmp_path: Path,
    mode: str,
    why: str,
) -> None:
    systemd_ns.install_unit(unit_name, SLEEPER)
    fake = FakeBus(tmp_path / "private", mode)
    now = [1000.0]
    unit = SystemctlUnit(
        unit_name,
        argv_prefix=systemd_ns.nsenter,
        root=systemd_ns.root,
        bus=UnitBus(unit_name, path=str(fake.path), timeout=0.5),
        clock=lambda: now[0],
    )
    try:
        st = unit.status()
        # The state is still read, by systemctl, and says why the bus was not used.
        assert st.available and st.load_state == "loaded" and st.active_state == "inactive"
        assert st.read_via.startswith("systemctl (D-Bus "), st.read_via
        assert why in st.read_via, st.read_via
        assert len(st.read_via) < 300  # what the peer sent is not quoted at length
        assert fake.accepted == 1
        # Within BUS_RETRY the bus is not asked again: a hung bus costs one deadline.
        now[0] += BUS_RETRY / 2
        assert unit.status().read_via.startswith("systemctl (D-Bus ")
        assert fake.accepted == 1
        now[0] += BUS_RETRY
        unit.status()
        assert fake.accepted == 2
    finally:
        unit.close()
        fake.close()


@pytest.mark.systemd
def test_the_bus_comes_back_after_a_failure(systemd_ns: SystemdNamespace) -> None:
    """A socket path that is missing, then PID 1's: the read moves back to D-Bus."""
    missing, back = (
        UnitStatus(**st)
        for st in inside(
            systemd_ns,
            """
import dataclasses, json, os, tempfile
from hydra_watchdog.adapters.systemd import BUS_RETRY, SystemctlUnit
from hydra_watchdog.adapters.unit_bus import UnitBus
link = os.path.join(tempfile.mkdtemp(), "private")
now = [0.0]
name = "hb-no-such-unit.service"
unit = SystemctlUnit(name, bus=UnitBus(name, path=link), clock=lambda: now[0])
missing = unit.status()
os.symlink("/run/systemd/private", link)
now[0] += BUS_RETRY
print(json.dumps([dataclasses.asdict(missing), dataclasses.asdict(unit.status())]))
""",
        )
    )
    assert missing.read_via.startswith("systemctl (D-Bus "), missing.read_via
    assert "No such file" in missing.read_via
    assert missing.load_state == "not-found"
    assert back.read_via == "D-Bus"
    assert same_but_source(back, missing)
