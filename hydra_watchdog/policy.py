"""The runbook as a pure state machine.

    decide(state, observation, now, config) -> (new_state, actions)

Everything that affects what the watchdog does lives here, and nothing here does I/O or reads a
clock: `now` is monotonic seconds passed in, the observation is a frozen snapshot, and the result
is data. The daemon executes the actions in order (a failure skips the rest of the batch) and
feeds their results back through the next observation.

Theory of operation, one cycle:

1. absorb: results of earlier actions (load outcomes, refused power limits, the fallback-route
   check) and systemd's own restarts (NRestarts deltas) update the memory;
2. track: health streaks (consecutive failures, slow probes, healthy-since);
3. diagnose: findings name every cause visible now (they clear when the cause clears);
4. plan, first match wins: paused -> nothing; unit missing -> blocked; a port held by someone
   else -> kill an orphan and restart, or block on a foreign holder; restart loop / back-off ->
   stop, then one start per exponential step; down -> restart or full recovery; generation hang
   -> restart; no model -> VRAM check, load (or fallback); slow -> degraded, diagnose only;
5. always (unless paused): power limits that drifted are re-applied, orphans holding the port or
   VRAM are cleaned up, and the expensive probes the next cycle needs are requested.

Two budgets keep it from making things worse: the watchdog never issues more than
`max_restarts` starts/restarts within `window`, and more than `max_restarts` restarts of any
origin within `window` while TabbyAPI is not healthy is a restart loop: stop and back off.
"""

from __future__ import annotations

from dataclasses import replace

from hydra_watchdog.actions import (
    Action,
    ActionResult,
    CheckFallbackRoute,
    KillOrphan,
    LoadModel,
    Reason,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.config import Config, GpuDevice
from hydra_watchdog.durations import format_duration
from hydra_watchdog.observation import (
    GpuSnapshot,
    ModelDir,
    Observation,
    Outcome,
    Probe,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.policy_state import Finding, PolicyState, RestartRecord
from hydra_watchdog.states import Phase, Rule, Severity
from hydra_watchdog.text import one_line

GIB = 1024**3
POWER_RETRY_AFTER = 3600.0  # a refused power limit is retried hourly, not every cycle
POWER_TOLERANCE_W = 1.0  # drivers round limits; smaller differences are not drift
WATCHDOG, SYSTEMD = "watchdog", "systemd"

Plan = tuple[PolicyState, list[Action], list[Finding]]


def decide(
    state: PolicyState, obs: Observation, now: float, config: Config
) -> tuple[PolicyState, tuple[Action, ...]]:
    """One step of the runbook. Pure: same inputs, same outputs; `config.watchdog.dry_run` is
    deliberately never read here, so a dry run decides exactly as a real one."""
    s = _absorb_results(state, obs, now, config)
    s = _count_restarts(s, obs, now, config)
    s = _track_health(s, obs, now, config)
    findings = diagnose(s, obs, now, config)

    if obs.pause is not None and (obs.pause.until is None or obs.pause.until > now):
        until = "until resumed" if obs.pause.until is None else "for " + _dur(obs.pause.until - now)
        paused = Finding(Rule.PAUSED, Severity.NOTICE, f"paused {until}: {obs.pause.reason}")
        s = replace(_enter(s, Phase.PAUSED, now), findings=(paused, *findings), wants=frozenset())
        return s, ()

    s, actions, more = _plan(s, obs, now, config, findings)
    actions += _power_limits(s, obs, now, config)
    actions += _fallback_route(s, config)
    s = replace(s, findings=tuple(findings + more), wants=_wants(s, obs, now, config))
    return s, tuple(actions)


# --- 1. absorb ---------------------------------------------------------------------------------


def _absorb_results(s: PolicyState, obs: Observation, now: float, cfg: Config) -> PolicyState:
    final_load: ActionResult | None = None
    for res in obs.results:
        action = res.action
        if isinstance(action, LoadModel) and res.status is not ResultStatus.IN_PROGRESS:
            final_load = res
        elif isinstance(action, SetPowerLimit) and res.status in (
            ResultStatus.FAILED,
            ResultStatus.REFUSED,
        ):
            denied = [d for d in s.power_denied if d[0] != action.gpu_index]
            denied.append((action.gpu_index, action.watts, now + POWER_RETRY_AFTER))
            s = replace(s, power_denied=tuple(denied))
        elif isinstance(action, SetPowerLimit) and res.status is ResultStatus.DRY_RUN:
            # The limit never changes in a dry run: say "would set" hourly, not every cycle.
            held = [d for d in s.power_held if d[0] != action.gpu_index]
            held.append((action.gpu_index, action.watts, now + POWER_RETRY_AFTER))
            s = replace(s, power_held=tuple(held))
        elif isinstance(action, CheckFallbackRoute) and res.status is not ResultStatus.SKIPPED:
            verdict = "works" if res.succeeded else "FAILS"
            s = replace(
                s,
                fallback_route_checked=True,
                fallback_route_detail=f"fallback route {action.url} {verdict}: {res.detail}",
            )

    if final_load is not None:
        s = replace(s, load_in_flight="", load_started=None)
        if not final_load.succeeded:
            s = _load_failed(s, now, cfg, final_load.detail)
    elif s.load_in_flight and obs.load is None:
        # The actuator reports progress for as long as a load runs; silence means it is gone
        # (the daemon was restarted mid-load). Count it, so a vanishing load cannot loop.
        s = _load_failed(
            replace(s, load_in_flight="", load_started=None), now, cfg, "the load was lost"
        )
    return s


def _load_failed(s: PolicyState, now: float, cfg: Config, detail: str) -> PolicyState:
    failures = s.load_failures + 1
    return replace(
        s,
        load_failures=failures,
        next_load_at=now + backoff_delay(failures, cfg),
        last_load_error=detail,
    )


def _count_restarts(s: PolicyState, obs: Observation, now: float, cfg: Config) -> PolicyState:
    records = list(s.restarts)
    seen, n = s.nrestarts_seen, obs.unit.n_restarts
    if n is not None:
        if seen is not None:
            # A manual restart or reset-failed zeroes NRestarts: then all n are new.
            delta = n if n < seen else n - seen
            records += [RestartRecord(now, SYSTEMD)] * delta
        seen = n
    window = cfg.restart_loop.window
    kept = tuple(r for r in records if now - r.at < window)
    fresh = bool(s.invocation_id) and obs.unit.invocation_id not in ("", s.invocation_id)
    s = replace(s, restarts=kept, nrestarts_seen=seen, invocation_id=obs.unit.invocation_id)
    if fresh and s.load_failures:
        # A new TabbyAPI process starts with empty VRAM: the main model deserves a fresh try.
        s = replace(s, load_failures=0, next_load_at=None, last_load_error="")
    return s


# --- 2. track ----------------------------------------------------------------------------------


def _track_health(s: PolicyState, obs: Observation, now: float, cfg: Config) -> PolicyState:
    health, t = obs.health, cfg.tabbyapi
    if obs.canary is not None:
        s = replace(s, last_canary_at=now)
    if obs.model is not None and obs.model.loaded:
        s = replace(s, next_load_at=None, last_load_error="")
        if obs.model.loaded == cfg.model.name:
            s = replace(s, load_failures=0, using_fallback=False)
    if health.healthy:
        slow = health.result.latency_s > t.slow_threshold
        return replace(
            s,
            failures=0,
            last_failure="",
            slow_streak=s.slow_streak + 1 if slow else 0,
            healthy_since=s.healthy_since if s.healthy_since is not None else now,
            fallback_route_checked=False,
            fallback_route_detail="",
        )
    s = replace(s, healthy_since=None, slow_streak=0)
    if _starting(s, obs, now, cfg):
        return replace(s, failures=0, last_failure="")
    return replace(s, failures=s.failures + 1, last_failure=_health_text(obs))


def _unit_up(unit: UnitStatus) -> bool:
    """A process is (being) run: active, or activating other than waiting to auto-restart."""
    if unit.active_state in ("active", "reloading"):
        return True
    return unit.active_state == "activating" and unit.sub_state != "auto-restart"


def _auto_restarting(unit: UnitStatus) -> bool:
    return unit.sub_state == "auto-restart"


def _start_reference(s: PolicyState, obs: Observation) -> float | None:
    stamps = [t for t in (s.recovery_started, obs.unit.active_enter_mono) if t is not None]
    return max(stamps) if stamps else None


def _starting(s: PolicyState, obs: Observation, now: float, cfg: Config) -> bool:
    """TabbyAPI loads its startup model before it opens the port: refused connections from a
    unit that (re)started less than startup_grace ago mean "starting", not "down"."""
    if obs.health.result.outcome is not Outcome.REFUSED:
        return False
    if obs.unit.available and not _unit_up(obs.unit):
        return False
    started = _start_reference(s, obs)
    return started is not None and now - started < cfg.tabbyapi.startup_grace


def _health_text(obs: Observation) -> str:
    r = obs.health.result
    text = r.outcome.value + (f" {r.status}" if r.status else "")
    if obs.health.unhealthy_issues:
        text += f" ({obs.health.unhealthy_issues[-1][:120]})"
    elif r.detail:
        text += f" ({r.detail[:120]})"
    return text


# --- 3. diagnose -------------------------------------------------------------------------------


def diagnose(s: PolicyState, obs: Observation, now: float, cfg: Config) -> list[Finding]:
    """Every cause visible in this observation, worst first; recomputed each cycle."""
    out: list[Finding] = []
    host, unit, port = obs.host, obs.unit, cfg.tabbyapi.port
    if host.models_dir_ok is False:
        out.append(
            Finding(
                Rule.MODELS_MOUNT,
                Severity.CRIT,
                f"models dir {cfg.model.models_dir}: {host.models_dir_detail or 'unavailable'}; "
                "no load can succeed until it is back (runbook: verify the /mnt/models mount)",
            )
        )
    elif host.model is not None and cfg.model.name and not host.model.usable:
        out.append(Finding(Rule.MODELS_MOUNT, Severity.ERR, _model_dir_problem(host.model)))
    if host.missing_libraries:
        out.append(
            Finding(
                Rule.MISSING_LIBRARIES,
                Severity.CRIT,
                "TabbyAPI's ExLlamaV2 extension cannot load: "
                f"{', '.join(host.missing_libraries)} not found (a NixOS rebuild changed library "
                f"paths? rebuild the venv {cfg.tabbyapi.venv}); not restarting until fixed",
            )
        )
    for proc, role_port in _port_holders(obs, port):
        if proc is None or (proc.role is ProcessRole.ORPHAN and not unit.available):
            continue
        if proc.role is ProcessRole.FOREIGN:
            out.append(
                Finding(
                    Rule.FOREIGN_HOLDER,
                    Severity.CRIT,
                    f"port {role_port} is held by pid {proc.pid} ({one_line(proc.command)}), "
                    "which is not TabbyAPI's: never signalled; free the port by hand",
                )
            )
        elif proc.role is ProcessRole.ORPHAN:
            out.append(
                Finding(
                    Rule.PORT_CONFLICT,
                    Severity.ERR,
                    f"port {role_port} is held by orphan TabbyAPI process {proc.pid} "
                    f"({one_line(proc.command)}) outside {unit.name}",
                )
            )
    withheld = [
        probe.result.detail
        for probe in (obs.model, obs.canary)
        if probe is not None and probe.result.outcome is Outcome.WITHHELD
    ]
    if withheld:
        out.append(Finding(Rule.KEY_WITHHELD, Severity.CRIT, withheld[0]))
    moved = [p for p in obs.processes if port + 1 in p.listens_on and _in_unit(p)]
    if moved and obs.port is not None and obs.port.owners(port):
        out.append(
            Finding(
                Rule.PORT_CONFLICT,
                Severity.ERR,
                f"TabbyAPI (pid {moved[0].pid}) listens on {port + 1}: port {port} was busy",
            )
        )
    for proc in obs.processes:
        if not unit.available:
            break  # orphan or the unit's own? unknowable without systemd: not reported as orphan
        if proc.role is ProcessRole.ORPHAN and not proc.listens_on:
            held = (
                f"holds {proc.gpu_bytes / GIB:.1f} GiB VRAM" if proc.gpu_bytes else "holds nothing"
            )
            sev = Severity.WARNING if proc.gpu_bytes else Severity.NOTICE
            out.append(
                Finding(
                    Rule.ORPHAN_CLEANUP,
                    sev,
                    f"orphan TabbyAPI process {proc.pid} ({one_line(proc.command)}) outside "
                    f"{unit.name} {held}" + ("" if proc.gpu_bytes else ": reported, not killed"),
                )
            )
    if not unit.available:
        out.append(Finding(Rule.DOWN, Severity.WARNING, f"systemd unavailable: {unit.detail}"))
    elif not unit.exists:
        out.append(Finding(Rule.DOWN, Severity.CRIT, f"unit {unit.name} does not exist"))
    elif not _unit_up(unit) and unit.result not in ("", "success"):
        cause = {
            "oom-kill": " (OOM-killed: VRAM or host memory exhausted)",
            "exit-code": f" (exit status {unit.exec_main_status})",
            "signal": " (killed by a signal)",
            "core-dump": " (crashed, core dumped)",
            "timeout": " (start timed out: raise TimeoutStartSec for a 70B load?)",
            "start-limit-hit": " (systemd start limit hit)",
        }.get(unit.result, "")
        out.append(
            Finding(
                Rule.DOWN,
                Severity.ERR,
                f"{unit.name} is {unit.active_state}/{unit.sub_state}, Result={unit.result}{cause}",
            )
        )
    if host.journal_excerpt and not obs.health.healthy:
        last = " | ".join(line.strip() for line in host.journal_excerpt[-3:])
        out.append(Finding(Rule.DOWN, Severity.INFO, f"last log lines: {last[:400]}"))
    if obs.gpus.error is not None:
        out.append(
            Finding(
                Rule.VRAM_CHECK,
                Severity.WARNING,
                f"NVML unavailable ({obs.gpus.error.value}: {obs.gpus.detail}); "
                "VRAM checks and power limits are skipped",
            )
        )
    for gpu in obs.gpus.devices:
        lost = [what for what, kind in gpu.errors if kind.value == "gpu_lost"]
        if lost:
            out.append(
                Finding(
                    Rule.VRAM_CHECK,
                    Severity.CRIT,
                    f"gpu{gpu.index} is lost (fell off the bus?): a reboot is likely needed",
                )
            )
    if s.slow_streak >= cfg.tabbyapi.slow_probes:
        out.append(
            Finding(
                Rule.SLOW_HEALTH,
                Severity.WARNING,
                f"/health took {obs.health.result.latency_s * 1000:.0f} ms "
                f"(> {cfg.tabbyapi.slow_threshold * 1000:.0f} ms) for {s.slow_streak} probes; "
                + "; ".join(_gpu_pressure(g) for g in obs.gpus.devices)
                + "; not a reason to restart",
            )
        )
    for gpu_index, watts, _retry_at in s.power_denied:
        out.append(
            Finding(
                Rule.POWER_LIMIT,
                Severity.WARNING,
                f"gpu{gpu_index}: setting the power limit to {watts:g} W failed; retried "
                f"hourly, not every cycle (needs CAP_SYS_ADMIN)",
            )
        )
    if s.last_load_error:
        out.append(
            Finding(
                Rule.LOAD_FAILED,
                Severity.ERR,
                f"model load failed {s.load_failures}x: {s.last_load_error[:200]}",
            )
        )
    if s.fallback_route_detail:
        ok = "works" in s.fallback_route_detail
        out.append(
            Finding(
                Rule.FALLBACK_ROUTE,
                Severity.INFO if ok else Severity.ERR,
                s.fallback_route_detail[:200],
            )
        )
    return out


def _model_dir_problem(model: ModelDir) -> str:
    if not model.exists:
        return f"model folder {model.path} is missing"
    missing = []
    if not model.has_config:
        missing.append("config.json")
    if not model.weight_files:
        missing.append("*.safetensors")
    return f"model folder {model.path} lacks {' and '.join(missing)}" + (
        f" ({model.detail})" if model.detail else ""
    )


def _gpu_pressure(g: GpuSnapshot) -> str:
    bits = [f"gpu{g.index}"]
    if g.utilization_pct is not None:
        bits.append(f"util {g.utilization_pct}%")
    if g.temperature_c is not None:
        bits.append(f"{g.temperature_c}°C")
    if g.power.usage_w is not None and g.power.limit_w is not None:
        bits.append(f"power {g.power.usage_w:.0f}/{g.power.limit_w:.0f} W")
    reasons = [r for r in g.throttle_reasons if r != "gpu_idle"]
    bits.append("throttle: " + (",".join(reasons) if reasons else "none"))
    return " ".join(bits)


# --- 4. plan -----------------------------------------------------------------------------------


def _enter(s: PolicyState, phase: Phase, now: float) -> PolicyState:
    return s if s.phase is phase else replace(s, phase=phase, phase_since=now)


def backoff_delay(step: int, cfg: Config) -> float:
    """Wait before back-off attempt `step` (1, 2, ...): backoff_initial * 2^(step-1), capped."""
    r = cfg.restart_loop
    return min(r.backoff_initial * 2.0 ** min(max(step - 1, 0), 60), r.backoff_max)


def _dur(seconds: float) -> str:
    return format_duration(round(seconds, 1)) if seconds < 60 else format_duration(round(seconds))


def _listeners(obs: Observation, port: int) -> list[ProcessInfo | None]:
    if obs.port is None:
        return []
    return [None if pid is None else obs.process(pid) for pid in obs.port.owners(port)]


def _port_holders(obs: Observation, port: int) -> list[tuple[ProcessInfo | None, int]]:
    """Listeners on the configured port that are not TabbyAPI's unit (None: owner unknown)."""
    return [(p, port) for p in _listeners(obs, port) if p is None or not _in_unit(p)]


def _in_unit(p: ProcessInfo) -> bool:
    return p.role in (ProcessRole.MAIN, ProcessRole.UNIT)


def _orphans_in_the_way(obs: Observation) -> list[ProcessInfo]:
    """Orphans provably harmful: holding our port (or port+1) or GPU memory. Without systemd to
    say which processes are the unit's, "outside the unit" is a guess: then there are none."""
    if not obs.unit.available:
        return []
    return [
        p
        for p in obs.processes
        if p.role is ProcessRole.ORPHAN and (p.listens_on or p.gpu_bytes > 0)
    ]


def _kill(procs: list[ProcessInfo], rule: Rule, why: str) -> list[Action]:
    return [
        KillOrphan(
            p.pid,
            p.start_ticks,
            p.cmdline,
            p.uid,
            Reason(rule, f"{why}: pid {p.pid} {one_line(p.command, 80)}"),
        )
        for p in procs
    ]


def _blocking_causes(findings: list[Finding]) -> list[Finding]:
    """Causes a restart cannot fix and would only turn into a loop (or a port-hopping storm)."""
    return [f for f in findings if f.rule in (Rule.FOREIGN_HOLDER, Rule.MISSING_LIBRARIES)]


def _restart_budget_left(s: PolicyState, now: float, cfg: Config) -> bool:
    r = cfg.restart_loop
    return s.restarts_in_window(now, r.window, WATCHDOG) < r.max_restarts


def _start_actions(
    s: PolicyState, obs: Observation, now: float, cfg: Config, rule: Rule, evidence: str
) -> tuple[PolicyState, list[Action]]:
    """Bring the unit up: restart when it runs, else (reset-failed and) start. Records the
    restart against the budget and opens the startup grace."""
    unit, reason = obs.unit, Reason(rule, evidence)
    actions: list[Action] = []
    if _unit_up(unit):
        actions.append(UnitCommand(UnitVerb.RESTART, unit.name, reason))
    else:
        if unit.active_state == "failed":
            actions.append(UnitCommand(UnitVerb.RESET_FAILED, unit.name, reason))
        actions.append(UnitCommand(UnitVerb.START, unit.name, reason))
    s = replace(
        s,
        restarts=(*s.restarts, RestartRecord(now, WATCHDOG)),
        recovery_started=now,
        failures=0,
    )
    return _enter(s, Phase.RECOVERING, now), actions


def _plan(
    s: PolicyState, obs: Observation, now: float, cfg: Config, findings: list[Finding]
) -> Plan:
    unit, health = obs.unit, obs.health
    if unit.available and not unit.exists:
        return _enter(s, Phase.BLOCKED, now), [], []

    cleanup = _kill(_orphans_in_the_way(obs), Rule.ORPHAN_CLEANUP, "orphan holds the port or VRAM")
    if not cfg.orphans.enabled:
        cleanup = []

    # Someone else holds TabbyAPI's port: the health answers may not even be TabbyAPI's.
    holders = _port_holders(obs, cfg.tabbyapi.port)
    if any(p is not None and p.role is ProcessRole.FOREIGN for p, _ in holders):
        return _enter(s, Phase.BLOCKED, now), cleanup, []
    orphan_holders = [
        p for p, _ in holders if p is not None and p.role is ProcessRole.ORPHAN and unit.available
    ]
    if orphan_holders and cleanup and s.backoff_step == 0:
        evidence = (
            f"port {cfg.tabbyapi.port} held by orphan pid {orphan_holders[0].pid}; "
            "restart so TabbyAPI binds its own port again"
        )
        return _restart_or_loop(s, obs, now, cfg, Rule.PORT_CONFLICT, evidence, cleanup, findings)

    if s.backoff_step > 0 and not health.healthy:
        return _backoff(s, obs, now, cfg, cleanup, findings)

    if health.healthy:
        return _healthy(s, obs, now, cfg, cleanup, findings)
    return _unhealthy(s, obs, now, cfg, cleanup, findings)


def _restart_or_loop(
    s: PolicyState,
    obs: Observation,
    now: float,
    cfg: Config,
    rule: Rule,
    evidence: str,
    before: list[Action],
    findings: list[Finding],
) -> Plan:
    """Remediate with a (re)start when allowed; otherwise this is a restart loop."""
    if not obs.unit.available:
        note = Finding(rule, Severity.CRIT, f"{evidence}; cannot act: {obs.unit.detail}")
        return _enter(s, Phase.BLOCKED, now), before, [note]
    blocking = _blocking_causes(findings)
    if blocking:
        return _enter(s, Phase.BLOCKED, now), before, []
    r = cfg.restart_loop
    if s.restarts_in_window(now, r.window) > r.max_restarts or not _restart_budget_left(
        s, now, cfg
    ):
        return _enter_loop(s, obs, now, cfg, before)
    s, start = _start_actions(s, obs, now, cfg, rule, evidence)
    return s, before + start, []


def _enter_loop(
    s: PolicyState, obs: Observation, now: float, cfg: Config, before: list[Action]
) -> Plan:
    """TabbyAPIRestartLoop: DO NOT just restart again. Stop it, then back off."""
    r = cfg.restart_loop
    step = s.backoff_step + 1
    wait = backoff_delay(step, cfg)
    n = s.restarts_in_window(now, r.window)
    evidence = (
        f"{n} restarts within {_dur(r.window)} (max {r.max_restarts}): stopped; "
        f"back-off step {step}, next start attempt in {_dur(wait)}"
    )
    actions = list(before)
    if _unit_up(obs.unit) or _auto_restarting(obs.unit):
        actions.append(
            UnitCommand(UnitVerb.STOP, obs.unit.name, Reason(Rule.RESTART_LOOP, evidence))
        )
    s = replace(
        s,
        backoff_step=step,
        backoff_until=now + wait,
        loop_since=s.loop_since if s.loop_since is not None else now,
        recovery_started=None,
        failures=0,
    )
    note = Finding(Rule.RESTART_LOOP, Severity.CRIT, evidence)
    return _enter(s, Phase.ESCALATED if s.escalated else Phase.BACKOFF, now), actions, [note]


def _backoff(
    s: PolicyState,
    obs: Observation,
    now: float,
    cfg: Config,
    cleanup: list[Action],
    findings: list[Finding],
) -> Plan:
    r = cfg.restart_loop
    notes: list[Finding] = []
    if s.loop_since is not None and not s.escalated and now - s.loop_since >= r.escalate_after:
        s = replace(s, escalated=True)
    if s.escalated:
        notes.append(
            Finding(
                Rule.ESCALATION,
                Severity.CRIT,
                f"restart loop unresolved for over {_dur(r.escalate_after)}: "
                "needs a human (runbook: Escalation); "
                + ("the fallback model will be loaded" if cfg.model.fallback else "no fallback"),
            )
        )
    waiting = Phase.ESCALATED if s.escalated else Phase.BACKOFF

    if s.backoff_until is not None and _unit_up(obs.unit):
        # Someone else (a human, a timer) started it while we waited: that is this step's attempt.
        s = replace(s, backoff_until=None, recovery_started=now)
        return _enter(s, Phase.RECOVERING, now), cleanup, notes
    if s.backoff_until is not None:  # waiting for the next attempt
        if now < s.backoff_until:
            notes.append(
                Finding(
                    Rule.RESTART_LOOP,
                    Severity.CRIT,
                    f"back-off step {s.backoff_step}: one start attempt after "
                    f"{_dur(backoff_delay(s.backoff_step, cfg))}",
                )
            )
            return _enter(s, waiting, now), cleanup, notes
        blocking = _blocking_causes(findings)
        if blocking:
            notes.append(
                Finding(
                    Rule.RESTART_LOOP,
                    Severity.CRIT,
                    "start attempt deferred until the cause is fixed",
                )
            )
            return _enter(s, waiting, now), cleanup, notes
        if not _restart_budget_left(s, now, cfg):
            notes.append(
                Finding(
                    Rule.RESTART_LOOP, Severity.CRIT, "start attempt deferred: restart budget spent"
                )
            )
            return _enter(s, waiting, now), cleanup, notes
        s = replace(s, backoff_until=None)
        evidence = f"back-off step {s.backoff_step} elapsed: one start attempt"
        s, start = _start_actions(s, obs, now, cfg, Rule.BACKOFF_ATTEMPT, evidence)
        return s, cleanup + start, notes

    # An attempt was made: starting inside the grace is fine, anything else failed the step.
    if _starting(s, obs, now, cfg) or (
        _unit_up(obs.unit) and s.failures < cfg.tabbyapi.failures_before_down
    ):
        return _enter(s, Phase.RECOVERING, now), cleanup, notes
    s2, actions, more = _enter_loop(s, obs, now, cfg, cleanup)
    return s2, actions, notes + more


def _unhealthy(
    s: PolicyState,
    obs: Observation,
    now: float,
    cfg: Config,
    cleanup: list[Action],
    findings: list[Finding],
) -> Plan:
    unit, t = obs.unit, cfg.tabbyapi
    if unit.available and unit.active_state == "deactivating":
        # A stop or restart job is under way (ours: restarts go out with --no-block, and the old
        # process takes a while to exit). Another unit command now would only pile up jobs.
        phase = Phase.RECOVERING if s.recovery_started is not None else Phase.DOWN
        return _enter(s, phase, now), cleanup, []
    if obs.health.sticky_unhealthy:
        issue = (
            obs.health.unhealthy_issues[-1][:160] if obs.health.unhealthy_issues else "no detail"
        )
        evidence = f"/health 503 unhealthy (sticky until restart): {issue}"
        return _restart_or_loop(
            s, obs, now, cfg, Rule.STICKY_UNHEALTHY, evidence, cleanup, findings
        )
    if _starting(s, obs, now, cfg):
        phase = Phase.RECOVERING if s.recovery_started is not None else Phase.STARTING
        return _enter(s, phase, now), cleanup, []
    if unit.available and _auto_restarting(unit):
        # systemd's Restart= is on it; its restarts are counted through NRestarts.
        r = cfg.restart_loop
        if s.restarts_in_window(now, r.window) > r.max_restarts:
            return _enter_loop(s, obs, now, cfg, cleanup)
        return _enter(s, Phase.DOWN, now), cleanup, []
    unit_down = unit.available and not _unit_up(unit)
    if not unit_down and s.failures < t.failures_before_down:
        return s, cleanup, []  # not confirmed yet: one bad probe is not an outage
    r = cfg.restart_loop
    if s.restarts_in_window(now, r.window) > r.max_restarts:
        return _enter_loop(s, obs, now, cfg, cleanup)
    state_text = f"{unit.active_state}/{unit.sub_state}" if unit.available else "unknown"
    evidence = (
        f"unreachable for {s.failures} probes ({s.last_failure}); unit {state_text}"
        if not unit_down
        else f"{unit.name} is {state_text} (Result={unit.result or 'n/a'})"
    )
    s = _enter(s, Phase.DOWN, now)
    if _blocking_causes(findings):
        return _enter(s, Phase.BLOCKED, now), cleanup, []
    holders = _orphans_in_the_way(obs)
    if holders and cfg.orphans.enabled:
        return _full_recovery(s, obs, now, cfg, evidence, holders, findings)
    return _restart_or_loop(s, obs, now, cfg, Rule.DOWN, evidence, cleanup, findings)


def _full_recovery(
    s: PolicyState,
    obs: Observation,
    now: float,
    cfg: Config,
    evidence: str,
    holders: list[ProcessInfo],
    findings: list[Finding],
) -> Plan:
    """The runbook's Full Service Recovery: stop -> GPU reset (if enabled and nobody else uses
    the GPU) -> kill orphans -> verify mounts (a finding blocks the start) -> start -> verify."""
    unit = obs.unit
    why = f"{evidence}; {len(holders)} orphan(s) hold the port or VRAM"
    reason = Reason(Rule.FULL_RECOVERY, why)
    before: list[Action] = []
    if _unit_up(unit) or _auto_restarting(unit):
        before.append(UnitCommand(UnitVerb.STOP, unit.name, reason))
    before += _kill(holders, Rule.FULL_RECOVERY, "orphan outside the unit")
    if cfg.gpu_reset.enabled:
        # Only GPUs where an orphan leaked memory, and only when every user is TabbyAPI's
        # (the actuator re-checks right before the reset).
        leaked_pids = {p.pid for p in holders if p.gpu_bytes > 0}
        for gpu in obs.gpus.devices:
            users = [obs.process(p.pid) for p in gpu.processes]
            leaked = any(p.pid in leaked_pids for p in gpu.processes)
            if leaked and all(u is not None and u.role is not ProcessRole.FOREIGN for u in users):
                before.append(ResetGpu(gpu.index, reason))
    if obs.host.models_dir_ok is False:
        return _enter(s, Phase.BLOCKED, now), before, []
    stopped = replace(obs, unit=replace(unit, active_state="inactive", sub_state="dead"))
    return _restart_or_loop(s, stopped, now, cfg, Rule.FULL_RECOVERY, why, before, findings)


def _healthy(
    s: PolicyState,
    obs: Observation,
    now: float,
    cfg: Config,
    cleanup: list[Action],
    findings: list[Finding],
) -> Plan:
    r = cfg.restart_loop
    notes: list[Finding] = []
    s = replace(s, recovery_started=None)
    if s.backoff_step > 0:
        healthy_for = now - (s.healthy_since if s.healthy_since is not None else now)
        if healthy_for >= r.reset_after:
            s = replace(s, backoff_step=0, backoff_until=None, loop_since=None, escalated=False)
            notes.append(
                Finding(
                    Rule.BACKOFF_RESET,
                    Severity.NOTICE,
                    f"healthy for {_dur(healthy_for)}: back-off reset",
                )
            )
        else:
            s = replace(s, backoff_until=None)

    canary = obs.canary
    if canary is not None and canary.result.outcome is Outcome.TIMEOUT:
        evidence = (
            f"/health 200 but a 1-token completion missed its {_dur(cfg.tabbyapi.canary_deadline)} "
            "deadline: generation hang (tabbyAPI#428)"
        )
        return _restart_or_loop(s, obs, now, cfg, Rule.GENERATION_HANG, evidence, cleanup, findings)

    model = obs.model
    if model is not None and model.known and model.loaded is None and cfg.model.name:
        s, actions, more = _no_model(s, obs, now, cfg, findings)
        return s, cleanup + actions, notes + more
    if s.load_in_flight:
        return _enter(s, Phase.LOADING, now), cleanup, notes
    if s.slow_streak >= cfg.tabbyapi.slow_probes:
        return _enter(s, Phase.DEGRADED, now), cleanup, notes
    if model is None or not model.known:
        return s, cleanup, notes  # health is fine, the model is unknown: keep the phase
    return _enter(s, Phase.HEALTHY, now), cleanup, notes


def vram_needed(cfg: Config, model_dir: ModelDir | None, *, fallback: bool) -> int | None:
    """Bytes a model needs over all GPUs: configured, else folder size + overhead, else None."""
    gib = cfg.model.fallback_vram_required_gib if fallback else cfg.model.vram_required_gib
    if gib is not None:
        return int(gib * GIB)
    if model_dir is not None and model_dir.size_bytes > 0:
        return model_dir.size_bytes + int(cfg.model.estimate_overhead_gib * GIB)
    return None


def _vram_free(obs: Observation, devices: tuple[GpuDevice, ...]) -> int | None:
    gpus = obs.gpus.devices
    if devices:
        wanted = {d.index for d in devices} | {d.uuid for d in devices}
        gpus = tuple(g for g in gpus if g.index in wanted or g.uuid in wanted)
    if obs.gpus.error is not None or not gpus or any(g.memory_free is None for g in gpus):
        return None
    return sum(g.memory_free or 0 for g in gpus)


def _no_model(
    s: PolicyState, obs: Observation, now: float, cfg: Config, findings: list[Finding]
) -> Plan:
    """TabbyAPINoModel: check VRAM, clean leaked holders, load (once), fall back when needed."""
    m, host = cfg.model, obs.host
    if s.load_in_flight:
        return _enter(s, Phase.LOADING, now), [], []
    if host.models_dir_ok is False:
        return _enter(s, Phase.BLOCKED, now), [], []  # the finding names the mount
    if s.next_load_at is not None and now < s.next_load_at:
        return _enter(s, Phase.NO_MODEL, now), [], []

    free = _vram_free(obs, cfg.gpu.device)
    main_usable = host.model is None or host.model.usable
    fallback_usable = bool(m.fallback) and (host.fallback is None or host.fallback.usable)
    want_fallback = fallback_usable and (
        s.escalated or s.load_failures >= m.max_load_attempts or not main_usable
    )
    candidates = ([] if want_fallback or not main_usable else [(m.name, False)]) + (
        [(m.fallback, True)] if fallback_usable else []
    )
    notes: list[Finding] = []
    if not candidates:
        return _enter(s, Phase.BLOCKED if not main_usable else Phase.NO_MODEL, now), [], []
    for name, is_fallback in candidates:
        need = vram_needed(cfg, host.fallback if is_fallback else host.model, fallback=is_fallback)
        if need is not None and free is not None and free < need:
            leaked = [p for p in _orphans_in_the_way(obs) if p.gpu_bytes > 0]
            if leaked and cfg.orphans.enabled:
                return _enter(s, Phase.NO_MODEL, now), [], notes  # cleanup runs first; re-check
            others = [p for p in obs.processes if p.gpu_bytes > 0 and p.role is ProcessRole.FOREIGN]
            held = (
                "; held by " + ", ".join(f"pid {p.pid} ({one_line(p.command, 40)})" for p in others)
                if others
                else ""
            )
            notes.append(
                Finding(
                    Rule.VRAM_CHECK,
                    Severity.CRIT if not is_fallback else Severity.ERR,
                    f"load of {name} refused: needs {need / GIB:.1f} GiB, "
                    f"{free / GIB:.1f} GiB free{held}",
                )
            )
            continue
        rule = Rule.FALLBACK_MODEL if is_fallback else Rule.NO_MODEL
        why = "healthy but no model loaded"
        if is_fallback:
            why = (
                f"fallback: {m.name} cannot be loaded now "
                f"({'escalated' if s.escalated else f'{s.load_failures} failed loads'}"
                f"{'' if main_usable else ', model folder unusable'})"
            )
        vram = (
            f"; VRAM {free / GIB:.1f} GiB free, needs {need / GIB:.1f} GiB"
            if need is not None and free is not None
            else "; VRAM not checked (unknown)"
        )
        s = replace(
            s,
            load_in_flight=name,
            load_started=now,
            next_load_at=now + backoff_delay(s.load_failures + 1, cfg),
            using_fallback=is_fallback,
        )
        load = LoadModel(name, need, Reason(rule, why + vram))
        return _enter(s, Phase.LOADING, now), [load], notes
    return _enter(s, Phase.BLOCKED, now), [], notes


# --- 5. always ---------------------------------------------------------------------------------


def _power_limits(s: PolicyState, obs: Observation, now: float, cfg: Config) -> list[Action]:
    """Preventive: enforce configured power limits at start and whenever they drift (a driver
    reload or GPU reset loses them), clamped to the card's constraints."""
    actions: list[Action] = []
    for dev in cfg.gpu.device:
        if dev.power_limit_watts is None:
            continue
        gpu = next(
            (
                g
                for g in obs.gpus.devices
                if (dev.index is not None and g.index == dev.index)
                or (dev.uuid and g.uuid == dev.uuid)
            ),
            None,
        )
        if gpu is None or gpu.power.limit_w is None:
            continue
        target = dev.power_limit_watts
        if gpu.power.min_w is not None:
            target = max(target, gpu.power.min_w)
        if gpu.power.max_w is not None:
            target = min(target, gpu.power.max_w)
        if abs(gpu.power.limit_w - target) <= POWER_TOLERANCE_W:
            continue
        if any(d[0] == gpu.index and d[2] > now for d in (*s.power_denied, *s.power_held)):
            continue
        clamped = (
            ""
            if target == dev.power_limit_watts
            else f" (clamped from {dev.power_limit_watts:g} W)"
        )
        actions.append(
            SetPowerLimit(
                gpu.index,
                target,
                Reason(
                    Rule.POWER_LIMIT,
                    f"gpu{gpu.index} limit {gpu.power.limit_w:g} W, target {target:g} W{clamped}",
                ),
            )
        )
    return actions


def _fallback_route(s: PolicyState, cfg: Config) -> list[Action]:
    """RUNBOOK: while TabbyAPI is down, verify LiteLLM falls back. Once per outage."""
    url = cfg.fallback_route.url
    troubled = s.phase in (Phase.DOWN, Phase.BACKOFF, Phase.ESCALATED)
    if not url or not troubled or s.fallback_route_checked:
        return []
    reason = Reason(Rule.FALLBACK_ROUTE, f"TabbyAPI is {s.phase.value}: is the fallback serving?")
    return [CheckFallbackRoute(url, cfg.fallback_route.model, reason)]


def _wants(s: PolicyState, obs: Observation, now: float, cfg: Config) -> frozenset[Probe]:
    """The expensive probes the next cycle should run, and only when a rule needs them."""
    wants: set[Probe] = set()
    t = cfg.tabbyapi
    serving = obs.health.healthy and obs.model is not None and bool(obs.model.loaded)
    since_canary = None if s.last_canary_at is None else now - s.last_canary_at
    if serving:
        due = t.canary_interval > 0 and (since_canary is None or since_canary >= t.canary_interval)
        slow = s.slow_streak >= t.slow_probes and (
            since_canary is None or since_canary >= t.slow_probes * cfg.watchdog.interval
        )
        if due or slow:
            wants.add(Probe.CANARY)
    if obs.port is not None and any(lst.pid is None for lst in obs.port.listeners):
        wants.add(Probe.PORT_SCAN)
    troubled = s.failures > 0 or s.phase in (
        Phase.DOWN,
        Phase.BACKOFF,
        Phase.ESCALATED,
        Phase.BLOCKED,
        Phase.RECOVERING,
    )
    if troubled:
        if t.venv:
            wants.add(Probe.LIBRARIES)
        wants.add(Probe.JOURNAL)
    return frozenset(wants)
