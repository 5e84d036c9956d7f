"""What the policy asks the actuators to do, and what came of it.

Every action carries a Reason: the rule that fired and the evidence, in words a human reads in
the journal. Actions in one decision run in order; when one fails, the later ones are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.printable import one_line
from hydra_watchdog.states import Rule


@dataclass(frozen=True)
class Reason:
    rule: Rule
    evidence: str


class UnitVerb(StrEnum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    RESET_FAILED = "reset-failed"


@dataclass(frozen=True)
class SetPowerLimit:
    kind: ClassVar[str] = "set_power_limit"
    gpu_index: int
    watts: float  # already clamped to the card's constraints
    reason: Reason


@dataclass(frozen=True)
class KillOrphan:
    """SIGTERM, wait orphans.term_grace, SIGKILL; only if pid, start ticks, cmdline and uid
    still match (see ProcessInfo)."""

    kind: ClassVar[str] = "kill_orphan"
    pid: int
    start_ticks: int
    cmdline: tuple[str, ...]
    uid: int | None
    reason: Reason


@dataclass(frozen=True)
class UnitCommand:
    kind: ClassVar[str] = "unit"
    verb: UnitVerb
    unit: str
    reason: Reason


@dataclass(frozen=True)
class LoadModel:
    kind: ClassVar[str] = "load_model"
    model: str
    vram_needed_bytes: int | None
    reason: Reason


@dataclass(frozen=True)
class ResetGpu:
    kind: ClassVar[str] = "reset_gpu"
    gpu_index: int
    reason: Reason


@dataclass(frozen=True)
class CheckFallbackRoute:
    kind: ClassVar[str] = "check_fallback_route"
    url: str
    model: str
    reason: Reason


Action = SetPowerLimit | KillOrphan | UnitCommand | LoadModel | ResetGpu | CheckFallbackRoute


def action_name(action: Action) -> str:
    """Stable short name: metrics label, journald HYDRA_ACTION."""
    if isinstance(action, UnitCommand):
        return f"{action.verb.value}_unit"
    return action.kind


def describe(action: Action) -> str:
    """One line for humans: 'restart tabbyapi.service', 'kill orphan 1234 (python main.py)'."""
    match action:
        case SetPowerLimit(gpu_index=i, watts=w):
            return f"set gpu{i} power limit to {w:g} W"
        case KillOrphan(pid=pid, cmdline=cmd):
            return f"kill orphan {pid} ({one_line(' '.join(cmd), 80)})"
        case UnitCommand(verb=verb, unit=unit):
            return f"{verb.value} {unit}"
        case LoadModel(model=model):
            return f"load model {model}"
        case ResetGpu(gpu_index=i):
            return f"reset gpu{i}"
        case CheckFallbackRoute(url=url, model=model):
            return f"check fallback route {url} ({model})"
    raise AssertionError(action)  # pragma: no cover


class ResultStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"  # a safety check said no (identity changed, foreign GPU user, no systemd)
    SKIPPED = "skipped"  # an earlier action of the same decision failed
    DRY_RUN = "dry_run"  # "would ..." - never executed
    IN_PROGRESS = "in_progress"  # a long action (model load) accepted, still running


@dataclass(frozen=True)
class ActionResult:
    action: Action
    status: ResultStatus
    detail: str
    finished_at: float  # monotonic
    error_kind: ErrorKind = ErrorKind.NONE  # machine-readable cause (errors.py lists them)
    # The end of a model load that ran in the background: how long it ran (None: any other
    # result, e.g. a load refused or that could not start)
    duration_s: float | None = None

    @property
    def succeeded(self) -> bool:
        """DRY_RUN counts as done, so a dry run decides exactly as a real run would."""
        return self.status in (ResultStatus.OK, ResultStatus.DRY_RUN)
