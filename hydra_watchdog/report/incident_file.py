"""`incidents.json` in the state dir: the incident tracker (incidents.py), kept across restarts.

Written like the state file (through the trusted state dir's descriptor, statefile.write_atomic:
temp file, fsync, rename, fsync of the dir) and only when the tracker changed, which a healthy
cycle never does. Read with the project's bounded regular-file reader in that directory; a file
that is not ours (corrupt, too large, a FIFO, a symlink) is moved aside as evidence and the
tracker starts empty: never a crash. Bounded by construction: INCIDENTS_KEPT closed incidents of
at most ACTIONS_KEPT actions, texts of TEXT_LIMIT characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hydra_watchdog.incidents import Tracker
from hydra_watchdog.jsonable import from_jsonable, to_jsonable
from hydra_watchdog.printable import cut
from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.statefile import _check_ranges, move_aside, parse_json, write_atomic
from hydra_watchdog.trusted_path import state_dir

INCIDENT_FILE = "incidents.json"
DRY_RUN_INCIDENT_FILE = "incidents.dry-run.json"  # a dry run's incidents are its own
INCIDENT_VERSION = 1
MAX_BYTES = 4 * 1024**2  # 100 incidents of 40 actions of 300 characters fit in under 2 MiB


@dataclass(frozen=True)
class Loaded:
    tracker: Tracker
    note: str = ""  # why the file was set aside, for the event log


class IncidentFile:
    def __init__(self, state_dir: Path | str, *, dry_run: bool = False) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / (DRY_RUN_INCIDENT_FILE if dry_run else INCIDENT_FILE)

    def load(self) -> Loaded:
        """The tracker, or an empty one. Raises UnsafeDirectoryError for a state dir it must not
        trust and PermissionError when this process may not read it (both OSError)."""
        with state_dir(self.dir, create=True) as dir_fd:
            try:
                raw, _ = read_regular(self.path.name, MAX_BYTES, dir_fd=dir_fd)
            except FileNotFoundError:
                return Loaded(Tracker())
            except UnusableFileError as exc:
                return self._discard(str(exc), dir_fd)
            try:
                doc = parse_json(raw)
                if not isinstance(doc, dict) or doc.get("version") != INCIDENT_VERSION:
                    raise ValueError(f"not version {INCIDENT_VERSION} of {INCIDENT_FILE}")
                tracker = from_jsonable(Tracker, doc["tracker"])
                _check_ranges(tracker, "tracker")
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                return self._discard(cut(f"corrupt: {type(exc).__name__}: {exc}", 300), dir_fd)
            return Loaded(tracker)

    def save(self, tracker: Tracker) -> None:
        doc = {"version": INCIDENT_VERSION, "tracker": to_jsonable(tracker)}
        data = json.dumps(doc, separators=(",", ":")).encode()
        with state_dir(self.dir, create=True) as dir_fd:
            write_atomic(self.path, data, 0o600, dir_fd=dir_fd)

    def _discard(self, why: str, dir_fd: int) -> Loaded:
        moved = move_aside(self.path, why, then="the incidents restart", dir_fd=dir_fd)
        where = f"set aside as {moved.name}" if moved else "could not be moved aside"
        return Loaded(Tracker(), f"{self.path.name} unusable ({why}); {where}; incidents restart")
