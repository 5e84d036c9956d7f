"""Builders for observations, and a driver that steps decide() on a fake clock.

Policy tests need no processes at all (h11's way): they feed frozen observations and look at the
state and actions that come back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from hydra_watchdog.actions import Action, ActionResult, ResultStatus, UnitCommand, UnitVerb
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.observation import (
    Canary,
    GpuProcess,
    GpuReport,
    GpuSnapshot,
    Health,
    HostReport,
    HttpResult,
    Listener,
    LoadProgress,
    ModelDir,
    ModelStatus,
    Observation,
    Outcome,
    PauseRequest,
    PortReport,
    PowerInfo,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.states import Phase

GIB = 1024**3
PORT = 5000

# Time-compressed settings (seconds instead of minutes), the same shape as production.
BASE: dict[str, Any] = {
    "watchdog": {"interval": 1},
    "tabbyapi": {
        "health_timeout": "3s",
        "slow_threshold": "2s",
        "slow_probes": 3,
        "failures_before_down": 3,
        "startup_grace": "10s",
        "canary_interval": "30s",
        "canary_deadline": "5s",
    },
    "model": {
        "name": "M",
        "vram_required_gib": 20.0,
        "fallback": "F",
        "fallback_vram_required_gib": 8.0,
    },
    "restart_loop": {
        "max_restarts": 3,
        "window": "60s",
        "backoff_initial": "5s",
        "backoff_max": "40s",
        "reset_after": "30s",
        "escalate_after": "120s",
    },
    "gpu": {
        "device": [{"index": 0, "power_limit_watts": 450}, {"index": 1, "power_limit_watts": 300}]
    },
}


def config(**overrides: dict[str, Any]) -> Config:
    data = {k: dict(v) for k, v in BASE.items()}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


CFG = config()


def http(
    outcome: Outcome = Outcome.OK, latency: float = 0.02, status: int | None = 200
) -> HttpResult:
    return HttpResult(outcome, latency, status)


def ok(latency: float = 0.02) -> Health:
    return Health(http(latency=latency), healthy=True)


def refused() -> Health:
    return Health(http(Outcome.REFUSED, 0.001, None), healthy=False)


def timeout() -> Health:
    return Health(http(Outcome.TIMEOUT, 3.0, None), healthy=False)


def sticky() -> Health:
    return Health(
        http(Outcome.HTTP_ERROR, 0.01, 503),
        healthy=False,
        unhealthy_issues=("RuntimeError: CUDA error: an illegal memory access",),
    )


def model(loaded: str | None = "M") -> ModelStatus:
    return ModelStatus(http(status=200 if loaded else 503), loaded=loaded, known=True)


def unit(
    active: str = "active",
    sub: str = "running",
    *,
    n: int = 0,
    result: str = "success",
    enter: float | None = -1000.0,
    main_pid: int = 100,
    available: bool = True,
    load: str = "loaded",
    job: int | None = None,
) -> UnitStatus:
    return UnitStatus(
        name="tabbyapi.service",
        available=available,
        load_state=load,
        active_state=active,
        sub_state=sub,
        result=result,
        n_restarts=n,
        main_pid=main_pid if active == "active" else None,
        control_group="/system.slice/tabbyapi.service",
        invocation_id="inv",
        exec_main_status=1 if result == "exit-code" else 0,
        active_enter_mono=enter,
        job_id=job,
        detail="" if available else "no systemd: PID 1 is not systemd",
    )


def gpu(
    index: int,
    *,
    free_gib: float,
    total_gib: float = 32.0,
    limit: float = 450.0,
    procs: Sequence[tuple[int, float]] = (),
    reasons: tuple[str, ...] = (),
) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        uuid=f"GPU-{index}",
        name=f"sim{index}",
        memory_total=int(total_gib * GIB),
        memory_used=int((total_gib - free_gib) * GIB),
        memory_free=int(free_gib * GIB),
        processes=tuple(GpuProcess(pid, int(g * GIB)) for pid, g in procs),
        power=PowerInfo(usage_w=200.0, limit_w=limit, enforced_w=limit, min_w=150.0, max_w=600.0),
        temperature_c=60,
        utilization_pct=97,
        throttle_reasons=reasons,
    )


def gpus(free0: float = 30.0, free1: float = 22.0, **kw: Any) -> GpuReport:
    return GpuReport(
        devices=(
            gpu(0, free_gib=free0, limit=kw.get("limit0", 450.0), procs=kw.get("procs0", ())),
            gpu(1, free_gib=free1, total_gib=24.0, limit=kw.get("limit1", 300.0)),
        )
    )


def host(**kw: Any) -> HostReport:
    model_dir = ModelDir(
        "M", "/mnt/models/M", exists=True, has_config=True, weight_files=3, size_bytes=21 * GIB
    )
    fallback_dir = ModelDir(
        "F", "/mnt/models/F", exists=True, has_config=True, weight_files=1, size_bytes=4 * GIB
    )
    values: dict[str, Any] = {
        "models_dir_ok": True,
        "model": model_dir,
        "fallback": fallback_dir,
        "libraries_checked": True,  # as the observer does in every unhealthy cycle
    }
    values.update(kw)
    return HostReport(**values)


def proc(
    pid: int,
    role: ProcessRole,
    cmd: str = "python /opt/tabbyapi/main.py",
    *,
    gpu_gib: float = 0.0,
    listens: tuple[int, ...] = (),
) -> ProcessInfo:
    return ProcessInfo(
        pid,
        1.0e9 + pid,
        tuple(cmd.split()),
        role,
        int(gpu_gib * GIB),
        listens,
        start_ticks=1000 + pid,
        uid=0,
    )


def ports(*owners: tuple[int, int | None]) -> PortReport:
    return PortReport(PORT, tuple(Listener(port, pid) for port, pid in owners))


MAIN = proc(100, ProcessRole.MAIN, listens=(PORT,))


def obs(at: float, **kw: Any) -> Observation:
    """A healthy, fully loaded node unless told otherwise."""
    values: dict[str, Any] = {
        "health": ok(),
        "unit": unit(),
        "host": host(),
        "model": model("M"),
        "gpus": gpus(),
        "port": ports((PORT, 100)),
        "processes": (MAIN,),
    }
    values.update(kw)
    if not values["health"].healthy and "model" not in kw:
        values["model"] = None
    return Observation(at=at, **values)


def paused(until: float | None = None) -> PauseRequest:
    return PauseRequest("maintenance", until)


def loading(name: str = "M", at: float = 0.0) -> LoadProgress:
    return LoadProgress(name, at, 10, 160)


def result(
    action: Action,
    status: ResultStatus = ResultStatus.OK,
    detail: str = "",
    at: float = 0.0,
    error_kind: ErrorKind = ErrorKind.NONE,
) -> ActionResult:
    return ActionResult(action, status, detail, at, error_kind)


@dataclass
class Run:
    """Steps decide() and keeps the trace: feed observations, inspect what came back."""

    cfg: Config = CFG
    state: PolicyState = field(default_factory=PolicyState)
    trace: list[tuple[float, PolicyState, tuple[Action, ...]]] = field(default_factory=list)

    def step(self, o: Observation) -> tuple[Action, ...]:
        self.state, actions = decide(self.state, o, o.at, self.cfg)
        self.trace.append((o.at, self.state, actions))
        return actions

    @property
    def actions(self) -> list[Action]:
        return [a for _, _, acts in self.trace for a in acts]

    def unit_commands(self, *verbs: UnitVerb) -> list[UnitCommand]:
        return [
            a for a in self.actions if isinstance(a, UnitCommand) and (not verbs or a.verb in verbs)
        ]

    def phase(self) -> Phase:
        """The phase now. A call, so mypy does not carry an earlier assert's narrowing of
        `run.state.phase` past the step() that changed it."""
        return self.state.phase


_A = TypeVar("_A")


def only(kind: type[_A], actions: Iterable[Action]) -> list[_A]:
    """The actions, each asserted to be a `kind` (so a test can read that kind's fields)."""
    out: list[_A] = []
    for a in actions:
        assert isinstance(a, kind), f"expected only {kind.__name__}, got {a!r}"
        out.append(a)
    return out


def ok_results(actions: Sequence[Action], at: float) -> tuple[ActionResult, ...]:
    return tuple(result(a, ResultStatus.OK, "done", at) for a in actions)


def with_(o: Observation, **kw: Any) -> Observation:
    return replace(o, **kw)


def canary(outcome: Outcome) -> Canary:
    return Canary(http(outcome, 5.0 if outcome is Outcome.TIMEOUT else 0.3))
