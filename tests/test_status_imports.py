"""`hydra-watchdog status` stays light (issues 15 and 25): monitoring runs it every few seconds,
so it imports no HTTP or NVML client, no process scanner, not the policy, and none of the modules
whose import costs more than the rest of the command (the config's schema, tomllib, dataclasses,
typing). Checked in a fresh interpreter after a real `status` run against a real status file
written by the daemon's writer. One path: public modules only, no TYPE_CHECKING of our own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_watchdog.arguments import COMMANDS, build_parser
from hydra_watchdog.cli import status_args
from hydra_watchdog.config import Config, load_config
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.status import replace
from hydra_watchdog.report.status_build import build_status
from hydra_watchdog.report.status_file import write_status
from hydra_watchdog.report.status_view import process_start
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
import re
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
    tmp_path: Path, *args: str, loaded: bool
) -> tuple[int, list[str], str]:
    """`status --config F ARGS` after a completed cycle of a live stand-in daemon. `loaded`: the
    report names F as the config file its daemon read, as the daemon that loaded F writes it;
    otherwise it names none (the defaults')."""
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
            load_config(config) if loaded else Config(),
            (),
            wall_now=time.time(),
            mono_now=time.monotonic(),
            pid=daemon.pid,
            pid_start=process_start(daemon.pid),
        )
        # a completed cycle: build_status dates the heartbeat from an observation
        write_status(tmp_path / "run", replace(report, heartbeat=time.time()))
        return _status_modules("--config", str(config), *args)
    finally:
        daemon.kill()
        daemon.wait()


def test_status_of_a_live_daemon_imports_nothing_heavy(tmp_path: Path) -> None:
    code, modules, out = _status_of_a_live_daemon(tmp_path, "--json", loaded=False)
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


# What `status` leaves out: each costs it milliseconds, together more than the rest of it.
NOT_FOR_STATUS = (
    "tomllib",
    "dataclasses",
    "inspect",
    "typing",
    "logging",
    "pathlib",
    "hashlib",
    "hydra_watchdog.config",
    "hydra_watchdog.commands",
    "hydra_watchdog.report.status_build",
    "hydra_watchdog.statefile",
    "hydra_watchdog.jsonable",
    "hydra_watchdog.events",
    "hydra_watchdog.states",
)


@pytest.mark.parametrize("runtime_dir_line", [True, False])
def test_status_of_a_daemon_with_the_same_config_reads_no_config_schema(
    tmp_path: Path, runtime_dir_line: bool
) -> None:
    """The config file the daemon read leads to its report without being parsed: named by its
    runtime_dir line, or (no such line) passed with --runtime-dir."""
    args = () if runtime_dir_line else ("--runtime-dir", str(tmp_path / "run"))
    code, modules, out = _status_of_a_live_daemon(tmp_path, *args, loaded=True)
    assert out.startswith("OK: healthy"), out
    assert code == 0
    assert [m for m in modules if m in NOT_FOR_STATUS] == []
    assert _heavy(modules) == []


def test_status_of_an_edited_config_reads_it(tmp_path: Path) -> None:
    """A config that changed since the daemon read it is read: the report's view of it is old."""
    code, modules, out = _status_of_a_live_daemon(tmp_path, loaded=False)
    assert out.startswith("OK: healthy"), out
    assert code == 0
    assert "hydra_watchdog.config" in modules


OUR_STATUS_MODULES = (
    "cli.py",
    "paths.py",
    "printable.py",
    "regular_file.py",
    "trusted_path.py",
    "report",
)


def test_the_status_path_uses_public_modules_only() -> None:
    """No CPython private module (_json, _sha256) and no TYPE_CHECKING of our own making."""
    root = Path(__file__).resolve().parent.parent / "hydra_watchdog"
    for name in OUR_STATUS_MODULES:
        for path in (
            sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]
        ):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import) +_(?!_future__)", text, re.MULTILINE), path
            assert "TYPE_CHECKING = False" not in text, path


SPELLED = [
    [],
    ["--json"],
    ["--config", "/x.toml"],
    ["--config=/x.toml", "--json"],
    ["--runtime-dir", "/run/x", "--config", "/x.toml"],
    ["--runtime-dir=/run/x"],
]
LEFT_TO_THE_PARSER = [
    ["--json", "--json"],
    ["--js"],
    ["--conf", "/x"],
    ["--config"],
    ["--config", "--json"],
    ["--json=1"],
    ["-h"],
    ["--help"],
    ["extra"],
]


@pytest.mark.parametrize("argv", SPELLED)
def test_status_options_spelled_out_are_read_as_the_parser_reads_them(argv: list[str]) -> None:
    spelled = status_args(argv)
    args = build_parser("status").parse_args(["status", *argv])
    assert spelled is not None
    assert (spelled.config, spelled.runtime_dir, spelled.json) == (
        args.config,
        args.runtime_dir,
        args.json,
    )


@pytest.mark.parametrize("argv", LEFT_TO_THE_PARSER)
def test_any_other_status_command_line_is_left_to_the_parser(argv: list[str]) -> None:
    assert status_args(argv) is None
