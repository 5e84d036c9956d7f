"""Issue 23, "an honest voice": every line of the event stream true, said once, within 100
columns, and carrying the rule that decided it.

The golden story runs the demo's incidents (a boot with no model, a crash systemd restarts,
slow /health, a restart loop) through the real policy and narrate() on a fake clock, and prints
each event as `hydra-watchdog demo` does (demo.event_lines): nothing in it depends on the time,
a pid or a port. tests/golden/narration/, regenerated with HYDRA_GOLDEN=regen. The same rules
are then asserted over the events of a real `demo --fast` run."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from hydra_watchdog.actions import ActionResult, LoadModel, ResultStatus
from hydra_watchdog.demo import FAST, Demo, event_lines
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import Observation, Outcome
from hydra_watchdog.report.screen import WIDTH
from hydra_watchdog.states import Rule
from tests.policy_kit import Run, canary, loading, model, obs, ok, refused, unit

GOLDEN = Path(__file__).resolve().parent / "golden" / "narration" / "demo-story.txt"
REGEN = os.environ.get("HYDRA_GOLDEN") == "regen"
RULE = re.compile(r"\[[a-z_]+\]")


def _story() -> list[tuple[float, Event]]:
    """The demo's incidents on a fake clock; every action ran (a load: started)."""
    run = Run()
    told: list[tuple[float, Event]] = []

    def step(o: Observation) -> tuple[LoadModel, ...]:
        prev = run.state
        acts = run.step(o)
        results = tuple(
            ActionResult(
                a,
                ResultStatus.IN_PROGRESS if isinstance(a, LoadModel) else ResultStatus.OK,
                "done",
                o.at,
            )
            for a in acts
        )
        events = narrate(prev, run.state, acts, results, o, config=run.cfg, wall=o.at)
        told.extend((o.at, e) for e in events)
        return tuple(a for a in acts if isinstance(a, LoadModel))

    # boot: no model -> load -> the canary passes
    (load,) = step(obs(0, model=model(None)))
    step(obs(1, model=model(None), load=loading()))
    loaded = ActionResult(load, ResultStatus.OK, "confirmed by /v1/model", 2.0, duration_s=1.5)
    step(obs(2, results=(loaded,)))
    step(obs(3, canary=canary(Outcome.OK)))
    # crash: systemd's Restart= brings it back; a canary must pass
    crashed = unit("activating", "auto-restart", result="exit-code", n=0)
    step(obs(10, health=refused(), unit=crashed))
    back = dataclasses.replace(unit(enter=12, n=1), invocation_id="inv-2")
    step(obs(13, unit=back))
    step(obs(14, unit=back, canary=canary(Outcome.OK)))
    # slow /health for 3 probes, then fixed
    for t in (20, 21, 22):
        step(obs(t, unit=back, health=ok(2.5)))
    step(obs(23, unit=back))
    # a restart loop: a crash at every start
    for i, t in enumerate((30, 31, 32, 33)):
        looping = unit("activating", "auto-restart", result="exit-code", n=2 + i)
        step(obs(t, health=refused(), unit=dataclasses.replace(looping, invocation_id=f"l{i}")))
    # the back-off's wait is over: one start attempt
    step(obs(37, health=refused(), unit=unit("inactive", "dead", n=5)))
    return told


def _printed(told: Iterable[tuple[float, Event]]) -> list[str]:
    return [
        line
        for at, e in told
        if e.kind is not EventKind.LOAD_PROGRESS  # the demo does not print progress
        for line in event_lines(at, e)
    ]


def _tail(message: str) -> str:
    """What a line says after its first ': ' (all of it when it has none)."""
    return message.split(": ", 1)[1] if ": " in message else message


def voice_faults(told: Sequence[tuple[float, Event]]) -> list[str]:
    """Where the stream breaks the voice: a text said twice in a row (one line's words after
    its ':' inside the next one or the line before), a state_changed line with no [rule], a
    printed line over WIDTH columns."""
    faults = []
    shown = [(at, e) for at, e in told if e.kind is not EventKind.LOAD_PROGRESS]
    for (_, a), (_, b) in itertools.pairwise(shown):
        if _tail(b.message) in a.message or _tail(a.message) in b.message:
            faults.append(f"said twice: {a.message!r} / {b.message!r}")
    for at, e in shown:
        first = event_lines(at, e)[0]
        if e.kind is EventKind.STATE_CHANGED and not RULE.search(first):
            faults.append(f"no [rule]: {first!r}")
        faults += [
            f"over {WIDTH} columns: {line!r}" for line in event_lines(at, e) if len(line) > WIDTH
        ]
    return faults


def test_the_demo_story_reads_as_the_golden_file() -> None:
    screen = "\n".join(_printed(_story())) + "\n"
    if REGEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(screen, encoding="utf-8")
    assert screen == GOLDEN.read_text(encoding="utf-8")


def test_the_demo_story_says_each_text_once_with_its_rule() -> None:
    assert voice_faults(_story()) == []


def test_recovery_is_one_line_of_evidence_and_a_change_that_cites_it() -> None:
    told = [e for _, e in _story()]
    recovered = [e for e in told if e.kind is EventKind.RECOVERED]
    assert recovered, "the story recovers twice"
    for e in recovered:
        assert e.message.count("recover") <= 1, e.message  # "recovered: ... after recovering"
        assert "a 1-token completion passed in 300 ms" in e.message
        change = told[told.index(e) + 1]
        assert change.kind is EventKind.STATE_CHANGED
        assert (change.rule, change.message) == (e.rule, "recovering -> healthy")


def test_a_load_is_told_before_the_change_it_led_to() -> None:
    told = [e for _, e in _story()]
    kinds = [e.kind for e in told]
    loaded = kinds.index(EventKind.MODEL_LOADED)
    change = next(e for e in told if e.message.startswith("loading -> recovering"))
    assert loaded < told.index(change)


def test_no_line_names_the_restart_loop_before_its_own_record() -> None:
    """Review 1 item 6: the note on restarts seen late was filed under restart_loop, and the
    crash before the loop read "[restart_loop] healthy -> down"."""
    told = [e for _, e in _story()]
    first = next(i for i, e in enumerate(told) if e.kind is EventKind.RESTART_LOOP)
    assert [e.message for e in told[:first] if e.rule is Rule.RESTART_LOOP] == []
    crash = [e for e in told[:first] if e.message.startswith("healthy -> down")][-1]
    assert (crash.rule, crash.message) == (Rule.DOWN, "healthy -> down: refused")


def test_the_back_off_is_told_by_the_loop_record_then_by_the_attempt() -> None:
    """Review 1 item 7: no diagnosis between them repeats the step and its delay."""
    told = [e for _, e in _story()]
    loop = next(i for i, e in enumerate(told) if e.kind is EventKind.RESTART_LOOP)
    attempt = next(i for i, e in enumerate(told) if e.rule is Rule.BACKOFF_ATTEMPT)
    between = [e.message for e in told[loop:attempt] if e.kind is EventKind.DIAGNOSIS]
    assert between == []


@pytest.mark.slow
def test_a_real_demo_run_says_each_text_once_with_its_rule() -> None:
    """The real daemon against the simulated node (`demo --fast`): its events, cycle by cycle
    (a cycle's events share their wall time), keep the same voice."""
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hydra-voice-") as tmp:
        demo = Demo(Path(tmp), lines.append, scale=FAST)
        try:
            incidents = demo.run()
        finally:
            demo.close()
    assert all(i.recovered_s is not None for i in incidents), "\n".join(lines)
    told = [(at, e) for at, e in demo.events]
    cycles: dict[float, list[tuple[float, Event]]] = {}
    for at, e in told:
        cycles.setdefault(e.wall, []).append((at, e))
    faults = [f for cycle in cycles.values() for f in voice_faults(cycle)]
    assert faults == [], "\n".join(lines)
    kinds = {e.kind for _, e in told}
    assert {EventKind.STATE_CHANGED, EventKind.RECOVERED, EventKind.RESTART_LOOP} <= kinds
    starts = [e.message for _, e in told if e.kind in (EventKind.STARTED, EventKind.STOPPING)]
    assert all(not m.startswith("watchdog ") for m in starts), starts  # the kind's name again
