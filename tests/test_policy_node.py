"""What an independent model of the node found (issue 23 item 12), each class as a minimal story
on a fake clock (the oracle, tests/oracle/, runs the same stories among its random traces).

A story fails on the policy before its fix: each test names the line that was wrong."""

from __future__ import annotations

import dataclasses

from hydra_watchdog.actions import Action, LoadModel, UnitCommand, UnitVerb
from hydra_watchdog.events import EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import Observation, Outcome, ProcessRole, UnitStatus
from hydra_watchdog.policy import LIBRARY_CHECK_TRIES
from hydra_watchdog.policy_state import CanaryVerdict
from hydra_watchdog.states import Phase, Rule
from tests.policy_kit import (
    PORT,
    Run,
    canary,
    config,
    host,
    model,
    obs,
    ports,
    proc,
    refused,
    unit,
)

VENV = config(tabbyapi={"venv": "/opt/tabbyapi/venv"})
LIBS_GONE = host(missing_libraries=("libcudart.so.12",))
HUNG = host(  # the host check did not answer: neither the folders nor the libraries read
    models_dir_ok=None,
    models_dir_detail="not checked: the host check did not answer within 12 s",
    libraries_checked=False,
    model=None,
    fallback=None,
)


def invocation(u: UnitStatus, inv: str, **kw: object) -> UnitStatus:
    return dataclasses.replace(u, invocation_id=inv, **kw)  # type: ignore[arg-type]


def starts(acts: tuple[Action, ...]) -> list[UnitCommand]:
    return [
        a
        for a in acts
        if isinstance(a, UnitCommand) and a.verb in (UnitVerb.START, UnitVerb.RESTART)
    ]


def recovered(run: Run, o: Observation) -> bool:
    """Step `o`; True when that cycle says "recovered"."""
    prev = run.state
    acts = run.step(o)
    events = narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
    return any(e.kind is EventKind.RECOVERED for e in events)


# --- "recovered" and HEALTHY after any restart only after a passing canary -----------------------


def test_a_crash_that_systemd_restarted_is_not_recovered_before_a_canary() -> None:
    """Old: a crash, systemd's Restart=, "recovered" at the next cycle with no canary."""
    run = Run()
    run.step(obs(0))
    crashed = unit("activating", "auto-restart", result="signal", n=0)
    run.step(obs(1, health=refused(), unit=crashed))
    back = invocation(unit(enter=3, n=1), "inv-2")
    assert not recovered(run, obs(8, unit=back))
    assert run.state.phase is Phase.RECOVERING
    assert run.state.canary_verdict is CanaryVerdict.UNVERIFIED
    assert "canary" in {p.value for p in run.state.wants}
    assert recovered(run, obs(9, unit=back, canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY


def test_a_restart_by_hand_needs_a_canary_too() -> None:
    """A human's `systemctl restart` between two cycles: a new InvocationID, NRestarts 0."""
    run = Run()
    run.step(obs(0))
    run.step(obs(1, unit=invocation(unit(enter=0.5), "inv-by-hand")))
    assert run.state.phase is Phase.RECOVERING
    run.step(obs(2, unit=invocation(unit(enter=0.5), "inv-by-hand"), canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY


def test_without_systemd_a_new_process_on_the_port_needs_a_canary() -> None:
    """No unit to ask: TabbyAPI's process is told apart by its pid and start ticks."""
    run = Run()
    nosd = unit(available=False, enter=None)
    first = proc(300, ProcessRole.ORPHAN, listens=(PORT,))
    run.step(obs(0, unit=nosd, port=ports((PORT, 300)), processes=(first,)))
    assert run.state.phase is Phase.HEALTHY
    again = dataclasses.replace(first, start_ticks=first.start_ticks + 500)  # the pid reused
    run.step(obs(1, unit=nosd, port=ports((PORT, 300)), processes=(again,)))
    assert run.phase() is Phase.RECOVERING
    # The same process, read again (or not seen this cycle): nothing new.
    run.step(obs(2, unit=nosd, port=ports(), processes=(), canary=canary(Outcome.OK)))
    run.step(obs(3, unit=nosd, port=ports((PORT, 300)), processes=(again,)))
    assert run.phase() is Phase.HEALTHY


# --- no restart while restart_will_fail stands, nor before this outage's library check ----------


def _will_fail(run: Run) -> None:
    """A switch removed libcudart: TabbyAPI runs on what it mapped before (restart_will_fail)."""
    run.step(obs(0, host=host(missing_libraries=())))
    run.step(obs(1, host=LIBS_GONE))
    assert run.state.will_fail == ("libcudart.so.12",)


def test_a_failed_canary_and_an_unloaded_model_do_not_restart_while_it_would_fail() -> None:
    """Old: `restart tabbyapi.service [generation_hang]` once the model was gone."""
    run = Run(cfg=VENV)
    _will_fail(run)
    run.step(obs(2, canary=canary(Outcome.HTTP_ERROR)))
    assert run.state.canary_verdict is CanaryVerdict.FAILED
    for t in range(3, 12):
        acts = run.step(obs(t, model=model(None)))
        assert not starts(acts), acts
    assert any(isinstance(a, LoadModel) for a in run.actions)  # a load is no restart


def test_no_back_off_attempt_while_a_restart_would_fail() -> None:
    run = Run(cfg=VENV)
    _will_fail(run)
    run.state = dataclasses.replace(
        run.state,
        backoff_step=1,
        backoff_until=2.0,
        loop_since=0.0,
        canary_verdict=CanaryVerdict.FAILED,
    )
    for t in range(3, 12):  # neither a start nor a stop of the process that still works
        assert not [a for a in run.step(obs(t, model=model(None))) if isinstance(a, UnitCommand)]


def test_no_restart_for_an_orphan_while_a_restart_would_fail() -> None:
    run = Run(cfg=VENV)
    _will_fail(run)
    orphan = proc(300, ProcessRole.ORPHAN, listens=(PORT,))
    main = proc(100, ProcessRole.MAIN, listens=(PORT,))
    acts = run.step(
        obs(3, model=model(None), port=ports((PORT, 100), (PORT, 300)), processes=(main, orphan))
    )
    assert not starts(acts)
    assert [a.kind for a in acts] == ["kill_orphan", "load_model"]


def test_a_generation_hang_restart_waits_for_this_outages_library_check() -> None:
    """Old: a generation-hang restart with no library check at all while the libraries were
    gone; the check had run only before the outage."""
    run = Run(cfg=VENV)
    run.step(obs(0, host=host(missing_libraries=())))  # a check, long before
    unchecked = host(libraries_checked=False)
    acts = run.step(obs(100, host=unchecked, canary=canary(Outcome.TIMEOUT)))
    assert not starts(acts)
    assert run.state.phase is Phase.DOWN
    assert "libraries" in {p.value for p in run.state.wants}
    [wait] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert "no (re)start before this outage's library check" in wait.message
    # The check runs and finds them gone under the running process: never restarted.
    for t in range(101, 110):
        assert not starts(run.step(obs(t, host=LIBS_GONE if t == 101 else unchecked)))
    assert run.state.will_fail == ("libcudart.so.12",)
    assert any(
        f.subject == "deferred" for f in run.state.findings if f.rule is Rule.RESTART_WILL_FAIL
    )


def test_after_the_library_check_the_hang_is_restarted() -> None:
    run = Run(cfg=VENV)
    run.step(obs(0, host=host(missing_libraries=())))
    run.step(obs(100, host=host(libraries_checked=False), canary=canary(Outcome.TIMEOUT)))
    acts = run.step(obs(101, host=host(missing_libraries=())))
    assert [(a.verb, a.reason.rule) for a in starts(acts)] == [
        (UnitVerb.RESTART, Rule.GENERATION_HANG)
    ]


# --- a check that cannot run never blocks recovery for ever --------------------------------------


def test_a_hung_host_check_delays_the_start_a_few_cycles_and_says_why() -> None:
    """Old: a failed unit never started while the host check hung (an hour and more)."""
    run = Run(cfg=VENV)
    run.step(obs(0, host=host(missing_libraries=())))
    hung = HUNG
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code")}
    waited = 0
    for t in range(1, 40):
        acts = run.step(obs(t, host=hung, **down))
        if starts(acts):
            break
        waited += 1
        [wait] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
        assert "did not answer within 12 s" in wait.message
    assert waited == LIBRARY_CHECK_TRIES  # asked, and missed TRIES times (the last one starts)
    [said] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert said.message.startswith("(re)starting without this outage's library check")


def test_a_back_off_attempt_waits_for_the_library_check_a_few_cycles() -> None:
    run = Run(cfg=VENV)
    run.state = dataclasses.replace(
        run.state, phase=Phase.BACKOFF, backoff_step=1, backoff_until=1.0, trouble_since=0.0
    )
    stopped = {"health": refused(), "unit": unit("inactive", "dead"), "host": HUNG}
    for t in range(1, 10):
        if starts(run.step(obs(t, **stopped))):
            break
    assert t == 1 + LIBRARY_CHECK_TRIES  # due at 1: asked, then missed TRIES times
    [said] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert said.subject == "skipped"


def test_a_full_recovery_stops_nothing_before_the_library_check() -> None:
    """check_libraries_first comes before the full recovery: no stop of TabbyAPI and no GPU
    reset for a start that may not be allowed (issue 23 item 11: a mutant dropped it)."""
    run = Run(cfg=VENV)
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=10.0)
    down = {
        "health": refused(),
        "host": host(libraries_checked=False),
        "processes": (orphan,),
        "port": ports(),
    }
    for t in range(1, 4):
        acts = run.step(obs(t, **down))
    assert not [a for a in acts if isinstance(a, UnitCommand)], acts
    assert run.state.phase is Phase.DOWN
    acts = run.step(obs(4, **{**down, "host": host(missing_libraries=())}))
    assert [a.verb for a in acts if isinstance(a, UnitCommand)] == [UnitVerb.STOP, UnitVerb.START]
