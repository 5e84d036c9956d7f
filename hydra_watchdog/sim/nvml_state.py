"""The state file of the simulated libnvidia-ml.so.1 (nvml_sim.c), seen from Python.

The C library re-reads this file at every NVML call, so editing it changes the "GPU" under a
running daemon. The format is documented at the top of nvml_sim.c; this module is its only
Python writer. Writers take an exclusive flock on "<file>.lock" (the C library takes the same
lock when nvmlDeviceSetPowerManagementLimit persists a new limit) and replace the file by
rename, so a reader never sees half a file and no read-modify-write loses another's change.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from urllib.parse import quote, unquote

STATE_ENV = "HYDRA_NVML_SIM_STATE"  # the variable nvml_sim.c reads the file's path from

GIB = 1024**3
MIB = 1024**2


class NvmlCode(IntEnum):
    """NVML return codes worth simulating (the values of nvml.h)."""

    UNINITIALIZED = 1
    INVALID_ARGUMENT = 2
    NOT_SUPPORTED = 3
    NO_PERMISSION = 4
    NOT_FOUND = 6
    DRIVER_NOT_LOADED = 9
    TIMEOUT = 10
    FUNCTION_NOT_FOUND = 13
    GPU_IS_LOST = 15
    LIB_RM_VERSION_MISMATCH = 18
    UNKNOWN = 999


class StateFormatError(ValueError):
    """The state file holds a line this module cannot read."""


@dataclass(frozen=True)
class SimDevice:
    index: int
    uuid: str
    name: str
    mem_total: int
    mem_reserved: int = 0  # counted in v1 "used", reported apart by v2
    mem_base: int = 0  # used by the driver/context even with no process listed
    power_usage_mw: int = 0
    power_limit_mw: int = 0
    power_enforced_mw: int = 0  # 0: follows power_limit_mw
    power_min_mw: int = 0
    power_max_mw: int = 0
    power_default_mw: int = 0
    temperature_c: int = 40
    util_gpu: int = 0
    util_mem: int = 0
    reasons: int = 0  # clock-event reason bits (0x4 SwPowerCap, 0x40 HwThermal, ...)
    set_permission: bool = True  # False: SetPowerManagementLimit answers NoPermission


@dataclass(frozen=True)
class SimProcess:
    gpu: int
    pid: int
    used_bytes: int


@dataclass(frozen=True)
class SimFault:
    """Calls of `symbol` ("*": every call but nvmlShutdown) return `code`."""

    symbol: str
    code: int
    gpu: int | None = None  # None: whatever device the call is about


@dataclass(frozen=True)
class SimHang:
    """Calls of `symbol` sleep `seconds` first; negative: until this hang is removed."""

    symbol: str
    seconds: float
    gpu: int | None = None


@dataclass(frozen=True)
class SimState:
    devices: tuple[SimDevice, ...] = ()
    processes: tuple[SimProcess, ...] = ()
    faults: tuple[SimFault, ...] = ()
    hangs: tuple[SimHang, ...] = ()
    driver_loaded: bool = True
    driver_version: str = "570.133.07"

    def device(self, index: int) -> SimDevice:
        for dev in self.devices:
            if dev.index == index:
                return dev
        raise KeyError(f"no simulated GPU {index}")


# ---- text format -------------------------------------------------------------------------

# (file key, SimDevice field) in the order they are written; uuid and name are %-escaped.
_DEVICE_KEYS: tuple[tuple[str, str], ...] = (
    ("uuid", "uuid"),
    ("name", "name"),
    ("mem_total", "mem_total"),
    ("mem_reserved", "mem_reserved"),
    ("mem_base", "mem_base"),
    ("power_usage_mw", "power_usage_mw"),
    ("power_limit_mw", "power_limit_mw"),
    ("power_enforced_mw", "power_enforced_mw"),
    ("power_min_mw", "power_min_mw"),
    ("power_max_mw", "power_max_mw"),
    ("power_default_mw", "power_default_mw"),
    ("temp", "temperature_c"),
    ("util_gpu", "util_gpu"),
    ("util_mem", "util_mem"),
    ("reasons", "reasons"),
    ("set_permission", "set_permission"),
)
_FIELD_OF_KEY = dict(_DEVICE_KEYS)
_TEXT_KEYS = frozenset({"uuid", "name"})


def _escape(text: str) -> str:
    return quote(text, safe="-_.:/()+")


def render_state(state: SimState) -> str:
    lines = [
        "# hydra-watchdog NVML simulator state (format: hydra_watchdog/sim/nvml_sim.c)",
        f"driver_loaded {int(state.driver_loaded)}",
        f"driver_version {_escape(state.driver_version)}",
    ]
    for dev in sorted(state.devices, key=lambda d: d.index):
        fields = []
        for key, attr in _DEVICE_KEYS:
            value = getattr(dev, attr)
            text = _escape(value) if key in _TEXT_KEYS else str(int(value))
            fields.append(f"{key}={text}")
        lines.append(f"device {dev.index} " + " ".join(fields))
    lines.extend(f"proc {p.gpu} {p.pid} {p.used_bytes}" for p in state.processes)
    for f in state.faults:
        lines.append(f"fail {f.symbol} {f.code}" + ("" if f.gpu is None else f" {f.gpu}"))
    for h in state.hangs:
        lines.append(f"hang {h.symbol} {h.seconds!r}" + ("" if h.gpu is None else f" {h.gpu}"))
    return "\n".join(lines) + "\n"


def _int(text: str, lineno: int) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise StateFormatError(f"line {lineno}: {text!r} is not an integer") from None


def _parse_device(words: list[str], lineno: int) -> SimDevice:
    values: dict[str, object] = {"index": _int(words[1], lineno)}
    for kv in words[2:]:
        key, eq, text = kv.partition("=")
        if not eq or key not in _FIELD_OF_KEY:
            raise StateFormatError(f"line {lineno}: unknown device field {kv!r}")
        attr = _FIELD_OF_KEY[key]
        if key in _TEXT_KEYS:
            values[attr] = unquote(text)
        elif key == "set_permission":
            values[attr] = _int(text, lineno) != 0
        else:
            values[attr] = _int(text, lineno)
    for required in ("uuid", "name", "mem_total"):
        if required not in values:
            raise StateFormatError(f"line {lineno}: device without {required}")
    return SimDevice(**values)  # type: ignore[arg-type]


def parse_state(text: str) -> SimState:
    devices: list[SimDevice] = []
    processes: list[SimProcess] = []
    faults: list[SimFault] = []
    hangs: list[SimHang] = []
    driver_loaded = True
    driver_version = SimState.driver_version
    for lineno, raw in enumerate(text.splitlines(), 1):
        words = raw.partition("#")[0].split()
        if not words:
            continue
        head, args = words[0], words[1:]
        if head == "driver_loaded" and len(args) == 1:
            driver_loaded = _int(args[0], lineno) != 0
        elif head == "driver_version" and len(args) == 1:
            driver_version = unquote(args[0])
        elif head == "device" and args:
            devices.append(_parse_device(words, lineno))
        elif head == "proc" and len(args) == 3:
            gpu, pid, used = (_int(a, lineno) for a in args)
            processes.append(SimProcess(gpu, pid, used))
        elif head == "fail" and len(args) in (2, 3):
            gpu_opt = _int(args[2], lineno) if len(args) == 3 else None
            faults.append(SimFault(args[0], _int(args[1], lineno), gpu_opt))
        elif head == "hang" and len(args) in (2, 3):
            try:
                seconds = float(args[1])
            except ValueError:
                raise StateFormatError(f"line {lineno}: bad hang seconds {args[1]!r}") from None
            gpu_opt = _int(args[2], lineno) if len(args) == 3 else None
            hangs.append(SimHang(args[0], seconds, gpu_opt))
        else:
            raise StateFormatError(f"line {lineno}: cannot read {raw.strip()!r}")
    return SimState(
        devices=tuple(devices),
        processes=tuple(processes),
        faults=tuple(faults),
        hangs=tuple(hangs),
        driver_loaded=driver_loaded,
        driver_version=driver_version,
    )


# ---- the file ----------------------------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # the daemon under test may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path | str) -> SimState:
    return parse_state(Path(path).read_text())


def write_state(path: Path | str, state: SimState) -> None:
    p = Path(path)
    with _locked(p):
        _replace(p, render_state(state))


def update(path: Path | str, fn: Callable[[SimState], SimState]) -> SimState:
    """Read, change and write the state under the lock; returns the new state."""
    p = Path(path)
    with _locked(p):
        new = fn(read_state(p))
        _replace(p, render_state(new))
    return new


# ---- what the simulated driver reports ----------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Alive as the driver sees it: an exited process (even an unreaped zombie) holds no memory."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"])


def live_processes(state: SimState, gpu_index: int) -> tuple[SimProcess, ...]:
    return tuple(p for p in state.processes if p.gpu == gpu_index and pid_alive(p.pid))


def used_bytes(state: SimState, gpu_index: int) -> int:
    """What NVML's v2 `used` reports: base plus the live processes, capped at the usable size."""
    dev = state.device(gpu_index)
    usable = max(dev.mem_total - dev.mem_reserved, 0)
    return min(dev.mem_base + sum(p.used_bytes for p in live_processes(state, gpu_index)), usable)


def free_bytes(path: Path | str, gpu_index: int) -> int:
    """What NVML's v2 `free` reports for that GPU right now."""
    state = read_state(path)
    dev = state.device(gpu_index)
    return max(dev.mem_total - dev.mem_reserved, 0) - used_bytes(state, gpu_index)


def set_process(path: Path | str, gpu_index: int, pid: int, used_bytes: int) -> None:
    """List `pid` on that GPU holding `used_bytes` (replacing its earlier entry there)."""

    def change(state: SimState) -> SimState:
        state.device(gpu_index)  # KeyError for a GPU the file does not have
        others = tuple(p for p in state.processes if (p.gpu, p.pid) != (gpu_index, pid))
        return replace(state, processes=(*others, SimProcess(gpu_index, pid, used_bytes)))

    update(path, change)


def remove_process(path: Path | str, pid: int) -> None:
    """Drop `pid` from every GPU."""
    update(path, lambda s: replace(s, processes=tuple(p for p in s.processes if p.pid != pid)))


def set_fault(path: Path | str, symbol: str, code: int, gpu: int | None = None) -> None:
    """Make `symbol` fail with `code` (replacing an earlier fault for the same call and GPU)."""

    def change(state: SimState) -> SimState:
        kept = tuple(f for f in state.faults if (f.symbol, f.gpu) != (symbol, gpu))
        return replace(state, faults=(*kept, SimFault(symbol, int(code), gpu)))

    update(path, change)


def set_hang(path: Path | str, symbol: str, seconds: float, gpu: int | None = None) -> None:
    """Make `symbol` sleep `seconds` before answering; negative: until clear_faults()."""

    def change(state: SimState) -> SimState:
        kept = tuple(h for h in state.hangs if (h.symbol, h.gpu) != (symbol, gpu))
        return replace(state, hangs=(*kept, SimHang(symbol, seconds, gpu)))

    update(path, change)


def clear_faults(path: Path | str) -> None:
    """Remove every fault and hang (releases calls stuck in an open-ended hang)."""
    update(path, lambda s: replace(s, faults=(), hangs=()))


def set_driver_loaded(path: Path | str, loaded: bool) -> None:
    update(path, lambda s: replace(s, driver_loaded=loaded))


def set_device(path: Path | str, gpu_index: int, **changes: object) -> None:
    """Change fields of one GPU, e.g. set_device(p, 0, temperature_c=91, reasons=0x40)."""

    def change(state: SimState) -> SimState:
        new = replace(state.device(gpu_index), **changes)  # type: ignore[arg-type]
        devices = tuple(new if d.index == gpu_index else d for d in state.devices)
        return replace(state, devices=devices)

    update(path, change)


def driver_reset(path: Path | str) -> None:
    """What a driver reload or GPU reset does to the power limit: every GPU back to its default."""

    def change(state: SimState) -> SimState:
        devices = tuple(
            replace(d, power_limit_mw=d.power_default_mw, power_enforced_mw=0)
            for d in state.devices
        )
        return replace(state, devices=devices)

    update(path, change)


def default_state() -> SimState:
    """hydra-ai: an RTX 5090 (32 GiB, 400-600 W, default 575 W) and an RTX 4090 (24 GiB,
    150-450 W, default 450 W), idle, both at their default power limit."""
    return SimState(
        devices=(
            SimDevice(
                index=0,
                uuid="GPU-5090a1b2-c3d4-e5f6-0718-293a4b5c6d7e",
                name="NVIDIA GeForce RTX 5090",
                mem_total=32 * GIB,
                mem_reserved=400 * MIB,
                mem_base=600 * MIB,
                power_usage_mw=32_000,
                power_limit_mw=575_000,
                power_min_mw=400_000,
                power_max_mw=600_000,
                power_default_mw=575_000,
                temperature_c=38,
                util_gpu=0,
                util_mem=0,
                reasons=0x1,  # GpuIdle
            ),
            SimDevice(
                index=1,
                uuid="GPU-4090f0e1-d2c3-b4a5-9687-78695a4b3c2d",
                name="NVIDIA GeForce RTX 4090",
                mem_total=24 * GIB,
                mem_reserved=300 * MIB,
                mem_base=450 * MIB,
                power_usage_mw=21_000,
                power_limit_mw=450_000,
                power_min_mw=150_000,
                power_max_mw=450_000,
                power_default_mw=450_000,
                temperature_c=35,
                reasons=0x1,
            ),
        ),
    )
