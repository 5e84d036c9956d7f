"""`unit-programs.json` in the state dir: the programs seen running in TabbyAPI's unit's cgroup,
kept across watchdog restarts.

Under a wrapper (`ExecStart=/opt/tabbyapi/start.sh`, NixOS's `.tabbyapi-wrapped`), ExecStart=
names the wrapper, and TabbyAPI's own program (`python main.py`) is known only from having been
seen in the unit's cgroup (adapters/procs.py). Kept in memory alone, a watchdog restarted while
the unit is down (when an orphan is most likely) would take a leftover `python main.py` for a
foreign process and block where the runbook's orphan cleanup runs. So the set, at most
MAX_SEEN programs with the unit's InvocationID when each was last seen, is written here when it
changes and read back at start.

Written and read like the other files of the state dir (trusted_path: the dir walked afresh, no
symlink followed; statefile.write_atomic; regular_file.read_regular, capped). What it restores
is only a name: each program must still lie inside the install tree and pass every other orphan
check (uid, PID namespace, the same file as systemd sees, outside the unit) before a process
running it is TabbyAPI's orphan. A file that is not ours is set aside and the set is learned
afresh.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_watchdog.printable import cut
from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.statefile import move_aside, parse_json, write_atomic
from hydra_watchdog.trusted_path import state_dir as private_dir

SEEN_FILE = "unit-programs.json"
SEEN_VERSION = 1
MAX_SEEN = 16  # programs remembered (a wrapper, its child, an interpreter's script...)
MAX_BYTES = 64 * 1024  # 16 paths of at most 4095 bytes, escaped
MAX_PATH = 4095
MAX_INVOCATION = 64  # systemd's InvocationID is 32 hex digits


@dataclass(frozen=True)
class Seen:
    """A program seen running in the unit's cgroup, and the unit's InvocationID then."""

    program: str
    invocation: str = ""


@dataclass(frozen=True)
class Restored:
    seen: tuple[Seen, ...] = ()  # oldest first
    note: str = ""  # why the file was set aside, for the log


def _usable(program: object) -> bool:
    return (
        isinstance(program, str)
        and program.startswith("/")
        and len(program) <= MAX_PATH
        and posixpath.normpath(program) == program
        and program.isprintable()
    )


def _parse(raw: bytes, unit: str) -> tuple[Seen, ...]:
    """The programs kept for `unit` (none for another unit: the config named a new one)."""
    doc: Any = parse_json(raw)
    if not isinstance(doc, dict) or doc.get("version") != SEEN_VERSION:
        raise ValueError(f"not version {SEEN_VERSION} of {SEEN_FILE}")
    kept, rows = doc.get("unit"), doc.get("programs")
    if not isinstance(kept, str) or not isinstance(rows, list) or len(rows) > MAX_SEEN:
        raise ValueError(f"no 'unit' name, or no list of at most {MAX_SEEN} 'programs'")
    seen = []
    for row in rows:
        program = row.get("program") if isinstance(row, dict) else None
        invocation = row.get("invocation", "") if isinstance(row, dict) else None
        if not _usable(program) or not isinstance(invocation, str):
            raise ValueError(
                f"a program that is not an absolute, normalised path: {cut(repr(row), 80)}"
            )
        seen.append(Seen(str(program), invocation[:MAX_INVOCATION]))
    return tuple(seen) if kept == unit else ()


def restore(state_dir: Path | str, unit: str) -> Restored:
    """The programs seen in `unit`'s cgroup before this start. OSError for a state dir it must
    not trust (UnsafeDirectoryError) or cannot read; nothing when there is no file yet."""
    path = Path(state_dir) / SEEN_FILE
    try:
        with private_dir(state_dir) as dir_fd:
            try:
                raw, _ = read_regular(SEEN_FILE, MAX_BYTES, dir_fd=dir_fd)
                return Restored(_parse(raw, unit))
            except FileNotFoundError:
                return Restored()
            except (UnusableFileError, ValueError, TypeError, RecursionError) as exc:
                why = cut(f"not a list of programs seen: {exc}", 200)
                move_aside(path, why, then="the programs are learned afresh", dir_fd=dir_fd)
                return Restored(note=why)
    except FileNotFoundError:
        return Restored()  # no state dir yet


def keep(state_dir: Path | str, unit: str, seen: tuple[Seen, ...]) -> None:
    """Replace the file with `seen` (the last MAX_SEEN). OSError when it cannot be written."""
    doc = {
        "version": SEEN_VERSION,
        "unit": unit,
        "programs": [{"program": s.program, "invocation": s.invocation} for s in seen[-MAX_SEEN:]],
    }
    with private_dir(state_dir, create=True) as dir_fd:
        write_atomic(Path(SEEN_FILE), json.dumps(doc).encode(), 0o600, dir_fd=dir_fd)
