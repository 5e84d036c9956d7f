"""The daemon's side of the status report: one StatusReport per cycle, from the policy's memory
and the last observation. build_status is pure: every clock reading is an argument; the policy's
monotonic stamps become wall times with wall_now - mono_now + t.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra_watchdog import __version__
from hydra_watchdog.actions import LoadModel, ResultStatus
from hydra_watchdog.config import Config, GpuDevice
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.observation import (
    GpuSnapshot,
    ModelDir,
    Observation,
    ProcessInfo,
    ProcessRole,
)
from hydra_watchdog.policy_state import PolicyState, RestartOrigin
from hydra_watchdog.printable import cut
from hydra_watchdog.report.status import (
    ActionEntry,
    BackoffInfo,
    FindingEntry,
    GpuInfo,
    HealthInfo,
    ListenerInfo,
    LoadInfo,
    ModelInfo,
    PauseInfo,
    ProcessEntry,
    StatusReport,
    UnitInfo,
    replace,
)
from hydra_watchdog.report.status_view import summarize
from hydra_watchdog.situation import tabby_process
from hydra_watchdog.states import Phase
from hydra_watchdog.vram import device_for, vram_needed

ACTIONS_KEPT = 10
_COMMAND_MAX = 200  # a command line is evidence, not a dump
_ACTION_KINDS = (EventKind.ACTION, EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED)
_LOAD = LoadModel.kind  # actions.action_name of a load


def stale_after(cfg: Config) -> float:
    """A status older than this means the loop is hung or gone: three missed cycles, plus the
    longest probe deadline a cycle may legitimately wait for."""
    t = cfg.tabbyapi
    longest = max(t.health_timeout, t.canary_deadline, cfg.gpu.call_timeout * 2, 10.0)
    return 3 * cfg.watchdog.interval + longest


def _needed(cfg: Config, folder: ModelDir | None, *, fallback: bool) -> tuple[int | None, str]:
    """The need the policy checks (vram.vram_needed), and where it came from."""
    need = vram_needed(cfg, folder, fallback=fallback)
    configured = cfg.model.fallback_vram_required_gib if fallback else cfg.model.vram_required_gib
    if need is None:
        return None, ""
    return need, "config" if configured is not None else "estimate"


def _gpu(snap: GpuSnapshot, devices: Sequence[GpuDevice]) -> GpuInfo:
    dev = device_for(snap, devices)
    return GpuInfo(
        index=snap.index,
        uuid=snap.uuid,
        name=snap.name,
        vram_used_bytes=snap.memory_used,
        vram_free_bytes=snap.memory_free,
        vram_total_bytes=snap.memory_total,
        power_limit_w=snap.power.limit_w,
        power_target_w=None if dev is None else dev.power_limit_watts,
        power_usage_w=snap.power.usage_w,
        temperature_c=snap.temperature_c,
        errors=tuple(f"{what}: {kind.value}" for what, kind in snap.errors),
    )


def _tabby_without_unit(obs: Observation) -> int | None:
    """TabbyAPI's own process where no unit can be asked (no systemd, or no such unit: the
    scanner calls every process of TabbyAPI's program outside a unit ORPHAN): never shown as an
    orphan of itself. The same test as situation.tabby_process's."""
    if obs.unit.exists:
        return None
    found = tabby_process(obs)
    return int(found.partition("@")[0]) if found else None


def _role(proc: ProcessInfo, tabby: int | None) -> str:
    return ProcessRole.MAIN.value if proc.pid == tabby else proc.role.value


def _short(command: str) -> str:
    return cut(command, _COMMAND_MAX)


_LOAD_ENDS = {EventKind.MODEL_LOADED: "ok", EventKind.LOAD_FAILED: "failed"}


def _load_end(end: Event) -> tuple[str, float | None]:
    """How a load ended (ok, failed or cancelled) and how long it ran, from its end event."""
    fields = dict(end.fields)
    outcome = _LOAD_ENDS[end.kind]
    if fields.get("HYDRA_ERROR_KIND") == ErrorKind.CANCELLED.value:
        outcome = "cancelled"
    try:
        took = float(fields["HYDRA_DURATION_S"])
    except (KeyError, ValueError):
        took = None
    return outcome, took


def _action_entries(recent: Sequence[Event]) -> tuple[ActionEntry, ...]:
    """The actions among `recent`, oldest first; a load's entry with how it ended. Its "started"
    event is all the action's own record says; the load's end comes cycles later, as a
    model_loaded or load_failed event (one load at a time: the next end of the same model)."""
    entries: list[ActionEntry] = []
    running: dict[str, int] = {}  # a model -> the index of its load's entry, until it ends
    for e in recent:
        if e.kind not in _ACTION_KINDS and e.kind not in _LOAD_ENDS:
            continue  # most events: neither an action nor a load's end
        fields = dict(e.fields)
        model = fields.get("HYDRA_MODEL", "")
        if e.kind in _LOAD_ENDS and model in running:
            outcome, took = _load_end(e)
            i = running.pop(model)
            ended = {"outcome": outcome, "ended_at": e.wall, "duration_s": took}
            entries[i] = ActionEntry(**{**dict(entries[i].values()), **ended})
        if e.kind not in _ACTION_KINDS:
            continue
        if e.action == _LOAD and fields.get("HYDRA_RESULT") == ResultStatus.IN_PROGRESS.value:
            running[model] = len(entries)
        entries.append(
            ActionEntry(
                at=e.wall,
                event=e.kind.value,
                action=e.action,
                message=e.message,
                rule=e.rule.value if e.rule else "",
                reason=e.reason,
            )
        )
    return tuple(entries)


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
        tabby = _tabby_without_unit(obs)
        if obs.port is not None:
            owned = []
            for lst in obs.port.listeners:
                proc = obs.process(lst.pid) if lst.pid is not None else None
                owned.append(
                    ListenerInfo(
                        port=lst.port,
                        pid=lst.pid,
                        role=_role(proc, tabby) if proc else "",
                        command=_short(proc.command) if proc else "",
                    )
                )
            listeners = tuple(owned)
        processes = tuple(
            ProcessEntry(
                pid=p.pid, role=p.role.value, command=_short(p.command), gpu_bytes=p.gpu_bytes
            )
            for p in obs.processes
            if p.role in (ProcessRole.ORPHAN, ProcessRole.FOREIGN) and p.pid != tabby
        )
        if obs.pause is not None:
            pause = PauseInfo(paused=True, reason=obs.pause.reason, until=wall(obs.pause.until))
    if state.phase is Phase.PAUSED and not pause.paused:
        pause = PauseInfo(paused=True)

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
    every = _action_entries(recent)
    actions = every[-actions_kept:] if actions_kept > 0 else ()
    unknown_start = state.phase is Phase.UNKNOWN and state.phase_since == 0.0
    report = StatusReport(
        generated_at=wall_now,
        pid=pid,
        pid_start=pid_start,
        heartbeat=wall(obs.at) if obs is not None else None,
        phase=state.phase.value,
        since=None if unknown_start else wall(state.phase_since),
        verdict=int(state.phase.verdict),
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
        actions_not_shown=len(every) - len(actions),
        backoff=backoff,
        paused=pause,
        findings=tuple(
            FindingEntry(rule=f.rule.value, severity=f.severity.value, message=f.message)
            for f in state.findings
        ),
        version=__version__,
        config_sha256=cfg.sha256,
        config_file=cfg.file_identity,
        runtime_dir=cfg.watchdog.runtime_dir,
        stale_after=stale_after(cfg),
    )
    return replace(report, summary=summarize(report))
