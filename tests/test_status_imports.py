"""`hydra-watchdog status` stays light (issue 15): monitoring runs it every few seconds, so it
imports no HTTP or NVML client, no process scanner and not the policy. Checked in a fresh
interpreter after a real `status` run against a real status file written by the daemon's writer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from hydra_watchdog.cli import COMMANDS, build_parser
from hydra_watchdog.config import Config, load_config
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.status import build_status, process_start
from hydra_watchdog.report.status_file import write_status
from hydra_watchdog.states import Phase

# The list, plus the policy's memory and the observation types: dozens of dataclasses
# whose creation alone cost `status` tens of milliseconds.
HEAVY = (
    "httpx",
    "httpcore",
    "pynvml",
    "psutil",
    "hydra_watchdog.policy",
    "hydra_watchdog.policy_state",
    "hydra_watchdog.observation",
    "hydra_watchdog.daemon",
)

PROBE = """
import sys
from hydra_watchdog.cli import main
code = main(sys.argv[1:])
modules = sorted(sys.modules)  # before this probe's own json
import json
print(json.dumps({"code": code, "modules": modules}))
"""


def _status_modules(*args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    doc = json.loads(proc.stdout.splitlines()[-1])
    return doc["code"], doc["modules"], proc.stdout


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def _status_of_a_live_daemon(
    tmp_path: Path, *args: str, digest: bool
) -> tuple[int, list[str], str]:
    """`status --config F ARGS` after a completed cycle of a live stand-in daemon. `digest`: the
    report carries the config file's digest, as the daemon that loaded F writes it (the quick
    path answers only then); otherwise the defaults' (none)."""
    config = tmp_path / "watchdog.toml"
    config.write_text(f'[watchdog]\nruntime_dir = "{tmp_path / "run"}"\n')
    # A live process whose command line names hydra_watchdog stands in for the daemon.
    daemon = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "hydra_watchdog"]
    )
    try:
        report = build_status(
            PolicyState(phase=Phase.HEALTHY, phase_since=time.monotonic()),
            None,
            load_config(config) if digest else Config(),
            (),
            wall_now=time.time(),
            mono_now=time.monotonic(),
            pid=daemon.pid,
            pid_start=process_start(daemon.pid),
        )
        # a completed cycle: build_status dates the heartbeat from an observation
        write_status(tmp_path / "run", dataclasses.replace(report, heartbeat=time.time()))
        return _status_modules("--config", str(config), *args)
    finally:
        daemon.kill()
        daemon.wait()


def test_status_of_a_live_daemon_imports_nothing_heavy(tmp_path: Path) -> None:
    code, modules, out = _status_of_a_live_daemon(tmp_path, "--json", digest=False)
    assert json.loads(out[: out.rindex("\n{")])["verdict"] == "OK", out
    assert code == 0
    assert "hydra_watchdog.report.status" in modules  # the status path really ran
    assert _heavy(modules) == []


def test_status_without_a_status_file_imports_nothing_heavy(tmp_path: Path) -> None:
    code, modules, out = _status_modules("--runtime-dir", str(tmp_path), "--config", "/nonexistent")
    assert code == 3, out
    assert "no status file" in out
    assert _heavy(modules) == []


def test_the_fast_parser_knows_every_command() -> None:
    """main() builds only the named command's parser; COMMANDS must name every command, or one
    would be parsed by the whole parser (slow) and a new one missed silently."""
    full = build_parser()
    choices = next(
        a.choices for a in full._actions if a.dest == "command" and a.choices is not None
    )
    assert frozenset(choices) == COMMANDS
    for name in COMMANDS:
        sub = build_parser(name)
        sub_choices = next(a.choices for a in sub._actions if a.dest == "command")
        assert sub_choices is not None and list(sub_choices) == [name]


# What the quick path (report/status_quick.py) leaves out: each cost `status` milliseconds.
NOT_QUICK = (
    "argparse",
    "tomllib",
    "dataclasses",
    "typing",
    "logging",
    "pathlib",
    "hashlib",
    "hydra_watchdog.config",
    "hydra_watchdog.report.status",
    "hydra_watchdog.report.status_file",
    "hydra_watchdog.statefile",
    "hydra_watchdog.jsonable",
    "hydra_watchdog.events",
    # json imports re, re imports enum, and states holds enums: ~15 ms together (measured)
    "json",
    "re",
    "enum",
    "hydra_watchdog.states",
)


def test_status_of_a_daemon_with_the_same_config_takes_the_quick_path(tmp_path: Path) -> None:
    code, modules, out = _status_of_a_live_daemon(tmp_path, digest=True)
    assert out.startswith("OK: healthy"), out
    assert code == 0
    assert "hydra_watchdog.report.status_quick" in modules
    assert [m for m in modules if m in NOT_QUICK] == []
    assert _heavy(modules) == []
