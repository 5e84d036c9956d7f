"""The daemon's memory across restarts: PolicyState (back-off, restart history, loads, power
denials) and the last N events, in one JSON file under `watchdog.state_dir`.

Why it must survive: a watchdog restarted by systemd (or killed with -9 in the middle of a
recovery) that forgot its back-off would hammer a broken TabbyAPI again from step zero. So every
write is atomic (temp file in the same directory, fsync, rename, fsync of the directory): a crash
at any instant leaves either the old file or the new one, never a torn mix.

Monotonic stamps in PolicyState are only meaningful within one boot; the file records the boot id
and a state from another boot is `rebased()`. A file we cannot read (corrupt, a future version) is
moved aside as `state.json.corrupt-<ts>` with a warning and the daemon starts fresh: never a crash.
That includes what json accepts but the policy cannot use: NaN/Infinity, a 400-digit number, a
negative count, a directory or a FIFO in the file's place, a file too large to be ours.

The state dir is trusted (pause.json in it stops every recovery, load.json names the process a
stop signals), so it is never repaired: trusted_path's rule holds for every component of its path
and the dir itself is 0700, or it is refused (UnsafeDirectoryError), because whoever created or
can replace it could have planted files in it. Every read and write walks that path again and
opens the file relative to the directory it checked, never following a symlink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_watchdog.events import Event
from hydra_watchdog.jsonable import from_jsonable, to_jsonable
from hydra_watchdog.printable import cut
from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.trusted_path import open_trusted_dir, state_dir

if TYPE_CHECKING:  # imported where used: `status` reads its file with read_regular, no policy
    from hydra_watchdog.policy_state import PolicyState

STATE_FILE = "state.json"
# A dry run keeps its own memory: its pretended restarts and loads must not count against the
# real daemon's budget, nor look like a lost load to it.
DRY_RUN_STATE_FILE = "state.dry-run.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_TMP_PREFIX = ".tmp-"
STALE_TEMP_AGE = 60.0  # seconds; a write takes milliseconds
# Our own file is ~1 KiB per event; anything far beyond that is not ours and must not be read
# whole into memory at start-up.
STATE_BASE_BYTES = 1024**2
STATE_BYTES_PER_EVENT = 64 * 1024
# Sane ranges: times are monotonic or wall seconds (1e12 s is 30,000 years), counts, indexes and
# watts are small non-negative numbers. Beyond them a value is corruption, not history.
MAX_TIME = 1e12
MAX_COUNT = 2**32  # NRestarts is a uint32

log = logging.getLogger(__name__)


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id; "" where the kernel does not offer one (then every load is a new boot)."""
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def ensure_private_dir(path: Path) -> None:
    """The state dir: created 0700 if missing; if it exists, trusted_path's rule holds for every
    component and the dir itself is 0700. Never chmod'ed or chown'ed into shape: a user who
    created it first may already have planted `pause.json`. UnsafeDirectoryError names the
    component that breaks the rule."""
    os.close(open_trusted_dir(path, what="state dir", private=True, create_mode=0o700))


def ensure_public_dir(path: Path) -> None:
    """The runtime dir (status.json, world-readable): created 0755 if missing; refused when a
    component breaks trusted_path's rule (e.g. the dir is /tmp itself, or a symlink), where
    another user could replace status.json with a verdict of their own."""
    os.close(open_trusted_dir(path, what="runtime dir", create_mode=0o755))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this file can hold")


def parse_json(raw: bytes) -> Any:
    """json.loads, refusing NaN and +/-Infinity (Python's json accepts them)."""
    return json.loads(raw, parse_constant=_refuse_constant)


def _check_ranges(value: Any, where: str) -> None:
    """Every number in a loaded dataclass finite and in its sane range (see MAX_TIME), every
    string valid text."""
    if isinstance(value, bool | Enum) or value is None:
        return
    if isinstance(value, str):
        try:  # a lone surrogate would break the journal and the status file later
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} is not valid UTF-8 text") from None
    elif isinstance(value, float):
        if not (math.isfinite(value) and 0.0 <= value <= MAX_TIME):
            raise ValueError(f"{where} = {value!r} is out of range")
    elif isinstance(value, int):
        if not 0 <= value <= MAX_COUNT:
            raise ValueError(f"{where} = {cut(str(value), 40)} is out of range")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_ranges(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, tuple | frozenset):
        for item in value:
            _check_ranges(item, where)


def write_atomic(path: Path, data: bytes, mode: int, *, dir_fd: int | None = None) -> None:
    """Replace `path` with `data` so that a crash at any instant leaves the old or the new file.

    With `dir_fd` (a trusted_path descriptor), `path.name` is written in that directory and the
    path's own directory is never looked up again. The temp file lives in the same directory
    (rename is only atomic within one filesystem), is fsynced before the rename (else the rename
    can reach the disk before the data), and the directory is fsynced after it (else the rename
    itself can be lost on power failure). No symlink is followed.
    """
    if dir_fd is None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        own_fd = os.open(path.parent, flags)
        try:
            write_atomic(path, data, mode, dir_fd=own_fd)
        finally:
            os.close(own_fd)
        return
    name = path.name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = f"{_TMP_PREFIX}{name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def move_aside(
    path: Path,
    why: str,
    *,
    then: str = "started afresh",
    wall: float | None = None,
    dir_fd: int | None = None,
) -> Path | None:
    """Keep a file we cannot use as evidence (`<name>.corrupt-<ts>`) and warn, saying what the
    caller does without it (`then`: the state starts afresh, a load record is never acted on);
    None if even that failed (then the caller goes on without it: the next write replaces it).
    With `dir_fd`, `path.name` in that directory (write_atomic)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if wall is None else wall))
    name = path.name if dir_fd is not None else str(path)
    target = f"{name}.corrupt-{stamp}"
    n = 1
    while _lexists(target, dir_fd):
        n += 1
        target = f"{name}.corrupt-{stamp}.{n}"
    try:
        os.replace(name, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        log.warning("%s is unusable (%s) and could not be moved aside: %s", path, why, exc)
        return None
    moved = path.with_name(os.path.basename(target))
    log.warning("%s is unusable (%s); moved it to %s; %s", path, why, moved, then)
    return moved


def _lexists(name: str, dir_fd: int | None) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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

    @property
    def max_bytes(self) -> int:
        return STATE_BASE_BYTES + self.events_kept * STATE_BYTES_PER_EVENT

    def load(self, *, read_only: bool = False) -> Persisted:
        """The saved state, or a fresh one. Never raises for what is in the file (or what stands
        in its place); raises UnsafeDirectoryError for a state dir it must not trust and
        PermissionError when this process may not read it. `read_only` (`check`, beside a
        running daemon): nothing is created, cleaned up or moved aside; a file it cannot use
        reads as a fresh state, with a note saying why."""
        from hydra_watchdog.policy_state import PolicyState  # noqa: PLC0415

        try:
            with state_dir(self.dir, create=not read_only) as dir_fd:
                if not read_only:
                    self._remove_stale_temps(dir_fd)
                try:
                    raw, _ = read_regular(self.path.name, self.max_bytes, dir_fd=dir_fd)
                    parsed = self._parse(raw)
                except UnusableFileError as exc:
                    parsed = str(exc)
                if not isinstance(parsed, str):
                    return parsed
                return self._unusable(parsed) if read_only else self._discard(parsed, dir_fd)
        except FileNotFoundError:  # no file, or (read only) no state dir yet
            return Persisted(PolicyState())

    def _parse(self, raw: bytes) -> Persisted | str:
        """What the file holds, or why it cannot be used."""
        from hydra_watchdog.policy_state import STATE_VERSION, PolicyState  # noqa: PLC0415

        try:
            doc = parse_json(raw)
            version = doc["version"] if isinstance(doc, dict) else None
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError(f"no integer 'version' (got {cut(str(version), 40)})")
            if version > STATE_VERSION:
                return f"version {version} is newer than this watchdog's"
            state = from_jsonable(PolicyState, doc["state"])
            _check_ranges(state, "state")
            raw_events = doc.get("events", [])
            if not isinstance(raw_events, list):
                raise TypeError("'events' is not a list")
            events = tuple(from_jsonable(Event, e) for e in raw_events)
            _check_ranges(events, "events")
            boot_id = doc.get("boot_id", "")
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            RecursionError,
            OverflowError,
        ) as exc:
            return cut(f"corrupt: {type(exc).__name__}: {exc}", 300)
        if boot_id != self.boot_id or not self.boot_id:
            note = "state from another boot: monotonic times dropped, back-off step kept"
            return Persisted(state.rebased(), events, (note,), rebased=True)
        return Persisted(state, events)

    def save(self, state: PolicyState, events: tuple[Event, ...] | list[Event]) -> None:
        """Write atomically; only the last `events_kept` events are kept."""
        from hydra_watchdog.policy_state import STATE_VERSION  # noqa: PLC0415

        kept = tuple(events)[-self.events_kept :]
        doc: dict[str, Any] = {
            "version": STATE_VERSION,
            "boot_id": self.boot_id,
            "written_wall": time.time(),
            "state": to_jsonable(state),
            "events": [to_jsonable(e) for e in kept],
        }
        with state_dir(self.dir, create=True) as dir_fd:
            data = json.dumps(doc, separators=(",", ":")).encode()
            write_atomic(self.path, data, 0o600, dir_fd=dir_fd)

    def _discard(self, why: str, dir_fd: int) -> Persisted:
        from hydra_watchdog.policy_state import PolicyState  # noqa: PLC0415

        moved = move_aside(self.path, why, dir_fd=dir_fd)
        where = f"quarantined as {moved.name}" if moved else "could not be moved aside"
        note = f"{self.path.name} unusable ({why}); {where}; started with a fresh state"
        return Persisted(PolicyState(), (), (note,))

    def _unusable(self, why: str) -> Persisted:
        from hydra_watchdog.policy_state import PolicyState  # noqa: PLC0415

        return Persisted(PolicyState(), (), (f"{self.path.name} unusable ({why})",))

    def _remove_stale_temps(self, dir_fd: int) -> None:
        # Left by a writer killed between its temp file and the rename. Only old ones: another
        # process (the daemon, while `hydra-watchdog events` loads) may be writing one right now.
        cutoff = time.time() - STALE_TEMP_AGE
        prefix = f"{_TMP_PREFIX}{self.path.name}."
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.name, dir_fd=dir_fd)
