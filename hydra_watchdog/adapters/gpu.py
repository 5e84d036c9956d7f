"""The GPU probe: NVML through nvidia-ml-py, every call bounded in time.

Theory of operation
-------------------
A GPU that falls off the bus can hang an NVML call for minutes, and a Python thread cannot be
cancelled. So one lane (adapters/bounded.py: a long-lived worker thread; CallRunner here) runs
every NVML call, and the caller waits at most `call_timeout` for each. A call that misses its
deadline is reported as TIMEOUT and stays "stuck": until it returns, every further call is
answered TIMEOUT at once without being queued, so a hung driver costs one deadline per read,
never a growing pile of threads. When the stuck call finally returns, the lane takes new calls
again.

nvmlInit runs lazily on the first read. A call that says the driver went away (DriverNotLoaded,
GpuIsLost, Uninitialized, an RM version mismatch) marks the library for re-initialisation on the
next read or set: nvmlShutdown, then nvmlInit, as after a driver reload.

Errors are mapped by exception class, never by comparing instances: pynvml's NVMLError defines
__eq__ (so instances are unhashable and comparing with other exceptions raises), and
NVMLLibraryMismatchError is not an NVMLError subclass.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from hydra_watchdog.adapters.bounded import Lane, Refused, Why
from hydra_watchdog.config import Config, GpuDevice
from hydra_watchdog.interfaces import PowerSetOutcome
from hydra_watchdog.observation import (
    GpuProcess,
    GpuReport,
    GpuSnapshot,
    NvmlErrorKind,
    PowerInfo,
)

_T = TypeVar("_T")

# Clock-event reason bits (nvml.h nvmlClocksEventReason*) and the names we report.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def decode_clock_event_reasons(bits: int) -> tuple[str, ...]:
    """Names of the set bits, in bit order; an unknown bit is named by its value."""
    names = [name for bit, name in CLOCK_EVENT_REASONS if bits & bit]
    known = 0
    for bit, _ in CLOCK_EVENT_REASONS:
        known |= bit
    unknown = bits & ~known
    bit = 1
    while unknown:
        if unknown & bit:
            names.append(f"unknown_{bit:#x}")
            unknown &= ~bit
        bit <<= 1
    return tuple(names)


@dataclass(frozen=True)
class NvmlFailure:
    """Why an NVML call gave no value. `code` is NVML's return code when there was one."""

    kind: NvmlErrorKind
    detail: str
    code: int | None = None
    reinit: bool = False  # the library must be shut down and initialised again


# Matched in order with isinstance: the class decides, never NVMLError.__eq__.
_KIND_OF_CLASS: tuple[tuple[type[BaseException], NvmlErrorKind], ...] = (
    (pynvml.NVMLError_NoPermission, NvmlErrorKind.NO_PERMISSION),
    (pynvml.NVMLError_NotSupported, NvmlErrorKind.NOT_SUPPORTED),
    (pynvml.NVMLError_GpuIsLost, NvmlErrorKind.GPU_LOST),
    (pynvml.NVMLError_DriverNotLoaded, NvmlErrorKind.DRIVER_NOT_LOADED),
    (pynvml.NVMLError_LibraryNotFound, NvmlErrorKind.LIBRARY_NOT_FOUND),
    (pynvml.NVMLError_FunctionNotFound, NvmlErrorKind.FUNCTION_NOT_FOUND),
    (pynvml.NVMLLibraryMismatchError, NvmlErrorKind.LIBRARY_MISMATCH),
    (pynvml.NVMLError_LibRmVersionMismatch, NvmlErrorKind.LIBRARY_MISMATCH),
    (pynvml.NVMLError_NotFound, NvmlErrorKind.NOT_FOUND),
    (pynvml.NVMLError_InvalidArgument, NvmlErrorKind.INVALID_ARGUMENT),
    (pynvml.NVMLError_Timeout, NvmlErrorKind.TIMEOUT),
)
_REINIT_CLASSES: tuple[type[BaseException], ...] = (
    pynvml.NVMLError_DriverNotLoaded,
    pynvml.NVMLError_GpuIsLost,
    pynvml.NVMLError_Uninitialized,
    pynvml.NVMLError_LibRmVersionMismatch,
)
# Memory v2 is missing on old drivers: the symbol is absent, or the struct version is refused.
_NO_V2_CODES = (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)


def classify(exc: BaseException, what: str) -> NvmlFailure:
    """Turn whatever an NVML call raised into a typed failure with a message for humans."""
    code = getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None
    kind = NvmlErrorKind.OTHER
    for cls, k in _KIND_OF_CLASS:
        if isinstance(exc, cls):
            kind = k
            break
    else:
        if isinstance(exc, OSError):  # ctypes could not load an explicit library path
            kind = NvmlErrorKind.LIBRARY_NOT_FOUND
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may be the problem
        text = type(exc).__name__
    suffix = f" (NVML code {code})" if isinstance(code, int) else ""
    return NvmlFailure(
        kind=kind,
        detail=f"{what}: {text}{suffix}",
        code=code if isinstance(code, int) else None,
        reinit=isinstance(exc, _REINIT_CLASSES),
    )


class CallRunner:
    """NVML's calls on one lane (adapters/bounded.py), each waited for at most `timeout`.

    A call past its deadline returns TIMEOUT and stays stuck; while it is stuck, new calls get
    TIMEOUT at once (see the module docstring). `call` never raises for what the callable raises.
    """

    def __init__(self, timeout: float, name: str = "nvml-calls") -> None:
        self.timeout = timeout
        self._lane = Lane(name)
        self._lock = threading.Lock()  # one call at a time, waited for by its own caller

    @property
    def stuck(self) -> bool:
        return self._lane.busy

    def call(self, what: str, fn: Callable[[], _T]) -> _T | NvmlFailure:
        with self._lock:
            job = self._lane.submit(what, fn)
            if isinstance(job, Refused):
                if job.why is Why.STUCK and job.stuck is not None:
                    return NvmlFailure(
                        NvmlErrorKind.TIMEOUT,
                        f"{what}: not attempted, {job.stuck.what} has not returned for "
                        f"{job.stuck_for:.1f} s (GPU fallen off the bus or driver hung?)",
                    )
                if job.why is Why.CLOSED:
                    return NvmlFailure(NvmlErrorKind.OTHER, f"{what}: the GPU probe is closed")
                return NvmlFailure(NvmlErrorKind.OTHER, f"{what}: not run ({job.detail})")
            if not job.wait(self.timeout):
                return NvmlFailure(
                    NvmlErrorKind.TIMEOUT,
                    f"{what}: no answer within {self.timeout:g} s (GPU fallen off the bus?)",
                )
        if job.error is not None:
            return classify(job.error, what)
        value: _T = job.value  # type: ignore[assignment]  # set: the call returned
        return value

    def close(self, wait: float = 1.0) -> None:
        """Stop the worker; a worker stuck in a call is left behind (it is a daemon thread)."""
        self._lane.close(wait)


def _load_library(path: str) -> None:
    """Load an explicit libnvidia-ml before nvmlInit: pynvml's CDLL("libnvidia-ml.so.1") then
    finds it by SONAME, and we also hand the handle to pynvml so any file name works."""
    lib = ctypes.CDLL(os.path.abspath(path))
    with pynvml.libLoadLock:
        if pynvml.nvmlLib is None:
            pynvml.nvmlLib = lib


def _mw_to_w(mw: int) -> float:
    return mw / 1000.0


def _handle_failure(f: NvmlFailure) -> NvmlFailure:
    # NVML answers InvalidArgument for an index past the device count: for us, not found.
    if f.kind is NvmlErrorKind.INVALID_ARGUMENT:
        return NvmlFailure(NvmlErrorKind.NOT_FOUND, f.detail, f.code, f.reinit)
    return f


class NvmlGpu:
    """`interfaces.GpuAdapter` over nvidia-ml-py. Thread-safe; never raises for NVML trouble."""

    def __init__(self, library_path: str = "", call_timeout: float = 2.0) -> None:
        self._library_path = library_path
        self._runner = CallRunner(call_timeout)
        self._lock = threading.RLock()
        self._initialized = False
        self._owes_shutdown = False  # an nvmlInit of ours is still counted by the library
        self._library_loaded = not library_path
        self._gone: NvmlFailure | None = None  # driver vanished during the current read

    @classmethod
    def from_config(cls, config: Config) -> NvmlGpu:
        return cls(config.gpu.nvml_library, config.gpu.call_timeout)

    @property
    def call_timeout(self) -> float:
        return self._runner.timeout

    # ---- GpuAdapter ---------------------------------------------------------------------

    def read(self, devices: Sequence[GpuDevice]) -> GpuReport:
        with self._lock:
            self._gone = None
            failure = self._ensure_init()
            if failure is not None:
                return GpuReport(error=failure.kind, detail=failure.detail)
            snapshots = tuple(self._read_device(d) for d in devices)
            gone, self._gone = self._gone, None
            if gone is not None:
                return GpuReport(error=gone.kind, detail=gone.detail)
            return GpuReport(devices=snapshots)

    def set_power_limit(self, index: int, watts: float) -> PowerSetOutcome:
        """Clamp `watts` to the card's constraints, set it in mW, read it back.

        ok only when the read-back limit equals what was set. `applied_w` is the limit read
        back afterwards, also on failure (then it is the limit the card still has)."""
        with self._lock:
            self._gone = None
            if not math.isfinite(watts):
                return PowerSetOutcome(
                    False, watts, None, NvmlErrorKind.INVALID_ARGUMENT, f"{watts} W is no limit"
                )
            failure = self._ensure_init()
            if failure is not None:
                return PowerSetOutcome(False, watts, None, failure.kind, failure.detail)
            handle = self._call(
                f"gpu{index} handle", lambda: pynvml.nvmlDeviceGetHandleByIndex(index)
            )
            if isinstance(handle, NvmlFailure):
                f = _handle_failure(handle)
                return PowerSetOutcome(False, watts, None, f.kind, f.detail)

            wanted_mw = round(watts * 1000)
            note = ""
            limits = self._call(
                f"gpu{index} power constraints",
                lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
            )
            if isinstance(limits, NvmlFailure):
                note = f"; constraints unknown ({limits.detail}), set unclamped"
            else:
                lo, hi = int(limits[0]), int(limits[1])
                clamped = min(max(wanted_mw, lo), hi)
                if clamped != wanted_mw:
                    note = (
                        f"; clamped from {watts:g} W to the card's "
                        f"{_mw_to_w(lo):g}-{_mw_to_w(hi):g} W"
                    )
                wanted_mw = clamped

            done = self._call(
                f"gpu{index} set power limit",
                lambda: pynvml.nvmlDeviceSetPowerManagementLimit(handle, wanted_mw),
            )
            back = self._call(
                f"gpu{index} power limit",
                lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle),
            )
            applied = None if isinstance(back, NvmlFailure) else _mw_to_w(int(back))
            if isinstance(done, NvmlFailure):
                hint = (
                    " (needs root / CAP_SYS_ADMIN)"
                    if done.kind is NvmlErrorKind.NO_PERMISSION
                    else ""
                )
                return PowerSetOutcome(
                    False, watts, applied, done.kind, f"{done.detail}{hint}{note}"
                )
            if isinstance(back, NvmlFailure):
                return PowerSetOutcome(
                    False, watts, None, back.kind, f"set, but no read-back: {back.detail}{note}"
                )
            if int(back) != wanted_mw:
                return PowerSetOutcome(
                    False,
                    watts,
                    applied,
                    NvmlErrorKind.OTHER,
                    f"set {_mw_to_w(wanted_mw):g} W but read back {applied:g} W{note}",
                )
            return PowerSetOutcome(True, watts, applied, None, f"set {applied:g} W{note}")

    def close(self) -> None:
        """nvmlShutdown (bounded) and stop the worker. Later calls answer "closed"."""
        with self._lock:
            if self._owes_shutdown:
                self._runner.call("nvmlShutdown", pynvml.nvmlShutdown)
                self._owes_shutdown = False
                self._initialized = False
            self._runner.close()

    # ---- internals ----------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], _T]) -> _T | NvmlFailure:
        if self._gone is not None:
            return self._gone
        result = self._runner.call(what, fn)
        if isinstance(result, NvmlFailure):
            if result.reinit:
                self._initialized = False
            if result.kind is NvmlErrorKind.DRIVER_NOT_LOADED:
                self._gone = result
        return result

    def _ensure_init(self) -> NvmlFailure | None:
        if self._initialized:
            return None
        if self._owes_shutdown:
            # Balance our earlier nvmlInit; its failure changes nothing about re-initialising.
            self._runner.call("nvmlShutdown", pynvml.nvmlShutdown)
            self._owes_shutdown = False
        if not self._library_loaded:
            path = self._library_path
            loaded = self._runner.call(f"load {path}", lambda: _load_library(path))
            if isinstance(loaded, NvmlFailure):
                return NvmlFailure(
                    loaded.kind, f"{loaded.detail} (check gpu.nvml_library)", loaded.code
                )
            self._library_loaded = True
        done = self._runner.call("nvmlInit", pynvml.nvmlInit)
        if isinstance(done, NvmlFailure):
            if done.kind is NvmlErrorKind.LIBRARY_NOT_FOUND and not self._library_path:
                return NvmlFailure(
                    done.kind,
                    f"{done.detail}: libnvidia-ml.so.1 is not on the loader's path "
                    "(set gpu.nvml_library, or LD_LIBRARY_PATH=/run/opengl-driver/lib on NixOS)",
                    done.code,
                )
            return done
        self._initialized = True
        self._owes_shutdown = True
        return None

    def _read_device(self, dev: GpuDevice) -> GpuSnapshot:
        errors: list[tuple[str, NvmlErrorKind]] = []

        def get(what: str, fn: Callable[[], _T]) -> _T | None:
            result = self._call(f"{dev.label} {what}", fn)
            if isinstance(result, NvmlFailure):
                errors.append((what, result.kind))
                return None
            return result

        if dev.uuid:
            uuid_key = dev.uuid
            handle = self._call(
                f"{dev.label} handle", lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid_key)
            )
        elif dev.index is not None:
            index_key = dev.index
            handle = self._call(
                f"{dev.label} handle", lambda: pynvml.nvmlDeviceGetHandleByIndex(index_key)
            )
        else:
            handle = NvmlFailure(NvmlErrorKind.NOT_FOUND, "a GPU needs an index or a UUID")
        if isinstance(handle, NvmlFailure):
            kind = _handle_failure(handle).kind
            index = dev.index if dev.index is not None else -1
            return GpuSnapshot(
                index=index, uuid=dev.uuid or "", name="", errors=(("handle", kind),)
            )

        if dev.uuid:
            read_index = get("index", lambda: int(pynvml.nvmlDeviceGetIndex(handle)))
            index = read_index if read_index is not None else -1
        else:
            index = dev.index if dev.index is not None else -1
        uuid = get("uuid", lambda: str(pynvml.nvmlDeviceGetUUID(handle)))
        name = get("name", lambda: str(pynvml.nvmlDeviceGetName(handle)))
        memory = self._read_memory(dev, handle, errors)
        processes = get(
            "processes",
            lambda: tuple(
                GpuProcess(pid=int(p.pid), used_bytes=p.usedGpuMemory)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            ),
        )

        def watts(what: str, fn: Callable[[], int]) -> float | None:
            mw = get(what, fn)
            return None if mw is None else _mw_to_w(int(mw))

        usage = watts("power usage", lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        limit = watts("power limit", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle))
        enforced = watts(
            "enforced power limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
        )
        default = watts(
            "default power limit", lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
        )
        limits = get(
            "power constraints",
            lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
        )
        temperature = get(
            "temperature",
            lambda: int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        )
        utilization = get(
            "utilization", lambda: int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        )
        reasons = get(
            "clock event reasons",
            lambda: int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        )
        return GpuSnapshot(
            index=index,
            uuid=uuid if uuid is not None else (dev.uuid or ""),
            name=name or "",
            memory_total=memory[0],
            memory_used=memory[1],
            memory_free=memory[2],
            processes=processes or (),
            power=PowerInfo(
                usage_w=usage,
                limit_w=limit,
                enforced_w=enforced,
                min_w=None if limits is None else _mw_to_w(int(limits[0])),
                max_w=None if limits is None else _mw_to_w(int(limits[1])),
                default_w=default,
            ),
            temperature_c=temperature,
            utilization_pct=utilization,
            throttle_reasons=() if reasons is None else decode_clock_event_reasons(reasons),
            errors=tuple(errors),
        )

    def _read_memory(
        self, dev: GpuDevice, handle: Any, errors: list[tuple[str, NvmlErrorKind]]
    ) -> tuple[int | None, int | None, int | None]:
        """(total, used, free): v2, whose `used` leaves out the driver's reservation; v1 when
        the driver has no v2."""

        def v2() -> tuple[int, int, int]:
            m = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            return int(m.total), int(m.used), int(m.free)

        def v1() -> tuple[int, int, int]:
            m = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(m.total), int(m.used), int(m.free)

        result = self._call(f"{dev.label} memory", v2)
        if isinstance(result, NvmlFailure) and result.code in _NO_V2_CODES:
            result = self._call(f"{dev.label} memory (v1)", v1)
        if isinstance(result, NvmlFailure):
            errors.append(("memory", result.kind))
            return None, None, None
        return result
