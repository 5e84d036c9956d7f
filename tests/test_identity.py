"""Identity before trust: the admin key goes only to a listener verified as TabbyAPI, and only
TabbyAPI's own programs count as its orphans. Against real processes: the simulator run from its
install tree, and an unprivileged local user (uid 65534 via setpriv) who squats the port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.act.orphans import kill_orphan
from hydra_watchdog.actions import KillOrphan, Reason, ResultStatus
from hydra_watchdog.adapters import identity
from hydra_watchdog.adapters.identity import (
    ListenerCheck,
    ListenSocket,
    ProcIdentity,
    is_tabby_program,
    program,
    read_identity,
    within,
)
from hydra_watchdog.adapters.process_control import PidfdControl
from hydra_watchdog.adapters.procs import RESCAN_EVERY, ProcScanner
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import OrphansSection, parse_config
from hydra_watchdog.observation import GpuReport, Outcome, ProcessRole, UnitStatus
from hydra_watchdog.sim.install import lay_out
from hydra_watchdog.states import Rule
from tests.harness.adversary import (
    KEEPER,
    SQUATTER,
    SYSTEM_PYTHON,
    Squatter,
    as_nobody,
    public_dir,
)
from tests.harness.systemd_ns import SystemdNamespace
from tests.harness.tabby import ADMIN_KEY, TabbySims, free_port, wait_for

pytest_plugins = ["tests.harness.systemd_fixtures"]

NO_SYSTEMD = UnitStatus(name="tabbyapi.service", available=False, detail="no systemd here")


def _unit(
    main_pid: int | None, cgroup: str = "/system.slice/tabbyapi.service", program: str = ""
) -> UnitStatus:
    """The unit's status; `program`: the script its ExecStart= runs with this interpreter."""
    return UnitStatus(
        name="tabbyapi.service",
        available=True,
        load_state="loaded",
        active_state="activating" if main_pid else "failed",
        main_pid=main_pid,
        control_group=cgroup if main_pid else "",
        exec_path=sys.executable if program else "",
        exec_argv=(sys.executable, program) if program else (),
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin_key"
    path.write_text(ADMIN_KEY + "\n")
    return path


def _client(url: str, key_file: Path, install: Path | str, user: str = "root") -> TabbyClient:
    cfg = parse_config(
        {
            "tabbyapi": {
                "url": url,
                "admin_key_file": str(key_file),
                "cmdline_patterns": [str(install)],
                "user": user,
                "health_timeout": "3s",
            }
        }
    )
    return TabbyClient.from_config(cfg)


def _assert_no_key(squatter: Squatter) -> None:
    """Nothing reached the squatter: no key, and no request at all (not even /health, whose
    answer would be its say on TabbyAPI's health)."""
    squatter.stop()
    text = squatter.transcript()
    assert ADMIN_KEY not in text
    assert "authorization" not in text.lower()
    assert squatter.requests() == [], text


# --- the credential gate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit",
    [NO_SYSTEMD, _unit(None), _unit(1)],  # no systemd; the unit down; up, but not the holder
    ids=["no-systemd", "unit-down", "unit-up-elsewhere"],
)
def test_a_squatter_gets_no_key_and_no_say(
    unit: UnitStatus, key_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    client = _client(f"http://127.0.0.1:{port}", key_file, tmp_path / "tabbyapi")
    with Squatter.start("127.0.0.1", port) as squatter:
        client.note_unit(unit)
        health = client.health()  # no key, but its answer would be the squatter's say
        model = client.model()
        canary = client.canary(2.0)
        load = client.load_model(
            "m1", timeout=2.0, on_progress=lambda *_: None, cancel=threading.Event()
        )
        client.close()
        _assert_no_key(squatter)
    assert not health.healthy and health.result.outcome is Outcome.WITHHELD, health
    assert f"held by pid {squatter.pid}, uid 65534" in health.result.detail
    assert health.result.detail.endswith(": not TabbyAPI")  # /health carries no key to withhold
    for result in (model.result, canary.result):
        assert result.outcome is Outcome.WITHHELD
        assert f"held by pid {squatter.pid}, uid 65534" in result.detail
        assert "not TabbyAPI; admin key withheld" in result.detail
    assert not model.known
    assert not load.ok and load.detail.startswith("load not sent:")


def test_a_main_pid_come_round_to_a_squatter_gets_no_key(key_file: Path, tmp_path: Path) -> None:
    """A unit status read a while ago (a load's helper reads it once) names a MainPID that now
    belongs to a squatter: PIDs come round again, the unit's cgroup does not. Outside it, the
    holder is not TabbyAPI, whatever its PID."""
    port = free_port()
    client = _client(f"http://127.0.0.1:{port}", key_file, tmp_path / "tabbyapi")
    with Squatter.start("127.0.0.1", port) as squatter:
        client.note_unit(_unit(squatter.pid))
        model = client.model().result
        client.close()
        _assert_no_key(squatter)
    assert model.outcome is Outcome.WITHHELD, model
    assert f"held by pid {squatter.pid}, uid 65534" in model.detail
    assert "not in tabbyapi.service" in model.detail


def test_the_key_goes_to_tabbyapi_verified_by_identity(
    tabby_sim: TabbySims, key_file: Path
) -> None:
    sim = tabby_sim.start(startup_model="m1")  # auth on: /v1/model answers 200 only with the key
    client = _client(sim.url, key_file, sim.install_dir)
    client.note_unit(NO_SYSTEMD)
    try:
        model = client.model()
        assert model.result.outcome is Outcome.OK and model.loaded == "m1", model.result
        # The same program run as another user than tabbyapi.user is not TabbyAPI.
        strict = _client(sim.url, key_file, sim.install_dir, user="65534")
        strict.note_unit(NO_SYSTEMD)
        withheld = strict.model().result
        strict.close()
        assert withheld.outcome is Outcome.WITHHELD
        assert f"pid {sim.proc.pid}, uid 0" in withheld.detail
        # A command line that only mentions the install tree is no identity either.
        elsewhere = _client(sim.url, key_file, sim.models_dir)
        elsewhere.note_unit(NO_SYSTEMD)
        assert elsewhere.model().result.outcome is Outcome.WITHHELD
        elsewhere.close()
    finally:
        client.close()
    assert sum(1 for r in sim.requests() if r["path"] == "/v1/model") == 1


def test_the_key_goes_to_the_units_main_process(tabby_sim: TabbySims, key_file: Path) -> None:
    sim = tabby_sim.start(startup_model="m1")
    # An install tree the simulator is not in: only the unit can vouch for it.
    client = _client(sim.url, key_file, "/nonexistent/tabbyapi")
    try:
        client.note_unit(_unit(sim.proc.pid, cgroup=""))
        assert client.model().loaded == "m1"
        client.note_unit(_unit(os.getpid()))
        withheld = client.model().result
        assert withheld.outcome is Outcome.WITHHELD
        assert "not in tabbyapi.service" in withheld.detail
    finally:
        client.close()


def test_a_verdict_is_reused_only_while_its_listener_is_the_same(
    tabby_sim: TabbySims, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate reuses a verdict while nothing it rested on changed (identity._Vouched). Here the
    unit status does not change at all (a stale read: no systemd), TabbyAPI exits and a squatter
    binds its port: its socket and its process are new, so it is judged afresh and gets nothing."""
    identities: list[int] = []  # the holders whose identity the gate read from /proc

    def read_identity_seen(pid: int, proc_root: str = "/proc") -> ProcIdentity | None:
        identities.append(pid)
        return read_identity(pid, proc_root)

    monkeypatch.setattr(identity, "read_identity", read_identity_seen)
    sim = tabby_sim.start(startup_model="m1")
    client = _client(sim.url, key_file, sim.install_dir)
    client.note_unit(NO_SYSTEMD)
    try:
        assert client.model().loaded == "m1"
        assert client.model().loaded == "m1"
        assert identities == [sim.proc.pid]  # the same listener: verified once, sent twice

        # Counted before the stop: the simulator logs a request after its answer is sent, and a
        # SIGTERM right after the second answer could take the line with it (CI saw 1 of 2).
        def models() -> int:
            return sum(1 for r in sim.requests() if r["path"] == "/v1/model")

        wait_for(lambda: models() == 2, 10, "both /v1/model requests logged by TabbyAPI")
        sim.stop()
        with Squatter.start("127.0.0.1", sim.port) as squatter:
            withheld = client.model().result
            canary = client.canary(2.0).result
            _assert_no_key(squatter)
    finally:
        client.close()
    for result in (withheld, canary):
        assert result.outcome is Outcome.WITHHELD, result
        assert f"held by pid {squatter.pid}, uid 65534" in result.detail
    assert not squatter.requests()
    assert identities == [sim.proc.pid, squatter.pid, squatter.pid]
    assert models() == 2


def test_a_squatters_kept_connection_gets_no_say_and_no_key(
    tabby_sim: TabbySims, key_file: Path
) -> None:
    """Issue 22 item 1, at the client: TabbyAPI restarts, a uid 65534 squatter takes the free
    port, gets the next /health's connection, lets go of the port and keeps the connection;
    TabbyAPI takes its port back. Every connection is vetted once made (the listener and its
    far end): the squatter's is closed before a byte goes over it, so its sticky 503 is never
    read (WITHHELD: no evidence), and every later request, /health and keyed alike, reaches the
    new TabbyAPI."""
    first = tabby_sim.start(startup_model="m1")
    port = first.port
    # both simulators' install trees (sim0/tabbyapi, sim1/tabbyapi) are TabbyAPI's
    client = _client(f"http://127.0.0.1:{port}", key_file, tabby_sim.tmp)
    client.note_unit(NO_SYSTEMD)
    try:
        assert client.health().healthy  # a kept-alive connection to the first TabbyAPI
        first.stop()
        with Squatter.start("127.0.0.1", port, source=KEEPER, args=("10",)) as squatter:
            taken = client.health()  # the kept connection is gone: a new one, to the squatter
            wait_for(lambda: "released" in squatter.transcript(), 10, "the port let go")
            gone = client.health()  # nobody listens: the kernel refuses
            sim = tabby_sim.start(startup_model="m1", port=port)
            assert sim.port == port
            healthy = [client.health() for _ in range(3)]
            model = client.model()
            canary = client.canary(5.0)
            _assert_no_key(squatter)
    finally:
        client.close()
    assert taken.result.outcome is Outcome.WITHHELD, taken.result
    # the gate named the squatter, or (it let go of the port first) the connection's far end
    assert "uid 65534" in taken.result.detail, taken.result
    assert (gone.result.outcome, gone.healthy) == (Outcome.REFUSED, False), gone.result
    assert all(h.healthy for h in healthy), healthy
    assert model.loaded == "m1", model.result
    assert canary.result.outcome is Outcome.OK, canary.result
    assert [r["path"] for r in sim.requests()].count("/health") == 3


def _connected(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=5)


def test_the_far_end_of_a_connection_names_its_listeners_user() -> None:
    """far_end_uid: the socket the kernel made for our connection from a listener has that
    listener's uid, by sock_diag and by /proc/net alike; a dual-stack listener's end (v4-mapped)
    is found too; a connection that is gone has no far end to vouch for it."""
    port = free_port()
    with Squatter.start("127.0.0.1", port) as squatter:
        theirs = _connected("127.0.0.1", port)
        try:
            local, peer = theirs.getsockname(), theirs.getpeername()
            assert identity.far_end_uid(theirs) == 65534
            assert identity._far_end_proc_net(local, peer) == 65534
        finally:
            theirs.close()
        squatter.stop()
    for host, family in (("127.0.0.1", socket.AF_INET), ("::", socket.AF_INET6)):
        with socket.socket(family) as listener:
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((host, 0))
            listener.listen(4)
            ours = _connected("127.0.0.1", listener.getsockname()[1])
            try:
                local, peer = ours.getsockname(), ours.getpeername()
                assert identity.far_end_uid(ours) == os.geteuid(), host
                assert identity._far_end_proc_net(local, peer) == os.geteuid(), host
            finally:
                ours.close()
    gone = socket.socket()
    assert identity.far_end_uid(gone) is None  # never connected
    gone.close()


def test_a_connection_that_reached_another_users_listener_carries_no_key(key_file: Path) -> None:
    """The gate's verdict names TabbyAPI's sockets (uid 0) and is the same before and after the
    connection, yet the connection reached a uid 65534 listener (what a bind race, or a
    wildcard IPv6 socket that takes no IPv4, would allow): its far end says so, and nothing is
    sent over it."""
    port = free_port()
    tabby = ListenSocket(inode=1, port=port, address="127.0.0.1", uid=0, cookie=7)
    verdict = ListenerCheck(True, "verified", address="127.0.0.1", sockets=(tabby,))
    client = TabbyClient(
        f"http://127.0.0.1:{port}", admin_key=ADMIN_KEY, health_timeout=3.0, gate=lambda: verdict
    )
    with Squatter.start("127.0.0.1", port) as squatter:
        try:
            model = client.model().result
            canary = client.canary(3.0).result
        finally:
            client.close()
        squatter.stop()
    for result in (model, canary):
        assert result.outcome is Outcome.WITHHELD, result
        assert "the far end of the new connection belongs to uid 65534, not [0]" in result.detail
    assert ADMIN_KEY not in squatter.transcript()
    assert "GET /v1/model" not in squatter.transcript()


FORKING_LISTENER = """
import os, socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
child = os.fork()
if child:
    print(child, flush=True)
    os._exit(0)
time.sleep(120)
"""


def test_a_vouched_socket_held_by_another_process_is_judged_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same listening socket, but its verified holder gone and a forked child holding it:
    the reused verdict rested on that holder, so the gate verifies the child before trusting."""
    identities: list[int] = []

    def read_identity_seen(pid: int, proc_root: str = "/proc") -> ProcIdentity | None:
        identities.append(pid)
        return read_identity(pid, proc_root)

    monkeypatch.setattr(identity, "read_identity", read_identity_seen)
    install = tmp_path / "tabbyapi"
    install.mkdir()
    (install / "main.py").write_text(FORKING_LISTENER)
    proc = subprocess.Popen(
        [sys.executable, str(install / "main.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    child = 0
    try:
        port = int(proc.stdout.readline())
        gate = identity.ListenerGate("127.0.0.1", port, install_dirs=[str(install)], user="root")
        gate.set_unit(NO_SYSTEMD)
        first, second = gate.check(), gate.check()
        assert first.ok and second.ok and second.pid == proc.pid, (first, second)
        assert identities == [proc.pid]  # the second check reused the verdict
        proc.stdin.write("fork\n")
        proc.stdin.flush()
        child = int(proc.stdout.readline())
        assert proc.wait(5) == 0
        moved = gate.check()
        assert moved.ok and moved.pid == child, moved  # TabbyAPI's own child: still TabbyAPI
        assert identities == [proc.pid, child]
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait(5)


def test_nothing_is_sent_before_the_unit_was_read(tabby_sim: TabbySims, key_file: Path) -> None:
    sim = tabby_sim.start(startup_model="m1")
    client = _client(sim.url, key_file, sim.install_dir)
    try:
        result = client.model().result
    finally:
        client.close()
    assert result.outcome is Outcome.WITHHELD and "not read yet" in result.detail
    assert not [r for r in sim.requests() if r["path"] == "/v1/model"]


def test_nothing_listening_means_nothing_sent(key_file: Path, tmp_path: Path) -> None:
    client = _client(f"http://127.0.0.1:{free_port()}", key_file, tmp_path)
    client.note_unit(NO_SYSTEMD)
    try:
        result = client.model().result
    finally:
        client.close()
    assert result.outcome is Outcome.REFUSED and "nothing listens" in result.detail


def test_the_configured_users_own_tabbyapi_is_verified(key_file: Path) -> None:
    """The uid rule decides, not the program alone: the same listener from the install tree is
    refused as another user's and trusted as tabbyapi.user's own."""
    port = free_port()
    with public_dir() as tree:
        install = tree / "tabbyapi"
        install.mkdir()
        (install / "main.py").write_text(SQUATTER)
        install.chmod(0o755)
        with Squatter.start("127.0.0.1", port, script=install / "main.py") as squatter:
            root_cfg = _client(f"http://127.0.0.1:{port}", key_file, install)
            root_cfg.note_unit(NO_SYSTEMD)
            refused = root_cfg.model().result
            root_cfg.close()
            assert refused.outcome is Outcome.WITHHELD, refused
            nobody_cfg = _client(f"http://127.0.0.1:{port}", key_file, install, user="nobody")
            nobody_cfg.note_unit(NO_SYSTEMD)
            trusted = nobody_cfg.model()
            nobody_cfg.close()
            squatter.stop()
    assert trusted.result.outcome is Outcome.OK and trusted.loaded == "m1"
    authorized = [r for r in squatter.requests() if f"Bearer {ADMIN_KEY}" in r]
    assert len(authorized) == 1 and authorized[0].startswith("REQUEST GET /v1/model ")


def test_localhost_is_pinned_to_the_verified_address(tabby_sim: TabbySims, key_file: Path) -> None:
    """TabbyAPI on 127.0.0.1, a squatter on [::1] of the same port: `localhost` never reaches
    the squatter, whatever the resolver prefers."""
    sim = tabby_sim.start(startup_model="m1")
    with Squatter.start("::1", sim.port) as squatter:
        client = _client(f"http://localhost:{sim.port}", key_file, sim.install_dir)
        client.note_unit(NO_SYSTEMD)
        try:
            assert client.model().loaded == "m1"
            assert client.canary(5.0).result.outcome is Outcome.OK
        finally:
            client.close()
        squatter.stop()
    assert squatter.requests() == []


def test_localhost_squatted_on_ipv4_is_withheld(key_file: Path, tmp_path: Path) -> None:
    port = free_port()
    with Squatter.start("127.0.0.1", port) as squatter:
        client = _client(f"http://localhost:{port}", key_file, tmp_path)
        client.note_unit(NO_SYSTEMD)
        result = client.model().result
        client.close()
        _assert_no_key(squatter)
    assert result.outcome is Outcome.WITHHELD


# --- orphans: TabbyAPI's program, TabbyAPI's uid, our PID namespace ------------------------------

LISTEN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("ready", flush=True)
time.sleep(600)
"""


class Started:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def run(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "ready", line + proc.stdout.read()
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def started() -> Iterator[Started]:
    s = Started()
    yield s
    s.close()


def _free_pair() -> int:
    for _ in range(50):
        port = free_port()
        if free_port() != port + 1:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no free port pair")


def _roles(scanner: ProcScanner, unit: UnitStatus) -> dict[int, ProcessRole]:
    _, found = scanner.scan(unit, GpuReport(), full=True)
    return {p.pid: p.role for p in found}


def test_a_mention_of_the_install_tree_is_not_an_orphan(started: Started) -> None:
    """Another job whose arguments name /opt/tabbyapi-shared/... (and even the install tree's
    own main.py) holds the port: foreign, whatever a substring match would say."""
    port = _free_pair()
    with public_dir() as tree:
        install = tree / "opt" / "tabbyapi"
        install.mkdir(parents=True)
        lay_out(install)
        job = started.run(
            [
                sys.executable,
                "-c",
                LISTEN,
                str(port),
                f"{tree}/opt/tabbyapi-shared/eval.jsonl",
                f"{install}/main.py",
            ]
        )
        scanner = ProcScanner(port, [str(install)])
        roles = _roles(scanner, _unit(1, program=f"{install}/main.py"))
    assert roles[job.pid] is ProcessRole.FOREIGN


def test_another_users_tabbyapi_and_a_contained_one_are_foreign(started: Started) -> None:
    port = _free_pair()
    with public_dir() as tree:
        install = tree / "tabbyapi"
        install.mkdir()
        (install / "server.py").write_text(LISTEN)
        ours = started.run([SYSTEM_PYTHON, str(install / "server.py"), "0"])
        theirs = started.run(as_nobody([SYSTEM_PYTHON, str(install / "server.py"), str(port + 1)]))
        contained = started.run(
            ["unshare", "--pid", "--fork", SYSTEM_PYTHON, str(install / "server.py"), str(port)]
        )
        scanner = ProcScanner(port, [str(install)])
        _, found = scanner.scan(
            _unit(1, program=str(install / "server.py")), GpuReport(), full=True
        )
        by_pid = {p.pid: p for p in found}
        # the contained TabbyAPI is unshare's child, in a PID namespace of its own
        inner = next(p for p in found if p.listens_on == (port,))
        inner_ident = read_identity(inner.pid)
        assert inner_ident is not None and inner.pid != contained.pid
        action = KillOrphan(
            inner.pid,
            inner_ident.start_ticks,
            inner_ident.cmdline,
            inner_ident.uid,
            Reason(Rule.ORPHAN_CLEANUP, "test"),
        )
        refused = kill_orphan(
            action,
            OrphansSection(term_grace=0.1),
            unit="tabbyapi.service",
            processes=PidfdControl(),
        )
    assert by_pid[theirs.pid].role is ProcessRole.FOREIGN
    assert by_pid[theirs.pid].uid == 65534
    assert inner.role is ProcessRole.FOREIGN
    assert (refused.status, refused.error_kind) == (ResultStatus.REFUSED, "identity_changed")
    assert "another PID namespace" in refused.detail
    mine = read_identity(os.getpid())
    assert mine is not None and inner_ident.pid_ns != mine.pid_ns
    assert ours.pid not in by_pid or by_pid[ours.pid].role is ProcessRole.ORPHAN
    assert read_identity(inner.pid) is not None  # never signalled: still alive


def test_command_lines_are_read_for_new_processes_and_all_again_every_rescan(
    started: Started, tmp_path: Path
) -> None:
    """An orphan that holds nothing is a candidate by its command line alone. A process seen
    for the first time is read at once; one seen before is read again only at the next rescan
    (RESCAN_EVERY): so a process that became TabbyAPI's program by exec, after it was first
    seen, is reported from the rescan on, not before."""
    port = _free_pair()
    install = tmp_path / "tabbyapi"
    install.mkdir()
    (install / "server.py").write_text(LISTEN)
    now = [0.0]
    scanner = ProcScanner(port, [str(install)], clock=lambda: now[0])
    unit = _unit(1, program=str(install / "server.py"))

    def orphans() -> set[int]:
        _, found = scanner.scan(unit, GpuReport(), full=False)
        return {p.pid for p in found if p.role is ProcessRole.ORPHAN}

    assert orphans() == set()
    new = started.run([sys.executable, str(install / "server.py"), "0"])  # port 0: holds nothing
    assert orphans() == {new.pid}  # first seen: read at once
    # The path reaches the shell on stdin: its command line never names the install tree.
    late = subprocess.Popen(
        ["sh", "-c", f'echo ready; read path; exec {sys.executable} "$path" 0'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started.procs.append(late)
    assert late.stdin is not None and late.stdout is not None
    assert late.stdout.readline().strip() == "ready"
    assert orphans() == {new.pid}  # seen as the shell
    late.stdin.write(f"{install / 'server.py'}\n")
    late.stdin.flush()
    assert late.stdout.readline().strip() == "ready"  # the same pid runs server.py now
    assert orphans() == {new.pid}
    now[0] += RESCAN_EVERY
    assert orphans() == {new.pid, late.pid}


def test_a_real_orphan_from_the_install_tree_is_found_and_killed(
    started: Started, tmp_path: Path
) -> None:
    port = _free_pair()
    install = tmp_path / "tabbyapi"
    install.mkdir()
    (install / "server.py").write_text(LISTEN)
    orphan = started.run([sys.executable, str(install / "server.py"), str(port)])
    scanner = ProcScanner(port, [str(install)])
    _, found = scanner.scan(_unit(1, program=str(install / "server.py")), GpuReport(), full=False)
    info = next(p for p in found if p.pid == orphan.pid)
    assert info.role is ProcessRole.ORPHAN and info.uid == os.getuid()
    action = KillOrphan(
        info.pid, info.start_ticks, info.cmdline, info.uid, Reason(Rule.ORPHAN_CLEANUP, "t")
    )
    result = kill_orphan(
        action, OrphansSection(term_grace=2.0), unit="tabbyapi.service", processes=PidfdControl()
    )
    assert result.status is ResultStatus.OK, result.detail
    wait_for(lambda: orphan.poll() is not None, 10, "the orphan to be reaped")
    assert orphan.returncode == -signal.SIGTERM


def test_a_kill_refuses_another_user_even_with_matching_ticks(started: Started) -> None:
    with public_dir() as tree:
        (tree / "server.py").write_text(LISTEN)
        theirs = started.run(as_nobody([SYSTEM_PYTHON, str(tree / "server.py"), "0"]))
        ident = read_identity(theirs.pid)
        assert ident is not None
        forged = KillOrphan(
            theirs.pid, ident.start_ticks, ident.cmdline, 0, Reason(Rule.ORPHAN_CLEANUP, "t")
        )
        result = kill_orphan(
            forged,
            OrphansSection(term_grace=0.1),
            unit="tabbyapi.service",
            processes=PidfdControl(),
        )
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "identity_changed")
    time.sleep(0.2)
    assert theirs.poll() is None


# --- the rules, on their own ---------------------------------------------------------------------


def _ident(
    cmdline: tuple[str, ...], exe: str = "/usr/bin/python3.11", cwd: str = "/"
) -> ProcIdentity:
    return ProcIdentity(1, 0, 0, 1, cmdline, exe, cwd, "pid:[1]", ())


def test_read_bytes_reads_a_whole_file_up_to_its_limit(tmp_path: Path) -> None:
    """read_bytes reads in steps (no buffer of `limit` bytes per /proc file): a file over several
    steps comes back whole, a limit cuts it, a missing one is None."""
    data = bytes(range(256)) * 1000  # 256 000 bytes: a page, then several 64 KiB reads
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert identity.read_bytes(str(path)) == data
    assert identity.read_bytes(str(path), 5000) == data[:5000]
    assert identity.read_bytes(str(path), 0) == b""
    assert identity.read_bytes(str(tmp_path / "missing")) is None
    assert identity.read_bytes(str(tmp_path)) is None  # a directory: EISDIR on read
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        cmdline = f.read()
    assert identity.read_bytes(f"/proc/{os.getpid()}/cmdline") == cmdline


def test_install_tree_is_matched_by_whole_path_components() -> None:
    assert within("/opt/tabbyapi/main.py", ["/opt/tabbyapi"])
    assert within("/opt/tabbyapi", ["/opt/tabbyapi/"])
    assert not within("/opt/tabbyapi-shared/eval.jsonl", ["/opt/tabbyapi"])
    assert not within("/opt/tabbyapi/../tabbyapi-shared/x", ["/opt/tabbyapi"])
    assert not within("relative/opt/tabbyapi", ["/opt/tabbyapi"])


def test_program_is_the_script_not_the_arguments() -> None:
    venv = ("/opt/tabbyapi/venv/bin/python", "main.py", "--port", "5000")
    assert is_tabby_program(_ident(venv, cwd="/opt/tabbyapi"), ["/opt/tabbyapi"])
    relative = ("python3", "-u", "main.py")
    assert program(_ident(relative, cwd="/opt/tabbyapi")) == "/opt/tabbyapi/main.py"
    inline = ("python3", "-c", "pass", "/opt/tabbyapi/main.py")
    assert not is_tabby_program(_ident(inline), ["/opt/tabbyapi"])
    module = ("python3", "-m", "http.server", "/opt/tabbyapi/main.py")
    assert not is_tabby_program(_ident(module), ["/opt/tabbyapi"])
    data = ("python3", "/srv/eval.py", "/opt/tabbyapi/main.py")
    assert not is_tabby_program(_ident(data), ["/opt/tabbyapi"])


def test_the_sim_install_tree_really_runs_the_simulator(tmp_path: Path) -> None:
    """lay_out() is what the demo, the tests and the benchmarks run TabbyAPI from."""
    argv = lay_out(tmp_path / "tabbyapi")
    out = subprocess.run([*argv, "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--models-dir" in out.stdout, out.stderr
    assert shutil.which("setpriv") and Path(SYSTEM_PYTHON).exists()  # the adversary's tools


# --- under real systemd: the unit's cgroup vouches, nothing else does ----------------------------

GATE_INSIDE = """
import json, sys
from hydra_watchdog.adapters.identity import ListenerGate
from hydra_watchdog.adapters.systemd import SystemctlUnit
unit, port = json.load(sys.stdin)
gate = ListenerGate("127.0.0.1", port, install_dirs=["/nonexistent"], user="root")
gate.set_unit(SystemctlUnit(unit).status())
check = gate.check()
print(json.dumps({"ok": check.ok, "detail": check.detail, "address": check.address}))
"""


@pytest.mark.systemd
def test_gate_under_real_systemd(systemd_ns: SystemdNamespace) -> None:
    ns = systemd_ns
    tag = uuid.uuid4().hex[:8]
    tabby, squat = f"hw-gate-tabby-{tag}.service", f"hw-gate-squat-{tag}.service"
    port = 5400
    ns.write_file("/tmp/hw-gate.py", GATE_INSIDE)
    ns.write_file(f"/opt/hw-gate-{tag}/listen.py", LISTEN)
    listen = f"{SYSTEM_PYTHON} /opt/hw-gate-{tag}/listen.py {port}"
    ns.install_unit(tabby, f"[Service]\nExecStart={listen}\n")
    ns.install_unit(squat, f"[Service]\nUser=nobody\nExecStart={listen}\n")

    def gate() -> dict[str, Any]:
        out = ns.run(
            [sys.executable, "/tmp/hw-gate.py"],
            input=json.dumps([tabby, port]),
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        assert out.returncode == 0, out.stderr
        parsed: dict[str, Any] = json.loads(out.stdout)
        return parsed

    verdict: dict[str, Any] = {}
    try:
        assert ns.systemctl("start", tabby).returncode == 0

        def verified() -> bool:
            nonlocal verdict
            verdict = gate()
            return bool(verdict["ok"])

        ns.wait_for(verified, what=lambda: f"TabbyAPI's unit verified ({verdict})")
        assert verdict["address"] == "127.0.0.1"

        assert ns.systemctl("stop", tabby).returncode == 0
        assert ns.systemctl("start", squat).returncode == 0

        def withheld() -> bool:
            nonlocal verdict
            verdict = gate()
            return "uid 65534" in verdict["detail"]

        ns.wait_for(withheld, what=lambda: f"the squatter seen ({verdict})")
        assert not verdict["ok"]
        assert f"not in {tabby}" in verdict["detail"]
        assert verdict["detail"].endswith("): not TabbyAPI")  # the caller says what it withheld
    finally:
        ns.reset_unit(squat, remove=True)
        ns.reset_unit(tabby, remove=True)
