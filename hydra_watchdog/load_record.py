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

Both are replaced atomically and read relative to the state dir walked afresh (trusted_path): a
state dir that another user could replace is never read from. A file that cannot be read or
parsed counts as absent. What a record names is still checked before anything is done to it
(act/load_launch.py): the process must be our helper, the unit one of our helper units.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from hydra_watchdog.regular_file import read_regular
from hydra_watchdog.said_once import SaidOnce, failure_key
from hydra_watchdog.statefile import move_aside, parse_json, write_atomic
from hydra_watchdog.trusted_path import UnsafeDirectoryError
from hydra_watchdog.trusted_path import state_dir as private_dir

LAUNCH_FILE = "load.json"
REPORT_FILE = "load-progress.json"
_LIMIT = 64 * 1024  # bytes; each file is a few hundred
_MODE = 0o600

log = logging.getLogger(__name__)
# A cycle reads the records several times (progress, drain, report): a refusal is said once.
_refused = SaidOnce()


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


def _write(state_dir: Path, name: str, record: LoadLaunch | LoadReport) -> None:
    data = json.dumps(asdict(record), sort_keys=True).encode()
    with private_dir(state_dir) as dir_fd:
        write_atomic(Path(name), data, _MODE, dir_fd=dir_fd)


def _read(state_dir: Path, name: str, kind: type[_T]) -> _T | None:
    try:
        with private_dir(state_dir) as dir_fd:
            _refused.worked()  # trusted again: a new refusal is said again
            raw, _ = read_regular(name, _LIMIT, dir_fd=dir_fd)
        data: Any = parse_json(raw)
    except UnsafeDirectoryError as exc:  # never read from a dir another user could swap in
        if _refused.failed(failure_key(exc)):
            log.warning("load records not read: %s", exc)
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    known = {f.name: f for f in fields(kind)}
    if set(data) != set(known):
        return None
    for key, value in data.items():
        want = _TYPES[str(known[key].type)]
        if isinstance(value, bool) and bool not in want:
            return None
        if not isinstance(value, want):
            return None
    return kind(**data)


def write_launch(state_dir: Path, launch: LoadLaunch) -> None:
    _write(state_dir, LAUNCH_FILE, launch)


def read_launch(state_dir: Path) -> LoadLaunch | None:
    return _read(state_dir, LAUNCH_FILE, LoadLaunch)


def write_report(state_dir: Path, report: LoadReport) -> None:
    _write(state_dir, REPORT_FILE, report)


def read_report(state_dir: Path, load_id: str) -> LoadReport | None:
    """The helper's report for the launch `load_id`; None when there is none (yet)."""
    report = _read(state_dir, REPORT_FILE, LoadReport)
    return report if report is not None and report.load_id == load_id else None


def report_written_at(state_dir: Path) -> float | None:
    """When the helper last wrote its report (wall clock): for a finished load, when it ended."""
    try:
        return (state_dir / REPORT_FILE).stat().st_mtime
    except OSError:
        return None


def clear(state_dir: Path) -> None:
    """Forget the load: its outcome was reported (or it belonged to another boot). Best effort:
    a record that cannot be removed is said, and read (and judged) again next time."""
    try:
        with private_dir(state_dir) as dir_fd:
            for name in (LAUNCH_FILE, REPORT_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the load records in %s: %s", state_dir, exc)


def quarantine(state_dir: Path, why: str) -> None:
    """A launch record that names what is not our helper: kept aside as evidence, warned about
    once, never acted on (act/load_launch.py judges it)."""
    try:
        with private_dir(state_dir) as dir_fd:
            move_aside(
                state_dir / LAUNCH_FILE,
                f"not a load of ours: {why}",
                then="nothing it names is acted on",
                dir_fd=dir_fd,
            )
    except OSError as exc:
        log.warning("cannot move aside %s: %s", state_dir / LAUNCH_FILE, exc)
