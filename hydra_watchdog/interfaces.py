"""The seams between the imperative shell and the outside world.

Each adapter in hydra_watchdog/probes/ implements one Protocol; the daemon and the actuators only
see these. None of these methods raises for an outside failure: they return typed outcomes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.config import GpuDevice
from hydra_watchdog.observation import (
    Canary,
    GpuReport,
    Health,
    HostReport,
    HttpResult,
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

    def check_fallback_route(self, url: str, model: str, timeout: float) -> HttpResult: ...


class GpuAdapter(Protocol):
    def read(self, devices: Sequence[GpuDevice]) -> GpuReport: ...

    def set_power_limit(self, index: int, watts: float) -> PowerSetOutcome: ...


class UnitManager(Protocol):
    def status(self) -> UnitStatus: ...

    def command(self, verb: UnitVerb) -> CommandOutcome: ...

    def journal(self, lines: int) -> tuple[str, ...]: ...


class ProcessScanner(Protocol):
    def scan(
        self, unit: UnitStatus, gpus: GpuReport, *, full: bool
    ) -> tuple[PortReport, tuple[ProcessInfo, ...]]: ...


class HostChecker(Protocol):
    def check(self, *, libraries: bool, unit: UnitStatus | None = None) -> HostReport:
        """`unit`: this cycle's unit status, whose main process's environment `ldd` runs in."""


@dataclass(frozen=True)
class Adapters:
    """One of each: what the observer reads and the actuators drive."""

    tabby: TabbyApi
    gpu: GpuAdapter
    units: UnitManager
    scanner: ProcessScanner
    host: HostChecker
