"""How other processes reach the running daemon, and how it answers them, through files.

Pause/resume: `hydra-watchdog pause` writes `pause.json` into the state dir (root-only, 0700) and
`resume` removes it; the daemon reads it every cycle. A file rather than a socket because it
needs no listener, survives a daemon restart (maintenance mode must not end because the watchdog
restarted) and is atomic with a rename. The expiry is wall-clock (a human typed "for 2h"); the
daemon converts it to its monotonic clock when it reads it.

Status: the daemon writes `status.json` into the runtime dir (0755, file 0644, no secrets) every
cycle, so `hydra-watchdog status` works for an unprivileged user.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from hydra_watchdog.observation import PauseRequest, local_failure
from hydra_watchdog.report.status import StatusReport, from_json, to_json
from hydra_watchdog.statefile import ensure_dir, move_aside, write_atomic

PAUSE_FILE = "pause.json"
STATUS_FILE = "status.json"
PAUSE_VERSION = 1

log = logging.getLogger(__name__)


def pause(state_dir: Path | str, reason: str, until_wall: float | None) -> None:
    """Enter maintenance mode: the daemon observes only, until `until_wall` (time.time()) or
    until `resume`. A second pause replaces the first."""
    if until_wall is not None and not math.isfinite(until_wall):
        raise ValueError(f"until_wall must be a finite time, not {until_wall!r}")
    directory = Path(state_dir)
    ensure_dir(directory, 0o700)
    doc = {
        "version": PAUSE_VERSION,
        "reason": reason,
        "until_wall": until_wall,
        "since_wall": time.time(),
    }
    write_atomic(directory / PAUSE_FILE, json.dumps(doc).encode(), 0o600)


def resume(state_dir: Path | str) -> bool:
    """Leave maintenance mode; False if it was not paused."""
    try:
        (Path(state_dir) / PAUSE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def read_pause(state_dir: Path | str, wall_now: float, mono_now: float) -> PauseRequest | None:
    """The pause in force, its expiry on the monotonic clock; None when not paused or expired.

    A file we cannot understand pauses nothing (the watchdog keeps guarding TabbyAPI rather than
    going quiet on garbage); it is moved aside with a warning so the warning is not repeated
    every cycle. A file we could not read for lack of descriptors or memory is the watchdog's
    own failure, not the file's: it may well be a pause for a driver upgrade, so it pauses, with
    the reason saying why, until it can be read.
    """
    path = Path(state_dir) / PAUSE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if local_failure(exc):
            why = f"{path} exists but cannot be read ({exc.strerror or exc}); observing only"
            log.error("%s", why)
            return PauseRequest(reason=why, until=None)
        log.warning("cannot read %s: %s; not paused", path, exc)
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        reason, until = doc.get("reason"), doc.get("until_wall")
        if not isinstance(reason, str):
            raise TypeError(f"'reason' is {reason!r}, not a string")
        if until is not None and (
            isinstance(until, bool)
            or not isinstance(until, int | float)
            or not math.isfinite(until)
        ):
            raise TypeError(f"'until_wall' is {until!r}, not a time or null")
    except (ValueError, TypeError) as exc:
        move_aside(path, f"not a pause request: {exc}"[:200])
        return None
    if until is None:
        return PauseRequest(reason=reason, until=None)
    remaining = float(until) - wall_now
    if remaining <= 0:
        return None
    return PauseRequest(reason=reason, until=mono_now + remaining)


def write_status(runtime_dir: Path | str, report: StatusReport) -> None:
    """Publish the daemon's status for `hydra-watchdog status` (world-readable: no secrets)."""
    directory = Path(runtime_dir)
    ensure_dir(directory, 0o755)
    write_atomic(directory / STATUS_FILE, to_json(report).encode(), 0o644)


def read_status(runtime_dir: Path | str) -> StatusReport | None:
    """The last status the daemon wrote; None when there is none. ValueError (saying what is
    wrong) for a file that is not a status this version reads."""
    try:
        raw = (Path(runtime_dir) / STATUS_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read the status file: {exc.strerror or exc}") from None
    return from_json(raw)
