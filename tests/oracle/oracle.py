"""The oracle: seeded traces of the node model, decide() at every step, and what must hold.

A trace is a tuple of Steps (a fault or a clock event, and its parameter); the model is
deterministic given the trace, so a failing trace can be shrunk by dropping steps and told as a
story. Every invariant is checked at every step; each says which runbook conclusion or issue-13
item it encodes. `run_campaign` runs many traces and keeps, per invariant, the first failure,
minimised.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace

from hydra_watchdog.actions import (
    Action,
    ActionResult,
    KillOrphan,
    LoadModel,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
    describe,
)
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import Observation, Outcome, ProcessRole
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import (
    PolicyState,
    RestartOrigin,
    from_jsonable,
    to_jsonable,
)
from hydra_watchdog.states import Phase, Rule, Verdict
from tests.oracle.model import Node, Truth

# Time-compressed production shape (seconds instead of minutes), like tests/policy_kit.py.
ORACLE_CONFIG = {
    "watchdog": {"interval": 1},
    "tabbyapi": {
        "health_timeout": "3s",
        "slow_threshold": "2s",
        "slow_probes": 3,
        "failures_before_down": 3,
        "startup_grace": "10s",
        "canary_interval": "5s",
        "canary_deadline": "5s",
        "venv": "/opt/tabbyapi/venv",
    },
    "model": {
        "name": "M",
        "vram_required_gib": 20.0,
        "fallback": "F",
        "fallback_vram_required_gib": 8.0,
        "max_load_attempts": 2,
    },
    "restart_loop": {
        "max_restarts": 3,
        "window": "60s",
        "backoff_initial": "5s",
        "backoff_max": "40s",
        "reset_after": "30s",
        "escalate_after": "120s",
    },
    "gpu": {"device": [{"index": 0, "power_limit_watts": 450}]},
    "fallback_route": {"url": "http://127.0.0.1:4000"},
}
CFG = parse_config(ORACLE_CONFIG)
# The "slow timer" after which the main model must have been retried while the fallback
# serves and nothing blocks the main one (issue 13 item 5): generous, a few loop cycles.
MAIN_RETRY_BOUND = 10 * CFG.restart_loop.escalate_after
BIG_OFFSET = 1.0e7  # the time-shift check: ~4 months of uptime

# (event, weight). "tick" is a plain cycle; the clock events pick their gap in `arg`.
EVENTS: tuple[tuple[str, int], ...] = (
    ("tick", 40),
    ("late", 4),
    ("gap", 2),
    ("watchdog_down", 1),
    ("crash", 4),
    ("hang", 2),
    ("sticky", 2),
    ("gen_hang", 3),
    ("canary_500", 2),
    ("canary_body", 1),
    ("lose_model", 2),
    ("slow", 1),
    ("break", 1),
    ("libs_gone", 1),
    ("fix", 2),
    ("mount_gone", 1),
    ("mount_back", 1),
    ("main_bad", 1),
    ("main_good", 1),
    ("main_folder_gone", 1),
    ("orphan_vram", 1),
    ("orphan_port", 1),
    ("orphan_stuck", 1),
    ("orphan_unstuck", 1),
    ("foreign_port", 1),
    ("foreign_vram", 1),
    ("foreign_gone", 2),
    ("power_drift", 1),
    ("power_refuse", 1),
    ("power_allow", 1),
    ("route_down", 1),
    ("route_up", 1),
    ("start_refused", 1),
    ("start_allowed", 2),
    ("pause", 1),
    ("pause_for", 1),
    ("resume", 2),
    ("systemd_gone", 1),
    ("systemd_back", 2),
    ("unit_gone", 1),
    ("unit_back", 2),
    ("impaired", 1),
    ("unimpaired", 2),
    ("crashes_in_gap", 1),
    # issue 23 item 12: permanent failures, 401s, restart_will_fail, missing folders, a hung
    # host check, a restart by hand
    ("switch_libs", 1),
    ("main_unsupported", 1),
    ("fallback_folder_gone", 1),
    ("fallback_folder_back", 1),
    ("host_hang", 1),
    ("host_ok", 2),
    ("key_api", 1),
    ("key_wrong", 1),
    ("key_admin", 2),
    ("human_restart", 2),
    ("power_reset", 1),
    ("mount_gone_stale", 1),
    ("main_busy", 1),
    ("main_idle", 1),
)
_NAMES = [e for e, _ in EVENTS]
_WEIGHTS = [w for _, w in EVENTS]


@dataclass(frozen=True)
class Step:
    event: str
    arg: float = 0.0  # the gap (clock events), a pause's length, a crash cause

    def __str__(self) -> str:
        return self.event if not self.arg else f"{self.event}({self.arg:g})"


def generate(seed: int, length: int) -> tuple[Step, ...]:
    rng = random.Random(seed)
    steps: list[Step] = []
    for _ in range(length):
        event = rng.choices(_NAMES, _WEIGHTS)[0]
        arg = 0.0
        if event == "late":
            arg = rng.choice((1.5, 1.75, 2.0, 5.0, 30.0, 90.0))
        elif event == "gap":
            arg = rng.choice((600.0, 3600.0, 7200.0, 4000.0))
        elif event == "watchdog_down":
            arg = rng.choice((3600.0, 1800.0))
        elif event == "pause_for":
            arg = rng.choice((30.0, 90.0, 300.0))
        elif event == "crashes_in_gap":
            arg = rng.choice((300.0, 900.0))
        elif event == "crash":
            arg = rng.choice((0.0, 1.0))
        steps.append(Step(event, arg))
    return tuple(steps)


# --- one trace ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One cycle: what the watchdog saw, decided, did and said, beside the truth."""

    index: int
    step: Step
    at: float
    obs: Observation
    prev: PolicyState
    new: PolicyState
    actions: tuple[Action, ...]
    results: tuple[ActionResult, ...]
    events: tuple[Event, ...]
    node: Truth  # the model after the actions ran
    reloaded: bool  # the watchdog was down (state persisted and reloaded) before this cycle
    before: Truth  # the model as observed, before the actions ran


@dataclass
class Trace:
    steps: tuple[Step, ...]
    records: list[Record] = field(default_factory=list)


def roundtrip(state: PolicyState) -> PolicyState:
    """What the state file does with the state (to_jsonable / from_jsonable), minus the disk."""
    return from_jsonable(PolicyState, to_jsonable(state))


def _clock(step: Step) -> float:
    if step.event in ("late", "gap", "watchdog_down"):
        return step.arg
    return float(CFG.watchdog.interval)


def run_trace(
    steps: Sequence[Step],
    *,
    offset: float = 0.0,
    cfg: Config = CFG,
) -> Trace:
    """Step the model and decide() through `steps`; the node starts healthy at `offset`."""
    node = Node(cfg=cfg, t=offset, started_at=offset - 1000.0)
    state = PolicyState()
    trace = Trace(tuple(steps))
    for i, step in enumerate(steps):
        reloaded = False
        if step.event == "watchdog_down":
            node.forget_watchdog()
            state = roundtrip(state)  # the state file survives; nothing else does
            reloaded = True
        else:
            node.inject(step.event, step.arg)
        node.advance(_clock(step))
        obs = node.observe(state.wants)
        prev = state
        before = node.truth()
        state, actions = decide(prev, obs, obs.at, cfg)
        results = node.execute(actions)
        events = narrate(prev, state, actions, results, obs, config=cfg, wall=0.0)
        trace.records.append(
            Record(
                i,
                step,
                obs.at,
                obs,
                prev,
                state,
                actions,
                results,
                events,
                node.truth(),
                reloaded,
                before,
            )
        )
    return trace


# --- invariants --------------------------------------------------------------------------------

Check = Callable[[Trace], "tuple[int, str] | None"]


@dataclass(frozen=True)
class Invariant:
    name: str
    item: str  # "issue 13 item N" or what it encodes
    text: str
    check: Check
    every: int = 1  # checked on every n-th trace: the checks that rerun decide() or a trace


def _starts(actions: Sequence[Action]) -> list[UnitCommand]:
    return [
        a
        for a in actions
        if isinstance(a, UnitCommand) and a.verb in (UnitVerb.START, UnitVerb.RESTART)
    ]


def _ran(results: Sequence[ActionResult], cls: type, pred: Callable[[Action], bool]) -> bool:
    return any(isinstance(r.action, cls) and pred(r.action) and r.succeeded for r in results)


def _kinds(rec: Record, kind: EventKind) -> list[Event]:
    return [e for e in rec.events if e.kind is kind]


# 1. Only restarts that ran count.
def check_restarts_that_ran(trace: Trace) -> tuple[int, str] | None:
    window = CFG.restart_loop.window
    for rec in trace.records:
        # the watchdog's records older than this cycle's decision: their results are known
        counted = sum(
            1
            for r in rec.new.restarts
            if r.by is RestartOrigin.WATCHDOG and r.at < rec.at and rec.at - r.at <= window
        )
        ran = sum(1 for at, who in rec.node.starts if who == "watchdog" and at < rec.at)
        ran = sum(
            1
            for at, who in rec.node.starts
            if who == "watchdog" and at < rec.at and rec.at - at <= window
        )
        if counted > ran:
            return rec.index, (
                f"{counted} watchdog restarts counted within {window:g}s, only {ran} ran"
            )
    return None


def check_backoff_advances_on_attempts(trace: Trace) -> tuple[int, str] | None:
    """A back-off step ends only on an attempt that ran (any origin: ours, systemd's, a
    human's), never on a refused or skipped start."""
    since: int | None = None
    for rec in trace.records:
        starts = len(rec.node.starts)
        before = starts - sum(
            1
            for r in rec.results
            if isinstance(r.action, UnitCommand)
            and r.succeeded
            and r.action.verb in (UnitVerb.START, UnitVerb.RESTART)
        )
        if (
            rec.new.backoff_step > rec.prev.backoff_step >= 1
            and since is not None
            and (before <= since)
        ):
            return rec.index, (
                f"back-off step {rec.prev.backoff_step} -> {rec.new.backoff_step} "
                "without a start attempt that ran"
            )
        if rec.new.backoff_step != rec.prev.backoff_step:
            since = starts
    return None


_LOOP_RE = re.compile(r"restart loop: (\d+) restarts within")


def check_loop_narration_true(trace: Trace) -> tuple[int, str] | None:
    """'restart loop: N restarts ... unit stopped' says what happened."""
    window = CFG.restart_loop.window
    for rec in trace.records:
        for ev in _kinds(rec, EventKind.RESTART_LOOP):
            m = _LOOP_RE.search(ev.message)
            said = int(m.group(1)) if m else 0
            true = rec.node.restarts_within(window)
            if said > true:
                return rec.index, f"narrated {ev.message!r}, but {true} restarts ran in the window"
            if "stopped" in ev.message and rec.node.running:
                return rec.index, f"narrated {ev.message!r}, but the unit runs"
    return None


def check_recovered_not_on_hung(trace: Trace) -> tuple[int, str] | None:
    """'recovered' is never said of the very process a canary showed hung."""
    hung_pids: set[int] = set()
    for rec in trace.records:
        c = rec.obs.canary
        if c is not None and c.result.outcome is Outcome.TIMEOUT and rec.obs.unit.main_pid:
            hung_pids.add(rec.obs.unit.main_pid)
        if _kinds(rec, EventKind.RECOVERED) and rec.node.gen_hang and rec.node.pid in hung_pids:
            return rec.index, f"'recovered' narrated on pid {rec.node.pid}, hung since a canary"
    return None


# 2. systemd restarts seen late are not all stamped "now".
def check_systemd_restarts_dated(trace: Trace) -> tuple[int, str] | None:
    window = CFG.restart_loop.window
    for rec in trace.records:
        counted = rec.new.restarts_in_window(rec.at, window, RestartOrigin.SYSTEMD)
        true = rec.node.restarts_within(window, "systemd")
        if counted > true:
            return rec.index, (
                f"{counted} systemd restarts counted within {window:g}s, {true} happened in it"
            )
    return None


def check_no_loop_on_single_crash(trace: Trace) -> tuple[int, str] | None:
    """A stop for a restart loop needs real restarts: more than max_restarts of any origin
    in the window (the runbook's TabbyAPIRestartLoop), or the watchdog's own budget of
    max_restarts spent on restarts that ran (README: beyond it, stop and back off). Never on
    restarts that were only planned, skipped or failed."""
    r = CFG.restart_loop
    for rec in trace.records:
        stops = [
            a
            for a in rec.actions
            if isinstance(a, UnitCommand)
            and a.verb is UnitVerb.STOP
            and a.reason.rule is Rule.RESTART_LOOP
        ]
        if stops and rec.prev.backoff_step == 0:
            true = rec.node.restarts_within(r.window)
            if true < r.max_restarts:
                return rec.index, (
                    f"stopped for a restart loop with {true} restarts in {r.window:g}s "
                    f"(max {r.max_restarts})"
                )
    return None


# 3. A failed canary is evidence.
def check_failed_canary_is_evidence(trace: Trace) -> tuple[int, str] | None:
    for rec in trace.records:
        c = rec.obs.canary
        if c is None or c.result.outcome not in (Outcome.HTTP_ERROR, Outcome.BAD_BODY):
            continue
        if rec.new.phase.verdict is Verdict.OK or rec.new.phase is Phase.PAUSED:
            if rec.new.phase is Phase.PAUSED:
                continue
            return rec.index, (
                f"canary failed ({c.result.outcome.value} {c.result.status}: "
                f"{c.result.detail}) yet the phase is {rec.new.phase.value}"
            )
    return None


# 4. Recovery from a hang needs a passing canary after the restart.
def check_hang_recovery_needs_canary(trace: Trace) -> tuple[int, str] | None:
    hang_restart_at: float | None = None
    canary_ok_since = False
    for rec in trace.records:
        c = rec.obs.canary
        if hang_restart_at is not None and c is not None and c.result.outcome is Outcome.OK:
            canary_ok_since = True
        for ev in _kinds(rec, EventKind.RECOVERED):
            if hang_restart_at is not None and not canary_ok_since:
                return rec.index, (
                    f"{ev.message!r} after the generation-hang restart at "
                    f"{hang_restart_at - trace.records[0].at:+g}s without a passing canary"
                )
        if _kinds(rec, EventKind.RECOVERED) or (rec.new.phase is Phase.HEALTHY and canary_ok_since):
            hang_restart_at, canary_ok_since = None, False
        hang_restart = any(a.reason.rule is Rule.GENERATION_HANG for a in _starts(rec.actions))
        if hang_restart and _ran(rec.results, UnitCommand, lambda a: True):
            hang_restart_at, canary_ok_since = rec.at, False
    return None


# 5. Fallback is its own degraded verdict, and the main model is retried.
def check_fallback_degraded(trace: Trace) -> tuple[int, str] | None:
    fallback = CFG.model.fallback
    for rec in trace.records:
        m = rec.obs.model
        if m is None or m.loaded != fallback or not rec.obs.health.healthy:
            continue
        if rec.new.phase.verdict is Verdict.OK:
            return rec.index, f"the fallback model {fallback} serves, yet {rec.new.phase.value}"
        if _kinds(rec, EventKind.RECOVERED):
            return rec.index, f"'recovered' narrated while the fallback model {fallback} serves"
    return None


def check_main_model_retried(trace: Trace) -> tuple[int, str] | None:
    fallback, main = CFG.model.fallback, CFG.model.name
    clear_since: float | None = None
    for rec in trace.records:
        n = rec.node
        blocker_gone = n.serving == fallback and n.main_loadable and not n.paused
        if any(isinstance(a, LoadModel) and a.model == main for a in rec.actions):
            clear_since = None
            continue
        if not blocker_gone:
            clear_since = None
            continue
        clear_since = rec.at if clear_since is None else clear_since
        if rec.at - clear_since > MAIN_RETRY_BOUND:
            return rec.index, (
                f"the fallback serves and nothing blocks {main} for "
                f"{rec.at - clear_since:g}s, and {main} was never retried"
            )
    return None


def _known_missing(records: Sequence[Record]) -> list[bool]:
    """Per record: the last library check seen so far found libraries missing."""
    known, out = False, []
    for rec in records:
        libs = rec.obs.host.missing_libraries
        if libs is not None:
            known = bool(libs)
        out.append(known)
    return out


# 6. A known-missing library blocks restarts until a fresh check says fixed.
def check_missing_library_blocks(trace: Trace) -> tuple[int, str] | None:
    for rec, known_missing in zip(trace.records, _known_missing(trace.records), strict=True):
        started = _starts(rec.actions)
        if known_missing and started:
            return rec.index, (
                f"{describe(started[0])} while a check found libraries missing and no later "
                "check said fixed"
            )
    return None


# 7. The power-limit failed finding clears after a successful retry.
def check_power_finding_clears(trace: Trace) -> tuple[int, str] | None:
    ok_gpus: set[int] = set()
    for rec in trace.records:
        for r in rec.obs.results:
            if isinstance(r.action, SetPowerLimit):
                if r.status is ResultStatus.OK:
                    ok_gpus.add(r.action.gpu_index)
                elif r.status in (ResultStatus.FAILED, ResultStatus.REFUSED):
                    ok_gpus.discard(r.action.gpu_index)
        for f in rec.new.findings:
            if f.rule is Rule.POWER_LIMIT and "failed" in f.message:
                gpu = int(f.subject[3:]) if f.subject.startswith("gpu") else -1
                if gpu in ok_gpus:
                    return rec.index, f"{f.message!r} after a successful retry"
    return None


# 8. After resume the phase is not PAUSED.
def check_resume_not_paused(trace: Trace) -> tuple[int, str] | None:
    for rec in trace.records:
        p = rec.obs.pause
        active = p is not None and (p.until is None or p.until > rec.at)
        if rec.new.phase is Phase.PAUSED and not active:
            return rec.index, "phase paused while no pause is requested"
        if active and rec.new.phase is not Phase.PAUSED:
            return rec.index, f"paused, yet the phase is {rec.new.phase.value}"
    return None


# 9. Escalation announced once per escalation.
def check_escalation_once(trace: Trace) -> tuple[int, str] | None:
    announced = False
    for rec in trace.records:
        said = [
            e
            for e in rec.events
            if e.kind is EventKind.ESCALATED
            or (e.kind is EventKind.DIAGNOSIS and e.rule is Rule.ESCALATION)
        ]
        if said and announced:
            return rec.index, f"escalation announced again: {said[0].message!r}"
        if said:
            announced = True
        if not rec.new.escalated and rec.new.phase is not Phase.ESCALATED:
            announced = False
    return None


# 10. Findings of an unchanged cause are announced once.
_NUM = re.compile(r"\d+(\.\d+)?")


def check_unchanged_cause_once(trace: Trace) -> tuple[int, str] | None:
    prev_pause = None
    for rec in trace.records:
        pause_now = rec.obs.pause
        same_pause = pause_now is not None and pause_now == prev_pause
        paused_msgs = [f.message for f in rec.new.findings if f.rule is Rule.PAUSED]
        old_msgs = [f.message for f in rec.prev.findings if f.rule is Rule.PAUSED]
        if same_pause and paused_msgs and old_msgs and paused_msgs != old_msgs:
            return (
                rec.index,
                f"an unchanged pause is told anew: {old_msgs[0]!r} -> {paused_msgs[0]!r}",
            )
        for ev in _kinds(rec, EventKind.DIAGNOSIS):
            if same_pause and ev.rule is Rule.PAUSED:
                return rec.index, f"an unchanged pause is announced again: {ev.message!r}"
        prev_pause = pause_now
    return None


# The existing action invariants (tests/test_policy_properties.py), over this richer model.
def check_actions_sane(trace: Trace) -> tuple[int, str] | None:
    r = CFG.restart_loop
    issued: list[float] = []
    for rec in trace.records:
        paused = rec.obs.pause is not None and (
            rec.obs.pause.until is None or rec.obs.pause.until > rec.at
        )
        if paused and rec.actions:
            return rec.index, f"acted while paused: {describe(rec.actions[0])}"
        for a in rec.actions:
            if not a.reason.evidence.strip():
                return rec.index, f"{describe(a)} has no evidence"
            if isinstance(a, KillOrphan):
                target = rec.obs.process(a.pid)
                if target is None or target.role is not ProcessRole.ORPHAN:
                    return rec.index, f"{describe(a)}: not an orphan"
        loads = [a for a in rec.actions if isinstance(a, LoadModel)]
        ended = any(
            isinstance(r.action, LoadModel) and r.status is not ResultStatus.IN_PROGRESS
            for r in rec.obs.results
        )
        if len(loads) > 1 or (loads and rec.prev.load_in_flight and not ended):
            return rec.index, "two loads in flight"
        issued += [rec.at for _ in _starts(rec.actions)]
        if sum(1 for t in issued if rec.at - t < r.window) > r.max_restarts:
            return rec.index, f"more than {r.max_restarts} (re)starts issued within {r.window:g}s"
        if rec.new.backoff_step < rec.prev.backoff_step and rec.new.backoff_step != 0:
            return rec.index, "back-off step went down without a reset"
    return None


def check_dry_run_parity(trace: Trace) -> tuple[int, str] | None:
    dry = dc_replace(CFG, watchdog=dc_replace(CFG.watchdog, dry_run=True))
    for rec in trace.records:
        if decide(rec.prev, rec.obs, rec.at, dry) != (rec.new, rec.actions):
            return rec.index, "a dry run decides differently"
    return None


def check_reload_changes_nothing(trace: Trace) -> tuple[int, str] | None:
    """Persisting and reloading the state mid-trace changes no decision (two points per trace:
    the JSON round trip of a long state costs more than a whole cycle; the watchdog_down event
    reloads it inside the trace too)."""
    n = len(trace.records)
    for rec in (trace.records[i] for i in sorted({n // 3, (2 * n) // 3}) if i < n):
        if decide(roundtrip(rec.prev), rec.obs, rec.at, CFG) != (rec.new, rec.actions):
            return rec.index, "the state reloaded from JSON decides differently"
    return None


def _decisions(trace: Trace) -> list[tuple[Phase, tuple[str, ...], tuple[str, ...]]]:
    return [
        (
            rec.new.phase,
            tuple(f"{describe(a)} [{a.reason.rule}] {a.reason.evidence}" for a in rec.actions),
            tuple(f.message for f in rec.new.findings),
        )
        for rec in trace.records
    ]


def check_time_shift(trace: Trace) -> tuple[int, str] | None:
    """The same trace BIG_OFFSET seconds later decides identically."""
    shifted = run_trace(trace.steps, offset=BIG_OFFSET)
    for rec, a, b in zip(trace.records, _decisions(trace), _decisions(shifted), strict=True):
        if a != b:
            return rec.index, f"shifted by {BIG_OFFSET:g}s: {a} != {b}"
    return None


def check_verdict_not_ok_in_trouble(trace: Trace) -> tuple[int, str] | None:
    """What a human with the runbook concludes from the evidence: never OK while TabbyAPI
    demonstrably fails (down for failures_before_down probes, sticky 503, no model)."""
    down = 0
    for rec in trace.records:
        h = rec.obs.health
        if h.result.outcome is Outcome.LOCAL_ERROR:
            continue
        down = 0 if h.healthy else down + 1
        verdict = rec.new.phase.verdict
        if verdict is not Verdict.OK:
            continue
        if down >= CFG.tabbyapi.failures_before_down:
            return rec.index, f"OK after {down} failed /health probes"
        if h.sticky_unhealthy:
            return rec.index, "OK on a sticky 503"
        m = rec.obs.model
        if m is not None and m.known and m.loaded is None:
            return rec.index, "OK with no model loaded"
    return None


# --- issue 23 item 12: what an independent model of the node found --------------------------------

_FAILING = (Outcome.TIMEOUT, Outcome.HTTP_ERROR, Outcome.BAD_BODY)


def _new_starts(rec: Record, prev_count: int) -> tuple[int, int]:
    """(starts that happened before this cycle's observation, starts its actions made)."""
    by_actions = sum(
        1
        for r in rec.results
        if isinstance(r.action, UnitCommand)
        and r.action.verb in (UnitVerb.START, UnitVerb.RESTART)
        and r.succeeded
    )
    return len(rec.node.starts) - prev_count - by_actions, by_actions


def check_restart_needs_canary(trace: Trace) -> tuple[int, str] | None:
    """After any restart (the watchdog's, systemd's, a human's), neither HEALTHY nor
    "recovered" before a canary passed on the new process (README: a passing canary after any
    restart or load; the runbook's full recovery ends with a test completion)."""
    pending, count = False, 0
    for rec in trace.records:
        seen, made = _new_starts(rec, count)
        count = len(rec.node.starts)
        pending = pending or seen > 0
        c = rec.obs.canary
        if c is not None and c.result.outcome is Outcome.OK:
            pending = False
        if pending and rec.new.phase is Phase.HEALTHY:
            return rec.index, "HEALTHY after a restart, and no canary has passed since"
        if pending and _kinds(rec, EventKind.RECOVERED):
            return rec.index, "'recovered' after a restart, and no canary has passed since"
        pending = pending or made > 0
    return None


def check_library_check_before_start(trace: Trace) -> tuple[int, str] | None:
    """No (re)start on any path (a generation hang included) without a library check in this
    outage, unless the host check cannot run (its wait is bounded: startable_is_started).
    An outage: /health fails, or the last canary failed, until both are well again."""
    trouble_at: int | None = None
    checked_since: int | None = None
    failing = False
    count = 0
    for rec in trace.records:
        o = rec.obs
        seen, made = _new_starts(rec, count)
        count = len(rec.node.starts)
        if seen:
            failing = False  # a new process: the old verdict is not about it
        if o.canary is not None and o.canary.result.outcome is not Outcome.LOCAL_ERROR:
            failing = o.canary.result.outcome in _FAILING
        blind = o.health.result.outcome is Outcome.LOCAL_ERROR
        if not blind and (not o.health.healthy or failing):
            trouble_at = rec.index if trouble_at is None else trouble_at
        elif not blind:
            trouble_at = checked_since = None
        if o.host.libraries_checked and trouble_at is not None:
            checked_since = rec.index
        started = _starts(rec.actions)
        if (
            started
            and trouble_at is not None
            and checked_since is None
            and not rec.before.host_hung
        ):
            return rec.index, (
                f"{describe(started[0])} with no library check since the outage began at "
                f"step {trouble_at}"
            )
        if made:
            failing = False
    return None


# A failed unit with nothing in the way is started within this (a check that cannot run never
# blocks recovery for ever): generous, since a budget spent on starts that did not run waits
# for them to leave the window.
STARTABLE_BOUND = CFG.restart_loop.window + 10.0


def _startable(n: Truth, rec: Record) -> bool:
    return (
        n.systemd
        and n.unit_exists
        and not n.running
        and not n.auto_restart_pending
        and not n.start_refused
        and not n.in_the_way
        and not n.libs_missing
        and not n.crashy
        and not n.impaired
        and not n.paused
        and rec.prev.backoff_step == 0
        and rec.new.backoff_step == 0
    )


def check_startable_is_started(trace: Trace) -> tuple[int, str] | None:
    """(A library a check found missing blocks until a check says fixed: issue 13 item 6, the
    missing_library_blocks invariant; that is no check waiting to run.)"""
    since: float | None = None
    for rec, known_missing in zip(trace.records, _known_missing(trace.records), strict=True):
        if known_missing or not _startable(rec.before, rec) or _starts(rec.actions):
            since = None
            continue
        since = rec.at if since is None else since
        if rec.at - since > STARTABLE_BOUND:
            return rec.index, (
                f"TabbyAPI's unit is down with nothing in the way for {rec.at - since:g}s "
                f"and not started ({rec.before.text})"
            )
    return None


def check_impaired_acts_on_nothing(trace: Trace) -> tuple[int, str] | None:
    """The README: an impaired watchdog (out of descriptors) takes no action at all."""
    for rec in trace.records:
        if rec.obs.health.result.outcome is Outcome.LOCAL_ERROR and rec.actions:
            return rec.index, f"impaired, yet {describe(rec.actions[0])}"
    return None


POWER_TARGET0 = 450.0  # ORACLE_CONFIG's gpu0 limit, inside the model card's 150-600 W


def check_power_finding_on_target(trace: Trace) -> tuple[int, str] | None:
    """A refused power limit's finding goes once the limit is on target again, by any means."""
    for rec in trace.records:
        g0 = next((g for g in rec.obs.gpus.devices if g.index == 0), None)
        if g0 is None or g0.power.limit_w is None or abs(g0.power.limit_w - POWER_TARGET0) > 1:
            continue
        stale = [
            f
            for f in rec.new.findings
            if f.rule is Rule.POWER_LIMIT and f.subject == "gpu0" and "failed" in f.message
        ]
        if stale:
            return rec.index, f"{stale[0].message!r} while gpu0's limit is {g0.power.limit_w:g} W"
    return None


def _folder_state(n: Truth, model: str) -> tuple[bool, int]:
    if model == CFG.model.name:
        return n.main_folder_usable, n.main_folder_version
    return n.fallback_folder_usable, 0


def check_permanent_not_retried_as_is(trace: Trace) -> tuple[int, str] | None:
    """A load that failed for good is sent again only once something it depends on changed:
    TabbyAPI's process, the model's folder (the config is fixed in a trace). What the watchdog
    cannot see this cycle (systemd, the host check, the mount) has not changed."""
    failed: dict[str, tuple[int, tuple[bool, int]]] = {}
    sent: dict[str, tuple[int, tuple[bool, int]]] = {}  # the process and folder a load met
    for rec in trace.records:
        for r in rec.obs.results:
            if isinstance(r.action, LoadModel) and r.error_kind.value == "load_permanent":
                # (its result may arrive after TabbyAPI was restarted: it failed where it went)
                failed[r.action.model] = sent[r.action.model]
        for a in rec.actions:
            if not isinstance(a, LoadModel):
                continue
            sent[a.model] = (rec.before.pid, _folder_state(rec.before, a.model))
            if a.model not in failed:
                continue
            pid, folder = failed.pop(a.model)
            if pid == rec.before.pid and folder == _folder_state(rec.before, a.model):
                return rec.index, (
                    f"{describe(a)} again after it failed for good, on the same process "
                    f"(pid {pid}) and folder"
                )
    return None


def check_no_escalation_when_resolved(trace: Trace) -> tuple[int, str] | None:
    """Escalation ("a human is needed") neither while paused nor once TabbyAPI serves."""
    for rec in trace.records:
        if not rec.new.escalated or rec.prev.escalated:
            continue
        p = rec.obs.pause
        if p is not None and (p.until is None or p.until > rec.at):
            return rec.index, "escalated during a pause"
        c = rec.obs.canary
        failing = c is not None and c.result.outcome in _FAILING
        if rec.obs.health.healthy and rec.before.serving is not None and not failing:
            return rec.index, f"escalated while TabbyAPI serves {rec.before.serving}"
    return None


def check_main_retry_on_fallback(trace: Trace) -> tuple[int, str] | None:
    """While the fallback serves: the main model is not loaded with the models mount missing
    (or unread), and a retry that failed is not sent again before backoff_initial."""
    main, fallback = CFG.model.name, CFG.model.fallback
    failed_at: float | None = None
    for rec in trace.records:
        for r in rec.obs.results:
            if isinstance(r.action, LoadModel) and r.action.model == main:
                transient = r.status is ResultStatus.FAILED and r.error_kind.value == "load_error"
                failed_at = rec.at if transient else None if r.succeeded else failed_at
        m = rec.obs.model
        on_fallback = m is not None and m.loaded == fallback
        for a in rec.actions:
            if not (isinstance(a, LoadModel) and a.model == main and on_fallback):
                continue
            if rec.obs.host.models_dir_ok is not True:
                return rec.index, (
                    f"{describe(a)} while the fallback serves and the models dir is "
                    f"{rec.obs.host.models_dir_detail or rec.obs.host.models_dir_ok}"
                )
            if failed_at is not None and rec.at - failed_at < CFG.restart_loop.backoff_initial:
                return rec.index, f"{describe(a)} {rec.at - failed_at:g}s after it failed"
    return None


_CLAIM = re.compile(r"^(\d+) restarts within")


def check_restart_claims_true(trace: Trace) -> tuple[int, str] | None:
    """Every "N restarts within <window>" said (findings too, not only the loop event) has N
    restarts in the window."""
    window = CFG.restart_loop.window
    for rec in trace.records:
        for f in rec.new.findings:
            m = _CLAIM.match(f.message)
            if m and int(m.group(1)) > rec.before.restarts_within(window):
                return rec.index, (
                    f"{f.message!r}, but {rec.before.restarts_within(window)} restarts ran in "
                    "the window"
                )
    return None


def check_no_flicker(trace: Trace) -> tuple[int, str] | None:
    """A finding is not announced again after it went for a cycle or two while neither the
    node nor the phase changed (the journal's lines, a steady VRAM refusal)."""
    recs = trace.records
    for i, rec in enumerate(recs):
        for ev in _kinds(rec, EventKind.DIAGNOSIS):
            if ev.rule in (Rule.PAUSED, Rule.RESTART_LOOP):
                continue  # a pause and a loop's steps are told per change
            key = (ev.rule, _NUM.sub("#", ev.message))
            for back in (2, 3):
                if i - back < 0:
                    continue
                window = recs[i - back : i + 1]
                if len({(r.node.text, r.new.phase) for r in window}) != 1:
                    continue  # the node or the watchdog's view of it changed meanwhile
                if any(r.reloaded or r.step.event != "tick" for r in window[1:]):
                    continue
                had = {(f.rule, _NUM.sub("#", f.message)) for f in recs[i - back].new.findings}
                between = {
                    (f.rule, _NUM.sub("#", f.message)) for r in window[1:-1] for f in r.new.findings
                }
                if key in had and key not in between:
                    return (
                        rec.index,
                        f"announced again after a gap, nothing changed: {ev.message!r}",
                    )
    return None


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "restarts_that_ran",
        "issue 13 item 1",
        "only restarts that ran count",
        check_restarts_that_ran,
    ),
    Invariant(
        "backoff_advances_on_attempts",
        "issue 13 item 1",
        "a refused back-off start does not advance the back-off",
        check_backoff_advances_on_attempts,
    ),
    Invariant(
        "loop_narration_true",
        "issue 13 item 1",
        "'restart loop: N restarts ... stopped' says what happened",
        check_loop_narration_true,
    ),
    Invariant(
        "recovered_not_on_hung",
        "issue 13 item 1",
        "'recovered' is never said of the process a canary showed hung",
        check_recovered_not_on_hung,
    ),
    Invariant(
        "systemd_restarts_dated",
        "issue 13 item 2",
        "systemd restarts seen late are not all stamped now",
        check_systemd_restarts_dated,
    ),
    Invariant(
        "no_loop_on_few_restarts",
        "issue 13 item 2",
        "a restart-loop stop needs more than max_restarts real restarts in the window",
        check_no_loop_on_single_crash,
    ),
    Invariant(
        "failed_canary_is_evidence",
        "issue 13 item 3",
        "a failed canary (HTTP 500, error body) is never OK",
        check_failed_canary_is_evidence,
    ),
    Invariant(
        "hang_recovery_needs_canary",
        "issue 13 item 4",
        "recovery from a generation hang needs a passing canary after the restart",
        check_hang_recovery_needs_canary,
    ),
    Invariant(
        "fallback_degraded",
        "issue 13 item 5",
        "the fallback model is WARNING, never OK or 'recovered'",
        check_fallback_degraded,
    ),
    Invariant(
        "main_model_retried",
        "issue 13 item 5",
        "the main model is retried when its blocker clears",
        check_main_model_retried,
    ),
    Invariant(
        "missing_library_blocks",
        "issue 13 item 6",
        "a known-missing library blocks restarts until a fresh check says fixed",
        check_missing_library_blocks,
    ),
    Invariant(
        "power_finding_clears",
        "issue 13 item 7",
        "the power-limit failed finding clears after a successful retry",
        check_power_finding_clears,
    ),
    Invariant(
        "resume_not_paused",
        "issue 13 item 8",
        "paused exactly while a pause is requested",
        check_resume_not_paused,
    ),
    Invariant(
        "escalation_once",
        "issue 13 item 9",
        "escalation announced once per escalation",
        check_escalation_once,
    ),
    Invariant(
        "unchanged_cause_once",
        "issue 13 item 10",
        "findings of an unchanged cause are announced once",
        check_unchanged_cause_once,
    ),
    Invariant(
        "actions_sane",
        "property tests",
        "the action invariants of the property tests",
        check_actions_sane,
    ),
    Invariant(
        "dry_run_parity",
        "property tests",
        "a dry run decides as a real one",
        check_dry_run_parity,
        every=4,
    ),
    Invariant(
        "reload_changes_nothing",
        "statefile",
        "persist/reload of the state changes nothing",
        check_reload_changes_nothing,
        every=2,
    ),
    Invariant(
        "time_shift",
        "monotonic clock",
        "a trace shifted in time decides identically",
        check_time_shift,
        every=8,
    ),
    Invariant(
        "verdict_not_ok_in_trouble",
        "runbook",
        "never OK while TabbyAPI demonstrably fails",
        check_verdict_not_ok_in_trouble,
    ),
    Invariant(
        "restart_needs_canary",
        "issue 23 item 12",
        "HEALTHY and 'recovered' after any restart only after a passing canary",
        check_restart_needs_canary,
    ),
    Invariant(
        "library_check_before_start",
        "issue 23 item 12",
        "no (re)start on any path before this outage's library check",
        check_library_check_before_start,
    ),
    Invariant(
        "startable_is_started",
        "issue 23 item 12",
        "a check that cannot run never blocks recovery for ever",
        check_startable_is_started,
    ),
    Invariant(
        "impaired_acts_on_nothing",
        "issue 23 item 12",
        "an impaired watchdog takes no action, not even a power limit",
        check_impaired_acts_on_nothing,
    ),
    Invariant(
        "power_finding_on_target",
        "issue 23 item 12",
        "the power finding clears once the limit is on target by any means",
        check_power_finding_on_target,
    ),
    Invariant(
        "permanent_not_retried_as_is",
        "issue 23 item 12",
        "a permanent load failure is retried only once what it depends on changed",
        check_permanent_not_retried_as_is,
    ),
    Invariant(
        "no_escalation_when_resolved",
        "issue 23 item 12",
        "no escalation while paused or once TabbyAPI serves",
        check_no_escalation_when_resolved,
    ),
    Invariant(
        "main_retry_on_fallback",
        "issue 23 item 12",
        "on the fallback: no main load without the mount, nor before its back-off",
        check_main_retry_on_fallback,
    ),
    Invariant(
        "restart_claims_true",
        "issue 23 item 12",
        "'N restarts within' is true wherever it is said",
        check_restart_claims_true,
    ),
    Invariant(
        "no_flicker",
        "issue 23 item 12",
        "a finding is not announced again after a gap while nothing changed",
        check_no_flicker,
    ),
)
BY_NAME = {inv.name: inv for inv in INVARIANTS}


# --- issue 23 item 12's stories: each class the independent model found, as a minimal trace ------
# (found on the policy before the fix, shrunk by `shrink`; each fails its invariant there)


def _ticks(n: int) -> list[Step]:
    return [Step("tick")] * n


@dataclass(frozen=True)
class Story:
    name: str
    invariant: str  # the invariant it broke
    steps: tuple[Step, ...]


STORIES: tuple[Story, ...] = (
    # "recovered" and HEALTHY after a restart with no canary, whoever restarted
    Story("systemd_restart_no_canary", "restart_needs_canary", (Step("crash"), Step("gap", 600))),
    Story(
        "human_restart_no_canary",
        "restart_needs_canary",
        (Step("tick"), Step("human_restart"), *_ticks(6)),
    ),
    # a restart while restart_will_fail stands: a failing canary, then the model unloaded
    Story(
        "will_fail_generation_hang",
        "missing_library_blocks",
        (Step("switch_libs"), Step("canary_500"), Step("lose_model")),
    ),
    # a generation-hang restart with no library check in this outage
    Story(
        "generation_hang_unchecked",
        "library_check_before_start",
        (Step("canary_body"), Step("gen_hang")),
    ),
    # a failed unit never started while the host check hangs
    Story(
        "host_check_hangs",
        "startable_is_started",
        (Step("host_hang"), Step("break"), Step("gap", 600), Step("fix"), *_ticks(72)),
    ),
    # an impaired watchdog sets a power limit
    Story(
        "impaired_power_limit", "impaired_acts_on_nothing", (Step("impaired"), Step("power_drift"))
    ),
    # the power finding stays once the limit is back on target by other means
    Story(
        "power_back_by_hand",
        "power_finding_on_target",
        (Step("power_refuse"), Step("power_drift"), Step("power_reset")),
    ),
    # a permanent load error forgotten when systemd goes, the host check hangs, the mount goes
    Story(
        "permanent_systemd_gone",
        "permanent_not_retried_as_is",
        (
            Step("main_unsupported"),
            Step("lose_model"),
            *_ticks(4),
            Step("systemd_gone"),
            Step("tick"),
        ),
    ),
    Story(
        "permanent_host_hangs",
        "permanent_not_retried_as_is",
        (Step("main_unsupported"), Step("lose_model"), *_ticks(4), Step("host_hang"), Step("tick")),
    ),
    Story(
        "permanent_mount_lost",
        "permanent_not_retried_as_is",
        (
            Step("main_unsupported"),
            Step("lose_model"),
            *_ticks(4),
            Step("mount_gone"),
            Step("mount_back"),
            Step("tick"),
        ),
    ),
    # escalation the cycle after "recovered", and during a pause
    Story(
        "escalated_after_recovery",
        "no_escalation_when_resolved",
        (
            Step("break"),
            *_ticks(8),
            Step("fix"),
            Step("late", 2),
            Step("gen_hang"),
            *_ticks(3),
            Step("human_restart"),
            Step("gap", 600),
        ),
    ),
    Story(
        "escalated_while_paused",
        "no_escalation_when_resolved",
        (Step("break"), *_ticks(14), Step("pause"), Step("gap", 600)),
    ),
    # while the fallback serves: the main model loaded with the mount missing; a failing retry
    # sent every cycle
    Story(
        "main_loaded_without_mount",
        "main_retry_on_fallback",
        (
            Step("foreign_vram"),
            Step("lose_model"),
            *_ticks(3),
            Step("mount_gone_stale"),
            Step("foreign_gone"),
        ),
    ),
    Story(
        "main_retry_every_cycle",
        "main_retry_on_fallback",
        (
            Step("foreign_vram"),
            Step("lose_model"),
            Step("gap", 600),
            Step("main_busy"),
            Step("foreign_gone"),
            Step("tick"),
        ),
    ),
    # minor: the journal finding re-announced; "4 restarts within 1m" at the window's edge
    Story(
        "journal_re_announced",
        "no_flicker",
        (Step("crash"), *_ticks(5), Step("canary_body"), Step("break"), *_ticks(14)),
    ),
    Story(
        "restart_claim_at_the_edge",
        "restart_claims_true",
        (
            Step("crash"),
            Step("late", 1.5),
            Step("late", 30),
            Step("crash"),
            Step("late", 5),
            Step("late", 5),
            Step("crash"),
            Step("late", 5),
            Step("late", 5),
            Step("late", 1.75),
            *_ticks(3),
            Step("crash"),
            Step("tick"),
            Step("crash"),
        ),
    ),
)
STORY_BY_NAME = {s.name: s for s in STORIES}


# --- shrinking and the story --------------------------------------------------------------------


def fails(inv: Invariant, steps: Sequence[Step]) -> tuple[int, str] | None:
    return inv.check(run_trace(steps))


def shrink(inv: Invariant, steps: Sequence[Step], budget: int = 400) -> tuple[Step, ...]:
    """Drop steps (chunks first, then one by one) while the invariant still fails; then turn
    each event that only stands for the time it takes into a plain tick, and drop again."""
    current = list(steps)
    first = fails(inv, current)
    if first is not None:
        current = current[: first[0] + 1]
    tries = 0

    def drop(chunk: int) -> None:
        nonlocal current, tries
        while chunk >= 1 and tries < budget:
            i, changed = 0, False
            while i < len(current) and tries < budget:
                candidate = current[:i] + current[i + chunk :]
                tries += 1
                if candidate and fails(inv, candidate) is not None:
                    current, changed = candidate, True
                else:
                    i += chunk
            if not changed:
                chunk //= 2

    drop(max(len(current) // 2, 1))
    for i, step in enumerate(current):
        if step.event == "tick" or tries >= budget:
            continue
        candidate = [*current[:i], Step("tick"), *current[i + 1 :]]
        tries += 1
        if fails(inv, candidate) is not None:
            current = candidate
    drop(1)
    return tuple(current)


def story(inv: Invariant, steps: Sequence[Step]) -> str:
    trace = run_trace(steps)
    failure = inv.check(trace)
    lines = [f"invariant {inv.name} ({inv.item}): {inv.text}", f"trace: {len(steps)} steps"]
    t0 = trace.records[0].at if trace.records else 0.0
    for rec in trace.records:
        o = rec.obs
        seen = [
            o.health.result.outcome.value
            + (f" {o.health.result.status}" if o.health.result.status else "")
        ]
        if o.unit.available:
            seen.append(
                f"unit {o.unit.active_state}/{o.unit.sub_state} NRestarts={o.unit.n_restarts}"
            )
        else:
            seen.append("no systemd")
        if o.model is not None:
            seen.append(f"model={o.model.loaded}")
        if o.canary is not None:
            seen.append(f"canary {o.canary.result.outcome.value}")
        if o.host.missing_libraries is not None:
            seen.append(f"libs missing={list(o.host.missing_libraries)}")
        if o.pause is not None:
            seen.append("pause requested")
        lines.append(
            f"{rec.index:3d} t={rec.at - t0:+9.1f}s  {rec.step!s:<22} truth: {rec.node.text}"
        )
        lines.append(f"      saw: {'; '.join(seen)}")
        phase = (
            rec.new.phase.value
            if rec.prev.phase == rec.new.phase
            else f"{rec.prev.phase.value} -> {rec.new.phase.value}"
        )
        lines.append(f"      phase: {phase}  (backoff step {rec.new.backoff_step})")
        for res in rec.results:
            lines.append(f"      did: {describe(res.action)} -> {res.status.value} {res.detail}")
        for ev in rec.events:
            if ev.kind in (EventKind.ACTION, EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED):
                continue
            lines.append(f"      said: [{ev.kind.value}] {ev.message[:160]}")
        if failure is not None and failure[0] == rec.index:
            lines.append(f"  !!! {failure[1]}")
            break
    return "\n".join(lines)


# --- a campaign ---------------------------------------------------------------------------------


@dataclass
class Campaign:
    traces: int = 0
    steps: int = 0
    checks: int = 0
    first: dict[str, tuple[int, tuple[Step, ...]]] = field(default_factory=dict)  # name -> seed
    failing_traces: dict[str, int] = field(default_factory=dict)

    def report(self, name: str, *, minimise: bool = True) -> str:
        inv = BY_NAME[name]
        seed, steps = self.first[name]
        small = shrink(inv, steps) if minimise else steps
        return (
            f"{inv.name} failed in {self.failing_traces[name]} of {self.traces} traces "
            f"(first: seed {seed}, {len(steps)} steps, minimised to {len(small)}):\n"
            + story(inv, small)
        )


def run_campaign(
    n_traces: int,
    *,
    seed0: int = 13_000,
    length: int = 40,
    invariants: Sequence[Invariant] = INVARIANTS,
) -> Campaign:
    """Run `n_traces` seeded traces and check the invariants on each (those with `every` > 1,
    which rerun decide() or the whole trace, on every n-th)."""
    c = Campaign()
    for k in range(n_traces):
        seed = seed0 + k
        steps = generate(seed, length)
        trace = run_trace(steps)
        c.traces += 1
        c.steps += len(trace.records)
        for inv in invariants:
            if k % inv.every:
                continue
            c.checks += 1
            failure = inv.check(trace)
            if failure is not None:
                c.failing_traces[inv.name] = c.failing_traces.get(inv.name, 0) + 1
                c.first.setdefault(inv.name, (seed, steps))
    return c
