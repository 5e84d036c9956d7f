"""The dynamic loader's environment as TabbyAPI has it, for `ldd` on its ExLlamaV2 extension.

On NixOS the extension finds CUDA through TabbyAPI's unit environment (LD_LIBRARY_PATH with
/run/opengl-driver/lib and store paths), not the watchdog's: `ldd` in our own environment can say
"not found" for a library TabbyAPI has. So the environment is, in order:

1. the running TabbyAPI's own: /proc/MAINPID/environ of the unit's main process, or (with no unit
   to ask) of the listener verified as TabbyAPI (identity.ListenerGate);
2. else what the unit would start with: `Environment=` and then `EnvironmentFile=` (which
   override it, as systemd applies them), from `systemctl show`.

Only the loader's variables are kept (LOADER_VARS); the rest of TabbyAPI's environment may hold
secrets and is dropped as soon as it is read, never logged. When neither source can be read the
answer is None with a reason: the library check then says "unknown", which never blocks a restart.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hydra_watchdog.adapters.identity import ListenerCheck, ListenerGate, read_bytes
from hydra_watchdog.config import Config
from hydra_watchdog.observation import UnitStatus
from hydra_watchdog.regular_file import UnusableFileError, read_regular

# What decides which libraries the loader finds for a given file. LD_PRELOAD cannot make a
# library "not found" and LD_AUDIT is not for this; everything else is none of ldd's business.
LOADER_VARS = ("LD_LIBRARY_PATH",)
_MAX_ENVIRON = 1 << 20  # ARG_MAX territory; an environment larger than this is not read whole
_MAX_ENV_FILE = 1 << 20


@dataclass(frozen=True)
class LoaderEnv:
    """The loader's variables TabbyAPI runs (or would start) with, and where they came from."""

    variables: tuple[tuple[str, str], ...]
    source: str  # "pid 1234 (TabbyAPI's main process)", "tabbyapi.service's Environment=", ...

    def as_dict(self) -> dict[str, str]:
        return dict(self.variables)


@dataclass(frozen=True)
class EnvLookup:
    env: LoaderEnv | None  # None: could not be established
    detail: str  # why not, when env is None


def _keep(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    found = {k: v for k, v in pairs if k in LOADER_VARS}
    return tuple((k, found[k]) for k in LOADER_VARS if k in found)


def parse_environ(raw: bytes) -> tuple[tuple[str, str], ...]:
    """/proc/PID/environ (NUL-separated NAME=value) → the loader's variables only."""
    pairs = []
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            pairs.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return _keep(pairs)


def process_env(pid: int, proc_root: str = "/proc") -> tuple[tuple[str, str], ...] | None:
    """The loader's variables of a running process; None when its environ cannot be read."""
    raw = read_bytes(os.path.join(proc_root, str(pid), "environ"), _MAX_ENVIRON)
    if raw is None:
        return None
    return parse_environ(raw)


def parse_assignments(text: str) -> list[tuple[str, str]]:
    """`Environment=` as `systemctl show` prints it: NAME=value words, quoted when needed."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    pairs = []
    for word in words:
        name, sep, value = word.partition("=")
        if sep:
            pairs.append((name, value))
    return pairs


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """An EnvironmentFile: NAME=value lines, # or ; comments, optional quotes."""
    pairs = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        pairs.append((name.strip().removeprefix("export ").strip(), value))
    return pairs


def parse_env_files_property(lines: Iterable[str]) -> list[tuple[str, bool]]:
    """`EnvironmentFiles=/path (ignore_errors=no)` lines → [(path, ignore_errors)]."""
    files = []
    for line in lines:
        path, _, flags = line.strip().partition(" (")
        if path:
            files.append((path, "ignore_errors=yes" in flags))
    return files


def unit_env(
    name: str,
    environment: str,
    env_files: Iterable[tuple[str, bool]],
    *,
    root: str = "/",
) -> EnvLookup:
    """What the unit would start with: Environment= overridden by the EnvironmentFile=s."""
    pairs = parse_assignments(environment)
    for path, ignore_errors in env_files:
        try:  # a regular file, bounded: a FIFO named there must not hang the cycle
            raw, _ = read_regular(os.path.join(root, path.lstrip("/")), _MAX_ENV_FILE, follow=True)
        except (OSError, UnusableFileError) as exc:
            if ignore_errors:
                continue
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return EnvLookup(None, f"{name}'s EnvironmentFile {path} unreadable ({why})")
        text = raw.decode("utf-8", "replace")
        pairs += parse_env_file(text)
    return EnvLookup(LoaderEnv(_keep(pairs), f"{name}'s Environment=/EnvironmentFile="), "")


class ListenerGateLike(Protocol):
    def set_unit(self, unit: UnitStatus) -> None: ...
    def check(self) -> ListenerCheck: ...


# (unit) -> the unit's configured environment, as the systemd adapter reads it
UnitEnvReader = Callable[[UnitStatus], EnvLookup]
# (unit) -> the pid of the listener verified as TabbyAPI, or None (no unit to ask)
ListenerPid = Callable[[UnitStatus], int | None]


class TabbyEnvironment:
    """Resolves TabbyAPI's loader environment for one library check."""

    def __init__(
        self,
        *,
        unit_env: UnitEnvReader | None = None,
        listener_pid: ListenerPid | None = None,
        proc_root: str = "/proc",
    ) -> None:
        self._unit_env = unit_env
        self._listener_pid = listener_pid
        self.proc_root = proc_root

    def lookup(self, unit: UnitStatus | None) -> EnvLookup:
        if unit is None:
            return EnvLookup(None, "TabbyAPI's unit not read this cycle")
        if unit.exists and unit.main_pid:
            found = process_env(unit.main_pid, self.proc_root)
            if found is not None:
                where = f"pid {unit.main_pid}, {unit.name}'s MainPID"
                return EnvLookup(LoaderEnv(found, where), "")
        if not unit.exists:
            pid = self._listener_pid(unit) if self._listener_pid is not None else None
            if pid is not None:
                found = process_env(pid, self.proc_root)
                if found is not None:
                    return EnvLookup(LoaderEnv(found, f"pid {pid}, TabbyAPI's listener"), "")
            return EnvLookup(None, "no unit and no verified TabbyAPI listener to read it from")
        if self._unit_env is None:
            return EnvLookup(None, f"{unit.name}'s environment cannot be read here")
        return self._unit_env(unit)


def describe_env(env: Mapping[str, str]) -> str:
    """For the check's detail: the loader's variables only (nothing else is ever kept)."""
    return ", ".join(f"{k}={v}" for k, v in env.items()) or "no LD_LIBRARY_PATH"


def verified_listener(gate_factory: Callable[[], ListenerGateLike]) -> ListenerPid:
    """The pid behind TabbyAPI's port when the identity rules (identity.ListenerGate) accept it
    as TabbyAPI's: the no-unit case's process to read the environment of."""

    def pid(unit: UnitStatus) -> int | None:
        gate = gate_factory()
        gate.set_unit(unit)
        check = gate.check()
        return check.pid if check.ok else None

    return pid


def tabby_environment(config: Config, unit_env: UnitEnvReader) -> TabbyEnvironment:
    """The resolver for this node: the unit's MainPID, the verified listener, the unit file."""

    def gate() -> ListenerGate:
        return ListenerGate.from_config(config)

    return TabbyEnvironment(unit_env=unit_env, listener_pid=verified_listener(gate))
