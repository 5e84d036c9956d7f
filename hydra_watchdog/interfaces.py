"""The seams between the imperative shell and the outside world.

Each adapter in hydra_watchdog/adapters/ (the adapters layer) implements one Protocol; the observer,
the actuators and the daemon only see these. None of these methods raises for an outside failure:
they return typed outcomes. Every adapter has close(): what it holds (a thread, an NVML handle, a
connection pool) is released there, and the daemon calls it when a reload replaces the adapter.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.adapters.identity import ProcIdentity  # a frozen record of /proc, no I/O
from hydra_watchdog.config import GpuDevice
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.observation import (
    Canary,
    GpuReport,
    Health,
    HostReport,
    HttpResult,
    KeyView,
    ModelStatus,
    NvmlErrorKind,
    PortReport,
    ProcessInfo,
    UnitStatus,
)


@dataclass(frozen=True)
class LoadOutcome:
    """The end of POST /v1/model/load. ok only after /v1/model confirmed the model."""

    ok: bool
    detail: str  # the error event's message, "confirmed by /v1/model", "cancelled", ...
    modules_done: int = 0
    modules_total: int = 0
    # why it failed, when retrying cannot help: "unauthorized" (the admin key was rejected) or
    # "permanent" (HTTP 4xx before the stream, "no longer supported", "not installed"...)
    kind: str = ""


@dataclass(frozen=True)
class CommandOutcome:
    ok: bool
    detail: str
    refused: bool = False  # not attempted: e.g. no systemd here


@dataclass(frozen=True)
class PowerSetOutcome:
    ok: bool
    requested_w: float
    applied_w: float | None  # read back after setting
    error: NvmlErrorKind | None = None
    detail: str = ""


class TabbyApi(Protocol):
    def note_unit(self, unit: UnitStatus) -> None:
        """This cycle's unit status: what the credential gate judges the port's listener by."""

    def admin_key(self) -> KeyView:
        """The admin key held now (read again when its file changed): where from, its stamp."""

    def health(self) -> Health: ...

    def model(self) -> ModelStatus: ...

    def canary(self, deadline: float) -> Canary: ...

    def load_model(
        self,
        name: str,
        *,
        timeout: float,
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> LoadOutcome: ...

    def unload_model(self) -> HttpResult: ...

    def close(self) -> None: ...


class FallbackRoute(Protocol):
    """The runbook's LiteLLM check. Another host than TabbyAPI: never carries its admin key."""

    def check(self, url: str, model: str, timeout: float) -> HttpResult: ...

    def close(self) -> None: ...


class GpuAdapter(Protocol):
    def read(self, devices: Sequence[GpuDevice]) -> GpuReport: ...

    def set_power_limit(self, index: int, watts: float) -> PowerSetOutcome: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ResetOutcome:
    ok: bool
    detail: str
    error: ErrorKind = ErrorKind.NONE  # not_found, exec_failed, timeout, command_failed


class GpuResetter(Protocol):
    def reset(self, index: int, timeout: float) -> ResetOutcome:
        """`--gpu-reset` of one card, bounded by `timeout`. Asks nothing: the actuator has
        checked that it is safe."""

    def close(self) -> None: ...


class UnitManager(Protocol):
    def status(self) -> UnitStatus: ...

    def command(self, verb: UnitVerb) -> CommandOutcome: ...

    def journal(self, lines: int) -> tuple[str, ...]: ...

    def close(self) -> None: ...


class ProcessScanner(Protocol):
    def scan(
        self, unit: UnitStatus, gpus: GpuReport, *, full: bool
    ) -> tuple[PortReport, tuple[ProcessInfo, ...]]: ...

    def close(self) -> None: ...


class HostChecker(Protocol):
    def check(self, *, libraries: bool, unit: UnitStatus | None = None) -> HostReport:
        """`unit`: this cycle's unit status, whose main process's environment `ldd` runs in."""

    def close(self) -> None: ...


class Delivery(StrEnum):
    SENT = "sent"
    GONE = "gone"  # the pinned process had exited
    DENIED = "denied"  # not allowed to signal it


@dataclass(frozen=True)
class PinFailure:
    gone: bool  # no such process (any more); otherwise we may not pin it
    detail: str


class PinnedProcess(Protocol):
    """One process held by a pidfd: signals reach it and nothing else, whatever its PID
    number comes to mean."""

    pid: int

    def identity(self) -> ProcIdentity | None:
        """Its identity read now (None: exited, a zombie, or unreadable)."""

    def exited(self, timeout: float) -> bool:
        """Whether it has exited, waiting up to `timeout` seconds."""

    def signal(self, sig: signal.Signals) -> tuple[Delivery, str]: ...

    def close(self) -> None: ...


class ProcessControl(Protocol):
    """The processes the actuators judge and signal (act/orphans.py, act/gpu_reset.py)."""

    def identity(self, pid: int) -> ProcIdentity | None: ...

    def in_unit(self, pid: int, unit: str) -> bool | None:
        """Whether `pid` sits in the system unit's cgroup now; None when unreadable."""

    def own_pid_namespace(self) -> str | None: ...

    def resolve_uid(self, user: str) -> int | None: ...

    def pin(self, pid: int) -> PinnedProcess | PinFailure: ...

    def close(self) -> None: ...


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class Adapters:
    """One of each: what the observer reads and the actuators drive."""

    tabby: TabbyApi
    gpu: GpuAdapter
    units: UnitManager
    scanner: ProcessScanner
    host: HostChecker
    fallback: FallbackRoute
    processes: ProcessControl
    reset: GpuResetter

    def members(self) -> tuple[Closable, ...]:
        return (
            self.tabby,
            self.gpu,
            self.units,
            self.scanner,
            self.host,
            self.fallback,
            self.processes,
            self.reset,
        )

    def close(self, *, keep: Sequence[object] = ()) -> None:
        """Close each adapter but those in `keep` (by identity: still in use elsewhere); one
        that fails to close does not keep the others open."""
        for adapter in self.members():
            if any(adapter is k for k in keep):
                continue
            with contextlib.suppress(Exception):  # best effort: the daemon goes on
                adapter.close()
