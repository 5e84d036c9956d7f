"""The GPU probe: NVML through nvidia-ml-py, every call bounded in time.

Theory of operation
-------------------
A GPU that falls off the bus can hang an NVML call for minutes, and a Python thread cannot be
cancelled. So one lane (adapters/bounded.py: a long-lived worker thread; CallRunner here) runs
every NVML call, and the caller waits at most `call_timeout` for each. A call that misses its
deadline is reported as TIMEOUT and stays "stuck": until it returns, every further call is
answered TIMEOUT at once without being queued, so a hung driver costs one deadline per read,
never a growing pile of threads. When the stuck call finally returns, the lane takes new calls
again. A read hands all its calls to the lane at once (CallRunner.batch) with the same bound on
each: a hand-off between threads costs more CPU than an NVML call.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pynvml

from hydra_watchdog.adapters.bounded import Call, Lane, Refused, Why
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
    subject = what.rpartition(" ")[2]  # "load /lib/libnvidia-ml.so.1": the file
    if subject and text.startswith(f"{subject}: "):  # ctypes names it again: said once
        text = text[len(subject) + 2 :]
    suffix = f" (NVML code {code})" if isinstance(code, int) else ""
    return NvmlFailure(
        kind=kind,
        detail=f"{what}: {text}{suffix}",
        code=code if isinstance(code, int) else None,
        reinit=isinstance(exc, _REINIT_CLASSES),
    )


_R = TypeVar("_R")


class RawCall(Protocol):
    """An NVML call made (or answered) for a batch: fn's value, or why there is none."""

    def __call__(self, what: str, fn: Callable[[], _T], /) -> _T | NvmlFailure: ...


def _no_answer(what: str, timeout: float) -> NvmlFailure:
    return NvmlFailure(
        NvmlErrorKind.TIMEOUT, f"{what}: no answer within {timeout:g} s (GPU fallen off the bus?)"
    )


def _not_attempted(what: str, stuck: str, since: float) -> NvmlFailure:
    return NvmlFailure(
        NvmlErrorKind.TIMEOUT,
        f"{what}: not attempted, {stuck} has not returned for {time.monotonic() - since:.1f} s "
        "(GPU fallen off the bus or driver hung?)",
    )


class _Recording:
    """The answers of one batch's calls on the lane, in order (CallRunner.batch)."""

    def __init__(self) -> None:
        self.answers: list[object] = []
        # What the lane does, since when: (index of the call, its name or "" between calls,
        # start). Replaced as one value at every step: the caller reads it from its own thread.
        self.current: tuple[int, str, float] = (0, "", time.monotonic())
        self.job: Call[Any] | None = None
        self.abandoned = False  # the caller gave up: the lane makes no further call

    def make(self, what: str, fn: Callable[[], _T], /) -> _T | NvmlFailure:
        """On the lane: make the call, record its answer."""
        if self.abandoned:  # nothing more into a driver that just hung; the lane frees at once
            return NvmlFailure(NvmlErrorKind.TIMEOUT, f"{what}: not attempted (the read gave up)")
        self.current = (len(self.answers), what, time.monotonic())
        answer: _T | NvmlFailure
        try:
            answer = fn()
        except BaseException as exc:  # typed, like call() types what the lane hands back
            answer = classify(exc, what)
        self.answers.append(answer)
        self.current = (len(self.answers), "", time.monotonic())
        return answer

    def wait(self, job: Call[Any], timeout: float) -> tuple[int, str, float] | None:
        """None once the batch returned; else what the lane has been doing for `timeout`
        without a step forward (a call, or rarely the time between two)."""
        while True:
            current = self.current
            if job.wait(current[2] + timeout - time.monotonic()):
                return None
            if self.current is current:  # no step since: past its timeout
                return current


class _Replay:
    """The caller's run of a batch: each call gets its recorded answer, in order."""

    def __init__(
        self,
        answers: list[object],
        stuck_at: int,
        stuck: str,
        since: float,
        timeout: float,
        *,
        done: bool = False,
    ) -> None:
        self.answers = answers
        self.stuck_at, self.stuck, self.since = stuck_at, stuck, since
        self.timeout = timeout
        self.done = done  # the lane's run returned: a call past the record is a bug
        self.asked = 0

    def __call__(self, what: str, fn: Callable[[], _T], /) -> _T | NvmlFailure:
        index, self.asked = self.asked, self.asked + 1
        if index < len(self.answers):
            # the answer this very call got on the lane (body is pure: same calls, same order)
            return self.answers[index]  # type: ignore[return-value]
        if self.done:  # the lane's run made fewer calls: body is not pure (a bug)
            return NvmlFailure(NvmlErrorKind.OTHER, f"{what}: not run (the batch's record ended)")
        if index == self.stuck_at:
            self.stuck = self.stuck or what  # stuck between calls: name the one it did not make
            return _no_answer(what, self.timeout)
        return _not_attempted(what, self.stuck, self.since)


class _Refusing:
    """Every call of a batch the lane refused gets that refusal."""

    def __init__(self, refuse: Callable[[str], NvmlFailure]) -> None:
        self.refuse = refuse

    def __call__(self, what: str, fn: Callable[[], _T], /) -> _T | NvmlFailure:
        return self.refuse(what)


class CallRunner:
    """NVML's calls on one lane (adapters/bounded.py), each waited for at most `timeout`.

    A call past its deadline returns TIMEOUT and stays stuck; while it is stuck, new calls get
    TIMEOUT at once (see the module docstring). `call` never raises for what the callable raises.
    """

    def __init__(self, timeout: float, name: str = "nvml-calls") -> None:
        self.timeout = timeout
        self._lane = Lane(name)
        self._lock = threading.Lock()  # one call at a time, waited for by its own caller
        self._batch: _Recording | None = None  # the last batch handed to the lane

    @property
    def stuck(self) -> bool:
        return self._lane.busy

    def call(self, what: str, fn: Callable[[], _T]) -> _T | NvmlFailure:
        with self._lock:
            job = self._lane.submit(what, fn)
            if isinstance(job, Refused):
                return self._refusal(what, job)
            if not job.wait(self.timeout):
                return _no_answer(what, self.timeout)
        if job.error is not None:
            return classify(job.error, what)
        value: _T = job.value  # type: ignore[assignment]  # set: the call returned
        return value

    def batch(self, body: Callable[[RawCall], _R]) -> _R:
        """`body` with every NVML call it makes run on the lane in one hand-off, each bounded as
        by call(): a read of a GPU makes a dozen calls, and a hand-off between threads costs
        more CPU than the call (issue 15).

        `body` must be a pure function of the answers its calls get, and it runs twice. First on
        the lane, where each call is made in turn and its answer recorded; the caller waits as
        long as the call in progress is younger than `timeout`. Then on the caller's thread,
        where each call gets its recorded answer. A call past `timeout` gets TIMEOUT and keeps
        the lane stuck, every later call gets "not attempted", as call() answers them; the
        lane's run makes no call after the stuck one, so the lane frees when that one returns.
        Only the caller's run counts: nothing the lane's run does reaches the caller."""
        rec = _Recording()
        with self._lock:
            job = self._lane.submit("batch", lambda: body(rec.make))
            if isinstance(job, Refused):
                refused = job
                return body(_Refusing(lambda what: self._refusal(what, refused)))
            rec.job = job
            self._batch = rec
            stuck = rec.wait(job, self.timeout)
        answers = list(rec.answers)  # the lane may still append: a snapshot
        if stuck is None:  # every call answered: nothing is stuck past the record's end
            return body(_Replay(answers, len(answers), "", 0.0, self.timeout, done=True))
        rec.abandoned = True
        index, name, since = stuck
        return body(_Replay(answers[:index], index, name, since, self.timeout))

    def _refusal(self, what: str, refused: Refused) -> NvmlFailure:
        if refused.why is Why.STUCK and refused.stuck is not None:
            name, since = refused.stuck.what, refused.stuck.started
            rec = self._batch
            if rec is not None and rec.job is refused.stuck:  # name the call, not the batch
                _, name, since = rec.current
                name = name or "an NVML read"
            return _not_attempted(what, name, since)
        if refused.why is Why.CLOSED:
            return NvmlFailure(NvmlErrorKind.OTHER, f"{what}: the GPU probe is closed")
        return NvmlFailure(NvmlErrorKind.OTHER, f"{what}: not run ({refused.detail})")

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


@dataclass(frozen=True)
class _Fixed:
    """What a GPU answers alike for as long as NVML stays initialised: its handle (valid until
    nvmlShutdown), index, UUID, name, default power limit and limit constraints. Read once per
    nvmlInit instead of every cycle (issue 15): 6 of a read's 13 calls per GPU. Kept only when
    complete (every one of them answered); a re-initialisation forgets it. None: not answered."""

    handle: Any
    index: int | None  # -1 in the snapshot
    uuid: str | None
    name: str | None
    default_w: float | None
    limits_w: tuple[float, float] | None  # (min, max)

    @property
    def complete(self) -> bool:
        return None not in (self.index, self.uuid, self.name, self.default_w, self.limits_w)


class NvmlGpu:
    """`interfaces.GpuAdapter` over nvidia-ml-py. Thread-safe; never raises for NVML trouble."""

    def __init__(self, library_path: str = "", call_timeout: float = 2.0) -> None:
        self._library_path = library_path
        self._runner = CallRunner(call_timeout)
        self._lock = threading.RLock()
        self._initialized = False
        self._owes_shutdown = False  # an nvmlInit of ours is still counted by the library
        self._library_loaded = not library_path
        self._gone: NvmlFailure | None = None  # driver vanished during the current power set
        self._fixed: dict[GpuDevice, _Fixed] = {}  # per device, since the current nvmlInit

    @classmethod
    def from_config(cls, config: Config) -> NvmlGpu:
        return cls(config.gpu.nvml_library, config.gpu.call_timeout)

    @property
    def call_timeout(self) -> float:
        return self._runner.timeout

    # ---- GpuAdapter ---------------------------------------------------------------------

    def read(self, devices: Sequence[GpuDevice]) -> GpuReport:
        with self._lock:
            failure = self._ensure_init()
            if failure is not None:
                return GpuReport(error=failure.kind, detail=failure.detail)
            known = dict(self._fixed)  # the batch runs its body twice: both see the same
            snapshots, failures, learned = self._runner.batch(
                lambda raw: _read_all(self, devices, raw, known)
            )
            self._fixed.update(learned)
            if any(f.reinit for f in failures):
                self._initialized = False
            gone = next((f for f in failures if f.kind is NvmlErrorKind.DRIVER_NOT_LOADED), None)
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
        self._fixed.clear()  # handles die with the nvmlInit they came from
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

    def _read_device(
        self, dev: GpuDevice, call: RawCall, known: _Fixed | None
    ) -> tuple[GpuSnapshot, _Fixed | None]:
        """The GPU's snapshot, and its fixed answers when complete (`known`: those of an earlier
        read since the current nvmlInit, whose calls are then not made again)."""
        errors: list[tuple[str, NvmlErrorKind]] = []

        def get(what: str, fn: Callable[[], _T]) -> _T | None:
            result = call(f"{dev.label} {what}", fn)
            if isinstance(result, NvmlFailure):
                errors.append((what, result.kind))
                return None
            return result

        def watts(what: str, fn: Callable[[], int]) -> float | None:
            mw = get(what, fn)
            return None if mw is None else _mw_to_w(int(mw))

        fixed = known
        if fixed is None:
            handle = self._handle(dev, call)
            if isinstance(handle, NvmlFailure):
                kind = _handle_failure(handle).kind
                index = dev.index if dev.index is not None else -1
                snapshot = GpuSnapshot(
                    index=index, uuid=dev.uuid or "", name="", errors=(("handle", kind),)
                )
                return snapshot, None
            fixed = _read_fixed(dev, handle, get, watts)
        handle = fixed.handle
        memory = self._read_memory(dev, handle, errors, call)
        processes = get(
            "processes",
            lambda: tuple(
                GpuProcess(pid=int(p.pid), used_bytes=p.usedGpuMemory)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            ),
        )
        usage = watts("power usage", lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        limit = watts("power limit", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle))
        enforced = watts(
            "enforced power limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
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
        limits = fixed.limits_w
        snapshot = GpuSnapshot(
            index=fixed.index if fixed.index is not None else -1,
            uuid=fixed.uuid if fixed.uuid is not None else (dev.uuid or ""),
            name=fixed.name or "",
            memory_total=memory[0],
            memory_used=memory[1],
            memory_free=memory[2],
            processes=processes or (),
            power=PowerInfo(
                usage_w=usage,
                limit_w=limit,
                enforced_w=enforced,
                min_w=None if limits is None else limits[0],
                max_w=None if limits is None else limits[1],
                default_w=fixed.default_w,
            ),
            temperature_c=temperature,
            utilization_pct=utilization,
            throttle_reasons=() if reasons is None else decode_clock_event_reasons(reasons),
            errors=tuple(errors),
        )
        return snapshot, fixed if fixed.complete else None

    @staticmethod
    def _handle(dev: GpuDevice, call: RawCall) -> Any:
        """The device's handle, by UUID when configured, else by index (or an NvmlFailure)."""
        if dev.uuid:
            uuid_key = dev.uuid
            return call(f"{dev.label} handle", lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid_key))
        if dev.index is not None:
            index_key = dev.index
            return call(f"{dev.label} handle", lambda: pynvml.nvmlDeviceGetHandleByIndex(index_key))
        return NvmlFailure(NvmlErrorKind.NOT_FOUND, "a GPU needs an index or a UUID")

    def _read_memory(
        self,
        dev: GpuDevice,
        handle: Any,
        errors: list[tuple[str, NvmlErrorKind]],
        call: RawCall,
    ) -> tuple[int | None, int | None, int | None]:
        """(total, used, free): v2, whose `used` leaves out the driver's reservation; v1 when
        the driver has no v2."""

        def v2() -> tuple[int, int, int]:
            m = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            return int(m.total), int(m.used), int(m.free)

        def v1() -> tuple[int, int, int]:
            m = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(m.total), int(m.used), int(m.free)

        result = call(f"{dev.label} memory", v2)
        if isinstance(result, NvmlFailure) and result.code in _NO_V2_CODES:
            result = call(f"{dev.label} memory (v1)", v1)
        if isinstance(result, NvmlFailure):
            errors.append(("memory", result.kind))
            return None, None, None
        return result


class _Get(Protocol):
    def __call__(self, what: str, fn: Callable[[], _T], /) -> _T | None: ...


def _read_fixed(
    dev: GpuDevice,
    handle: Any,
    get: _Get,
    watts: Callable[[str, Callable[[], int]], float | None],
) -> _Fixed:
    """The GPU's fixed answers, each None when its call failed (recorded by `get`)."""
    # by UUID, the index is NVML's to say; by index, it is the one configured
    index = get("index", lambda: int(pynvml.nvmlDeviceGetIndex(handle))) if dev.uuid else dev.index
    uuid = get("uuid", lambda: str(pynvml.nvmlDeviceGetUUID(handle)))
    name = get("name", lambda: str(pynvml.nvmlDeviceGetName(handle)))
    default = watts(
        "default power limit", lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
    )
    constraints = get(
        "power constraints", lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
    )
    limits = (
        None
        if constraints is None
        else (_mw_to_w(int(constraints[0])), _mw_to_w(int(constraints[1])))
    )
    return _Fixed(handle, index, uuid, name, default, limits)


def _read_all(
    gpu: NvmlGpu, devices: Sequence[GpuDevice], raw: RawCall, known: dict[GpuDevice, _Fixed]
) -> tuple[tuple[GpuSnapshot, ...], list[NvmlFailure], dict[GpuDevice, _Fixed]]:
    """The snapshots of `devices`, every failed call and the fixed answers learned, a pure
    function of `known` and of the answers `raw` gives (CallRunner.batch runs it twice). Once
    the driver is gone, later calls are not made."""
    failures: list[NvmlFailure] = []
    gone: NvmlFailure | None = None

    def call(what: str, fn: Callable[[], _T], /) -> _T | NvmlFailure:
        nonlocal gone
        if gone is not None:
            return gone
        answer = raw(what, fn)
        if isinstance(answer, NvmlFailure):
            failures.append(answer)
            if answer.kind is NvmlErrorKind.DRIVER_NOT_LOADED:
                gone = answer
        return answer

    snapshots = []
    learned: dict[GpuDevice, _Fixed] = {}
    for dev in devices:
        snapshot, fixed = gpu._read_device(dev, call, known.get(dev))
        snapshots.append(snapshot)
        if fixed is not None:
            learned[dev] = fixed
    return tuple(snapshots), failures, learned
