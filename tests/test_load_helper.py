# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""Issue 12 item 5: a model load the watchdog started survives the watchdog's own stop/restart.

Against the real simulator in its exl2 flavour, which cancels a load when its client disconnects
(as the exl2 build of TabbyAPI does): the daemon is a real subprocess, stopped with a real
SIGTERM mid-load; its load helper is a real detached process (no systemd here; the transient
unit path runs in the chaos suite, tests/chaos/test_chaos.py::test_16).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.act.load import ModelLoader
from hydra_watchdog.act.load_launch import LoadHelpers
from hydra_watchdog.actions import LoadModel, Reason, ResultStatus
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import load_config
from hydra_watchdog.events import EventKind
from hydra_watchdog.load_record import LoadLaunch, read_launch, read_report
from hydra_watchdog.states import Phase, Rule
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import (
    ADMIN_KEY,
    SimProcess,
    TabbySims,
    port_open,
    tabby_sim,  # noqa: F401
    wait_for,
)
from tests.test_daemon import WAIT, Node

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# The daemon with the real adapters, except TabbyAPI's unit: the simulator runs outside the
# daemon (a SIGTERM'd daemon must not take TabbyAPI with it), so a stand-in reports it as systemd
# would: active, its main pid the simulator. No systemd is PID 1 on this machine.
_RUNNER = """
import dataclasses, json, sys, time
from hydra_watchdog.daemon import build_adapters, run_daemon
from hydra_watchdog.interfaces import CommandOutcome
from hydra_watchdog.observation import UnitStatus

spec = json.loads(sys.argv[1])
since = time.monotonic() - 600

class Running:
    def status(self):
        return UnitStatus(name="tabbyapi.service", available=True, load_state="loaded",
                          active_state="active", sub_state="running", result="success",
                          n_restarts=0, main_pid=spec["pid"], user="0", invocation_id="x",
                          exec_main_status=0, active_enter_mono=since)
    def command(self, verb):
        return CommandOutcome(False, "not in this test", refused=True)
    def journal(self, lines):
        return ()

def factory(cfg):
    return dataclasses.replace(build_adapters(cfg), units=Running())

sys.exit(run_daemon(spec["config"], adapter_factory=factory))
"""


def _sim_model(port: int) -> str | None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/model", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:  # loopback only
            return str(json.loads(reply.read())["id"])
    except (OSError, ValueError, KeyError):
        return None


def _alive(launch: LoadLaunch) -> bool:
    try:
        stat = Path(f"/proc/{launch.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == launch.start_ticks


@pytest.fixture
def slow_node(tmp_path: Path, nvml_sim: NvmlSim) -> Iterator[tuple[Node, subprocess.Popen[bytes]]]:
    """The node of test_daemon, its exl2 simulator started on its own, loads taking seconds."""
    node = Node(tmp_path, nvml_sim)
    node.write_config()
    node.control.write_text(json.dumps({"load_seconds": 6.0, "modules": 12}))
    with (tmp_path / "sim.log").open("wb") as out:
        sim = subprocess.Popen(node.sim_argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(node.port), WAIT, "the simulator to listen")
        yield node, sim
    finally:
        sim.terminate()
        sim.wait(10)
        launch = read_launch(node.state_dir)
        if launch is not None and _alive(launch):
            os.kill(launch.pid, signal.SIGKILL)


def _start_daemon(node: Node, sim_pid: int, log: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in node.nvml.env(ld_path=False).items() if k != "INVOCATION_ID"}
    spec = {"config": str(node.config), "pid": sim_pid}
    with (node.root / log).open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _RUNNER, json.dumps(spec)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )


def test_a_load_survives_a_watchdog_restart_and_the_next_one_picks_it_up(
    slow_node: tuple[Node, subprocess.Popen[bytes]],
) -> None:
    node, sim = slow_node
    first = _start_daemon(node, sim.pid, "daemon1.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        # The first watchdog starts the load in a helper; a few modules in, it is stopped.
        wait_for(lambda: read_launch(node.state_dir) is not None, WAIT, "the load to start")
        launch = read_launch(node.state_dir)
        assert launch is not None and launch.pid > 0 and launch.model == "m1"

        def modules_done() -> int:
            report = read_report(node.state_dir, launch.load_id)
            return report.module if report is not None else 0

        wait_for(lambda: modules_done() >= 2, WAIT, "the load to be under way")
        first.send_signal(signal.SIGTERM)
        assert first.wait(WAIT) == 0

        # The helper is not the daemon's: it goes on loading, and holds no key where others
        # can read it (argv, environment).
        assert _alive(launch), "the load helper died with the watchdog"
        for part in ("cmdline", "environ"):
            assert ADMIN_KEY.encode() not in Path(f"/proc/{launch.pid}/{part}").read_bytes()
        done_at_stop = modules_done()

        # The next watchdog finds the load in flight, sends no second load, and takes the
        # outcome: the model is loaded and the node healthy.
        second = _start_daemon(node, sim.pid, "daemon2.log")
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the node to become healthy")
        assert modules_done() == 0 or modules_done() >= done_at_stop
        assert _sim_model(node.port) == "m1"
        loads = node.loads()
        assert [(r["model"], r["result"]) for r in loads] == [("m1", "loaded")], loads
        events = node.events()
        restarted = max(i for i, e in enumerate(events) if e.kind is EventKind.STARTED)
        after = events[restarted:]
        assert not [e for e in after if e.kind is EventKind.ACTION and e.action == "load_model"]
        assert not [e for e in after if "lost" in e.message], [e.message for e in after]
        assert read_launch(node.state_dir) is None, "the outcome is reported once, then dropped"
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
    for log in ("daemon1.log", "daemon2.log", "state/load-helper.log"):
        path = node.root / log
        if path.exists():
            assert ADMIN_KEY not in path.read_text(errors="replace"), path


def _loader(tmp_path: Path, sim: SimProcess) -> tuple[ModelLoader, Path]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY + "\n")
    config = tmp_path / "config.toml"
    config.write_text(
        "[watchdog]\n"
        f'state_dir = "{state}"\n'
        "[tabbyapi]\n"
        f'url = "{sim.url}"\n'
        f'admin_key_file = "{key}"\n'
        'venv = ""\n'
        f'cmdline_patterns = ["{sim.install_dir}"]\n'
        "[model]\n"
        'name = "m1"\n'
        f'models_dir = "{sim.models_dir}"\n'
        'load_timeout = "60s"\n'
    )
    cfg = load_config(config)
    helpers = LoadHelpers(config, state, str(key), systemd=False)
    loader = ModelLoader(TabbyClient.from_config(cfg), 60.0, helpers=helpers)
    return loader, state


LOAD = LoadModel("m1", None, Reason(Rule.NO_MODEL, "healthy but no model loaded"))


def test_a_deliberate_cancel_stops_the_helper_and_is_reported_once(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", load_seconds=30.0, modules=30)
    loader, state = _loader(tmp_path, sim)
    assert loader.start(LOAD).status is ResultStatus.IN_PROGRESS
    launch = read_launch(state)
    assert launch is not None
    wait_for(lambda: (p := loader.progress()) is not None and p.module >= 1, WAIT, "progress")

    # Never two loads: a second start while the helper runs is refused.
    refused = loader.start(LOAD)
    assert (refused.status, refused.error_kind) == (ResultStatus.REFUSED, "load_in_flight")
    # A watchdog stop leaves it running ...
    assert loader.shutdown(1.0) and _alive(launch)
    # ... the policy's cancel stops it, cleanly: the server saw the client go.
    assert loader.cancel(WAIT)
    assert not _alive(launch)
    results = loader.drain()
    assert [(r.status, r.error_kind) for r in results] == [(ResultStatus.FAILED, "cancelled")]
    assert loader.drain() == ()
    assert loader.progress() is None
    wait_for(lambda: bool(sim.loads()), WAIT, "the sim to log the load")
    assert sim.loads()[0]["result"] == "cancelled: client disconnected"
    assert len(sim.loads()) == 1


def test_a_helper_killed_without_an_outcome_is_a_failed_load_once(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", load_seconds=30.0, modules=30)
    loader, state = _loader(tmp_path, sim)
    assert loader.start(LOAD).status is ResultStatus.IN_PROGRESS
    launch = read_launch(state)
    assert launch is not None
    wait_for(lambda: loader.in_flight and _alive(launch), WAIT, "the helper to run")
    os.kill(launch.pid, signal.SIGKILL)
    wait_for(lambda: not loader.in_flight, WAIT, "the helper to be seen gone")
    results = loader.drain()
    assert [(r.status, r.error_kind) for r in results] == [(ResultStatus.FAILED, "load_error")]
    assert "without an outcome" in results[0].detail
    assert loader.drain() == ()
    # ... and a new load may start now.
    assert loader.start(LOAD).status is ResultStatus.IN_PROGRESS
    assert loader.cancel(WAIT)


def _helper(config: Path, state: Path, creds: Path) -> subprocess.CompletedProcess[str]:
    """The helper as the transient unit runs it: the key expected as systemd's credential."""
    argv = [sys.executable, "-m", "hydra_watchdog.load_helper", "--config", str(config)]
    argv += ["--model", "m1", "--load-id", "t1", "--state-dir", str(state), "--key-credential"]
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env["CREDENTIALS_DIRECTORY"] = str(creds)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_credential_that_did_not_arrive_is_said_and_nothing_is_sent(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    """systemd was asked to hand the helper the key (LoadCredential=) and the directory came
    empty: the helper sends nothing (a load without the key would come back 401 and read as a
    rejected key) and says which it is. With the credential there, the same helper loads."""
    sim = tabby_sim.start(flavor="exl2", load_seconds=0.2, modules=2)
    _, state = _loader(tmp_path, sim)
    config = tmp_path / "config.toml"
    # The transient unit's helper has no key file: only the credential.
    config.write_text(config.read_text().replace(f'admin_key_file = "{tmp_path}/admin_key"\n', ""))
    creds = tmp_path / "credentials"
    creds.mkdir()

    done = _helper(config, state, creds)
    assert done.returncode == 1, done.stderr
    outcome = read_report(state, "t1")
    assert outcome is not None and outcome.finished and not outcome.ok
    assert "admin key credential did not arrive" in outcome.detail
    assert sim.loads() == []  # nothing reached TabbyAPI

    (creds / "admin_key").write_text(ADMIN_KEY + "\n")
    done = _helper(config, state, creds)
    assert done.returncode == 0, done.stderr
    outcome = read_report(state, "t1")
    assert outcome is not None and outcome.ok, outcome
    wait_for(lambda: bool(sim.loads()), WAIT, "the sim to log the load")
