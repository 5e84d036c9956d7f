"""Issue 23 item 2: each situation has its own rule, and a change of phase cites the finding of
the rule that decided it (never whatever warning happens to stand)."""

from __future__ import annotations

import dataclasses

from hydra_watchdog.actions import LoadModel, ResultStatus, UnitCommand, UnitVerb
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import GpuReport, NvmlErrorKind, Observation, Outcome
from hydra_watchdog.report.metrics import Metrics
from hydra_watchdog.states import Phase, Rule
from tests.policy_kit import (
    Run,
    canary,
    config,
    gpus,
    model,
    obs,
    ok_results,
    paused,
    refused,
    result,
    unit,
)
from tests.test_metrics import samples
from tests.test_status_report import build

NO_NVML = GpuReport(error=NvmlErrorKind.LIBRARY_NOT_FOUND, detail="libnvidia-ml.so.1 not found")


def told(run: Run, o: Observation) -> tuple[Event, ...]:
    """Step `o` and narrate that cycle as the daemon does."""
    prev = run.state
    acts = run.step(o)
    return narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)


def change(events: tuple[Event, ...]) -> Event:
    return next(e for e in events if e.kind is EventKind.STATE_CHANGED)


def test_the_wait_for_a_canary_after_a_restart_is_not_a_generation_hang() -> None:
    run = Run()
    run.step(obs(0))
    down = unit("failed", "failed", result="exit-code")
    acts = run.step(obs(1, health=refused(), unit=down))
    start = [a for a in acts if isinstance(a, UnitCommand) and a.verb is UnitVerb.START]
    assert start
    events = told(run, obs(2, health=refused(), unit=unit(enter=2), results=ok_results(acts, 1)))
    events += told(run, obs(8, unit=unit(enter=2)))
    assert run.state.phase is Phase.RECOVERING
    assert Rule.GENERATION_HANG not in {e.rule for e in events}
    [wait] = [e for e in events if e.kind is EventKind.DIAGNOSIS]
    assert wait.rule is Rule.CANARY_PENDING
    assert wait.message == (
        "waiting for a 1-token completion to pass after the watchdog's start of "
        "tabbyapi.service: not called healthy until one does"
    )
    told(run, obs(9, unit=unit(enter=2), canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY
    assert not [f for f in run.state.findings if f.rule is Rule.CANARY_PENDING]


def test_the_wait_after_a_load_names_the_load() -> None:
    run = Run()
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    events = told(run, obs(5, results=(result(load, ResultStatus.OK, "loaded", 5),)))
    [wait] = [e for e in events if e.kind is EventKind.DIAGNOSIS]
    assert wait.rule is Rule.CANARY_PENDING and "after the load of M:" in wait.message
    # said once: the finding's record says it; the change names its rule, and keeps the
    # evidence for journald (HYDRA_REASON)
    assert change(events).message == "loading -> recovering"
    assert (change(events).rule, change(events).reason) == (Rule.CANARY_PENDING, wait.message)


def test_systemd_unavailable_is_its_own_rule_not_tabbyapi_down() -> None:
    run = Run()
    run.step(obs(0, unit=unit(available=False)))
    assert run.state.phase is Phase.HEALTHY
    rules = [f.rule for f in run.state.findings]
    assert rules == [Rule.SYSTEMD_UNAVAILABLE]
    metrics = Metrics()
    try:
        metrics.update(build(run.state))
        values = samples(metrics.exposition().decode())
    finally:
        metrics.shutdown()
    assert values[("hydra_watchdog_findings", (("rule", "tabbyapi_down"),))] == 0
    assert values[("hydra_watchdog_findings", (("rule", "systemd_unavailable"),))] == 1


def test_a_failed_load_is_cited_not_the_nvml_warning() -> None:
    """`loading -> blocked: NVML unavailable` was said after a permanent load failure."""
    run = Run(cfg=config(model={"fallback": ""}))
    run.step(obs(0, gpus=NO_NVML))
    load = next(
        a for a in run.step(obs(1, gpus=NO_NVML, model=model(None))) if isinstance(a, LoadModel)
    )
    failed = result(
        load, ResultStatus.FAILED, "Could not find the model path", 5, ErrorKind.LOAD_PERMANENT
    )
    events = told(run, obs(5, gpus=NO_NVML, model=model(None), results=(failed,)))
    assert run.state.phase is Phase.BLOCKED
    blocked = change(events)
    assert blocked.rule is Rule.LOAD_FAILED
    assert blocked.message == "loading -> blocked"  # the load_failed record before it says why
    assert blocked.reason.startswith("M cannot be loaded: Could not find")
    said = [e for e in events if e.kind is not EventKind.STATE_CHANGED]
    assert any(blocked.reason in e.message for e in said)


def test_an_unload_is_told_with_the_load_not_the_nvml_warning() -> None:
    """`healthy -> loading: NVML unavailable` was said after an unload."""
    run = Run()
    run.step(obs(0, gpus=NO_NVML))
    events = told(run, obs(1, gpus=NO_NVML, model=model(None)))
    loading = change(events)
    assert loading.rule is Rule.NO_MODEL
    assert loading.message == (
        "healthy -> loading: healthy but no model loaded; VRAM not checked (unknown)"
    )


def test_a_pause_is_told_with_the_pause_not_the_last_cause() -> None:
    run = Run()
    run.step(obs(0))
    for t in range(1, 4):
        run.step(obs(t, health=refused()))
    assert run.state.cause.startswith("unreachable")
    events = told(run, dataclasses.replace(obs(4, health=refused()), pause=paused()))
    pause = change(events)
    assert (pause.message, pause.rule) == ("recovering -> paused", Rule.PAUSED)
    assert pause.reason == "paused until resumed: maintenance"
    [said] = [e for e in events if e.kind is EventKind.PAUSED]
    assert said.message == pause.reason


def test_the_fallback_finding_says_why_it_was_loaded() -> None:
    """Was "serving the fallback model F, not M (M failed to load 0x)" when M did not fit."""
    run = Run()
    crowded = gpus(free0=10.0, free1=5.0)  # M needs 20 GiB, F 8
    acts = run.step(obs(0, model=model(None), gpus=crowded))
    [load] = [a for a in acts if isinstance(a, LoadModel)]
    assert load.model == "F"
    run.step(obs(5, model=model("F"), gpus=crowded, results=(result(load, ResultStatus.OK),)))
    [said] = [f.message for f in run.state.findings if f.rule is Rule.FALLBACK_MODEL]
    assert said == (
        "serving the fallback model F, not M (M did not fit in the free VRAM); "
        "M is tried again when that clears, or hourly"
    )
