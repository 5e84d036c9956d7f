"""The two files that let a model load outlive the watchdog that started it (issue 12 item 5).

TabbyAPI's exl2 build cancels a load when its client disconnects, so the load request runs in a
helper process of its own (hydra_watchdog/load_helper.py), which a stop or restart of the
watchdog does not end. Two files in the state dir tie the two together:

* `load.json` (LoadLaunch), written by the watchdog when it starts the helper: which model and
  why, when (this boot's id and its monotonic clock), and where the helper runs: a transient
  systemd unit, or a detached pid with its start ticks (a reused pid never passes for it).
* `load-progress.json` (LoadReport), written by the helper: modules done, then the outcome.
  It carries the launch's random id, so a report left from an older load is never taken for
  this one's.

Both are replaced atomically; a file that cannot be read or parsed counts as absent (the state
dir is private, so nobody but us writes there).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from hydra_watchdog.regular_file import read_regular
from hydra_watchdog.statefile import parse_json, write_atomic

LAUNCH_FILE = "load.json"
REPORT_FILE = "load-progress.json"
_LIMIT = 64 * 1024  # bytes; each file is a few hundred
_MODE = 0o600


@dataclass(frozen=True)
class LoadLaunch:
    """A load the watchdog handed to a helper."""

    load_id: str
    model: str
    vram_needed_bytes: int | None
    rule: str
    evidence: str
    boot_id: str
    started_mono: float
    started_wall: float
    unit: str = ""  # the transient unit running the helper, or
    pid: int = 0  # the detached helper's pid,
    start_ticks: int = 0  # and its start time since boot (/proc/PID/stat)


@dataclass(frozen=True)
class LoadReport:
    """What the helper says about its load: progress, then (finished) the outcome."""

    load_id: str
    model: str
    module: int = 0
    modules: int = 0
    finished: bool = False
    ok: bool = False
    detail: str = ""
    kind: str = ""  # LoadOutcome.kind: "unauthorized", "permanent" or "" (transient)


_T = TypeVar("_T", LoadLaunch, LoadReport)
# The fields' annotations (strings: `from __future__ import annotations`) -> JSON values allowed.
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "int | None": (int, type(None)),
}


def _write(path: Path, record: LoadLaunch | LoadReport) -> None:
    write_atomic(path, json.dumps(asdict(record), sort_keys=True).encode(), _MODE)


def _read(path: Path, kind: type[_T]) -> _T | None:
    try:
        raw, _ = read_regular(path, _LIMIT)
        data: Any = parse_json(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    names = {f.name: f for f in fields(kind)}
    if set(data) != set(names):
        return None
    for name, value in data.items():
        want = _TYPES[str(names[name].type)]
        if isinstance(value, bool) and bool not in want:
            return None
        if not isinstance(value, want):
            return None
    return kind(**data)


def write_launch(state_dir: Path, launch: LoadLaunch) -> None:
    _write(state_dir / LAUNCH_FILE, launch)


def read_launch(state_dir: Path) -> LoadLaunch | None:
    return _read(state_dir / LAUNCH_FILE, LoadLaunch)


def write_report(state_dir: Path, report: LoadReport) -> None:
    _write(state_dir / REPORT_FILE, report)


def read_report(state_dir: Path, load_id: str) -> LoadReport | None:
    """The helper's report for the launch `load_id`; None when there is none (yet)."""
    report = _read(state_dir / REPORT_FILE, LoadReport)
    return report if report is not None and report.load_id == load_id else None


def clear(state_dir: Path) -> None:
    """Forget the load: its outcome was reported (or it belonged to another boot)."""
    for name in (LAUNCH_FILE, REPORT_FILE):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
