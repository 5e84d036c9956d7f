"""The status report: what `hydra-watchdog status` prints and what the metrics page exports.

The daemon builds one StatusReport per cycle from the policy's memory and the last observation
(build_status is pure: every clock reading is an argument) and writes it as JSON into its runtime
dir, where `status` reads it as any user. The JSON form is documented field by field in
docs/status-schema.md and versioned by `schema`: a reader ignores fields it does not know and
defaults fields it misses, so adding a field keeps the version; renaming or changing the meaning
of one bumps it.

All times in the report are wall-clock seconds since the epoch, because other processes and
humans read them; the policy's monotonic stamps are converted with wall_now - mono_now + t.

Reading is defensive: `status` is what monitoring trusts, so a file that is garbage (NaN, huge
numbers, deep nesting, bad UTF-8), a heartbeat from the future, a daemon that stopped (the file
says so) or whose pid is gone or is no longer hydra-watchdog is UNKNOWN with the reason, never OK.
This path imports nothing heavy (no policy, no HTTP or NVML client): `status` runs often.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from hydra_watchdog import __version__
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.jsonable import from_jsonable, to_jsonable
from hydra_watchdog.report.status_view import (
    FUTURE_SKEW,
    GIB,
    PROC,
    daemon_problem,
    evaluate,
    process_start,
    render_human,
    summarize,
)
from hydra_watchdog.states import Phase, Verdict

if TYPE_CHECKING:  # the daemon's side (build_status); `status` only reads the file
    from hydra_watchdog.config import Config, GpuDevice
    from hydra_watchdog.observation import GpuSnapshot, ModelDir, Observation
    from hydra_watchdog.policy_state import PolicyState

SCHEMA_VERSION = 1
ACTIONS_KEPT = 10
_COMMAND_MAX = 200  # a command line is evidence, not a dump
_ACTION_KINDS = (EventKind.ACTION, EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED)
_MAX_INT = 2**63  # bytes, pids, counts; beyond it a number is garbage (and overflows a float)
__all__ = [  # judged and rendered in status_view (light, for `status`), re-exported here
    "FUTURE_SKEW",
    "GIB",
    "PROC",
    "daemon_problem",
    "evaluate",
    "process_start",
    "render_human",
    "summarize",
]


@dataclass(frozen=True)
class HealthInfo:
    outcome: str = ""  # observation.Outcome value: ok, refused, timeout, http_error, ...
    healthy: bool = False
    status: int | None = None
    latency_s: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class ModelInfo:
    wanted: str = ""  # the model the watchdog keeps loaded now (the fallback while in use)
    loaded: str | None = None
    known: bool = False  # False: /v1/model was not read (then `loaded` means nothing)
    fallback: str = ""
    fallback_in_use: bool = False
    vram_needed_bytes: int | None = None  # summed over the GPUs
    vram_needed_source: str = ""  # "config", "estimate" or "" (unknown)


@dataclass(frozen=True)
class LoadInfo:
    model: str = ""
    started_at: float | None = None
    deadline_at: float | None = None
    module: int = 0
    modules: int = 0


@dataclass(frozen=True)
class GpuInfo:
    index: int = 0
    uuid: str = ""
    name: str = ""
    vram_used_bytes: int | None = None
    vram_free_bytes: int | None = None
    vram_total_bytes: int | None = None
    power_limit_w: float | None = None  # the limit in force now
    power_target_w: float | None = None  # the configured limit (None: left alone)
    power_usage_w: float | None = None
    temperature_c: int | None = None
    errors: tuple[str, ...] = ()  # "what: why" for each read that failed


@dataclass(frozen=True)
class UnitInfo:
    name: str = ""
    available: bool = False
    active_state: str = ""
    sub_state: str = ""
    result: str = ""
    n_restarts: int | None = None
    main_pid: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class ListenerInfo:
    port: int = 0
    pid: int | None = None
    role: str = ""  # observation.ProcessRole value when the owner is known
    command: str = ""


@dataclass(frozen=True)
class ProcessEntry:
    pid: int = 0
    role: str = ""  # orphan or foreign
    command: str = ""
    gpu_bytes: int = 0


@dataclass(frozen=True)
class ActionEntry:
    at: float = 0.0
    event: str = ""  # action, action_failed or action_refused
    action: str = ""
    message: str = ""
    rule: str = ""
    reason: str = ""


@dataclass(frozen=True)
class BackoffInfo:
    step: int = 0
    next_attempt_at: float | None = None
    loop_since: float | None = None
    escalated: bool = False
    restarts_in_window: int = 0
    restarts_by_watchdog: int = 0
    restarts_by_systemd: int = 0
    window_s: float = 0.0


@dataclass(frozen=True)
class PauseInfo:
    paused: bool = False
    reason: str = ""
    until: float | None = None


@dataclass(frozen=True)
class FindingEntry:
    rule: str = ""
    severity: str = ""
    message: str = ""


@dataclass(frozen=True)
class StatusReport:
    schema: int = SCHEMA_VERSION
    generated_at: float = 0.0
    pid: int = 0
    pid_start: int | None = None  # the daemon's start time (/proc/PID/stat, ticks since boot)
    heartbeat: float | None = None  # wall time of the last completed cycle's observation
    stopped_at: float | None = None  # set by a clean stop: the daemon is gone on purpose
    phase: Phase = Phase.UNKNOWN
    since: float | None = None
    verdict: Verdict = Verdict.UNKNOWN
    summary: str = ""
    dry_run: bool = False
    health: HealthInfo | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    load: LoadInfo | None = None
    gpus: tuple[GpuInfo, ...] = ()
    gpu_error: str = ""
    unit: UnitInfo | None = None
    listeners: tuple[ListenerInfo, ...] = ()
    processes: tuple[ProcessEntry, ...] = ()
    actions: tuple[ActionEntry, ...] = ()
    backoff: BackoffInfo = field(default_factory=BackoffInfo)
    paused: PauseInfo = field(default_factory=PauseInfo)
    findings: tuple[FindingEntry, ...] = ()
    # What `status` needs of the daemon's config, so that its quick path (status_quick.py) can
    # skip reading the config: trusted only when the CLI's config file has the same SHA-256.
    version: str = ""  # the daemon's hydra-watchdog version
    config_sha256: str = ""  # of the config file's bytes; "" when not loaded from a file
    runtime_dir: str = ""  # watchdog.runtime_dir
    stale_after: float = 0.0  # see stale_after(); 0: not published


def stale_after(cfg: Config) -> float:
    """A status older than this means the loop is hung or gone: three missed cycles, plus the
    longest probe deadline a cycle may legitimately wait for."""
    t = cfg.tabbyapi
    longest = max(t.health_timeout, t.canary_deadline, cfg.gpu.call_timeout * 2, 10.0)
    return 3 * cfg.watchdog.interval + longest


# --- building (pure) ----------------------------------------------------------------------------


def _needed(cfg: Config, folder: ModelDir | None, *, fallback: bool) -> tuple[int | None, str]:
    """The need the policy checks (vram.vram_needed), and where it came from."""
    from hydra_watchdog.vram import vram_needed  # noqa: PLC0415 - keep `status` light

    need = vram_needed(cfg, folder, fallback=fallback)
    configured = cfg.model.fallback_vram_required_gib if fallback else cfg.model.vram_required_gib
    if need is None:
        return None, ""
    return need, "config" if configured is not None else "estimate"


def _target(snap: GpuSnapshot, devices: Sequence[GpuDevice]) -> float | None:
    from hydra_watchdog.vram import device_for  # noqa: PLC0415 - keep `status` light

    dev = device_for(snap, devices)
    return None if dev is None else dev.power_limit_watts


def _gpu(snap: GpuSnapshot, devices: Sequence[GpuDevice]) -> GpuInfo:
    return GpuInfo(
        index=snap.index,
        uuid=snap.uuid,
        name=snap.name,
        vram_used_bytes=snap.memory_used,
        vram_free_bytes=snap.memory_free,
        vram_total_bytes=snap.memory_total,
        power_limit_w=snap.power.limit_w,
        power_target_w=_target(snap, devices),
        power_usage_w=snap.power.usage_w,
        temperature_c=snap.temperature_c,
        errors=tuple(f"{what}: {kind.value}" for what, kind in snap.errors),
    )


def _short(command: str) -> str:
    return command if len(command) <= _COMMAND_MAX else command[: _COMMAND_MAX - 1] + "…"


def build_status(
    state: PolicyState,
    obs: Observation | None,
    cfg: Config,
    recent: Sequence[Event],
    *,
    wall_now: float,
    mono_now: float,
    pid: int,
    pid_start: int | None = None,
    actions_kept: int = ACTIONS_KEPT,
) -> StatusReport:
    """The report of one moment. `recent` are the last events, oldest first."""
    offset = wall_now - mono_now

    def wall(t: float | None) -> float | None:
        return None if t is None else offset + t

    fallback_in_use = state.using_fallback and bool(cfg.model.fallback)
    host = obs.host if obs is not None else None
    folder = None if host is None else (host.fallback if fallback_in_use else host.model)
    needed = _needed(cfg, folder, fallback=fallback_in_use)
    model = ModelInfo(
        wanted=cfg.model.fallback if fallback_in_use else cfg.model.name,
        loaded=obs.model.loaded if obs is not None and obs.model is not None else None,
        known=obs is not None and obs.model is not None and obs.model.known,
        fallback=cfg.model.fallback,
        fallback_in_use=fallback_in_use,
        vram_needed_bytes=needed[0],
        vram_needed_source=needed[1],
    )

    load = None
    if state.load_in_flight:
        progress = obs.load if obs is not None and obs.load is not None else None
        started = state.load_started
        load = LoadInfo(
            model=state.load_in_flight,
            started_at=wall(started),
            deadline_at=wall(None if started is None else started + cfg.model.load_timeout),
            module=progress.module if progress else 0,
            modules=progress.modules if progress else 0,
        )

    health = None
    unit = None
    gpus: tuple[GpuInfo, ...] = ()
    gpu_error = ""
    listeners: tuple[ListenerInfo, ...] = ()
    processes: tuple[ProcessEntry, ...] = ()
    pause = PauseInfo()
    if obs is not None:
        r = obs.health.result
        health = HealthInfo(
            outcome=r.outcome.value,
            healthy=obs.health.healthy,
            status=r.status,
            latency_s=r.latency_s,
            detail=r.detail,
        )
        u = obs.unit
        unit = UnitInfo(
            name=u.name,
            available=u.available,
            active_state=u.active_state,
            sub_state=u.sub_state,
            result=u.result,
            n_restarts=u.n_restarts,
            main_pid=u.main_pid,
            detail=u.detail,
        )
        gpus = tuple(_gpu(s, cfg.gpu.device) for s in obs.gpus.devices)
        if obs.gpus.error is not None:
            gpu_error = obs.gpus.error.value + (f": {obs.gpus.detail}" if obs.gpus.detail else "")
        if obs.port is not None:
            owned = []
            for lst in obs.port.listeners:
                proc = obs.process(lst.pid) if lst.pid is not None else None
                owned.append(
                    ListenerInfo(
                        port=lst.port,
                        pid=lst.pid,
                        role=proc.role.value if proc else "",
                        command=_short(proc.command) if proc else "",
                    )
                )
            listeners = tuple(owned)
        from hydra_watchdog.observation import ProcessRole  # noqa: PLC0415 - keep `status` light

        processes = tuple(
            ProcessEntry(p.pid, p.role.value, _short(p.command), p.gpu_bytes)
            for p in obs.processes
            if p.role in (ProcessRole.ORPHAN, ProcessRole.FOREIGN)
        )
        if obs.pause is not None:
            pause = PauseInfo(True, obs.pause.reason, wall(obs.pause.until))
    if state.phase is Phase.PAUSED and not pause.paused:
        pause = PauseInfo(paused=True)

    from hydra_watchdog.policy_state import RestartOrigin  # noqa: PLC0415 - keep `status` light

    window = cfg.restart_loop.window
    backoff = BackoffInfo(
        step=state.backoff_step,
        next_attempt_at=wall(state.backoff_until),
        loop_since=wall(state.loop_since),
        escalated=state.escalated,
        restarts_in_window=state.restarts_in_window(mono_now, window),
        restarts_by_watchdog=state.restarts_in_window(mono_now, window, RestartOrigin.WATCHDOG),
        restarts_by_systemd=state.restarts_in_window(mono_now, window, RestartOrigin.SYSTEMD),
        window_s=window,
    )
    actions = tuple(
        ActionEntry(
            at=e.wall,
            event=e.kind.value,
            action=e.action,
            message=e.message,
            rule=e.rule.value if e.rule else "",
            reason=e.reason,
        )
        for e in recent
        if e.kind in _ACTION_KINDS
    )
    actions = actions[-actions_kept:] if actions_kept > 0 else ()
    unknown_start = state.phase is Phase.UNKNOWN and state.phase_since == 0.0
    report = StatusReport(
        generated_at=wall_now,
        pid=pid,
        pid_start=pid_start,
        heartbeat=wall(obs.at) if obs is not None else None,
        phase=state.phase,
        since=None if unknown_start else wall(state.phase_since),
        verdict=state.phase.verdict,
        dry_run=cfg.watchdog.dry_run,
        health=health,
        model=model,
        load=load,
        gpus=gpus,
        gpu_error=gpu_error,
        unit=unit,
        listeners=listeners,
        processes=processes,
        actions=actions,
        backoff=backoff,
        paused=pause,
        findings=tuple(
            FindingEntry(f.rule.value, f.severity.value, f.message) for f in state.findings
        ),
        version=__version__,
        config_sha256=cfg.sha256,
        runtime_dir=cfg.watchdog.runtime_dir,
        stale_after=stale_after(cfg),
    )
    return dataclasses.replace(report, summary=summarize(report))


# --- JSON ---------------------------------------------------------------------------------------


def to_json(report: StatusReport) -> str:
    # Compact: json's C encoder serves only indent=None; the status file is rewritten every
    # cycle, and `status --json` prints it indented for people anyway.
    return json.dumps(to_jsonable(report), separators=(",", ":")) + "\n"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a status can hold")


def _check_values(value: Any, where: str) -> None:
    """Every number finite and within _MAX_INT, every string printable as UTF-8: a report that
    passes renders without an exception."""
    if isinstance(value, bool | Enum) or value is None:
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} is not valid UTF-8 text") from None
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > _MAX_INT:
            raise ValueError(f"{where} = {value!r} is not a usable number")
    elif isinstance(value, int):
        if abs(value) > _MAX_INT:
            raise ValueError(f"{where} = {str(value)[:40]}... is not a usable number")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_values(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(value, tuple):
        for item in value:
            _check_values(item, where)


def from_json(text: str | bytes) -> StatusReport:
    """Parse a status file; ValueError saying what is wrong with it (never another exception)."""
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("the status file is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the status file is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(raw, dict):
        raise ValueError("the status file does not hold a JSON object")
    schema = raw.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise ValueError(
            "the status file has no integer 'schema' field: not a hydra-watchdog status"
        )
    if schema > SCHEMA_VERSION:
        raise ValueError(
            f"the status file uses schema {str(schema)[:40]}; this hydra-watchdog reads schema "
            f"{SCHEMA_VERSION}: upgrade the CLI to match the daemon"
        )
    if schema < 1:
        raise ValueError(f"the status file has an invalid schema {str(schema)[:40]}")
    try:
        report = from_jsonable(StatusReport, raw)
        _check_values(report, "")
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
        why = str(exc)[:200]
        raise ValueError(f"the status file does not match schema {SCHEMA_VERSION}: {why}") from None
    return report
