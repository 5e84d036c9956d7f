"""Incidents end to end: the real daemon against the demo's simulated node (a real TabbyAPI
simulator over HTTP, simulated NVML, the stand-in unit that restarts like Restart=on-failure);
a crash and a leak are injected, and `hydra-watchdog incidents` (another process) reads what the
daemon kept in its state dir. A second daemon on the same state dir goes on counting."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.daemon import Daemon
from hydra_watchdog.demo import Demo
from hydra_watchdog.policy import decide
from hydra_watchdog.sim.tabby_server import write_control

pytestmark = pytest.mark.slow


def incidents(config: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "incidents", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    found: list[dict[str, object]] = json.loads(out.stdout)
    return found


def test_the_daemon_keeps_each_incident_with_its_actions_and_recovery(tmp_path: Path) -> None:
    demo = Demo(tmp_path / "node", out=lambda _line: None)
    config = tmp_path / "cli.toml"
    config.write_text(f'[watchdog]\nstate_dir = "{demo.cfg.watchdog.state_dir}"\n')
    try:
        demo.unit.command(UnitVerb.START)
        demo.thread.start()
        boot = demo.incident("boot", "boot", "", lambda: None, lambda: demo.daemon.cycles > 0)
        assert boot.recovered_s is not None

        def crash() -> None:
            write_control(demo.node.control, exit_code=1)
            pid = demo.unit.status().main_pid
            demo._wait(lambda: demo.unit.status().main_pid != pid, 5)
            write_control(demo.node.control)

        inc = demo.incident("crash", "crash", "", crash, lambda: not demo._serving())
        assert inc.recovered_s is not None
        first, second = incidents(config)
        assert first["alert"] == "TabbyAPINoModel" and second["alert"] == "TabbyAPIDown"
        for one in (first, second):
            assert one["outcome"] == "recovered" and one["open"] is False
            assert isinstance(one["time_to_recover"], float) and one["time_to_recover"] > 0
            actions = one["actions"]
            assert isinstance(actions, list)
            # systemd's stand-in restarted it; the watchdog loaded the model back
            assert [(a["action"], a["result"]) for a in actions][-1] == ("load_model", "ok")
            assert one["canary_at"] is not None  # healthy again only once a canary passed
        assert "exit" in str(second["cause"])  # the unit's own words: it exited

        # The watchdog restarts (its state dir stays): the next incident is #3, not #1 again,
        # and it is open.
        demo.daemon.request_stop()
        demo.thread.join(15)
        daemon = Daemon(demo.cfg, adapters=demo.daemon.adapters, decide=decide, emit=demo._emit)
        write_control(demo.node.control, sticky_503=True)
        for _ in range(20):
            daemon.cycle()
            found = incidents(config)
            if len(found) == 3:
                break
            time.sleep(demo.cfg.watchdog.interval)
        assert [(i["number"], i["open"]) for i in found] == [(1, False), (2, False), (3, True)]
        assert found[2]["alert"] == "TabbyAPIDown"
    finally:
        write_control(demo.node.control)
        demo.close()
