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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.jsonable import from_jsonable, to_jsonable
from hydra_watchdog.states import Phase, Verdict

if TYPE_CHECKING:  # the daemon's side (build_status); `status` only reads the file
    from hydra_watchdog.config import Config, GpuDevice
    from hydra_watchdog.observation import GpuSnapshot, ModelDir, Observation
    from hydra_watchdog.policy_state import PolicyState

SCHEMA_VERSION = 1
GIB = 1024**3
ACTIONS_KEPT = 10
_COMMAND_MAX = 200  # a command line is evidence, not a dump
_ACTION_KINDS = (EventKind.ACTION, EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED)
FUTURE_SKEW = 10.0  # seconds a heartbeat may lie ahead of `now` (clock steps) before it is a lie
_MAX_INT = 2**63  # bytes, pids, counts; beyond it a number is garbage (and overflows a float)
PROC = Path("/proc")


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


def summarize(report: StatusReport, *, now: float | None = None) -> str:
    """One line: the sd_notify STATUS and the first line of `status`."""
    now = report.generated_at if now is None else now
    parts = [report.phase.value]
    if report.paused.paused:
        parts.append(f"paused: {report.paused.reason}" if report.paused.reason else "paused")
    if report.health is not None:
        h = report.health
        if h.outcome == "ok":
            parts.append(f"health {h.status} in {h.latency_s * 1000:.0f} ms")
        else:
            parts.append(f"health {h.outcome}" + (f" ({h.status})" if h.status else ""))
    if report.load is not None:
        progress = f" {report.load.module}/{report.load.modules}" if report.load.modules else ""
        parts.append(f"loading {report.load.model}{progress}")
    elif report.model.known:
        parts.append(f"model {report.model.loaded}" if report.model.loaded else "no model loaded")
    if report.backoff.step:
        text = f"back-off step {report.backoff.step}"
        if report.backoff.next_attempt_at is not None:
            text += f", next start in {max(0.0, report.backoff.next_attempt_at - now):.0f} s"
        parts.append(text)
    if report.findings:
        parts.append(report.findings[0].message)
    return "; ".join(parts)


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
    )
    return dataclasses.replace(report, summary=summarize(report))


# --- JSON ---------------------------------------------------------------------------------------


def to_json(report: StatusReport) -> str:
    return json.dumps(to_jsonable(report), indent=2, sort_keys=False) + "\n"


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


# --- reading ------------------------------------------------------------------------------------


def process_start(pid: int, proc: Path = PROC) -> int | None:
    """A process's start time (field 22 of /proc/PID/stat, clock ticks since boot); None when it
    is gone or unreadable. With the pid it names one process for the life of a boot."""
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
        # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def daemon_problem(report: StatusReport, proc: Path = PROC) -> str:
    """Why the daemon that wrote `report` is not running, or "" when it is (or when this user
    cannot tell: /proc mounted with hidepid). Reads only world-readable /proc files."""
    pid = report.pid
    if not 0 < pid <= 2**22:  # the kernel's pid_max limit
        return f"the status file names no daemon pid (pid {pid})"
    base = proc / str(pid)
    try:
        cmdline = (base / "cmdline").read_bytes()
        status = (base / "stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        if not (proc / "1").exists():
            return ""  # hidepid: other users' processes are invisible to us; the heartbeat decides
        return f"daemon pid {pid} is gone: hydra-watchdog is not running (it did not stop cleanly)"
    except OSError:
        return ""  # hidepid=noaccess: cannot tell
    fields = status.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):
        return f"daemon pid {pid} is gone: hydra-watchdog exited (a zombie, not yet reaped)"
    # An empty cmdline: an exec in progress (or a kernel thread); the start time still decides.
    if cmdline and b"hydra_watchdog" not in cmdline and b"hydra-watchdog" not in cmdline:
        command = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:80]
        return f"daemon pid {pid} is gone: that pid is now another process ({command or '?'})"
    if report.pid_start is not None and process_start(pid, proc) != report.pid_start:
        return f"daemon pid {pid} is gone: that pid is now another hydra-watchdog process"
    return ""


def evaluate(
    report: StatusReport | None,
    *,
    wall_now: float,
    stale_after: float,
    daemon: str = "",
) -> tuple[Verdict, str]:
    """The Nagios verdict of a report and one line saying why (without the verdict's name).
    UNKNOWN when there is no report, the daemon stopped, `daemon` says it is not running (see
    daemon_problem), no cycle completed yet, the heartbeat is in the future or older than
    `stale_after` seconds. Ages are computed from `wall_now`."""
    if report is None:
        return Verdict.UNKNOWN, (
            "no status: hydra-watchdog is not running (or has not written its status yet)"
        )
    if report.stopped_at is not None:
        return Verdict.UNKNOWN, (
            f"hydra-watchdog (pid {report.pid}) stopped at {_clock(report.stopped_at)} "
            f"({_ago(report.stopped_at, wall_now)}): nothing is watching TabbyAPI"
        )
    if daemon:
        return Verdict.UNKNOWN, daemon
    if report.heartbeat is None:
        return Verdict.UNKNOWN, (f"hydra-watchdog (pid {report.pid}) has not completed a cycle yet")
    age = wall_now - report.heartbeat
    if age < -FUTURE_SKEW:
        return Verdict.UNKNOWN, (
            f"the status file's last cycle is {-age:.0f} s in the future: the clock was set "
            f"back, or the file was not written by hydra-watchdog (pid {report.pid})"
        )
    if age > stale_after:
        return Verdict.UNKNOWN, (
            f"status is stale: the last cycle was {age:.0f} s ago (limit {stale_after:.0f} s); "
            f"is hydra-watchdog (pid {report.pid}) hung or stopped?"
        )
    return report.phase.verdict, summarize(report, now=wall_now)


def _clock(t: float | None) -> str:
    if t is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f} (not a date)"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    delta = now - t
    if delta < 0:
        return f"in {_span(-delta)}"
    return f"{_span(delta)} ago"


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def _watts(value: float | None) -> str:
    return "?" if value is None else f"{value:g} W"


def render_human(report: StatusReport, *, now: float | None = None) -> str:
    """`hydra-watchdog status` for a terminal: everything the runbook asks first. Ages are
    computed from `now` (default: the current time), not from when the file was written."""
    now = time.time() if now is None else now
    daemon = f"pid {report.pid}, last cycle {_ago(report.heartbeat, now)}"
    if report.stopped_at is not None:
        daemon += f", STOPPED at {_clock(report.stopped_at)}"
    lines = [
        f"hydra-watchdog: {report.phase.value.upper()} [{report.phase.verdict.name}] "
        f"since {_clock(report.since)} ({_ago(report.since, now)})",
        f"  {summarize(report, now=now)}",
        f"daemon:     {daemon}" + (", DRY RUN (actions are only logged)" if report.dry_run else ""),
    ]
    if report.health is not None:
        h = report.health
        text = f"{h.outcome}" + (f" {h.status}" if h.status else "")
        text += f" in {h.latency_s * 1000:.0f} ms" + (f" ({h.detail})" if h.detail else "")
        lines.append(f"health:     {text}")
    if report.unit is not None:
        u = report.unit
        if u.available:
            restarts = "?" if u.n_restarts is None else str(u.n_restarts)
            lines.append(
                f"unit:       {u.name} {u.active_state}/{u.sub_state}, "
                f"result {u.result or '-'}, NRestarts {restarts}"
                + (f", MainPID {u.main_pid}" if u.main_pid else "")
            )
        else:
            lines.append(f"unit:       {u.name} (systemd not available: {u.detail or 'unknown'})")
    m = report.model
    model = f"wanted {m.wanted or '(none)'}"
    if m.known:
        model += f", loaded {m.loaded or '(none)'}"
    if m.fallback_in_use:
        model += " (fallback in use)"
    lines.append(f"model:      {model}")
    if report.load is not None:
        ld = report.load
        progress = f" {ld.module}/{ld.modules} modules" if ld.modules else ""
        lines.append(
            f"loading:    {ld.model}{progress}, started {_ago(ld.started_at, now)}, "
            f"gives up at {_clock(ld.deadline_at)}"
        )
    if m.vram_needed_bytes is not None:
        lines.append(f"VRAM need:  {_gib(m.vram_needed_bytes)} in total ({m.vram_needed_source})")
    if report.gpu_error:
        lines.append(f"GPUs:       not readable: {report.gpu_error}")
    for g in report.gpus:
        power = f"power limit {_watts(g.power_limit_w)}"
        if g.power_target_w is not None:
            power += f" (target {_watts(g.power_target_w)})"
        lines.append(
            f"gpu{g.index}:       {g.name}: VRAM used {_gib(g.vram_used_bytes)}, "
            f"free {_gib(g.vram_free_bytes)} of {_gib(g.vram_total_bytes)}; {power}"
            + (f"; errors: {', '.join(g.errors)}" if g.errors else "")
        )
    for lst in report.listeners:
        owner = f"pid {lst.pid}" if lst.pid is not None else "unknown owner"
        if lst.role:
            owner += f" ({lst.role}: {lst.command})"
        lines.append(f"port {lst.port}:  {owner}")
    for proc in report.processes:
        lines.append(
            f"{proc.role + ':':<11} pid {proc.pid} {proc.command} ({_gib(proc.gpu_bytes)} on GPU)"
        )
    b = report.backoff
    if b.step:
        lines.append(
            f"back-off:   step {b.step}, next attempt {_clock(b.next_attempt_at)} "
            f"({_ago(b.next_attempt_at, now)})" + (", ESCALATED" if b.escalated else "")
        )
    else:
        lines.append("back-off:   none")
    lines.append(
        f"restarts:   {b.restarts_in_window} in the last {_span(b.window_s)} "
        f"({b.restarts_by_watchdog} by the watchdog, {b.restarts_by_systemd} by systemd)"
    )
    p = report.paused
    if p.paused:
        until = f"until {_clock(p.until)}" if p.until is not None else "until `resume`"
        lines.append(f"paused:     yes, {p.reason or 'no reason given'}, {until}")
    else:
        lines.append("paused:     no")
    if report.findings:
        lines.append("findings:")
        lines.extend(f"  [{f.severity}] {f.rule}: {f.message}" for f in report.findings)
    if report.actions:
        lines.append("last actions:")
        for a in report.actions:
            outcome = {"action_failed": " FAILED", "action_refused": " REFUSED"}.get(a.event, "")
            because = f" (because {a.rule}: {a.reason})" if a.reason else ""
            lines.append(f"  {_clock(a.at)}{outcome} {a.message}{because}")
    return "\n".join(lines) + "\n"
