"""NixOS rebuilds in the policy: switches, restart_will_fail, and "what changed" evidence."""

from __future__ import annotations

import dataclasses

from hydra_watchdog.actions import UnitCommand, UnitVerb
from hydra_watchdog.durations import format_duration
from hydra_watchdog.observation import SystemLink
from hydra_watchdog.states import Phase, Rule, Severity
from tests.policy_kit import Run, config, host, obs, refused, sticky, timeout, unit

OLD = SystemLink("/run/current-system", "/nix/store/aaa-nixos-system-41", 41)
NEW = SystemLink("/run/current-system", "/nix/store/bbb-nixos-system-42", 42)
BROKEN = host(missing_libraries=("libcudart.so.12",))


def _switched_with_broken_libraries(run: Run) -> None:
    run.step(obs(0, system=OLD, host=host(missing_libraries=())))
    run.step(obs(1, system=NEW, host=BROKEN))


def test_a_switch_that_breaks_the_libraries_warns_and_keeps_tabbyapi_running() -> None:
    run = Run()
    _switched_with_broken_libraries(run)
    switch = run.state.last_switch
    assert switch is not None and (switch.from_generation, switch.to_generation) == (41, 42)
    warning = next(f for f in run.state.findings if f.rule is Rule.RESTART_WILL_FAIL)
    assert warning.severity is Severity.WARNING and "libcudart.so.12" in warning.message
    assert "generation 41 -> generation 42" in warning.message
    assert not any(f.rule is Rule.MISSING_LIBRARIES for f in run.state.findings)
    assert run.state.phase is Phase.DEGRADED  # status: WARNING, exit 1
    # Later cycles do not run ldd unless asked: the finding holds, and ldd is asked for.
    assert run.step(obs(2, system=NEW)) == ()
    assert any(f.rule is Rule.RESTART_WILL_FAIL for f in run.state.findings)
    assert "libraries" in {p.value for p in run.state.wants}


def test_a_rebuilt_venv_clears_the_warning() -> None:
    run = Run()
    _switched_with_broken_libraries(run)
    run.step(obs(2, system=NEW, host=host(missing_libraries=())))
    assert not any(f.rule is Rule.RESTART_WILL_FAIL for f in run.state.findings)
    assert run.state.phase is Phase.HEALTHY


def test_the_first_link_seen_is_a_baseline_not_a_switch() -> None:
    run = Run()
    run.step(obs(0, system=NEW))
    assert run.state.last_switch is None and run.state.system_target == NEW.target


def test_no_restart_for_a_sticky_503_or_unreachable_port_while_the_process_runs() -> None:
    for bad in (sticky(), timeout()):
        run = Run()
        _switched_with_broken_libraries(run)
        for t in range(2, 10):
            assert run.step(obs(t, system=NEW, health=bad)) == ()
        deferred = [f for f in run.state.findings if f.rule is Rule.RESTART_WILL_FAIL]
        assert any("not restarting" in f.message for f in deferred), deferred
        assert run.state.phase is Phase.BLOCKED  # left to a human: "restart it by hand"


def test_without_the_libraries_problem_the_same_503_restarts() -> None:
    run = Run()
    run.step(obs(0, system=OLD, host=host(missing_libraries=())))
    acts = run.step(obs(1, system=NEW, health=sticky(), host=host(missing_libraries=())))
    assert [a.verb for a in acts if isinstance(a, UnitCommand)] == [UnitVerb.RESTART]


def test_a_real_outage_is_acted_on_and_a_fresh_check_decides() -> None:
    run = Run()
    _switched_with_broken_libraries(run)
    down = unit("failed", "failed", result="exit-code")
    # The process is gone: no longer restart_will_fail; still-missing libraries block the start.
    for t in range(2, 6):
        assert run.step(obs(t, system=NEW, health=refused(), unit=down, host=BROKEN)) == ()
    assert any(f.rule is Rule.MISSING_LIBRARIES for f in run.state.findings)
    assert not any(f.rule is Rule.RESTART_WILL_FAIL for f in run.state.findings)
    # Fixed venv: the start goes ahead.
    acts = run.step(
        obs(6, system=NEW, health=refused(), unit=down, host=host(missing_libraries=()))
    )
    assert [a.verb for a in acts if isinstance(a, UnitCommand)] == [
        UnitVerb.RESET_FAILED,
        UnitVerb.START,
    ]


def test_an_outage_soon_after_a_switch_names_it() -> None:
    run = Run()
    run.step(obs(0, system=OLD))
    run.step(obs(100, system=NEW))
    down = unit("failed", "failed", result="exit-code")
    run.step(obs(220, system=NEW, health=refused(), unit=down))
    note = next(f for f in run.state.findings if f.rule is Rule.SYSTEM_SWITCHED)
    assert "generation 41 -> generation 42" in note.message
    assert f"{format_duration(220 - 100)} before the first failure" in note.message, note


def test_an_outage_long_after_a_switch_does_not_blame_it() -> None:
    cfg = config(restart_loop={"escalate_after": "30m"})
    run = Run(cfg=cfg)
    run.step(obs(0, system=OLD))
    run.step(obs(100, system=NEW))
    run.step(obs(100 + 3600, system=NEW, health=refused(), unit=unit("failed", "failed")))
    assert not any(f.rule is Rule.SYSTEM_SWITCHED for f in run.state.findings)


def test_a_process_that_never_served_is_the_plain_missing_libraries_case() -> None:
    run = Run()
    starting_up = unit("activating", "start", enter=0.0)
    run.step(obs(0, system=NEW, health=refused(), unit=starting_up, host=BROKEN))
    assert run.state.will_fail == ()
    finding = next(f for f in run.state.findings if f.rule is Rule.MISSING_LIBRARIES)
    assert finding.severity is Severity.CRIT


def test_the_restart_loop_record_says_what_changed() -> None:
    from hydra_watchdog.events import Event, EventKind
    from hydra_watchdog.narrate import narrate

    cfg = config(restart_loop={"max_restarts": 1, "window": "10m"})
    run = Run(cfg=cfg)
    run.step(obs(0, system=OLD))
    run.step(obs(10, system=NEW))
    crashed = unit("activating", "auto-restart", n=0)
    records: list[Event] = []
    for t, n in ((20, 1), (21, 2), (22, 3)):
        prev = run.state
        o = obs(t, system=NEW, health=refused(), unit=dataclasses.replace(crashed, n_restarts=n))
        actions = run.step(o)
        records += narrate(prev, run.state, actions, (), o, config=cfg, wall=float(t))
    loop = next(e for e in records if e.kind is EventKind.RESTART_LOOP)
    assert "generation 41 -> generation 42" in loop.message, loop.message
