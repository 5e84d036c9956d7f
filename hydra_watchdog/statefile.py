"""The daemon's memory across restarts: PolicyState (back-off, restart history, loads, power
denials) and the last N events, in one JSON file under `watchdog.state_dir`.

Why it must survive: a watchdog restarted by systemd (or killed with -9 in the middle of a
recovery) that forgot its back-off would hammer a broken TabbyAPI again from step zero. So every
write is atomic (temp file in the same directory, fsync, rename, fsync of the directory): a crash
at any instant leaves either the old file or the new one, never a torn mix.

Monotonic stamps in PolicyState are only meaningful within one boot; the file records the boot id
and a state from another boot is `rebased()`. A file we cannot read (corrupt, a future version) is
moved aside as `state.json.corrupt-<ts>` with a warning and the daemon starts fresh: never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_watchdog.events import Event
from hydra_watchdog.policy_state import STATE_VERSION, PolicyState, from_jsonable, to_jsonable

STATE_FILE = "state.json"
# A dry run keeps its own memory: its pretended restarts and loads must not count against the
# real daemon's budget, nor look like a lost load to it.
DRY_RUN_STATE_FILE = "state.dry-run.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_TMP_PREFIX = ".tmp-"
STALE_TEMP_AGE = 60.0  # seconds; a write takes milliseconds

log = logging.getLogger(__name__)


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id; "" where the kernel does not offer one (then every load is a new boot)."""
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def ensure_dir(path: Path, mode: int) -> None:
    """Create `path` (and parents) and give it exactly `mode`: a pre-existing directory with
    looser permissions would leak the state (restart history, pause reasons) to other users."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    if (path.stat().st_mode & 0o777) != mode:
        path.chmod(mode)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so that a crash at any instant leaves the old or the new file.

    The temp file lives in the same directory (rename is only atomic within one filesystem), is
    fsynced before the rename (else the rename can reach the disk before the data), and the
    directory is fsynced after it (else the rename itself can be lost on power failure).
    """
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def move_aside(path: Path, why: str, *, wall: float | None = None) -> Path | None:
    """Keep a file we cannot use as evidence (`<name>.corrupt-<ts>`) and warn; None if even that
    failed (then the caller goes on without it: the next write replaces it)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if wall is None else wall))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    try:
        os.replace(path, target)
    except OSError as exc:
        log.warning("%s is unusable (%s) and could not be moved aside: %s", path, why, exc)
        return None
    log.warning("%s is unusable (%s); moved it to %s and started afresh", path, why, target)
    return target


@dataclass(frozen=True)
class Persisted:
    """What a load found. `notes` are warnings for the event log (moved aside, rebased)."""

    state: PolicyState
    events: tuple[Event, ...] = ()
    notes: tuple[str, ...] = ()
    rebased: bool = False


class StateFile:
    """`state.json` in `state_dir` (0700), written 0600."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        events_kept: int,
        boot_id: str | None = None,
        name: str = STATE_FILE,
    ):
        self.dir = Path(state_dir)
        self.path = self.dir / name
        self.events_kept = events_kept
        self.boot_id = read_boot_id() if boot_id is None else boot_id

    def load(self) -> Persisted:
        """The saved state, or a fresh one. Never raises for what is in the file."""
        ensure_dir(self.dir, 0o700)
        self._remove_stale_temps()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Persisted(PolicyState())
        try:
            doc = json.loads(raw)
            version = doc["version"] if isinstance(doc, dict) else None
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError(f"no integer 'version' (got {version!r})")
            if version > STATE_VERSION:
                return self._discard(f"version {version} is newer than this watchdog's")
            state = from_jsonable(PolicyState, doc["state"])
            events = tuple(from_jsonable(Event, e) for e in doc.get("events", []))
            boot_id = doc.get("boot_id", "")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            return self._discard(f"corrupt: {type(exc).__name__}: {exc}"[:300])
        if boot_id != self.boot_id or not self.boot_id:
            note = "state from another boot: monotonic times dropped, back-off step kept"
            return Persisted(state.rebased(), events, (note,), rebased=True)
        return Persisted(state, events)

    def save(self, state: PolicyState, events: tuple[Event, ...] | list[Event]) -> None:
        """Write atomically; only the last `events_kept` events are kept."""
        kept = tuple(events)[-self.events_kept :]
        doc: dict[str, Any] = {
            "version": STATE_VERSION,
            "boot_id": self.boot_id,
            "written_wall": time.time(),
            "state": to_jsonable(state),
            "events": [to_jsonable(e) for e in kept],
        }
        ensure_dir(self.dir, 0o700)
        write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode(), 0o600)

    def _discard(self, why: str) -> Persisted:
        moved = move_aside(self.path, why)
        where = f"moved to {moved.name}" if moved else "could not be moved aside"
        return Persisted(PolicyState(), (), (f"{self.path.name} unusable ({why}); {where}",))

    def _remove_stale_temps(self) -> None:
        # Left by a writer killed between mkstemp and rename. Only old ones: another process
        # (the daemon, while `hydra-watchdog events` loads) may be writing a fresh one right now.
        cutoff = time.time() - STALE_TEMP_AGE
        for tmp in self.dir.glob(f"{_TMP_PREFIX}{self.path.name}.*"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
