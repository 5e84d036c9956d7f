"""`hydra-watchdog check`: one real observation and decision, the diagnosis and the plan, never
an action.

While a daemon runs, check decides from the daemon's memory (its state file, read without
changing anything: back-off, load attempts, errors TabbyAPI called permanent) and says the
daemon's verdict, so that it agrees with `status`; its own cycle adds what it sees now and what
the daemon's next cycle would do. Without a daemon there is no memory to start from: the view is
one cycle's, and the screen says so (a load that failed for good looks like a load to try); the
phase is the one seen, never what its plan would make it, and no model loaded with no daemon to
load one is CRITICAL, as verify says.
"""

from __future__ import annotations

import dataclasses
import json
import time

from hydra_watchdog.actions import Action, LoadModel, UnitCommand, UnitVerb, describe
from hydra_watchdog.config import Config
from hydra_watchdog.interfaces import Adapters
from hydra_watchdog.observation import LoadProgress, Observation, Probe
from hydra_watchdog.observe import Observer
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState, to_jsonable
from hydra_watchdog.printable import printable
from hydra_watchdog.report.screen import Style, emit, fact, wants_colour
from hydra_watchdog.report.status import VERDICT_NAMES, StatusReport
from hydra_watchdog.report.status_build import build_status, stale_after
from hydra_watchdog.report.status_file import read_status
from hydra_watchdog.report.status_view import (
    UNKNOWN,
    daemon_problem,
    facts,
    judge,
    render_first_line,
)
from hydra_watchdog.statefile import DRY_RUN_STATE_FILE, STATE_FILE, StateFile
from hydra_watchdog.states import Phase, Verdict


@dataclasses.dataclass(frozen=True)
class Daemon:
    """The daemon whose memory check starts from, and its own verdict."""

    report: StatusReport
    verdict: int
    why: str


def running_daemon(cfg: Config, now: float) -> tuple[Daemon | None, str]:
    """The daemon that publishes a current status for this config, or None and why not."""
    try:
        report = read_status(cfg.watchdog.runtime_dir)
    except ValueError as exc:
        return None, str(exc)
    if report is None:
        return None, "hydra-watchdog is not running (no status file)"
    gone = daemon_problem(report) if report.stopped_at is None else ""
    limit = report.stale_after or stale_after(cfg)
    verdict, why, current = judge(report, wall_now=now, stale_after=limit, daemon=gone)
    return (Daemon(report, verdict, why), "") if current else (None, why)


def daemon_memory(cfg: Config, daemon: Daemon) -> tuple[PolicyState | None, str]:
    """The daemon's policy state from its state file, read only; None and why when it cannot be
    read (its state dir is root's: run as root)."""
    name = DRY_RUN_STATE_FILE if daemon.report.dry_run else STATE_FILE
    store = StateFile(cfg.watchdog.state_dir, events_kept=cfg.watchdog.events_kept, name=name)
    try:
        persisted = store.load(read_only=True)
    except PermissionError:
        return None, f"cannot read its state in {cfg.watchdog.state_dir} (run as root)"
    except OSError as exc:  # an untrusted state dir: says what is wrong
        return None, str(exc)
    return persisted.state, "; ".join(persisted.notes)


def daemons_load(memory: PolicyState, report: StatusReport | None) -> LoadProgress | None:
    """The load the daemon has in flight, as its memory and status say: check's own cycle has
    no load actuator, and a load in the memory with no progress is one the policy counts lost."""
    if not memory.load_in_flight:
        return None
    started = memory.load_started if memory.load_started is not None else time.monotonic()
    shown = report.load if report is not None else None
    if shown is None or shown.model != memory.load_in_flight:
        return LoadProgress(memory.load_in_flight, started)
    return LoadProgress(memory.load_in_flight, started, shown.module, shown.modules)


def one_cycle(
    cfg: Config, observer: Observer, memory: PolicyState, load: LoadProgress | None = None
) -> tuple[PolicyState, tuple[Action, ...], Observation]:
    """Observe and decide once from `memory`, acting on nothing. Two passes: the first asks for
    the expensive probes the rules need, the second runs them. `load`: the daemon's load in
    flight (daemons_load), which the decision must see as going on."""
    first, _ = decide(memory, observer.observe(frozenset(), load=load), time.monotonic(), cfg)
    # /v1/model afresh too: the first pass's "no model" would otherwise be carried (observe.py)
    wants = first.wants | {Probe.MODEL}
    obs = observer.observe(wants, load=load)
    state, actions = decide(dataclasses.replace(memory, wants=wants), obs, obs.at, cfg)
    return state, tuple(actions), obs


def _starts(actions: tuple[Action, ...]) -> list[UnitCommand]:
    starts = (UnitVerb.RESTART, UnitVerb.START)
    return [a for a in actions if isinstance(a, UnitCommand) and a.verb in starts]


def _as_seen(state: PolicyState, actions: tuple[Action, ...], obs: Observation) -> Phase:
    """Without a daemon nothing check plans is carried out: a load it plans is not "loading",
    the phase is the one seen (no model, or the fallback serving while the main model is due);
    a (re)start it plans is no recovery under way: TabbyAPI is down."""
    if state.phase in (Phase.RECOVERING, Phase.STARTING) and _starts(actions):
        return Phase.DOWN
    if state.phase is not Phase.LOADING or not any(isinstance(a, LoadModel) for a in actions):
        return state.phase
    return Phase.DEGRADED if obs.model is not None and obs.model.loaded else Phase.NO_MODEL


def _without_daemon(phase: Phase, actions: tuple[Action, ...]) -> tuple[int, str]:
    """The verdict of one cycle's view. No model loaded with none running to load one is
    CRITICAL, as verify says it (verify._no_model_loaded)."""
    said = f"{phase.value.replace('_', ' ')} (one cycle's view)"
    starts = _starts(actions)
    if phase is Phase.DOWN and starts:
        verb = starts[0].verb.value
        return int(phase.verdict), f"{said}: a daemon would {verb} {starts[0].unit}, but none runs"
    if phase is not Phase.NO_MODEL:
        return (UNKNOWN if phase is Phase.UNKNOWN else int(phase.verdict)), said
    loads = [a.model for a in actions if isinstance(a, LoadModel)]
    would = f"a daemon would load {loads[0]}, but none runs" if loads else "no daemon loads one"
    return int(Verdict.CRITICAL), f"{said}: {would}"


def run_check(cfg: Config, adapters: Adapters, *, as_json: bool) -> int:
    now = time.time()
    daemon, absent = running_daemon(cfg, now)
    memory, unread = (None, "") if daemon is None else daemon_memory(cfg, daemon)
    start = memory or PolicyState()
    load = daemons_load(start, daemon.report if daemon is not None else None)
    state, actions, obs = one_cycle(cfg, Observer.from_adapters(cfg, adapters), start, load)
    if daemon is not None:
        verdict, why = daemon.verdict, daemon.why
        view = f"the daemon's (pid {daemon.report.pid})"
        if memory is None:
            view += f", without its memory: {unread}"
        elif state.phase.value != daemon.report.phase:
            view += f"; this cycle's observation makes it {state.phase.value}"
    else:
        state = dataclasses.replace(state, phase=_as_seen(state, actions, obs))
        verdict, why = _without_daemon(state.phase, actions)
        view = f"one cycle's, without a daemon's memory: {absent}"
    # what is, not what the plan would start: a load it plans is not in flight
    seen = dataclasses.replace(
        state, load_in_flight=start.load_in_flight, load_started=start.load_started
    )
    report = build_status(seen, obs, cfg, (), wall_now=now, mono_now=obs.at, pid=0, actions_kept=0)
    if as_json:
        doc = {
            "verdict": VERDICT_NAMES[verdict],
            "reason": why,
            "view": "daemon" if daemon is not None else "one_cycle",
            "view_detail": view,
            "phase": state.phase.value,
            "findings": [to_jsonable(f) for f in state.findings],
            "planned_actions": [
                {"action": describe(a), "rule": a.reason.rule.value, "reason": a.reason.evidence}
                for a in actions
            ],
            "observation": to_jsonable(obs),
        }
        emit(json.dumps(doc, indent=2, default=str) + "\n")
        return verdict
    style = Style(wants_colour())
    lines = render_first_line(verdict, why, style)
    lines += fact("View", printable(view), style)
    lines += facts(report, now, style, watchdog=False)
    plan = [
        printable(f"would {describe(a)} (because {a.reason.rule.value}: {a.reason.evidence})")
        for a in actions
    ]
    lines += fact("Plan", plan or ["nothing"], style)  # never carried out by check
    emit("\n".join(lines) + "\n")
    return verdict
