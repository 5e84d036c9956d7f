# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""The daemon end to end, as a subprocess, against the simulated node.

The daemon is the real `run_daemon` with the real adapters (TabbyAPI client over HTTP, NVML
through pynvml and the simulated library, /proc scanner, host checks). Only the unit manager is
the demo's stand-in (hydra_watchdog.sim.unit.SimUnit), because this machine has no systemd as
PID 1: it runs the TabbyAPI simulator as a real process with Restart=on-failure semantics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.config import Config, load_config, parse_config
from hydra_watchdog.daemon import CONFIRM_DELAY, Daemon, build_adapters, next_cycle_delay
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.sdnotify import Notifier
from hydra_watchdog.report.status import from_json
from hydra_watchdog.sim.install import lay_out
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import ADMIN_KEY, API_KEY, free_port, make_model, wait_for

pytestmark = pytest.mark.slow
WAIT = 60.0  # generous: two cores shared with other test runs

_RUNNER = """
import dataclasses, json, sys
from pathlib import Path
from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.daemon import build_adapters, run_daemon
from hydra_watchdog.sim.unit import SimUnit
from tests.harness.hooked_hydra_watchdog import hang_while

spec = json.loads(sys.argv[1])
units = []

def factory(cfg):
    real = build_adapters(cfg)
    if spec["sim_argv"] is None:  # no unit at all: systemd is not PID 1 here
        return real
    if not units:  # one stand-in unit for the daemon's life, also across SIGHUP reloads
        units.append(SimUnit(cfg.tabbyapi.unit, spec["sim_argv"],
                             log_path=Path(spec["unit_log"]), restart_sec=0.3))
        if spec["start_unit"]:
            units[0].command(UnitVerb.START)
    return dataclasses.replace(real, units=units[0])

try:
    hang = spec["hang_file"]
    code = run_daemon(spec["config"], dry_run=spec["dry_run"], adapter_factory=factory,
                      before_cycle=hang_while(Path(hang)) if hang else None)
finally:
    for unit in units:
        unit.stop_all()
sys.exit(code)
"""


@dataclass
class Node:
    """One simulated node: model folders, the simulator's files, the daemon's dirs."""

    root: Path
    nvml: NvmlSim
    port: int = field(default_factory=free_port)
    flavor: str = "exl2"  # the TabbyAPI build the simulator plays (sim/tabby_server.py)

    def __post_init__(self) -> None:
        self.models = self.root / "models"
        for name in ("m1", "m2"):
            make_model(self.models, name)
        self.state_dir = self.root / "state"
        self.runtime_dir = self.root / "run"
        self.control = self.root / "sim-control.json"
        self.requests = self.root / "sim-requests.jsonl"
        self.control.write_text("{}")
        tokens = self.root / "api_tokens.yml"
        tokens.write_text(f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n")
        self.key_file = self.root / "admin_key"
        self.key_file.write_text(ADMIN_KEY + "\n")
        self.config = self.root / "config.toml"
        self.install = self.root / "tabbyapi"
        self.sim_argv = [
            *lay_out(self.install, flavor=self.flavor),
            "--port",
            str(self.port),
            "--models-dir",
            str(self.models),
            "--flavor",
            self.flavor,
            "--control",
            str(self.control),
            "--request-log",
            str(self.requests),
            "--tokens",
            str(tokens),
            "--load-seconds",
            "0.4",
            "--modules",
            "4",
        ]

    def write_config(self, **overrides: dict[str, Any]) -> None:
        tables: dict[str, dict[str, Any]] = {
            "watchdog": {
                "interval": "200ms",
                "state_dir": str(self.state_dir),
                "runtime_dir": str(self.runtime_dir),
            },
            "tabbyapi": {
                "url": f"http://127.0.0.1:{self.port}",
                "admin_key_file": str(self.key_file),
                "health_timeout": "2s",
                "slow_threshold": "1s",
                "failures_before_down": 2,
                "startup_grace": "20s",
                "canary_interval": "0s",
                "venv": "",
                "cmdline_patterns": [str(self.install)],
            },
            "model": {"name": "m1", "models_dir": str(self.models), "load_timeout": "60s"},
            "restart_loop": {
                "max_restarts": 1,
                "window": "10m",
                "backoff_initial": "10m",
                "backoff_max": "1h",
            },
            "gpu": {"nvml_library": str(self.nvml.library), "device": [{"index": 0}]},
            "metrics": {"listen": ""},
        }
        for name, table in overrides.items():
            tables[name] = {**tables.get(name, {}), **table}
        lines: list[str] = []
        for name, table in tables.items():
            lines.append(f"[{name}]")
            devices = table.pop("device", None)
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
            for dev in devices or ():
                lines.append("[[gpu.device]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in dev.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def events(self) -> tuple[Event, ...]:
        # a dry run keeps its own state file
        for name in ("state.json", "state.dry-run.json"):
            if (self.state_dir / name).exists():
                return StateFile(self.state_dir, events_kept=500, name=name).load().events
        return ()

    def kinds(self) -> list[EventKind]:
        return [e.kind for e in self.events()]

    def phase(self) -> Phase | None:
        try:
            return Phase(from_json((self.runtime_dir / "status.json").read_bytes()).phase)
        except (OSError, ValueError):
            return None

    def heartbeat(self) -> float | None:
        try:
            return from_json((self.runtime_dir / "status.json").read_bytes()).heartbeat
        except (OSError, ValueError):
            return None

    def loads(self) -> list[dict[str, Any]]:
        if not self.requests.exists():
            return []
        rows = [json.loads(x) for x in self.requests.read_text().splitlines() if x.strip()]
        return [r for r in rows if r["path"] == "/v1/model/load"]


class Notifications:
    """A real NOTIFY_SOCKET: what the daemon tells 'systemd'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[str]:
        return [line for _, line in list(self.received) if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@dataclass
class Daemons:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)

    def start(
        self,
        node: Node,
        *,
        dry_run: bool = False,
        start_unit: bool = True,
        env: dict[str, str] | None = None,
        log_name: str = "daemon.log",
        hang_file: Path | None = None,
        unit: bool = True,
    ) -> subprocess.Popen[bytes]:
        """`unit=False`: no stand-in unit, the real adapters alone (no systemd to ask here);
        the test runs TabbyAPI itself."""
        spec = {
            "config": str(node.config),
            "dry_run": dry_run,
            "sim_argv": node.sim_argv if unit else None,
            "unit_log": str(node.root / "unit.log"),
            "start_unit": start_unit,
            "hang_file": str(hang_file) if hang_file else "",
        }
        self.roots.append(node.root)
        with (node.root / log_name).open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _RUNNER, json.dumps(spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**node.nvml.env(ld_path=False), **(env or {})},
                cwd=Path(__file__).resolve().parents[1],
            )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        # A daemon killed with -9 leaves its stand-in unit's simulator behind: end every
        # process that this test's own tmp dir appears in (nothing else carries that path).
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if any(str(root) in cmd for root in self.roots) and p.pid != os.getpid():
                try:
                    p.kill()
                    p.wait(10)
                except psutil.Error:
                    pass


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.cleanup()


@pytest.fixture
def node(tmp_path: Path, nvml_sim: NvmlSim) -> Node:
    n = Node(tmp_path, nvml_sim)
    n.write_config()
    return n


def _metrics(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:  # loopback only
        return str(reply.read().decode())


def _exit_code(proc: subprocess.Popen[bytes], timeout: float = WAIT) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon did not exit within {timeout} s") from None


def _decisions(events: tuple[Event, ...]) -> list[tuple[str, str, str]]:
    return [
        (e.action, e.rule.value if e.rule else "", e.reason)
        for e in events
        if e.kind in (EventKind.ACTION, EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED)
    ]


def test_loads_the_missing_model_reports_and_stops_cleanly(
    node: Node, daemons: Daemons, tmp_path: Path
) -> None:
    notify = Notifications(tmp_path / "notify")
    metrics_port = free_port()
    node.write_config(metrics={"listen": f"127.0.0.1:{metrics_port}"})
    hang = node.state_dir / "hang-loop"
    try:
        proc = daemons.start(
            node,
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"},
            hang_file=hang,
        )
        # TabbyAPI up with no model: the daemon loads the configured one and reports healthy.
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the node to become healthy")
        assert len(node.loads()) == 1
        events = node.events()
        assert ("load_model", "no_model") in [(a, r) for a, r, _ in _decisions(events)]
        assert EventKind.STARTED in node.kinds()
        page = _metrics(metrics_port)
        assert 'hydra_watchdog_actions_total{action="load_model",result="in_progress"} 1.0' in page
        assert ADMIN_KEY not in page

        # sd_notify: READY=1 once, after a complete cycle; STATUS= lines; WATCHDOG=1 pings.
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 2, WAIT, "watchdog pings")
        assert notify.lines("READY=1") == ["READY=1"]
        assert any(line.startswith("STATUS=healthy") for line in notify.lines("STATUS="))

        # SIGHUP with an invalid config: rejected, the old one stays, the loop goes on.
        good = node.config.read_text()
        node.write_config(watchdog={"intervall": 5})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: EventKind.CONFIG_REJECTED in node.kinds(), WAIT, "CONFIG_REJECTED")
        rejected = next(e for e in node.events() if e.kind is EventKind.CONFIG_REJECTED)
        assert "intervall" in rejected.message and "did you mean 'interval'" in rejected.message
        pings = len(notify.lines("WATCHDOG=1"))
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) > pings + 1, WAIT, "the loop to go on")
        assert proc.poll() is None

        # ... and a valid one is taken.
        node.config.write_text(good)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: EventKind.CONFIG_RELOADED in node.kinds(), WAIT, "CONFIG_RELOADED")

        # The injected hook hangs the loop: the WATCHDOG=1 pings stop (systemd would kill it).
        hang.touch()
        time.sleep(1.0)  # let a cycle in progress finish and reach the hook
        pings = len(notify.lines("WATCHDOG=1"))
        time.sleep(2.0)  # four ping periods
        assert len(notify.lines("WATCHDOG=1")) == pings, "a hung loop must not ping"
        hang.unlink()
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) > pings, WAIT, "pings to resume")

        # SIGTERM: exit 0, the stop is recorded and persisted.
        proc.send_signal(signal.SIGTERM)
        assert _exit_code(proc) == 0
        assert node.kinds()[-1] is EventKind.STOPPING
        assert notify.lines("STOPPING=1") == ["STOPPING=1"]
        # Issue 23: the text says what the kind's name does not: who, and why it stops.
        started = next(e for e in node.events() if e.kind is EventKind.STARTED)
        assert started.message.startswith(f"pid {proc.pid} watches tabbyapi.service")
        assert node.events()[-1].message == f"pid {proc.pid} stops: SIGTERM"
    finally:
        notify.close()

    # The admin key reaches TabbyAPI and nothing else: no log, state or status holds it.
    for path in (node.root / "daemon.log", node.state_dir / "state.json"):
        assert ADMIN_KEY not in path.read_text(errors="replace"), path
    assert ADMIN_KEY not in (node.runtime_dir / "status.json").read_text()


def test_dry_run_decides_the_same_and_does_nothing(
    tmp_path: Path, nvml_sim: NvmlSim, daemons: Daemons
) -> None:
    logs: dict[bool, list[tuple[str, str, str]]] = {}
    for dry in (False, True):
        node = Node(tmp_path / ("dry" if dry else "real"), nvml_sim)
        node.write_config()
        proc = daemons.start(node, dry_run=dry)

        def decided(n: Node = node) -> bool:
            return bool(_decisions(n.events()))

        def loaded(n: Node = node) -> bool:
            return n.phase() is Phase.HEALTHY

        wait_for(decided, WAIT, "a first decision")
        if not dry:  # let the load finish: SIGTERM would cancel it (tested above)
            wait_for(loaded, WAIT, "the load to finish")
        else:  # cycles for a while longer than a real load takes (0.4 s)
            seen = node.heartbeat() or 0.0

            def cycled(n: Node = node, t: float = seen) -> bool:
                return (n.heartbeat() or 0.0) > t + 1.0

            wait_for(cycled, WAIT, "cycles")
        proc.send_signal(signal.SIGTERM)
        assert _exit_code(proc) == 0
        first = _decisions(node.events())[0]
        logs[dry] = [first]
        action = next(e for e in node.events() if e.action == first[0])
        if dry:
            assert action.message == "would load model m1"
            assert node.loads() == []  # never executed
            assert not (node.state_dir / "state.json").exists()  # the real memory is untouched
        else:
            assert action.message.startswith("load model m1")
            assert len(node.loads()) == 1
    assert logs[True] == logs[False]


def test_kill_9_during_backoff_keeps_the_backoff(node: Node, daemons: Daemons) -> None:
    # TabbyAPI crashes at once on every start: systemd-style restarts pile up into a loop.
    node.control.write_text(json.dumps({"exit_code": 1}))
    first = daemons.start(node)
    wait_for(lambda: node.phase() is Phase.BACKOFF, WAIT, "the restart loop to be detected")
    assert EventKind.RESTART_LOOP in node.kinds()
    before = StateFile(node.state_dir, events_kept=500).load().state
    assert before.backoff_step >= 1 and before.backoff_until is not None
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)

    # A new watchdog (its stand-in unit starts out stopped, as the old one left it).
    second = daemons.start(node, start_unit=False, log_name="daemon2.log")
    wait_for(
        lambda: node.kinds().count(EventKind.STARTED) >= 2 and node.phase() is not None,
        WAIT,
        "the second daemon's first cycle",
    )
    starts_before = sum(1 for e in node.events() if e.action in ("start_unit", "restart_unit"))
    time.sleep(1.5)  # several cycles of the new daemon
    after = StateFile(node.state_dir, events_kept=500).load().state
    assert after.phase is Phase.BACKOFF
    assert after.backoff_step == before.backoff_step
    assert after.backoff_until == before.backoff_until  # same boot: the deadline still holds
    assert after.restarts == before.restarts
    starts_after = sum(1 for e in node.events() if e.action in ("start_unit", "restart_unit"))
    assert starts_after == starts_before, "the back-off was reset by the restart"
    second.send_signal(signal.SIGTERM)
    assert _exit_code(second) == 0


def test_an_exception_in_one_cycle_is_logged_and_the_next_runs(node: Node) -> None:

    calls: list[int] = []

    def flaky(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("policy bug")
        return decide(*args)

    told: list[Event] = []
    cfg = load_config(node.config)
    # Never this host's systemd: the real adapter pointed at a root without one.
    (node.root / "no-systemd").mkdir()
    units = SystemctlUnit(cfg.tabbyapi.unit, root=str(node.root / "no-systemd"))
    adapters = dataclasses.replace(build_adapters(cfg), units=units)
    daemon = Daemon(cfg, adapters=adapters, decide=flaky, notifier=Notifier({}), emit=told.append)
    daemon._safe_cycle()
    assert daemon.cycles == 0 and len(calls) == 1
    daemon._safe_cycle()
    assert daemon.cycles == 1 and len(calls) == 2
    assert node.phase() is not None  # the good cycle published its status
    assert told[0].kind is EventKind.STARTED


def test_the_loop_reads_no_test_switch_from_its_environment(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the loop used to obey: this variable plus a hang file stopped every cycle. Tests now
    # inject their hang hook (tests/harness/hooked_hydra_watchdog.py); the daemon ignores both.
    monkeypatch.setenv("HYDRA_WATCHDOG_TEST_HOOKS", "1")
    cfg = load_config(node.config)
    (node.root / "no-systemd").mkdir()
    units = SystemctlUnit(cfg.tabbyapi.unit, root=str(node.root / "no-systemd"))
    adapters = dataclasses.replace(build_adapters(cfg), units=units)
    told: list[Event] = []
    daemon = Daemon(cfg, adapters=adapters, decide=decide, notifier=Notifier({}), emit=told.append)
    hang = node.state_dir / "hang-loop"
    hang.touch()
    cycle = threading.Thread(target=daemon.cycle, daemon=True)
    try:
        cycle.start()
        cycle.join(WAIT)
        assert not cycle.is_alive(), "the cycle obeyed a test switch from the environment"
        assert daemon.cycles == 1
    finally:
        hang.unlink()  # lets a hung cycle end


def test_new_restarts_counts_each_of_several_in_one_cycle() -> None:
    from hydra_watchdog.policy_state import PolicyState, RestartOrigin, RestartRecord
    from hydra_watchdog.report.reporters import new_restarts

    before = PolicyState(restarts=(RestartRecord(1.0, RestartOrigin.WATCHDOG),))
    after = PolicyState(
        restarts=(*before.restarts, *[RestartRecord(5.0, RestartOrigin.SYSTEMD)] * 3)
    )
    assert sorted(new_restarts(before, after)) == ["systemd", "systemd", "systemd"]
    assert new_restarts(after, after) == []


def _status(node: Node) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "status", "--config", str(node.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_of_a_stopped_or_killed_daemon_is_unknown_at_once(
    node: Node, daemons: Daemons
) -> None:
    proc = daemons.start(node)
    wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the node to become healthy")
    out = _status(node)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK: healthy") and "OK: OK" not in out.stdout
    assert f"pid {proc.pid}, last cycle" in out.stdout

    proc.send_signal(signal.SIGTERM)  # a clean stop marks the file stopped
    assert _exit_code(proc) == 0
    out = _status(node)
    assert out.returncode == 3, out.stdout
    assert out.stdout.startswith(f"UNKNOWN: hydra-watchdog (pid {proc.pid}) stopped at ")

    second = daemons.start(node, start_unit=False, log_name="daemon2.log")
    wait_for(
        lambda: (node.heartbeat() or 0) > time.time() - 1 and _status(node).returncode == 0,
        WAIT,
        "the second daemon to report",
    )
    os.kill(second.pid, signal.SIGKILL)  # no clean stop: the file still says healthy
    second.wait(30)
    out = _status(node)
    assert out.returncode == 3, out.stdout
    assert out.stdout.startswith(f"UNKNOWN: daemon pid {second.pid} is gone")


def test_a_directory_in_place_of_the_state_file_is_quarantined_and_the_daemon_runs(
    node: Node, daemons: Daemons
) -> None:
    node.state_dir.mkdir(mode=0o700)
    (node.state_dir / "state.json").mkdir()  # crashed `run` at start-up: systemd looped it
    proc = daemons.start(node)
    wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the node to become healthy")
    assert proc.poll() is None
    assert len(list(node.state_dir.glob("state.json.corrupt-*"))) == 1
    notes = [
        e for e in node.events() if e.kind is EventKind.DIAGNOSIS and "quarantined" in e.message
    ]
    assert len(notes) == 1 and "not a regular file" in notes[0].message
    proc.send_signal(signal.SIGTERM)
    assert _exit_code(proc) == 0


def test_a_corrupt_state_file_is_an_event_in_the_journal_and_the_events(node: Node) -> None:
    node.state_dir.mkdir(mode=0o700)
    (node.state_dir / "state.json").write_text(
        '{"version": 1, "state": {"backoff_until": Infinity, "phase_since": ' + "9" * 400 + "}}"
    )
    told: list[Event] = []
    cfg = load_config(node.config)
    (node.root / "no-systemd").mkdir()
    units = SystemctlUnit(cfg.tabbyapi.unit, root=str(node.root / "no-systemd"))
    adapters = dataclasses.replace(build_adapters(cfg), units=units)
    daemon = Daemon(cfg, adapters=adapters, decide=decide, notifier=Notifier({}), emit=told.append)
    assert daemon.state.backoff_until is None  # a fresh state, not "wait forever"
    notes = [e for e in told if e.kind is EventKind.DIAGNOSIS]  # what reaches the journal
    assert len(notes) == 1 and "quarantined as state.json.corrupt-" in notes[0].message
    assert notes[0] in daemon.events  # and the events list (`hydra-watchdog events`)
    daemon._persist()
    assert notes[0] in node.events()


def _reloadable_daemon(
    node: Node, emit: Callable[[Event], None] = lambda _event: None
) -> tuple[Daemon, SystemctlUnit]:
    """A Daemon over node's config that can reload it, with no systemd to ask: and its unit
    manager, which its adapter factory hands out again at each reload."""
    cfg = load_config(node.config)
    (node.root / "no-systemd").mkdir()
    units = SystemctlUnit(cfg.tabbyapi.unit, root=str(node.root / "no-systemd"))

    def factory(config: Any) -> Any:
        return dataclasses.replace(build_adapters(config), units=units)

    daemon = Daemon(
        cfg,
        adapters=factory(cfg),
        decide=decide,
        config_path=node.config,
        adapter_factory=factory,
        notifier=Notifier({}),
        emit=emit,
    )
    return daemon, units


def test_a_reload_builds_everything_anew_and_closes_the_old_adapters(node: Node) -> None:
    """SIGHUP goes through one wiring function: new observer, executor and state file from the
    new config; the old adapters and the old observer's probe threads are let go."""
    daemon, units = _reloadable_daemon(node)
    cfg = daemon.config
    before = set(threading.enumerate())
    daemon._safe_cycle()
    old_adapters, old_observer, old_executor = daemon.adapters, daemon.observer, daemon.executor
    old_probe_threads = {
        t for t in set(threading.enumerate()) - before if t.name.startswith("probe-")
    }
    assert old_probe_threads  # the cycle ran its probes on the observer's lanes
    assert daemon.reload()
    assert daemon.adapters is not old_adapters and daemon.observer is not old_observer
    assert daemon.executor is not old_executor
    assert daemon.executor.loader is old_executor.loader  # a load in flight would carry over
    assert daemon.executor.adapters is daemon.adapters
    # The old ones are closed: the client refuses to send, NVML answers "closed".
    assert "closed" in old_adapters.gpu.read(cfg.gpu.device).detail
    health = old_adapters.tabby.health()
    assert not health.healthy and "closed" in health.result.detail.lower()
    wait_for(lambda: not any(t.is_alive() for t in old_probe_threads), WAIT, "old lanes to end")
    # The same unit manager, handed out again by the factory, stays open and in use.
    assert daemon.adapters.units is units
    daemon._safe_cycle()
    assert daemon.cycles == 2
    daemon.close()


def test_a_reload_naming_a_user_this_machine_lacks_keeps_the_old_config(node: Node) -> None:
    """What `run` refuses at start (config.check_host), a reload refuses too: the file is valid,
    but without that user on this machine no process could ever be TabbyAPI's."""
    told: list[Event] = []
    daemon, _ = _reloadable_daemon(node, told.append)
    cfg = daemon.config
    node.write_config(tabbyapi={"user": "hw-no-such-user"})
    assert not daemon.reload()
    assert daemon.config is cfg
    rejected = [e for e in told if e.kind is EventKind.CONFIG_REJECTED]
    assert len(rejected) == 1
    assert "tabbyapi.user: 'hw-no-such-user' is no user on this machine" in rejected[0].message
    daemon.close()


def test_a_failed_probe_is_confirmed_sooner_than_an_interval() -> None:
    cfg = load_config_text('[watchdog]\ninterval = "5s"\n[tabbyapi]\nfailures_before_down = 3\n')
    assert next_cycle_delay(PolicyState(), cfg) == 5.0
    assert next_cycle_delay(PolicyState(failures=1), cfg) == CONFIRM_DELAY
    assert next_cycle_delay(PolicyState(failures=2), cfg) == CONFIRM_DELAY
    # confirmed (or not failing): the interval again; never faster than the interval allows
    assert next_cycle_delay(PolicyState(failures=3), cfg) == 5.0
    fast = load_config_text('[watchdog]\ninterval = "200ms"\n')
    assert next_cycle_delay(PolicyState(failures=1), fast) == 0.2


def load_config_text(text: str) -> Config:
    import tomllib

    return parse_config(tomllib.loads(text))
