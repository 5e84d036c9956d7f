"""Maintenance mode: how an operator pauses the running daemon, through a file.

Pause/resume: `hydra-watchdog pause` writes `pause.json` into the state dir (root-only, 0700) and
`resume` removes it; the daemon reads it every cycle. A file rather than a socket because it
needs no listener, survives a daemon restart (maintenance mode must not end because the watchdog
restarted) and is atomic with a rename. The expiry is wall-clock (a human typed "for 2h"); the
daemon converts it to its monotonic clock when it reads it.

The file is read with a size cap, without following symlinks, relative to a state dir walked
and checked afresh for each read (trusted_path); a pause file that this process did not write
(another owner, group/other-writable) pauses nothing. (The daemon's answer, the
status file, lives in report/status_file.py.)
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path

from hydra_watchdog.observation import PauseRequest
from hydra_watchdog.printable import cut
from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.statefile import move_aside, parse_json, write_atomic
from hydra_watchdog.trusted_path import UnsafeDirectoryError
from hydra_watchdog.trusted_path import state_dir as private_dir

PAUSE_FILE = "pause.json"
PAUSE_VERSION = 1
PAUSE_MAX_BYTES = 64 * 1024  # a reason typed by a human


def pause(state_dir: Path | str, reason: str, until_wall: float | None) -> None:
    """Enter maintenance mode: the daemon observes only, until `until_wall` (time.time()) or
    until `resume`. A second pause replaces the first."""
    if until_wall is not None and not math.isfinite(until_wall):
        raise ValueError(f"until_wall must be a finite time, not {until_wall!r}")
    doc = {
        "version": PAUSE_VERSION,
        "reason": reason,
        "until_wall": until_wall,
        "since_wall": time.time(),
    }
    with private_dir(state_dir, create=True) as dir_fd:
        write_atomic(Path(PAUSE_FILE), json.dumps(doc).encode(), 0o600, dir_fd=dir_fd)


def resume(state_dir: Path | str) -> bool:
    """Leave maintenance mode; False if it was not paused."""
    try:
        with private_dir(state_dir) as dir_fd:
            os.unlink(PAUSE_FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def read_pause(state_dir: Path | str, wall_now: float, mono_now: float) -> PauseRequest | None:
    """The pause in force, its expiry on the monotonic clock; None when not paused or expired.

    A file we cannot understand pauses nothing (the watchdog keeps guarding TabbyAPI rather than
    going quiet on garbage); it is moved aside with a warning so the warning is not repeated
    every cycle. A pause state we cannot read at all is another matter: a state dir that became
    untrusted while the daemon ran (a component another user can now replace: UnsafeDirectoryError
    names it), one we may not search, or our own lack of descriptors or memory. An operator's
    pause for a driver upgrade may stand there unread, so the daemon observes only and acts on
    nothing until it can read it again (`unreadable`: the policy's finding says why, once).
    """
    path = Path(state_dir) / PAUSE_FILE
    try:
        with private_dir(state_dir) as dir_fd:
            return _read_pause(path, dir_fd, wall_now, mono_now)
    except FileNotFoundError:
        return None  # no state dir (and no pause in it): nothing paused
    except OSError as exc:
        if isinstance(exc, UnsafeDirectoryError):  # it names the component
            why = f"{path} not read: {exc}"
        else:
            why = f"{path} cannot be read ({exc.strerror or exc})"
        return PauseRequest(reason=f"{why}; observing only", until=None, unreadable=True)


def _read_pause(path: Path, dir_fd: int, wall_now: float, mono_now: float) -> PauseRequest | None:
    try:
        raw, st = read_regular(PAUSE_FILE, PAUSE_MAX_BYTES, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except UnusableFileError as exc:
        move_aside(path, f"not a pause request: {exc}", then="not paused", dir_fd=dir_fd)
        return None
    euid = os.geteuid()
    if st.st_uid != euid or st.st_mode & 0o022:
        # `pause` writes it 0600 as the daemon's user; anything else was planted
        move_aside(
            path,
            dir_fd=dir_fd,
            why=f"not written by `hydra-watchdog pause`: owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o} (wanted uid {euid}, not group/other-writable)",
            then="not paused",
        )
        return None
    try:
        doc = parse_json(raw)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        reason, until = doc.get("reason"), doc.get("until_wall")
        if not isinstance(reason, str):
            raise TypeError(f"'reason' is {cut(str(reason), 40)!r}, not a string")
        if until is not None and (
            isinstance(until, bool)
            or not isinstance(until, int | float)
            or not math.isfinite(until)
            or abs(until) > 1e12
        ):
            raise TypeError(f"'until_wall' is {cut(str(until), 40)!r}, not a time or null")
    except (ValueError, TypeError, RecursionError) as exc:
        move_aside(path, cut(f"not a pause request: {exc}", 200), then="not paused", dir_fd=dir_fd)
        return None
    if until is None:
        return PauseRequest(reason=reason, until=None)
    remaining = float(until) - wall_now
    if remaining <= 0:
        return None
    return PauseRequest(reason=reason, until=mono_now + remaining)
