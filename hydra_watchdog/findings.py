"""Diagnosis: every cause visible in one observation, and every text the watchdog says about one.

`FINDERS` is diagnose in order (worst first, as `status` lists them): each finder looks at one
runbook concern and returns its findings; they are recomputed each cycle and clear when the cause
clears. The plan's own notes (restart loop, escalation, VRAM refusals, the pause...) are built
by the functions at the end, so every sentence the watchdog emits lives in this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from hydra_watchdog.config import Config
from hydra_watchdog.durations import format_duration
from hydra_watchdog.journal_lines import explaining, request_errors
from hydra_watchdog.observation import (
    GpuSnapshot,
    ModelDir,
    NvmlErrorKind,
    Observation,
    Outcome,
    ProcessInfo,
    ProcessRole,
)
from hydra_watchdog.policy_state import CanaryVerdict, Finding, PolicyState
from hydra_watchdog.printable import cut, one_line
from hydra_watchdog.rebuild import ago, switch_before_trouble, switch_label
from hydra_watchdog.situation import (
    LIBRARY_CHECK_TRIES,
    canary_impossible,
    in_unit,
    key_refused,
    library_check_due,
    port_holders,
    tabby_runs,
    unit_up,
)
from hydra_watchdog.states import Rule, Severity
from hydra_watchdog.vram import GIB

Finder = Callable[[PolicyState, Observation, Config], Iterable[Finding]]


def dur(seconds: float) -> str:
    return format_duration(round(seconds, 1)) if seconds < 60 else format_duration(round(seconds))


# --- the finders, in the order status lists them -----------------------------------------------


def watchdog_impaired(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    probes = (obs.health.result, *(p.result for p in (obs.model, obs.canary) if p is not None))
    for impaired in (r for r in probes if r.outcome is Outcome.LOCAL_ERROR):
        yield Finding(
            Rule.WATCHDOG_IMPAIRED,
            Severity.ERR,
            f"watchdog impaired: {impaired.detail or 'a probe could not run'}; "
            "not evidence about TabbyAPI, nothing is done on it",
            subject=impaired.detail,
        )


def models_mount(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    host = obs.host
    if host.models_dir_ok is None and host.models_dir_detail:
        # Not a missing mount (a guess), but worth saying: a hung NFS mount looks like this.
        yield Finding(
            Rule.MODELS_MOUNT,
            Severity.WARNING,
            f"models dir {cfg.model.models_dir} {host.models_dir_detail}",
            subject="unchecked",
        )
    elif host.models_dir_ok is False:
        yield Finding(
            Rule.MODELS_MOUNT,
            Severity.CRIT,
            f"models dir {cfg.model.models_dir}: {host.models_dir_detail or 'unavailable'}; "
            "no load can succeed until it is back (runbook: verify the /mnt/models mount)",
            subject="mount",
        )
    elif host.model is not None and cfg.model.name and not host.model.usable:
        yield Finding(
            Rule.MODELS_MOUNT, Severity.ERR, _model_dir_problem(host.model), subject="folder"
        )


def missing_libraries(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    # Remembered from the last check (it runs only when troubled): known missing until a fresh
    # check says fixed. A running TabbyAPI that has them mapped already is restart_will_fail's.
    if s.missing_libraries and not (s.will_fail and tabby_runs(obs)):
        # The last check's word stands while no check can run: said, so a rebuilt venv that
        # the watchdog cannot see yet is not taken for one it ignores.
        stale = f" (no check can run now: {_library_detail(obs)})" if s.library_misses else ""
        yield Finding(
            Rule.MISSING_LIBRARIES,
            Severity.CRIT,
            "TabbyAPI's ExLlamaV2 extension cannot load: "
            f"{', '.join(s.missing_libraries)} not found (a NixOS rebuild changed library "
            f"paths? rebuild the venv {cfg.tabbyapi.venv}); not restarting until a check "
            f"says fixed{stale}",
        )


def library_check(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    """This outage's library check could not run in LIBRARY_CHECK_TRIES cycles that asked for
    it: (re)starts no longer wait for it (policy._library_wait), and that is said."""
    if library_check_due(s, cfg) and s.library_misses >= LIBRARY_CHECK_TRIES:
        yield Finding(
            Rule.LIBRARY_CHECK,
            Severity.WARNING,
            f"the library check could not run in {s.library_misses} cycles "
            f"({_library_detail(obs)}): (re)starts go ahead without it",
            subject="skipped",
        )


def admin_key(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    """A 401/403 on any request with the key: the model probe's, the canary's, or a load's
    (remembered until the key changes: situation.key_refused)."""
    view = obs.admin_key
    if view is None or view.live:
        reread = "its file is read again when it changes (no reload needed)"
    else:  # a credential: systemd copied it when the watchdog started
        reread = f"{view.source} is copied at start: restart hydra-watchdog after changing it"
    refused = next(
        (
            p.result
            for p in (obs.model, obs.canary)
            if p is not None and p.result.outcome is Outcome.UNAUTHORIZED
        ),
        None,
    )
    # What a refused key blocks is loads: with a model loaded TabbyAPI serves, and only a lost
    # model could not be loaded again (WARNING); with none loaded, nothing serves (CRIT).
    serving = obs.model.loaded if obs.model is not None and obs.model.known else None
    severity = Severity.WARNING if serving else Severity.CRIT
    lost = f" ({serving} serves; were it lost, none could be loaded)" if serving else ""
    if refused is not None:
        yield Finding(
            Rule.ADMIN_KEY_REJECTED,
            severity,
            f"TabbyAPI rejected the admin key ({refused.detail}): loads are impossible{lost} "
            f"until it matches admin_key in TabbyAPI's api_tokens.yml; {reread}",
        )
    elif key_refused(s, obs):
        where = f"the key from {view.source}" if view is not None and view.source else "its key"
        # Answered with this key, /v1/model took it: a key that reads but cannot load is
        # TabbyAPI's api_key (notes/tabbyapi.md).
        reads = obs.model is not None and obs.model.known
        kind = (
            ": it is accepted for reading (/v1/model) but not for loading, so it is TabbyAPI's "
            "api_key, not its admin_key"
            if reads
            else ""
        )
        yield Finding(
            Rule.ADMIN_KEY_REJECTED,
            severity,
            f"TabbyAPI refused a model load with {where} ({cut(s.key_refused_detail, 160)}){kind}; "
            f"no load is sent{lost} until the key changes or TabbyAPI restarts; put admin_key "
            f"from TabbyAPI's api_tokens.yml there: {reread}",
        )


def unkillable(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    for proc in obs.processes:
        if proc.pid in s.unkillable and proc.role is ProcessRole.ORPHAN:
            yield Finding(
                Rule.UNKILLABLE_ORPHAN,
                Severity.CRIT,
                f"orphan TabbyAPI process {proc.pid} ({one_line(proc.command)}) survived SIGKILL "
                "(uninterruptible sleep in the driver?): restarts cannot free what it holds; "
                "a reboot may be needed",
                subject=f"pid {proc.pid}",
            )


def generation(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    if s.canary_verdict in (CanaryVerdict.STALLED, CanaryVerdict.FAILED):
        yield completions_stalled(s, cfg)
    elif (
        s.canary_verdict is CanaryVerdict.UNVERIFIED
        and obs.health.healthy
        and obs.model is not None
        and bool(obs.model.loaded)
    ):
        # (the canary goes only to a loaded model: before that, the load's findings speak)
        after = s.canary_wait or "TabbyAPI's last restart or model load"
        yield Finding(
            Rule.CANARY_PENDING,
            Severity.NOTICE,
            f"waiting for a 1-token completion to pass after {after}: not called healthy "
            "until one does",
        )
    elif (
        s.canary_verdict is CanaryVerdict.UNVERIFIED
        and obs.health.healthy
        and canary_impossible(obs, cfg)
    ):
        after = s.canary_wait or "TabbyAPI's last restart or model load"
        yield Finding(
            Rule.CANARY_PENDING,
            Severity.NOTICE,
            f"canary SKIP after {after}: no model is configured (model.name) and none is "
            "loaded, so no 1-token completion can be sent; healthy on /health alone",
            subject="skipped",
        )


def completions_stalled(s: PolicyState, cfg: Config) -> Finding:
    """Named for what is seen; the known causes are listed in the journal catalog."""
    if s.canary_verdict is CanaryVerdict.STALLED:
        text = (
            f"completions stalled while /health is 200: a 1-token completion missed its "
            f"{dur(cfg.tabbyapi.canary_deadline)} deadline"
        )
    else:
        text = f"completions fail while /health is 200: {cut(s.canary_detail, 160) or 'an error'}"
    return Finding(Rule.GENERATION_HANG, Severity.CRIT, text, subject="canary")


def fallback_model(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    m, model = cfg.model, obs.model
    if model is not None and m.fallback and model.loaded == m.fallback != m.name:
        failed = s.permanent_failure(m.name)
        why = (
            f"{m.name} cannot succeed: {cut(failed.detail, 120)}"
            if failed is not None
            else "escalated"
            if s.escalated
            else _FALLBACK_BECAUSE.get(s.fallback_blocker, "").format(m=m.name, n=s.load_failures)
        )
        yield Finding(
            Rule.FALLBACK_MODEL,
            Severity.WARNING,
            f"serving the fallback model {m.fallback}, not {m.name}"
            + (f" ({why}); {m.name} is tried again when that clears, or hourly" if why else "")
            + ("" if why else f"; {m.name} is tried again hourly"),
        )


# Why the fallback was loaded (PolicyState.fallback_blocker), in words.
_FALLBACK_BECAUSE = {
    "failures": "{m} failed to load {n}x",
    "unusable": "{m}'s folder was unusable",
    "vram": "{m} did not fit in the free VRAM",
}


def permanent_load(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    for failed in s.permanent:
        yield Finding(
            Rule.LOAD_FAILED,
            Severity.CRIT,
            f"{failed.model} cannot be loaded: {cut(failed.detail, 200)} (TabbyAPI's words; "
            "not retried until the config, the model folder or TabbyAPI's process changes)",
            subject=f"permanent {failed.model}",
        )


def restart_will_fail(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    if s.will_fail and tabby_runs(obs):
        switch = s.last_switch
        after = f" since the switch {switch_label(switch)}" if switch is not None else ""
        yield Finding(
            Rule.RESTART_WILL_FAIL,
            Severity.WARNING,
            "TabbyAPI runs on the libraries it loaded before, but a restart would fail: its "
            f"ExLlamaV2 extension cannot find {', '.join(s.will_fail)}{after}; rebuild the "
            f"venv {cfg.tabbyapi.venv or '(tabbyapi.venv)'} (runbook: Library path issues after "
            "NixOS rebuild) and check with `hydra-watchdog verify`; until then TabbyAPI is not "
            "restarted unless its process is gone",
        )


def what_changed(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    """The runbook's "review recent changes" as evidence: a switch shortly before an outage."""
    if obs.health.healthy:
        return
    found = switch_before_trouble(s, cfg.restart_loop.escalate_after)
    if found is not None:
        switch, before = found
        yield Finding(
            Rule.SYSTEM_SWITCHED,
            Severity.WARNING,
            f"what changed: the NixOS system switched {switch_label(switch)} {ago(before)} "
            "before the first failure (review that rebuild's changes)",
        )


def port_owners(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    port = cfg.tabbyapi.port
    for proc in port_holders(obs, port):
        if proc is None or (proc.role is ProcessRole.ORPHAN and not obs.unit.available):
            continue
        if proc.role is ProcessRole.FOREIGN:
            yield Finding(
                Rule.FOREIGN_HOLDER,
                Severity.CRIT,
                f"port {port} is held by pid {proc.pid} ({one_line(proc.command)}), "
                + (_wrong_user(proc, obs, cfg) if proc.wrong_user else "which is not TabbyAPI's")
                + ": never signalled; "
                + (_set_user(proc, obs) if proc.wrong_user else "free the port by hand"),
                subject=f"pid {proc.pid}",
            )
        elif proc.role is ProcessRole.ORPHAN:
            yield Finding(
                Rule.PORT_CONFLICT,
                Severity.ERR,
                f"port {port} is held by orphan TabbyAPI process {proc.pid} "
                f"({one_line(proc.command)}) outside {obs.unit.name}",
                subject=f"pid {proc.pid}",
            )


def _wrong_user(proc: ProcessInfo, obs: Observation, cfg: Config) -> str:
    """Whose TabbyAPI it is not: the unit's User= where there is a unit, else tabbyapi.user."""
    unit = obs.unit
    expected = (
        f"{unit.name}'s User= ({unit.user or 'root'})"
        if unit.exists
        else f"tabbyapi.user ({cfg.tabbyapi.user})"
    )
    return f"TabbyAPI's program run by uid {proc.uid}, not {expected}"


def _set_user(proc: ProcessInfo, obs: Observation) -> str:
    if obs.unit.exists:
        return f"stop it and start {obs.unit.name}, or set the unit's User= to the user it needs"
    return (
        f'if that is how TabbyAPI runs here, set tabbyapi.user = "{proc.uid}" in the config '
        "and reload the watchdog (SIGHUP)"
    )


def unverified_health(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    """/health not asked: the port's listener (or a new connection's far end) is not verified as
    TabbyAPI. Told here unless the scan names the port's holder (port_owners tells of it: a
    foreign holder, or an orphan the plan removes)."""
    health = obs.health.result
    if health.outcome is not Outcome.WITHHELD:
        return
    if any(p is not None for p in port_holders(obs, cfg.tabbyapi.port)):
        return
    yield Finding(
        Rule.FOREIGN_HOLDER,
        Severity.CRIT,
        f"{health.detail}; no evidence about TabbyAPI either way, nothing is done on it",
        subject="health",
    )


def key_withheld(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    withheld = [
        probe.result.detail
        for probe in (obs.model, obs.canary)
        if probe is not None and probe.result.outcome is Outcome.WITHHELD
    ]
    if withheld:
        yield Finding(Rule.KEY_WITHHELD, Severity.CRIT, withheld[0])


def moved_port(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    port = cfg.tabbyapi.port
    moved = [p for p in obs.processes if port + 1 in p.listens_on and in_unit(p)]
    if moved and obs.port is not None and obs.port.owners(port):
        yield Finding(
            Rule.PORT_CONFLICT,
            Severity.ERR,
            f"TabbyAPI (pid {moved[0].pid}) listens on {port + 1}: port {port} was busy",
            subject="moved",
        )


def orphans(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    if not obs.unit.available:
        return  # orphan or the unit's own? unknowable without systemd: not reported as orphan
    for proc in obs.processes:
        if proc.role is ProcessRole.ORPHAN and not proc.listens_on:
            yield _orphan_finding(proc, obs.unit.name)


def _orphan_finding(proc: ProcessInfo, unit: str) -> Finding:
    held = f"holds {proc.gpu_bytes / GIB:.1f} GiB VRAM" if proc.gpu_bytes else "holds nothing"
    return Finding(
        Rule.ORPHAN_CLEANUP,
        Severity.WARNING if proc.gpu_bytes else Severity.NOTICE,
        f"orphan TabbyAPI process {proc.pid} ({one_line(proc.command)}) outside "
        f"{unit} {held}" + ("" if proc.gpu_bytes else ": reported, not killed"),
        subject=f"pid {proc.pid}",
    )


_RESULT_CAUSES = {
    "oom-kill": " (OOM-killed: VRAM or host memory exhausted)",
    "signal": " (killed by a signal)",
    "core-dump": " (crashed, core dumped)",
    "timeout": " (start timed out: raise TimeoutStartSec for a 70B load?)",
    "start-limit-hit": " (systemd start limit hit)",
}


def unit_state(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    unit = obs.unit
    if not unit.available:
        yield Finding(
            Rule.SYSTEMD_UNAVAILABLE,
            Severity.WARNING,
            f"systemd unavailable: {unit.detail}; TabbyAPI's unit can be neither read nor "
            "restarted",
        )
    elif not unit.exists:
        yield Finding(Rule.DOWN, Severity.CRIT, f"unit {unit.name} does not exist", subject="unit")
    elif not unit_up(unit) and unit.result not in ("", "success"):
        cause = (
            f" (exit status {unit.exec_main_status})"
            if unit.result == "exit-code"
            else _RESULT_CAUSES.get(unit.result, "")
        )
        yield Finding(
            Rule.DOWN,
            Severity.ERR,
            f"{unit.name} is {unit.active_state}/{unit.sub_state}, Result={unit.result}{cause}",
            subject=f"result {unit.result}",  # another Result is news, told at once
        )


def journal(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    excerpt = s.journal
    if excerpt and not obs.health.healthy:
        # What explains the exit (errors, a traceback's last line) rather than the last lines:
        # a crash loop repeats its start-up lines once per start (journal_lines.py).
        lines, errors = explaining(excerpt)
        polls = 0 if errors else request_errors(excerpt)
        if errors:
            text = f"last log lines that explain the exit: {cut(' | '.join(lines), 400)}"
        elif lines:
            left_out = f"; {_polls(polls)} left out" if polls else ""
            text = f"last log lines (none names an error{left_out}): "
            text += cut(" | ".join(lines), 400)
        elif polls:
            text = (
                f"last log lines: only {_polls(polls)} (a /v1/model poll while no model is "
                "loaded writes one), nothing about the exit"
            )
        else:
            return  # a traceback's header and frames alone: nothing that says more
        # Filed under tabbyapi_down even while a restart loop stands: they say why TabbyAPI is
        # down, and decide nothing. Under the loop's rule, _cause would cite them for the
        # back-off's own start ("[restart_loop] backoff -> recovering: last log lines …").
        yield Finding(Rule.DOWN, Severity.INFO, text, subject="journal")


def _polls(n: int) -> str:
    # TabbyAPI's "Sent to request: ..." lines: one request's failure, not the process's.
    return f"{n} per-request ERROR line{'s' if n != 1 else ''}"


def gpus(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    if obs.gpus.error is not None:
        yield Finding(
            Rule.VRAM_CHECK,
            Severity.WARNING,
            f"NVML unavailable ({obs.gpus.error.value}: {obs.gpus.detail}); "
            "VRAM checks and power limits are skipped",
            subject="nvml",
        )
    for gpu in obs.gpus.devices:
        if any(kind is NvmlErrorKind.GPU_LOST for _, kind in gpu.errors):
            yield Finding(
                Rule.VRAM_CHECK,
                Severity.CRIT,
                f"gpu{gpu.index} is lost (fell off the bus?): a reboot is likely needed",
                subject=f"gpu{gpu.index}",
            )


def slow_health(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    t = cfg.tabbyapi
    if s.slow_streak >= t.slow_probes:
        yield Finding(
            Rule.SLOW_HEALTH,
            Severity.WARNING,
            f"/health took {obs.health.result.latency_s * 1000:.0f} ms "
            f"(> {t.slow_threshold * 1000:.0f} ms) for {s.slow_streak} probes; "
            + "; ".join(_gpu_pressure(g) for g in obs.gpus.devices)
            + "; not a reason to restart",
        )


def power_denied(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    for hold in s.power_denied:
        yield Finding(
            Rule.POWER_LIMIT,
            Severity.WARNING,
            f"gpu{hold.gpu_index}: setting the power limit to {hold.watts:g} W failed; retried "
            f"hourly, not every cycle (needs CAP_SYS_ADMIN)",
            subject=f"gpu{hold.gpu_index}",
        )


def load_failed(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    if s.last_load_error and not s.permanent and s.load_failures:
        yield Finding(
            Rule.LOAD_FAILED,
            Severity.ERR,
            f"model load failed {s.load_failures}x: {cut(s.last_load_error, 200)}",
        )


def fallback_route(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    if s.fallback_route_detail:
        yield Finding(
            Rule.FALLBACK_ROUTE,
            Severity.INFO if s.fallback_route_ok else Severity.ERR,
            cut(s.fallback_route_detail, 200),
        )


def escalation(s: PolicyState, obs: Observation, cfg: Config) -> Iterable[Finding]:
    # Stands for as long as the escalation does: told once, not with every back-off step.
    if s.escalated:
        yield escalated(cfg.restart_loop.escalate_after, cfg.model.fallback)


FINDERS: tuple[Finder, ...] = (
    watchdog_impaired,
    escalation,
    models_mount,
    missing_libraries,
    library_check,
    admin_key,
    generation,
    restart_will_fail,
    port_owners,
    unverified_health,
    unkillable,
    key_withheld,
    moved_port,
    orphans,
    unit_state,
    what_changed,
    journal,
    gpus,
    slow_health,
    power_denied,
    permanent_load,
    load_failed,
    fallback_model,
    fallback_route,
)


def diagnose(s: PolicyState, obs: Observation, cfg: Config) -> list[Finding]:
    """Every cause visible in this observation, worst first; recomputed each cycle."""
    return [finding for find in FINDERS for finding in find(s, obs, cfg)]


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


# --- the plan's notes ---------------------------------------------------------------------------


def restart_deferred(trigger: str, libraries: Sequence[str]) -> Finding:
    return Finding(
        Rule.RESTART_WILL_FAIL,
        Severity.ERR,
        f"{trigger}: not restarting, a restart would fail ({', '.join(libraries)} not found) "
        "and TabbyAPI's process still runs; rebuild the venv, then restart it by hand",
        subject="deferred",
    )


def _library_detail(obs: Observation) -> str:
    host = obs.host
    return cut(host.libraries_detail or host.models_dir_detail or "asked for the next cycle", 160)


def library_check_awaited(misses: int, obs: Observation) -> Finding:
    tried = f" ({misses} cycle(s) without it)" if misses else ""
    return Finding(
        Rule.LIBRARY_CHECK,
        Severity.WARNING,
        f"no (re)start before this outage's library check (ldd on TabbyAPI's ExLlamaV2 "
        f"extension): not run yet{tried}: {_library_detail(obs)}",
        subject="awaited",
    )


def paused(reason: str, until_in: float | None, *, unreadable: bool = False) -> Finding:
    # No countdown: an unchanged pause says the same thing every cycle (status has its end).
    if unreadable:  # a finding of its own (key, severity): told even where a pause stood before
        return Finding(Rule.PAUSED, Severity.ERR, reason, subject="unreadable")
    until = "until resumed" if until_in is None else "until it expires"
    return Finding(Rule.PAUSED, Severity.NOTICE, f"paused {until}: {reason}")


def starts_not_running(evidence: str, failed: int) -> Finding:
    return Finding(
        Rule.RESTART_LOOP,
        Severity.CRIT,
        f"{evidence}; not restarting again: {failed} (re)start(s) issued in the window did not "
        "run (see the failed actions); retried when they leave the window",
        subject="not running",
    )


def cannot_act(rule: Rule, evidence: str, why: str) -> Finding:
    return Finding(rule, Severity.CRIT, f"{evidence}; cannot act: {why}")


def restart_loop(n: int, window: float, max_restarts: int, step: int, wait: float) -> Finding:
    return Finding(
        Rule.RESTART_LOOP,
        Severity.CRIT,
        f"{n} restarts within {dur(window)} (max {max_restarts}): stopped; "
        f"back-off step {step}, next start attempt in {dur(wait)}",
        subject="stopped",
    )


def escalated(after: float, fallback: str) -> Finding:
    return Finding(
        Rule.ESCALATION,
        Severity.CRIT,
        f"restart loop unresolved for over {dur(after)}: needs a human (runbook: Escalation); "
        + ("the fallback model will be loaded" if fallback else "no fallback"),
    )


def backoff_waiting(step: int, delay: float) -> Finding:
    return Finding(
        Rule.RESTART_LOOP,
        Severity.CRIT,
        f"back-off step {step}: one start attempt after {dur(delay)}",
        subject="waiting",
    )


def backoff_deferred(why: str) -> Finding:
    return Finding(Rule.RESTART_LOOP, Severity.CRIT, f"start attempt deferred{why}", subject=why)


def backoff_reset(healthy_for: float) -> Finding:
    return Finding(
        Rule.BACKOFF_RESET, Severity.NOTICE, f"healthy for {dur(healthy_for)}: back-off reset"
    )


def vram_refused(
    name: str, need: int, free: int, others: Sequence[ProcessInfo], *, fallback: bool
) -> Finding:
    held = (
        "; held by " + ", ".join(f"pid {p.pid} ({one_line(p.command, 40)})" for p in others)
        if others
        else ""
    )
    return Finding(
        Rule.VRAM_CHECK,
        Severity.CRIT if not fallback else Severity.ERR,
        f"load of {name} refused: needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free{held}",
        subject=name,
    )


def restarts_seen_late(n: int, gap: float) -> Finding:
    # Filed under tabbyapi_down: it says the unit went down (and came back) unseen, not that a
    # loop stands; under restart_loop it named a loop before one existed ("[restart_loop]
    # healthy -> down").
    return Finding(
        Rule.DOWN,
        Severity.NOTICE,
        f"{n} restart(s) by systemd happened while the watchdog was not looking ({dur(gap)} "
        "since the last observation): when exactly is unknown; dated to the start of that gap",
        subject="late",
    )
