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

The state dir is trusted (pause.json in it stops every recovery), so it is never repaired: a dir
that exists but is a symlink, is not owned by us or is open to group/other is refused
(UnsafeDirectoryError), because whoever created it first could have planted files in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_watchdog.events import Event
from hydra_watchdog.jsonable import from_jsonable, to_jsonable
from hydra_watchdog.regular_file import UnusableFileError, read_regular

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


class UnsafeDirectoryError(OSError):
    """A directory we would have to trust but must not: the message says what is wrong and how to
    fix it. An OSError, so that per-cycle writers treat it like any other failed write."""


def _create_dir(path: Path, mode: int, what: str, *, follow: bool) -> os.stat_result | None:
    """Create `path` with exactly `mode` and return None, or return the stat of what is already
    there (for the caller to judge). UnsafeDirectoryError when it can be neither."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return os.stat(path) if follow else os.lstat(path)
        os.chmod(path, mode)  # ours, just made: this only undoes a umask
    except OSError as exc:
        raise UnsafeDirectoryError(
            f"cannot create the {what} {path}: {exc.strerror or exc}"
        ) from None
    return None


def ensure_private_dir(path: Path) -> None:
    """The state dir: create it 0700 if missing; if it exists it must be a real directory (not a
    symlink) owned by this process's euid with no group/other permissions. Never chmod'ed or
    chown'ed into shape: a user who created it first may already have planted `pause.json`."""
    euid = os.geteuid()
    st = _create_dir(path, 0o700, "state dir", follow=False)
    if st is None:
        return
    fix = (
        f"inspect it (a planted pause.json stops every recovery), then remove it or run "
        f"`chown {euid} {path} && chmod 700 {path}`"
    )
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectoryError(
            f"state dir {path} is a symlink; point state_dir at the real directory"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError(f"state dir {path} exists and is not a directory; move it away")
    if st.st_uid == 0 and euid != 0:  # root's dir seen by a user (`events` unprivileged)
        raise PermissionError(errno.EACCES, f"state dir {path} belongs to root; run as root")
    if st.st_uid != euid:
        raise UnsafeDirectoryError(
            f"state dir {path} is owned by uid {st.st_uid}, not by uid {euid} that runs "
            f"hydra-watchdog: refusing to trust it; {fix}"
        )
    if st.st_mode & 0o077:
        raise UnsafeDirectoryError(
            f"state dir {path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700: other users "
            f"could have written into it; refusing to trust it; {fix}"
        )


def ensure_public_dir(path: Path) -> None:
    """The runtime dir (status.json, world-readable): create it 0755 if missing; refuse one that
    is not a directory, not ours, or writable by group/other (e.g. /tmp), where another user could
    replace status.json with a verdict of their own."""
    euid = os.geteuid()
    st = _create_dir(path, 0o755, "runtime dir", follow=True)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectoryError(f"runtime dir {path} exists and is not a directory")
    if st.st_mode & 0o022:
        raise UnsafeDirectoryError(
            f"runtime dir {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"anyone could replace status.json; use a directory of its own, e.g. "
            f"/run/hydra-watchdog (0755)"
        )
    if st.st_uid != euid:
        raise UnsafeDirectoryError(
            f"runtime dir {path} is owned by uid {st.st_uid}, not by uid {euid} that runs "
            f"hydra-watchdog: its owner could replace status.json; remove it or chown it"
        )


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
            raise ValueError(f"{where} = {str(value)[:40]} is out of range")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_ranges(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, tuple | frozenset):
        for item in value:
            _check_ranges(item, where)


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

    @property
    def max_bytes(self) -> int:
        return STATE_BASE_BYTES + self.events_kept * STATE_BYTES_PER_EVENT

    def load(self) -> Persisted:
        """The saved state, or a fresh one. Never raises for what is in the file (or what stands
        in its place); raises UnsafeDirectoryError for a state dir it must not trust and
        PermissionError when this process may not read it."""
        from hydra_watchdog.policy_state import STATE_VERSION, PolicyState  # noqa: PLC0415

        ensure_private_dir(self.dir)
        self._remove_stale_temps()
        try:
            raw, _ = read_regular(self.path, self.max_bytes)
        except FileNotFoundError:
            return Persisted(PolicyState())
        except UnusableFileError as exc:
            return self._discard(str(exc))
        try:
            doc = parse_json(raw)
            version = doc["version"] if isinstance(doc, dict) else None
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError(f"no integer 'version' (got {str(version)[:40]})")
            if version > STATE_VERSION:
                return self._discard(f"version {version} is newer than this watchdog's")
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
            return self._discard(f"corrupt: {type(exc).__name__}: {exc}"[:300])
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
        ensure_private_dir(self.dir)
        write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode(), 0o600)

    def _discard(self, why: str) -> Persisted:
        from hydra_watchdog.policy_state import PolicyState  # noqa: PLC0415

        moved = move_aside(self.path, why)
        where = f"quarantined as {moved.name}" if moved else "could not be moved aside"
        note = f"{self.path.name} unusable ({why}); {where}; started with a fresh state"
        return Persisted(PolicyState(), (), (note,))

    def _remove_stale_temps(self) -> None:
        # Left by a writer killed between mkstemp and rename. Only old ones: another process
        # (the daemon, while `hydra-watchdog events` loads) may be writing a fresh one right now.
        cutoff = time.time() - STALE_TEMP_AGE
        for tmp in self.dir.glob(f"{_TMP_PREFIX}{self.path.name}.*"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
